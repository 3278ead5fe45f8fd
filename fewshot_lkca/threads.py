"""How many threads a command uses, and how idle threads wait: decided here, the same for every command.

* Idle OpenMP threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``), set by ``import fewshot_lkca``
  before torch loads, unless the environment already chose: on a busy machine (other processes on the cores)
  spinning threads compete with the work, and a training step measured 10-20x slower. See `prefer_passive_wait`.
* ``--threads N`` on every command: torch's intra-op threads (and onnxruntime's, for the ONNX runtimes), checked
  against the CPUs this process may use. 0 (the default) keeps the library's own choice.
"""
import os
import sys

from .config import ConfigError

__all__ = ['WAIT_POLICY', 'prefer_passive_wait', 'usable_cpus', 'check_threads', 'set_threads', 'add_threads_argument']

WAIT_POLICY = 'PASSIVE'


def prefer_passive_wait() -> None:
    """Ask OpenMP (torch's CPU thread pool) to let idle threads sleep; only effective before torch is imported."""
    if 'torch' not in sys.modules:
        os.environ.setdefault('OMP_WAIT_POLICY', WAIT_POLICY)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's or taskset's limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_threads(threads: int, option: str = '--threads') -> int:
    """``threads`` if it is 0 (library default) or between 1 and `usable_cpus`, else a one-line `ConfigError`."""
    cpus = usable_cpus()
    if not isinstance(threads, int) or threads < 0 or threads > cpus:
        raise ConfigError(f'{option} must be 0 (automatic) or 1..{cpus} (the CPUs this process may use), got {threads}')
    return threads


def set_threads(threads: int) -> None:
    """torch's intra-op threads (0: leave torch's choice)."""
    if check_threads(threads):
        import torch

        torch.set_num_threads(threads)


def add_threads_argument(parser) -> None:
    parser.add_argument('--threads', type=int, default=0, metavar='N',
                        help=f'CPU threads (default 0: the library decides; this machine allows 1..{usable_cpus()})')
