"""Safe image loading, torch-free: every reader of the data layer and the device-side predictor use it.

Loading policy, in order:

1. Refuse before decoding: empty files, files Pillow cannot identify, and headers that claim more than
   `max_pixels` (default 50 MP; a decompression bomb is a tiny file that claims a huge size).
2. Decode, then turn upright by the EXIF orientation tag.
3. Convert to RGB uint8: grayscale and palette images are expanded; images with alpha (RGBA, LA, PA, P with a
   transparent colour) are composited on white, the colour of paper and of most product shots; 16-bit
   grayscale is scaled (65535 -> 255), never clipped; CMYK goes through Pillow's conversion.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import CorruptImageError, DataError, ImageTooLargeError

__all__ = ["IMAGE_EXTENSIONS", "MAX_PIXELS", "load_image", "verify_image"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")  # GIF: its first frame
MAX_PIXELS = 50_000_000  # 50 MP: a 12 MP phone photo passes; 150 MB of RGB is the most one image may cost
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _open_checked(source: str | os.PathLike | bytes, name: str, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and refuse empty, unknown and oversized images."""
    if isinstance(source, bytes):
        size, fp = len(source), io.BytesIO(source)
    else:
        try:
            size = os.path.getsize(source)
        except OSError as err:
            raise DataError(f"{name}: cannot read ({err.strerror})") from None
        fp = source
    if size == 0:
        raise CorruptImageError(f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # We apply our own, lower limit below; Pillow's warning would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(fp)
    except UnidentifiedImageError:
        raise CorruptImageError(f"{name}: not an image file Pillow can read") from None
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(f"{name}: refused, {err}") from None
    except _DECODE_ERRORS as err:
        raise CorruptImageError(f"{name}: corrupt header ({err})") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageTooLargeError(
            f"{name}: refused, {width}x{height} px = {width * height / 1e6:.0f} MP is over the "
            f"{max_pixels / 1e6:.0f} MP limit (decompression bomb or absurd size); pass a larger max_pixels "
            "if the image is genuine"
        )
    return image


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Convert any Pillow mode to an HxWx3 uint8 RGB array (policy in the module docstring)."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        gray = np.asarray(image).astype(np.float32)
        if gray.max(initial=0) > 65535 or gray.min(initial=0) < 0:  # genuine 32-bit data: stretch its range
            gray = (gray - gray.min()) * (65535.0 / max(float(np.ptp(gray)), 1.0))
        gray8 = np.rint(gray / 257.0).astype(np.uint8)  # 65535 / 257 = 255 exactly
        return np.repeat(gray8[:, :, None], 3, axis=2)
    if mode == "F":
        gray = np.nan_to_num(np.asarray(image, dtype=np.float32))
        gray = (gray - gray.min()) * (255.0 / max(float(np.ptp(gray)), 1e-12))
        return np.repeat(np.rint(gray).astype(np.uint8)[:, :, None], 3, axis=2)
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.array(image, dtype=np.uint8)


def load_image(
    source: str | os.PathLike | bytes,
    *,
    max_pixels: int = MAX_PIXELS,
    name: str | None = None,
) -> np.ndarray:
    """Load one image as an upright HxWx3 uint8 RGB array, refusing bombs and corrupt files.

    Args:
        source: A path, or the encoded bytes of an image (e.g. read from a zip).
        max_pixels: Largest width x height accepted, checked from the header before decoding.
        name: How messages name the image; defaults to the path.

    Returns:
        The image as a writable HxWx3 uint8 array.

    Raises:
        CorruptImageError: Empty, not an image, truncated or undecodable.
        ImageTooLargeError: The header claims more than `max_pixels`.

    Example:
        >>> import numpy as np, io
        >>> from PIL import Image
        >>> buf = io.BytesIO(); Image.new("L", (4, 3), 7).save(buf, "PNG")
        >>> load_image(buf.getvalue(), name="tiny.png").shape
        (3, 4, 3)
    """
    name = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    image = _open_checked(source, name, max_pixels)
    with image:
        try:
            image.load()
            upright = ImageOps.exif_transpose(image)
        except _DECODE_ERRORS as err:
            raise CorruptImageError(f"{name}: cannot decode ({err})") from None
        try:
            return _to_rgb(upright)
        except (OSError, ValueError) as err:
            raise CorruptImageError(f"{name}: cannot convert mode {image.mode} to RGB ({err})") from None


def verify_image(path: str | os.PathLike, *, max_pixels: int = MAX_PIXELS) -> None:
    """Decode an image once, cheaply, to find corrupt, truncated and oversized files.

    JPEGs are decoded at reduced scale (Pillow's draft mode still reads the whole stream, so truncation
    shows), which makes a scan of phone photos several times faster than a full decode.

    Raises:
        CorruptImageError: As `load_image`.
        ImageTooLargeError: As `load_image`.
    """
    image = _open_checked(path, str(path), max_pixels)
    with image:
        try:
            image.draft("RGB", (128, 128))
            image.load()
        except _DECODE_ERRORS as err:
            raise CorruptImageError(f"{path}: cannot decode ({err})") from None
