"""``python -m fewshot_lkca.weights.ship RUN_DIR``: turn a finished pretraining run into the shipped checkpoint.

Writes ``fewshot_lkca/weights/<model>-<data>.safetensors`` (the run's best.safetensors in fp16; the base classes'
classifier dropped, a distilled model keeps its ImageNet classifier) and its model card ``<model>-<data>.json``: the
command, data, steps, wall time, machine, val figures and sha256; for a distilled model also the teacher, the source
weights and the photos, each with its sha256 or licence.
"""
import argparse
import json
import platform
import re
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
    distilled = entry.method == 'distill'
    fits = config['model'] == entry.model and config['method'] == entry.method and (
        distilled or (config['data'] == data and config['weights'] == 'random'))
    if not fits:
        want = 'distilled from an ImageNet teacher' if distilled else f'on {data} from random initialisation'
        raise ShippedWeightsError(f"{run_dir}: a shipped {data} checkpoint is {entry.model} {want}, this run is "
                                  f"{config['model']} ({config['method']}) on {config['data']} from "
                                  f"{config['weights']}")
    tensors, meta = load_checkpoint(run_dir / BEST_FILE)
    # the base classes' head is not shipped; a distilled model keeps the teacher's classes (ImageNet's)
    half = {k: v.to(torch.float16) for k, v in tensors.items() if distilled or not k.startswith('classifier.')}
    meta = dict(meta, kind='shipped', classes=[], precision='fp16')
    save_checkpoint(entry.path, half, meta)
    best = metrics['val']['best']
    if distilled:
        origin = distill_origin(config)
        protocol = f"top-1 agreement with the teacher, {metrics['val']['views']} views of held-out photos"
    else:
        origin = dict(weights='random initialisation')
        protocol = (f"{config['val_n_way']}-way {config['val_k_shot']}-shot, {config['val_n_query']} queries, nearest "
                    f"class mean, {config['val_episodes']} episodes")
    card = dict(
        model=entry.model, data=data, split=config['split'], **origin,
        command=command or f'{entry.make} (python -m fewshot_lkca.pretrain --recipe {entry.recipe}, then python -m '
                           f'fewshot_lkca.weights.ship RUN_DIR --data {data})', recipe=entry.recipe,
        config=config, steps=config['steps'], best_step=best['step'], train_seconds=round(metrics['train_seconds']),
        machine=dict(cpu=cpu_name(), python=platform.python_version(), torch=torch.__version__),
        val=dict(split=metrics['val']['split'] if distilled else config['val_split'], protocol=protocol,
                 accuracy=best['mean'], ci95=best['ci95'], **{k: best[k] for k in ('cosine', 'top5') if k in best}),
        date=time.strftime('%Y-%m-%d'), file=entry.path.name, precision='fp16', size_bytes=entry.path.stat().st_size,
        sha256=sha256(entry.path))
    write_card(card, entry.card_path)
    return card


def distill_origin(config: dict) -> dict:
    """Where a distilled model came from: the student's start, the teacher, and the photos (per folder: count and
    the licences its copyright file states), each file with its sha256."""
    from ..pretrain.distill import IMAGE_SUFFIXES

    def file_facts(path: str) -> dict:
        p = Path(path)
        return dict(path=p.name, sha256=sha256(p)) if p.is_file() else dict(path=path)

    photos = []
    root = Path(config['data'])
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        count = sum(1 for f in folder.rglob('*') if f.suffix.lower() in IMAGE_SUFFIXES)
        text = (folder / 'copyright').read_text(errors='replace') if (folder / 'copyright').is_file() else ''
        # machine-readable (DEP-5) 'License: X' lines, or prose 'Licensed under X License.'
        licences = sorted({m.strip() for m in re.findall(r'^License:\s*(\S.*)$', text, re.M)}
                          | {m.strip() for m in re.findall(r'Licensed under (.+? License)', text)})
        photos.append(dict(source=f'Debian package {folder.name}', images=count, licences=licences))
    return dict(
        weights=f"transplant of {config['teacher']} ImageNet weights (timm's {config['teacher']}.in1k)",
        start=file_facts(config['weights']),
        teacher=dict(name=config['teacher'], **file_facts(config['teacher_weights'] or ''),
                     licence='apache-2.0 (timm pretrained_cfg)'),
        photos=photos)


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
    if 'teacher' in card:
        teacher, start = card['teacher'], card['start']
        origin = (f"`{card['model']}` (pad_type {card['config']['pad_type'] or 'symmetric'}) distilled from "
                  f"`{teacher['name']}` ({teacher['path']}, sha256 `{teacher.get('sha256', '?')}`, licence "
                  f"{teacher['licence']}), starting from its {card['weights']} ({start['path']}).\n\nPhotos (only "
                  'the weights are shipped, no image): ' + '; '.join(
                      f"{p['source']}: {p['images']} images ({', '.join(p['licences']) or 'licence not stated'})"
                      for p in card['photos']))
    lines = [f"# {card['file']}", '', origin, '', f"- command: `{card['command']}`",
             f"- training: {card['steps']} steps (best on val at step {card['best_step']}), {card['train_seconds']} s "
             f"on {card['machine']['cpu']} (torch {card['machine']['torch']}), {card['date']}",
             f"- val ({val['split']}{'' if 'teacher' in card else ' classes'}, {val['protocol']}): "
             f"{100 * val['accuracy']:.1f} +- {100 * val['ci95']:.1f} %"
             + (f", feature cosine {val['cosine']:.3f}" if 'cosine' in val else ''),
             f"- file: {card['precision']}, {card['size_bytes'] / 1e6:.2f} MB, sha256 `{card['sha256']}`"]
    for k, r in sorted((card.get('default_recipe') or {}).items()):
        lines.append(f"- the job's default recipe, {k}-shot: {100 * r['mean']:.1f} +- {100 * r['ci95']:.1f} % over "
                     f"{r['tasks']} {r['split']} tasks (`{r['command']}`)")
    lines += [f"- {e['text']} (`{e['command']}`)" for e in card.get('evidence', {}).values()]
    atomic_write(path, lambda tmp: tmp.write_text('\n'.join(lines) + '\n'))


def record_benchmark(data: str, k_shot: int, result: dict) -> dict:
    """Add the main job's default recipe's accuracy over many tasks to the model card (what the job prints beside its
    one task), e.g. ``dict(mean=..., ci95=..., tasks=100, split='novel', command=...)``."""
    entry = SHIPPED[data]
    card = json.loads(entry.card_path.read_text())
    card.setdefault('default_recipe', {})[str(k_shot)] = result
    write_card(card, entry.card_path)
    return card


def record_evidence(data: str, key: str, text: str, command: str) -> dict:
    """Add (or replace) one measured line of evidence on the model card, with the command that measured it."""
    entry = SHIPPED[data]
    card = json.loads(entry.card_path.read_text())
    card.setdefault('evidence', {})[key] = dict(text=text, command=command, date=time.strftime('%Y-%m-%d'))
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
