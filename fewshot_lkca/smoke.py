"""A real forward/backward smoke run of a backbone, memory-lean style: ``python -m fewshot_lkca.smoke``.

Builds the model, freezes the stem and first stages, turns on gradient checkpointing, and takes a few SGD steps on
a fixed batch of random images, printing the loss (it must fall) and the parameter counts.
"""
import argparse
import time

import torch

from .config import ConfigError
from .freezing import freeze_groups
from .models import create_backbone
from .threads import add_threads_argument, set_threads


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog='fewshot-lkca smoke', description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='lkca_mobilenet', help='timm model name (default: %(default)s)')
    parser.add_argument('--weights', default=None, help='local source state_dict to transplant (optional)')
    parser.add_argument('--batch-size', type=int, default=2)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--freeze-stages', type=int, default=2, help='stages frozen after the stem')
    parser.add_argument('--seed', type=int, default=0)
    add_threads_argument(parser)
    return parser


def smoke_command(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    model = create_backbone(args.model, weights=args.weights, num_classes=5)
    freeze_groups(model, 1 + args.freeze_stages)  # the stem, then stages
    model.set_grad_checkpointing(True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    y = torch.arange(args.batch_size) % 5
    losses = []
    start = time.perf_counter()
    for _ in range(args.steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in params)
    print(f'{args.model}: {total / 1e6:.2f} M parameters, {trainable / 1e6:.2f} M trainable '
          f'(stem + {args.freeze_stages} stages frozen, gradient checkpointing on)')
    print(f'{args.steps} steps at batch {args.batch_size}, {args.img_size} px: loss '
          + ' -> '.join(f'{v:.3f}' for v in losses) + f' ({seconds / args.steps * 1000:.0f} ms/step)')
    if not all(torch.isfinite(torch.tensor(losses))) or losses[-1] >= losses[0]:
        raise SystemExit('smoke run failed: the loss did not fall on a fixed batch')
    return dict(losses=losses, trainable=trainable, total=total)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        set_threads(args.threads)
    except ConfigError as e:
        raise SystemExit(f'error: {e}') from None
    smoke_command(args)


if __name__ == '__main__':
    main()
