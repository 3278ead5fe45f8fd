"""Accuracy of each fine-tuning recipe over many few-shot tasks, from the same starting point: the main job itself.

One task = one draw of ``n_way`` classes of ``--split`` and their support set (the task seed); each recipe runs
``python -m fewshot_lkca.finetune`` on the same tasks (in process, one code path with the job), and each task's
accuracy is the mean over its held-out query draws. The table gives the mean over tasks with a 95% CI across tasks,
each recipe's difference to ProtoNet and to the linear probe *on the same tasks* (paired, so task difficulty
cancels), and how often the guard reverted to the prototypes::

    python -m benchmarks.finetune_accuracy --split val --tasks 50           # choose: val classes only
    python -m benchmarks.finetune_accuracy --split novel --tasks 100        # report, once
    python -m benchmarks.finetune_accuracy --recipes lean_5shot,protonet --tasks 5 --set augment=none

The starting point is the main job's (``weights=auto``: the shipped checkpoint for the look-alike set); pass
``--set`` overrides (``key=value``) to change it or any recipe field for every recipe.
"""
import argparse
import datetime
import json
import time
from pathlib import Path

import torch

from fewshot_lkca.config import ConfigError, FinetuneConfig, apply_overrides, load_recipe, parse_override
from fewshot_lkca.finetune import finetune_command
from fewshot_lkca.metrics import mean_ci

RECIPES = ('default', 'protonet', 'linear_probe', 'lean_5shot')


REFERENCES = ('protonet', 'linear_probe')


def run_tasks(recipes: list[str], tasks: int, overrides: dict[str, str], out: Path, progress: bool = False,
              first_task: int = 0) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Per-recipe list of per-task accuracies (mean over that task's evaluation episodes), and guard reverts."""
    results, reverted = {r: [] for r in recipes}, {r: 0 for r in recipes}
    for task in range(first_task, first_task + tasks):
        for recipe in recipes:
            base = FinetuneConfig() if recipe == 'default' else load_recipe(recipe)  # 'default': the job's own
            cfg = apply_overrides(base, overrides, source='--set', from_text=True)
            cfg = apply_overrides(cfg, dict(seed=task, out=str(out / f'{recipe}-task{task}'), export=[],
                                            protocol='episode'),
                                  source='bench')  # accuracy only: no artifacts
            metrics = finetune_command(cfg.validate(), overwrite=True, progress=progress, log=lambda *_: None)
            results[recipe].append(metrics['episodes']['mean'])
            reverted[recipe] += int((metrics.get('guard') or {}).get('kept') == 'prototypes')
    return results, reverted


def summarise(results: dict[str, list[float]], reverted: dict[str, int] | None = None) -> list[dict]:
    rows = []
    for recipe, accs in results.items():
        row = dict(recipe=recipe, tasks=len(accs), accuracy=mean_ci(accs).as_dict(),
                   guard_reverted=(reverted or {}).get(recipe, 0))
        for reference in REFERENCES:
            if reference in results and recipe != reference:
                diffs = [a - b for a, b in zip(accs, results[reference], strict=True)]
                row['vs_' + reference] = mean_ci(diffs).as_dict()
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ['| recipe | tasks | accuracy (mean +- 95% CI over tasks) | vs protonet (paired) '
             '| vs linear_probe (paired) | guard kept the prototypes |', '|---|---:|---|---|---|---:|']
    for r in rows:
        acc = r['accuracy']
        diffs = []
        for reference in REFERENCES:
            diff = r.get('vs_' + reference)
            diffs.append(f"{100 * diff['mean']:+.1f} +- {100 * diff['ci95']:.1f} points" if diff else '-')
        lines.append(f"| {r['recipe']} | {r['tasks']} | {100 * acc['mean']:.1f} +- {100 * acc['ci95']:.1f} % | "
                     f"{diffs[0]} | {diffs[1]} | {r['guard_reverted']} |")
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--recipes', default=','.join(RECIPES))
    parser.add_argument('--tasks', type=int, default=20)
    parser.add_argument('--split', default='novel', help="'val' to choose defaults, 'novel' to report (once)")
    parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                        help='override for every recipe, e.g. --set weights=random')
    parser.add_argument('--runs', type=Path, default=Path('runs/finetune_accuracy'), help='run directories')
    parser.add_argument('--out', type=Path, help='write the results as JSON')
    args = parser.parse_args(argv)
    try:
        overrides = dict(split=args.split, **dict(parse_override(s) for s in args.set))
        recipes = [r.strip() for r in args.recipes.split(',') if r.strip()]
        start = time.perf_counter()
        results, reverted = run_tasks(recipes, args.tasks, overrides, args.runs)
    except ConfigError as e:
        raise SystemExit(f'error: {e}') from None
    rows = summarise(results, reverted)
    print(f'# {datetime.date.today()}, torch {torch.__version__}, {args.tasks} tasks, overrides {overrides or "none"}, '
          f'{time.perf_counter() - start:.0f} s')
    print(format_table(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(rows=rows, per_task=results, overrides=overrides), indent=2) + '\n')


if __name__ == '__main__':
    main()
