"""Omniglot (Lake et al., Science 2015): the npz arrays, the official PNG folder layout, and the 20 one-shot runs.

Splits are by alphabet, never by character, so no alphabet is seen in two splits:

- `base`: the background alphabets minus `val_alphabets` (pretraining / meta-training),
- `val`: `val_alphabets`, five background alphabets held out for model selection,
- `novel`: the 20 evaluation alphabets (final testing only, as the protocol asks).

Images come out as 105x105x3 uint8 with white paper (255) and black ink (0), the look of the official PNGs.
With `rotations=True` (base only) each character also appears rotated by 90, 180 and 270 degrees as three
extra classes, the usual way to quadruple the base classes.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import DataError
from .base import ImageDataset
from .folders import load_image

__all__ = [
    "VAL_ALPHABETS",
    "OmniglotDataset",
    "OmniglotFolderDataset",
    "OneShotRun",
    "read_one_shot_runs",
]

VAL_ALPHABETS = ("Bengali", "Early_Aramaic", "Hebrew", "Korean", "Tifinagh")
SPLITS = ("base", "val", "novel")
_SIDE = 105
_FIRST_EVALUATION_ID = 965  # evaluation npz row = character id - 965; background row = id - 1


class _Archive:
    """Read-only view of a zip file or of the folder it was extracted to, by relative posix path."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise DataError(f"{self.path} does not exist")
        if self.path.is_file():
            with zipfile.ZipFile(self.path) as archive:
                self.names = sorted(n for n in archive.namelist() if not n.endswith("/"))
        else:
            self.names = sorted(p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file())

    def read(self, name: str) -> bytes:
        if self.path.is_file():
            with zipfile.ZipFile(self.path) as archive:
                return archive.read(name)
        return (self.path / name).read_bytes()

    def read_many(self, names: Sequence[str]) -> list[bytes]:
        """Read several members with one open of the zip."""
        if self.path.is_file():
            with zipfile.ZipFile(self.path) as archive:
                return [archive.read(n) for n in names]
        return [(self.path / n).read_bytes() for n in names]


def _check_split(split: str | None, rotations: bool) -> None:
    if split is not None and split not in SPLITS:
        raise DataError(f"unknown Omniglot split '{split}'; choose one of {SPLITS}")
    if rotations and split != "base":
        raise DataError(f"rotations add training classes and apply to split='base' only, not '{split}'")


class _Omniglot(ImageDataset):
    """Class bookkeeping and rotation shared by both readers; subclasses implement `_glyph`."""

    def _index(self, characters: Sequence[str], images_per_character: Sequence[int], rotations: bool) -> None:
        self.rotations = rotations
        turns = (0, 1, 2, 3) if rotations else (0,)
        self.classes = [f"{name}/rot{90 * k}" if rotations else name for name in characters for k in turns]
        # One (character, image, quarter turns) triple per sample, class-major like `classes`.
        self._items = [(c, i, k) for c, count in enumerate(images_per_character) for k in turns for i in range(count)]
        self.targets = [c * len(turns) + turns.index(k) for c, _, k in self._items]

    def _glyph(self, character: int, image: int) -> np.ndarray:
        """Return the HxW uint8 image (255 = paper) of one drawing."""
        raise NotImplementedError

    def load(self, index: int) -> np.ndarray:
        character, image, turns = self._items[index]
        gray = np.rot90(self._glyph(character, image), k=turns)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))


