"""Save a contact sheet of the look-alike set: the 10 novel classes, then a few base classes.

    python scripts/lookalike_contact_sheet.py docs/lookalike_contact_sheet.png
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from fewshot_lkca.data.lookalike import contact_sheet, lookalike_classes


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("output", type=Path, help="PNG path, e.g. docs/lookalike_contact_sheet.png")
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--base-rows", type=int, default=6, help="base classes shown after the novel ones")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _command(args: argparse.Namespace) -> None:
    base = lookalike_classes("base")
    shown = lookalike_classes("novel") + base[:: max(1, len(base) // args.base_rows)][: args.base_rows]
    sheet = contact_sheet(shown, args.per_class, args.image_size, args.seed)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    # An adaptive 256-colour palette keeps the noisy renders small (under 300 kB) and looks the same.
    Image.fromarray(sheet).quantize(256, method=Image.Quantize.MEDIANCUT).save(args.output, optimize=True)
    print(f"wrote {args.output} ({args.output.stat().st_size // 1024} kB, {len(shown)} classes)")


def main(argv: Sequence[str] | None = None) -> None:
    _command(_parser().parse_args(argv))


if __name__ == "__main__":
    main()
