"""What each pretraining step trains on: a pure function of (seed, step), whatever the number of processes.

`load_data` reads the training and val data of a config (a data set's splits, or distillation's photos);
`StepSampler` cuts every epoch's permutation into global batches and each batch into equal chunks, one per (rank,
micro-batch); `StepData` loads one rank's chunks of a step (supervised images, and/or whole episodes), ready to train.
"""
from dataclasses import dataclass

import torch

from ..config import ConfigError
from ..seeding import derive_seed
from ..task import dataset_options, input_size, is_folder
from ..train import Dist
from .config import PretrainConfig
from .distill import photo_data

__all__ = ['StepSampler', 'StepData', 'PretrainData', 'load_data']

# derive_seed streams: (seed, EPOCH, epoch) permutations, (seed, MIRROR, step) flips of a batch, (seed, EPISODE_MIRROR,
# episode) flips of an episode, (seed, STEP, step, chunk) the torch seed of a micro-batch (dropout and the like),
# (seed, VIEW, step, chunk) the random views of a micro-batch (distillation's augmentation)
EPOCH, MIRROR, EPISODE_MIRROR, STEP, VIEW = 0, 1, 2, 3, 4

# fresh_renders: instances per class to draw from; more than a run reads (70k steps x 64 images / 44 classes)
FRESH_RENDERS_PER_CLASS = 100_000


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
            g = torch.Generator().manual_seed(derive_seed(self.seed, EPOCH, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm[k * self.batch_size:(k + 1) * self.batch_size]

    def chunk(self, step: int, c: int) -> torch.Tensor:
        size = self.batch_size // self.chunks
        return self.batch(step)[c * size:(c + 1) * size]

    def mirror(self, step: int, c: int) -> torch.Tensor:
        """Which images of the chunk are flipped (drawn for the global batch, so independent of the chunking)."""
        size = self.batch_size // self.chunks
        g = torch.Generator().manual_seed(derive_seed(self.seed, MIRROR, step))
        flips = torch.rand(self.batch_size, generator=g) < 0.5
        return flips[c * size:(c + 1) * size]


class StepData(torch.utils.data.Dataset):
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
            if hasattr(self.transform, 'set_random_seed'):  # random views: the same after a resume
                self.transform.set_random_seed(derive_seed(cfg.seed, VIEW, step, c))
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
                g = torch.Generator().manual_seed(derive_seed(cfg.seed, EPISODE_MIRROR, episode))
                flips = (torch.rand(len(order), generator=g) < 0.5) & cfg.mirror
                images += [self._image(i, f) for i, f in zip(order, flips.tolist(), strict=True)]
                layouts.append((torch.tensor(plan.support_y), torch.tensor(plan.query_y)))
            micro.append(dict(images=torch.stack(images), labels=labels, episodes=layouts))
        return micro


def _rotation_options(cfg: PretrainConfig) -> dict:
    """``rotations=True`` for the training split's reader; only the Omniglot reader knows the option."""
    if not cfg.rotations:
        return {}
    from ..data import get_card

    if is_folder(cfg.data) or get_card(cfg.data)['reader'] != 'omniglot':
        raise ConfigError(f"rotations=true applies to Omniglot only, not to '{cfg.data}'")
    return dict(rotations=True)


@dataclass
class PretrainData:
    """Everything a rank trains and validates on."""
    base: object
    val: object
    size: int
    chunks: list[int]  # this rank's chunk numbers of every step
    n_chunks: int
    sampler: StepSampler | None
    episodes: object


def load_data(cfg: PretrainConfig, dist: Dist) -> PretrainData:
    """Data first, on every rank: bad data fails here, before a run directory is written."""
    from ..data import EpisodeSampler, get_dataset, usable_classes

    if cfg.distill:
        base, val, size = photo_data(cfg)
        n_chunks = dist.world_size * cfg.accum_steps
        chunks = [dist.rank * cfg.accum_steps + a for a in range(cfg.accum_steps)]
        sampler = StepSampler(len(base), cfg.batch_size, n_chunks, cfg.seed)
        return PretrainData(base, val, size, chunks, n_chunks, sampler, None)
    options = dataset_options(cfg.data, cfg.image_size, cfg.images_per_class)
    if cfg.fresh_renders:
        options = dict(options, images_per_class=FRESH_RENDERS_PER_CLASS, cache=False)
    base = get_dataset(cfg.data, split=cfg.split, **options, **_rotation_options(cfg))
    # val: the card's own images (the same ones whatever the training data), rendered once
    val = get_dataset(cfg.data, split=cfg.val_split, **dataset_options(cfg.data, cfg.image_size)) if cfg.val_split \
        else None
    if val is not None:
        usable_classes(val.targets, cfg.val_n_way, cfg.val_k_shot, cfg.val_n_query, val.classes, drop_small=True,
                       warn=False, where=f"'{cfg.data}' ({cfg.val_split})",
                       hint="val episodes: lower --val_n_way, --val_k_shot or --val_n_query, or set --val_split=''")
    size, _ = input_size(cfg.data, cfg.image_size, base)
    n_chunks = dist.world_size * cfg.accum_steps
    chunks = [dist.rank * cfg.accum_steps + a for a in range(cfg.accum_steps)]
    sampler = StepSampler(len(base), cfg.batch_size, n_chunks, cfg.seed) if cfg.supervised else None
    episodes = None
    if cfg.episodic:
        if cfg.episodes_per_step % n_chunks:
            raise ConfigError(f'episodes_per_step {cfg.episodes_per_step} must split evenly over {n_chunks} chunks '
                              '(world size x accum_steps)')
        episodes = EpisodeSampler(base, cfg.n_way, cfg.k_shot, cfg.n_query, seed=cfg.seed)
    return PretrainData(base, val, size, chunks, n_chunks, sampler, episodes)
