"""Helpers the benchmark scripts share."""
import platform
from pathlib import Path


def cpu_name() -> str:
    """platform.processor() is empty on most Linux systems: fall back to /proc/cpuinfo's model name."""
    if platform.processor():
        return platform.processor()
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return 'unknown cpu'
