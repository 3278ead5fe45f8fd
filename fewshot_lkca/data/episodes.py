"""N-way K-shot episodes built on learn2learn, and a plain labelled loader of the same data.

An episode is learn2learn's task pipeline `NWays -> KShots(k_shot + n_query) -> LoadData -> RemapLabels`,
then split per class into `k_shot` support and `n_query` query samples (disjoint, since KShots samples
without replacement). learn2learn draws from Python's global `random`; each episode runs with that state
seeded from `(seed, episode)` and restored afterwards, so episode `i` is the same in every run, whatever
was sampled before it, and the caller's random stream is left untouched.
"""

from __future__ import annotations

import contextlib
import io
import random
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError, DataWarning
from ..seeding import derive_seed

__all__ = ["Episode", "EpisodePlan", "EpisodeSampler", "import_learn2learn", "labelled_loader",
           "usable_classes"]


def import_learn2learn():
    """Import learn2learn without the Gym deprecation notice it prints to stderr on first import."""
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import learn2learn
    return learn2learn


def enumerate_classes(targets: Sequence[int]) -> dict[int, list[int]]:
    """Class label -> indices of its samples, in order of first appearance."""
    per_class: dict[int, list[int]] = {}
    for index, label in enumerate(targets):
        per_class.setdefault(int(label), []).append(index)
    return per_class


def usable_classes(
    targets: Sequence[int],
    n_way: int,
    k_shot: int,
    n_query: int,
    classes: Sequence[str] | None = None,
    *,
    drop_small: bool = False,
    where: str = "",
    hint: str = "lower --ways, --shots or --queries",
    warn: bool = True,
    stacklevel: int = 2,
) -> dict[int, list[int]]:
    """The classes that can fill an N-way episode of `k_shot + n_query` images each: label -> sample indices.

    The one rule behind every episode (fine-tuning's task, evaluation, pretraining's val, the sampler, metrics).

    Args:
        targets: Class label of every sample.
        classes: Class names by label, for the messages.
        drop_small: Leave out classes with too few samples instead of raising (with a `DataWarning` if `warn`).
        where: Names the data in messages, e.g. "'lookalike' (novel)".
        hint: What the user can change, named by the options they typed.

    Raises:
        DataError: Fewer than `n_way` classes can fill an episode, or (without `drop_small`) a class cannot.

    Example:
        >>> sorted(usable_classes([0, 0, 1, 1, 2], n_way=2, k_shot=1, n_query=1, drop_small=True, warn=False))
        [0, 1]
    """
    per_class = enumerate_classes(targets)
    names = list(classes) if classes is not None else [str(c) for c in range(max(per_class, default=-1) + 1)]
    need = k_shot + n_query
    where = f" of {where}" if where else ""
    small = {c: len(ix) for c, ix in per_class.items() if len(ix) < need}
    if small:
        named = ", ".join(f"'{names[c]}' has {n}" for c, n in list(small.items())[:5])
        more = f" (and {len(small) - 5} more classes)" if len(small) > 5 else ""
        message = (f"{len(small)} of {len(per_class)} classes{where} have fewer than k_shot + n_query = "
                   f"{k_shot} + {n_query} = {need} images: {named}{more}")  # fmt: skip
        if not drop_small:
            raise DataError(f"{message}; {hint}, or add images")
        if warn:
            warnings.warn(message + "; they are left out of episodes", DataWarning, stacklevel=stacklevel)
        per_class = {c: ix for c, ix in per_class.items() if c not in small}
    if len(per_class) < n_way:
        counts = {c: len(ix) for c, ix in enumerate_classes(targets).items()}
        largest = max(counts, key=counts.get, default=None)
        top = f"; the largest, '{names[largest]}', has {counts[largest]}" if largest is not None else ""
        raise DataError(
            f"n_way={n_way} needs {n_way} classes with k_shot + n_query = {k_shot} + {n_query} = {need} images "
            f"each; only {len(per_class)} of {len(counts)} classes{where} have them{top} ({hint})"
        )
    return per_class


@contextlib.contextmanager
def _seeded_global_random(seed: int):
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def _keep_pairs(pairs: list) -> list:
    """Task collate: keep the (image, label) pairs; `Episode` stacks them itself."""
    return pairs


