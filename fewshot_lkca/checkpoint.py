"""Checkpoints as safetensors with their metadata (class names, preprocessing, model): loading runs no pickle."""
import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ['CheckpointError', 'save_checkpoint', 'load_checkpoint', 'atomic_write']


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit."""


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: a kill leaves the old file or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.tmp')
    write(tmp)
    os.replace(tmp, path)


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
