"""Image folders and safe image loading: every kind of bad input named in the data issue."""

import io
import resource
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from fewshot_lkca.data import (
    CorruptImageError,
    DataError,
    DataWarning,
    ImageFolderDataset,
    ImageTooLargeError,
    get_dataset,
    load_image,
)


def _noise(size=(24, 24), seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def _png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header is rewritten to claim width x height (a decompression bomb)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF)
    return bytes(data)


def _make_folder(root, classes=("cat", "dog"), per_class=3):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            _noise(seed=100 * c + i).save(root / name / f"{i}.png")
    return root


# --- conversions -------------------------------------------------------------------------------------------


def _roundtrip(image: Image.Image, fmt: str, **save) -> np.ndarray:
    buf = io.BytesIO()
    image.save(buf, fmt, **save)
    return load_image(buf.getvalue(), name=f"x.{fmt.lower()}")


def test_grayscale_becomes_three_equal_channels():
    out = _roundtrip(Image.new("L", (5, 4), 77), "PNG")
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8
    assert (out == 77).all()


def test_rgba_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (255, 0, 0, 255))  # one opaque red pixel
    out = _roundtrip(rgba, "PNG")
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[3, 3]) == (255, 255, 255)


def test_gray_alpha_is_composited_on_white():
    out = _roundtrip(Image.new("LA", (3, 3), (0, 0)), "PNG")
    assert (out == 255).all()


def test_palette_images_expand_and_transparent_index_becomes_white():
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    assert tuple(_roundtrip(palette, "PNG")[0, 0]) == (0, 255, 0)
    out = _roundtrip(palette, "PNG", transparency=1)
    assert tuple(out[0, 0]) == (255, 255, 255)


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    gray16 = Image.fromarray(np.array([[0, 257 * 128, 65535]], dtype=np.uint16))
    assert gray16.mode == "I;16"
    out = _roundtrip(gray16, "PNG")
    assert out[0, :, 0].tolist() == [0, 128, 255]


def test_cmyk_is_converted_to_rgb():
    cmyk = Image.new("CMYK", (2, 1), (0, 0, 0, 0))
    cmyk.putpixel((1, 0), (0, 255, 255, 0))  # no cyan ink, full magenta and yellow: red
    out = _roundtrip(cmyk, "TIFF")
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (255, 0, 0)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    out = _roundtrip(image, "JPEG", exif=exif, quality=95)
    assert out.shape == (40, 20, 3)  # portrait after the turn
    assert out[5, 10, 0] > 200 and out[5, 10, 2] < 60  # the left (red) half is now on top
    assert out[35, 10, 2] > 200 and out[35, 10, 0] < 60


# --- corrupt and oversized files ---------------------------------------------------------------------------


def test_zero_byte_file_is_refused(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(CorruptImageError, match=r"empty\.jpg: empty file"):
        load_image(tmp_path / "empty.jpg")


def test_text_file_named_jpg_is_refused(tmp_path):
    (tmp_path / "notes.jpg").write_text("not a picture")
    with pytest.raises(CorruptImageError, match="notes.jpg: not an image"):
        load_image(tmp_path / "notes.jpg")


def test_truncated_jpeg_is_refused(tmp_path):
    buf = io.BytesIO()
    _noise((64, 64)).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(CorruptImageError, match="cut.jpg: cannot decode"):
        load_image(tmp_path / "cut.jpg")


def test_decompression_bomb_is_refused_quickly_and_without_memory(tmp_path):
    (tmp_path / "bomb.png").write_bytes(_png_claiming(100_000, 100_000))  # 10 gigapixels, 30 GB decoded
    (tmp_path / "big.png").write_bytes(_png_claiming(10_000, 10_000))  # 100 MP: over our 50 MP limit
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ImageTooLargeError, match="bomb.png: refused"):
        load_image(tmp_path / "bomb.png")
    with pytest.raises(ImageTooLargeError, match=r"big.png: refused, 10000x10000 px = 100 MP is over the 50 MP"):
        load_image(tmp_path / "big.png")
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # ru_maxrss is in kB
    assert grown_mb < 50


