"""Latency, size and accuracy of the backbones in every runtime: PyTorch, ONNX fp32, ONNX int8, ExecuTorch.

For each model (default: `lkca_mobilenet`, its `lkca_mobilenet_dw3` twin and timm's `tf_mobilenetv3_small_100`, all
with ImageNet weights when ``../shared/weights`` has them) the pre-logits feature extractor is run as

* ``torch``: eager PyTorch, eval mode, ``torch.inference_mode()``;
* ``onnx``: the package's export (`fewshot_lkca.export.onnx.export_onnx`), onnxruntime fp32 (CPU provider,
  sequential, no spinning);
* ``onnx-int8``: that file through `fewshot_lkca.export.int8.quantize_onnx`, calibrated on 64 images of the data's
  other classes;
* ``executorch`` / ``executorch-int8``: `fewshot_lkca.export.executorch.export_executorch` (XNNPACK), when the
  ``device`` extra is installed.

Measured, side by side in one run so that ratios hold on a shared machine:

* latency at batch 1: with 1 thread PyTorch and onnxruntime are timed in this process, round-robin in a random
  order per round (ExecuTorch, whose thread pool is sized once per process, in processes of its own); with 2
  threads each runtime runs in a process of its own (onnxruntime's and XNNPACK's idle threads spin and would slow
  whichever runtime runs next), the processes taking turns over several rounds. Median of all runs.
* size: the file the runtime loads (PyTorch: the fp32 state_dict's tensors);
* accuracy: nearest-prototype 5-way 5-shot over episodes of the data's held-out classes (Omniglot evaluation
  alphabets when ``../shared`` has them, else the built-in look-alike set), the same episodes for every runtime;
  ``agreement``: the share of query predictions equal to PyTorch's; ``cosine``: mean feature cosine to PyTorch.

The JSON keeps one record per (model, runtime, size, threads) with ``ms``, ``speedup_vs_fp32`` (int8 over the same
runtime's fp32), ``agreement`` and ``segments`` (ExecuTorch's XNNPACK delegate segments), so that a later run can be
compared record by record; ``targets`` states the int8 and the MobileNetV3-Small comparisons per size and threads.

Run from the repository root (defaults: about 10 min on 2 cores)::

    python -m benchmarks.latency
    python -m benchmarks.latency --models lkca_mobilenet,tf_mobilenetv3_small_100 --size 96,224 --threads 1,2
    python -m benchmarks.latency --models lkca_mobilenet --threads 1 --runs 60
"""
import argparse
import datetime
import functools
import json
import math
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from benchmarks.common import cpu_flags, cpu_name

__all__ = ['DEFAULT_MODELS', 'RUNTIMES', 'episode_predictions', 'benchmark', 'targets', 'format_table', 'main']

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared'
WEIGHTS = SHARED / 'weights' / 'tf_mobilenetv3_small_100.in1k.pth'
OMNIGLOT = SHARED / 'data' / 'omniglot'
DEFAULT_MODELS = ('lkca_mobilenet', 'lkca_mobilenet_dw3', 'tf_mobilenetv3_small_100')
RUNTIMES = ('torch', 'onnx', 'onnx-int8', 'executorch', 'executorch-int8')
BASELINE = 'onnx'  # speed-ups are to the fp32 ONNX model of the same network
CALIBRATION_IMAGES = 64


