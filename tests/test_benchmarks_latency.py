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
    assert saved['meta']['threads'] == [1, 2] and saved['meta']['sizes'] == [64]
    assert saved['meta']['weights'] == 'random init' and saved['meta']['cpu_flags']
    records = {(r['runtime'], r['threads']): r for r in saved['records']}
    assert sorted(records) == [(rt, t) for rt in ('onnx', 'onnx-int8', 'torch') for t in (1, 2)]
    for r in records.values():  # one record per (model, runtime, size, threads)
        assert r['model'] == 'lkca_mobilenet_050' and r['size'] == 64
        assert r['ms'] > 0 and r['runs'] == 4 and 0 <= r['accuracy'] <= 1 and 0 <= r['agreement'] <= 1
    onnx, int8 = records['onnx', 2], records['onnx-int8', 2]
    assert onnx['agreement'] == 1.0 and onnx['cosine'] > 0.9999  # fp32 ONNX is the same model
    assert onnx['speedup_vs_fp32'] == 1.0 and records['torch', 1]['speedup_vs_fp32'] is None
    assert int8['speedup_vs_fp32'] == pytest.approx(onnx['ms'] / int8['ms']) and int8['size_mb'] < onnx['size_mb']
    quantization = saved['meta']['quantization']['lkca_mobilenet_050@64']
    assert quantization['settings']['format'] == 'QDQ' and quantization['settings']['depthwise'] == 'int8'
    assert out.with_suffix('.md').read_text().startswith('64 px:\n\n| model | runtime | size (MB) |')


def _record(model, runtime, ms, threads=1, size=224):
    return dict(model=model, runtime=runtime, size=size, threads=threads, ms=ms)


def test_targets_compare_int8_with_its_fp32_and_the_reference():
    records = [_record('lkca_mobilenet', 'onnx', 3.0), _record('lkca_mobilenet', 'onnx-int8', 2.0),
               _record('lkca_mobilenet', 'executorch', 2.0), _record('lkca_mobilenet', 'executorch-int8', 1.0),
               _record('tf_mobilenetv3_small_100', 'onnx', 1.5), _record('tf_mobilenetv3_small_100', 'executorch', 1.2),
               _record('tf_mobilenetv3_small_100', 'onnx-int8', 0.1)]  # int8 of the reference does not count
    for r in records:
        r['speedup_vs_fp32'] = latency._ratio(records, r, latency.FP32_OF.get(r['runtime']))
    line, = latency.targets(records)
    assert 'onnx-int8 1.50x, executorch-int8 2.00x' in line
    assert 'best int8 1.00 ms (executorch-int8)' in line and 'best fp32 1.20 ms (executorch): 1.20x (met)' in line
    records[3]['ms'] = 1.3
    records[3]['speedup_vs_fp32'] = latency._ratio(records, records[3], 'executorch')
    assert 'best int8 1.30 ms (executorch-int8)' in latency.targets(records)[0]
    assert latency.targets(records)[0].endswith('(missed)')
