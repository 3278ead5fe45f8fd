"""Omniglot readers on the real files in ../shared (skipped where it is absent, see conftest.py)."""

import json
import zipfile

import numpy as np
import pytest

from fewshot_lkca.data import DataError, OmniglotDataset, OmniglotFolderDataset, get_dataset, read_one_shot_runs
from fewshot_lkca.data.omniglot import VAL_ALPHABETS

pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def splits(omniglot_dir):
    return {s: OmniglotDataset(omniglot_dir, s) for s in ("base", "val", "novel")}


def test_split_sizes_follow_the_npz_rows(splits):
    assert len(splits["base"].classes) + len(splits["val"].classes) == 964
    assert len(splits["novel"].classes) == 659
    assert all(len(ds) == 20 * len(ds.classes) for ds in splits.values())


def test_no_character_or_alphabet_in_two_splits(splits):
    names = [set(ds.classes) for ds in splits.values()]
    alphabets = [set(ds.alphabets) for ds in splits.values()]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not names[i] & names[j] and not alphabets[i] & alphabets[j]


def test_base_and_val_use_background_alphabets_only(omniglot_dir, splits):
    ranges = json.loads((omniglot_dir / "omniglot_alphabet_ranges.json").read_text())
    assert set(splits["base"].alphabets) | set(splits["val"].alphabets) == set(ranges["background"])
    assert set(splits["val"].alphabets) == set(VAL_ALPHABETS)
    assert set(splits["novel"].alphabets) == set(ranges["evaluation"])


def test_images_are_white_paper_with_dark_ink(splits):
    image, label = splits["novel"][0]
    assert image.shape == (105, 105, 3) and image.dtype == np.uint8
    assert set(np.unique(image)) == {0, 255} and (image == 255).mean() > 0.7
    assert splits["novel"].classes[label] == "Angelic/character01"


def test_rotations_quadruple_base_classes(omniglot_dir, splits):
    rotated = OmniglotDataset(omniglot_dir, "base", rotations=True)
    assert len(rotated.classes) == 4 * len(splits["base"].classes)
    assert rotated.classes[:2] == ["Arcadian/character01/rot0", "Arcadian/character01/rot90"]
    upright = rotated.load(0)
    turned = rotated.load(20)  # the same drawing, next class: rotated by 90 degrees
    np.testing.assert_array_equal(np.rot90(upright), turned)
    with pytest.raises(DataError, match="split='base' only"):
        OmniglotDataset(omniglot_dir, "novel", rotations=True)


def test_folder_layout_matches_npz_pixels(omniglot_dir, splits, tmp_path):
    zipped = OmniglotFolderDataset(omniglot_dir / "images_background_small1.zip")
    assert zipped.alphabets == ["Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"]
    base_index = {name: c for c, name in enumerate(splits["base"].classes)}
    for j in range(0, len(zipped), 211):
        name = zipped.classes[zipped.targets[j]]
        dataset = splits["val"] if name.split("/")[0] in VAL_ALPHABETS else splits["base"]
        c = dataset.classes.index(name) if dataset is splits["val"] else base_index[name]
        np.testing.assert_array_equal(zipped.load(j), dataset.load(20 * c + j % 20))
    # The same from an extracted folder, with alphabet splits.
    with zipfile.ZipFile(omniglot_dir / "images_background_small1.zip") as archive:
        members = [n for n in archive.namelist() if "/Greek/" in n or "/Korean/character0" in n]
        archive.extractall(tmp_path, members)
    val = OmniglotFolderDataset(tmp_path, "val")
    assert val.alphabets == ["Korean"] and len(val.classes) == 9
    assert OmniglotFolderDataset(tmp_path, "base").alphabets == ["Greek"]
    with pytest.raises(DataError, match="no Omniglot images of split 'novel'"):
        OmniglotFolderDataset(tmp_path, "novel")


def test_official_one_shot_runs(omniglot_dir):
    runs = read_one_shot_runs(omniglot_dir / "all_runs.zip")
    assert [r.name for r in runs] == [f"run{i:02d}" for i in range(1, 21)]
    for run in runs:
        assert run.train_images.shape == (20, 105, 105, 3) and run.test_images.shape == (20, 105, 105, 3)
        assert sorted(run.answers.tolist()) == list(range(20))  # each training class is asked once
    assert runs[0].answers[:3].tolist() == [7, 8, 1]  # run01: item01 -> class08, item02 -> class09, ...


def test_card_points_at_shared_omniglot(omniglot_dir):
    novel = get_dataset("omniglot", split="novel", root=omniglot_dir)
    assert isinstance(novel, OmniglotDataset) and len(novel.classes) == 659
    folder = get_dataset("omniglot", split="base", root=omniglot_dir / "images_background_small1.zip")
    assert isinstance(folder, OmniglotFolderDataset)
