"""The linear probe of `fewshot_lkca.probe` in numpy: a cosine head trained on frozen features, torch-free.

The same problem, step for step, as `fewshot_lkca.probe._fit_many` (a test holds the two within 1e-4): independent
heads, one per row of ``masks`` (the support images it trains on), each starting at its unit-length class prototypes
P and taking full-batch SGD steps (momentum 0.9) on the class-balanced cross-entropy (label smoothing) of
``scale * cos(x, w_c)`` plus ``anchor * ||W - P||^2``. The gradient is written out by hand:

* logits ``L = s * U @ Wn^T`` with U the unit features, Wn = V / |V| row by row;
* ``dLoss/dL = a_n * (softmax(L) - q)``, q the smoothed target, a_n the image's class-balanced weight;
* ``dLoss/dWn = s * (dLoss/dL)^T @ U``; through the normalisation ``dV = (g - Wn <Wn, g>) / |V|``; plus
  ``2 * anchor * (V - P)``.

Classes a model already knows (``known``, when more are added) keep their direction; the new ones learn against them.

Example:
    >>> rng = np.random.default_rng(0)
    >>> feats, labels = rng.normal(size=(10, 8)), np.arange(5).repeat(2)
    >>> fit_directions(feats, labels, 5, steps=20, lr=0.03).shape
    (5, 8)
"""
import numpy as np

__all__ = ['unit', 'prototypes', 'fit_many', 'fit_directions', 'loo_accuracy', 'loo_scores']

_EPS = 1e-12  # torch.nn.functional.normalize's floor on the norm
LOO_LIMIT = 256  # leave-one-out scores at most this many support images (as fewshot_lkca.probe)


def unit(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), _EPS)


def prototypes(features: np.ndarray, labels: np.ndarray, n_way: int) -> np.ndarray:
    """(n_way, D) unit-length class means; a class without an image is an error."""
    counts = np.bincount(labels, minlength=n_way)
    if (counts == 0).any():
        raise ValueError(f'no image of class(es) {np.flatnonzero(counts == 0).tolist()}')
    sums = np.zeros((n_way, features.shape[1]))
    np.add.at(sums, labels, features)
    return unit(sums / counts[:, None])


def fit_many(features: np.ndarray, labels: np.ndarray, masks: np.ndarray, n_way: int, steps: int, lr: float, *,
             scale: float = 10.0, label_smoothing: float = 0.1, anchor: float = 0.0,
             known: np.ndarray | None = None) -> np.ndarray:
    """Unit class directions (B, n_way, D) of the heads, one per row of the boolean (B, N) ``masks``.

    Args:
        known: (K, D) directions of classes 0..K-1 a model already has (no images here): they start, and stay, where
            they are, and the other classes learn against them.
    """
    features = np.asarray(features, np.float64)
    masks = np.asarray(masks, np.float64)
    onehot = np.eye(n_way)[labels]  # (N, C)
    counts = masks @ onehot  # (B, C): images per class in each problem
    sums = (masks[:, None, :] * onehot.T[None]) @ features  # (B, C, D)
    prior = unit(sums / np.maximum(counts, 1)[..., None])
    live = np.ones(n_way)
    if known is not None and len(known):
        prior[:, :len(known)] = unit(np.asarray(known, np.float64))
        live[:len(known)] = 0.0
    if steps <= 0:
        return prior
    u = unit(features)
    images = masks.sum(1, keepdims=True)
    present = (counts > 0).sum(1, keepdims=True)
    weight = masks * images / np.maximum(present * counts[:, labels], 1) / np.maximum(images, 1)  # (B, N)
    target = (1 - label_smoothing) * onehot + label_smoothing / n_way  # (N, C)
    v, velocity = prior.copy(), np.zeros_like(prior)
    for step in range(steps):
        norm = np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), _EPS)
        wn = v / norm
        logits = scale * (u @ wn.transpose(0, 2, 1))  # (B, N, C)
        soft = np.exp(logits - logits.max(-1, keepdims=True))
        soft /= soft.sum(-1, keepdims=True)
        d_logits = weight[..., None] * (soft - target)  # (B, N, C)
        g = scale * (d_logits.transpose(0, 2, 1) @ u)  # (B, C, D)
        grad = (g - wn * (wn * g).sum(-1, keepdims=True)) / norm + 2 * anchor * (v - prior)
        grad *= live[None, :, None]
        velocity = grad if step == 0 else 0.9 * velocity + grad  # torch SGD: the first step's buffer is the gradient
        v = v - lr * velocity
    return unit(v)


def fit_directions(features: np.ndarray, labels: np.ndarray, n_way: int, steps: int, lr: float, **fit) -> np.ndarray:
    """(n_way, D) unit directions of one head trained on every image (`fit_many` with one problem)."""
    return fit_many(features, labels, np.ones((1, len(labels)), bool), n_way, steps, lr, **fit)[0]


def _left_out(labels: np.ndarray, n_way: int) -> np.ndarray:
    counts = np.bincount(labels, minlength=n_way)
    left = np.flatnonzero(counts[labels] >= 2)  # an image whose class keeps another one
    if len(left) > LOO_LIMIT:
        left = left[np.linspace(0, len(left) - 1, LOO_LIMIT).round().astype(int)]
    return left


def loo_scores(features: np.ndarray, labels: np.ndarray, n_way: int, steps: int = 0, lr: float = 0.03,
               **fit) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Leave-one-out: each support image (whose class keeps another) against a head fitted without it.

    Returns:
        The left-out positions, their cosine to each class (L, n_way), and the predicted class of each.
    """
    left = _left_out(labels, n_way)
    if len(left) == 0:
        return left, np.zeros((0, n_way)), np.zeros(0, int)
    masks = np.ones((len(left), len(labels)), bool)
    masks[np.arange(len(left)), left] = False
    directions = fit_many(features, labels, masks, n_way, steps, lr, **fit)
    cos = (directions @ unit(np.asarray(features, np.float64)[left])[:, :, None])[..., 0]  # (L, C)
    return left, cos, cos.argmax(1)


def loo_accuracy(features: np.ndarray, labels: np.ndarray, n_way: int, steps: int = 0, lr: float = 0.03,
                 **fit) -> float | None:
    """Leave-one-out accuracy of the head `fit_directions` makes (steps 0: the prototypes); None for 1-shot."""
    left, _, predicted = loo_scores(features, labels, n_way, steps, lr, **fit)
    return float((predicted == labels[left]).mean()) if len(left) else None
