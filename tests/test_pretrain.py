"""Base-class pretraining: run directory, val selection, resume, one-line errors, and torchrun with 2 processes."""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_shapes_folder

import fewshot_lkca.pretrain as pretrain
import fewshot_lkca.pretrain.loop as loop
from fewshot_lkca.checkpoint import load_backbone, load_checkpoint
from fewshot_lkca.config import ConfigError, FinetuneConfig, apply_overrides, list_recipes, load_recipe
from fewshot_lkca.finetune import finetune_command
from fewshot_lkca.pretrain import PretrainConfig, StepSampler, base_pretrained, pretrain_command
from fewshot_lkca.rundir import RunError
from fewshot_lkca.train import prototypical_loss

CLASSES = {'red_disc': (200, 40, 40), 'green_bar': (40, 180, 60), 'blue_square': (40, 60, 200),
           'yellow_ring': (230, 210, 40), 'red_square': (200, 40, 40), 'blue_disc': (40, 60, 200),
           'green_ring': (40, 180, 60), 'yellow_bar': (230, 210, 40)}
SPLITS = dict(base=['red_disc', 'green_bar', 'blue_square', 'yellow_ring'], val=['red_square', 'blue_disc'],
              novel=['green_ring', 'yellow_bar'])
TINY = dict(model='lkca_mobilenet_050', image_size=32, steps=6, batch_size=8, eval_every=3, checkpoint_every=2,
            val_n_way=2, val_k_shot=2, val_n_query=4, val_episodes=10)
QUIET = dict(progress=False, log=lambda *_: None)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def folder(tmp_path_factory) -> Path:
    """8 shape classes, 12 images each: 4 base, 2 val, 2 novel (split lists next to the class folders)."""
    root = make_shapes_folder(tmp_path_factory.mktemp('shapes') / 'data', per_class=12, classes=CLASSES)
    for split, names in SPLITS.items():
        (root / f'{split}.txt').write_text('\n'.join(names) + '\n')
    return root


# One thread throughout: equal numerics across processes, no thrashing on a shared 2-core CPU.
pytestmark = pytest.mark.usefixtures('one_thread')


def _cfg(folder: Path, out: Path, **changes) -> PretrainConfig:
    return apply_overrides(PretrainConfig(), dict(TINY, data=str(folder), out=str(out), **changes),
                           source='test').validate()


def _params(tensors: dict) -> dict:
    """Trainable tensors only: BN running statistics follow rank 0's share under DDP (see the module docstring)."""
    return {k: v for k, v in tensors.items() if not re.search(r'running_|num_batches_tracked', k)}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ------------------------------------------------------------------------------------------------ recipes
@pytest.mark.parametrize('name', list_recipes('pretrain'))
def test_every_pretrain_recipe_loads_and_validates(name):
    cfg = load_recipe(name, config_cls=PretrainConfig).validate()
    assert isinstance(cfg, PretrainConfig) and name.startswith('pretrain_')


def test_recipe_kinds_stay_apart():
    assert {'pretrain_supervised', 'pretrain_episodic'} <= set(list_recipes('pretrain'))
    assert not any(name.startswith('pretrain_') for name in list_recipes())  # test_config loads these as fine-tuning
    assert load_recipe('pretrain_episodic', config_cls=PretrainConfig).method == 'episodic'
    assert load_recipe('pretrain_supervised', config_cls=PretrainConfig) == PretrainConfig()  # the defaults
    with pytest.raises(ConfigError, match="recipe 'pretrain_supervised' is a pretrain recipe, not a finetune one"):
        load_recipe('pretrain_supervised')
    with pytest.raises(ConfigError, match="'lean_5shot' is a finetune recipe, not a pretrain one"):
        load_recipe('lean_5shot', config_cls=PretrainConfig)
    with pytest.raises(ConfigError, match="unknown option 'frozen_groups'"):
        apply_overrides(PretrainConfig(), {'frozen_groups': 2}, source='test')


