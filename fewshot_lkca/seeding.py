"""The one seeding rule: every random draw of the package is seeded from a tuple of integers.

``derive_seed(seed, stream, step, ...)`` hashes the tuple (numpy's `SeedSequence`), so neighbouring tuples give
unrelated streams and a draw is reproducible from its tuple alone: episode ``i`` of a seed, the batch of step ``t``
after a resume, the augmentation of one image. Streams are told apart by a small constant in the tuple.

Example:
    >>> derive_seed(0, 1) == derive_seed(0, 1) != derive_seed(0, 2)
    True
"""
import numpy as np

__all__ = ['derive_seed']


def derive_seed(*numbers: int) -> int:
    """One 32-bit seed from a tuple of non-negative integers."""
    return int(np.random.SeedSequence([int(n) for n in numbers]).generate_state(1)[0])
