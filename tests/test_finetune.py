"""The main job end to end on a tiny image folder: run directory, metrics, resume after a kill, refusals."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import COLOURS, make_shapes_folder

from fewshot_lkca.checkpoint import load_checkpoint
from fewshot_lkca.config import FinetuneConfig, apply_overrides
from fewshot_lkca.finetune import finetune_command, main
from fewshot_lkca.rundir import RunDir, RunError


def _cfg(data: Path, out: Path, **changes) -> FinetuneConfig:
    base = dict(data=str(data), out=str(out), protocol='episode', n_way=3, k_shot=2, n_query=4, weights='random',
                image_size=32,
                method='finetune', mirror_views=False, steps=8, batch_size=2, checkpoint_every=3, eval_episodes=20,
                augment='strong', export=[])
    base.update(changes)
    return apply_overrides(FinetuneConfig(), base, source='test').validate()


@pytest.fixture
def folder(tmp_path):
    return make_shapes_folder(tmp_path / 'data')


def test_run_directory_holds_everything(folder, tmp_path):
    out = tmp_path / 'run'
    metrics = finetune_command(_cfg(folder, out), progress=False, log=lambda *_: None)
    for name in ('config.json', 'log.jsonl', 'metrics.json', 'model.safetensors', 'confusion.png',
                 'training_curve.png'):
        assert (out / name).is_file(), name
    assert not (out / 'train_state.pt').exists()  # optimizer state is only kept while a run can be resumed
    log = [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]
    assert [r['step'] for r in log] == list(range(1, 9))
    saved = json.loads((out / 'metrics.json').read_text())
    assert saved['episodes']['n'] == 20 and 0 <= saved['episodes']['mean'] <= 1
    assert set(saved['per_class_accuracy']) == set(COLOURS)
    assert sum(map(sum, saved['confusion'])) == 3 * (12 - 2)  # every held-out image classified once
    tensors, meta = load_checkpoint(out / 'model.safetensors')
    assert meta['classes'] == metrics['task']['classes'] and meta['image_size'] == 32
    assert meta['mean'] == [0.5, 0.5, 0.5] and 'head.weight' in tensors
    assert json.loads((out / 'config.json').read_text())['k_shot'] == 2


def test_protonet_trains_nothing_and_learns_colours_from_imagenet_free_features(folder, tmp_path):
    metrics = finetune_command(_cfg(folder, tmp_path / 'p', method='protonet', weights='random'), progress=False,
                               log=lambda *_: None)
    assert metrics['steps'] == 0 and metrics['trainable_parameters'] > 0


def test_refuses_to_overwrite_a_finished_run(folder, tmp_path):
    cfg = _cfg(folder, tmp_path / 'run', steps=2)
    finetune_command(cfg, progress=False, log=lambda *_: None)
    with pytest.raises(RunError, match='finished run; pass --overwrite'):
        finetune_command(_cfg(folder, tmp_path / 'run', steps=2), progress=False, log=lambda *_: None)
    finetune_command(_cfg(folder, tmp_path / 'run', steps=2), overwrite=True, progress=False, log=lambda *_: None)
    other = tmp_path / 'not_a_run'
    other.mkdir()
    (other / 'precious.txt').write_text('user data')
    with pytest.raises(RunError, match='not a run directory'):
        finetune_command(_cfg(folder, other), progress=False, log=lambda *_: None)
    assert (other / 'precious.txt').read_text() == 'user data'


_KILL_AFTER_SECOND_CHECKPOINT = """
import os, signal, sys
import fewshot_lkca.finetune as ft
saves = []
original = ft._save_state
def save_then_die(*args, **kwargs):
    original(*args, **kwargs)
    saves.append(1)
    if len(saves) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
