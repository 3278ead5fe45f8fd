"""timm's own tests/test_models.py, run against every model of the lkca_mobilenet family.

`scripts/fetch_timm_tests.sh` (a step of `make test`) takes the file from the sdist of the installed timm into
``<venv>/timm-tests/<timm version>/``. It runs there in a pytest process of its own:

* ``-p fewshot_lkca`` imports this package first, so the family is registered when timm's file lists its models;
* ``-k 'lkca_ and not pretrained'`` keeps the tests timm parametrizes with one of our models and leaves out the two
  that download weights (``test_model_load_pretrained``, ``test_model_features_pretrained``);
* its own empty config: ours (``--strict-markers``) would refuse timm's markers, which timm declares in its
  pyproject; ``GITHUB_ACTIONS`` is dropped from the environment, since with it timm's file defines fewer tests.
"""
import importlib.metadata
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

import pytest

import fewshot_lkca

TIMM_VERSION = importlib.metadata.version('timm')
TIMM_TESTS = Path(sys.prefix) / 'timm-tests' / TIMM_VERSION / 'test_models.py'
# The tests of timm 1.0.31 that take every model: forward, backward, config, TorchScript, features, FX.
EXPECTED = {
    'test_model_forward', 'test_model_backward', 'test_model_default_cfgs', 'test_model_forward_torchscript',
    'test_model_forward_features', 'test_model_forward_fx', 'test_model_backward_fx',
    'test_model_forward_fx_torchscript',
}


def _run_timm_tests(tmp_path: Path) -> tuple[subprocess.CompletedProcess, ET.Element]:
    ini = tmp_path / 'pytest.ini'
    ini.write_text('[pytest]\n')
    report = tmp_path / 'report.xml'
    cmd = [
        sys.executable, '-m', 'pytest', str(TIMM_TESTS), '-c', str(ini), '--rootdir', str(TIMM_TESTS.parent),
        '-p', 'fewshot_lkca', '-p', 'no:cacheprovider', '-k', 'lkca_ and not pretrained',
        '-W', 'ignore::pytest.PytestUnknownMarkWarning', '-q', '--tb=short', f'--junitxml={report}',
    ]
    env = {k: v for k, v in os.environ.items() if k not in ('GITHUB_ACTIONS', 'PYTEST_ADDOPTS')}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    if not report.exists():
        pytest.fail(f'timm tests did not run (exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}')
    return proc, ET.parse(report).getroot()


@pytest.mark.slow
def test_timm_test_models_pass_for_every_lkca_model(tmp_path):
    if not TIMM_TESTS.is_file():
        fetch = f'bash scripts/fetch_timm_tests.sh {sys.executable} {TIMM_TESTS.parents[1]}'
        pytest.skip(f'{TIMM_TESTS} is absent: `{fetch}` fetches it from the timm {TIMM_VERSION} sdist on PyPI '
                    '(`make test` does)')
    proc, report = _run_timm_tests(tmp_path)
    output = proc.stdout[-6000:] + proc.stderr[-2000:]
    ran = defaultdict(set)  # test function -> models
    not_passed = []
    for case in report.iter('testcase'):
        name = case.get('name')
        match = re.fullmatch(r'(\w+)\[.*?\b(lkca_\w+)(\.\w+)?(-.*)?\]', name)
        assert match, f'unexpected test id {name}'
        ran[match.group(1)].add(match.group(2))
        if any(child.tag in ('failure', 'error', 'skipped') for child in case):
            not_passed.append(name)
    passed = proc.returncode == 0 and not not_passed
    assert passed, f'timm tests not passed (exit {proc.returncode}): {not_passed}\n{output}'
    family = set(fewshot_lkca.list_backbones())
    assert EXPECTED <= ran.keys(), f'timm tests that did not run: {sorted(EXPECTED - ran.keys())}\n{output}'
    assert {f: family for f in ran} == dict(ran), f'not every model ran every test: {dict(ran)}'
