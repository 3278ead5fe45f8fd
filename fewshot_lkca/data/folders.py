"""A user's image folders (`root/<class_name>/<image>`); images load through `fewshot_lkca.images`.

A folder scan decodes every image once (JPEGs at reduced scale) so that truncated and corrupt files are found
up front: they are skipped, counted and named in one warning line instead of failing mid-training.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import DataError, DataWarning
from ..images import IMAGE_EXTENSIONS, MAX_PIXELS, load_image, verify_image
from .base import ImageDataset

__all__ = ["IMAGE_EXTENSIONS", "MAX_PIXELS", "ImageFolderDataset", "load_image", "verify_image"]

_NAMED_IN_WARNING = 5  # how many file names one warning line spells out


def _read_split_list(path: Path) -> list[str]:
    """Class names, one a line; blank lines and `#` comments are ignored."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def _summarise(items: Sequence[str], total: int) -> str:
    shown = ", ".join(items[:_NAMED_IN_WARNING])
    more = total - min(total, _NAMED_IN_WARNING)
    return shown + (f" and {more} more" if more else "")


def _file_digest(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()


class ImageFolderDataset(ImageDataset):
    """A user's images, one folder per class: `root/<class_name>/<image>` (sub-folders are searched too).

    Split lists are optional text files next to the class folders, `root/<split>.txt`, one class name a
    line. Without them the whole folder is one data set: `split=None` and `split="novel"` use every class
    (a user's own folder is the few-shot task), while `"base"` and `"val"` need their list.

    Args:
        root: The folder holding one sub-folder per class.
        split: None for all classes, or a split name whose list `root/<split>.txt` selects the classes.
        classes: Class names to use, overriding `split`.
        transform: Applied to each HxWx3 uint8 image in `__getitem__`.
        max_pixels: Largest image accepted (see `load_image`).
        verify: Decode every image once while scanning, so corrupt and truncated files are skipped up front.

    Raises:
        DataError: Missing root, no class folders, a listed class without folder, a class without usable
            images, or fewer than 2 classes.

    Example:
        >>> ds = ImageFolderDataset("photos", split="novel")  # doctest: +SKIP
        >>> image, label = ds[0]; ds.classes[label]  # doctest: +SKIP
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | None = None,
        *,
        classes: Sequence[str] | None = None,
        transform=None,
        max_pixels: int = MAX_PIXELS,
        verify: bool = True,
    ) -> None:
        self.root = Path(root).expanduser()
        self.max_pixels = max_pixels
        self.transform = transform
        self.classes = self._select_classes(split, classes)
        self.samples: list[Path] = []
        self.targets = []
        skipped: list[str] = []
        per_class_skips: dict[str, int] = {}
        for label, name in enumerate(self.classes):
            files, bad = self._scan_class(self.root / name, verify)
            self.samples += files
            self.targets += [label] * len(files)
            skipped += bad
            per_class_skips[name] = len(bad)
        n_files = len(self.samples) + len(skipped)
        if skipped:
            warnings.warn(
                f"skipped {len(skipped)} of {n_files} files under {self.root}: {_summarise(skipped, len(skipped))}",
                DataWarning,
                stacklevel=2,
            )
        self._check_counts(per_class_skips)
        self._warn_duplicates()

    def _select_classes(self, split: str | None, classes: Sequence[str] | None) -> list[str]:
        if not self.root.exists():
            raise DataError(f"image folder {self.root} does not exist")
        if not self.root.is_dir():
            raise DataError(f"{self.root} is not a folder (expected {self.root}/<class_name>/<image>)")
        available = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not available:
            raise DataError(f"no class folders in {self.root} (expected {self.root}/<class_name>/<image>)")
        source = "classes="
        if classes is None and split is not None:
            split_file = self.root / f"{split}.txt"
            if split_file.is_file():
                classes, source = _read_split_list(split_file), str(split_file)
            elif split != "novel":
                raise DataError(
                    f"split '{split}' needs the class list {split_file}; without split lists a folder is used "
                    "whole (split=None or 'novel')"
                )
        if classes is None:
            return available
        missing = [c for c in classes if c not in available]
        if missing:
            raise DataError(f"{len(missing)} classes from {source} have no folder in {self.root}: {missing[:5]}")
        return sorted(set(classes))

    def _scan_class(self, folder: Path, verify: bool) -> tuple[list[Path], list[str]]:
        files, skipped = [], []
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(self.root)
            if not path.is_file() or any(part.startswith(".") for part in rel.parts):
                continue  # hidden files (.DS_Store, editor backups) are not data
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                skipped.append(f"{rel} (not an image file)")
                continue
            if verify:
                try:
                    verify_image(path, max_pixels=self.max_pixels)
                except DataError as err:
                    # The message starts with the path; keep only the reason after it.
                    skipped.append(f"{rel} ({str(err).split(': ', 1)[-1]})")
                    continue
            files.append(path)
        return files, skipped

    def _check_counts(self, per_class_skips: dict[str, int]) -> None:
        counts = self.class_counts()
        empty = [f"'{c}' (0 images, {per_class_skips[c]} files skipped)" for c, n in counts.items() if n == 0]
        if empty:
            raise DataError(f"classes without usable images in {self.root}: {', '.join(empty)}")
        if len(self.classes) < 2:
            found = ", ".join(f"'{c}' ({n} images)" for c, n in counts.items())
            raise DataError(f"need at least 2 classes, found {len(self.classes)} in {self.root}: {found}")

    def _warn_duplicates(self) -> None:
        """Warn once, naming both classes, when the same file content sits in two classes."""
        by_size: dict[int, list[int]] = defaultdict(list)
        for i, path in enumerate(self.samples):
            by_size[path.stat().st_size].append(i)
        pairs = []
        for group in by_size.values():
            # Only files of equal size can be equal, and only cross-class groups matter: hash just those.
            if len({self.targets[i] for i in group}) < 2:
                continue
            first_by_digest: dict[str, int] = {}
            for i in group:
                j = first_by_digest.setdefault(_file_digest(self.samples[i]), i)
                if j != i and self.targets[j] != self.targets[i]:
                    a, b = self.samples[j].relative_to(self.root), self.samples[i].relative_to(self.root)
                    pairs.append(f"'{self.classes[self.targets[j]]}' and '{self.classes[self.targets[i]]}' ({a} = {b})")
        if pairs:
            warnings.warn(
                f"{len(pairs)} images are in two classes under {self.root}: {_summarise(pairs, len(pairs))}",
                DataWarning,
                stacklevel=3,
            )

    def load(self, index: int) -> np.ndarray:
        return load_image(self.samples[index], max_pixels=self.max_pixels)
