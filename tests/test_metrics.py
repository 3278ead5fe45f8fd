import math

import pytest
import torch

from fewshot_lkca.metrics import mean_ci, prototype_episode_accuracies


def test_mean_ci_matches_the_formula():
    values = [0.5, 1.0, 0.75, 0.25]
    m = mean_ci(values)
    std = math.sqrt(sum((v - 0.625) ** 2 for v in values) / 4)
    assert m.mean == pytest.approx(0.625) and m.ci95 == pytest.approx(1.96 * std / 2) and m.n == 4
    assert mean_ci([1.0]).ci95 == 0.0
    with pytest.raises(ValueError):
        mean_ci([])


def _clusters(spread: float, n_classes: int = 10, per_class: int = 20, dim: int = 16):
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(n_classes, dim, generator=g)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=g), labels


def test_prototype_episodes_separate_easy_from_hard_and_are_reproducible():
    easy, labels = _clusters(0.05)
    hard, _ = _clusters(5.0)
    acc_easy = prototype_episode_accuracies(easy, labels, 5, 5, 10, episodes=50)
    acc_hard = prototype_episode_accuracies(hard, labels, 5, 5, 10, episodes=50)
    assert acc_easy.mean() > 0.99
    assert 0.1 < acc_hard.mean() < 0.5  # near chance (0.2)
    assert torch.equal(acc_hard, prototype_episode_accuracies(hard, labels, 5, 5, 10, episodes=50))
    assert not torch.equal(acc_hard, prototype_episode_accuracies(hard, labels, 5, 5, 10, episodes=50, seed=1))
    # episode i does not depend on how many episodes were asked for
    assert torch.equal(acc_hard[:10], prototype_episode_accuracies(hard, labels, 5, 5, 10, episodes=10))


def test_prototype_episodes_refuse_too_few_samples():
    feats, labels = _clusters(1.0, n_classes=4, per_class=5)
    with pytest.raises(ValueError, match='needs 5 classes'):
        prototype_episode_accuracies(feats, labels, 5, 1, 1, episodes=1)
    with pytest.raises(ValueError, match=r'with k_shot \+ n_query = 5 \+ 5 = 10 images each; only 0 of 4'):
        prototype_episode_accuracies(feats, labels, 2, 5, 5, episodes=1)
