"""Episodic evaluation on a tiny generated folder, checkpoints of both kinds, refusals, and the Omniglot runs."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import COLOURS, RING, make_shapes_folder

import fewshot_lkca.evaluate as ev
from fewshot_lkca.checkpoint import load_checkpoint, save_checkpoint
from fewshot_lkca.config import FinetuneConfig, apply_overrides
from fewshot_lkca.evaluate import EvalConfig, evaluate_command, load_backbone, main, nearest_neighbour_errors
from fewshot_lkca.finetune import finetune_command

SHAPES = {**COLOURS, **RING}
PER_CLASS = 10
QUIET = dict(progress=False, log=lambda *_: None)


@pytest.fixture(scope='module')
def folder(tmp_path_factory) -> Path:
    return make_shapes_folder(tmp_path_factory.mktemp('shapes'), PER_CLASS, SHAPES)


def _cfg(folder: Path, **changes) -> EvalConfig:
    base = dict(data=str(folder), weights='random', n_way=3, k_shots=(1, 3), n_query=5, episodes=25, image_size=32,
                batch_size=16)
    base.update(changes)
    return EvalConfig(**base)


def test_episodes_are_counted_reproducible_and_features_computed_once(folder, monkeypatch):
    embedded = []
    original = ev.embed_images

    def counting(backbone, images, *args, **kwargs):
        embedded.append(len(images))
        return original(backbone, images, *args, **kwargs)
    monkeypatch.setattr(ev, 'embed_images', counting)
    first = evaluate_command(_cfg(folder), **QUIET)
    assert embedded == [len(SHAPES) * PER_CLASS]  # one pass over the split serves both shot settings
    assert [(r['k_shot'], r['episodes'], len(r['accuracies'])) for r in first['results']] == [(1, 25, 25), (3, 25, 25)]
    for r in first['results']:
        assert 0 <= r['mean'] <= 1 and r['ci95'] >= 0
        assert r['mean'] == pytest.approx(np.mean(r['accuracies']), abs=1e-5)
    again = evaluate_command(_cfg(folder), **QUIET)
    assert [r['accuracies'] for r in again['results']] == [r['accuracies'] for r in first['results']]
    other = evaluate_command(_cfg(folder, seed=1, k_shots=(1,)), **QUIET)
    assert other['results'][0]['accuracies'] != first['results'][0]['accuracies']


def test_random_features_separate_coloured_shapes(folder):
    # Colour survives even a random conv net: far above chance, or the features / labels are misaligned.
    result = evaluate_command(_cfg(folder, k_shots=(3,), episodes=40), **QUIET)
    assert result['results'][0]['mean'] > 0.6 > result['chance']


def test_cli_prints_a_table_and_writes_json(folder, tmp_path, capsys):
    out = tmp_path / 'sub' / 'results.json'
    main(['--data', str(folder), '--weights', 'random', '--ways', '3', '--shots', '1', '2', '--queries', '4',
          '--episodes', '12', '--image-size', '32', '--seed', '3', '--json', str(out), '--no-progress'])
    printed = capsys.readouterr().out
    assert re.search(r'^3-way 1-shot: \d+\.\d\d \+- \d+\.\d\d % \(12 episodes', printed, re.M), printed
    assert re.search(r'^3-way 2-shot: ', printed, re.M)
    saved = json.loads(out.read_text())
    assert saved['settings']['k_shots'] == [1, 2] and saved['settings']['seed'] == 3
    assert saved['settings']['model'] == 'lkca_mobilenet'
    assert saved['data']['image_size'] == 32 and saved['data']['classes'] == len(SHAPES)
    assert [r['episodes'] for r in saved['results']] == [12, 12]


def test_fewshot_lkca_command_runs_evaluate(folder, capsys):
    from fewshot_lkca.cli import main as cli_main

    cli_main(['evaluate', '--data', str(folder), '--weights', 'random', '--ways', '2', '--shots', '1',
              '--queries', '2', '--episodes', '3', '--image-size', '32', '--no-progress'])
    assert '2-way 1-shot: ' in capsys.readouterr().out


def test_finetune_checkpoint_is_evaluated_with_its_backbone_and_preprocessing(folder, tmp_path):
    run = tmp_path / 'run'
    ft = apply_overrides(FinetuneConfig(), dict(data=str(folder), out=str(run), protocol='episode', n_way=3, k_shot=2,
                                                n_query=3,
                                                weights='random', image_size=40, steps=2, batch_size=2,
                                                eval_episodes=2, augment='none', export=[], method='finetune'),
                        source='test').validate()
    finetune_command(ft, progress=False, log=lambda *_: None)
    path = run / 'model.safetensors'
    tensors, meta = load_checkpoint(path)

    backbone, loaded_meta, origin = load_backbone('', str(path))
    assert 'fine-tuned' in origin and loaded_meta['model'] == 'lkca_mobilenet'
    state = backbone.state_dict()
    backbone_keys = [k for k in tensors if k.startswith('backbone.')]
    assert backbone_keys and all(torch.equal(state[k.removeprefix('backbone.')], tensors[k]) for k in backbone_keys)

    lines = []
    result = evaluate_command(_cfg(folder, weights=str(path), image_size=0, k_shots=(1,)), progress=False,
                              log=lines.append)
    assert result['data']['image_size'] == 40 and result['data']['image_size_from'] == 'checkpoint'
    assert result['data']['preprocessing']['mean'] == meta['mean']
    assert result['results'][0]['episodes'] == 25
    assert any(line.startswith('note: the checkpoint was trained on 3 of these 4 classes') for line in lines)


def test_base_pretrained_checkpoint_is_accepted(folder, tmp_path):
    torch.manual_seed(0)
    backbone, _, _ = load_backbone('lkca_mobilenet', 'random')
    path = tmp_path / 'base.safetensors'
    save_checkpoint(path, backbone.state_dict(), dict(model='lkca_mobilenet', image_size=36, kind='base-pretrained'))
    result = evaluate_command(_cfg(folder, weights=str(path), image_size=0, k_shots=(1,), episodes=5), **QUIET)
    assert result['data']['image_size'] == 36 and 'base-pretrained' in result['settings']['weights_origin']
    loaded, _, _ = load_backbone('', str(path))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in backbone.state_dict().items())


@pytest.fixture(scope='module')
def corrupt_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp('bad')
    (root / 'corrupt.safetensors').write_bytes(b'\x00\x01 not a safetensors file')
    (root / 'corrupt.pth').write_bytes(b'not a pickle either')
    backbone, _, _ = load_backbone('lkca_mobilenet_dw3', 'random')
    save_checkpoint(root / 'dw3.safetensors', backbone.state_dict(), dict(model='lkca_mobilenet_dw3'))
    return {p.name: p for p in root.iterdir()}


@pytest.mark.parametrize('argv, message', [
    (['--shots', '0'], r'k_shot must be >= 1, got 0'),
    (['--shots', '1', '-1'], r'k_shot must be >= 1, got -1'),
    (['--ways', '5'], r"n_way=5 needs 5 classes .* only 4 of 4 classes of '.*' \(novel\)"),
    (['--ways', '1'], r'n_way must be >= 2'),
    (['--shots', '8'], r'8 \+ 5 = 13 images each; only 0 of 4 classes .* has 10 \(lower --ways'),
    (['--episodes', '0'], r'episodes must be >= 1'),
    (['--image-size', '16'], r'image_size must be 0 \(default\) or >= 32'),
    (['--weights', '/no/such/model.safetensors'], r'--weights: no such file /no/such/model\.safetensors'),
    (['--weights', '{bad}/corrupt.safetensors'], r'cannot read checkpoint .*corrupt\.safetensors'),
    (['--weights', '{bad}/corrupt.pth'], r'cannot read weights file .*corrupt\.pth'),
    (['--weights', '{bad}/dw3.safetensors', '--model', 'lkca_mobilenet'],
     r'holds a lkca_mobilenet_dw3 backbone, but --model is lkca_mobilenet'),
    (['--model', 'lkca_mobilnet'], r"unknown model 'lkca_mobilnet'; did you mean"),
    (['--data', 'omniglott'], r"no data set card 'omniglott' \(did you mean 'omniglot'\?\)"),
    (['--omniglot-runs', '/no/such/all_runs.zip'], r'--omniglot-runs is the fixed 20-way one-shot protocol; drop '
                                                   r'--data, --ways, --shots, --queries, --episodes'),
])
def test_bad_input_is_one_line_error(folder, corrupt_files, argv, message):
    bad = str(next(iter(corrupt_files.values())).parent)
    argv = [a.replace('{bad}', bad) for a in argv]
    base = ['--data', str(folder), '--weights', 'random', '--ways', '3', '--shots', '1', '--queries', '5',
            '--episodes', '2', '--image-size', '32', '--no-progress']
    with pytest.raises(SystemExit) as exc:
        main(base + argv)  # argparse keeps the last value of a repeated option
    text = str(exc.value)
    assert text.startswith('error: ') and '\n' not in text, text
    assert re.search(message, text), text


def test_missing_runs_file_is_one_line_error():
    with pytest.raises(SystemExit, match=r'^error: /no/such/all_runs\.zip does not exist$'):
        main(['--omniglot-runs', '/no/such/all_runs.zip', '--weights', 'random', '--no-progress'])


def test_nearest_neighbour_errors_counts_wrong_matches():
    torch.manual_seed(0)
    train = torch.randn(3, 20, 16)
    answers = torch.stack([torch.randperm(20) for _ in range(3)])
    test = torch.stack([train[r, answers[r]] for r in range(3)]) * 2.5  # cosine ignores the scale
    test[1, :4] = train[1, (answers[1, :4] + 1) % 20]  # four deliberate mistakes in run 1
    assert nearest_neighbour_errors(train, test, answers).tolist() == [0, 4, 0]


@pytest.mark.shared
def test_official_omniglot_runs(omniglot_dir, tmp_path):
    out = tmp_path / 'runs.json'
    result = evaluate_command(EvalConfig(weights='random', omniglot_runs=str(omniglot_dir / 'all_runs.zip'),
                                         image_size=64, json=str(out)), **QUIET)
    runs = result['runs']
    assert [r['run'] for r in runs] == [f'run{i:02d}' for i in range(1, 21)]
    assert all(0 <= r['errors'] <= r['tests'] == 20 for r in runs)
    assert 0 <= result['error_rate_pct'] <= 100
    assert result['error_rate_pct'] == pytest.approx(np.mean([r['error_pct'] for r in runs]))
    assert result['data']['n_way'] == 20 and result['data']['image_size'] == 64
    assert json.loads(out.read_text())['runs'] == runs


@pytest.mark.shared
def test_imagenet_features_beat_chance_on_the_omniglot_runs(omniglot_dir, mnv3_weights):
    result = evaluate_command(EvalConfig(model='tf_mobilenetv3_small_100', weights=str(mnv3_weights),
                                         omniglot_runs=str(omniglot_dir / 'all_runs.zip'), image_size=64), **QUIET)
    assert result['error_rate_pct'] < 80  # chance is 95 %; these features make 69 % at 64 px (61 % at 105, 42 % at 224)
