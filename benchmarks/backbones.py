"""Backbone benchmark: size, MACs and single-image CPU latency of the lkca_mobilenet family next to MobileNetV3-Small.

Measures, in one process, every model of `fewshot_lkca.list_backbones()` plus timm's `mobilenetv3_small_100` and
`tf_mobilenetv3_small_100` (random init, 1000 classes):

* parameters, and MACs of one image at ``--size`` px: `torch.utils.flop_counter.FlopCounterMode` FLOPs / 2, which
  counts convolutions and matrix multiplies only;
* latency, batch 1: eager PyTorch in eval mode under `torch.inference_mode()`, with ``--threads`` threads; with
  ``--onnx`` also onnxruntime fp32 (CPU provider, sequential) on the package's own export
  (`fewshot_lkca.export.onnx.export_onnx`).

Latency is the median of all samples of a model. The models are timed round-robin, in a new random order each
round, so that slow drifts of a shared machine (another process, clock changes) hit every model alike and the
ratios to `tf_mobilenetv3_small_100` stay honest.

Run from the repository root (defaults: about 1.5 min on 2 cores with ``--onnx``)::

    python -m benchmarks.backbones
    python -m benchmarks.backbones --onnx --out benchmarks/results/backbones.json
    python -m benchmarks.backbones --models lkca_mobilenet,lkca_mobilenet_se --runs 60 --size 160
"""
import argparse
import datetime
import functools
import gc
import json
import math
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fewshot_lkca
from benchmarks.common import cpu_name
from fewshot_lkca.models import MIN_INPUT_SIZE
from fewshot_lkca.models.factory import BackboneError

__all__ = ['REFERENCE', 'default_models', 'count_params', 'count_macs', 'time_round_robin', 'benchmark',
           'format_table', 'main']

REFERENCE = 'tf_mobilenetv3_small_100'  # the ratios' denominator: the network whose weights the family transplants
REFERENCE_SHORT = 'tf_mnv3_small'


def default_models() -> list[str]:
    return fewshot_lkca.list_backbones() + ['mobilenetv3_small_100', REFERENCE]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of ``model(x)``: FlopCounterMode's FLOPs / 2 (conv and matmul ops only)."""
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(x)
    return counter.get_total_flops() // 2


def onnx_call(model: nn.Module, x: torch.Tensor, path: Path, threads: int) -> Callable[[], object]:
    """Export ``model`` to ``path`` and return a call that runs ``x`` through onnxruntime fp32."""
    from fewshot_lkca.export.onnx import export_onnx, save_onnx
    from fewshot_lkca.export.session import onnx_session

    save_onnx(export_onnx(model, x, output_name='output'), path)  # the package's own export
    # With several threads, idle pool threads spin and steal the CPU from the next model of the round-robin.
    session = onnx_session(path, threads, spin=False)
    return functools.partial(session.run, None, {session.get_inputs()[0].name: x.numpy()})


def time_round_robin(
        calls: dict[Hashable, Callable[[], object]],
        runs: int,
        warmup: int,
        rounds: int,
        seed: int = 0,
) -> dict[Hashable, list[float]]:
    """Milliseconds per call of each of ``calls``, interleaved.

    Each call first runs ``warmup`` times untimed; then, ``rounds`` times, every call in a new random order runs
    ``ceil(runs / rounds)`` times back to back, each run timed on its own.
    """
    per_round = math.ceil(runs / rounds)
    for call in calls.values():
        for _ in range(warmup):
            call()
    samples = {key: [] for key in calls}
    order = list(calls)
    rng = random.Random(seed)
    gc.collect()
    gc.disable()  # a collection would land on whichever model happens to be running
    try:
        for _ in range(rounds):
            rng.shuffle(order)
            for key in order:
                call = calls[key]
                for _ in range(per_round):
                    start = time.perf_counter_ns()
                    call()
                    samples[key].append((time.perf_counter_ns() - start) / 1e6)
    finally:
        gc.enable()
    return samples


def _one_line(e: Exception, limit: int = 120) -> str:
    text = f'{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ""}'
    return text if len(text) <= limit else text[:limit - 3] + '...'


def _summary(samples: list[float]) -> dict:
    q1, median, q3 = statistics.quantiles(samples, n=4, method='inclusive')
    return dict(ms=median, q1=q1, q3=q3, n=len(samples))


def benchmark(
        names: Sequence[str],
        size: int = 224,
        runs: int = 300,
        warmup: int = 10,
        rounds: int = 30,
        threads: int = 1,
        onnx: bool = False,
) -> list[dict]:
    """Measure ``names``; one dict per model (latencies in ms, params and MACs in millions).

    Ratios (``torch_vs_ref``, ``onnx_vs_ref``) are to `REFERENCE` and None when it is not among ``names``. A model whose
    ONNX export or session fails gets ``onnx_error`` (one line) instead of ONNX numbers.

    Example:
        >>> rows = benchmark(['lkca_mobilenet', 'tf_mobilenetv3_small_100'], size=128, runs=20, rounds=4)
        >>> ratio = rows[0]['torch_vs_ref']  # lkca_mobilenet's median latency / tf_mobilenetv3_small_100's
    """
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    rows = {}
    calls = {}
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name in names:
                model = fewshot_lkca.create_backbone(name).eval()
                rows[name] = dict(model=name, params_m=count_params(model) / 1e6, macs_m=count_macs(model, x) / 1e6)
                calls[name, 'torch'] = functools.partial(model, x)
                if onnx:
                    try:
                        calls[name, 'onnx'] = onnx_call(model, x, Path(tmp) / f'{name}.onnx', threads)
                    except Exception as e:  # exporter and runtime raise many types; the row says which and goes on
                        rows[name]['onnx_error'] = _one_line(e)
            with torch.inference_mode():
                samples = time_round_robin(calls, runs, warmup, rounds)
    finally:
        torch.set_num_threads(saved_threads)

    for (name, backend), times in samples.items():
        rows[name].update({f'{backend}_{k}': v for k, v in _summary(times).items()})
    ref = rows.get(REFERENCE, {})
    for row in rows.values():
        for backend in ('torch', 'onnx') if onnx else ('torch',):
            ms, ref_ms = row.get(f'{backend}_ms'), ref.get(f'{backend}_ms')
            row[f'{backend}_vs_ref'] = ms / ref_ms if ms and ref_ms else None
    return list(rows.values())


