"""Helpers the benchmark scripts share."""

from fewshot_lkca.threads import cpu_name  # noqa: F401  (re-exported: the benchmarks record the CPU with every timing)