def _stack(images: list):
    """Stack tensors or equal-shape arrays; leave differently sized raw images as a list."""
    if images and all(isinstance(x, torch.Tensor) for x in images):
        return torch.stack(images)
    if images and all(isinstance(x, np.ndarray) and x.shape == images[0].shape for x in images):
        return np.stack(images)
    return list(images)


class EpisodePlan(NamedTuple):
    """Which samples an episode uses, known before any image is loaded.

    Attributes:
        support_idx, query_idx: Dataset indices, class-major (`k_shot` then `n_query` per class).
        support_y, query_y: Episode labels in 0..n_way-1.
        class_names: `class_names[y]` is the data set class behind episode label `y`.
    """

    support_idx: list[int]
    support_y: list[int]
    query_idx: list[int]
    query_y: list[int]
    class_names: list[str]


class Episode(NamedTuple):
    """One N-way K-shot episode.

    Attributes:
        support_x: `n_way * k_shot` images: a tensor (N, ...) when the transform returns tensors, an
            (N, H, W, C) uint8 array for equal-size raw images, else a list.
        support_y: (n_way * k_shot,) int64 labels in 0..n_way-1, class-major.
        query_x: `n_way * n_query` images, as `support_x`.
        query_y: (n_way * n_query,) int64 labels.
        class_names: `class_names[y]` is the data set class of episode label `y`.
    """

    support_x: torch.Tensor | np.ndarray | list
    support_y: torch.Tensor
    query_x: torch.Tensor | np.ndarray | list
    query_y: torch.Tensor
    class_names: list[str]


