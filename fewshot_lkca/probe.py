"""Training a cosine head on frozen features, and the leave-one-out check that guards every recipe.

With the backbone frozen, the support set's features are computed once and the head trains on them: full-batch
steps on a few dozen vectors, milliseconds each, no activation memory. The head starts as the nearest-prototype
classifier (`fewshot_lkca.heads.CosineHead.init_from_prototypes`: unit-length class means), so step 0 is ProtoNet.

Leave-one-out on the support set says whether training helped: each support image is classified by a head fitted
without it (and by the prototypes of the others). A class with one image cannot be left out, so 1-shot tasks have no
estimate and keep the prototypes.

Example:
    >>> feats, labels = torch.randn(10, 8), torch.arange(5).repeat(2)
    >>> head = fit_head(feats, labels, n_way=5, steps=20, lr=0.1)
    >>> head(feats).shape
    torch.Size([10, 5])
"""
import torch
from torch import nn

from .heads import CosineHead

__all__ = ['fit_head', 'loo_accuracy', 'GuardResult', 'guard_head', 'guard_trunk', 'LOO_LIMIT']

LOO_LIMIT = 256  # leave-one-out scores at most this many support images


def _fit_many(features: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor, n_way: int, steps: int, lr: float,
              scale: float, label_smoothing: float, anchor: float) -> torch.Tensor:
    """Independent cosine heads, one per row of ``masks`` (the support images it trains on), fitted together.

    Each head starts at its unit-length prototypes P and takes ``steps`` full-batch SGD steps (momentum 0.9) on
    cross-entropy of ``scale * cos(x, w_c)`` plus ``anchor * ||W - P||^2``, a pull back towards the prototypes (the
    prior a handful of images should not override). The temperature stays fixed: it does not change the argmax, and
    learning it only sharpens the loss. Each class weighs the same in a problem's loss, however many of its images
    that problem trains on (unequal classes train balanced). Returns the unit-length class directions (B, n_way, D).
    """
    onehot = nn.functional.one_hot(labels, n_way).float()  # (N, C)
    weights = masks.float() @ onehot  # (B, C): images per class in each problem
    sums = torch.einsum('bn,nc,nd->bcd', masks.float(), onehot, features)
    prior = nn.functional.normalize(sums / weights.clamp(min=1)[..., None], dim=-1)
    if steps <= 0:
        return prior
    direction = nn.Parameter(prior.clone())
    unit = nn.functional.normalize(features, dim=1)
    opt = torch.optim.SGD([direction], lr=lr, momentum=0.9)
    # every class counts the same in each problem, however many of its images that problem trains on
    images = masks.float().sum(1, keepdim=True)  # (B, 1)
    present = (weights > 0).sum(1, keepdim=True)  # (B, 1)
    per_image = masks.float() * images / (present * weights[:, labels]).clamp(min=1)  # (B, N); 1 when balanced
    counts = images.squeeze(1).clamp(min=1)
    with torch.enable_grad():
        for _ in range(steps):
            logits = scale * unit @ nn.functional.normalize(direction, dim=-1).transpose(1, 2)  # (B, N, C)
            loss = nn.functional.cross_entropy(logits.transpose(1, 2), labels.expand(len(masks), -1),
                                               label_smoothing=label_smoothing, reduction='none')  # (B, N)
            loss = ((loss * per_image).sum(1) / counts).sum() + anchor * (direction - prior).pow(2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return nn.functional.normalize(direction.detach(), dim=-1)


def fit_head(features: torch.Tensor, labels: torch.Tensor, n_way: int, steps: int, lr: float, *,
             scale: float = 10.0, label_smoothing: float = 0.1, anchor: float = 0.0) -> CosineHead:
    """A cosine head from the unit-length prototypes, then ``steps`` full-batch steps on ``features`` (`_fit_many`).

    The directions stay unit-length, so the step size means the same whatever the features' scale (the earlier
    probe's raw prototypes made its steps vanish: only its temperature moved, and it kept ProtoNet's predictions).
    """
    features = features.detach().float()
    masks = torch.ones(1, len(labels), dtype=torch.bool)
    direction = _fit_many(features, labels, masks, n_way, steps, lr, scale, label_smoothing, anchor)
    head = CosineHead(features.shape[1], n_way, scale=scale)
    with torch.no_grad():
        head.weight.copy_(direction[0])
    return head.eval()


def loo_accuracy(features: torch.Tensor, labels: torch.Tensor, n_way: int, steps: int = 0, lr: float = 0.1, *,
                 scale: float = 10.0, label_smoothing: float = 0.1, anchor: float = 0.0) -> float | None:
    """Leave-one-out accuracy on the support set of the head `fit_head` makes (``steps=0``: the prototypes), over at
    most ``LOO_LIMIT`` left-out images.

    All the leave-one-out heads train at once (`_fit_many`). Returns None when no image can be left out (every
    class has a single image).
    """
    features = features.detach().float()
    counts = torch.bincount(labels, minlength=n_way)
    left_out = (counts[labels] >= 2).nonzero().flatten()  # an image whose class keeps another one
    if len(left_out) == 0:
        return None
    if len(left_out) > LOO_LIMIT:  # a big folder: an even spread of them (memory grows with their square)
        left_out = left_out[torch.linspace(0, len(left_out) - 1, LOO_LIMIT).round().long()]
    masks = torch.ones(len(left_out), len(labels), dtype=torch.bool)
    masks[torch.arange(len(left_out)), left_out] = False
    direction = _fit_many(features, labels, masks, n_way, steps, lr, scale, label_smoothing, anchor)
    unit = nn.functional.normalize(features[left_out], dim=1)  # (L, D)
    logits = torch.einsum('ld,lcd->lc', unit, direction)
    return (logits.argmax(1) == labels[left_out]).float().mean().item()


class GuardResult(dict):
    """What the guard decided: ``kept`` ('trained' or 'prototypes'), both leave-one-out accuracies, and why."""


def guard_head(features: torch.Tensor, labels: torch.Tensor, n_way: int, steps: int, **fit) -> GuardResult:
    """Keep the trained head only when leave-one-out on the support set does not say it is worse than ProtoNet."""
    trained = loo_accuracy(features, labels, n_way, steps, **fit)
    protos = loo_accuracy(features, labels, n_way, 0, **fit)
    if trained is None:
        return GuardResult(kept='prototypes', loo_trained=None, loo_prototypes=None,
                           reason='one image per class: leave-one-out cannot tell, so the prototypes stay')
    if trained < protos:
        return GuardResult(kept='prototypes', loo_trained=trained, loo_prototypes=protos,
                           reason=f'leave-one-out: trained head {100 * trained:.0f} % < prototypes '
                                  f'{100 * protos:.0f} %')
    return GuardResult(kept='trained', loo_trained=trained, loo_prototypes=protos,
                       reason=f'leave-one-out: trained head {100 * trained:.0f} % >= prototypes {100 * protos:.0f} %')


def guard_trunk(model: nn.Module, start: dict, features, labels: torch.Tensor, losses: list[float], log=print) -> dict:
    """Keep a fine-tuned model only if its support loss fell and leave-one-out nearest-prototype accuracy on the
    support set did not drop; else load ``start`` (the prototype classifier it started from) back into it.

    ``features()`` gives the support set's features under the model's current weights. The leave-one-out figure of the
    trained model is optimistic (it trained on those images); it still catches a trunk that collapsed, where every
    feature looks alike.
    """
    n_classes = model.head.weight.shape[0]
    tenth = max(1, len(losses) // 10)
    loss_fell = sum(losses[-tenth:]) / tenth < sum(losses[:tenth]) / tenth
    after = loo_accuracy(features(), labels, n_classes)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(start)
    before = loo_accuracy(features(), labels, n_classes)
    worse = after is not None and after < before
    if loss_fell and not worse:
        model.load_state_dict(trained)
        kept, reason = 'trained', 'the support loss fell' + (
            f' and leave-one-out on the support set held ({100 * before:.0f} % -> {100 * after:.0f} %)'
            if after is not None else '')
    else:
        kept = 'prototypes'
        reason = ('the support loss did not fall' if not loss_fell else
                  f'leave-one-out on the support set dropped ({100 * before:.0f} % -> {100 * after:.0f} %)')
    log(f'guard: kept the {kept} model ({reason})')
    return dict(kept=kept, reason=reason, loo_before=before, loo_after=after, support_loss_fell=loss_fell)
