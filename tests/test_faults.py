"""Faults: a kill at every write of a run, a second process on a run or a cold cache, damaged files, a full disk."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, make_shapes_folder

from fewshot_lkca.finetune import main
from fewshot_lkca.rundir import STATE_FILE, RunDir

# The child counts the renames into the run directory (every file a run writes goes through atomic_write's
# os.replace) and dies by SIGKILL just before or just after rename number K.
_KILL_AT_RENAME = """
import os, signal, sys
K, WHEN, OUT = int(sys.argv[1]), sys.argv[2], os.path.realpath(sys.argv[3])
real, seen = os.replace, []
def replace(src, dst, *a, **k):
    mine = os.path.realpath(os.fspath(dst)).startswith(OUT)
    if mine:
        seen.append(dst)
    if mine and len(seen) == K and WHEN == 'before':
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst, *a, **k)
    if mine and len(seen) == K and WHEN == 'after':
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
from fewshot_lkca.finetune import main
main(sys.argv[4:])
print('renames', len(seen))
"""


def _args(folder: Path, out: Path) -> list[str]:
    return ['--data', str(folder), '--out', str(out), '--ways', '3', '--shots', '2', '--queries', '4',
            '--weights', 'random', '--image_size=32', '--steps=4', '--batch_size=2', '--checkpoint_every=2',
            '--method=finetune', '--mirror_views=false', '--guard=false', '--eval_episodes=20', '--export=[]',
            '--no-progress', '--threads', '1']


def _child(*argv, env=None):
    return subprocess.run([sys.executable, '-c', _KILL_AT_RENAME, *map(str, argv)], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(REPO)), timeout=600)


def _result(run: Path) -> dict:
    metrics = json.loads((run / 'metrics.json').read_text())
    return dict(episodes=metrics['episodes'], confusion=metrics['confusion'])


@pytest.mark.slow
def test_a_kill_at_any_write_resumes_to_the_metrics_of_an_uninterrupted_run(tmp_path):
    folder = make_shapes_folder(tmp_path / 'data', 8)
    clean = tmp_path / 'clean'
    done = _child(0, 'never', clean, *_args(folder, clean))
    assert done.returncode == 0, done.stderr[-2000:]
    renames = int(done.stdout.split('renames')[-1])
    assert renames >= 6  # config, two checkpoints of two files each, metrics
    for k in range(1, renames + 1):
        for when in ('before', 'after'):
            run = tmp_path / f'killed-{k}-{when}'
            proc = _child(k, when, run, *_args(folder, run))
            assert proc.returncode == -9, proc.stderr[-2000:]
            assert not list(run.glob('.*.tmp')) or when == 'before'
            finished = (run / 'metrics.json').is_file()  # killed after the last rename: a finished run
            if not finished:
                resumable = (run / 'config.json').is_file()
                main(['--resume', str(run), '--no-progress'] if resumable else _args(folder, run))
            assert _result(run) == _result(clean), (k, when)
            assert not list(run.glob('.*.tmp')) and (finished or not (run / STATE_FILE).exists())
            steps = [json.loads(line)['step'] for line in (run / 'log.jsonl').read_text().splitlines()]
            assert steps == [1, 2, 3, 4], (k, when)  # no step twice after a resume


def test_a_second_process_on_a_run_directory_is_refused_and_a_dead_ones_lock_taken_over(tmp_path):
    folder = make_shapes_folder(tmp_path / 'data', 8)
    run = tmp_path / 'run'
    holder = subprocess.Popen([sys.executable, '-c', 'import sys, time\nfrom fewshot_lkca.rundir import RunDir\n'
                               'with RunDir(sys.argv[1]).lock():\n    print("locked", flush=True)\n    time.sleep(120)',
                               str(run)], stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert holder.stdout.readline().strip() == 'locked'
        with pytest.raises(SystemExit, match=f'error: {run} is in use by process {holder.pid} '):
            main(_args(folder, run))
    finally:
        holder.kill()
        holder.wait()
    main(_args(folder, run))  # the killed holder's lock is taken over
    assert (run / 'metrics.json').is_file()


_CACHE_CHILD = """
import json, sys
from fewshot_lkca.pretrain.cache import base_pretrained
_, path, cached = base_pretrained('lkca_mobilenet_050', sys.argv[1], 32, 6, 8, 2e-3, progress=False)
print(json.dumps(dict(cached=cached, path=str(path))))
"""


@pytest.mark.slow
def test_two_processes_needing_one_cold_cache_entry_build_it_once(tmp_path):
    folder = make_shapes_folder(tmp_path / 'data', 6)
    (folder / 'base.txt').write_text('red_disc\ngreen_bar\n')
    env = dict(os.environ, PYTHONPATH=str(REPO), FEWSHOT_LKCA_CACHE=str(tmp_path / 'cache'), OMP_NUM_THREADS='1')
    procs = [subprocess.Popen([sys.executable, '-c', _CACHE_CHILD, str(folder)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]
    results = [json.loads(o[0].splitlines()[-1]) for o in outs]
    assert sorted(r['cached'] for r in results) == [False, True]  # one built it, the other read it
    entry = Path(results[0]['path']).parent
    assert len((entry / 'log.jsonl').read_text().splitlines()) == 6


@pytest.mark.parametrize('damage', [b'', b'garbage' * 10, 'truncate'])
def test_a_damaged_train_state_is_a_one_line_error_on_resume(tmp_path, damage):
    folder = make_shapes_folder(tmp_path / 'data', 8)
    run = tmp_path / 'run'
    proc = _child(3, 'after', run, *_args(folder, run))  # killed after the first checkpoint's state file
    assert proc.returncode == -9 and (run / STATE_FILE).is_file()
    data = (run / STATE_FILE).read_bytes()
    (run / STATE_FILE).write_bytes(data[:len(data) // 2] if damage == 'truncate' else damage)
    with pytest.raises(SystemExit) as exc:
        main(['--resume', str(run), '--no-progress'])
    assert str(exc.value).startswith('error: --resume') and 'is damaged' in str(exc.value)
    assert '\n' not in str(exc.value)


def test_a_start_that_fails_leaves_nothing_that_blocks_the_retry(tmp_path):
    folder = make_shapes_folder(tmp_path / 'data', 8)
    run = tmp_path / 'run'
    args = _args(folder, run)
    bad = args[:args.index('random')] + ['/no/such.safetensors'] + args[args.index('random') + 1:]
    with pytest.raises(SystemExit, match='--weights: no such file'):
        main(bad)
    main(args)  # no --overwrite, no --resume needed
    assert (run / 'metrics.json').is_file()


def test_resume_without_its_state_file_says_so_and_trains_from_the_start(tmp_path, capsys):
    folder = make_shapes_folder(tmp_path / 'data', 8)
    run = tmp_path / 'run'
    assert _child(5, 'after', run, *_args(folder, run)).returncode == -9
    (run / STATE_FILE).unlink()
    main(['--resume', str(run), '--no-progress'])
    assert 'train_state.pt is missing: nothing to resume from, training again from step 0' in capsys.readouterr().out
    steps = [json.loads(line)['step'] for line in (run / 'log.jsonl').read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_full_disk_is_a_one_line_error_and_the_last_checkpoint_survives(tmp_path, monkeypatch):
    import fewshot_lkca.rundir as rundir

    folder = make_shapes_folder(tmp_path / 'data', 8)
    run = tmp_path / 'run'
    real, calls = rundir.atomic_write, []

    def full_after_first_state(path, write):
        calls.append(path)
        if Path(path).name == STATE_FILE and sum(Path(c).name == STATE_FILE for c in calls) == 2:
            raise OSError(28, 'No space left on device', str(path))
        real(path, write)
    monkeypatch.setattr(rundir, 'atomic_write', full_after_first_state)
    with pytest.raises(SystemExit) as exc:
        main(_args(folder, run))
    assert str(exc.value) == f'error: cannot write {run / STATE_FILE}: No space left on device'
    assert torch.load(run / STATE_FILE, weights_only=True)['step'] == 2  # what was saved stays
    monkeypatch.setattr(rundir, 'atomic_write', real)
    main(['--resume', str(run), '--no-progress'])
    assert (run / 'metrics.json').is_file()


def test_bad_run_inputs_are_one_line_errors(tmp_path):
    folder = make_shapes_folder(tmp_path / 'data', 8)
    a_file = tmp_path / 'file.txt'
    a_file.write_text('x')
    for out, message in [(a_file, 'is a file, not a folder'), (a_file / 'run', 'cannot write')]:
        with pytest.raises(SystemExit) as exc:
            main(_args(folder, out))
        assert message in str(exc.value) and '\n' not in str(exc.value), str(exc.value)
    run = tmp_path / 'run'
    _child(3, 'after', run, *_args(folder, run))
    (run / 'config.json').write_text('{not json')
    with pytest.raises(SystemExit, match='config.json is not a finetune config'):
        main(['--resume', str(run), '--no-progress'])
    assert RunDir(run).started  # the run is still there, untouched


def test_ctrl_c_during_export_says_so_and_keeps_the_finished_run(tmp_path, monkeypatch):
    import fewshot_lkca.export.run as export_run

    folder = make_shapes_folder(tmp_path / 'data', 8)
    run = tmp_path / 'run'

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(export_run, 'export_run', interrupted)
    args = [a if a != '--export=[]' else '--export=onnx' for a in _args(folder, run)]
    with pytest.raises(SystemExit, match='export interrupted; the run is complete, export it with: python -m '):
        main(args)
    assert (run / 'metrics.json').is_file()


def test_a_missing_data_folder_and_an_empty_weights_file_are_named(tmp_path):
    folder = make_shapes_folder(tmp_path / 'data', 8)
    empty = tmp_path / 'empty.pth'
    empty.touch()
    cases = [(['--data', str(tmp_path / 'nope')], 'no such folder'),
             (['--weights', str(empty)], f'cannot read weights file {empty}: the file is empty')]
    for change, message in cases:
        args = _args(folder, tmp_path / 'run')
        for i in range(0, len(change), 2):
            args[args.index(change[i]) + 1] = change[i + 1]
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert message in str(exc.value) and '\n' not in str(exc.value), str(exc.value)
