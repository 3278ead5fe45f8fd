"""Pre-logits features of a frozen backbone, in eval mode and in batches: the one embedding path of the package.

Prototypes, evaluation episodes, pretraining's validation and the benchmarks all embed through `embed_images`
(raw HxWx3 images and a transform) or `extract_features` (tensors already preprocessed).
"""
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ['RawImages', 'embed_images', 'extract_features', 'pre_logits']


def pre_logits(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The features before the classifier, with or without one (timm's ``forward_head(pre_logits=True)``)."""
    return backbone.forward_head(backbone.forward_features(images), pre_logits=True)


@torch.inference_mode()
def extract_features(backbone: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N, D) features of preprocessed (N, 3, S, S) images, ``batch_size`` at a time (memory-lean jobs' peak)."""
    backbone.eval()
    return torch.cat([pre_logits(backbone, images[i:i + batch_size]).float()
                      for i in range(0, len(images), batch_size)])


class RawImages:
    """The raw HxWx3 arrays of a data set, by index (`ImageDataset.load`, skipping its transform); ``mirror`` flips
    them left-right (a mirrored object is the same object)."""

    def __init__(self, dataset, mirror: bool = False) -> None:
        self.dataset, self.mirror = dataset, mirror

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image = self.dataset.load(index)
        return image[:, ::-1].copy() if self.mirror else image


@torch.inference_mode()
def embed_images(backbone: nn.Module, images: Sequence, transform, batch_size: int = 64, progress: bool = True,
                 desc: str = 'features', device: torch.device | None = None) -> torch.Tensor:
    """(N, D) features (float32, on the CPU) of N HxWx3 uint8 images, in batches, in eval mode.

    Args:
        images: Anything with ``len`` and ``[i]`` giving an HxWx3 uint8 array (a list, `RawImages`).
        transform: ``array -> CHW tensor`` (`fewshot_lkca.data.eval_transform`).
        device: Where the backbone runs (default: the CPU).

    Example:
        >>> import numpy as np, timm, fewshot_lkca
        >>> from fewshot_lkca.data import eval_transform
        >>> backbone = timm.create_model('lkca_mobilenet', num_classes=0)
        >>> embed_images(backbone, [np.zeros((40, 40, 3), np.uint8)] * 3, eval_transform(backbone, size=32),
        ...              progress=False).shape
        torch.Size([3, 1024])
    """
    from tqdm.auto import tqdm

    backbone.eval()
    chunks = []
    with tqdm(total=len(images), desc=desc, unit='img', disable=not progress) as bar:
        for start in range(0, len(images), batch_size):
            stop = min(start + batch_size, len(images))
            batch = torch.stack([transform(images[i]) for i in range(start, stop)])
            if device is not None:
                batch = batch.to(device)
            chunks.append(pre_logits(backbone, batch).float().cpu())
            bar.update(stop - start)
    return torch.cat(chunks)