class OmniglotDataset(_Omniglot):
    """Omniglot from `images_background.npz` / `images_evaluation.npz` with alphabet-aware splits.

    Args:
        root: Folder with the two npz files and `omniglot_alphabet_ranges.json` (character rows per alphabet).
        split: "base", "val" or "novel" (see the module docstring).
        rotations: Add the 90/180/270 degree rotations of each base character as classes (base only).
        val_alphabets: Background alphabets held out as the validation split.
        transform: Applied to each 105x105x3 uint8 image in `__getitem__`.

    Attributes:
        alphabets: The alphabets of this split, in class order.

    Example:
        >>> base = OmniglotDataset("../shared/data/omniglot", "base")  # doctest: +SKIP
        >>> len(base.classes), base.classes[0]  # doctest: +SKIP
        (779, 'Arcadian/character01')
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "base",
        *,
        rotations: bool = False,
        val_alphabets: Sequence[str] = VAL_ALPHABETS,
        transform=None,
    ) -> None:
        _check_split(split, rotations)
        self.root = Path(root).expanduser()
        self.transform = transform
        ranges_file = self.root / "omniglot_alphabet_ranges.json"
        if not ranges_file.is_file():
            raise DataError(f"Omniglot not found: {ranges_file} is missing (pass root= or set FEWSHOT_LKCA_OMNIGLOT)")
        ranges = json.loads(ranges_file.read_text())
        unknown = sorted(set(val_alphabets) - set(ranges["background"]))
        if unknown:
            raise DataError(f"val_alphabets must be background alphabets; unknown: {unknown}")
        if split == "novel":
            subset, first_id = "evaluation", _FIRST_EVALUATION_ID
            self.alphabets = list(ranges["evaluation"])
        else:
            subset, first_id = "background", 1
            wanted = split == "val"
            self.alphabets = [a for a in ranges["background"] if (a in val_alphabets) == wanted]
        rows, names = [], []
        for alphabet in self.alphabets:
            lo, hi = ranges[subset][alphabet]
            rows += range(lo - first_id, hi - first_id + 1)
            names += [f"{alphabet}/character{j:02d}" for j in range(1, hi - lo + 2)]
        npz = self.root / f"images_{subset}.npz"
        if not npz.is_file():
            raise DataError(f"Omniglot not found: {npz} is missing")
        with np.load(npz) as arrays:
            drawings = arrays["images"][rows]  # (characters, 20 drawers, 105, 105) bool, True = paper
        # Packed bits: the background split is 26 MB instead of 212 MB, and unpacking one image is ~10 us.
        self._bits = np.packbits(drawings, axis=-1)
        self._index(names, [drawings.shape[1]] * len(rows), rotations)

    def _glyph(self, character: int, image: int) -> np.ndarray:
        paper = np.unpackbits(self._bits[character, image], axis=-1, count=_SIDE)
        return paper * np.uint8(255)


class OmniglotFolderDataset(_Omniglot):
    """Omniglot in the official PNG layout, read from the zip or from the folder it was extracted to.

    The layout is `images_background*/<Alphabet>/<characterNN>/<id>_<drawer>.png` (and `images_evaluation*`
    for the evaluation alphabets); the top folder's name tells background from evaluation. Class names
    (`<Alphabet>/<characterNN>`) match those of `OmniglotDataset`, and so do the pixels.

    Args:
        path: A zip such as `images_background_small1.zip`, or an extracted folder.
        split: None for every alphabet present, else "base", "val" or "novel" (module docstring).
        rotations: As in `OmniglotDataset` (base only).
        val_alphabets: As in `OmniglotDataset`.
        transform: Applied to each 105x105x3 uint8 image in `__getitem__`.
    """

    _PATTERN = re.compile(r"(?:^|/)(images_(background|evaluation)[^/]*)/([^/]+)/(character\d+)/[^/]+\.png$")

    def __init__(
        self,
        path: str | os.PathLike,
        split: str | None = None,
        *,
        rotations: bool = False,
        val_alphabets: Sequence[str] = VAL_ALPHABETS,
        transform=None,
    ) -> None:
        _check_split(split, rotations)
        self.transform = transform
        archive = _Archive(path)
        files: dict[str, list[str]] = {}
        for name in archive.names:
            match = self._PATTERN.search(name)
            if match is None:
                continue
            _, subset, alphabet, character = match.groups()
            if split is not None:
                in_split = "novel" if subset == "evaluation" else ("val" if alphabet in val_alphabets else "base")
                if in_split != split:
                    continue
            files.setdefault(f"{alphabet}/{character}", []).append(name)
        if not files:
            raise DataError(
                f"no Omniglot images of split '{split}' in {archive.path} (expected "
                "images_background*/<Alphabet>/<characterNN>/<file>.png)"
            )
        names = sorted(files)
        self.alphabets = sorted({n.split("/")[0] for n in names})
        # Encoded PNGs stay in memory (about 1 kB each); decoding happens per sample.
        self._blobs = [archive.read_many(files[n]) for n in names]
        self._names = [files[n] for n in names]
        self._index(names, [len(files[n]) for n in names], rotations)

    def _glyph(self, character: int, image: int) -> np.ndarray:
        rgb = load_image(self._blobs[character][image], name=self._names[character][image])
        return rgb[:, :, 0]


class OneShotRun(NamedTuple):
    """One of the 20 official 20-way one-shot runs.

    Attributes:
        name: "run01" ... "run20".
        train_images: (20, 105, 105, 3) uint8, one drawing per class (`training/class01.png` ... `class20.png`).
        test_images: (20, 105, 105, 3) uint8 (`test/item01.png` ... `item20.png`).
        answers: (20,) int64; `answers[j]` is the index in `train_images` of the class of `test_images[j]`.
    """

    name: str
    train_images: np.ndarray
    test_images: np.ndarray
    answers: np.ndarray


def read_one_shot_runs(path: str | os.PathLike) -> list[OneShotRun]:
    """Parse the official runs (`all_runs.zip` or its extracted folder) into 20 `OneShotRun`s.

    The error rate of a classifier is `mean(prediction != run.answers)` over the 400 test images, where a
    prediction is an index into `run.train_images`.

    Example:
        >>> runs = read_one_shot_runs("../shared/data/omniglot/all_runs.zip")  # doctest: +SKIP
        >>> len(runs), runs[0].train_images.shape  # doctest: +SKIP
        (20, (20, 105, 105, 3))
    """
    archive = _Archive(path)
    label_files = [n for n in archive.names if re.search(r"(^|/)run\d+/class_labels\.txt$", n)]
    if not label_files:
        raise DataError(f"no runNN/class_labels.txt in {archive.path}")
    # class_labels.txt paths start at "runNN/"; a folder extracted one level deeper keeps that prefix.
    runs = []
    for label_file in label_files:
        prefix = label_file[: -len("class_labels.txt")]  # ".../runNN/"
        run_name = prefix.rstrip("/").rsplit("/", 1)[-1]
        parent = prefix[: -len(run_name) - 1]
        pairs = [line.split() for line in archive.read(label_file).decode().splitlines() if line.strip()]
        train_names = sorted(n for n in archive.names if n.startswith(prefix + "training/") and n.endswith(".png"))
        test_names = [parent + test for test, _ in pairs]
        answer_of = {parent + train: train_names.index(parent + train) for _, train in pairs}
        answers = np.array([answer_of[parent + train] for _, train in pairs], dtype=np.int64)
        blobs = archive.read_many(train_names + test_names)
        images = np.stack([load_image(b, name=n) for b, n in zip(blobs, train_names + test_names, strict=True)])
        runs.append(OneShotRun(run_name, images[: len(train_names)], images[len(train_names) :], answers))
    return runs
