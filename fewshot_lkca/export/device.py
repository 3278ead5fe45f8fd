"""What the device exporters share: their errors, input checks, fixed-batch running, and parity with PyTorch.

Each device export (`fewshot_lkca.export.executorch`, `fewshot_lkca.export.ncnn`) writes its artifact atomically,
runs it back with its own runtime in this process and compares the logits with PyTorch's, so its report says how
far the device model is from the one that was trained. Both formats have a fixed input shape: the ``example``'s.
"""
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .formats import MissingExtraError, RuntimeExportError, missing_extra
from .onnx import parity

__all__ = ['RuntimeExportError', 'MissingExtraError', 'require_extra', 'check_images', 'run_in_batches', 'chunks',
           'parity', 'EvalMode', 'pytorch_logits', 'check_model', 'file_version', 'first_line', 'versions']


def require_extra(fmt: str) -> None:
    """Raise `MissingExtraError` with `missing_extra`'s message when ``fmt`` cannot run here."""
    message = missing_extra(fmt)
    if message is not None:
        raise MissingExtraError(message)


def check_images(name: str, images, like: torch.Tensor | None = None) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise RuntimeExportError(f'{name} must be a torch.Tensor, got {type(images).__name__}')
    if images.ndim != 4 or images.shape[0] == 0:
        raise RuntimeExportError(f'{name} must be N x C x H x W with N >= 1, got shape {tuple(images.shape)}')
    if not images.is_floating_point():
        raise RuntimeExportError(f'{name} must be floating point, got {images.dtype}')
    if not torch.isfinite(images).all():
        raise RuntimeExportError(f'{name} holds NaN or infinite values')
    if like is not None and images.shape[1:] != like.shape[1:]:
        raise RuntimeExportError(f'{name} images are {tuple(images.shape[1:])}, the example is {tuple(like.shape[1:])}'
                                 ' (device formats have one fixed input shape)')
    return images.detach().to('cpu', torch.float32).contiguous()


def chunks(images: torch.Tensor, batch: int) -> list[torch.Tensor]:
    """Batches of the program's fixed size; a short last one is filled up with images from the start."""
    short = len(images) % batch
    if short:
        copies = -(-batch // len(images))  # enough repeats to fill one batch even when N < batch
        images = torch.cat([images, images.repeat(copies, 1, 1, 1)[:batch - short]])
    return list(images.split(batch))


def run_in_batches(fn, images: torch.Tensor, batch: int) -> np.ndarray:
    """``fn`` over ``images`` in the program's fixed batch; the padding rows are dropped again."""
    outs = [np.asarray(fn(chunk)) for chunk in chunks(images, batch)]
    return np.concatenate(outs)[:len(images)]


class EvalMode:
    """Eval mode for the export; afterwards every submodule gets its own mode back (a fine-tuning model keeps its
    frozen BatchNorm layers in eval mode inside a training model, and ``model.train()`` would undo that)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.modes = [(m, m.training) for m in model.modules()]

    def __enter__(self):
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        for module, training in self.modes:
            module.training = training


def pytorch_logits(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    out = model(x)
    if not isinstance(out, torch.Tensor):
        raise RuntimeExportError(f'the model must return one tensor (the logits), got {type(out).__name__}')
    return out.numpy()


def check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise RuntimeExportError(f'model must be a torch.nn.Module, got {type(model).__name__}')


def file_version(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out
