"""Typed errors and warnings of the data layer, torch-free (the device-side predictor raises them too).

Every message is one line that names the file, class or count a user has to act on.
"""

__all__ = ["DataError", "CorruptImageError", "ImageTooLargeError", "DataWarning", "os_error"]


class DataError(ValueError):
    """The data cannot be used as asked: missing root, too few classes or images, bad card."""


class CorruptImageError(DataError):
    """A file is empty, truncated, not an image, or cannot be decoded."""


class ImageTooLargeError(DataError):
    """An image header claims more pixels than allowed (decompression bomb or absurd size)."""


class DataWarning(UserWarning):
    """Something was skipped or looks wrong, but the data set is still usable."""


def os_error(e: OSError) -> str:
    """One line for an operating-system error: the file, then what the system said (e.g. no space left on device).

    Example:
        >>> os_error(OSError(28, 'No space left on device', 'runs/x/train_state.pt'))
        'cannot write runs/x/train_state.pt: No space left on device'
    """
    where = e.filename or 'a file'
    return f'cannot write {where}: {e.strerror or str(e).splitlines()[0]}'
