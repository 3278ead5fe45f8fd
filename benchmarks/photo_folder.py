"""A new user's folder of real images, end to end: `finetune --data FOLDER` with no options, then `predict` of the
int8 model on images of the same classes it never saw, against the run's own estimate.

Each task writes ``--ways`` class folders of ``--shots`` images (PNG, JPEG and WebP in turn, plus one unreadable
file) drawn from a real set bundled with a package, runs the two commands as a user would (separate processes,
default options, offline), and scores ``--queries`` unseen images per class with the int8 ONNX model::

    python -m benchmarks.photo_folder [--data digits] [--tasks 5] [--ways 5] [--shots 8] [--weights auto]
        [--json benchmarks/results/photo_folder.json]

Data: ``digits`` (scikit-learn's 8x8 handwritten digits, 10 classes; the second half of the samples, the first is
what `benchmarks.feature_survival --split val` chooses on) and ``lfw`` (scikit-image's faces vs non-faces, 2-way).
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import machine
from benchmarks.feature_survival import load_images

FORMATS = ('png', 'jpg', 'webp')


def write_task(images: np.ndarray, labels: np.ndarray, classes: list[int], shots: int, queries: int,
               rng: np.random.Generator, root: Path) -> list[tuple[Path, str]]:
    """Class folders of ``shots`` images each under ``root/train`` (and a broken file); returns the held-out images
    written under ``root/unseen`` with their class names."""
    unseen = []
    for c in classes:
        index = rng.permutation(np.flatnonzero(labels == c))[:shots + queries]
        name = f'class_{c}'
        for part, picks in (('train', index[:shots]), ('unseen', index[shots:])):
            folder = root / part / name
            folder.mkdir(parents=True)
            for j, i in enumerate(picks):
                path = folder / f'{j}.{FORMATS[j % len(FORMATS)]}'
                # small real images, upscaled as a phone would store them (the job resizes to the model's size)
                Image.fromarray(images[i].transpose(1, 2, 0)).resize((96, 96), Image.BICUBIC).save(path)
                if part == 'unseen':
                    unseen.append((path, name))
    (root / 'train' / f'class_{classes[0]}' / 'notes.jpg').write_text('not an image')
    return unseen


def run_task(root: Path, weights: str, unseen: list[tuple[Path, str]]) -> dict:
    run = root / 'run'
    cmd = [sys.executable, '-m', 'fewshot_lkca.finetune', '--data', str(root / 'train'), '--out', str(run),
           '--no-progress'] + ([] if weights == 'auto' else ['--weights', weights])
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f'finetune failed: {done.stderr.strip().splitlines()[-1:]}')
    start_line = next((line for line in done.stdout.splitlines() if line.startswith('starting point')), '')
    top1 = {}
    for model in ('model.int8.onnx', 'model.onnx'):
        pred = subprocess.run([sys.executable, '-m', 'fewshot_lkca.predict', str(run / model),
                               *[str(p) for p, _ in unseen], '--json'], capture_output=True, text=True)
        top1[model] = [r['top'][0]['label'] for r in json.loads(pred.stdout)['results']]
    names = [name for _, name in unseen]
    accuracy = float(np.mean([a == b for a, b in zip(top1['model.int8.onnx'], names, strict=True)]))
    estimate = json.loads((run / 'metrics.json').read_text())['estimate']
    low, high = estimate['ci95']
    return dict(unseen_accuracy=accuracy, unseen=len(unseen), estimate=estimate['accuracy'], estimate_ci95=[low, high],
                inside_estimate=low <= accuracy <= high, starting_point=start_line,
                fp32_accuracy=float(np.mean([a == b for a, b in zip(top1['model.onnx'], names, strict=True)])),
                int8_agreement=float(np.mean([a == b for a, b in zip(*top1.values(), strict=True)])))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data', default='digits', choices=('digits', 'lfw'))
    parser.add_argument('--tasks', type=int, default=5)
    parser.add_argument('--ways', type=int, default=5)
    parser.add_argument('--shots', type=int, default=8)
    parser.add_argument('--queries', type=int, default=40, help='unseen images per class')
    parser.add_argument('--weights', default='auto', help="the job's --weights ('auto': its default)")
    parser.add_argument('--json', type=Path)
    args = parser.parse_args(argv)
    images, labels = load_images(args.data, 'novel', Path(), 0)
    images, labels = images.numpy(), labels.numpy()
    ways = min(args.ways, len(np.unique(labels)))
    rng = np.random.default_rng(0)
    records = []
    print(f'# {machine()}: {args.data}, {ways} classes x {args.shots} images, --weights {args.weights}')
    for task in range(args.tasks):
        classes = sorted(rng.choice(np.unique(labels), ways, replace=False).tolist())
        with tempfile.TemporaryDirectory() as tmp:
            unseen = write_task(images, labels, classes, args.shots, args.queries, rng, Path(tmp))
            record = dict(task=task, classes=classes, **run_task(Path(tmp), args.weights, unseen))
        records.append(record)
        print(f"task {task}: unseen {100 * record['unseen_accuracy']:.1f} % of {record['unseen']}, estimate "
              f"{100 * record['estimate']:.1f} % ({100 * record['estimate_ci95'][0]:.0f}-"
              f"{100 * record['estimate_ci95'][1]:.0f} %), inside: {record['inside_estimate']}; int8 agrees with fp32 "
              f"on {100 * record['int8_agreement']:.1f} %", flush=True)
    mean = float(np.mean([r['unseen_accuracy'] for r in records]))
    inside = sum(r['inside_estimate'] for r in records)
    agree = float(np.mean([r['int8_agreement'] for r in records]))
    print(f'mean unseen accuracy {100 * mean:.1f} % over {len(records)} tasks (int8; fp32 '
          f'{100 * np.mean([r["fp32_accuracy"] for r in records]):.1f} %, int8 agreement {100 * agree:.1f} %); inside '
          f'the estimate: {inside} of {len(records)}; {records[0]["starting_point"]}')
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != 'json'}
        args.json.write_text(json.dumps(dict(meta=dict(machine(), **settings), records=records, mean=mean),
                                        indent=1) + '\n')


if __name__ == '__main__':
    main()
