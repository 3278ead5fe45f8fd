"""The interface every data source implements: (image, label) with an HxWx3 uint8 image before transforms."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable

import numpy as np
from torch.utils.data import Dataset

__all__ = ["ImageDataset"]


class ImageDataset(Dataset):
    """A labelled image data set with its label table known up front.

    Subclasses fill `classes` (class names) and `targets` (one class index per sample) in `__init__` and
    implement `load(index)`. Keeping `targets` as a plain list lets episode samplers index labels without
    decoding a single image.

    Attributes:
        classes: Class names; a target `t` names `classes[t]`.
        targets: Class index of each sample.
        transform: Callable applied to the HxWx3 uint8 image in `__getitem__` (e.g. an albumentations
            pipeline from `fewshot_lkca.data.transforms`), or None for the raw array.
    """

    classes: list[str]
    targets: list[int]
    transform: Callable | None = None

    def load(self, index: int) -> np.ndarray:
        """Return sample `index` as an HxWx3 uint8 RGB array, before any transform."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = self.load(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]

    def with_transform(self, transform: Callable | None) -> ImageDataset:
        """Return a view of the same samples with another transform (the source is not changed).

        Example:
            >>> from fewshot_lkca.data import LookalikeDataset
            >>> raw = LookalikeDataset("novel", images_per_class=4)
            >>> view = raw.with_transform(None)
            >>> view[0][0].dtype
            dtype('uint8')
        """
        view = copy.copy(self)
        view.transform = transform
        return view

    def class_counts(self) -> dict[str, int]:
        """Number of samples per class name, in class order."""
        counts = Counter(self.targets)
        return {name: counts.get(i, 0) for i, name in enumerate(self.classes)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(classes={len(self.classes)}, samples={len(self)})"
