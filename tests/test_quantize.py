"""fewshot_lkca.quantize: int8 close to fp32, the fp32 islands it claims, hard-swish ranges, errors, atomic writes."""
import numpy as np
import pytest

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from fewshot_lkca.export.int8 import (  # noqa: E402
    DEPTHWISE_PLANS,
    QuantizationError,
    depthwise_plan,
    plan_quantization,
    quantize_onnx,
)

SIZE = 24


def _tiny_model(rng: np.random.Generator) -> onnx.ModelProto:
    """stem conv -> HardSwish -> 1x1 expand -> Relu -> 3x3 depthwise -> HardSwish -> SE-style gate from a pool ->
    1x1 project -> + residual -> global pool -> Gemm: the kinds of nodes the backbones export to."""
    def w(name, *shape, scale=0.3):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [w('stem_w', 8, 3, 3, 3), w('stem_b', 8, scale=0.1), w('pw_w', 16, 8, 1, 1), w('pw_b', 16, scale=0.1),
             w('dw_w', 16, 1, 3, 3), w('dw_b', 16, scale=0.1), w('se_w', 16, 16, 1, 1), w('se_b', 16, scale=0.1),
             w('pwl_w', 8, 16, 1, 1), w('pwl_b', 8, scale=0.1), w('fc_w', 5, 8), w('fc_b', 5, scale=0.1),
             numpy_helper.from_array(np.array([2, 3], dtype=np.int64), 'axes')]
    nodes = [
        helper.make_node('Conv', ['x', 'stem_w', 'stem_b'], ['stem'], name='stem_conv', pads=[1] * 4, strides=[2, 2]),
        helper.make_node('HardSwish', ['stem'], ['a0'], name='hs0'),
        helper.make_node('Conv', ['a0', 'pw_w', 'pw_b'], ['pw'], name='pw_conv'),
        helper.make_node('Relu', ['pw'], ['a1'], name='relu1'),
        helper.make_node('Conv', ['a1', 'dw_w', 'dw_b'], ['dw'], name='dw_conv', group=16, pads=[1] * 4),
        helper.make_node('HardSwish', ['dw'], ['a2'], name='hs2'),
        helper.make_node('ReduceMean', ['a2', 'axes'], ['pooled'], name='se_pool', keepdims=1),
        helper.make_node('Conv', ['pooled', 'se_w', 'se_b'], ['se'], name='se_conv'),
        helper.make_node('Sigmoid', ['se'], ['gate'], name='se_gate'),
        helper.make_node('Mul', ['a2', 'gate'], ['a3'], name='se_mul'),
        helper.make_node('Conv', ['a3', 'pwl_w', 'pwl_b'], ['pwl'], name='pwl_conv'),
        helper.make_node('Add', ['pwl', 'a0'], ['res'], name='residual'),
        helper.make_node('GlobalAveragePool', ['res'], ['gap'], name='gap'),
        helper.make_node('Flatten', ['gap'], ['flat'], name='flatten'),
        helper.make_node('Gemm', ['flat', 'fc_w', 'fc_b'], ['y'], name='fc', transB=1),
    ]
    graph = helper.make_graph(nodes, 'tiny', [helper.make_tensor_value_info('x', TensorProto.FLOAT,
                                                                           ['batch', 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info('y', TensorProto.FLOAT, ['batch', 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """(fp32 path, calibration images, held-out images, int8 path, report), quantized once for the module."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp('tiny')
    fp32 = root / 'tiny.onnx'
    onnx.save(_tiny_model(rng), str(fp32))
    calibration = rng.standard_normal((32, 3, SIZE, SIZE)).astype(np.float32)
    held_out = rng.standard_normal((16, 3, SIZE, SIZE)).astype(np.float32)
    out = root / 'tiny.int8.onnx'
    report = quantize_onnx(fp32, out, calibration, depthwise='int8')
    return fp32, calibration, held_out, out, report


def _run(path, x):
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _weight_dequantized(model: onnx.ModelProto, node_name: str) -> bool:
    """True when ``node_name``'s weight input comes out of a DequantizeLinear of an int8 initializer."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == node_name)
    producer = producers.get(node.input[1])
    return (producer is not None and producer.op_type == 'DequantizeLinear'
            and inits[producer.input[0]].data_type == TensorProto.INT8)


def test_int8_output_is_close_to_fp32(tiny):
    fp32, _, held_out, out, report = tiny
    expected, got = _run(fp32, held_out), _run(out, held_out)
    cosine = (expected * got).sum(1) / np.linalg.norm(expected, axis=1) / np.linalg.norm(got, axis=1)
    assert cosine.min() > 0.98, cosine
    assert not np.allclose(expected, got, atol=1e-6)  # it really is a different (quantized) model
    assert report['int8_bytes'] == out.stat().st_size and report['fp32_bytes'] == fp32.stat().st_size


def test_nodes_kept_fp32_are_the_ones_reported(tiny):
    _, _, _, out, report = tiny
    model = onnx.load(str(out))
    assert not _weight_dequantized(model, 'stem_conv')  # the image-reading conv stays fp32
    assert not _weight_dequantized(model, 'fc')  # the classifier stays fp32
    for name in ('pw_conv', 'dw_conv', 'se_conv', 'pwl_conv'):
        assert _weight_dequantized(model, name), name
    assert report['quantized_nodes'] == {'Conv': 4, 'Relu': 1}
    assert report['kept_fp32_nodes'] == {'Conv (stem)': 1}
    assert report['fp32_op_types']['Gemm'] == 1
    assert report['runtime_ops'].get('QLinearConv') == 4  # onnxruntime fuses every quantized conv
    assert report['settings']['depthwise'] == 'int8' and 'depthwise_timing_ms' not in report
    used = {o.domain for o in model.opset_import}
    assert used <= {n.domain for n in model.graph.node} | {''}  # no stray optimizer domains declared


def test_plan_marks_stem_and_optionally_depthwise():
    model = _tiny_model(np.random.default_rng(1))
    assert plan_quantization(model) == {'stem_conv': {'op_type': 'Conv', 'reason': 'stem'}}
    assert plan_quantization(model, depthwise=False) == {'stem_conv': {'op_type': 'Conv', 'reason': 'stem'},
                                                         'dw_conv': {'op_type': 'Conv', 'reason': 'depthwise'}}


def test_depthwise_plan_is_recorded_per_architecture(tiny, tmp_path):
    assert depthwise_plan('lkca_mobilenet') == 'int8' and depthwise_plan('tf_mobilenetv3_small_100') == 'fp32'
    assert depthwise_plan('some_new_net') == 'int8' and depthwise_plan(None) == 'int8'
    assert set(DEPTHWISE_PLANS.values()) <= {'int8', 'fp32'}
    report = quantize_onnx(tiny[0], tmp_path / 'default.onnx', tiny[1][:8])  # the default times nothing
    assert report['settings']['depthwise'] == 'int8' and 'depthwise_timing_ms' not in report


def test_depthwise_choice_follows_the_timings(tiny, tmp_path):
    fp32, calibration = tiny[0], tiny[1]
    report = quantize_onnx(fp32, tmp_path / 'auto.onnx', calibration[:8], depthwise='auto')
    timing = report['depthwise_timing_ms']
    assert timing['int8'] > 0 and timing['fp32'] > 0
    expected = 'int8' if timing['ratio'] < 0.95 else 'fp32'
    assert report['settings']['depthwise'] == expected and report['settings']['depthwise_requested'] == 'auto'
    fp32_dw = quantize_onnx(fp32, tmp_path / 'fp32dw.onnx', calibration[:8], depthwise='fp32')
    assert fp32_dw['kept_fp32_nodes'] == {'Conv (depthwise)': 1, 'Conv (stem)': 1}
    assert not _weight_dequantized(onnx.load(str(tmp_path / 'fp32dw.onnx')), 'dw_conv')
    with pytest.raises(QuantizationError, match='depthwise must be one of'):
        quantize_onnx(fp32, tmp_path / 'x.onnx', calibration, depthwise='fast')


def test_hardswish_inputs_are_quantized_from_minus_three(tiny):
    _, _, _, out, report = tiny
    model = onnx.load(str(out))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    quantizers = {n.output[0]: n for n in model.graph.node if n.op_type == 'QuantizeLinear'}
    # The depthwise conv's output feeds hard-swish: its uint8 code 0 must sit at -3 or above (within one step).
    q = next(n for name, n in quantizers.items() if n.input[0] == 'dw')
    scale, zero_point = float(inits[q.input[1]]), int(inits[q.input[2]])
    assert -3.0 - scale <= -zero_point * scale
    assert report['settings']['hardswish_inputs_clipped'] >= 1


def test_static_batch_model_and_external_data(tmp_path):
    """A model whose weights sit in a side file (as the dynamo exporter writes them) and whose batch is fixed."""
    model = _tiny_model(np.random.default_rng(2))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 1
    fp32 = tmp_path / 'ext.onnx'
    onnx.save(model, str(fp32), save_as_external_data=True, location='ext.onnx.data', size_threshold=0)
    x = np.random.default_rng(3).standard_normal((8, 3, SIZE, SIZE)).astype(np.float32)
    report = quantize_onnx(fp32, tmp_path / 'ext.int8.onnx', x, depthwise='int8')
    assert report['fp32_bytes'] > fp32.stat().st_size  # the side file is counted
    assert _run(tmp_path / 'ext.int8.onnx', x[:1]).shape == (1, 5)


@pytest.mark.parametrize('calibration, message', [
    (np.zeros((4, 3, SIZE, SIZE), np.float64), 'float32'),
    (np.zeros((4, 3, SIZE), np.float32), 'N x C x H x W'),
    (np.zeros((0, 3, SIZE, SIZE), np.float32), 'no image'),
    (np.zeros((4, 1, SIZE, SIZE), np.float32), 'channels is 1'),
    (np.full((4, 3, SIZE, SIZE), np.nan, np.float32), 'NaN'),
    ([[0.0]], 'numpy array'),
])
def test_bad_calibration_is_refused(tiny, tmp_path, calibration, message):
    fp32 = tiny[0]
    with pytest.raises(QuantizationError, match=message):
        quantize_onnx(fp32, tmp_path / 'out.onnx', calibration)
    assert not (tmp_path / 'out.onnx').exists()


def test_bad_paths_are_refused(tiny, tmp_path):
    fp32, calibration = tiny[0], tiny[1]
    with pytest.raises(QuantizationError, match='not found'):
        quantize_onnx(tmp_path / 'missing.onnx', tmp_path / 'out.onnx', calibration)
    broken = tmp_path / 'broken.onnx'
    broken.write_bytes(b'this is not a protobuf')
    with pytest.raises(QuantizationError, match='cannot read ONNX model'):
        quantize_onnx(broken, tmp_path / 'out.onnx', calibration)
    with pytest.raises(QuantizationError, match='fp32 model itself'):
        quantize_onnx(fp32, fp32, calibration)
    with pytest.raises(QuantizationError, match='output folder does not exist'):
        quantize_onnx(fp32, tmp_path / 'nowhere' / 'out.onnx', calibration)


def test_failed_quantization_leaves_the_old_file(tiny, tmp_path, monkeypatch):
    fp32, calibration = tiny[0], tiny[1]
    out = tmp_path / 'model.int8.onnx'
    out.write_bytes(b'previous int8 model')
    import onnxruntime.quantization as ortq

    real = ortq.quantize_static
    calls = []

    def fail_on_write(model_input, model_output, *args, **kwargs):
        calls.append(model_output)
        if len(calls) == 2:  # the second pass writes the model that becomes out_path
            with open(model_output, 'wb') as f:
                f.write(b'half a model')
            raise RuntimeError('killed while writing')
        return real(model_input, model_output, *args, **kwargs)

    monkeypatch.setattr(ortq, 'quantize_static', fail_on_write)
    with pytest.raises(RuntimeError, match='killed'):
        quantize_onnx(fp32, out, calibration[:4], depthwise='int8')
    assert out.read_bytes() == b'previous int8 model'
    assert [p.name for p in tmp_path.iterdir()] == ['model.int8.onnx']  # no half-written file left behind


@pytest.mark.slow  # a dynamo export of the real backbone and a calibration: about 20 s
@pytest.mark.shared
def test_lkca_mobilenet_features_survive_int8(mnv3_weights, tmp_path):
    import torch

    import fewshot_lkca
    from fewshot_lkca.data import LookalikeDataset, eval_transform

    model = fewshot_lkca.create_backbone('lkca_mobilenet', weights=str(mnv3_weights), num_classes=0).eval()
    fp32 = tmp_path / 'lkca.onnx'
    torch.onnx.export(model, (torch.randn(1, 3, 96, 96),), str(fp32), dynamo=True, input_names=['x'], verbose=False)
    data = LookalikeDataset('novel', images_per_class=4, image_size=96)
    transform = eval_transform(model, size=96)
    images = torch.stack([transform(data.load(i)) for i in range(len(data))]).numpy()
    report = quantize_onnx(fp32, tmp_path / 'lkca.int8.onnx', images[::2], depthwise='int8')
    assert report['runtime_ops']['QLinearConv'] >= 60
    expected = np.concatenate([_run(fp32, x[None]) for x in images[1::2]])
    got = np.concatenate([_run(tmp_path / 'lkca.int8.onnx', x[None]) for x in images[1::2]])
    cosine = (expected * got).sum(1) / np.linalg.norm(expected, axis=1) / np.linalg.norm(got, axis=1)
    assert cosine.mean() > 0.97, cosine
