"""The wheel that `pip install .` builds works on its own: recipes and data cards inside, commands run anywhere."""
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import make_shapes_folder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('wheel')
    # No build isolation: the venv's setuptools builds it (an isolated build would fetch setuptools again).
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w', str(out),
                    str(REPO)], check=True, capture_output=True, text=True, timeout=300)
    (path,) = out.glob('fewshot_lkca-*.whl')
    return path


def test_the_wheel_holds_the_recipes_and_the_data_cards(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = {p.name for p in (REPO / 'fewshot_lkca' / 'recipes').glob('*.yaml')}
    assert recipes and {f'fewshot_lkca/recipes/{r}' for r in recipes} <= names
    assert {f'fewshot_lkca/data/datasets/{c}.yaml' for c in ('lookalike', 'omniglot', 'image_folder')} <= names


@pytest.mark.slow
def test_an_installed_wheel_runs_a_recipe_from_outside_the_repository(wheel, tmp_path):
    target, work = tmp_path / 'site', tmp_path / 'elsewhere'
    work.mkdir()
    subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '-q', '--target', str(target), str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)
    folder = make_shapes_folder(tmp_path / 'photos', per_class=8)
    env = dict(os.environ, PYTHONPATH=str(target), OMP_NUM_THREADS='1')  # the wheel's copy, not the checkout's
    code = ('import sys, fewshot_lkca.finetune as f; print(f.__file__, file=sys.stderr); f.main(sys.argv[1:])')
    argv = ['--recipe', 'lean_1shot', '--data', str(folder), '--ways', '3', '--queries', '3', '--weights', 'random',
            '--out', str(work / 'run'), '--no-progress', '--steps=2', '--eval_episodes=5', '--export=[]']
    done = subprocess.run([sys.executable, '-c', code, *argv], cwd=work, capture_output=True, text=True, timeout=600,
                          env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.splitlines()[0].startswith(str(target))  # the installed package ran
    saved = json.loads((work / 'run' / 'config.json').read_text())
    assert saved['k_shot'] == 1 and saved['steps'] == 2  # lean_1shot's shots, the command line's steps
