"""How well a model of every class does on images it never trained on: the estimate of the ``'all'`` protocol.

A user's folder trains the delivered model on every image, so its accuracy has to come from models that did not see
the images they are scored on. Which estimate depends on what the folder holds (`plan_estimate`):

* ``'val'``: ``PHOTOS/train`` and ``PHOTOS/val``: the delivered model, trained on train, classifies val's images;
* ``'holdout'``: every class has at least ``HOLDOUT_MIN`` images: ``HOLDOUT_SHARE`` of each class is held out, a
  model trained on the rest classifies them, and the delivered model then trains on everything;
* ``'cross-validation'``: smaller classes: ``FOLDS`` folds, each class's images dealt round the folds; every image is
  classified by a model trained without its fold (a class keeps at least one image in every fold's training set).

A class of one image trains (1-shot) but cannot be scored: it is named in a warning and left out of the estimate.
The interval is Wilson's 95 % score interval over the scored images, each classified once; images of one class are
not independent draws, so read it as a lower bound on the uncertainty.
"""
import dataclasses
import math
import random
import warnings

import torch

from .errors import DataWarning
from .metrics import confused_pairs
from .seeding import derive_seed
from .task import Task

__all__ = ['HOLDOUT_MIN', 'HOLDOUT_SHARE', 'FOLDS', 'Plan', 'plan_estimate', 'fold_task', 'cross_validate',
           'wilson_interval', 'estimate_metrics']

HOLDOUT_MIN = 10  # images in the smallest class from which a share is held out instead of folds
HOLDOUT_SHARE = 0.2
FOLDS = 5


@dataclasses.dataclass
class Plan:
    """The estimate's method, its folds (train and scored positions into the task's support lists) and the classes
    it cannot score."""
    method: str  # 'val', 'holdout' or 'cross-validation'
    folds: list[tuple[list[int], list[int]]]
    unscored: list[str]

    def describe(self, images: int) -> str:
        return {'val': f'the val folder\'s {images} images, classified by the delivered model',
                'holdout': f'{images} held-out images ({HOLDOUT_SHARE:.0%} of each class), classified by a model '
                           'trained on the rest',
                'cross-validation': f'{len(self.folds)}-fold cross-validation over {images} images, each classified '
                                    'by a model trained without it'}[self.method]


def plan_estimate(task: Task, seed: int) -> Plan:
    """The estimate for ``task`` (an ``'all'`` task), folds drawn from ``seed``."""
    if task.pool_idx:
        return Plan('val', [], [])
    by_class: dict[int, list[int]] = {}
    for position, y in enumerate(task.support_y):
        by_class.setdefault(y, []).append(position)
    rng = random.Random(derive_seed(seed, 0x5EED))
    for positions in by_class.values():
        rng.shuffle(positions)
    unscored = [task.class_names[y] for y, p in sorted(by_class.items()) if len(p) < 2]
    if unscored:
        warnings.warn(f'{len(unscored)} classes have a single image: they train (1-shot), but their accuracy cannot '
                      f'be estimated: {", ".join(unscored[:5])}', DataWarning, stacklevel=2)
    everything = set(range(len(task.support_y)))
    if min(len(p) for p in by_class.values()) >= HOLDOUT_MIN:
        held = sorted(p for positions in by_class.values()
                      for p in positions[:math.ceil(HOLDOUT_SHARE * len(positions))])
        return Plan('holdout', [(sorted(everything - set(held)), held)], unscored)
    scored = [[] for _ in range(FOLDS)]
    for positions in by_class.values():
        if len(positions) < 2:
            continue
        offset = rng.randrange(FOLDS)
        for i, p in enumerate(positions):  # dealt round: a fold takes at most ceil(n / FOLDS) < n of a class
            scored[(offset + i) % FOLDS].append(p)
    folds = [(sorted(everything - set(s)), sorted(s)) for s in scored if s]
    return Plan('cross-validation', folds, unscored)


def fold_task(task: Task, fold: tuple[list[int], list[int]]) -> Task:
    """The task of one fold: its training positions as the support set, its scored positions as the pool."""
    train, scored = fold
    return dataclasses.replace(task, support_idx=[task.support_idx[i] for i in train],
                               support_y=[task.support_y[i] for i in train],
                               pool_idx=[task.support_idx[i] for i in scored],
                               pool_y=[task.support_y[i] for i in scored])


def cross_validate(task: Task, plan: Plan, fit_and_predict, log=print) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions and labels of every scored image, each from a model fitted without it: ``fit_and_predict(sub)``
    fits the recipe on ``sub``'s support set and returns its predictions for ``sub``'s pool."""
    preds, truth = [], []
    for k, fold in enumerate(plan.folds):
        sub = fold_task(task, fold)
        log(f'estimate: {plan.method}, model {k + 1} of {len(plan.folds)}: trains on {len(sub.support_idx)} images, '
            f'classifies {len(sub.pool_idx)}')
        preds.append(fit_and_predict(sub))
        truth.append(torch.tensor(sub.pool_y))
    return torch.cat(preds), torch.cat(truth)


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson's score interval for ``correct`` successes of ``n`` (sound at 0 or n, unlike mean +- 1.96 SE).

    Example:
        >>> [round(x, 3) for x in wilson_interval(9, 10)]
        [0.596, 0.982]
    """
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def estimate_metrics(pred: torch.Tensor, truth: torch.Tensor, task: Task, plan: Plan) -> dict:
    """metrics.json of an ``'all'`` run: the estimate with its interval, per-class accuracy and confusion."""
    n_classes = len(task.class_names)
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.long)
    confusion.index_put_((truth, pred), torch.ones_like(truth), accumulate=True)
    correct, n = int((pred == truth).sum()), len(truth)
    low, high = wilson_interval(correct, n)
    counts = torch.bincount(torch.tensor(task.support_y), minlength=n_classes).tolist()
    per_class = {name: (confusion[c, c] / confusion[c].sum()).item()
                 for c, name in enumerate(task.class_names) if confusion[c].sum() > 0}
    return dict(
        task=dict(protocol='all', layout=task.layout, classes=task.class_names,
                  training_images=dict(zip(task.class_names, counts, strict=True))),
        estimate=dict(method=plan.method, description=plan.describe(n), images=n, correct=correct,
                      accuracy=correct / n if n else None, ci95=[low, high], unscored_classes=plan.unscored),
        held_out_accuracy=correct / n if n else None,
        per_class_accuracy=per_class,
        most_confused=confused_pairs(confusion, task.class_names),
        confusion=confusion.tolist(),
        chance=1.0 / n_classes,
    )
