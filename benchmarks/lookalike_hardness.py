"""How hard is the look-alike set? Nearest-prototype accuracy on its novel classes with three feature sets.

1. raw pixels (the native image, flattened),
2. frozen ImageNet features of timm `tf_mobilenetv3_small_100` (weights from ../shared/weights),
3. the same backbone after a short supervised pretraining on the base classes (cross-entropy).

Features are computed once per image; 5-way 1-shot and 5-shot episodes (15 queries per class) then run on
the feature cache. Prototypes are class means of L2-normalised features; a query takes the nearest one.
Reported: mean accuracy over the episodes with a 95% confidence interval (1.96 * std / sqrt(n)).

Run from the project root (5-10 minutes on 2 CPU cores, most of it the base pretraining):

    python -m benchmarks.lookalike_hardness
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fewshot_lkca.data import EpisodeSampler, LookalikeDataset, eval_transform

WEIGHTS = Path(__file__).resolve().parents[1].parent / "shared" / "weights" / "tf_mobilenetv3_small_100.in1k.pth"


def nearest_prototype_accuracy(features: np.ndarray, sampler: EpisodeSampler, episodes: int) -> tuple[float, float]:
    """Mean accuracy and 95% CI half-width over `episodes` episodes drawn by `sampler` from cached features."""
    features = features / np.linalg.norm(features, axis=1, keepdims=True).clip(1e-12)
    accuracies = []
    for i in range(episodes):
        plan = sampler.plan(i)
        support, query = features[plan.support_idx], features[plan.query_idx]
        support_y, query_y = np.array(plan.support_y), np.array(plan.query_y)
        prototypes = np.stack([support[support_y == c].mean(0) for c in range(sampler.n_way)])
        distances = ((query[:, None, :] - prototypes[None]) ** 2).sum(-1)
        accuracies.append(float((distances.argmin(1) == query_y).mean()))
    accuracies = np.array(accuracies)
    return float(accuracies.mean()), float(1.96 * accuracies.std() / math.sqrt(len(accuracies)))


def render_all(dataset: LookalikeDataset) -> np.ndarray:
    return np.stack([dataset.load(i) for i in range(len(dataset))])


def create_backbone(num_classes: int = 1000) -> torch.nn.Module:
    import timm

    if not WEIGHTS.is_file():
        raise SystemExit(f"ImageNet weights not found at {WEIGHTS}")
    model = timm.create_model(
        "tf_mobilenetv3_small_100", pretrained=True, pretrained_cfg_overlay=dict(file=str(WEIGHTS))
    )
    if num_classes != 1000:
        model.reset_classifier(num_classes)
    return model


@torch.no_grad()
def embed(model: torch.nn.Module, images: np.ndarray, size: int | None, batch_size: int = 128) -> np.ndarray:
    """Pre-logit features of uint8 images, preprocessed by the model's pretrained cfg (at `size` if given)."""
    model.eval()
    transform = eval_transform(model, size=size)
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([transform(x) for x in images[start : start + batch_size]])
        out.append(model.forward_head(model.forward_features(batch), pre_logits=True).numpy())
    return np.concatenate(out)


def pretrain_on_base(args: argparse.Namespace) -> torch.nn.Module:
    """Cross-entropy training of the ImageNet backbone on the base classes at low resolution."""
    base = LookalikeDataset("base", args.base_images, args.image_size, seed=args.seed + 1)
    start = time.time()
    images = render_all(base)
    labels = torch.tensor(base.targets)
    print(f"  rendered {len(images)} base images in {time.time() - start:.0f} s", flush=True)
    model = create_backbone(len(base.classes))
    transform = eval_transform(model, size=args.train_size)
    x_all = torch.stack([transform(x) for x in images])
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps = args.epochs * (len(x_all) // args.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=steps, pct_start=0.15)
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    for epoch in range(args.epochs):
        order = torch.randperm(len(x_all), generator=generator)
        correct = seen = 0
        for b in range(len(x_all) // args.batch_size):
            idx = order[b * args.batch_size : (b + 1) * args.batch_size]
            x, y = x_all[idx], labels[idx]
            flip = torch.rand(len(x), generator=generator) < 0.5  # mirror images are the same object
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        accuracy = correct / seen
        print(
            f"  epoch {epoch + 1}/{args.epochs}: train accuracy {accuracy:.3f} ({time.time() - start:.0f} s)",
            flush=True,
        )
    return model


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--images-per-class", type=int, default=60, help="novel images per class")
    parser.add_argument("--image-size", type=int, default=96, help="rendered side in pixels")
    parser.add_argument("--train-size", type=int, default=96, help="input side for base pretraining")
    parser.add_argument("--base-images", type=int, default=120, help="base images per class for pretraining")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-pretrain", action="store_true", help="only raw pixels and ImageNet features")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser


def _command(args: argparse.Namespace) -> dict:
    start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    novel = LookalikeDataset("novel", args.images_per_class, args.image_size, seed=args.seed)
    images = render_all(novel)
    features = {"raw pixels": images.reshape(len(images), -1).astype(np.float32) / 255.0}
    features["ImageNet MobileNetV3-Small (frozen, 224 px)"] = embed(create_backbone(), images, size=None)
    if not args.skip_pretrain:
        model = pretrain_on_base(args)
        features[f"base-pretrained MobileNetV3-Small ({args.train_size} px)"] = embed(model, images, args.train_size)
    results = {}
    print(f"\n| features | 5-way 1-shot | 5-way 5-shot |  ({args.episodes} episodes, 15 queries, 95% CI)")
    print("| --- | --- | --- |")
    for name, feats in features.items():
        row = {}
        for k_shot in (1, 5):
            sampler = EpisodeSampler(novel, n_way=5, k_shot=k_shot, n_query=15, seed=args.seed)
            mean, ci = nearest_prototype_accuracy(feats, sampler, args.episodes)
            row[f"{k_shot}-shot"] = {"mean": mean, "ci95": ci}
        results[name] = row
        print(f"| {name} | {100 * row['1-shot']['mean']:.1f} ± {100 * row['1-shot']['ci95']:.1f} % "
              f"| {100 * row['5-shot']['mean']:.1f} ± {100 * row['5-shot']['ci95']:.1f} % |")  # fmt: skip
    print(f"\ntotal time {(time.time() - start) / 60:.1f} min")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


def main(argv: Sequence[str] | None = None) -> None:
    _command(_parser().parse_args(argv))


if __name__ == "__main__":
    main()
