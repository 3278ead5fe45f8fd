"""Few-shot adaptation on a frozen backbone over many tasks: choose on val, report on novel, paired differences.

A task is episode ``t`` of learn2learn's sampler (`fewshot_lkca.data.EpisodeSampler`, seed 0) on a split: ``n_way``
classes, ``k_shot`` support and ``n_query`` query images each. The backbone is frozen, so every image of the split is
embedded once (`fewshot_lkca.features.embed_images`, the package's evaluation preprocessing) and each head is fitted
on the support features of each task:

* ``protonet``: the nearest-prototype (cosine) classifier, no training (`fewshot_lkca.probe.fit_head`, 0 steps);
* ``probe:STEPS:LR:ANCHOR``: the cosine head from the prototypes, then STEPS full-batch SGD steps at LR with a pull
  of ANCHOR back towards the prototypes, as
  ``finetune --recipe linear_probe`` trains it; ``+guard`` keeps it only where leave-one-out on the support set does
  not say it is worse than the prototypes (`fewshot_lkca.probe.guard_head`), as the job does by default.

Each task's accuracy is over its queries; the table gives the mean over tasks with a 95% CI across tasks, and each
head's difference to ProtoNet on the same tasks (paired, so task difficulty cancels)::

    python -m benchmarks.adaptation --weights fewshot_lkca/weights/lkca_mobilenet-lookalike.safetensors \\
        --split val --tasks 50 --shots 5 --heads grid                 # choose (val classes only)
    python -m benchmarks.adaptation --weights ... --split novel --tasks 100 --shots 1,5 \\
        --heads protonet,probe:100:0.1:0+guard                         # report, once
"""
import argparse
import datetime
import json
import time
from pathlib import Path

import torch

from fewshot_lkca.checkpoint import CheckpointError, load_backbone
from fewshot_lkca.data import DataError, EpisodeSampler, eval_transform, get_dataset
from fewshot_lkca.features import RawImages, embed_images
from fewshot_lkca.metrics import mean_ci
from fewshot_lkca.probe import fit_head, guard_head
from fewshot_lkca.task import dataset_options, input_size

GRID = ['protonet'] + [f'probe:{s}:{lr}:{a}' for s in (25, 100) for lr in (0.03, 0.1, 0.3, 1.0) for a in (0, 1)]
DEFAULT_HEADS = ['protonet', 'probe:100:0.1:0', 'probe:100:0.1:0+guard']


def parse_head(spec: str) -> dict:
    """'protonet' or 'probe:STEPS:LR:ANCHOR[+guard]' -> dict(name, steps, lr, anchor, guard)."""
    guard = spec.endswith('+guard')
    body = spec.removesuffix('+guard')
    if body == 'protonet':
        return dict(name=spec, steps=0, lr=0.0, anchor=0.0, guard=False)
    parts = body.split(':')
    try:
        if parts[0] != 'probe' or len(parts) != 4:
            raise ValueError
        return dict(name=spec, steps=int(parts[1]), lr=float(parts[2]), anchor=float(parts[3]), guard=guard)
    except ValueError:
        raise SystemExit(f"error: head '{spec}' is not 'protonet' or 'probe:STEPS:LR:ANCHOR[+guard]'") from None


def embed_split(weights: str, data: str, split: str, cache: Path | None, mirrored: bool = False
                ) -> tuple[torch.Tensor, object, str]:
    """Features of every image of the split (cached in ``cache``), the data set, and the weights' origin."""
    backbone, meta, origin = load_backbone('', weights)
    dataset = get_dataset(data, split=split, **dataset_options(data))
    size, _ = input_size(data, 0, dataset, int(meta.get('image_size') or 0))
    if cache is not None and cache.is_file():
        saved = torch.load(cache, weights_only=True)
        if saved['origin'] == origin and saved['n'] == len(dataset):
            return saved['features'], dataset, origin
    transform = eval_transform(backbone, size=size)
    features = embed_images(backbone, RawImages(dataset, mirror=mirrored), transform, 64, progress=False)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(dict(features=features, origin=origin, n=len(dataset)), cache)
    return features, dataset, origin