# ------------------------------------------------------------------------------------------------ data
def load_data(name: str, size: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(images, labels, calibration images, description): ``classes`` held-out classes, 20 images each at most.

    Calibration images come from *other* classes of the same split, preprocessed the same way (mean = std = 0.5,
    the weights' `pretrained_cfg`).
    """
    from fewshot_lkca.data import LookalikeDataset, OmniglotDataset, eval_transform

    cfg = dict(input_size=(3, size, size), mean=(0.5,) * 3, std=(0.5,) * 3, interpolation='bilinear', crop_pct=0.875)
    transform = eval_transform(cfg)
    rng = np.random.default_rng(seed)
    if name == 'omniglot':
        data = OmniglotDataset(str(OMNIGLOT), split='novel')
    else:
        data = LookalikeDataset('novel', images_per_class=20, image_size=max(size, 64), seed=seed)
    targets = np.asarray(data.targets)
    order = rng.permutation(np.unique(targets))
    chosen, others = order[:classes], order[classes:]
    picked = [i for c in chosen for i in np.flatnonzero(targets == c)[:20]]
    if len(others) == 0:  # the look-alike novel split has 10 classes: calibrate on its base split instead
        base = LookalikeDataset('base', images_per_class=2, image_size=max(size, 64), seed=seed + 1)
        calib_data, calib_idx = base, rng.choice(len(base), min(CALIBRATION_IMAGES, len(base)), replace=False)
    else:
        pool = np.flatnonzero(np.isin(targets, others))
        calib_data, calib_idx = data, rng.choice(pool, min(CALIBRATION_IMAGES, len(pool)), replace=False)
    images = np.stack([transform(data.load(int(i))).numpy() for i in picked])
    calibration = np.stack([transform(calib_data.load(int(i))).numpy() for i in calib_idx])
    what = (f'{name}: {len(chosen)} {"evaluation-alphabet characters" if name == "omniglot" else "novel classes"}, '
            f'{len(picked)} images at {size} px; calibration: {len(calibration)} images of other classes')
    return images, targets[picked], calibration, what


def episode_predictions(features: np.ndarray, labels: np.ndarray, episodes: int, n_way: int = 5, k_shot: int = 5,
                        n_query: int = 15, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-prototype (cosine) query predictions and true labels, concatenated over ``episodes`` episodes.

    Episode ``i`` depends only on ``seed``, ``i`` and the labels, so every runtime is scored on the same queries.
    """
    features = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    classes = np.array([c for c in np.unique(labels) if (labels == c).sum() >= k_shot + n_query])
    if len(classes) < n_way:
        raise ValueError(f'{n_way}-way {k_shot}-shot episodes with {n_query} queries need {n_way} classes of '
                         f'{k_shot + n_query} images; the data has {len(classes)}')
    preds, truth = [], []
    for episode in range(episodes):
        rng = np.random.default_rng([seed, episode])
        way = rng.choice(classes, n_way, replace=False)
        support, query = [], []
        for c in way:
            idx = rng.permutation(np.flatnonzero(labels == c))
            support.append(idx[:k_shot])
            query.append(idx[k_shot:k_shot + n_query])
        protos = np.stack([features[s].mean(0) for s in support])
        q = np.concatenate(query)
        preds.append((features[q] @ protos.T).argmax(1))
        truth.append(np.repeat(np.arange(n_way), n_query))
    return np.concatenate(preds), np.concatenate(truth)


# ------------------------------------------------------------------------------------------------ runtimes
def _ort_session(path: Path, threads: int):
    from fewshot_lkca.export.session import onnx_session

    return onnx_session(path, threads, spin=False)  # idle threads must not steal the CPU from the next runtime


def _executorch_available(int8: bool) -> bool:
    try:
        from fewshot_lkca.export.formats import missing_extra
    except ImportError:  # the export package is not in this checkout
        return False
    return missing_extra('executorch-int8' if int8 else 'executorch') is None


def _file_bytes(path: Path) -> int:
    """Bytes of a model file plus its side files (the dynamo exporter's ``.data``)."""
    return sum(p.stat().st_size for p in path.parent.glob(path.name + '*') if p.is_file())


def _batched(fn: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([fn(images[i:i + batch]) for i in range(0, len(images), batch)])


def _build(name: str, weights: Path | None):
    """The pre-logits feature extractor of ``name``, ImageNet weights (transplanted for LKCA models) when given;
    ``NAME@same`` builds it with TensorFlow's 'same' padding (the distilled photo checkpoint's)."""
    import fewshot_lkca

    name, _, pad_type = name.partition('@')
    kwargs = dict(weights=str(weights)) if weights else {}
    if pad_type:
        kwargs['pad_type'] = pad_type
    return fewshot_lkca.create_backbone(name, num_classes=0, **kwargs).eval()


def _prepare(name: str, weights: Path | None, size: int, runtimes: Sequence[str], calibration: np.ndarray,
             folder: Path, depthwise: str, log) -> dict:
    """Every artifact of one model: {runtime: dict(path, bytes, features_fn, worker_args, report, error)}."""
    import torch

    from fewshot_lkca.export.int8 import depthwise_plan, quantize_onnx

    model = _build(name, weights)
    example = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    out = {}

    def torch_features(x):
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    out['torch'] = dict(bytes=sum(t.numel() * t.element_size() for t in model.state_dict().values()),
                        fn=torch_features, worker=['torch', name, str(weights or '')])
    fp32 = folder / f'{name}.onnx'
    if 'onnx' in runtimes or 'onnx-int8' in runtimes:
        from fewshot_lkca.export.onnx import export_onnx, save_onnx

        save_onnx(export_onnx(model, example, output_name='features'), fp32)  # the package's own export
    for runtime in runtimes:
        if runtime == 'torch':
            continue
        try:
            if runtime == 'onnx':
                path, report = fp32, None
            elif runtime == 'onnx-int8':
                path = folder / f'{name}.int8.onnx'
                plan = depthwise_plan(name) if depthwise == 'recorded' else depthwise
                report = quantize_onnx(fp32, path, calibration, depthwise=plan)
            else:
                from fewshot_lkca.export.executorch import export_executorch

                path = folder / f'{name}.{runtime}.pte'
                calib = torch.from_numpy(calibration) if runtime.endswith('int8') else None
                report = export_executorch(model, path, example, calib)
        except Exception as e:  # exporters raise many types; the row says which and the benchmark goes on
            out[runtime] = dict(error=f'{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ""}')
            log(f'{name} {runtime}: {out[runtime]["error"]}')
            continue
        if runtime.startswith('onnx'):
            session = _ort_session(path, 1)
            fn = functools.partial(_run_ort, session)
        else:
            fn = functools.partial(_run_pte, path)
        out[runtime] = dict(path=path, bytes=_file_bytes(path), fn=fn, report=report,
                            worker=[runtime.split('-')[0], str(path)])
    return out


def _run_ort(session, x: np.ndarray) -> np.ndarray:
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _run_pte(path: Path, x: np.ndarray) -> np.ndarray:
    from fewshot_lkca.export.executorch import run_executorch

    # No num_threads here: resizing ExecuTorch's thread pool after a program ran in this process (the export runs
    # it back) hung XNNPACK on the pool's mutex; timings with a set thread count run in fresh processes instead.
    return np.concatenate([run_executorch(path, x[i:i + 1]) for i in range(len(x))])


def _timed_call(kind: str, args: Sequence[str], size: int, threads: int) -> Callable[[], object]:
    """A no-argument call that runs one batch-1 image through the runtime (used in-process and by the workers)."""
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    if kind == 'torch':
        import torch

        torch.set_num_threads(threads)
        model = _build(args[0], Path(args[1]) if args[1] else None)
        tensor = torch.from_numpy(x)

        def call():
            with torch.inference_mode():
                return model(tensor)
        return call
    if kind == 'onnx':
        session = _ort_session(Path(args[0]), threads)
        return functools.partial(_run_ort, session, x)
    if kind == 'executorch':
        from fewshot_lkca.export.executorch import run_executorch

        run_executorch(Path(args[0]), x, num_threads=threads)  # sets the pool size once
        return functools.partial(run_executorch, Path(args[0]), x)
    raise ValueError(f'unknown runtime kind {kind}')


def _worker(argv: Sequence[str]) -> int:
    """``--worker KIND SIZE THREADS RUNS WARMUP ARGS...``: print the runs' milliseconds as one JSON list."""
    kind, size, threads, runs, warmup, *args = argv
    call = _timed_call(kind, args, int(size), int(threads))
    for _ in range(int(warmup)):
        call()
    samples = []
    for _ in range(int(runs)):
        start = time.perf_counter_ns()
        call()
        samples.append((time.perf_counter_ns() - start) / 1e6)
    print(json.dumps(samples))
    return 0


def _time_in_processes(workers: dict, size: int, threads: int, runs: int, warmup: int, rounds: int,
                       seed: int = 0) -> dict:
    """Milliseconds per run of each worker, each in a fresh process, the processes taking turns over ``rounds``."""
    per_round = math.ceil(runs / rounds)
    samples = {key: [] for key in workers}
    order = list(workers)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for key in order:
            kind, *args = workers[key]
            cmd = [sys.executable, '-m', 'benchmarks.latency', '--worker', kind, str(size), str(threads),
                   str(per_round), str(warmup), *args]
            done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                tail = (done.stderr.strip().splitlines() or ['no output'])[-1]
                raise RuntimeError(f'latency worker {key} failed: {tail}')
            samples[key] += json.loads(done.stdout.strip().splitlines()[-1])
    return samples


# ------------------------------------------------------------------------------------------------ the benchmark
FP32_OF = {'onnx-int8': 'onnx', 'executorch-int8': 'executorch', 'onnx': 'onnx', 'executorch': 'executorch'}
FP32_RUNTIMES = ('onnx', 'executorch')  # the device runtimes, for "best fp32 runtime"
INT8_RUNTIMES = ('onnx-int8', 'executorch-int8')


def _quality(feats: dict, runtime: str, labels: np.ndarray, episodes: int, truth_pred: np.ndarray,
             truth: np.ndarray) -> dict:
    """Nearest-prototype accuracy, agreement with PyTorch's predictions and feature cosine of one runtime."""
    pred, _ = episode_predictions(feats[runtime], labels, episodes)
    f, r = feats[runtime], feats['torch']
    norms = np.maximum(np.linalg.norm(f, axis=1) * np.linalg.norm(r, axis=1), 1e-12)
    cosine = (f * r).sum(1) / norms  # 0 for an all-zero feature
    correct = (pred == truth).reshape(episodes, -1).mean(1)
    return dict(accuracy=float(correct.mean()), accuracy_ci=float(1.96 * correct.std() / math.sqrt(episodes)),
                agreement=float((pred == truth_pred).mean()), cosine=float(cosine.mean()))


def _time_model(name: str, artifacts: dict, ok: Sequence[str], size: int, threads: Sequence[int], runs: int,
                warmup: int, rounds: int) -> dict[tuple[str, int], list[float]]:
    """{(runtime, threads): milliseconds} of one model's working runtimes; see the module docstring for how."""
    import torch

    from benchmarks.backbones import time_round_robin

    samples = {}
    if 1 in threads:
        x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
        torch.set_num_threads(1)
        mine = {}
        for rt in (r for r in ok if not r.startswith('executorch')):
            if rt.startswith('onnx'):  # sessions made for the features may use more threads
                mine[rt] = functools.partial(_run_ort, _ort_session(artifacts[rt]['path'], 1), x)
            else:
                mine[rt] = functools.partial(artifacts[rt]['fn'], x)
        samples.update({(rt, 1): ms for rt, ms in time_round_robin(mine, runs, warmup, rounds).items()})
        own = {rt: artifacts[rt]['worker'] for rt in ok if rt.startswith('executorch')}
        if own:  # ExecuTorch's pool size is set once per process: its 1-thread runs get processes of their own
            timed = _time_in_processes(own, size, 1, runs, warmup, min(rounds, 3))
            samples.update({(rt, 1): ms for rt, ms in timed.items()})
    for t in (t for t in threads if t != 1):
        timed = _time_in_processes({rt: artifacts[rt]['worker'] for rt in ok}, size, t, runs, warmup, min(rounds, 3))
        samples.update({(rt, t): ms for rt, ms in timed.items()})
    return samples


def benchmark(models: Sequence[str], runtimes: Sequence[str], sizes: Sequence[int] = (224,),
              threads: Sequence[int] = (1, 2), runs: int = 100, warmup: int = 10, rounds: int = 10,
              episodes: int = 300, data: str = 'auto', classes: int = 40, weights: Path | None = None,
              depthwise: str = 'recorded', log=print) -> tuple[list[dict], dict]:
    """Records, one per (model, runtime, size, threads), and what was run on; see the module docstring.

    A record holds ``ms`` (median), ``runs``, ``speedup_vs_fp32`` (int8: the same runtime's fp32 time over its
    time; fp32 runtimes 1.0; PyTorch None), ``vs_onnx_fp32``, ``size_mb``, the episode ``accuracy`` (+-
    ``accuracy_ci``), ``agreement`` and ``cosine`` with PyTorch, and for ExecuTorch ``segments`` (XNNPACK delegate
    segments) and ``ops_outside``; or ``error`` when that runtime failed for the model.
    """
    data = ('omniglot' if OMNIGLOT.is_dir() else 'lookalike') if data == 'auto' else data
    records, info = [], dict(data={}, quantization={})
    for size in sizes:
        images, labels, calibration, what = load_data(data, size, classes)
        log(what)
        info['data'][str(size)] = what
        with tempfile.TemporaryDirectory() as tmp:
            for name in models:
                log(f'{name} at {size} px: exporting and quantizing')
                artifacts = _prepare(name, weights, size, runtimes, calibration, Path(tmp), depthwise, log)
                log(f'{name} at {size} px: features of {len(images)} images in every runtime, then timing')
                feats = {rt: _batched(a['fn'], images, 1 if rt.startswith('executorch') else 32)
                         for rt, a in artifacts.items() if 'fn' in a}
                truth_pred, truth = episode_predictions(feats['torch'], labels, episodes)
                ok = [rt for rt in runtimes if 'fn' in artifacts.get(rt, {})]
                samples = _time_model(name, artifacts, ok, size, threads, runs, warmup, rounds)
                for runtime in runtimes:
                    a = artifacts.get(runtime, {})
                    if runtime == 'onnx-int8' and a.get('report'):
                        info['quantization'][f'{name}@{size}'] = a['report']
                    if 'error' in a:
                        records += [dict(model=name, runtime=runtime, size=size, threads=t, error=a['error'])
                                    for t in threads]
                        continue
                    shared = dict(size_mb=a['bytes'] / 1e6,
                                  **_quality(feats, runtime, labels, episodes, truth_pred, truth))
                    if runtime.startswith('executorch'):
                        shared.update(segments=a['report'].get('delegated_segments'),
                                      ops_outside=a['report'].get('ops_outside_delegate'))
                    for t in threads:
                        ms = samples[runtime, t]
                        records.append(dict(model=name, runtime=runtime, size=size, threads=t,
                                            ms=statistics.median(ms), runs=len(ms), **shared))
    for record in records:
        record['speedup_vs_fp32'] = _ratio(records, record, FP32_OF.get(record['runtime']))
        record['vs_onnx_fp32'] = _ratio(records, record, BASELINE)
    return records, info


def _find(records: Sequence[dict], model: str, runtime: str, size: int, threads: int) -> dict | None:
    return next((r for r in records if (r['model'], r['runtime'], r['size'], r['threads']) ==
                 (model, runtime, size, threads) and 'ms' in r), None)


def _ratio(records: Sequence[dict], record: dict, reference: str | None) -> float | None:
    """``reference``'s time over ``record``'s, same model, size and threads (None when either is missing)."""
    ref = _find(records, record['model'], reference, record['size'], record['threads']) if reference else None
    return ref['ms'] / record['ms'] if ref and 'ms' in record else None


def targets(records: Sequence[dict], model: str = 'lkca_mobilenet',
            reference: str = 'tf_mobilenetv3_small_100') -> list[str]:
    """The issue's targets, one line per (size, threads): int8 over its fp32 per runtime, and ``model``'s best int8
    runtime against ``reference``'s best fp32 runtime."""
    lines = []
    for size, t in dict.fromkeys((r['size'], r['threads']) for r in records):
        ours = [r for rt in INT8_RUNTIMES if (r := _find(records, model, rt, size, t))]
        theirs = [r for rt in FP32_RUNTIMES if (r := _find(records, reference, rt, size, t))]
        if not ours:
            continue
        gains = ', '.join(f"{r['runtime']} {r['speedup_vs_fp32']:.2f}x" for r in ours if r['speedup_vs_fp32'])
        line = f'{size} px, {t} thread{"s" * (t > 1)}: {model} int8 over its fp32: {gains} (target >= 1.5x)'
        if theirs:
            best, base = min(ours, key=lambda r: r['ms']), min(theirs, key=lambda r: r['ms'])
            verdict = 'met' if best['ms'] <= base['ms'] else 'missed'
            line += (f"; best int8 {best['ms']:.2f} ms ({best['runtime']}) vs {reference} best fp32 "
                     f"{base['ms']:.2f} ms ({base['runtime']}): {base['ms'] / best['ms']:.2f}x ({verdict})")
        lines.append(line)
    return lines


def _fmt(value, spec: str) -> str:
    return '-' if value is None else format(value, spec)


def format_table(records: Sequence[dict], size: int, threads: Sequence[int]) -> str:
    """Markdown table of the `benchmark` records at one input size: a row per model and runtime."""
    head = ['model', 'runtime', 'size (MB)']
    for t in threads:
        head += [f'ms, {t} thread{"s" if t > 1 else ""}', f'int8 vs its fp32 ({t}t)']
    head += ['XNNPACK segments', '5-way 5-shot acc (%)', 'agreement with torch (%)', 'feature cosine']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '|'.join([':---', ':---'] + ['---:'] * (len(head) - 2)) + '|']
    keys = dict.fromkeys((r['model'], r['runtime']) for r in records if r['size'] == size)
    for model, runtime in keys:
        mine = {r['threads']: r for r in records if (r['model'], r['runtime'], r['size']) == (model, runtime, size)}
        first = mine[min(mine)]
        if 'error' in first:
            cells = [model, runtime, f"failed: {first['error']}".replace('|', '\\|')] + ['-'] * (len(head) - 3)
        else:
            cells = [model, runtime, f"{first['size_mb']:.2f}"]
            for t in threads:
                r = mine.get(t, {})
                gain = r.get('speedup_vs_fp32') if runtime in INT8_RUNTIMES else None
                cells += [_fmt(r.get('ms'), '.2f'), _fmt(gain, '.2f') + 'x' * bool(gain)]
            cells += [_fmt(first.get('segments'), 'd'),
                      f"{100 * first['accuracy']:.1f} +- {100 * first['accuracy_ci']:.1f}",
                      f"{100 * first['agreement']:.1f}", f"{first['cosine']:.4f}"]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m benchmarks.latency', description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--models', default=','.join(DEFAULT_MODELS),
                        help="comma-separated timm model names; NAME@same: with pad_type='same'")
    parser.add_argument('--runtimes', default=','.join(RUNTIMES),
                        help='comma-separated, of ' + ', '.join(RUNTIMES) + ' (torch is always measured: the '
                        'reference of agreement); ExecuTorch is skipped with a note when its extra is absent')
    parser.add_argument('--size', default='224', help='comma-separated input heights and widths (px), e.g. 96,224')
    parser.add_argument('--threads', default='1,2', help='comma-separated thread counts')
    parser.add_argument('--runs', type=int, default=100, help='timed batch-1 runs per runtime and thread count')
    parser.add_argument('--warmup', type=int, default=10, help='untimed runs first (in each process)')
    parser.add_argument('--rounds', type=int, default=10, help='round-robin rounds at 1 thread (at most 3 process '
                        'turns per runtime at more threads)')
    parser.add_argument('--episodes', type=int, default=300, help='5-way 5-shot episodes for the accuracy')
    parser.add_argument('--data', choices=('auto', 'omniglot', 'lookalike'), default='auto',
                        help='held-out images; auto: Omniglot when ../shared has it')
    parser.add_argument('--classes', type=int, default=40, help='held-out classes the episodes draw from')
    parser.add_argument('--depthwise', choices=('recorded', 'int8', 'fp32', 'auto'), default='recorded',
                        help="onnx-int8's depthwise convs: the plan fewshot_lkca.export.int8 records per model, or "
                        'one for every model')
    parser.add_argument('--weights', default='auto', help="source ImageNet weights file, 'none' for random init, "
                        'auto: ../shared/weights when present')
    parser.add_argument('--out', type=Path, default=REPO / 'benchmarks' / 'results' / 'latency.json',
                        help="JSON results (a .md with the table is written beside it); 'none' writes nothing")
    return parser


def _parse_list(parser, option: str, text: str, allowed=None, cast=str) -> list:
    try:
        values = list(dict.fromkeys(cast(v.strip()) for v in text.split(',') if v.strip()))
    except ValueError:
        parser.error(f'{option}: cannot read {text!r}')
    if not values:
        parser.error(f'{option} is empty')
    bad = [v for v in values if allowed is not None and v not in allowed]
    if bad:
        parser.error(f'{option}: unknown {bad}; choose from {list(allowed)}')
    return values


def command(args: argparse.Namespace, parser: argparse.ArgumentParser, log=print) -> int:
    import onnxruntime
    import torch

    from fewshot_lkca.checkpoint import atomic_write
    from fewshot_lkca.export.device import versions
    from fewshot_lkca.models.factory import BackboneError

    models = _parse_list(parser, '--models', args.models)
    runtimes = _parse_list(parser, '--runtimes', args.runtimes, RUNTIMES)
    threads = _parse_list(parser, '--threads', args.threads, cast=int)
    sizes = _parse_list(parser, '--size', args.size, cast=int)
    for option, value, low in (('--runs', args.runs, 1), ('--warmup', args.warmup, 0), ('--rounds', args.rounds, 1),
                               ('--size', min(sizes), 32), ('--episodes', args.episodes, 1),
                               ('--classes', args.classes, 5), ('--threads', min(threads), 1)):
        if value < low:
            parser.error(f'{option} must be at least {low}, got {value}')
    if args.rounds > args.runs:
        parser.error(f'--rounds ({args.rounds}) cannot exceed --runs ({args.runs})')
    if args.data == 'omniglot' and not OMNIGLOT.is_dir():
        parser.error(f'--data omniglot: {OMNIGLOT} is absent')
    weights = (WEIGHTS if WEIGHTS.is_file() else None) if args.weights == 'auto' else (
        None if args.weights == 'none' else Path(args.weights))
    if weights is not None and not weights.is_file():
        parser.error(f'--weights: no such file {weights}')
    runtimes = ['torch'] + [r for r in runtimes if r != 'torch']
    skipped = [r for r in runtimes if r.startswith('executorch') and not _executorch_available(r.endswith('int8'))]
    runtimes = [r for r in runtimes if r not in skipped]

    started = time.perf_counter()
    try:
        records, info = benchmark(models, runtimes, sizes, threads, args.runs, args.warmup, args.rounds,
                                  args.episodes, args.data, args.classes, weights, args.depthwise, log=log)
    except BackboneError as e:
        parser.error(str(e))

    meta = dict(date=datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
                cpu=f'{cpu_name()}/{platform.machine()}', cpu_flags=cpu_flags(), torch=torch.__version__,
                onnxruntime=onnxruntime.__version__, executorch=versions('executorch').get('executorch'),
                sizes=sizes, batch=1, threads=threads, runs=args.runs, warmup=args.warmup, rounds=args.rounds,
                episodes=args.episodes,
                depthwise=args.depthwise, weights=str(weights) if weights else 'random init', skipped=skipped,
                seconds=round(time.perf_counter() - started, 1), **info)
    tables = '\n\n'.join(f'{size} px:\n\n{format_table(records, size, threads)}' for size in sizes)
    goals = targets(records)
    notes = (f"Batch 1, pre-logits features; median of >= {args.runs} runs after {args.warmup} "
             f"warm-up runs. 1 thread: PyTorch and onnxruntime interleaved in one process ({args.rounds} rounds, "
             f"random order), ExecuTorch in processes of its own; more threads: each runtime in its own process, "
             f"the processes taking turns. int8 speed-ups are to the same runtime's fp32 time. Accuracy: nearest "
             f"prototype, {args.episodes} episodes of 5-way 5-shot with 15 queries per class, mean +- 95% CI; "
             f"agreement: share of the same query predictions as PyTorch fp32. Data: "
             f"{'; '.join(f'{k} px: {v}' for k, v in info['data'].items())}. Weights: {meta['weights']}. "
             f"onnx-int8 depthwise: {args.depthwise}."
             + (f" Skipped (extra not installed): {', '.join(skipped)}." if skipped else ''))
    log(f"\nRuntimes, {meta['date']}, {meta['cpu']} ({meta['cpu_flags']}), torch {meta['torch']}, "
        f"onnxruntime {meta['onnxruntime']}, executorch {meta['executorch']}\n")
    log(tables)
    log('\n' + notes)
    for line in goals:
        log('Targets: ' + line)
    log(f"Total time: {meta['seconds']:.0f} s.")
    if str(args.out) != 'none':
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps(dict(meta=meta, records=records, targets=goals), indent=2, default=str) + '\n'
        atomic_write(args.out, lambda t: Path(t).write_text(payload))
        markdown = f"{tables}\n\n{notes}\n\n" + ''.join(f'- {line}\n' for line in goals)
        atomic_write(args.out.with_suffix('.md'), lambda t: Path(t).write_text(markdown))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ['--worker']:
        return _worker(argv[1:])
    parser = build_parser()
    return command(parser.parse_args(argv), parser)


if __name__ == '__main__':
    sys.exit(main())
