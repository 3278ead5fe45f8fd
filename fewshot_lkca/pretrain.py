"""Base-class pretraining: ``python -m fewshot_lkca.pretrain``, the honest starting point of few-shot fine-tuning.

A backbone learns on the *base* classes of a data set card; the novel classes (the few-shot tasks) are never seen,
and model selection uses the card's *val* classes only: every ``eval_every`` steps, nearest-class-mean (NCM) episode
accuracy on the val split decides ``best.safetensors``; ``last.safetensors`` is the latest state. Both are what
``finetune --weights`` and ``evaluate --weights`` take.

Methods (``--method``):

- ``supervised``: cross-entropy over all base classes (label smoothing, random mirror), AdamW, warm-up + cosine.
- ``episodic``: prototypical meta-training (Snell et al., NeurIPS 2017): N-way K-shot episodes of the base classes,
  loss = cross-entropy of the negative squared Euclidean distances of the queries to the class prototypes.
- ``both``: the two losses summed each step (``episodic_weight`` scales the episodic one).

The same command scales out unchanged under ``torchrun`` (one or many nodes): DistributedDataParallel (gloo on CPU,
nccl on GPU), a step-indexed distributed sampler, logging and checkpoints on rank 0 only. ``batch_size`` and
``episodes_per_step`` are *global*: each step's samples are split into ``world_size x accum_steps`` equal chunks,
rank r trains on chunks ``r * accum_steps ...``, one micro-batch per chunk. The samples of step t are a function of
(seed, t) alone, so a resumed run replays the same batches, and 2 processes x batch b see exactly the samples of
1 process x batch 2b in 2 micro-batches (``accum_steps=2``).

BatchNorm under DDP: on GPUs (``sync_bn``, default) the statistics are synchronised over the global batch
(SyncBatchNorm), so results do not depend on the GPU count. torch has no CPU SyncBatchNorm: with gloo every rank
normalises its own chunk, exactly as one process does with ``accum_steps = world_size``.

Examples::

    python -m fewshot_lkca.pretrain                                   # look-alike base classes, supervised
    python -m fewshot_lkca.pretrain --recipe pretrain_episodic
    torchrun --nproc_per_node 4 -m fewshot_lkca.pretrain --data omniglot --steps=5000
    python -m fewshot_lkca.pretrain --resume runs/lookalike-lkca_mobilenet-pretrain-supervised-seed0
    python -m fewshot_lkca.finetune --weights runs/lookalike-lkca_mobilenet-pretrain-supervised-seed0/best.safetensors
"""
import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from .checkpoint import CheckpointError, atomic_write, load_checkpoint, save_checkpoint
from .config import ConfigError, apply_overrides, parse_cli, resolve_config
from .models import MIN_INPUT_SIZE, create_backbone
from .models.factory import BackboneError

__all__ = ['cache_dir', 'base_pretrained', 'cosine_lr', 'PretrainConfig', 'pretrain_command',
           'StepSampler', 'prototypical_loss', 'build_parser', 'main']

_logger = logging.getLogger(__name__)

BEST_FILE, LAST_FILE, CURVE_FILE = 'best.safetensors', 'last.safetensors', 'training_curve.png'
# Part of base_pretrained's cache key: change it whenever the training changes (v2: zero-initialised residuals).
_CACHE_RECIPE = 'pretrain-v2'


def cache_dir() -> Path:
    return Path(os.environ.get('FEWSHOT_LKCA_CACHE', Path.home() / '.cache' / 'fewshot_lkca'))