# ---------------------------------------------------------------------------------------- sampler and loss
def test_step_sampler_splits_each_global_batch_the_same_for_any_world_size():
    one, four = StepSampler(30, 8, 1, seed=3), StepSampler(30, 8, 4, seed=3)
    for step in (0, 2, 3, 7):  # 3 batches per epoch: steps 3 and 7 start later epochs
        assert torch.equal(torch.cat([four.chunk(step, c) for c in range(4)]), one.batch(step))
        assert torch.equal(torch.cat([four.mirror(step, c) for c in range(4)]), one.mirror(step, 0))
    epoch = torch.cat([one.batch(s) for s in range(3)])
    assert len(set(epoch.tolist())) == 24  # no image twice within an epoch
    assert not torch.equal(one.batch(0), one.batch(3))  # each epoch is a new permutation
    assert torch.equal(StepSampler(30, 8, 1, seed=3).batch(7), one.batch(7))  # a resumed run draws the same
    with pytest.raises(ConfigError, match='batch_size 8 must split evenly over 3 chunks'):
        StepSampler(30, 8, 3, seed=0)


def test_prototypical_loss_is_cross_entropy_of_negative_squared_distances():
    g = torch.Generator().manual_seed(0)
    support, query = torch.randn(6, 4, generator=g), torch.randn(9, 4, generator=g, requires_grad=True)
    support_y, query_y = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1, 2] * 3)
    loss, acc = prototypical_loss(support, support_y, query, query_y, n_way=3)
    prototypes = support.view(3, 2, 4).mean(1)
    logits = -torch.cdist(query, prototypes) ** 2
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits, query_y), atol=1e-5)
    assert acc == (logits.argmax(1) == query_y).float().mean()
    on_prototype = prototypes[:1].clone().requires_grad_(True)  # distance 0: cdist's gradient would be NaN
    loss, _ = prototypical_loss(support, support_y, on_prototype, torch.tensor([0]), n_way=3)
    loss.backward()
    assert torch.isfinite(on_prototype.grad).all()


# ------------------------------------------------------------------------------------------- the run
@pytest.mark.slow
def test_run_directory_checkpoints_and_val_selection(folder, tmp_path):
    out = tmp_path / 'run'
    metrics = pretrain_command(_cfg(folder, out), **QUIET)
    for name in ('config.json', 'log.jsonl', 'metrics.json', 'best.safetensors', 'last.safetensors',
                 'training_curve.png'):
        assert (out / name).is_file(), name
    assert not (out / 'train_state.pt').exists()  # resume state goes once the run is finished
    log = [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]
    assert [r['step'] for r in log] == list(range(1, 7))
    val = {r['step']: r['val_acc'] for r in log if 'val_acc' in r}
    assert list(val) == [3, 6]  # every eval_every steps and at the end
    best_step = max(val, key=lambda s: (val[s], -s))  # the first of equals is kept
    assert metrics['val']['best']['step'] == best_step
    assert metrics['val']['best']['mean'] == pytest.approx(val[best_step])
    best, meta = load_checkpoint(out / 'best.safetensors')
    assert meta['step'] == best_step and meta['kind'] == 'base-pretrained' and meta['image_size'] == 32
    assert meta['classes'] == sorted(SPLITS['base'])
    assert 'classifier.weight' in best and best['classifier.weight'].shape[0] == 4  # kept: a resumable head
    backbone, loaded_meta, origin = load_backbone('', str(out / 'best.safetensors'))
    assert 'base-pretrained' in origin and loaded_meta['model'] == 'lkca_mobilenet_050'
    assert all(torch.equal(v, best[k]) for k, v in backbone.state_dict().items())
    assert metrics['world_size'] == 1 and metrics['rank_param_max_diff'] == 0.0
    assert json.loads((out / 'config.json').read_text())['method'] == 'supervised'

    # evaluate --weights takes it, at the checkpoint's input size
    from fewshot_lkca.evaluate import EvalConfig, evaluate_command

    evaluated = evaluate_command(EvalConfig(data=str(folder), weights=str(out / 'last.safetensors'), n_way=2,
                                            k_shots=(1,), n_query=4, episodes=5), **QUIET)
    assert evaluated['data']['image_size'] == 32 and evaluated['data']['image_size_from'] == 'checkpoint'

    # finetune --weights takes it: the few-shot task runs on the novel classes the pretraining never saw
    task = apply_overrides(FinetuneConfig(), dict(
        data=str(folder), out=str(tmp_path / 'ft'), model='lkca_mobilenet_050', weights=str(out / 'best.safetensors'),
        n_way=2, k_shot=2, n_query=4, image_size=32, steps=2, batch_size=2, eval_episodes=5, export=[]),
        source='test').validate()
    result = finetune_command(task, **QUIET)
    assert 'best.safetensors' in result['weights'] and set(result['task']['classes']) == set(SPLITS['novel'])