def run_tasks(features: torch.Tensor, dataset, heads: list[dict], n_way: int, k_shot: int, n_query: int,
              tasks: int, first: int = 0, mirrored: torch.Tensor | None = None) -> dict[str, list[float]]:
    """Per-head list of per-task query accuracies; every head sees the same tasks.

    With ``mirrored`` (the features of the flipped images), ``protonet+mirror`` also runs: prototypes from each
    support image and its mirror image, queries as the mean of both views' unit features; and
    ``protonet+mirrored-support``: the same prototypes, each query seen once (the device's cost stays one forward).
    """
    sampler = EpisodeSampler(dataset, n_way, k_shot, n_query, seed=0)
    results = {h['name']: [] for h in heads}
    if mirrored is not None:
        results['protonet+mirror'] = []
        results['protonet+mirrored-support'] = []
    unit = torch.nn.functional.normalize
    guards = 0
    for t in range(first, first + tasks):
        plan = sampler.plan(t)
        sx, sy = features[plan.support_idx], torch.tensor(plan.support_y)
        qx, qy = features[plan.query_idx], torch.tensor(plan.query_y)
        for h in heads:
            fit = dict(lr=h['lr'] or 0.1, scale=10.0, label_smoothing=0.1, anchor=h['anchor'])
            steps = h['steps']
            if h['guard'] and steps and guard_head(sx, sy, n_way, steps, **fit)['kept'] == 'prototypes':
                steps, guards = 0, guards + 1
            head = fit_head(sx, sy, n_way, steps, **fit)
            with torch.no_grad():
                results[h['name']].append((head(qx).argmax(1) == qy).float().mean().item())
        if mirrored is not None:
            both = torch.cat([unit(sx, dim=1), unit(mirrored[plan.support_idx], dim=1)])
            head = fit_head(both, torch.cat([sy, sy]), n_way, 0, 0.1)
            views = unit(qx, dim=1) + unit(mirrored[plan.query_idx], dim=1)
            with torch.no_grad():
                results['protonet+mirror'].append((head(views).argmax(1) == qy).float().mean().item())
                results['protonet+mirrored-support'].append((head(qx).argmax(1) == qy).float().mean().item())
    return results


def summarise(results: dict[str, list[float]], reference: str = 'protonet') -> list[dict]:
    rows = []
    for name, accs in results.items():
        row = dict(head=name, tasks=len(accs), accuracy=mean_ci(accs).as_dict())
        if reference in results and name != reference:
            row['vs_' + reference] = mean_ci([a - b for a, b in zip(accs, results[reference], strict=True)]).as_dict()
        rows.append(row)
    return rows


def format_table(rows: list[dict], shots: int, reference: str = 'protonet') -> list[str]:
    lines = [f'| head | shots | tasks | accuracy (mean +- 95% CI over tasks) | paired difference to {reference} |',
             '|---|---:|---:|---|---|']
    for r in rows:
        diff = r.get('vs_' + reference)
        diff_text = f"{100 * diff['mean']:+.2f} +- {100 * diff['ci95']:.2f} points" if diff else '-'
        lines.append(f"| {r['head']} | {shots} | {r['tasks']} | {100 * r['accuracy']['mean']:.1f} +- "
                     f"{100 * r['accuracy']['ci95']:.1f} % | {diff_text} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--weights', required=True, help='a checkpoint or source weights (see finetune --weights)')
    parser.add_argument('--data', default='lookalike')
    parser.add_argument('--split', default='val', help="'val' to choose, 'novel' to report (once)")
    parser.add_argument('--ways', type=int, default=5)
    parser.add_argument('--shots', default='5', help='comma-separated k_shot values')
    parser.add_argument('--queries', type=int, default=15)
    parser.add_argument('--tasks', type=int, default=50)
    parser.add_argument('--heads', default=','.join(DEFAULT_HEADS), help="comma-separated heads, or 'grid'")
    parser.add_argument('--mirror', action='store_true', help='also protonet+mirror (flipped views, no training)')
    parser.add_argument('--cache', type=Path, default=Path('runs/adaptation'), help='feature cache folder')
    parser.add_argument('--out', type=Path, help='write the results as JSON')
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    specs = GRID if args.heads == 'grid' else [h.strip() for h in args.heads.split(',') if h.strip()]
    heads = [parse_head(s) for s in specs]
    try:
        shots = [int(k) for k in args.shots.split(',')]
    except ValueError:
        raise SystemExit(f'error: --shots must be comma-separated integers, got {args.shots!r}') from None
    start = time.perf_counter()
    try:
        stem = f'{Path(args.weights).stem}-{Path(args.data).name}-{args.split}.pt'
        features, dataset, origin = embed_split(args.weights, args.data, args.split, args.cache / stem)
        mirrored = embed_split(args.weights, args.data, args.split, args.cache / f'mirror-{stem}', True)[0] \
            if args.mirror else None
        out = dict(date=str(datetime.date.today()), weights=origin, data=args.data, split=args.split, n_way=args.ways,
                   n_query=args.queries, tasks=args.tasks, results={})
        print(f'# {out["date"]}, {origin}, {args.data} ({args.split}), {args.ways}-way, {args.queries} queries, '
              f'{args.tasks} tasks (episodes 0..{args.tasks - 1} of seed 0)')
        for k in shots:
            results = run_tasks(features, dataset, heads, args.ways, k, args.queries, args.tasks, mirrored=mirrored)
            rows = summarise(results)
            out['results'][k] = dict(rows=rows, per_task=results)
            print('\n'.join(format_table(rows, k)))
    except (CheckpointError, DataError) as e:
        raise SystemExit(f'error: {e}') from None
    print(f'{time.perf_counter() - start:.0f} s')
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + '\n')


if __name__ == '__main__':
    main()
