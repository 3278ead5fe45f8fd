"""benchmarks/latency.py: its episodes, its timing worker, its report, and one tiny end-to-end run."""
import json

import numpy as np
import pytest

from benchmarks import latency


def _clustered(n_classes=6, per_class=20, dim=8, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, dim))
    labels = np.repeat(np.arange(n_classes), per_class)
    return centres[labels] + noise * rng.standard_normal((len(labels), dim)), labels


def test_episodes_are_reproducible_and_score_separable_features_perfectly():
    features, labels = _clustered()
    pred, truth = latency.episode_predictions(features, labels, episodes=4)
    assert pred.shape == truth.shape == (4 * 5 * 15,)
    assert (pred == truth).all()
    again, _ = latency.episode_predictions(features * 3.0, labels, episodes=4)  # cosine: scale does not matter
    assert (again == pred).all()
    noisy, _ = latency.episode_predictions(features + np.random.default_rng(1).standard_normal(features.shape),
                                           labels, episodes=4)
    assert 0.2 < (noisy == truth).mean() < 1.0


def test_episodes_need_enough_classes():
    features, labels = _clustered(n_classes=4)
    with pytest.raises(ValueError, match='need 5 classes'):
        latency.episode_predictions(features, labels, episodes=1)


def test_worker_prints_one_sample_per_run(tmp_path, capsys):
    onnx = pytest.importorskip('onnx')
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), 'w')
    graph = helper.make_graph([helper.make_node('Conv', ['x', 'w'], ['y'])], 'g',
                              [helper.make_tensor_value_info('x', TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info('y', TensorProto.FLOAT, None)], [w])
    path = tmp_path / 'conv.onnx'
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)])
    model.ir_version = 8  # what every onnxruntime of the last years reads
    onnx.save(model, str(path))
    assert latency.main(['--worker', 'onnx', '32', '2', '5', '1', str(path)]) == 0
    samples = json.loads(capsys.readouterr().out)
    assert len(samples) == 5 and all(0 < s < 1000 for s in samples)


@pytest.mark.parametrize('option', [['--runtimes', 'tflite'], ['--threads', '0'], ['--runs', '2', '--rounds', '3'],
                                    ['--size', '16'], ['--threads', 'two']])
def test_cli_refuses_bad_options(option, capsys):
    with pytest.raises(SystemExit):
        latency.main(option)
    assert 'error:' in capsys.readouterr().err


@pytest.mark.slow  # one dynamo export, one quantization and six timing processes: about 30-60 s
def test_tiny_run_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / 'latency.json'
    latency.main(['--models', 'lkca_mobilenet_050', '--runtimes', 'torch,onnx,onnx-int8', '--size', '64',
                  '--runs', '4', '--warmup', '1', '--rounds', '2', '--threads', '1,2', '--episodes', '3',
                  '--data', 'lookalike', '--classes', '5', '--weights', 'none', '--out', str(out)])
    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.startswith('| lkca_mobilenet_050')]
    assert [line.split(' | ')[1] for line in table] == ['torch', 'onnx', 'onnx-int8']
    saved = json.loads(out.read_text())
    rows = {r['runtime']: r for r in saved['rows']}
    assert saved['meta']['threads'] == [1, 2] and saved['meta']['weights'] == 'random init'
    for row in rows.values():
        assert row['ms_1t'] > 0 and row['ms_2t'] > 0 and row['runs_1t'] == 4 and row['runs_2t'] == 4
        assert 0 <= row['accuracy'] <= 1 and 0 <= row['agreement'] <= 1
    assert rows['onnx']['agreement'] == 1.0 and rows['onnx']['cosine'] > 0.9999  # fp32 ONNX is the same model
    assert rows['onnx']['speedup_1t'] == 1.0
    assert rows['onnx-int8']['speedup_2t'] == pytest.approx(rows['onnx']['ms_2t'] / rows['onnx-int8']['ms_2t'])
    assert rows['onnx-int8']['size_mb'] < rows['onnx']['size_mb']
    assert rows['onnx-int8']['quantization']['settings']['format'] == 'QDQ'
    assert out.with_suffix('.md').read_text().startswith('| model | runtime | size (MB) |')
