"""Few-shot metrics: mean with a 95% confidence interval, nearest-prototype episodes on cached features, and the
episode accuracy and confusions of a trained classifier's held-out predictions."""
import math
from dataclasses import dataclass

import torch

from .data.episodes import usable_classes
from .seeding import derive_seed

__all__ = ['MeanCI', 'mean_ci', 'prototype_episode_accuracies', 'query_episode_accuracies', 'confused_pairs']


@dataclass(frozen=True)
class MeanCI:
    """Mean of per-episode values with the half-width of its 95% confidence interval (1.96 * std / sqrt(n))."""
    mean: float
    ci95: float
    n: int

    def __str__(self) -> str:
        return f'{100 * self.mean:.2f} +- {100 * self.ci95:.2f} % (n={self.n})'

    def as_dict(self) -> dict:
        return dict(mean=self.mean, ci95=self.ci95, n=self.n)


def mean_ci(values) -> MeanCI:
    """Mean and 95% CI half-width of a sequence of per-episode values (population std, as the literature reports)."""
    t = torch.as_tensor(list(values), dtype=torch.float64)
    if t.numel() == 0:
        raise ValueError('mean_ci needs at least one value')
    std = t.std(unbiased=False).item() if t.numel() > 1 else 0.0
    return MeanCI(t.mean().item(), 1.96 * std / math.sqrt(t.numel()), t.numel())


def prototype_episode_accuracies(
        features: torch.Tensor,
        labels: torch.Tensor,
        n_way: int,
        k_shot: int,
        n_query: int,
        episodes: int,
        seed: int = 0,
        normalize: bool = True,
) -> torch.Tensor:
    """Accuracy of nearest-prototype classification over random N-way K-shot episodes of precomputed features.

    Each episode draws ``n_way`` classes, then ``k_shot`` support and ``n_query`` disjoint query samples per class;
    a query takes the class of the nearest support mean (Euclidean, on L2-normalised features by default).
    Episode ``i`` depends only on ``seed`` and ``i``.

    Args:
        features: (N, D) features of every sample.
        labels: (N,) integer class of every sample.

    Returns:
        (episodes,) tensor of per-episode accuracies.
    """
    labels = torch.as_tensor(labels)
    if normalize:
        features = torch.nn.functional.normalize(features.float(), dim=1)
    per_class = usable_classes(labels.tolist(), n_way, k_shot, n_query, drop_small=True, warn=False)
    usable = torch.tensor(sorted(per_class))
    by_class = {c: torch.tensor(ix) for c, ix in per_class.items()}
    accs = torch.empty(episodes)
    targets = torch.arange(n_way).repeat_interleave(n_query)
    for i in range(episodes):
        g = torch.Generator().manual_seed(derive_seed(seed, i))
        picked = usable[torch.randperm(len(usable), generator=g)[:n_way]]
        protos, queries = [], []
        for c in picked.tolist():
            idx = by_class[c][torch.randperm(len(by_class[c]), generator=g)[:k_shot + n_query]]
            protos.append(features[idx[:k_shot]].mean(0))
            queries.append(features[idx[k_shot:]])
        pred = torch.cdist(torch.cat(queries), torch.stack(protos)).argmin(1)
        accs[i] = (pred == targets).float().mean()
    return accs


def query_episode_accuracies(correct: torch.Tensor, labels: torch.Tensor, n_way: int, n_query: int, episodes: int,
                             seed: int) -> torch.Tensor:
    """Per-episode accuracy of ``episodes`` draws of ``n_query`` held-out images per class (fixed predictions).

    Args:
        correct: (N,) whether each held-out image was classified right.
        labels: (N,) its class in 0..n_way-1.
    """
    by_class = [(labels == c).nonzero().flatten() for c in range(n_way)]
    accs = torch.empty(episodes)
    for e in range(episodes):
        g = torch.Generator().manual_seed(derive_seed(seed, e))
        picks = [idx[torch.randperm(len(idx), generator=g)[:n_query]] for idx in by_class]
        accs[e] = correct[torch.cat(picks)].float().mean()
    return accs


def confused_pairs(confusion: torch.Tensor, names: list[str], top: int = 5) -> list[dict]:
    """The ``top`` most frequent (true, predicted) confusions of a confusion matrix, most frequent first."""
    off = confusion.clone().float()
    off.fill_diagonal_(0)
    pairs = []
    for flat in off.flatten().argsort(descending=True)[:top].tolist():
        true, pred = divmod(flat, len(names))
        if off[true, pred] > 0:
            pairs.append(dict(true=names[true], predicted=names[pred], count=int(off[true, pred])))
    return pairs
