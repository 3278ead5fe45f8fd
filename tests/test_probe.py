"""The head that trains on frozen features, its leave-one-out estimate, and the guard built on it."""
import torch

from fewshot_lkca.heads import CosineHead
from fewshot_lkca.probe import fit_head, guard_head, loo_accuracy


def _clusters(n_way=5, shots=5, dim=32, noise=1.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_way, dim, generator=g)

    def draw(per_class):
        x = centres.repeat_interleave(per_class, 0) + noise * torch.randn(n_way * per_class, dim, generator=g)
        return x, torch.arange(n_way).repeat_interleave(per_class)
    return draw(shots), draw(40)


def test_zero_steps_is_the_prototype_classifier():
    (x, y), (q, _) = _clusters()
    reference = CosineHead(x.shape[1], 5)
    reference.init_from_prototypes(x, y)
    with torch.no_grad():
        assert torch.equal(fit_head(x, y, 5, 0, 0.1)(q).argmax(1), reference(q).argmax(1))


def test_the_trained_head_learns_its_own_directions():
    # The earlier probe moved only its temperature: its predictions were ProtoNet's on every image.
    (x, y), (q, _) = _clusters()
    with torch.no_grad():
        before, after = fit_head(x, y, 5, 0, 0.1)(q).argmax(1), fit_head(x, y, 5, 100, 0.3)(q).argmax(1)
    assert (before != after).any()
    trained = fit_head(x, y, 5, 100, 0.3)
    with torch.no_grad():
        assert (trained(x).argmax(1) == y).float().mean() == 1.0  # it fits the support set


def test_leave_one_out_trains_every_held_out_head_at_once():
    (x, y), _ = _clusters(shots=3)
    explicit = []
    for i in range(len(y)):
        keep = torch.arange(len(y)) != i
        with torch.no_grad():
            explicit.append(int(fit_head(x[keep], y[keep], 5, 30, 0.3)(x[i:i + 1]).argmax(1) == y[i]))
    assert abs(loo_accuracy(x, y, 5, 30, 0.3) - sum(explicit) / len(explicit)) < 1e-6


def test_guard_keeps_the_prototypes_when_training_hurts_and_for_one_shot():
    (x, y), _ = _clusters()
    hurt = guard_head(x, y, 5, steps=50, lr=1e4)  # a step size that wrecks the head
    assert hurt['kept'] == 'prototypes' and hurt['loo_trained'] < hurt['loo_prototypes']
    one_shot = guard_head(x[::5], y[::5], 5, steps=50, lr=0.3)
    assert one_shot['kept'] == 'prototypes' and one_shot['loo_trained'] is None