def test_max_pixels_is_configurable():
    buf = io.BytesIO()
    _noise((100, 100)).save(buf, "PNG")
    with pytest.raises(ImageTooLargeError, match="over the 0 MP limit"):
        load_image(buf.getvalue(), max_pixels=5000)
    assert load_image(buf.getvalue(), max_pixels=10_000).shape == (100, 100, 3)


def test_folder_scan_skips_bad_files_and_names_them_in_one_warning(tmp_path):
    root = _make_folder(tmp_path / "data")
    (root / "cat" / "empty.png").write_bytes(b"")
    (root / "cat" / "readme.txt").write_text("hello")
    (root / "dog" / "fake.jpg").write_text("not a jpeg")
    (root / "dog" / "bomb.png").write_bytes(_png_claiming(100_000, 100_000))
    buf = io.BytesIO()
    _noise((64, 64)).save(buf, "JPEG")
    (root / "dog" / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # header intact
    (root / "dog" / ".DS_Store").write_bytes(b"\0\1")  # hidden: ignored silently
    with pytest.warns(DataWarning) as record:
        ds = ImageFolderDataset(root)
    skipped = [str(w.message) for w in record if "skipped" in str(w.message)]
    assert len(skipped) == 1 and "\n" not in skipped[0]
    assert "skipped 5 of 11 files" in skipped[0]
    for name in ("empty.png", "readme.txt", "fake.jpg", "bomb.png", "cut.jpg"):
        assert name in skipped[0]
    assert ".DS_Store" not in skipped[0]
    assert ds.class_counts() == {"cat": 3, "dog": 3}
    image, label = ds[4]
    assert image.shape == (24, 24, 3) and ds.classes[label] == "dog"


# --- folder structure --------------------------------------------------------------------------------------


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nowhere")


def test_root_without_class_folders(tmp_path):
    _noise().save(tmp_path / "loose.png")
    with pytest.raises(DataError, match="no class folders in"):
        ImageFolderDataset(tmp_path)


def test_empty_class_folder_is_named_with_counts(tmp_path):
    root = _make_folder(tmp_path, ("cat", "dog"))
    (root / "fish").mkdir()
    (root / "fish" / "broken.png").write_bytes(b"")
    with pytest.warns(DataWarning), pytest.raises(DataError, match=r"'fish' \(0 images, 1 files skipped\)"):
        ImageFolderDataset(root)


def test_fewer_than_two_classes(tmp_path):
    root = _make_folder(tmp_path, ("cat",), per_class=4)
    with pytest.raises(DataError, match=r"need at least 2 classes, found 1 .*'cat' \(4 images\)"):
        ImageFolderDataset(root)


def test_same_image_in_two_classes_warns_naming_both(tmp_path):
    root = _make_folder(tmp_path, ("cat", "dog"))
    (root / "dog" / "copy.png").write_bytes((root / "cat" / "1.png").read_bytes())
    with pytest.warns(DataWarning, match=r"'cat' and 'dog' \(cat/1.png = dog/copy.png\)"):
        ImageFolderDataset(root)


def test_distinct_images_of_equal_size_do_not_warn(tmp_path):
    root = _make_folder(tmp_path, ("cat", "dog"))  # same dimensions and format, different pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ImageFolderDataset(root)


def test_split_lists_select_classes(tmp_path):
    root = _make_folder(tmp_path, ("a", "b", "c", "d"))
    (root / "base.txt").write_text("# base classes\na\nb\n\nc\n")
    assert ImageFolderDataset(root, "base").classes == ["a", "b", "c"]
    assert ImageFolderDataset(root, "novel").classes == ["a", "b", "c", "d"]  # documented fallback: all
    with pytest.raises(DataError, match="split 'val' needs the class list"):
        ImageFolderDataset(root, "val")
    (root / "val.txt").write_text("a\nzebra\n")
    with pytest.raises(DataError, match="zebra"):
        ImageFolderDataset(root, "val")


def test_get_dataset_accepts_a_folder(tmp_path):
    root = _make_folder(tmp_path, ("a", "b"))
    ds = get_dataset(root, transform=lambda x: x.shape)
    assert isinstance(ds, ImageFolderDataset)
    assert ds[0] == ((24, 24, 3), 0)
