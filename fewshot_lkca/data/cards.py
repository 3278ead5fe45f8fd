"""Data set cards: one YAML file per data set, and `get_dataset` to build a reader from one.

The cards ship inside the package (`fewshot_lkca/data/datasets/*.yaml`) so an installed package finds them;
the repository's `datasets/*.yaml` are links to the same files. A card names its reader, where its files
lie (`root`, overridable by the environment variable `root_env` or by `root=`), its splits and the
reader's default options.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from ..errors import DataError
from .base import ImageDataset

__all__ = ["CARD_DIR", "get_card", "get_dataset", "list_datasets"]

CARD_DIR = Path(__file__).resolve().parent / "datasets"
_REQUIRED = ("name", "description", "source", "licence", "reader", "layout", "splits", "image_size", "channels",
             "normalisation")  # fmt: skip
_OPTIONAL = ("root", "root_env", "options")
# Relative roots are tried against the working directory, then the repository this package sits in.
_REPO_ROOT = Path(__file__).resolve().parents[2]


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def list_datasets() -> list[str]:
    """Names of the packaged cards, e.g. `['image_folder', 'lookalike', 'omniglot']`."""
    return sorted(p.stem for p in CARD_DIR.glob("*.yaml"))


def get_card(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """Load and check a card: a packaged card's name or the path of a YAML file.

    Raises:
        DataError: Unknown name, unreadable file, missing or unknown keys.
    """
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = CARD_DIR / f"{name_or_path}.yaml"
        if not path.is_file() and ("/" in str(name_or_path) or os.sep in str(name_or_path)):
            raise DataError(f"--data {name_or_path}: no such folder (expected {name_or_path}/<class_name>/<image>)")
        if not path.is_file():
            raise DataError(
                f"no data set card '{name_or_path}'{_did_you_mean(str(name_or_path), list_datasets())}; "
                f"known: {list_datasets()}, or pass a folder or a .yaml card"
            )
    if not path.is_file():
        raise DataError(f"data set card {path} does not exist")
    card = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(card, dict):
        raise DataError(f"data set card {path} is not a YAML mapping")
    for key in card:
        if key not in _REQUIRED + _OPTIONAL:
            raise DataError(f"unknown key '{key}' in {path}{_did_you_mean(key, _REQUIRED + _OPTIONAL)}")
    missing = [k for k in _REQUIRED if k not in card]
    if missing:
        raise DataError(f"data set card {path} lacks {missing}")
    if card["reader"] not in _READERS:
        raise DataError(f"unknown reader '{card['reader']}' in {path}{_did_you_mean(card['reader'], _READERS)}")
    card["_path"] = str(path)
    return card


def _resolve_root(card: dict, root: str | os.PathLike | None) -> Path:
    """Explicit `root`, else the card's environment variable, else the card's `root` (cwd, then repo)."""
    if root is not None:
        return Path(root).expanduser()
    env = card.get("root_env")
    if env and os.environ.get(env):
        return Path(os.environ[env]).expanduser()
    if not card.get("root"):
        raise DataError(f"data set '{card['name']}' needs root= (or the environment variable {env})")
    default = Path(card["root"]).expanduser()
    candidates = [default] if default.is_absolute() else [Path.cwd() / default, _REPO_ROOT / default]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise DataError(f"data set '{card['name']}' not found (tried {tried}); pass root= or set {env}")


def _lookalike(card, split, root, options) -> ImageDataset:
    from .lookalike import LookalikeDataset

    if split is None:
        raise DataError("the look-alike set needs split='base', 'val' or 'novel'")
    return LookalikeDataset(split, **options)


def _omniglot(card, split, root, options) -> ImageDataset:
    from .omniglot import OmniglotDataset, OmniglotFolderDataset

    path = _resolve_root(card, root)
    if (path / "images_background.npz").is_file():
        if split is None:
            raise DataError("Omniglot from npz needs split='base', 'val' or 'novel'")
        return OmniglotDataset(path, split, **options)
    return OmniglotFolderDataset(path, split, **options)  # the official PNG layout, zipped or extracted


def _image_folder(card, split, root, options) -> ImageDataset:
    from .folders import ImageFolderDataset

    classes = (card.get("splits") or {}).get(split, {}).get("classes") if split else None
    return ImageFolderDataset(_resolve_root(card, root), split, classes=classes, **options)


_READERS: dict[str, Callable[..., ImageDataset]] = {
    "lookalike": _lookalike,
    "omniglot": _omniglot,
    "image_folder": _image_folder,
}


def get_dataset(
    name_or_path: str | os.PathLike,
    split: str | None = None,
    *,
    root: str | os.PathLike | None = None,
    transform=None,
    **options,
) -> ImageDataset:
    """Build the reader for a data set: a card name, a card's YAML path, or a user's image folder.

    Args:
        name_or_path: "lookalike", "omniglot", "image_folder" (see `list_datasets`), a `.yaml` card, or a
            folder laid out as `<root>/<class_name>/<image>`.
        split: "base", "val" or "novel"; None means the whole folder for image folders.
        root: Where the files lie, overriding the card's `root` and `root_env`.
        transform: Applied to each HxWx3 uint8 image in `__getitem__`.
        **options: Reader keyword arguments overriding the card's `options`
            (e.g. `images_per_class=20`, `rotations=True`).

    Raises:
        DataError: Unknown card, missing data, or a reader's own checks.

    Example:
        >>> novel = get_dataset("lookalike", split="novel", images_per_class=20)
        >>> len(novel.classes)
        10
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        card = {"name": str(path), "reader": "image_folder", "root": str(path), "options": {}}
    else:
        card = get_card(name_or_path)
    dataset = _READERS[card["reader"]](card, split, root, {**(card.get("options") or {}), **options})
    return dataset.with_transform(transform) if transform is not None else dataset
