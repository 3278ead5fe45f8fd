"""Learning on the device (`fewshot_lkca.adapt`) against the host's heads on the same tasks, "unknown", time, memory.

One device model per run of this benchmark: the checkpoint's backbone exported by the package's own ONNX writer
(`fewshot_lkca.export.artifacts.write_onnx`, the (logits, features) form the device rewrites) and quantized to int8
by `write_onnx_int8`, calibrated on 64 images of the *base* classes (the model exists before the device meets its new
classes). Every image of the split is embedded once by each model: the device's features come from onnxruntime on
the package's numpy preprocessing (`fewshot_lkca.predict.preprocess`), the host's from PyTorch.

A task is episode ``t`` of the package's sampler (seed 0) on the split. On each task, paired:

* host ``protonet``: nearest prototype, one view; host ``linear_probe``: the recipe's head (100 steps, lr 0.03, pull
  1, label smoothing 0.1) with its leave-one-out guard, one view (``finetune --recipe linear_probe``);
* host ``default``: the job's default (ProtoNet on the sum of an image's and its mirror image's unit features), when
  the device model has mirror views;
* ``adapt fp32`` and ``adapt int8``: `fewshot_lkca.adapt.fit_head` (the linear probe and its guard in numpy) on the
  device model's features, as the command runs it.

"Unknown": the queries of another episode's classes that the task does not hold (never enrolled) against the task's
own queries, scored by the best class's cosine under the int8 head: AUROC, and at the threshold `adapt` stores (5th
percentile of the support set's leave-one-out scores) the share of unknown images rejected and the accuracy lost on
enrolled ones (a rejected enrolled image counts as wrong).

Time and memory: ``python -m fewshot_lkca.adapt`` itself on one task's support folder (PNG files), 1 thread, as a
fresh process (its peak RSS from the kernel), and in-process the time of its two parts (features, head) over tasks.

    python -m benchmarks.device_adapt --split novel --tasks 100 --out benchmarks/results/device_adapt_lookalike.json
    python -m benchmarks.device_adapt --data omniglot --weights runs/omniglot-pretrain/best.safetensors \\
        --no-mirror-views --split novel --tasks 100 --out benchmarks/results/device_adapt_omniglot.json
"""
import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fewshot_lkca.adapt import HEAD_ANCHOR, HEAD_LR, HEAD_STEPS, LABEL_SMOOTHING, DeviceModel, fit_head, threshold
from fewshot_lkca.checkpoint import CheckpointError, load_backbone
from fewshot_lkca.data import DataError, EpisodeSampler, eval_transform, get_dataset
from fewshot_lkca.metrics import mean_ci
from fewshot_lkca.predict import preprocess
from fewshot_lkca.probe import fit_head as host_fit_head
from fewshot_lkca.probe import guard_head
from fewshot_lkca.task import dataset_options, input_size
from fewshot_lkca.threads import cpu_name

SHIPPED = 'fewshot_lkca/weights/lkca_mobilenet-lookalike.safetensors'
CALIBRATION = 64
UNKNOWN_OFFSET = 100_000  # the episode whose other classes play "never enrolled" for task t: t + this


def build_device_models(weights: str, data: str, mirror: bool, work: Path) -> tuple[dict[str, Path], dict]:
    """fp32 and int8 device models of the checkpoint's backbone, written by the package's export writers."""
    from fewshot_lkca.export.artifacts import write_onnx, write_onnx_int8
    from fewshot_lkca.export.inputs import Inputs, Reference
    from fewshot_lkca.heads import CosineHead, FewShotClassifier
    from fewshot_lkca.metadata import preprocessing

    backbone, meta, origin = load_backbone('', weights)
    base = get_dataset(data, split='base', **dataset_options(data))
    size, _ = input_size(data, 0, base, int(meta.get('image_size') or 0))
    transform = eval_transform(backbone, size=size)
    picks = np.linspace(0, len(base) - 1, CALIBRATION).round().astype(int)
    calibration = torch.stack([transform(base.load(int(i))) for i in picks])
    with torch.no_grad():
        width = backbone.eval()(calibration[:2]).shape[1]
    model = FewShotClassifier(backbone, CosineHead(width, 2), mirror_views=mirror).eval()
    cls_meta = dict(model=meta.get('model') or 'lkca_mobilenet', classes=['a', 'b'], mirror_views=mirror,
                    **preprocessing(backbone.pretrained_cfg, size))
    inputs = Inputs(model, cls_meta, origin, None, None, None, calibration.numpy(), 'base-class images')
    with torch.no_grad():
        ref = Reference(calibration[:8], model(calibration[:8]).numpy(), 'base-class images')
    paths = dict(fp32=work / 'device.onnx', int8=work / 'device.int8.onnx')
    write_onnx(inputs, ref, paths['fp32'], work)
    write_onnx_int8(inputs, paths['int8'], paths['fp32'], work)
    return paths, dict(origin=origin, image_size=size)