def _fmt(value: float | None, spec: str) -> str:
    return '-' if value is None else format(value, spec)


def format_table(rows: Sequence[dict], onnx: bool) -> str:
    """Markdown table of `benchmark` rows."""
    head = ['model', 'params (M)', 'MACs (M)', 'torch ms (median)', f'vs {REFERENCE_SHORT}']
    if onnx:
        head += ['ONNX ms (median)', f'ONNX vs {REFERENCE_SHORT}']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '|'.join([':---'] + ['---:'] * (len(head) - 1)) + '|']
    for r in rows:
        cells = [r['model'], f"{r['params_m']:.3f}", f"{r['macs_m']:.1f}", _fmt(r['torch_ms'], '.2f'),
                 _fmt(r['torch_vs_ref'], '.2f')]
        if onnx:
            if 'onnx_error' in r:
                cells += [f"export failed: {r['onnx_error']}".replace('|', '\\|'), '-']
            else:
                cells += [_fmt(r['onnx_ms'], '.2f'), _fmt(r['onnx_vs_ref'], '.2f')]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python -m benchmarks.backbones', description=__doc__.split('\n\n')[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--models', default=','.join(default_models()),
                        help=f'comma-separated timm model names ({REFERENCE} is added for the ratios)')
    parser.add_argument('--runs', type=int, default=300, help='timed runs per model and backend (at least)')
    parser.add_argument('--warmup', type=int, default=10, help='untimed runs per model and backend first')
    parser.add_argument('--rounds', type=int, default=30, help='round-robin rounds the runs are spread over')
    parser.add_argument('--size', type=int, default=224, help='input height and width (px)')
    parser.add_argument('--threads', type=int, default=1, help='torch threads and onnxruntime intra-op threads')
    parser.add_argument('--onnx', action='store_true', help='also time onnxruntime fp32 on a dynamo export')
    parser.add_argument('--out', type=Path, help='also write the rows and settings to this JSON file')
    return parser


def command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    names = list(dict.fromkeys(n.strip() for n in args.models.split(',') if n.strip()))
    if REFERENCE not in names:
        names.append(REFERENCE)
    for option, value, low in (('--runs', args.runs, 1), ('--warmup', args.warmup, 0), ('--rounds', args.rounds, 1),
                               ('--size', args.size, MIN_INPUT_SIZE), ('--threads', args.threads, 1)):
        if value < low:
            parser.error(f'{option} must be at least {low}, got {value}')
    if args.rounds > args.runs:
        parser.error(f'--rounds ({args.rounds}) cannot exceed --runs ({args.runs})')

    started = time.perf_counter()
    try:
        rows = benchmark(names, args.size, args.runs, args.warmup, args.rounds, args.threads, args.onnx)
    except BackboneError as e:
        parser.error(str(e))
    per_round = math.ceil(args.runs / args.rounds)
    meta = dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
        cpu=f'{cpu_name()}/{platform.machine()}', torch=torch.__version__, threads=args.threads, size=args.size,
        batch=1, samples=per_round * args.rounds, rounds=args.rounds, warmup=args.warmup,
        seconds=round(time.perf_counter() - started, 1))
    if args.onnx:
        import onnxruntime
        meta['onnxruntime'] = onnxruntime.__version__

    ort_part = f", onnxruntime {meta['onnxruntime']}" if args.onnx else ''
    print(f"Backbones, {meta['date']}, {meta['cpu']}, torch {meta['torch']}{ort_part}, "
          f"{args.threads} thread{'s' if args.threads > 1 else ''}, {args.size} px, batch 1\n")
    print(format_table(rows, args.onnx))
    spread = max(rows, key=lambda r: (r['torch_q3'] - r['torch_q1']) / r['torch_ms'])
    print(f"\nMACs: FlopCounterMode FLOPs / 2 at {args.size} px; it counts convolutions and matrix multiplies only "
          f"(no norms, activations, pooling or element-wise ops).\n"
          f"Latency: median of {meta['samples']} runs per model ({args.rounds} round-robin rounds x {per_round}, "
          f"random order per round, after {args.warmup} warm-up runs), eval mode, torch.inference_mode(); ratios "
          f"are to {REFERENCE}'s median. Largest torch spread (IQR / median): "
          f"{(spread['torch_q3'] - spread['torch_q1']) / spread['torch_ms']:.0%} ({spread['model']}).")
    if args.onnx:
        print('ONNX: fewshot_lkca.export.onnx.export_onnx (dynamo, optimize), onnxruntime fp32 CPUExecutionProvider, '
              f'default graph optimizations, sequential execution, {args.threads} intra-op thread(s).')
    print(f"Total time: {meta['seconds']:.0f} s.")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + '\n')
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    return command(parser.parse_args(argv), parser)


if __name__ == '__main__':
    sys.exit(main())