def cosine_lr(step: int, total: int, base_lr: float, warmup: int = 0) -> float:
    """Linear warm-up, then cosine decay to zero at ``total``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * base_lr * (1 + math.cos(math.pi * min(1.0, progress)))


def _adamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]  # norms and biases: decaying them only hurts
    # AdamW: from scratch on a few thousand images, SGD at lr 0.1 stayed at chance for 600 steps (measured).
    return torch.optim.AdamW([dict(params=decay, weight_decay=weight_decay),
                              dict(params=no_decay, weight_decay=0.0)], lr=lr)


# ------------------------------------------------------------------------------------------------ the config
@dataclass
class PretrainConfig:
    """Every pretraining setting, with the reason for its default (recipes: ``recipes/pretrain_*.yaml``)."""

    recipe_kind: ClassVar[str] = 'pretrain'

    # --- the data ---
    data: str = 'lookalike'  # built-in look-alike set: needs no download
    split: str = 'base'  # the classes trained on; the novel split is refused (the few-shot tasks come from it)
    val_split: str = 'val'  # model selection only; '' = no validation (last.safetensors only)
    image_size: int = 0  # input side in px; 0 = the data's native size (look-alike set: 96), else 224
    images_per_class: int = 0  # look-alike set: rendered images per class; 0 = the card's default (60)
    rotations: bool = False  # Omniglot: 90/180/270 degree turns of each base character as extra classes (4x)

    # --- the model ---
    model: str = 'lkca_mobilenet'
    weights: str = 'random'  # from scratch: the base classes are the whole story; or 'imagenet', or a checkpoint

    # --- what is learnt ---
    method: str = 'supervised'  # 'supervised', 'episodic' (prototypical) or 'both' (losses summed)
    label_smoothing: float = 0.1  # supervised loss; 46 look-alike classes differ in one part: soften the targets
    mirror: bool = True  # random horizontal flip; heavier augmentation stayed at chance from scratch (measured)
    n_way: int = 10  # training episodes: classes per episode (Snell et al.: more ways in training than in testing)
    k_shot: int = 5  # support images per class
    n_query: int = 5  # query images per class; 10 x (5 + 5) = 100 images per episode
    episodes_per_step: int = 1  # global, like batch_size: split over ranks and micro-batches
    episodic_weight: float = 1.0  # method 'both': loss = supervised + episodic_weight * episodic

    # --- optimisation ---
    steps: int = 600  # optimizer steps; 600 x 64 images = 14 passes over the look-alike base set (~3 min, 2 cores)
    batch_size: int = 64  # global supervised batch (all ranks and micro-batches together)
    accum_steps: int = 1  # micro-batches per rank and step (gradient accumulation): the global batch in less memory
    lr: float = 2e-3  # AdamW; measured to learn from scratch at batch 64 (SGD at 0.1 stayed at chance)
    weight_decay: float = 0.05  # on weights only; norms and biases are not decayed
    warmup_steps: int = 50  # linear warm-up, at most a tenth of the steps; then cosine decay to zero
    sync_bn: bool = True  # DDP on GPUs: BatchNorm over the global batch (torch has no CPU SyncBatchNorm)

    # --- selection, output, hardware ---
    eval_every: int = 100  # steps between val NCM evaluations (and at the end); 0 = at the end only
    val_n_way: int = 5  # val episodes: the few-shot protocol of the main job (5-way 5-shot, 15 queries)
    val_k_shot: int = 5
    val_n_query: int = 15
    val_episodes: int = 300  # a 95% CI of about +-1.5 points; the val split has few classes anyway
    eval_batch_size: int = 64  # images per forward pass while embedding the val split
    checkpoint_every: int = 50  # steps between resumable checkpoints (a kill loses at most this many)
    num_workers: int = 0  # data-loading processes per rank; 0 on a 2-core CPU, where they would compete
    device: str = 'auto'  # 'auto' (CUDA if present), 'cpu' or 'cuda'
    seed: int = 0  # initialisation, data order, mirrors and episodes
    out: str = ''  # run directory; '' = runs/<data>-<model>-pretrain-<method>-seed<seed>

    def validate(self) -> 'PretrainConfig':
        """Refuse values that cannot work, naming the option."""
        for name in ('steps', 'batch_size', 'accum_steps', 'episodes_per_step', 'k_shot', 'n_query', 'val_k_shot',
                     'val_n_query', 'val_episodes', 'eval_batch_size', 'checkpoint_every'):
            if getattr(self, name) < 1:
                raise ConfigError(f'{name} must be >= 1, got {getattr(self, name)}')
        for name in ('n_way', 'val_n_way'):
            if getattr(self, name) < 2:
                raise ConfigError(f'{name} must be >= 2 (one class is no classification), got {getattr(self, name)}')
        for name in ('eval_every', 'image_size', 'images_per_class', 'warmup_steps', 'num_workers'):
            if getattr(self, name) < 0:
                raise ConfigError(f'{name} must be >= 0, got {getattr(self, name)}')
        choices = dict(method=('supervised', 'episodic', 'both'), device=('auto', 'cpu', 'cuda'))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {list(allowed)}, got '{getattr(self, name)}'")
        if self.image_size and self.image_size < MIN_INPUT_SIZE:
            raise ConfigError(f'image_size must be 0 (native) or >= {MIN_INPUT_SIZE}, got {self.image_size}')
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f'label_smoothing must be in [0, 1), got {self.label_smoothing}')
        if self.lr <= 0 or self.weight_decay < 0 or self.episodic_weight <= 0:
            raise ConfigError('lr and episodic_weight must be > 0, weight_decay >= 0')
        if 'novel' in (self.split, self.val_split):
            raise ConfigError('pretraining must not see the novel split (the few-shot tasks come from it); '
                              "use split='base' and val_split='val'")
        if not self.split or self.split == self.val_split:
            raise ConfigError(f"split and val_split must be different splits, got '{self.split}' and "
                              f"'{self.val_split}'")
        if self.device == 'cuda' and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' asked, but torch sees no CUDA device")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def supervised(self) -> bool:
        return self.method in ('supervised', 'both')

    @property
    def episodic(self) -> bool:
        return self.method in ('episodic', 'both')


# ------------------------------------------------------------------------------------------- distribution
@dataclass
class _Dist:
    """Where this process stands: rank, world size, device, and whether this job opened the process group."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device('cpu')
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


def _init_distributed(device: str, distributed: bool = True) -> _Dist:
    """Join the torchrun job described by the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Without those variables (a plain ``python -m``) nothing distributed is set up.
    """
    use_cuda = device == 'cuda' or (device == 'auto' and torch.cuda.is_available())
    if not distributed or 'RANK' not in os.environ or 'WORLD_SIZE' not in os.environ:
        return _Dist(device=torch.device('cuda' if use_cuda else 'cpu'))
    import torch.distributed as dist

    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group('nccl' if use_cuda else 'gloo')
    return _Dist(dist.get_rank(), dist.get_world_size(), torch.device(f'cuda:{local_rank}' if use_cuda else 'cpu'),
                 owns)


