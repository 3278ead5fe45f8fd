"""``python -m fewshot_lkca.export RUN_DIR --format onnx onnx-int8``: the exporter's command line."""
import argparse
import logging
import sys
from pathlib import Path

from ..threads import add_threads_argument, set_threads
from .formats import DEFAULT_FORMATS, FORMATS, ExportError
from .run import export_run

__all__ = ['build_parser', 'main']


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    table = '\n'.join(f'  {name:<16} {f.file:<18} {f.what}' for name, f in FORMATS.items())
    parser = parser or argparse.ArgumentParser(
        prog='fewshot-lkca export', description='Export a fine-tuned run for deployment, each artifact checked.',
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=f'formats:\n{table}')
    parser.add_argument('run_dir', type=Path, metavar='RUN_DIR', help='a finished fine-tuning run directory')
    parser.add_argument('--format', nargs='+', dest='formats', default=list(DEFAULT_FORMATS), metavar='FORMAT',
                        help=f'one or more of {", ".join(FORMATS)} (default: {" ".join(DEFAULT_FORMATS)})')
    add_threads_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from ..checkpoint import CheckpointError
    from ..config import ConfigError
    from ..console import quiet_console
    from ..errors import DataError
    from ..models.factory import BackboneError
    from .int8 import QuantizationError

    try:
        set_threads(args.threads)
        with quiet_console():
            export_run(args.run_dir, args.formats)
    except (ExportError, CheckpointError, ConfigError, DataError, BackboneError, QuantizationError) as e:
        raise SystemExit(f'error: {e}') from None