ft._save_state = save_then_die
ft.main(sys.argv[1:])
"""


def _cli_args(folder: Path, out: Path) -> list[str]:
    return ['--data', str(folder), '--out', str(out), '--ways', '3', '--shots', '2', '--queries', '4',
            '--weights', 'random', '--image_size=32', '--steps=8', '--batch_size=2', '--checkpoint_every=3',
            '--method=finetune', '--mirror_views=false',
            '--eval_episodes=20', '--export=[]', '--no-progress']


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_metrics(folder, tmp_path, monkeypatch, one_thread):
    # One CPU thread in this process and the killed one, so both sum in the same order: bitwise-equal weights.
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    killed, clean = tmp_path / 'killed', tmp_path / 'clean'
    proc = subprocess.run([sys.executable, '-c', _KILL_AFTER_SECOND_CHECKPOINT, *_cli_args(folder, killed)],
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (killed / 'metrics.json').exists()
    assert torch.load(killed / 'train_state.pt', weights_only=True)['step'] == 6
    main(['--resume', str(killed), '--no-progress'])
    main(_cli_args(folder, clean))
    a = json.loads((killed / 'metrics.json').read_text())
    b = json.loads((clean / 'metrics.json').read_text())
    assert a['episodes'] == b['episodes'] and a['confusion'] == b['confusion']
    ta, _ = load_checkpoint(killed / 'model.safetensors')
    tb, _ = load_checkpoint(clean / 'model.safetensors')
    assert all(torch.equal(ta[k], tb[k]) for k in tb)
    steps = [json.loads(line)['step'] for line in (killed / 'log.jsonl').read_text().splitlines()]
    assert steps[-1] == 8


def test_ctrl_c_leaves_a_resumable_run(folder, tmp_path, monkeypatch):
    out = tmp_path / 'run'
    original = RunDir.log
    calls = []

    def interrupt_at_step_4(self, record):
        original(self, record)
        calls.append(record['step'])
        if record['step'] == 4:
            raise KeyboardInterrupt
    monkeypatch.setattr(RunDir, 'log', interrupt_at_step_4)
    with pytest.raises(SystemExit, match=f'interrupted at step 4; continue with: .* --resume {out}'):
        finetune_command(_cfg(folder, out), progress=False, log=lambda *_: None)
    assert torch.load(out / 'train_state.pt', weights_only=True)['step'] == 4
    monkeypatch.setattr(RunDir, 'log', original)
    finetune_command(FinetuneConfig(), resume=out, progress=False, log=lambda *_: None)
    assert (out / 'metrics.json').is_file()


@pytest.mark.parametrize('argv, message', [
    (['--shots', '0'], 'k_shot must be >= 1, got 0'),
    (['--ways', '9'], "n_way=9 needs 9 classes .* only 3 of 3 classes of '.*' \\(novel\\)"),
    (['--shots', '10'], "10 \\+ 4 = 14 images each; only 0 of 3 classes .*, '.*', has 12 \\(lower --ways, --shots"),
    (['--recipe', 'nope'], "unknown recipe 'nope'"),
    (['--lrr=0.1'], "unknown option 'lrr' in the command line; did you mean 'lr'"),
    (['--weights', '/no/such.safetensors'], '--weights: no such file'),
    (['--model', 'lkca_mobilnet'], "unknown model 'lkca_mobilnet'; did you mean"),
])
def test_bad_input_is_one_line_error(folder, tmp_path, argv, message, capsys):
    base = ['--data', str(folder), '--out', str(tmp_path / 'run'), '--ways', '3', '--queries', '4',
            '--weights', 'random', '--image_size=32', '--steps=1', '--eval_episodes=2', '--no-progress']
    with pytest.raises(SystemExit) as exc:
        main(base + argv)
    text = str(exc.value)
    assert text.startswith('error: ') and '\n' not in text
    import re
    assert re.search(message, text), text


def test_incompatible_checkpoint_is_refused(folder, tmp_path):
    run = tmp_path / 'run'
    finetune_command(_cfg(folder, run, steps=1), progress=False, log=lambda *_: None)
    with pytest.raises(SystemExit, match='holds a lkca_mobilenet backbone, but --model is lkca_mobilenet_dw3'):
        main(['--data', str(folder), '--out', str(tmp_path / 'r2'), '--ways', '3', '--shots', '2', '--queries', '4',
              '--weights', str(run / 'model.safetensors'), '--model', 'lkca_mobilenet_dw3', '--no-progress'])


def test_classes_too_small_for_an_episode_are_left_out_of_the_task(folder, tmp_path):
    import shutil
    for extra in ('a_tiny', 'b_tiny'):
        (folder / extra).mkdir()
        for i in range(3):  # fewer than k_shot + n_query = 6
            shutil.copy(folder / 'red_disc' / f'{i}.png', folder / extra / f'{i}.png')
    with pytest.warns(UserWarning, match='fewer than k_shot \\+ n_query'):
        metrics = finetune_command(_cfg(folder, tmp_path / 'run', steps=1), progress=False, log=lambda *_: None)
    assert sorted(metrics['task']['classes']) == sorted(COLOURS)


def test_atomic_write_keeps_the_old_file_and_no_temporary_when_writing_fails(tmp_path):
    from fewshot_lkca.checkpoint import atomic_write

    target = tmp_path / 'model.safetensors'
    target.write_text('old')

    def failing(tmp):
        tmp.write_text('half')
        raise OSError('disk full')

    with pytest.raises(OSError, match='disk full'):
        atomic_write(target, failing)
    assert target.read_text() == 'old' and [p.name for p in tmp_path.iterdir()] == ['model.safetensors']


def test_the_guard_falls_back_to_the_prototypes_when_training_wrecks_the_model(folder, tmp_path):
    protonet = finetune_command(_cfg(folder, tmp_path / 'protonet', method='protonet'), progress=False,
                                log=lambda *_: None)
    lines = []
    wrecked = finetune_command(_cfg(folder, tmp_path / 'wrecked', lr=50.0, optimizer='sgd', steps=6), progress=False,
                               log=lines.append)
    assert wrecked['guard']['kept'] == 'prototypes'
    assert any(line.startswith('guard: kept the prototypes') for line in lines)
    assert wrecked['per_class_accuracy'] == protonet['per_class_accuracy']  # the same classifier as ProtoNet
    unguarded = finetune_command(_cfg(folder, tmp_path / 'unguarded', lr=50.0, optimizer='sgd', steps=6, guard=False),
                                 progress=False, log=lambda *_: None)
    assert unguarded['guard'] is None


def test_the_linear_probe_trains_on_cached_features_and_reports_its_guard(folder, tmp_path):
    metrics = finetune_command(_cfg(folder, tmp_path / 'probe', method='linear_probe', steps=30, k_shot=3),
                               progress=False, log=lambda *_: None)
    assert metrics['guard']['kept'] in ('trained', 'prototypes') and metrics['guard']['loo_prototypes'] is not None
    assert (tmp_path / 'probe' / 'model.safetensors').is_file() and metrics['steps'] == 30
