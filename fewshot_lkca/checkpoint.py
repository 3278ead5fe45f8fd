"""Checkpoints as safetensors with their metadata (class names, preprocessing, model): loading runs no pickle."""
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import restore_adapters
from .files import atomic_write

__all__ = ['CheckpointError', 'save_checkpoint', 'load_checkpoint', 'checkpoint_meta', 'atomic_write', 'load_backbone',
           'model_args']

DEFAULT_MODEL = 'lkca_mobilenet'


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit."""


def save_checkpoint(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write tensors and JSON-serialisable ``meta`` to one .safetensors file, atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata={'fewshot_lkca': json.dumps(meta)}))


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of a checkpoint written by `save_checkpoint`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'checkpoint not found: {path}')
    try:
        with safe_open(str(path), framework='pt') as f:
            meta = json.loads((f.metadata() or {}).get('fewshot_lkca', '{}'))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a damaged file
        raise CheckpointError(f'cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}') from e
    return tensors, meta


def checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a checkpoint of this package (its header only, no tensors); {} for anything else."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix != '.safetensors' or not path.is_file():
        return {}
    try:
        with safe_open(str(path), framework='pt') as f:
            return json.loads((f.metadata() or {}).get('fewshot_lkca', '{}'))
    except Exception:  # a damaged file: load_checkpoint says why when the job reads it
        return {}


def model_args(backbone: nn.Module) -> dict[str, Any]:
    """The constructor arguments a checkpoint must record to rebuild ``backbone`` beyond its name: the padding of an
    LKCA model built with TensorFlow's 'same' padding (the distilled photo checkpoint). {} for everything else."""
    pad_type = getattr(backbone, 'pad_type', '')
    return dict(pad_type=pad_type) if pad_type else {}


def load_backbone(model: str, weights: str, **kwargs) -> tuple[nn.Module, dict, str]:
    """The frozen backbone (pre-logits output, eval mode), its checkpoint metadata ({} if none), and its origin.

    Args:
        model: timm name; '' takes the checkpoint's model (else ``lkca_mobilenet``).
        weights: ``'random'`` (seed torch first), ``'imagenet'`` (timm hub), a source state_dict file (``.pth``, or a
            ``.safetensors`` without our metadata) that `create_backbone` loads or transplants, or a ``.safetensors``
            checkpoint of this package: fine-tuned (``backbone.*`` + ``head.*``; the head is dropped) or
            base-pretrained (backbone tensors only).
        **kwargs: Model arguments for ``'random'``, ``'imagenet'`` and source files (e.g. ``pad_type='same'``); a
            checkpoint of this package brings its own (``meta['model_args']``).

    Raises:
        CheckpointError: Missing or unreadable file, or a checkpoint of another model.
        BackboneError: Unknown model, unreachable hub, a source file that does not fit.

    Example:
        >>> backbone, meta, origin = load_backbone('lkca_mobilenet', 'random')
        >>> backbone.num_classes, meta, origin
        (0, {}, 'lkca_mobilenet, random initialisation')
    """
    if weights in ('random', 'imagenet'):
        name = model or DEFAULT_MODEL
        from .models import create_backbone

        backbone = create_backbone(name, pretrained=weights == 'imagenet', num_classes=0, **kwargs)
        origin = f'{name}, random initialisation' if weights == 'random' else f'{name}, ImageNet (timm hub)'
        return backbone.eval(), {}, origin
    path = Path(weights)
    if not path.is_file():
        raise CheckpointError(f'--weights: no such file {path} (or use imagenet, random)')
    from .models import create_backbone

    meta = {}
    if path.suffix == '.safetensors':
        tensors, meta = load_checkpoint(path)
    if not meta.get('model'):  # a plain state_dict of the source model: load it, or transplant it into ours
        name = model or DEFAULT_MODEL
        backbone = create_backbone(name, weights=path, num_classes=0, **kwargs)
        return backbone.eval(), {}, f'{name}, source weights {path} (loaded or transplanted by timm)'
    name = model or meta['model']
    if meta['model'] != name:
        raise CheckpointError(f'{path} holds a {meta["model"]} backbone, but --model is {name}')
    backbone = create_backbone(name, num_classes=0, **meta.get('model_args', {}))
    # A fine-tuned FewShotClassifier saves backbone.* and head.*; base pretraining saves the bare backbone.
    kind = 'fine-tuned; its head is not used' if any(k.startswith('head.') for k in tensors) else \
        meta.get('kind', 'backbone checkpoint')
    tensors = {k.removeprefix('backbone.'): v for k, v in tensors.items() if not k.startswith('head.')}
    restore_adapters(backbone, tensors)  # a fine-tuned model's residual adapters, where its recipe had them
    missing, unexpected = backbone.load_state_dict(tensors, strict=False)
    unexpected = [k for k in unexpected if not k.startswith('classifier.')]
    if missing or unexpected:
        raise CheckpointError(f'{path} does not fit {name}: {len(missing)} missing, {len(unexpected)} unexpected '
                              f'tensors (e.g. {(missing + unexpected)[0]})')
    return backbone.eval(), meta, f'{name} from {path} ({kind})'