def test_episodic_and_both_methods_train(folder, tmp_path):
    episodic = pretrain_command(_cfg(folder, tmp_path / 'e', method='episodic', n_way=3, k_shot=2, n_query=2,
                                     steps=3, eval_every=0), **QUIET)
    tensors, _ = load_checkpoint(tmp_path / 'e' / 'last.safetensors')
    assert episodic['episodes_per_step'] == 1 and not any(k.startswith('classifier.') for k in tensors)
    both = pretrain_command(_cfg(folder, tmp_path / 'b', method='both', n_way=3, k_shot=2, n_query=2, steps=3,
                                 episodes_per_step=2, accum_steps=2, eval_every=0), **QUIET)
    log = [json.loads(line) for line in (tmp_path / 'b' / 'log.jsonl').read_text().splitlines()]
    assert both['global_batch'] == 8 and len(log) == 3 and all(r['loss'] > 0 for r in log)
    tensors, _ = load_checkpoint(tmp_path / 'b' / 'last.safetensors')
    assert tensors['classifier.weight'].shape[0] == 4


def test_refuses_to_overwrite_a_finished_run_or_a_foreign_folder(folder, tmp_path):
    cfg = _cfg(folder, tmp_path / 'run', steps=1, val_split='')
    first = pretrain_command(cfg, **QUIET)
    assert first['val'] is None and first['checkpoints']['best'] is None
    with pytest.raises(RunError, match='finished run; pass --overwrite'):
        pretrain_command(cfg, **QUIET)
    pretrain_command(cfg, overwrite=True, **QUIET)
    other = tmp_path / 'not_a_run'
    other.mkdir()
    (other / 'precious.txt').write_text('user data')
    with pytest.raises(RunError, match='not a run directory'):
        pretrain_command(_cfg(folder, other), **QUIET)
    assert (other / 'precious.txt').read_text() == 'user data'
    with pytest.raises(RunError, match='already finished'):
        pretrain_command(PretrainConfig(), resume=tmp_path / 'run', **QUIET)


def _interrupt_during_step(monkeypatch, step: int) -> None:
    """Ctrl-C during ``step`` (1-based): the loop calls train_step once per step with its 0-based index."""
    original = loop.train_step

    def interrupt_then_step(net, opt, micro, chunks, s, *args, **kwargs):
        if s == step - 1:
            os.kill(os.getpid(), signal.SIGINT)
        return original(net, opt, micro, chunks, s, *args, **kwargs)
    monkeypatch.setattr(loop, 'train_step', interrupt_then_step)


def test_ctrl_c_finishes_the_step_and_resumes_to_the_same_weights(folder, tmp_path, monkeypatch):
    out, clean = tmp_path / 'run', tmp_path / 'clean'
    _interrupt_during_step(monkeypatch, 3)
    before = signal.getsignal(signal.SIGINT)  # Python's own, or SIG_IGN where the shell started us in the background
    with pytest.raises(SystemExit, match=f'interrupted at step 3; continue with: .* --resume {out}'):
        pretrain_command(_cfg(folder, out), **QUIET)
    assert torch.load(out / 'train_state.pt', weights_only=True)['step'] == 3
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler is back
    monkeypatch.undo()
    pretrain_command(PretrainConfig(), resume=out, **QUIET)
    pretrain_command(_cfg(folder, clean), **QUIET)
    resumed, _ = load_checkpoint(out / 'last.safetensors')
    uninterrupted, _ = load_checkpoint(clean / 'last.safetensors')
    assert _max_diff(resumed, uninterrupted) == 0.0
    assert [json.loads(line)['step'] for line in (out / 'log.jsonl').read_text().splitlines()] == list(range(1, 7))


