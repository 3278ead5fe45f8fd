"""The ``fewshot-lkca`` command: one subcommand per module, each with the same shape (parser, command, main)."""
import argparse
import importlib
import sys

# subcommand -> module; modules are imported only when their subcommand runs, so `--help` stays fast.
SUBCOMMANDS = {
    'pretrain': 'fewshot_lkca.pretrain',
    'finetune': 'fewshot_lkca.finetune',
    'smoke': 'fewshot_lkca.smoke',
    'evaluate': 'fewshot_lkca.evaluate',
    'export': 'fewshot_lkca.export',
    'predict': 'fewshot_lkca.predict',  # onnxruntime only: importing it loads no torch
    'adapt': 'fewshot_lkca.adapt',  # onnxruntime and numpy only, as predict
    'models': None,
}


def _models_command(args: argparse.Namespace) -> None:
    from . import list_backbones
    print('\n'.join(list_backbones()))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    names = ', '.join(SUBCOMMANDS)
    if not argv or argv[0] in ('-h', '--help'):
        print(f'usage: fewshot-lkca {{{names}}} [options]\n\nRun `fewshot-lkca COMMAND --help` for its options.')
        return
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        raise SystemExit(f"fewshot-lkca: unknown command '{command}' (choose from {names})")
    if command == 'models':
        _models_command(argparse.Namespace())
        return
    importlib.import_module(SUBCOMMANDS[command]).main(rest)


if __name__ == '__main__':
    main()