def _mix(*numbers: int) -> int:
    """One 32-bit seed from a tuple of integers (neighbouring tuples give unrelated streams)."""
    return int(np.random.SeedSequence(list(numbers)).generate_state(1)[0])


class StepSampler:
    """The distributed sampler: which samples chunk ``c`` of step ``t`` trains on, a pure function of (seed, t, c).

    Every epoch is a fresh permutation of the data set (seeded by (seed, epoch)) cut into global batches of
    ``batch_size`` (the incomplete tail is dropped); global batch ``t`` is cut into ``chunks`` equal, contiguous
    chunks, one per (rank, micro-batch). So the union of the chunks of a step does not depend on how many ranks
    share it, and step ``t`` is the same after a resume.

    Example:
        >>> sampler = StepSampler(n_samples=10, batch_size=4, chunks=2, seed=0)
        >>> torch.equal(torch.cat([sampler.chunk(3, 0), sampler.chunk(3, 1)]), sampler.batch(3))
        True
    """

    def __init__(self, n_samples: int, batch_size: int, chunks: int, seed: int) -> None:
        if batch_size > n_samples:
            raise ConfigError(f'batch_size {batch_size} is larger than the {n_samples} training images')
        if batch_size % chunks:
            raise ConfigError(f'batch_size {batch_size} must split evenly over {chunks} chunks (world size x '
                              'accum_steps)')
        self.n, self.batch_size, self.chunks, self.seed = n_samples, batch_size, chunks, seed
        self.per_epoch = n_samples // batch_size
        self._epoch, self._perm = -1, None

    def batch(self, step: int) -> torch.Tensor:
        """Dataset indices of global batch ``step``."""
        epoch, k = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(_mix(self.seed, 0, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm[k * self.batch_size:(k + 1) * self.batch_size]

    def chunk(self, step: int, c: int) -> torch.Tensor:
        size = self.batch_size // self.chunks
        return self.batch(step)[c * size:(c + 1) * size]

    def mirror(self, step: int, c: int) -> torch.Tensor:
        """Which images of the chunk are flipped (drawn for the global batch, so independent of the chunking)."""
        size = self.batch_size // self.chunks
        flips = torch.rand(self.batch_size, generator=torch.Generator().manual_seed(_mix(self.seed, 1, step))) < 0.5
        return flips[c * size:(c + 1) * size]


class _StepData(torch.utils.data.Dataset):
    """Item ``t``: this rank's micro-batches of step ``t`` (images, labels, episode layouts), ready to train on."""

    def __init__(self, dataset, transform, cfg: PretrainConfig, chunks: list[int], n_chunks: int,
                 sampler: StepSampler | None, episodes) -> None:
        self.dataset, self.transform, self.cfg = dataset, transform, cfg
        self.chunks, self.n_chunks, self.sampler, self.episodes = chunks, n_chunks, sampler, episodes

    def __len__(self) -> int:
        return self.cfg.steps

    def _image(self, index: int, mirror: bool) -> torch.Tensor:
        image = self.transform(self.dataset.load(index))
        return image.flip(-1) if mirror else image  # a mirrored object is the same object

    def __getitem__(self, step: int) -> list[dict]:
        cfg = self.cfg
        micro = []
        for c in self.chunks:
            images, labels, layouts = [], torch.zeros(0, dtype=torch.long), []
            if self.sampler is not None:
                idx, flips = self.sampler.chunk(step, c), self.sampler.mirror(step, c) & cfg.mirror
                images += [self._image(i, f) for i, f in zip(idx.tolist(), flips.tolist(), strict=True)]
                labels = torch.tensor([self.dataset.targets[i] for i in idx.tolist()])
            per_chunk = cfg.episodes_per_step // self.n_chunks if self.episodes is not None else 0
            for e in range(per_chunk):
                episode = step * cfg.episodes_per_step + c * per_chunk + e
                plan = self.episodes.plan(episode)
                order = plan.support_idx + plan.query_idx
                g = torch.Generator().manual_seed(_mix(cfg.seed, 2, episode))
                flips = (torch.rand(len(order), generator=g) < 0.5) & cfg.mirror
                images += [self._image(i, f) for i, f in zip(order, flips.tolist(), strict=True)]
                layouts.append((torch.tensor(plan.support_y), torch.tensor(plan.query_y)))
            micro.append(dict(images=torch.stack(images), labels=labels, episodes=layouts))
        return micro


# ------------------------------------------------------------------------------------------------ the model
class _Net(nn.Module):
    """One forward per micro-batch (as DDP needs): logits of the first ``n_sup`` images, pre-logits of the rest."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor, n_sup: int):
        fmap = self.backbone.forward_features(images)
        logits = self.backbone.forward_head(fmap[:n_sup]) if n_sup else None
        features = self.backbone.forward_head(fmap[n_sup:], pre_logits=True) if n_sup < len(images) else None
        return logits, features


def prototypical_loss(support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, query_y: torch.Tensor,
                      n_way: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Snell et al. 2017: cross-entropy of negative squared Euclidean distances to the class means of the support.

    Returns:
        The loss and the query accuracy of one episode.

    Example:
        >>> s, q = torch.tensor([[0., 0.], [4., 0.]]), torch.tensor([[1., 0.], [3., 0.]])
        >>> loss, acc = prototypical_loss(s, torch.tensor([0, 1]), q, torch.tensor([0, 1]), n_way=2)
        >>> round(loss.item(), 4), acc.item()
        (0.0003, 1.0)
    """
    counts = torch.bincount(support_y, minlength=n_way).clamp(min=1).to(support.dtype)
    prototypes = torch.zeros(n_way, support.shape[1], dtype=support.dtype, device=support.device)
    prototypes = prototypes.index_add(0, support_y, support) / counts[:, None]
    # ||q - p||^2 expanded: cdist's gradient is undefined at zero distance
    sq_dist = query.pow(2).sum(1, keepdim=True) - 2 * query @ prototypes.T + prototypes.pow(2).sum(1)
    logits = -sq_dist
    return nn.functional.cross_entropy(logits, query_y), (logits.argmax(1) == query_y).float().mean()


def _micro_loss(net: nn.Module, micro: dict, cfg: PretrainConfig, device: torch.device) -> tuple[torch.Tensor, float]:
    """Loss and accuracy (supervised batch accuracy, else episode query accuracy) of one micro-batch."""
    images, labels = micro['images'].to(device, non_blocking=True), micro['labels'].to(device)
    n_sup = len(labels)
    logits, features = net(images, n_sup)
    loss, acc = images.new_zeros(()), 0.0
    if n_sup:
        loss = nn.functional.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
        acc = (logits.argmax(1) == labels).float().mean().item()
    if micro['episodes']:
        start, losses, accs = 0, [], []
        for support_y, query_y in micro['episodes']:
            n_s, n_q = len(support_y), len(query_y)
            ep_loss, ep_acc = prototypical_loss(features[start:start + n_s], support_y.to(device),
                                                features[start + n_s:start + n_s + n_q], query_y.to(device), cfg.n_way)
            losses.append(ep_loss)
            accs.append(ep_acc.item())
            start += n_s + n_q
        weight = cfg.episodic_weight if n_sup else 1.0
        loss = loss + weight * torch.stack(losses).mean()
        acc = acc if n_sup else sum(accs) / len(accs)
    return loss, acc


def _train_step(net: nn.Module, opt: torch.optim.Optimizer, micro_batches: list[dict], chunks: list[int], step: int,
                cfg: PretrainConfig, device: torch.device) -> torch.Tensor:
    """One optimizer step over this rank's micro-batches; returns [mean loss, mean accuracy, 0] on ``device``."""
    net.train()
    opt.zero_grad(set_to_none=True)
    totals = torch.zeros(3, device=device)  # loss, accuracy, and a slot for the stop request (collectives on device)
    for a, micro in enumerate(micro_batches):
        torch.manual_seed(_mix(cfg.seed, 3, step, chunks[a]))  # dropout and the like: the same after a resume
        # DDP averages gradients over ranks on the last micro-batch only; before it, they accumulate locally.
        last = a == len(micro_batches) - 1
        with contextlib.nullcontext() if last or not hasattr(net, 'no_sync') else net.no_sync():
            loss, acc = _micro_loss(net, micro, cfg, device)
            (loss / cfg.accum_steps).backward()
        totals[0] += loss.item() / cfg.accum_steps
        totals[1] += acc / cfg.accum_steps
    opt.step()
    return totals


def _build_backbone(cfg: PretrainConfig, n_classes: int) -> tuple[nn.Module, str]:
    """The backbone to train (with a base-class classifier when supervised) and where its weights came from."""
    from .checkpoint import load_backbone

    torch.manual_seed(cfg.seed)  # the same initialisation on every rank (DDP also broadcasts rank 0's)
    classes = n_classes if cfg.supervised else 0
    if cfg.weights == 'random':
        return create_backbone(cfg.model, num_classes=classes), f'{cfg.model}, random initialisation'
    backbone, _, origin = load_backbone(cfg.model, cfg.weights)
    backbone.reset_classifier(classes)
    return backbone, origin


# ------------------------------------------------------------------------------------------------ validation
@torch.no_grad()
def _features(backbone: nn.Module, dataset, transform, batch_size: int, device: torch.device) -> torch.Tensor:
    """Pre-logits features of every image of ``dataset``, in eval mode."""
    backbone.eval()
    chunks = []
    for start in range(0, len(dataset), batch_size):
        batch = torch.stack([transform(dataset.load(i)) for i in range(start, min(start + batch_size, len(dataset)))])
        fmap = backbone.forward_features(batch.to(device))
        chunks.append(backbone.forward_head(fmap, pre_logits=True).float().cpu())
    return torch.cat(chunks)


def _val_accuracy(backbone: nn.Module, val, transform, cfg: PretrainConfig, device: torch.device) -> dict:
    """Mean and 95% CI of NCM episode accuracy on the val split (L2-normalised features, as `evaluate`)."""
    from .metrics import mean_ci, prototype_episode_accuracies

    features = _features(backbone, val, transform, cfg.eval_batch_size, device)
    accs = prototype_episode_accuracies(features, torch.tensor(val.targets), cfg.val_n_way, cfg.val_k_shot,
                                        cfg.val_n_query, cfg.val_episodes, seed=cfg.seed)
    return mean_ci(accs).as_dict()


def _input_size(cfg: PretrainConfig, dataset) -> int:
    """``image_size``, else the data's own: rendered sets know it, cards state it (Omniglot: 105), photos get 224."""
    if cfg.image_size:
        return cfg.image_size
    size = getattr(dataset, 'image_size', 0)
    if not size and not Path(cfg.data).expanduser().is_dir():
        from .data import get_card

        size = get_card(cfg.data).get('image_size') or 0
    return int(size or 224)


def _rotation_options(cfg: PretrainConfig) -> dict:
    """``rotations=True`` for the training split's reader; only the Omniglot reader knows the option."""
    if not cfg.rotations:
        return {}
    from .data import get_card

    if Path(cfg.data).expanduser().is_dir() or get_card(cfg.data)['reader'] != 'omniglot':
        raise ConfigError(f"rotations=true applies to Omniglot only, not to '{cfg.data}'")
    return dict(rotations=True)


def _check_val(val, cfg: PretrainConfig) -> None:
    counts = val.class_counts()
    need = cfg.val_k_shot + cfg.val_n_query
    enough = sum(n >= need for n in counts.values())
    if enough < cfg.val_n_way:
        raise ConfigError(f"val episodes ({cfg.val_n_way}-way, {cfg.val_k_shot} shots + {cfg.val_n_query} queries) "
                          f"need {cfg.val_n_way} classes with >= {need} images; '{cfg.data}' ({cfg.val_split}) has "
                          f"{enough} of {len(counts)}: lower --val_n_way/--val_k_shot/--val_n_query or set "
                          "--val_split=''")


# ------------------------------------------------------------------------------------------------ the run
def _default_out(cfg: PretrainConfig) -> Path:
    name = Path(cfg.data).name or 'data'
    return Path('runs') / f'{name}-{cfg.model}-pretrain-{cfg.method}-seed{cfg.seed}'


def _open_resumed(resume: Path):
    """The saved config of an interrupted run (read-only: every rank does this before anything is written)."""
    from .finetune import CONFIG_FILE, METRICS_FILE, RunError, _Run

    run = _Run(Path(resume))
    if not run.path(CONFIG_FILE).is_file():
        raise RunError(f'--resume {resume}: not a run directory (no {CONFIG_FILE})')
    if run.finished:
        raise RunError(f'--resume {resume}: the run already finished (see {run.path(METRICS_FILE)})')
    saved = json.loads(run.path(CONFIG_FILE).read_text())
    try:
        cfg = apply_overrides(PretrainConfig(), saved, source=str(run.path(CONFIG_FILE))).validate()
    except ConfigError as e:
        raise RunError(f'--resume {resume}: not a pretraining run ({e})') from None
    return cfg, run


def _start_run(cfg: PretrainConfig, run) -> None:
    from .finetune import CONFIG_FILE, LOG_FILE, METRICS_FILE, STATE_FILE

    run.root.mkdir(parents=True, exist_ok=True)
    for name in (LOG_FILE, STATE_FILE, METRICS_FILE, BEST_FILE, LAST_FILE, CURVE_FILE):
        run.path(name).unlink(missing_ok=True)
    run.write_json(CONFIG_FILE, cfg.to_dict())


def _save_state(run, backbone: nn.Module, opt, step: int, best: dict | None, meta: dict) -> None:
    """last.safetensors for users, train_state.pt (model + optimizer, one atomic file) for --resume."""
    from .finetune import STATE_FILE

    state = backbone.state_dict()
    save_checkpoint(run.path(LAST_FILE), state, dict(meta, step=step))
    atomic_write(run.path(STATE_FILE), lambda tmp: torch.save(
        dict(step=step, model=state, optimizer=opt.state_dict(), best=best), tmp))


def _trim_log(run, step: int) -> None:
    """Drop log records past the resumed step (written after the last checkpoint, about to be replayed)."""
    from .finetune import LOG_FILE

    path = run.path(LOG_FILE)
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)['step'] <= step]
    atomic_write(path, lambda tmp: tmp.write_text(''.join(line + '\n' for line in kept)))


