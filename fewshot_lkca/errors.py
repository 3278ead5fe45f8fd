"""Typed errors and warnings of the data layer, torch-free (the device-side predictor raises them too).

Every message is one line that names the file, class or count a user has to act on.
"""

__all__ = ["DataError", "CorruptImageError", "ImageTooLargeError", "DataWarning"]


class DataError(ValueError):
    """The data cannot be used as asked: missing root, too few classes or images, bad card."""


class CorruptImageError(DataError):
    """A file is empty, truncated, not an image, or cannot be decoded."""


class ImageTooLargeError(DataError):
    """An image header claims more pixels than allowed (decompression bomb or absurd size)."""


class DataWarning(UserWarning):
    """Something was skipped or looks wrong, but the data set is still usable."""