class EpisodeSampler(Dataset):
    """Reproducible N-way K-shot episodes over any data set with `targets` (and ideally `classes`).

    It is also a map-style Dataset of `num_episodes` episodes, so `DataLoader(sampler, batch_size=None,
    num_workers=2)` loads episodes in worker processes.

    Args:
        dataset: An `ImageDataset` (or any Dataset with a `targets` list) returning (image, label).
        n_way: Classes per episode.
        k_shot: Support samples per class.
        n_query: Query samples per class, disjoint from the support.
        seed: Episode `i` depends only on (seed, i).
        num_episodes: Length as a Dataset (600 is the usual evaluation count).
        transform: If given, replaces the data set's own transform (`dataset.with_transform`).
        drop_small_classes: Leave out classes with fewer than `k_shot + n_query` samples (with a warning)
            instead of raising.

    Raises:
        DataError: Fewer than `n_way` classes, or a class with fewer than `k_shot + n_query` samples.

    Example:
        >>> from fewshot_lkca.data import LookalikeDataset
        >>> sampler = EpisodeSampler(LookalikeDataset("novel", 20, 64), n_way=5, k_shot=1, n_query=3, seed=0)
        >>> episode = sampler.sample(0)
        >>> episode.support_x.shape, episode.query_y.tolist()
        ((5, 64, 64, 3), [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4])
    """

    def __init__(
        self,
        dataset: Dataset,
        n_way: int = 5,
        k_shot: int = 1,
        n_query: int = 15,
        seed: int = 0,
        *,
        num_episodes: int = 600,
        transform=None,
        drop_small_classes: bool = False,
    ) -> None:
        if n_way < 2 or k_shot < 1 or n_query < 0:
            raise DataError(f"need n_way >= 2, k_shot >= 1, n_query >= 0; got {n_way}, {k_shot}, {n_query}")
        if transform is not None:
            dataset = dataset.with_transform(transform)
        targets = [int(t) for t in dataset.targets]
        classes = list(getattr(dataset, "classes", None) or [str(c) for c in range(max(targets) + 1)])
        self.dataset, self.classes = dataset, classes
        self.n_way, self.k_shot, self.n_query = n_way, k_shot, n_query
        self.seed, self.num_episodes = seed, num_episodes
        self._labels_to_indices = self._usable_classes(targets, drop_small_classes)
        self._build_taskset()

    def _build_taskset(self) -> None:
        l2l = import_learn2learn()
        meta = l2l.data.MetaDataset(self.dataset, labels_to_indices=self._labels_to_indices)
        task_transforms = [
            l2l.data.transforms.NWays(meta, n=self.n_way),
            l2l.data.transforms.KShots(meta, k=self.k_shot + self.n_query),
            l2l.data.transforms.LoadData(meta),
            l2l.data.transforms.RemapLabels(meta, shuffle=True),
        ]
        self._meta = meta
        self._taskset = l2l.data.Taskset(meta, task_transforms, num_tasks=-1, task_collate=_keep_pairs)

    def _usable_classes(self, targets: Sequence[int], drop_small: bool) -> dict[int, list[int]]:
        return usable_classes(targets, self.n_way, self.k_shot, self.n_query, self.classes, drop_small=drop_small,
                              stacklevel=4)

    def __len__(self) -> int:
        return self.num_episodes

    def _describe(self, episode: int):
        """learn2learn's task description for one episode and, per sample, (index, episode label)."""
        with _seeded_global_random(derive_seed(self.seed, episode)):
            description = self._taskset.sample_task_description()
        # RemapLabels appended a callable (x, y) -> (x, new_y); a placeholder image gives the label
        # without loading anything.
        labelled = [(dd.index, int(dd.transforms[-1]((None, self._meta.indices_to_labels[dd.index]))[1]))
                    for dd in description]  # fmt: skip
        return description, labelled

    def _split(self, labelled: list[tuple[int, int]]) -> tuple[list[int], list[int], list[str]]:
        """Positions of support and query samples (class-major) and the class names by episode label."""
        support, query, names = [], [], [""] * self.n_way
        for label in range(self.n_way):
            positions = [p for p, (_, y) in enumerate(labelled) if y == label]
            support += positions[: self.k_shot]
            query += positions[self.k_shot :]
            names[label] = str(self.classes[self._meta.indices_to_labels[labelled[positions[0]][0]]])
        return support, query, names

    def plan(self, episode: int) -> EpisodePlan:
        """The indices and labels of episode `episode`, without loading images (e.g. for feature caches)."""
        _, labelled = self._describe(episode)
        support, query, names = self._split(labelled)
        return EpisodePlan(
            [labelled[p][0] for p in support],
            [labelled[p][1] for p in support],
            [labelled[p][0] for p in query],
            [labelled[p][1] for p in query],
            names,
        )

    def sample(self, episode: int) -> Episode:
        """Load episode `episode`: the same samples as `plan(episode)`, through the data set's transform."""
        description, labelled = self._describe(episode)
        seed = derive_seed(self.seed, episode)
        transform = getattr(self.dataset, "transform", None)
        if hasattr(transform, "set_random_seed"):  # random augmentation, reproducible per episode too
            transform.set_random_seed(seed)
        with _seeded_global_random(seed):
            pairs = self._taskset.get_task(description)
        support, query, names = self._split(labelled)
        return Episode(
            _stack([pairs[p][0] for p in support]),
            torch.tensor([pairs[p][1] for p in support], dtype=torch.int64),
            _stack([pairs[p][0] for p in query]),
            torch.tensor([pairs[p][1] for p in query], dtype=torch.int64),
            names,
        )

    __getitem__ = sample

    def __getstate__(self):
        # Rebuilt in the worker: learn2learn's task objects are Cython classes we need not pickle.
        state = self.__dict__.copy()
        del state["_meta"], state["_taskset"]
        return state

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        self._build_taskset()


def labelled_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    transform=None,
    shuffle: bool = True,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A plain (image, label) DataLoader over the same data, for batch training on the base classes.

    The shuffle order comes from a `torch.Generator` seeded with `seed`. With `transform=None` the images
    must already come out as equal-size tensors (set the data set's transform) for the default collate.

    Example:
        >>> from fewshot_lkca.data import LookalikeDataset, eval_transform
        >>> loader = labelled_loader(LookalikeDataset("base", 2, 64), 8, transform=eval_transform(size=64))
        >>> images, labels = next(iter(loader)); images.shape
        torch.Size([8, 3, 64, 64])
    """
    if transform is not None:
        dataset = dataset.with_transform(transform)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=generator,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
    )
