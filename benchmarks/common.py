"""Helpers the benchmark scripts share."""
from pathlib import Path

from fewshot_lkca.threads import cpu_name  # noqa: F401  (re-exported: the benchmarks record the CPU with every timing)

__all__ = ['cpu_name', 'cpu_flags', 'SPEED_FLAGS', 'machine']

# The instruction sets int8 and fp32 kernels pick from (x86: AVX2 / AVX-512 / VNNI / AMX; Arm: dot product, i8mm).
SPEED_FLAGS = ('avx2', 'fma', 'avx512f', 'avx512_vnni', 'avx_vnni', 'avx512_bf16', 'amx_tile', 'amx_int8',
               'asimd', 'asimddp', 'i8mm', 'sve')


def cpu_flags(cpuinfo: str | None = None) -> str:
    """The `SPEED_FLAGS` this CPU has, space-separated, from /proc/cpuinfo ('unknown' where it cannot be read)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path('/proc/cpuinfo').read_text()
        except OSError:
            return 'unknown'
    for line in cpuinfo.splitlines():
        if line.split(':')[0].strip() in ('flags', 'Features'):
            have = set(line.split(':', 1)[1].split())
            return ' '.join(f for f in SPEED_FLAGS if f in have) or 'none of ' + ' '.join(SPEED_FLAGS)
    return 'unknown'


def machine() -> dict:
    """Date, CPU, threads and versions: what every benchmark record carries."""
    import datetime

    import timm
    import torch

    return dict(date=datetime.date.today().isoformat(), cpu=cpu_name(), threads=torch.get_num_threads(),
                torch=torch.__version__, timm=timm.__version__)
