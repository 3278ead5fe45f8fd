"""The cached base pretraining behind ``finetune --weights base``: trained once per setting, then read back."""
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch

from ..checkpoint import load_checkpoint
from ..rundir import CONFIG_FILE, LAST_FILE, METRICS_FILE, STATE_FILE, RunDir
from .config import PretrainConfig
from .loop import pretrain_command

__all__ = ['cache_dir', 'base_pretrained']

_logger = logging.getLogger(__name__)

# Part of base_pretrained's cache key: change it whenever the training changes (v3: timm's optimizer and schedule).
_CACHE_RECIPE = 'pretrain-v3'


def cache_dir() -> Path:
    """Where cached pretraining lives: $FEWSHOT_LKCA_CACHE, else ~/.cache/fewshot_lkca."""
    return Path(os.environ.get('FEWSHOT_LKCA_CACHE', Path.home() / '.cache' / 'fewshot_lkca'))


def _cache_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def base_pretrained(
        model_name: str,
        data: str,
        image_size: int,
        steps: int,
        batch_size: int,
        lr: float,
        seed: int = 0,
        images_per_class: int = 0,
        progress: bool = True,
) -> tuple[dict[str, torch.Tensor], Path, bool]:
    """The backbone pretrained (supervised) on ``data``'s base split: trained now, or read from the cache.

    The cache entry is a pretraining run directory under ``cache_dir()/base``, keyed by every setting; a run that
    was killed part-way is resumed by the next call.

    Returns:
        The backbone state_dict (without classifier), its checkpoint file, and whether it came from the cache.
    """
    settings = dict(model=model_name, data=data, image_size=image_size, steps=steps, batch_size=batch_size, lr=lr,
                    seed=seed, images_per_class=images_per_class, recipe=_CACHE_RECIPE)
    root = cache_dir() / 'base' / f'{model_name}-{Path(str(data)).name}-{image_size}px-{_cache_key(settings)}'
    path = root / LAST_FILE
    # One process builds a cold entry; another one needing it waits for the lock, then reads what was built.
    with RunDir(root).lock(wait=True):
        cached = (root / METRICS_FILE).is_file()
        if not cached:
            cfg = PretrainConfig(data=str(data), model=model_name, image_size=image_size,
                                 images_per_class=images_per_class, steps=steps, batch_size=batch_size, lr=lr,
                                 seed=seed, method='supervised', val_split='', out=str(root)).validate()
            resume = root if (root / CONFIG_FILE).is_file() and (root / STATE_FILE).is_file() else None
            start = time.perf_counter()
            pretrain_command(cfg, resume=resume, overwrite=True, progress=progress, log=_logger.info,
                             distributed=False)
            _logger.info('base pretraining: %d steps in %.0f s -> %s', steps, time.perf_counter() - start, path)
    tensors, _ = load_checkpoint(path)
    return {k: v for k, v in tensors.items() if not k.startswith('classifier.')}, path, cached
