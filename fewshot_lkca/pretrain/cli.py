"""``python -m fewshot_lkca.pretrain``: the command line of base-class pretraining."""
import argparse
import logging
import os
import sys

from ..checkpoint import CheckpointError
from ..config import ConfigError, config_for_command, parse_cli
from ..console import quiet_console
from ..errors import DataError, os_error
from ..models.factory import BackboneError
from ..rundir import RunError, add_run_arguments
from ..threads import set_threads
from .config import PretrainConfig
from .loop import pretrain_command

__all__ = ['build_parser', 'main']


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog='fewshot-lkca pretrain', description='Base-class pretraining: the starting point of few-shot fine-tuning.',
        epilog='Any PretrainConfig field can be set with --key=value, e.g. --steps=1000 --batch_size=128. '
               'Several processes: torchrun --nproc_per_node N -m fewshot_lkca.pretrain [options].')
    parser.add_argument('--data', help='data set card name (lookalike, omniglot, ...) or an image folder with base.txt')
    parser.add_argument('--method', help="'supervised', 'episodic' (prototypical) or 'both'")
    parser.add_argument('--recipe', help='pretraining recipe in recipes/ (pretrain_*) or a YAML file')
    parser.add_argument('--model', help='backbone name (timm)')
    parser.add_argument('--weights', help="'random' (default), 'imagenet', or a checkpoint to continue from")
    parser.add_argument('--steps', type=int)
    add_run_arguments(parser, 'runs/<data>-<model>-pretrain-<method>-seed<seed>')
    return parser


def _parse(argv: list[str]) -> tuple[argparse.Namespace, dict[str, str]]:
    return parse_cli(build_parser(), argv, named=('data', 'method', 'model', 'weights', 'steps', 'out', 'seed'))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, overrides = _parse(argv)
        cfg = config_for_command(args.recipe, overrides, args.resume, PretrainConfig)
        set_threads(args.threads)
        with quiet_console():
            pretrain_command(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    except (ConfigError, RunError, CheckpointError, BackboneError, DataError) as e:
        if int(os.environ.get('RANK', 0)) != 0:  # under torchrun every rank fails alike: rank 0 says why
            raise SystemExit(1) from None
        raise SystemExit(f'error: {e}') from None
    except KeyboardInterrupt:  # before training started (training saves and says how to resume)
        raise SystemExit('interrupted before training started: nothing to resume') from None
    except OSError as e:  # a full disk, an unwritable --out, a folder under a file
        raise SystemExit(f'error: {os_error(e)}') from None

