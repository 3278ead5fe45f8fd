"""What the commands print besides their own lines (torch-free): a `DataWarning` is one line naming the files.

Third-party notes that carry no news for the user are silenced where they arise (the exporters, the quantizer);
this module only shapes the package's own warnings for a terminal.
"""
import contextlib
import sys
import warnings

from .errors import DataWarning

__all__ = ['quiet_console']


@contextlib.contextmanager
def quiet_console():
    """Within: a `DataWarning` prints as ``warning: <message>`` on stderr, without Python's source-line echo."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DataWarning):
            print(f'warning: {message}', file=file or sys.stderr)
        else:
            previous(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous
