"""Losses of episodic training."""
import torch
from torch import nn

from ..heads import class_prototypes

__all__ = ['prototypical_loss', 'balanced_weights']


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
    prototypes = class_prototypes(support, support_y, n_way)
    # ||q - p||^2 expanded: cdist's gradient is undefined at zero distance
    sq_dist = query.pow(2).sum(1, keepdim=True) - 2 * query @ prototypes.T + prototypes.pow(2).sum(1)
    logits = -sq_dist
    return nn.functional.cross_entropy(logits, query_y), (logits.argmax(1) == query_y).float().mean()


def balanced_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor | None:
    """Per-class loss weights ``N / (C * n_c)`` that make every class count the same in a loss over the ``N`` images
    of unequal classes (3 photos of one part, 40 of another); None when the classes are equal (nothing to weigh).

    Example:
        >>> balanced_weights(torch.tensor([0, 0, 0, 1]), 2).tolist()
        [0.6666666865348511, 2.0]
    """
    counts = torch.bincount(labels, minlength=num_classes).float()
    present = counts > 0
    if len(labels) == 0 or bool((counts[present] == counts[present][0]).all()):
        return None
    weight = torch.zeros(num_classes)
    weight[present] = len(labels) / (int(present.sum()) * counts[present])
    return weight
