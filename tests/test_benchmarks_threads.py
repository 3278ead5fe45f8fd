"""benchmarks/threads.py: the busy background processes never outlive it, each measuring process gets the wait policy
it was meant to get, the report is complete, and bad options stop with a one-line error before anything starts."""
import json
import os
from pathlib import Path

import pytest

from benchmarks import threads as bt

TOO_MANY = str(len(os.sched_getaffinity(0)) + 1 if hasattr(os, 'sched_getaffinity') else 9999)  # threads
linux_only = pytest.mark.skipif(not Path('/proc/self/stat').exists(), reason='reads /proc (Linux)')


def _children() -> set[int]:
    """Live (not yet reaped included) child processes of this process, from /proc."""
    me, found = os.getpid(), set()
    for entry in Path('/proc').iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / 'stat').read_text().rsplit(')', 1)[1].split()[1]) == me:
                    found.add(int(entry.name))
            except (OSError, ValueError, IndexError):
                pass  # ended while we looked
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] not in ('Z', 'X')
    except OSError:
        return False


@linux_only
def test_busy_load_is_stopped_when_the_block_is_interrupted():
    before = _children()
    with pytest.raises(KeyboardInterrupt):
        with bt.BusyLoad(2, seconds=60) as load:
            pids = load.pids
            assert len(pids) == 2 and all(_running(pid) for pid in pids)
            assert set(pids) <= _children()
            raise KeyboardInterrupt  # what Ctrl-C raises in the parent
    assert not any(_running(pid) for pid in pids)
    assert _children() == before and load.pids == []
    load.stop()  # a second stop is harmless


@linux_only
def test_busy_process_ends_by_itself_after_its_time():
    load = bt.BusyLoad(1, seconds=0.3).start()
    try:
        assert load.procs[0].wait(timeout=20) == 0
    finally:
        load.stop()


def test_busy_load_refuses_nonsense():
    with pytest.raises(ValueError, match='count >= 0'):
        bt.BusyLoad(-1)


def _fake_measure(policy, threads, load, steps, *args):
    """A measuring process's readings without the process: PASSIVE 10 ms, others 20 ms, x2 with any load."""
    ms = (10.0 if policy == 'PASSIVE' else 20.0) * (2 if load else 1)
    return dict(wall_ms=[ms] * steps, cpu_ms=[ms * threads] * steps, omp_wait_policy=None, torch='x',
                torch_default_threads=2, torch_threads=threads or 2, window_s=1.0, load_cores=0.5 if load else None,
                others_cores=0.0, recipe=dict(model='m', batch_size=2), load_pids=list(range(load)))


def test_rows_carry_medians_and_both_ratios(monkeypatch):
    monkeypatch.setattr(bt, 'measure', _fake_measure)
    rows = bt.benchmark(['PASSIVE', 'ACTIVE'], [0, 2], [0, 1], steps=3, repeats=2)
    assert [(r['policy'], r['threads'], r['load']) for r in rows] == [
        (p, t, n) for p in ('PASSIVE', 'ACTIVE') for t in (0, 2) for n in (0, 1)]
    by_key = {(r['policy'], r['threads'], r['load']): r for r in rows}
    active_loaded = by_key[('ACTIVE', 2, 1)]
    assert active_loaded['median_ms'] == 40.0 and active_loaded['iqr_ms'] == 0.0
    assert active_loaded['steps'] == 6 and active_loaded['processes'] == 2  # 3 steps x 2 rounds, pooled
    assert active_loaded['slowdown'] == 2.0 and active_loaded['vs_passive'] == 2.0
    assert by_key[('PASSIVE', 0, 0)]['slowdown'] == 1.0 and by_key[('PASSIVE', 0, 0)]['torch_threads'] == 2
    table = bt.format_table(rows).splitlines()
    assert table[0].startswith('| wait policy | threads | busy procs | median (ms) | IQR (ms) | vs unloaded |')
    assert len(table) == 2 + len(rows)
    assert table[2].startswith('| PASSIVE | 0 (= 2) | 0 | 10.0 | 0.0 | 1.00x | 1.00x |')
    assert table[-1].startswith('| ACTIVE | 2 | 1 | 40.0 | 0.0 | 2.00x | 2.00x | 80.0 | 0.50 |')


@pytest.mark.slow  # two measuring processes, each importing torch and building the model: about 6 s
@linux_only
def test_tiny_run_reports_each_policy_and_leaves_no_process(tmp_path, capsys):
    out = tmp_path / 'threads.json'
    before = _children()
    # The 'default' child must see the variable unset whatever this process's environment holds.
    assert bt.main(['--policies', 'passive,default', '--threads', '1', '--loads', '1', '--steps', '2',
                    '--warmup', '1', '--repeats', '1', '--size', '32', '--out', str(out)]) == 0
    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.startswith('|')]
    assert table[0].startswith('| wait policy |') and table[1].startswith('|:---|')
    assert [line.split(' | ')[0] for line in table[2:]] == ['| PASSIVE', '| default']
    saved = json.loads(out.read_text())
    meta, rows = saved['meta'], saved['rows']
    assert saved['table'].splitlines() == table
    assert meta['policies'] == ['PASSIVE', 'default'] and meta['threads'] == [1] and meta['loads'] == [1]
    assert meta['cpu'] and meta['cpu_flags'] and meta['date'] and meta['usable_cpus'] >= 1
    assert meta['recipe'] == dict(name='lean_5shot', model='lkca_mobilenet', batch_size=2, frozen_groups=4,
                                  freeze_bn_stats=True, grad_checkpointing=True, optimizer='sgd',
                                  trainable=meta['recipe']['trainable'])
    passive, default = rows
    assert passive['omp_wait_policy'] == 'PASSIVE' and default['omp_wait_policy'] is None
    for row in rows:
        assert row['torch_threads'] == 1 and row['load'] == 1 and row['steps'] == len(row['wall_ms']) == 2
        assert row['q1_ms'] <= row['median_ms'] <= row['q3_ms'] and row['iqr_ms'] >= 0
        assert row['slowdown'] is None  # no unloaded row to compare with
        assert len(row['load_pids']) == 1 and not _running(row['load_pids'][0])
    assert passive['vs_passive'] == 1.0
    assert default['vs_passive'] == pytest.approx(default['median_ms'] / passive['median_ms'])
    assert _children() == before  # the busy processes and the measuring processes are all gone


@pytest.mark.parametrize('option', [
    ['--policies', 'SPIN'], ['--policies', ','], ['--threads', 'two'], ['--threads', TOO_MANY], ['--threads', '-1'],
    ['--loads', '-1'], ['--steps', '1'], ['--warmup', '-1'], ['--repeats', '0'], ['--size', '16'],
    ['--steps', 'many']])
def test_bad_options_stop_with_one_line_error(option, capsys):
    with pytest.raises(SystemExit) as exc:
        bt.main(option)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if 'error:' in line]
    assert len(errors) == 1 and errors[0].startswith('python -m benchmarks.threads: error: ')
    assert 'Traceback' not in err
