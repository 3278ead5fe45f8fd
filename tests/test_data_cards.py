"""Data set cards: every card loads, bad cards fail clearly, `get_dataset` builds readers, imports stay light."""

import subprocess
import sys
from pathlib import Path

import pytest

from fewshot_lkca.data import DataError, LookalikeDataset, get_card, get_dataset, list_datasets
from fewshot_lkca.data.cards import CARD_DIR
from fewshot_lkca.data.omniglot import VAL_ALPHABETS

REPO = Path(__file__).resolve().parents[1]


def test_packaged_cards():
    assert {"lookalike", "omniglot", "image_folder"} <= set(list_datasets())


@pytest.mark.parametrize("name", list_datasets())
def test_every_card_loads(name):
    card = get_card(name)
    assert card["name"] == name
    assert set(card["splits"]) == {"base", "val", "novel"}


def test_repository_datasets_folder_holds_the_same_cards():
    for card in CARD_DIR.glob("*.yaml"):
        copy = REPO / "datasets" / card.name
        assert copy.is_file(), f"datasets/{card.name} is missing"
        assert copy.read_text() == card.read_text()


def test_omniglot_card_matches_the_reader_defaults():
    assert tuple(get_card("omniglot")["options"]["val_alphabets"]) == VAL_ALPHABETS


def test_lookalike_card_builds_its_splits():
    novel = get_dataset("lookalike", split="novel", images_per_class=3, image_size=32)
    assert isinstance(novel, LookalikeDataset) and len(novel) == 30
    assert len(get_dataset("lookalike", split="base", images_per_class=1).classes) >= 40
    with pytest.raises(DataError, match="needs split="):
        get_dataset("lookalike")


def test_unknown_card_suggests_a_name():
    with pytest.raises(DataError, match="did you mean 'lookalike'"):
        get_dataset("lookalikes", split="novel")


def test_unknown_key_in_a_card_suggests_a_key(tmp_path):
    text = (CARD_DIR / "image_folder.yaml").read_text().replace("licence:", "license:")
    (tmp_path / "mine.yaml").write_text(text)
    with pytest.raises(DataError, match="unknown key 'license'.*did you mean 'licence'"):
        get_card(tmp_path / "mine.yaml")


def test_user_card_with_class_lists(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.delenv("FEWSHOT_LKCA_IMAGE_FOLDER", raising=False)
    for i, name in enumerate(("a", "b", "c")):
        (tmp_path / "photos" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "photos" / name / "0.png")
    text = (CARD_DIR / "image_folder.yaml").read_text()
    text = text.replace("root: null", f"root: {tmp_path / 'photos'}").replace("novel: {}", "novel: {classes: [a, c]}")
    (tmp_path / "mine.yaml").write_text(text)
    assert get_dataset(tmp_path / "mine.yaml", split="novel").classes == ["a", "c"]
    with pytest.raises(DataError, match="needs root="):
        get_dataset("image_folder", split="novel")


@pytest.mark.slow
def test_importing_the_data_package_stays_light():
    code = (
        "import sys, fewshot_lkca.data; "
        "print(sorted(m for m in ('learn2learn', 'albumentations', 'cv2', 'gym') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_learn2learn_import_is_quiet():
    code = "from fewshot_lkca.data.episodes import import_learn2learn; import_learn2learn()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "Gym" not in out.stderr
