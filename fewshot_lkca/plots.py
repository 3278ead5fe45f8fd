"""PNG figures of a run: the confusion matrix and the training curve (matplotlib, the 'plots' extra)."""
import json
from pathlib import Path

import matplotlib

matplotlib.use('Agg')  # files only: no display on a device or in CI
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ['plot_confusion', 'plot_training_curve']


def plot_confusion(confusion: list[list[int]], names: list[str], path: Path) -> None:
    n = len(names)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * n, 1.0 + 0.6 * n))
    ax.imshow(confusion, cmap='Blues')
    ax.set_xticks(range(n), names, rotation=60, ha='right', fontsize=7)
    ax.set_yticks(range(n), names, fontsize=7)
    ax.set_xlabel('predicted')
    ax.set_ylabel('true')
    top = max(max(row) for row in confusion) or 1
    for i, row in enumerate(confusion):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha='center', va='center', fontsize=7, color='white' if v > top / 2 else 'black')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_training_curve(log_file: Path, path: Path) -> None:
    records = [json.loads(line) for line in Path(log_file).read_text().splitlines() if line.strip()]
    if not records:
        return
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([r['step'] for r in records], [r['loss'] for r in records], label='loss')
    ax.plot([r['step'] for r in records], [r['batch_acc'] for r in records], label='batch accuracy', alpha=0.6)
    ax.set_xlabel('step')
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
