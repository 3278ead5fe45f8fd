"""How many CPU threads a command uses: decided here, the same for every command (``--threads N``).

The default is one thread. Measured with ``python -m benchmarks.threads`` (2026-12-03, 2-CPU Intel Xeon with AVX-512
VNNI and AMX; benchmarks/results/threads.json): a memory-lean fine-tuning step (lean_5shot, 96 px, batch 2) took
24 ms at 1 thread and 31 ms at 2 on an idle machine; beside 1 busy process, 24 ms at 1 thread and 48-71 ms at 2;
beside 2, 30-44 ms at 1 thread and 67-122 ms at 2. One thread was the fastest choice in every condition, and the
OpenMP wait policy made no difference at 1 thread (at 2 threads a passive wait cost 3x on the idle machine, so it is
not set). Base pretraining (batch 64) measured 0.39 s per step at 1 thread with a rendering worker, 0.43 s at 2.
``--threads 0`` leaves torch's (and onnxruntime's) own choice, e.g. for a machine with many cores.
"""
import os
import platform
from pathlib import Path

from .config import ConfigError

__all__ = ['DEFAULT_THREADS', 'cpu_name', 'usable_cpus', 'check_threads', 'set_threads', 'add_threads_argument']

DEFAULT_THREADS = 1


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo; platform.processor() is empty on most Linux systems)."""
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown cpu'


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's or taskset's limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_threads(threads: int, option: str = '--threads') -> int:
    """``threads`` if it is 0 (the library's choice) or between 1 and `usable_cpus`, else a one-line `ConfigError`."""
    cpus = usable_cpus()
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 0 or threads > cpus:
        raise ConfigError(f'{option} must be 0 (the library decides) or 1..{cpus} (the CPUs this process may use), '
                          f'got {threads}')
    return threads


def set_threads(threads: int) -> None:
    """torch's intra-op threads (0: leave torch's choice)."""
    if check_threads(threads):
        import torch

        torch.set_num_threads(threads)


def add_threads_argument(parser) -> None:
    parser.add_argument('--threads', type=int, default=DEFAULT_THREADS, metavar='N',
                        help=f'CPU threads (default {DEFAULT_THREADS}: fastest measured, also beside other busy '
                             f'processes; 0: the library decides; this machine allows up to {usable_cpus()})')
