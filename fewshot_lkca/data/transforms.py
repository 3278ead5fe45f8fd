"""albumentations pipelines: a strong one for tiny support sets and a deterministic one for evaluation.

Both read input size, mean/std, interpolation and crop_pct from the model's `pretrained_cfg` (the house
rule: data settings live there and nowhere else); `size` overrides only the side length, e.g. to train at
96 px. They map an HxWx3 uint8 RGB array to a 3xHxW float32 tensor, and they pickle, so DataLoader workers
get their own copy.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

__all__ = ["AlbumentationsTransform", "eval_transform", "mirror_transform", "resolve_data_cfg", "train_transform"]


def _albumentations():
    # albumentations asks PyPI for a newer version at import; offline that costs a 2 s timeout and a warning.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations

    return albumentations


def resolve_data_cfg(cfg: Any = None, size: int | None = None) -> dict:
    """timm's data config from a model, its `pretrained_cfg` mapping, or None (timm's ImageNet defaults).

    Args:
        cfg: A timm model, a `pretrained_cfg` mapping, or None.
        size: Side length that replaces the cfg's input size.

    Returns:
        A dict with `input_size`, `interpolation`, `mean`, `std`, `crop_pct` and `crop_mode`.
    """
    from timm.data import resolve_data_config

    if cfg is None or isinstance(cfg, Mapping):
        data_cfg = resolve_data_config(pretrained_cfg=dict(cfg or {"input_size": (3, 224, 224)}))
    else:
        data_cfg = resolve_data_config(model=cfg)
    if size is not None:
        data_cfg["input_size"] = (data_cfg["input_size"][0], size, size)
    return data_cfg


def _interpolation(name: str) -> int:
    import cv2

    return {"bicubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST, "area": cv2.INTER_AREA}.get(
        name, cv2.INTER_LINEAR
    )


class AlbumentationsTransform:
    """A picklable `image -> tensor` callable around an `albumentations.Compose`.

    Args:
        pipeline: The Compose; it is called as `pipeline(image=image)["image"]`.
    """

    def __init__(self, pipeline) -> None:
        self.pipeline = pipeline

    def __call__(self, image):
        return self.pipeline(image=image)["image"]

    def set_random_seed(self, seed: int) -> None:
        """Make the random augmentations reproducible (episode samplers call this per episode)."""
        self.pipeline.set_random_seed(seed)

    def __repr__(self) -> str:
        names = ", ".join(type(t).__name__ for t in self.pipeline.transforms)
        return f"{type(self).__name__}({names})"


def eval_transform(cfg: Any = None, size: int | None = None) -> AlbumentationsTransform:
    """Resize the short side to `size / crop_pct`, centre-crop `size`, normalise, to a CHW tensor.

    Args:
        cfg: A timm model or its `pretrained_cfg` (see `resolve_data_cfg`).
        size: Side length replacing the cfg's input size.

    Example:
        >>> import numpy as np
        >>> t = eval_transform({"input_size": (3, 224, 224), "mean": (0.5,) * 3, "std": (0.5,) * 3}, size=64)
        >>> t(np.zeros((80, 120, 3), np.uint8)).shape
        torch.Size([3, 64, 64])
    """
    return _resize_crop(cfg, size, flip=False)


def mirror_transform(cfg: Any = None, size: int | None = None) -> AlbumentationsTransform:
    """`eval_transform`, then a left-right flip half of the time: the one augmentation base pretraining used.

    Example:
        >>> import numpy as np
        >>> mirror_transform(size=32)(np.zeros((40, 40, 3), np.uint8)).shape
        torch.Size([3, 32, 32])
    """
    return _resize_crop(cfg, size, flip=True)


def _resize_crop(cfg: Any, size: int | None, flip: bool) -> AlbumentationsTransform:
    A = _albumentations()
    from albumentations.pytorch import ToTensorV2

    data_cfg = resolve_data_cfg(cfg, size)
    side = data_cfg["input_size"][-1]
    interpolation = _interpolation(data_cfg["interpolation"])
    return AlbumentationsTransform(
        A.Compose(
            [
                A.SmallestMaxSize(max_size=round(side / data_cfg["crop_pct"]), interpolation=interpolation),
                A.CenterCrop(side, side),
            ]
            + ([A.HorizontalFlip(p=0.5)] if flip else [])
            + [
                A.Normalize(mean=data_cfg["mean"], std=data_cfg["std"]),
                ToTensorV2(),
            ]
        )
    )


def train_transform(
    cfg: Any = None,
    size: int | None = None,
    *,
    rotate: float = 30.0,
    low_resolution: float = 0.3,
) -> AlbumentationsTransform:
    """Augmentation for tiny support sets: geometry, photometry and low-resolution simulation.

    One support image is seen many times while fine-tuning, so the pipeline varies what a few photos of an
    object cannot: framing (random resized crop, flip, rotation, shear), light and colour (jitter, gray),
    and capture quality (downscale-upscale, blur, noise, JPEG), each with a moderate probability.

    Args:
        cfg: A timm model or its `pretrained_cfg` (see `resolve_data_cfg`).
        size: Side length replacing the cfg's input size.
        rotate: Largest rotation in degrees (either way).
        low_resolution: Probability of each capture-quality degradation.

    Example:
        >>> import numpy as np
        >>> t = train_transform(size=64)
        >>> t(np.zeros((96, 96, 3), np.uint8)).dtype
        torch.float32
    """
    A = _albumentations()
    import cv2
    from albumentations.pytorch import ToTensorV2

    data_cfg = resolve_data_cfg(cfg, size)
    side = data_cfg["input_size"][-1]
    interpolation = _interpolation(data_cfg["interpolation"])
    p = low_resolution
    return AlbumentationsTransform(
        A.Compose(
            [
                A.RandomResizedCrop(size=(side, side), scale=(0.5, 1.0), interpolation=interpolation),
                A.HorizontalFlip(p=0.5),
                A.Affine(
                    rotate=(-rotate, rotate), shear=(-8, 8), scale=(0.9, 1.1), border_mode=cv2.BORDER_REFLECT_101, p=0.6
                ),
                A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, p=0.8),
                A.ToGray(p=0.1),
                A.Downscale(scale_range=(0.3, 0.7), p=p),
                A.GaussianBlur(sigma_limit=(0.2, 1.5), p=p),
                A.GaussNoise(std_range=(0.01, 0.06), p=p),
                A.ImageCompression(quality_range=(40, 90), p=p),
                A.Normalize(mean=data_cfg["mean"], std=data_cfg["std"]),
                ToTensorV2(),
            ]
        )
    )