def device_features(model: DeviceModel, dataset, batch: int = 64) -> np.ndarray:
    out = []
    for start in range(0, len(dataset), batch):
        images = np.stack([preprocess(dataset.load(i), model.meta) for i in range(start, min(start + batch,
                                                                                            len(dataset)))])
        out.append(model.features(images))
    return np.concatenate(out)


def host_features(weights: str, dataset, size: int, mirror: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, D) features of each image (and, ``mirror``, of its mirror image), PyTorch, the eval preprocessing."""
    from fewshot_lkca.features import RawImages, embed_images

    backbone, _, _ = load_backbone('', weights)
    transform = eval_transform(backbone, size=size)
    plain = embed_images(backbone, RawImages(dataset), transform, 64, progress=False)
    return plain, embed_images(backbone, RawImages(dataset, mirror=True), transform, 64, progress=False) \
        if mirror else None


def _auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """P(score of a known image > score of an unknown one), ties half."""
    diff = known[:, None] - unknown[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


@torch.no_grad()
def run_tasks(dataset, host: tuple, device: dict[str, np.ndarray], scale: float, mirror: bool, n_way: int,
              k_shot: int, n_query: int, tasks: int) -> dict:
    """Per-task accuracies of every head, and the int8 head's "unknown" figures, on the same tasks."""
    sampler = EpisodeSampler(dataset, n_way, k_shot, n_query, seed=0)
    unit = torch.nn.functional.normalize
    plain, mirrored = host
    acc = {k: [] for k in ['protonet', 'linear_probe'] + (['default'] if mirror else []) + [
        f'adapt {name}' for name in device]}
    unknown = dict(auroc=[], rejected_unknown=[], rejected_known=[], accuracy_with_reject=[], thresholds=0)
    agreement = []  # per task: share of queries the int8 model's head predicts as the fp32 model's head does
    probe = dict(lr=HEAD_LR, scale=scale, label_smoothing=LABEL_SMOOTHING, anchor=HEAD_ANCHOR)
    views = unit(plain, dim=1) + unit(mirrored, dim=1) if mirror else None  # the default's two-view features
    for t in range(tasks):
        plan = sampler.plan(t)
        sy, qy = torch.tensor(plan.support_y), torch.tensor(plan.query_y)
        sx, qx = plain[plan.support_idx], plain[plan.query_idx]
        acc['protonet'].append((host_fit_head(sx, sy, n_way, 0, **probe)(qx).argmax(1) == qy).float().mean().item())
        steps = HEAD_STEPS if guard_head(sx, sy, n_way, HEAD_STEPS, **probe)['kept'] == 'trained' else 0
        with torch.no_grad():
            acc['linear_probe'].append((host_fit_head(sx, sy, n_way, steps, **probe)(qx).argmax(1) == qy)
                                       .float().mean().item())
        if mirror:
            head = host_fit_head(views[plan.support_idx], sy, n_way, 0, **probe)
            with torch.no_grad():
                acc['default'].append((head(views[plan.query_idx]).argmax(1) == qy).float().mean().item())
        other = sampler.plan(t + UNKNOWN_OFFSET)
        strangers = [i for i, y in zip(other.query_idx, other.query_y, strict=True)
                     if other.class_names[y] not in plan.class_names]
        predicted = {}
        for name, feats in device.items():
            fitted = fit_head(feats[plan.support_idx], np.array(plan.support_y), n_way, scale)
            cos = _unit(feats[plan.query_idx]) @ fitted.directions.T
            predicted[name] = cos.argmax(1)
            right = predicted[name] == np.array(plan.query_y)
            acc[f'adapt {name}'].append(float(right.mean()))
            if name != 'int8' or not strangers:
                continue
            known_best, unknown_best = cos.max(1), (_unit(feats[strangers]) @ fitted.directions.T).max(1)
            unknown['auroc'].append(_auroc(known_best, unknown_best))
            limit = threshold(fitted.loo_best)
            if limit is None:
                continue
            unknown['thresholds'] += 1
            unknown['rejected_unknown'].append(float((unknown_best < limit).mean()))
            unknown['rejected_known'].append(float((known_best < limit).mean()))
            unknown['accuracy_with_reject'].append(float((right & (known_best >= limit)).mean()))
        if {'fp32', 'int8'} <= set(predicted):
            agreement.append(float((predicted['int8'] == predicted['fp32']).mean()))
    return dict(accuracy=acc, unknown=unknown, agreement=agreement)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def summarise(results: dict, reference: str = 'linear_probe') -> list[dict]:
    rows, acc = [], results['accuracy']
    for name, values in acc.items():
        row = dict(head=name, tasks=len(values), accuracy=mean_ci(values).as_dict())
        for other in (reference, 'default'):
            if other in acc and name != other:
                row['vs_' + other] = mean_ci([a - b for a, b in zip(values, acc[other], strict=True)]).as_dict()
        rows.append(row)
    return rows