_KILL_DURING_STEP_6 = """
import os, signal, sys
import fewshot_lkca.pretrain as pt
import fewshot_lkca.pretrain.loop as loop
original = loop.train_step
def die_then_step(net, opt, micro, chunks, step, *args, **kwargs):
    if step == 5:  # 0-based: during step 6; steps 1-5 are logged, the last checkpoint is step 4 (first val)
        os.kill(os.getpid(), signal.SIGKILL)
    return original(net, opt, micro, chunks, step, *args, **kwargs)
loop.train_step = die_then_step
pt.main(sys.argv[1:])
"""


def _cli(folder: Path, out: Path, **changes) -> list[str]:
    settings = dict(TINY, steps=8, checkpoint_every=3, eval_every=4)
    settings.update(changes)
    return ['--data', str(folder), '--out', str(out), '--no-progress'] + [f'--{k}={v}' for k, v in settings.items()]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(folder, tmp_path):
    killed, clean = tmp_path / 'killed', tmp_path / 'clean'
    proc = subprocess.run([sys.executable, '-c', _KILL_DURING_STEP_6, *_cli(folder, killed)], capture_output=True,
                          text=True, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert torch.load(killed / 'train_state.pt', weights_only=True)['step'] == 4
    assert len((killed / 'log.jsonl').read_text().splitlines()) == 5  # step 5 is replayed: its record must go
    pretrain.main(['--resume', str(killed), '--no-progress'])
    pretrain.main(_cli(folder, clean))
    a, _ = load_checkpoint(killed / 'last.safetensors')
    b, _ = load_checkpoint(clean / 'last.safetensors')
    assert _max_diff(a, b) == 0.0
    ma, mb = (json.loads((d / 'metrics.json').read_text()) for d in (killed, clean))
    assert ma['val']['history'] == mb['val']['history']
    assert [json.loads(line)['step'] for line in (killed / 'log.jsonl').read_text().splitlines()] == list(range(1, 9))


@pytest.mark.parametrize('argv, message', [
    (['--method', 'maml'], "method must be one of"),
    (['--split=novel'], 'pretraining must not see the novel split'),
    (['--lrr=0.1'], "unknown option 'lrr' in the command line; did you mean 'lr'"),
    (['--recipe', 'lean_5shot'], "'lean_5shot' is a finetune recipe"),
    (['--batch_size=100'], 'batch_size 100 is larger than the 48 training images'),
    (['--accum_steps=3'], 'batch_size 8 must split evenly over 3 chunks'),
    (['--val_n_way=3'], r"n_way=3 needs 3 classes .* only 2 of 2 classes .* \(val\).*val episodes: lower --val_n_way"),
    (['--method', 'episodic', '--k_shot=10', '--n_query=5'], 'fewer than k_shot \\+ n_query'),
    (['--weights', '/no/such.safetensors'], '--weights: no such file'),
    (['--model', 'lkca_mobilnet'], "unknown model 'lkca_mobilnet'; did you mean"),
    (['--data', '/no/such/folder'], 'no such folder'),
    (['--resume', '/no/such/run'], 'not a run directory'),
])
def test_bad_input_is_one_line_error(folder, tmp_path, argv, message):
    base = ['--data', str(folder), '--out', str(tmp_path / 'run'), '--no-progress'] + \
        [f'--{k}={v}' for k, v in TINY.items()]
    if argv[0] == '--resume':
        base = []
    with pytest.raises(SystemExit) as exc:
        pretrain.main(base + argv)
    text = str(exc.value)
    assert text.startswith('error: ') and '\n' not in text
    assert re.search(message, text), text
    assert not (tmp_path / 'run').exists()  # refused before anything was written


def test_cli_has_the_pretrain_subcommand(capsys):
    from fewshot_lkca import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(['pretrain', '--help'])
    assert exc.value.code == 0 and '--resume RUN_DIR' in capsys.readouterr().out


def test_base_pretrained_trains_once_then_reads_the_cache(folder, tmp_path, monkeypatch):
    monkeypatch.setenv('FEWSHOT_LKCA_CACHE', str(tmp_path / 'cache'))
    state, path, cached = base_pretrained('lkca_mobilenet_050', str(folder), 32, steps=2, batch_size=8, lr=2e-3,
                                          progress=False)
    assert not cached and path.is_file() and path.is_relative_to(tmp_path / 'cache')
    from fewshot_lkca.models import create_backbone

    create_backbone('lkca_mobilenet_050', num_classes=0).load_state_dict(state)  # strict: no classifier left
    again, path2, cached2 = base_pretrained('lkca_mobilenet_050', str(folder), 32, steps=2, batch_size=8, lr=2e-3,
                                            progress=False)
    assert cached2 and path2 == path and _max_diff(again, state) == 0.0
    _, other, _ = base_pretrained('lkca_mobilenet_050', str(folder), 32, steps=1, batch_size=8, lr=2e-3,
                                  progress=False)
    assert other != path  # another setting, another cache entry


# ------------------------------------------------------------------------------------------- torchrun
@pytest.mark.slow
def test_torchrun_two_processes_step_in_sync_stop_together_and_match_one_process(folder, tmp_path):
    """2 ranks x 4 images == 1 process x 8 images in 2 micro-batches of 4 (accum_steps=2).

    The comparison is exact, not only close: on CPU each rank's BatchNorm sees its own 4 images (torch has no CPU
    SyncBatchNorm), which is what one process computes with accum_steps=2; the samples of each step and its mirrors
    are a function of (seed, step) cut into the same chunks. Rank 1 is sent Ctrl-C during step 3: both ranks stop
    after step 3, rank 0 saves, and the run is resumed (in the same processes) to the end.
    """
    ddp, single, dump = tmp_path / 'ddp', tmp_path / 'single', tmp_path / 'dump'
    dump.mkdir()
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
         str(REPO / 'tests' / '_ddp_worker.py'), str(dump), '1', '3', *_cli(folder, ddp, steps=6, eval_every=3)],
        capture_output=True, text=True, timeout=240, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert 'interrupted at step 3; continue with: torchrun' in (dump / 'stop0.txt').read_text()
    assert (dump / 'stop1.txt').read_text() == '1'  # rank 1 exits quietly; rank 0 says how to resume
    assert proc.stdout.count('resuming at step 3 of 6') == 1  # rank 0 alone logs
    rank0, rank1 = (torch.load(dump / f'rank{r}.pt', weights_only=True) for r in (0, 1))
    assert _max_diff(_params(rank0), _params(rank1)) == 0.0
    metrics = json.loads((ddp / 'metrics.json').read_text())
    assert metrics['world_size'] == 2 and metrics['rank_param_max_diff'] == 0.0 and metrics['global_batch'] == 8
    assert [json.loads(line)['step'] for line in (ddp / 'log.jsonl').read_text().splitlines()] == list(range(1, 7))

    pretrain.main(_cli(folder, single, steps=6, eval_every=3, accum_steps=2))
    two_ranks, _ = load_checkpoint(ddp / 'last.safetensors')
    one_process, _ = load_checkpoint(single / 'last.safetensors')
    assert _max_diff(_params(two_ranks), _params(one_process)) < 1e-5
    assert _max_diff(_params(two_ranks), _params(rank0)) == 0.0
    log_ddp, log_one = ([json.loads(line) for line in (d / 'log.jsonl').read_text().splitlines()]
                        for d in (ddp, single))
    assert [r['loss'] for r in log_ddp] == pytest.approx([r['loss'] for r in log_one], abs=1e-4)
