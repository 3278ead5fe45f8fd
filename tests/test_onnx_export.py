"""ONNX export of the operators and the backbone: dynamic batch and image size, same numbers as PyTorch."""
import numpy as np
import pytest
import timm
import torch

import fewshot_lkca  # noqa: F401
from fewshot_lkca.layers import LKCA

ort = pytest.importorskip('onnxruntime')


def _export(module, example, path):
    batch, height, width = torch.export.Dim('batch', max=64), torch.export.Dim('h', min=8), torch.export.Dim('w', min=8)
    torch.onnx.export(module.eval(), (example,), str(path), dynamo=True, input_names=['x'],
                      dynamic_shapes=({0: batch, 2: height, 3: width},), verbose=False)
    return ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])


def _randomise_attention(module):
    torch.manual_seed(0)
    for name, p in module.named_parameters():
        if '.attn.' in f'.{name}':
            torch.nn.init.normal_(p, std=0.3)  # non-trivial gates, so the pooling paths are exercised


@pytest.mark.slow
def test_lkca_operator_exports_with_dynamic_batch_and_size(tmp_path):
    op = LKCA(16)
    _randomise_attention(op)
    session = _export(op, torch.randn(2, 16, 20, 24), tmp_path / 'lkca.onnx')
    for shape in [(1, 16, 9, 13), (3, 16, 32, 17)]:
        x = torch.randn(*shape)
        (y,) = session.run(None, {'x': x.numpy()})
        np.testing.assert_allclose(y, op(x).detach().numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_lkca_mobilenet_exports_with_dynamic_batch(tmp_path):
    model = timm.create_model('lkca_mobilenet', num_classes=5)
    _randomise_attention(model)
    model.eval()
    session = _export(model, torch.randn(2, 3, 64, 64), tmp_path / 'model.onnx')
    for shape in [(1, 3, 64, 64), (4, 3, 96, 128)]:
        x = torch.randn(*shape)
        (y,) = session.run(None, {'x': x.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(y, model(x).numpy(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize('size', [64, 65])
def test_tf_same_padding_becomes_constant_pads_with_the_same_function(size):
    """`static_padding`: timm's run-time 'same' padding as constant pads for the export's size, even and odd."""
    from timm.layers import Conv2dSame

    from fewshot_lkca.heads import static_padding

    model = timm.create_model('lkca_mobilenet_050', num_classes=5, pad_type='same')
    _randomise_attention(model)
    model.eval()
    x = torch.randn(2, 3, size, size)
    fixed = static_padding(model, x)
    assert any(isinstance(m, Conv2dSame) for m in model.modules())  # the original is untouched
    assert not any(isinstance(m, Conv2dSame) for m in fixed.modules())
    with torch.no_grad():
        assert torch.equal(fixed(x), model(x))
    plain = timm.create_model('lkca_mobilenet_050', num_classes=5)
    assert static_padding(plain, x) is plain  # nothing to do: the model itself


@pytest.mark.slow
def test_a_tf_padded_classifier_exports_to_onnx_with_the_same_numbers(tmp_path):
    from fewshot_lkca.export.onnx import export_onnx

    model = timm.create_model('lkca_mobilenet_050', num_classes=5, pad_type='same')
    _randomise_attention(model)
    model.eval()
    x = torch.randn(3, 3, 64, 64)
    proto = export_onnx(model, x[:2])
    session = ort.InferenceSession(proto.SerializeToString(), providers=['CPUExecutionProvider'])
    (y,) = session.run(None, {'image': x.numpy()})
    assert not any(n.op_type == 'Shape' for n in proto.graph.node)  # constant pads: no shape arithmetic left
    with torch.no_grad():
        np.testing.assert_allclose(y, model(x).numpy(), rtol=1e-3, atol=1e-4)
