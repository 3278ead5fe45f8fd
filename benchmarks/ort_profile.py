"""Where onnxruntime spends its time: per op type, fp32 against int8, one model at batch 1 and one thread.

The model is exported by the package (`fewshot_lkca.export.onnx.export_onnx`, pre-logits features) and quantized by
`fewshot_lkca.export.int8.quantize_onnx` with the architecture's recorded depthwise plan, calibrated on random
images (the op mix and kernel times do not depend on the calibration). onnxruntime's own profiler times every node
of ``--runs`` runs after a warm-up; the table gives milliseconds per run by op type (after onnxruntime's fusions;
the profiler's own cost inflates them), and the median wall time per run without the profiler, the two models
taking turns.

    python -m benchmarks.ort_profile --model lkca_mobilenet --size 224
"""
import argparse
import collections
import functools
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import cpu_flags, cpu_name

__all__ = ['profile_ops', 'wall_ms', 'main']

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO.parent / 'shared' / 'weights' / 'tf_mobilenetv3_small_100.in1k.pth'


def wall_ms(paths: dict[str, Path], x: np.ndarray, runs: int, rounds: int = 10) -> dict[str, float]:
    """Median ms per run of each model without the profiler, 1 thread, interleaved (`time_round_robin`)."""
    from benchmarks.backbones import time_round_robin
    from fewshot_lkca.export.session import onnx_session

    calls = {}
    for key, path in paths.items():
        session = onnx_session(path, 1, spin=False)
        calls[key] = functools.partial(session.run, None, {session.get_inputs()[0].name: x})
    return {k: float(np.median(v)) for k, v in time_round_robin(calls, runs, 3, rounds).items()}


def profile_ops(path: Path, x: np.ndarray, runs: int, warmup: int = 20) -> dict[str, float]:
    """{op type: ms per run under onnxruntime's profiler} of an ONNX model, 1 thread, warm-up runs left out."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.enable_profiling = 1, True
    options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / 'profile')
        profiled = ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
        feed = {profiled.get_inputs()[0].name: x}
        for _ in range(warmup + runs):
            profiled.run(None, feed)
        events = json.loads(Path(profiled.end_profiling()).read_text())
    model_runs = sorted((e for e in events if e.get('name') == 'model_run'), key=lambda e: e['ts'])
    after_warmup = model_runs[warmup - 1]['ts'] + model_runs[warmup - 1]['dur'] if warmup else 0
    per_op = collections.defaultdict(float)
    for event in events:
        if event.get('cat') == 'Node' and event['name'].endswith('_kernel_time') and event['ts'] >= after_warmup:
            per_op[event['args']['op_name']] += event['dur'] / 1e3  # microseconds -> ms
    return {op: ms / runs for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m benchmarks.ort_profile', description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='lkca_mobilenet')
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--runs', type=int, default=100)
    parser.add_argument('--weights', default='auto', help="ImageNet weights file, 'none', or auto: ../shared's")
    args = parser.parse_args(argv)
    import onnxruntime
    import torch

    import fewshot_lkca
    from fewshot_lkca.export.int8 import depthwise_plan, quantize_onnx
    from fewshot_lkca.export.onnx import export_onnx, save_onnx

    weights = (str(WEIGHTS) if WEIGHTS.is_file() else None) if args.weights == 'auto' else (
        None if args.weights == 'none' else args.weights)
    torch.set_num_threads(1)
    model = fewshot_lkca.create_backbone(args.model, num_classes=0, **({'weights': weights} if weights else {}))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, args.size, args.size)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / 'fp32.onnx', Path(tmp) / 'int8.onnx'
        save_onnx(export_onnx(model.eval(), torch.from_numpy(x), output_name='features'), fp32)
        calibration = (rng.standard_normal((32, 3, args.size, args.size)) * 0.5).astype(np.float32)
        plan = depthwise_plan(args.model)
        quantize_onnx(fp32, int8, calibration, depthwise=plan)
        paths = dict(fp32=fp32, int8=int8)
        wall = wall_ms(paths, x, args.runs)
        results = {name: profile_ops(path, x, args.runs) for name, path in paths.items()}
    print(f'# {args.model}, {args.size} px, batch 1, 1 thread, {args.runs} runs; {cpu_name()} ({cpu_flags()}); '
          f'onnxruntime {onnxruntime.__version__}; int8 depthwise {plan}; weights {weights or "random init"}')
    ops = list(dict.fromkeys(op for per_op in results.values() for op in per_op))
    print('| op type | fp32 ms | int8 ms |\n|:---|---:|---:|')
    for op in ops:
        cells = [f"{results[k][op]:.3f}" if op in results[k] else '-' for k in ('fp32', 'int8')]
        print(f'| {op} | {cells[0]} | {cells[1]} |')
    totals = [sum(results[k].values()) for k in ('fp32', 'int8')]
    print(f'| all nodes (profiled) | {totals[0]:.3f} | {totals[1]:.3f} |')
    print(f"| wall per run, no profiler (interleaved, median) | {wall['fp32']:.3f} | {wall['int8']:.3f} |")
    return 0


if __name__ == '__main__':
    sys.exit(main())
