"""Writing files so that a kill never leaves half of one (torch-free)."""
import os
from pathlib import Path

__all__ = ['atomic_write']


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: a kill leaves the old file or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.tmp')
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:  # also on Ctrl-C: no half-written temporary left beside the file
        tmp.unlink(missing_ok=True)
        raise