class _StopRequest:
    """Ctrl-C / SIGTERM while training: finish the step, save, exit resumable (a second Ctrl-C stops at once)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> '_StopRequest':
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _check_in_sync(backbone: nn.Module, dist_ctx: _Dist) -> float:
    """Largest difference of any parameter between this rank and rank 0 (DDP keeps them identical)."""
    if dist_ctx.world_size == 1:
        return 0.0
    flat = torch.cat([p.detach().flatten() for p in backbone.parameters()])
    reference = flat.clone()
    torch.distributed.broadcast(reference, src=0)
    diff = (flat - reference).abs().max().reshape(1)
    torch.distributed.all_reduce(diff, op=torch.distributed.ReduceOp.MAX)
    return diff.item()


def pretrain_command(cfg: PretrainConfig, resume: Path | None = None, overwrite: bool = False,
                     progress: bool = True, log=print, distributed: bool = True) -> dict:
    """Run (or resume) one pretraining job; returns the metrics written to ``metrics.json``.

    Under torchrun every rank calls this with the same arguments; rank 0 alone writes the run directory (which
    ``--resume`` must find on storage every rank can read) and returns the metrics, the other ranks return {}.

    Args:
        cfg: The resolved config (ignored with ``resume``: the run's saved config is used).
        resume: A run directory to continue.
        overwrite: Replace a finished or unfinished run in ``cfg.out``.
        distributed: False keeps a single process even inside a torchrun job (`base_pretrained`).
    """
    from .finetune import _check_new_run

    if resume is not None:
        cfg, run = _open_resumed(resume)
    else:
        cfg = dataclasses.replace(cfg, out=str(Path(cfg.out) if cfg.out else _default_out(cfg)))
        run = _check_new_run(cfg, overwrite)
    dist_ctx = _init_distributed(cfg.device, distributed)
    try:
        return _train(cfg, run, resume is not None, dist_ctx, progress, log if dist_ctx.main else _quiet)
    finally:
        if dist_ctx.owns_group:
            torch.distributed.destroy_process_group()


def _quiet(*_args) -> None:
    """The log of ranks other than 0."""


def _train(cfg: PretrainConfig, run, resuming: bool, dist_ctx: _Dist, progress: bool, log) -> dict:
    from tqdm.auto import tqdm

    from .data import EpisodeSampler, eval_transform, get_dataset
    from .finetune import LOG_FILE, METRICS_FILE, STATE_FILE, _dataset_options

    # Data first, on every rank: bad data fails here, before a run directory is written.
    options = _dataset_options(cfg)
    base = get_dataset(cfg.data, split=cfg.split, **options, **_rotation_options(cfg))
    val = get_dataset(cfg.data, split=cfg.val_split, **options) if cfg.val_split else None
    if val is not None:
        _check_val(val, cfg)
    size = _input_size(cfg, base)
    n_chunks = dist_ctx.world_size * cfg.accum_steps
    chunks = [dist_ctx.rank * cfg.accum_steps + a for a in range(cfg.accum_steps)]
    sampler = StepSampler(len(base), cfg.batch_size, n_chunks, cfg.seed) if cfg.supervised else None
    episodes = None
    if cfg.episodic:
        if cfg.episodes_per_step % n_chunks:
            raise ConfigError(f'episodes_per_step {cfg.episodes_per_step} must split evenly over {n_chunks} chunks '
                              '(world size x accum_steps)')
        episodes = EpisodeSampler(base, cfg.n_way, cfg.k_shot, cfg.n_query, seed=cfg.seed)

    backbone, origin = _build_backbone(cfg, len(base.classes))
    transform = eval_transform(backbone, size=size)
    pcfg = backbone.pretrained_cfg
    meta = dict(model=cfg.model, kind='base-pretrained', method=cfg.method, data=cfg.data, split=cfg.split,
                classes=list(base.classes), image_size=size, mean=list(pcfg['mean']), std=list(pcfg['std']),
                interpolation=pcfg.get('interpolation', 'bilinear'), crop_pct=pcfg.get('crop_pct', 0.875),
                weights=origin)
    net = _Net(backbone).to(dist_ctx.device)
    if dist_ctx.world_size > 1 and cfg.sync_bn:
        if dist_ctx.device.type == 'cuda':
            import timm.layers

            net = timm.layers.convert_sync_batchnorm(net)  # keeps timm's BatchNormAct layers' activations
        else:
            log(f'note: torch has no SyncBatchNorm on CPU: BatchNorm statistics are per micro-batch '
                f'({cfg.batch_size // n_chunks} images), as accum_steps={n_chunks} gives in one process')
    backbone = net.backbone
    opt = _adamw(backbone, cfg.lr, cfg.weight_decay)

    dist_ctx.barrier()  # every rank has checked the run directory before rank 0 writes it
    start_step, best = 0, None
    if resuming and run.path(STATE_FILE).is_file():
        state = torch.load(run.path(STATE_FILE), map_location='cpu', weights_only=True)
        backbone.load_state_dict(state['model'])
        opt.load_state_dict(state['optimizer'])
        start_step, best = int(state['step']), state['best']
    dist_ctx.barrier()  # every rank has read the state before rank 0 writes again
    if dist_ctx.main:
        if resuming:
            _trim_log(run, start_step)
        else:
            _start_run(cfg, run)
    if dist_ctx.world_size > 1:
        net = nn.parallel.DistributedDataParallel(net)  # broadcasts rank 0's parameters and buffers

    per_rank = f'{cfg.batch_size // dist_ctx.world_size} images' if cfg.supervised else ''
    if cfg.episodic:
        per_rank += (' + ' if per_rank else '') + f'{cfg.episodes_per_step // dist_ctx.world_size} episodes'
    log(f'pretraining {cfg.model} ({origin}) on {cfg.data} ({cfg.split}): {len(base.classes)} classes, {len(base)} '
        f'images at {size} px; {cfg.method}, {cfg.steps} steps; {dist_ctx.world_size} process(es) on '
        f'{dist_ctx.device.type}, {per_rank} per rank and step' + (f' in {cfg.accum_steps} micro-batches'
                                                                   if cfg.accum_steps > 1 else ''))
    if resuming:
        log(f'resuming at step {start_step} of {cfg.steps}')

    data = _StepData(base, transform, cfg, chunks, n_chunks, sampler, episodes)
    loader = torch.utils.data.DataLoader(data, batch_size=None, sampler=range(start_step, cfg.steps),
                                         num_workers=cfg.num_workers, pin_memory=dist_ctx.device.type == 'cuda')
    warmup = min(cfg.warmup_steps, cfg.steps // 10)
    step, saved_at = start_step, start_step
    bar = tqdm(total=cfg.steps, initial=start_step, desc='pretraining', unit='step',
               disable=not progress or not dist_ctx.main)
    with _StopRequest() as stop:
        stopped = False
        tick = time.perf_counter()
        try:
            for micro_batches in loader:  # this rank's micro-batches of step `step`
                lr = cosine_lr(step, cfg.steps, cfg.lr, warmup=warmup)
                for group in opt.param_groups:
                    group['lr'] = lr
                totals = _train_step(net, opt, micro_batches, chunks, step, cfg, dist_ctx.device)
                step += 1
                totals[2] = float(stop.requested)
                if dist_ctx.world_size > 1:  # the global figures, and a stop request from any rank stops all
                    torch.distributed.all_reduce(totals)
                    totals[:2] /= dist_ctx.world_size
                stopped = totals[2].item() > 0
                record = dict(step=step, loss=round(totals[0].item(), 5), lr=lr, batch_acc=round(totals[1].item(), 5),
                              sec=round(time.perf_counter() - tick, 4), time=time.time())
                do_eval = val is not None and (step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0))
                improved = False
                if do_eval and dist_ctx.main:
                    result = _val_accuracy(backbone, val, transform, cfg, dist_ctx.device)
                    record.update(val_acc=round(result['mean'], 5), val_ci95=round(result['ci95'], 5))
                    improved = best is None or result['mean'] > best['mean']
                    if improved:
                        best = dict(result, step=step)
                        save_checkpoint(run.path(BEST_FILE), backbone.state_dict(),
                                        dict(meta, step=step, val_acc=result['mean'], val_ci95=result['ci95']))
                    bar.set_postfix(loss=f'{record["loss"]:.3f}', val=f'{100 * result["mean"]:.1f}%')
                elif step % 10 == 0 or step == cfg.steps:
                    bar.set_postfix(loss=f'{record["loss"]:.3f}', acc=f'{record["batch_acc"]:.2f}')
                if dist_ctx.main:
                    run.log(record)
                    if step % cfg.checkpoint_every == 0 or step == cfg.steps or improved or stopped:
                        _save_state(run, backbone, opt, step, best, meta)
                        saved_at = step
                bar.update(1)
                if stopped:
                    break
                tick = time.perf_counter()  # a step's time: loading its data and training, not val or saving
        except KeyboardInterrupt:  # raised where no signal handler could be installed, or a second Ctrl-C
            stopped = True
            if dist_ctx.main and saved_at != step:
                _save_state(run, backbone, opt, step, best, meta)
        bar.close()
    if stopped:
        dist_ctx.barrier()  # rank 0's checkpoint is written before anyone exits
        if not dist_ctx.main:
            raise SystemExit(1)
        launcher = 'torchrun ... -m' if dist_ctx.world_size > 1 else 'python -m'
        raise SystemExit(f'\ninterrupted at step {step}; continue with: {launcher} fewshot_lkca.pretrain '
                         f'--resume {run.root}')

    max_diff = _check_in_sync(backbone, dist_ctx)
    if not dist_ctx.main:
        dist_ctx.barrier()
        return {}
    if max_diff > 0:
        _logger.warning('parameters differ between ranks by up to %.3g: the ranks did not step in sync', max_diff)
    records = [json.loads(line) for line in run.path(LOG_FILE).read_text().splitlines() if line.strip()]
    tail = records[-max(1, len(records) // 10):]
    history = [dict(step=r['step'], mean=r['val_acc'], ci95=r['val_ci95']) for r in records if 'val_acc' in r]
    metrics = dict(
        method=cfg.method, steps=cfg.steps, data=dict(data=cfg.data, split=cfg.split, classes=len(base.classes),
                                                      images=len(base), image_size=size),
        world_size=dist_ctx.world_size, global_batch=cfg.batch_size if cfg.supervised else 0,
        episodes_per_step=cfg.episodes_per_step if cfg.episodic else 0, accum_steps=cfg.accum_steps,
        train=dict(loss=sum(r['loss'] for r in tail) / len(tail),
                   batch_acc=sum(r['batch_acc'] for r in tail) / len(tail), last_steps=len(tail)),
        val=None if val is None else dict(split=cfg.val_split, n_way=cfg.val_n_way, k_shot=cfg.val_k_shot,
                                          n_query=cfg.val_n_query, episodes=cfg.val_episodes, best=best,
                                          last=history[-1] if history else None, history=history),
        train_seconds=sum(r['sec'] for r in records), rank_param_max_diff=max_diff, weights=origin,
        checkpoints=dict(best=str(run.path(BEST_FILE)) if best else None, last=str(run.path(LAST_FILE))),
        run_dir=str(run.root))
    _plot(run.path(LOG_FILE), run.path(CURVE_FILE), log)
    run.write_json(METRICS_FILE, metrics)
    run.path(STATE_FILE).unlink(missing_ok=True)  # model + optimizer state is only for resuming
    _summary(metrics, log)
    dist_ctx.barrier()
    return metrics


def _plot(log_file: Path, path: Path, log) -> None:
    """Training curve: loss (left), batch and val accuracy (right)."""
    try:
        from .plots import plt
    except ImportError:  # matplotlib is an extra ('plots'); the metrics stand without pictures
        log('matplotlib is not installed: no training curve (pip install fewshot-lkca[plots])')
        return
    records = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    steps = [r['step'] for r in records]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.plot(steps, [r['loss'] for r in records], lw=0.8)
    left.set(xlabel='step', ylabel='training loss')
    right.plot(steps, [r['batch_acc'] for r in records], lw=0.8, alpha=0.6, label='training batch')
    val = [r for r in records if 'val_acc' in r]
    if val:
        right.errorbar([r['step'] for r in val], [r['val_acc'] for r in val], yerr=[r['val_ci95'] for r in val],
                       marker='o', ms=3, capsize=2, label='val NCM episodes')
    right.set(xlabel='step', ylabel='accuracy', ylim=(0, 1))
    right.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format='png'))
    plt.close(fig)


def _summary(metrics: dict, log) -> None:
    train = metrics['train']
    log('')
    log(f'{metrics["method"]} pretraining, {metrics["steps"]} steps in {metrics["train_seconds"]:.0f} s: training '
        f'loss {train["loss"]:.3f}, batch accuracy {100 * train["batch_acc"]:.1f} % (last {train["last_steps"]} steps)')
    val = metrics['val']
    if val and val['best']:
        best, last = val['best'], val['last']
        log(f'val ({val["split"]}) {val["n_way"]}-way {val["k_shot"]}-shot NCM: best {100 * best["mean"]:.1f} +- '
            f'{100 * best["ci95"]:.1f} % at step {best["step"]}, last {100 * last["mean"]:.1f} %')
    log(f'run directory: {metrics["run_dir"]} (best.safetensors, last.safetensors, metrics.json, log.jsonl)')


# ------------------------------------------------------------------------------------------- cached base
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
    from .finetune import METRICS_FILE

    settings = dict(model=model_name, data=data, image_size=image_size, steps=steps, batch_size=batch_size, lr=lr,
                    seed=seed, images_per_class=images_per_class, recipe=_CACHE_RECIPE)
    root = cache_dir() / 'base' / f'{model_name}-{Path(str(data)).name}-{image_size}px-{_cache_key(settings)}'
    path = root / LAST_FILE
    cached = (root / METRICS_FILE).is_file()
    if not cached:
        cfg = PretrainConfig(data=str(data), model=model_name, image_size=image_size, images_per_class=images_per_class,
                             steps=steps, batch_size=batch_size, lr=lr, seed=seed, method='supervised', val_split='',
                             out=str(root)).validate()
        from .finetune import CONFIG_FILE, STATE_FILE

        resume = root if (root / CONFIG_FILE).is_file() and (root / STATE_FILE).is_file() else None
        start = time.perf_counter()
        pretrain_command(cfg, resume=resume, overwrite=True, progress=progress, log=_logger.info, distributed=False)
        _logger.info('base pretraining: %d steps in %.0f s -> %s', steps, time.perf_counter() - start, path)
    tensors, _ = load_checkpoint(path)
    return {k: v for k, v in tensors.items() if not k.startswith('classifier.')}, path, cached


# ------------------------------------------------------------------------------------------------ the CLI
def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog='fewshot-lkca pretrain', description=__doc__.splitlines()[0],
        epilog='Any PretrainConfig field can be set with --key=value, e.g. --steps=1000 --batch_size=128. '
               'Several processes: torchrun --nproc_per_node N -m fewshot_lkca.pretrain [options].')
    parser.add_argument('--data', help='data set card name (lookalike, omniglot, ...) or an image folder with base.txt')
    parser.add_argument('--method', help="'supervised', 'episodic' (prototypical) or 'both'")
    parser.add_argument('--recipe', help='pretraining recipe in recipes/ (pretrain_*) or a YAML file')
    parser.add_argument('--model', help='backbone name (timm)')
    parser.add_argument('--weights', help="'random' (default), 'imagenet', or a checkpoint to continue from")
    parser.add_argument('--steps', type=int)
    parser.add_argument('--out', help='run directory (default: runs/<data>-<model>-pretrain-<method>-seed<seed>)')
    parser.add_argument('--seed', type=int)
    parser.add_argument('--resume', type=Path, metavar='RUN_DIR', help='continue a run that was interrupted')
    parser.add_argument('--overwrite', action='store_true', help='replace a finished run in --out')
    parser.add_argument('--no-progress', action='store_true', help='no progress bars')
    return parser


def _parse(argv: list[str]) -> tuple[argparse.Namespace, dict[str, str]]:
    return parse_cli(build_parser(), argv, named=('data', 'method', 'model', 'weights', 'steps', 'out', 'seed'))


def main(argv: list[str] | None = None) -> None:
    from .data import DataError
    from .finetune import RunError

    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, overrides = _parse(argv)
        if args.resume is not None:
            if overrides or args.recipe:
                raise ConfigError('--resume continues the saved config; drop the other options')
            cfg = PretrainConfig()  # replaced by the run's saved config
        else:
            cfg = resolve_config(args.recipe, overrides, config_cls=PretrainConfig)
        pretrain_command(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    except (ConfigError, RunError, CheckpointError, BackboneError, DataError) as e:
        if int(os.environ.get('RANK', 0)) != 0:  # under torchrun every rank fails alike: rank 0 says why
            raise SystemExit(1) from None
        raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
    main()
