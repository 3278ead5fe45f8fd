"""What an export reads from a finished run: the classifier, its metadata, and the run's own images.

The images are preprocessed as in the run (its evaluation transform): the support set, held-out images of the task
(for the checks), and the int8 calibration set (the support set, topped up with augmented copies).
"""
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..rundir import CONFIG_FILE, MODEL_FILE
from .formats import ExportError

__all__ = ['Inputs', 'Reference', 'read_inputs', 'reference', 'CALIBRATION_IMAGES', 'MAX_CHECK_IMAGES']

CALIBRATION_IMAGES = 64  # int8 ranges from the support set, topped up with augmented copies when it is smaller
MAX_CHECK_IMAGES = 300  # held-out images compared on (evenly spread over the pool when it holds more)


@dataclass
class Inputs:
    """What an export needs from a run: the model, its metadata, and the run's own images (eval preprocessing)."""
    model: object  # FewShotClassifier in eval mode
    meta: dict
    checkpoint_digest: str
    support: object  # torch (N, 3, S, S) or None when the run's data cannot be read here
    held_out: object  # torch (M, 3, S, S) or None
    held_out_y: np.ndarray | None
    calibration: np.ndarray | None
    data_note: str


@dataclass
class Reference:
    """The images every artifact is compared on, and the PyTorch model's logits for them."""
    images: object  # torch (N, 3, S, S)
    logits: np.ndarray
    source: str


def load_classifier(path: Path):
    """The fine-tuned classifier of a checkpoint (eval mode), its metadata, and the file's digest.

    Raises:
        CheckpointError: Missing, unreadable, not a classifier of this package, or not fitting its model.
    """
    from ..adapters import restore_adapters
    from ..checkpoint import CheckpointError, load_checkpoint
    from ..heads import CosineHead, FewShotClassifier
    from ..metadata import MetadataError, check_classifier_meta
    from ..models import create_backbone

    tensors, meta = load_checkpoint(path)
    if 'head.weight' not in tensors:
        raise CheckpointError(f'{path} is not a fine-tuned classifier of this package (no head.weight)')
    weight = tensors['head.weight']
    try:
        check_classifier_meta(meta, weight.shape[0], str(path))
    except MetadataError as e:
        raise CheckpointError(str(e)) from None
    model = FewShotClassifier(create_backbone(meta['model'], num_classes=0, **meta.get('model_args', {})),
                              CosineHead(weight.shape[1], weight.shape[0]), bool(meta.get('mirror_views')))
    restore_adapters(model, tensors)  # a recipe with residual adapters saved them beside the blocks
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise CheckpointError(f'{path} does not fit {meta["model"]}: {str(e).splitlines()[0]}') from None
    digest = hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
    return model.eval(), meta, digest


def _spread(n: int, limit: int) -> list[int]:
    """Up to ``limit`` positions evenly spread over ``range(n)`` (the pool is ordered by class)."""
    if n <= limit:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, limit).round().astype(int).tolist()))


def _task_and_seed(run_dir: Path, task):
    """The run's task (rebuilt from config.json unless given) and seed; raises what reading the data raises."""
    from ..config import FinetuneConfig, apply_overrides
    from ..task import build_task

    config_path = run_dir / CONFIG_FILE
    if task is None:
        cfg = apply_overrides(FinetuneConfig(), json.loads(config_path.read_text()), source=str(config_path))
        return build_task(cfg), cfg.seed
    return task, json.loads(config_path.read_text()).get('seed', 0) if config_path.is_file() else 0


def read_inputs(run_dir: Path, task=None) -> Inputs:
    """Model and images of a finished run; ``task`` (from the fine-tune job) saves rebuilding it."""
    import torch

    from ..config import ConfigError
    from ..data import eval_transform, train_transform
    from ..errors import DataError
    from ..task import load_images

    model, meta, digest = load_classifier(run_dir / MODEL_FILE)
    try:
        task, seed = _task_and_seed(run_dir, task)
    except (OSError, ValueError, ConfigError, DataError) as e:  # the data lives elsewhere, or the config is gone
        note = f'the run\'s data cannot be read here ({str(e).splitlines()[0]})'
        return Inputs(model, meta, digest, None, None, None, None, note)
    if list(task.class_names) != list(meta['classes']):
        raise ExportError(f'{run_dir}: the task rebuilt from config.json has classes {task.class_names}, the '
                          f'checkpoint {meta["classes"]}: the data changed since the run')
    size = meta['image_size']
    eval_tf = eval_transform(model.backbone, size=size)
    # a big folder: an even spread of its training images (every image would cost memory and time, not precision)
    support_idx = [task.support_idx[i] for i in _spread(len(task.support_idx), MAX_CHECK_IMAGES)]
    support = load_images(task.dataset, support_idx, eval_tf)
    picks = _spread(len(task.pool_idx), MAX_CHECK_IMAGES)
    held_out = load_images(task.dataset, [task.pool_idx[i] for i in picks], eval_tf) if picks else None
    held_out_y = np.array([task.pool_y[i] for i in picks])
    parts = [support]
    extra = CALIBRATION_IMAGES - len(support)
    if extra > 0:
        augment = train_transform(model.backbone, size=size)
        augment.set_random_seed(seed)  # the same calibration set every time the run is exported
        parts.append(load_images(task.dataset, [support_idx[i % len(support)] for i in range(extra)], augment))
    calibration = torch.cat(parts).numpy().astype(np.float32)
    note = (f'{len(support)} support + {len(picks)} held-out images of the run, eval preprocessing; calibration: '
            f'{len(support)} support images + {max(extra, 0)} augmented copies')
    return Inputs(model, meta, digest, support, held_out, held_out_y, calibration, note)


def reference(inputs: Inputs) -> Reference:
    """The run's own images (or, data unreadable, seeded random ones, said so) and PyTorch's logits for them."""
    import torch

    if inputs.support is not None:
        images = torch.cat([inputs.support] + ([inputs.held_out] if inputs.held_out is not None else []))
        source = 'support + held-out images of the run'
    else:
        size = inputs.meta['image_size']
        images = torch.randn(16, 3, size, size, generator=torch.Generator().manual_seed(0))
        source = 'random inputs (no data)'
    with torch.no_grad():
        logits = torch.cat([inputs.model(images[i:i + 32]) for i in range(0, len(images), 32)]).numpy()
    return Reference(images, logits, source)
