"""``python -m fewshot_lkca.weights.ship RUN_DIR``: turn a finished pretraining run into the shipped checkpoint.

Writes ``fewshot_lkca/weights/<model>-<data>.safetensors`` (the run's best.safetensors in fp16, classifier dropped)
and its model card ``<model>-<data>.json``: the command, data, steps, wall time, machine, val accuracy and sha256.
"""
import argparse
import json
import platform
import sys
import time
from pathlib import Path

from ..files import atomic_write
from ..rundir import BEST_FILE, CONFIG_FILE, METRICS_FILE
from ..threads import cpu_name
from . import SHIPPED, ShippedWeightsError, sha256

__all__ = ['ship', 'record_benchmark', 'main']


def ship(run_dir: str | Path, data: str = 'lookalike', command: str = '') -> dict:
    """Write the shipped checkpoint of ``data`` and its model card from a finished pretraining run.

    Raises:
        ShippedWeightsError: The run is not finished, has no best checkpoint, or is of another model or data set.
    """
    import torch

    from ..checkpoint import load_checkpoint, save_checkpoint

    run_dir, entry = Path(run_dir), SHIPPED[data]
    if not (run_dir / METRICS_FILE).is_file() or not (run_dir / BEST_FILE).is_file():
        raise ShippedWeightsError(f'{run_dir} is not a finished pretraining run with {BEST_FILE}')
    config = json.loads((run_dir / CONFIG_FILE).read_text())
    metrics = json.loads((run_dir / METRICS_FILE).read_text())
    if config['model'] != entry.model or config['data'] != data or config['weights'] != 'random':
        raise ShippedWeightsError(f'{run_dir}: a shipped {data} checkpoint is {entry.model} from random '
                                  f"initialisation, this run is {config['model']} on {config['data']} from "
                                  f"{config['weights']}")
    tensors, meta = load_checkpoint(run_dir / BEST_FILE)
    half = {k: v.to(torch.float16) for k, v in tensors.items() if not k.startswith('classifier.')}
    meta = dict(meta, kind='shipped', classes=[], precision='fp16')  # the base classes' head is not shipped
    save_checkpoint(entry.path, half, meta)
    best = metrics['val']['best']
    card = dict(
        model=entry.model, data=data, split=config['split'], weights='random initialisation',
        command=command or f'make weights (python -m fewshot_lkca.pretrain --recipe {entry.recipe}, then python -m '
                           f'fewshot_lkca.weights.ship RUN_DIR)', recipe=entry.recipe,
        config=config, steps=config['steps'], best_step=best['step'], train_seconds=round(metrics['train_seconds']),
        machine=dict(cpu=cpu_name(), python=platform.python_version(), torch=torch.__version__),
        val=dict(split=config['val_split'], protocol=f"{config['val_n_way']}-way {config['val_k_shot']}-shot, "
                 f"{config['val_n_query']} queries, nearest class mean, {config['val_episodes']} episodes",
                 accuracy=best['mean'], ci95=best['ci95']),
        date=time.strftime('%Y-%m-%d'), file=entry.path.name, precision='fp16', size_bytes=entry.path.stat().st_size,
        sha256=sha256(entry.path))
    write_card(card, entry.card_path)
    return card


def write_card(card: dict, path: Path) -> None:
    """The model card three ways beside the checkpoint: ``.json`` (for the job), ``.md`` (for people) and ``.yaml``
    (the resolved pretraining config, a recipe: ``python -m fewshot_lkca.pretrain --recipe <it>`` trains it again)."""
    import yaml

    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(card, indent=2) + '\n'))
    write_card_markdown(card, path.with_suffix('.md'))
    config = {k: v for k, v in card['config'].items() if k != 'out'}
    header = f"# The resolved config that trained {card['file']} ({card['command']}).\n"
    text = header + yaml.safe_dump(config, sort_keys=False)
    atomic_write(path.with_suffix('.yaml'), lambda tmp: tmp.write_text(text))


def write_card_markdown(card: dict, path: Path) -> None:
    """The model card for people: the same facts as the JSON card beside it."""
    val = card['val']
    origin = f"`{card['model']}` trained from {card['weights']} on the {card['split']} classes of `{card['data']}`."
    lines = [f"# {card['file']}", '', origin, '', f"- command: `{card['command']}`",
             f"- training: {card['steps']} steps (best on val at step {card['best_step']}), {card['train_seconds']} s "
             f"on {card['machine']['cpu']} (torch {card['machine']['torch']}), {card['date']}",
             f"- val ({val['split']} classes, {val['protocol']}): {100 * val['accuracy']:.1f} +- "
             f"{100 * val['ci95']:.1f} %",
             f"- file: {card['precision']}, {card['size_bytes'] / 1e6:.2f} MB, sha256 `{card['sha256']}`"]
    for k, r in sorted((card.get('default_recipe') or {}).items()):
        lines.append(f"- the job's default recipe, {k}-shot: {100 * r['mean']:.1f} +- {100 * r['ci95']:.1f} % over "
                     f"{r['tasks']} {r['split']} tasks (`{r['command']}`)")
    atomic_write(path, lambda tmp: tmp.write_text('\n'.join(lines) + '\n'))


def record_benchmark(data: str, k_shot: int, result: dict) -> dict:
    """Add the main job's default recipe's accuracy over many tasks to the model card (what the job prints beside its
    one task), e.g. ``dict(mean=..., ci95=..., tasks=100, split='novel', command=...)``."""
    entry = SHIPPED[data]
    card = json.loads(entry.card_path.read_text())
    card.setdefault('default_recipe', {})[str(k_shot)] = result
    write_card(card, entry.card_path)
    return card


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog='python -m fewshot_lkca.weights.ship', description=__doc__.splitlines()[0])
    parser.add_argument('run_dir', type=Path, help='a finished pretraining run (best.safetensors, metrics.json)')
    parser.add_argument('--data', default='lookalike', choices=sorted(SHIPPED))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        card = ship(args.run_dir, args.data)
    except (ShippedWeightsError, OSError, KeyError) as e:
        raise SystemExit(f'error: {e}') from None
    print(f"{card['file']}: {card['size_bytes'] / 1e6:.2f} MB, val {100 * card['val']['accuracy']:.1f} +- "
          f"{100 * card['val']['ci95']:.1f} % at step {card['best_step']} of {card['steps']}, sha256 {card['sha256']}")


if __name__ == '__main__':
    main()