# The command in a fresh interpreter that prints its own peak RSS at exit: VmHWM is the high-water mark of this
# process's own memory (getrusage's maxrss would also count the benchmark's memory, inherited through fork).
_MEASURED = '''import runpy, sys
sys.argv = {argv}
try:
    runpy.run_module('fewshot_lkca.adapt', run_name='__main__')
finally:
    print(next(line for line in open('/proc/self/status') if line.startswith('VmHWM')), file=sys.stderr)
'''


def time_command(model_path: Path, dataset, sampler_args: tuple, tasks: int, work: Path) -> dict:
    """``python -m fewshot_lkca.adapt`` on one task's support folder as a fresh process (wall time, peak RSS), and
    the in-process time of its parts over ``tasks`` tasks (features of the support images; the head)."""
    sampler = EpisodeSampler(dataset, *sampler_args, seed=0)
    plan = sampler.plan(0)
    folder = work / 'support'
    for i, (index, y) in enumerate(zip(plan.support_idx, plan.support_y, strict=True)):
        name = plan.class_names[y].replace('/', '_')  # Omniglot's 'alphabet/character'
        (folder / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(dataset.load(index)).save(folder / name / f'{i}.png')
    argv = ['fewshot_lkca.adapt', str(model_path), str(folder), '--out', str(work / 'adapted.onnx'), '--threads', '1']
    start = time.perf_counter()
    done = subprocess.run([sys.executable, '-c', _MEASURED.format(argv=argv)], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f'error: adapt failed: {done.stderr.strip().splitlines()[-1]}')
    rss_kb = int(done.stderr.strip().splitlines()[-1].split()[1])
    model = DeviceModel(model_path, threads=1)
    features_s, head_s = [], []
    for t in range(tasks):
        plan = sampler.plan(t)
        images = np.stack([preprocess(dataset.load(i), model.meta) for i in plan.support_idx])
        start = time.perf_counter()
        feats = model.features(images)
        features_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        fit_head(feats, np.array(plan.support_y), sampler_args[0], model.head['scale'])
        head_s.append(time.perf_counter() - start)
    return dict(command_wall_s=round(wall, 3), command_peak_rss_mb=round(rss_kb / 1024, 1),
                command_output=done.stdout.strip().splitlines()[-1], tasks=tasks,
                features_ms_median=round(1000 * float(np.median(features_s)), 1),
                head_ms_median=round(1000 * float(np.median(head_s)), 1),
                adapt_ms_median=round(1000 * float(np.median(np.add(features_s, head_s))), 1))


def format_tables(out: dict) -> list[str]:
    lines = ['| head | shots | tasks | accuracy (mean +- 95% CI) | vs linear_probe (paired) | vs default (paired) |',
             '|---|---:|---:|---|---|---|']
    for k, res in out['results'].items():
        for r in res['rows']:
            cells = []
            for other in ('linear_probe', 'default'):
                d = r.get('vs_' + other)
                cells.append(f"{100 * d['mean']:+.2f} +- {100 * d['ci95']:.2f}" if d else '-')
            lines.append(f"| {r['head']} | {k} | {r['tasks']} | {100 * r['accuracy']['mean']:.1f} +- "
                         f"{100 * r['accuracy']['ci95']:.1f} % | {cells[0]} | {cells[1]} |")
    lines += [''] + [f"int8 vs fp32 device model, {k}-shot: the fitted heads agree on "
                     f"{100 * res['int8_agreement']['mean']:.1f} +- {100 * res['int8_agreement']['ci95']:.1f} % of the "
                     f"queries (mean over tasks)" for k, res in out['results'].items() if 'int8_agreement' in res]
    lines += ['', '| shots | unknown AUROC | unknown rejected | enrolled rejected | enrolled accuracy: no reject -> '
                  'reject | tasks with a threshold |', '|---:|---|---|---|---|---:|']
    for k, res in out['results'].items():
        u = res['unknown']
        if not u['auroc']:
            continue
        base = res['rows'][[r['head'] for r in res['rows']].index('adapt int8')]['accuracy']['mean']
        if u['thresholds']:
            with_reject = mean_ci(u['accuracy_with_reject']).as_dict()['mean']
            lines.append(f"| {k} | {mean_ci(u['auroc']).as_dict()['mean']:.3f} | "
                         f"{100 * np.mean(u['rejected_unknown']):.1f} % | {100 * np.mean(u['rejected_known']):.1f} % |"
                         f" {100 * base:.1f} -> {100 * with_reject:.1f} % | {u['thresholds']} |")
        else:
            lines.append(f"| {k} | {mean_ci(u['auroc']).as_dict()['mean']:.3f} | - | - | {100 * base:.1f} % | 0 |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--weights', default=SHIPPED)
    parser.add_argument('--data', default='lookalike')
    parser.add_argument('--split', default='val', help="'val' to choose, 'novel' to report (once)")
    parser.add_argument('--ways', type=int, default=5)
    parser.add_argument('--shots', default='5,1')
    parser.add_argument('--queries', type=int, default=15)
    parser.add_argument('--tasks', type=int, default=100)
    parser.add_argument('--timing-tasks', type=int, default=20)
    parser.add_argument('--no-mirror-views', dest='mirror', action='store_false',
                        help='the device model sees one view (the choice val made on Omniglot)')
    parser.add_argument('--out', type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        shots = [int(k) for k in args.shots.split(',')]
        dataset = get_dataset(args.data, split=args.split, **dataset_options(args.data))
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            paths, info = build_device_models(args.weights, args.data, args.mirror, work)
            models = {name: DeviceModel(path, threads=1) for name, path in paths.items()}
            device = {name: device_features(m, dataset) for name, m in models.items()}
            host = host_features(args.weights, dataset, info['image_size'], args.mirror)
            scale = models['int8'].head['scale']
            out = dict(date=str(datetime.date.today()), cpu=cpu_name(), threads=1, weights=info['origin'],
                       data=args.data, split=args.split, n_way=args.ways, n_query=args.queries, tasks=args.tasks,
                       image_size=info['image_size'], mirror_views=args.mirror, results={},
                       model_bytes={k: p.stat().st_size for k, p in paths.items()})
            print(f'# {out["date"]}, {out["cpu"]}, 1 thread; {info["origin"]}; {args.data} ({args.split}), '
                  f'{args.ways}-way, {args.queries} queries, {args.tasks} tasks; {info["image_size"]} px, '
                  f'mirror views {args.mirror}')
            for k in shots:
                results = run_tasks(dataset, host, device, scale, args.mirror, args.ways, k, args.queries, args.tasks)
                out['results'][k] = dict(rows=summarise(results), per_task=results['accuracy'],
                                         unknown=results['unknown'],
                                         int8_agreement=mean_ci(results['agreement']).as_dict())
            out['timing'] = time_command(paths['int8'], dataset, (args.ways, 5, args.queries), args.timing_tasks,
                                         work)
    except (CheckpointError, DataError, ValueError) as e:
        raise SystemExit(f'error: {e}') from None
    print('\n'.join(format_tables(out)))
    t = out['timing']
    print(f"\nadapt (int8, {args.ways}-way 5-shot, 1 thread): features {t['features_ms_median']} ms + head "
          f"{t['head_ms_median']} ms = {t['adapt_ms_median']} ms median over {t['tasks']} tasks; the command as a "
          f"fresh process: {t['command_wall_s']} s wall, peak RSS {t['command_peak_rss_mb']} MB")
    print(f'{time.perf_counter() - start:.0f} s')
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + '\n')


if __name__ == '__main__':
    main()
