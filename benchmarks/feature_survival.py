"""How much of the ImageNet features survive the transplant into LKCA-MobileNet?

Frozen features, nearest-class-mean (prototype) classification, 5-way 1-shot and 5-shot, on the Omniglot
*evaluation* alphabets (659 characters x 20 drawers; final numbers only, nothing is tuned on them):

    python -m benchmarks.feature_survival [--episodes 600] [--img-size 224]

Compares a randomly initialised `lkca_mobilenet`, the transplanted one, its twins, and the source
`tf_mobilenetv3_small_100`. Needs ../shared (the Omniglot npz files and the ImageNet weights).
"""
import argparse
import datetime
import platform
import time
from pathlib import Path

import timm
import torch

import fewshot_lkca
from fewshot_lkca.data.omniglot import OmniglotDataset
from fewshot_lkca.metrics import mean_ci, prototype_episode_accuracies

SHARED = Path(__file__).resolve().parents[2] / 'shared'

# (row label, model name, transplant the ImageNet weights?, extra model kwargs)
ROWS = [
    ('lkca_mobilenet, random init', 'lkca_mobilenet', False, {}),
    ('lkca_mobilenet, transplanted', 'lkca_mobilenet', True, {}),
    ("lkca_mobilenet, transplanted, pad_type='same'", 'lkca_mobilenet', True, dict(pad_type='same')),
    ("lkca_mobilenet_se, transplanted, pad_type='same' (exact copy of the source)", 'lkca_mobilenet_se', True,
     dict(pad_type='same')),
    ('lkca_mobilenet_dw3, transplanted (5x5 kernels cropped to 3x3)', 'lkca_mobilenet_dw3', True, {}),
    ('tf_mobilenetv3_small_100 (the source)', 'tf_mobilenetv3_small_100', True, {}),
]


def load_images(root: Path, num_classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation-alphabet images of ``num_classes`` characters (a seeded draw) as (N, 3, 105, 105) uint8, labels."""
    data = OmniglotDataset(root, 'novel')
    targets = torch.as_tensor(data.targets)
    picked = torch.randperm(len(data.classes), generator=torch.Generator().manual_seed(seed))[:num_classes]
    index = torch.isin(targets, picked).nonzero().flatten().tolist()
    images = torch.stack([torch.from_numpy(data.load(i)) for i in index]).permute(0, 3, 1, 2)
    return images, targets[index]


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
    parser.add_argument('--episodes', type=int, default=600)
    parser.add_argument('--img-size', type=int, default=224, help='the models\' pretrained input size')
    parser.add_argument('--queries', type=int, default=15)
    parser.add_argument('--classes', type=int, default=200,
                        help='evaluation characters drawn (of 659); all 659 at 224 px take ~4 min per row here')
    parser.add_argument('--shared', type=Path, default=SHARED)
    args = parser.parse_args(argv)
    weights = args.shared / 'weights' / 'tf_mobilenetv3_small_100.in1k.pth'
    omniglot = args.shared / 'data' / 'omniglot'
    if not weights.is_file() or not omniglot.is_dir():
        raise SystemExit(f'needs {weights} and {omniglot} (../shared)')
    images, labels = load_images(omniglot, args.classes)
    print(f'# {datetime.date.today()}, {platform.machine()} CPU x{torch.get_num_threads()} threads, torch '
          f'{torch.__version__}, timm {timm.__version__}: Omniglot evaluation alphabets, {len(labels)} images, '
          f'{len(labels.unique())} characters, '
          f'{args.img_size} px, frozen pre-logits features, nearest class mean, {args.episodes} episodes, '
          f'{args.queries} queries/class')
    print('| backbone | 5-way 1-shot | 5-way 5-shot |\n|---|---|---|')
    for label, name, transplant, kwargs in ROWS:
        start = time.perf_counter()
        torch.manual_seed(0)
        model = fewshot_lkca.create_backbone(name, weights=weights if transplant else None, num_classes=0, **kwargs)
        feats = extract(model, images, args.img_size)
        cells = [mean_ci(prototype_episode_accuracies(feats, labels, 5, k, args.queries, args.episodes))
                 for k in (1, 5)]
        print(f'| {label} | {cells[0]} | {cells[1]} |  <!-- {time.perf_counter() - start:.0f} s -->', flush=True)


if __name__ == '__main__':
    main()
