"""The recipe accuracy benchmark: tasks are shared across recipes and the paired difference is computed per task."""
import json

import pytest
from conftest import make_shapes_folder

from benchmarks.finetune_accuracy import format_table, run_tasks, summarise


def test_summary_pairs_tasks_against_protonet_and_the_linear_probe():
    rows = summarise({'lean_5shot': [0.5, 0.75], 'protonet': [0.4, 0.75], 'linear_probe': [0.5, 0.5]},
                     {'lean_5shot': 1})
    lean = rows[0]
    assert lean['accuracy']['mean'] == pytest.approx(0.625) and lean['tasks'] == 2 and lean['guard_reverted'] == 1
    assert lean['vs_protonet']['mean'] == pytest.approx(0.05)  # paired: (0.1 + 0.0) / 2
    assert lean['vs_linear_probe']['mean'] == pytest.approx(0.125)
    assert 'vs_protonet' not in rows[1]
    assert '+5.0 +- 6.9 points' in format_table(rows)  # 1.96 * 0.05 / sqrt(2)


@pytest.mark.slow
def test_every_recipe_runs_on_the_same_tasks(tmp_path):
    folder = make_shapes_folder(tmp_path / 'data')
    overrides = dict(data=str(folder), weights='random', n_way='3', k_shot='2', n_query='4', image_size='32',
                     steps='2', eval_episodes='5')
    results, _ = run_tasks(['protonet', 'lean_5shot'], 2, overrides, tmp_path / 'runs')
    assert {k: len(v) for k, v in results.items()} == {'protonet': 2, 'lean_5shot': 2}
    for task in range(2):  # same classes for every recipe on a task
        metrics = [json.loads((tmp_path / 'runs' / f'{r}-task{task}' / 'metrics.json').read_text()) for r in results]
        assert len({tuple(m['task']['classes']) for m in metrics}) == 1
