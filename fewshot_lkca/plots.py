"""PNG figures of a run: the confusion matrix and the training curve (matplotlib, the 'plots' extra).

Each function returns False, drawing nothing, when matplotlib is not installed: the metrics stand without pictures.
"""
import json
from pathlib import Path

from .files import atomic_write

__all__ = ['plot_confusion', 'plot_training_curve']


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use('Agg')  # files only: no display on a device or in CI
    import matplotlib.pyplot as plt

    return plt


def _save(fig, plt, path: Path) -> None:
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=100, format='png'))
    plt.close(fig)


MAX_ANNOTATED = 30  # classes up to which the confusion matrix shows its counts (a 120-class one took 1.7 GB)
MAX_NAMED = 80  # classes up to which its axes name them


def plot_confusion(confusion: list[list[int]], names: list[str], path: Path) -> bool:
    """The confusion matrix (rows: true class, columns: predicted) with its counts."""
    plt = _pyplot()
    if plt is None:
        return False
    n = len(names)
    side = 0.6 * min(n, MAX_ANNOTATED)  # many classes: a picture of the same size, without the counts
    fig, ax = plt.subplots(figsize=(1.2 + side, 1.0 + side))
    ax.imshow(confusion, cmap='Blues')
    if n <= MAX_NAMED:
        ax.set_xticks(range(n), names, rotation=60, ha='right', fontsize=7 if n <= MAX_ANNOTATED else 4)
        ax.set_yticks(range(n), names, fontsize=7 if n <= MAX_ANNOTATED else 4)
    ax.set_xlabel('predicted')
    ax.set_ylabel('true')
    top = max(max(row) for row in confusion) or 1
    for i, row in enumerate(confusion if n <= MAX_ANNOTATED else []):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha='center', va='center', fontsize=7, color='white' if v > top / 2 else 'black')
    _save(fig, plt, path)
    return True


def plot_training_curve(log_file: Path, path: Path) -> bool:
    """Loss (left), batch accuracy and, where logged, val accuracy with its 95% CI (right) of a log.jsonl."""
    plt = _pyplot()
    if plt is None:
        return False
    records = [json.loads(line) for line in Path(log_file).read_text().splitlines() if line.strip()]
    if not records:
        return False
    steps = [r['step'] for r in records]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.plot(steps, [r['loss'] for r in records], lw=0.8)
    left.set(xlabel='step', ylabel='training loss')
    right.plot(steps, [r['batch_acc'] for r in records], lw=0.8, alpha=0.6, label='training batch')
    val = [r for r in records if 'val_acc' in r]
    if val:
        right.errorbar([r['step'] for r in val], [r['val_acc'] for r in val], yerr=[r['val_ci95'] for r in val],
                       marker='o', ms=3, capsize=2, label='val NCM episodes')
    right.set(xlabel='step', ylabel='accuracy', ylim=(0, 1))
    right.legend(fontsize=8)
    _save(fig, plt, path)
    return True
