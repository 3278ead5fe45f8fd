"""The operators: LKCA, its 3x3 baseline, coordinate attention, SCConv."""
import numpy as np
import pytest
import torch
from torch import nn

from fewshot_lkca.layers import (
    CRU,
    LKCA,
    SRU,
    CoordAttention,
    CoordAttentionExport,
    DepthwiseSeparable3x3,
    SCConv,
    create_block_attn,
)


class _DeadAttention(nn.Module):
    """An attention that has collapsed: every gate 0."""

    def forward(self, x):
        return torch.zeros_like(x)


def test_lkca_is_the_designed_operator():
    op = LKCA(64)
    dw = op.conv_dw
    assert (dw.kernel_size, dw.groups, dw.padding, dw.bias) == ((5, 5), 64, (2, 2), None)
    assert op.conv_pw.kernel_size == (1, 1)
    assert isinstance(op.bn1, nn.BatchNorm2d) and isinstance(op.bn1.act, nn.Hardswish)
    ca = op.attn
    assert isinstance(ca, CoordAttention)
    assert ca.conv1.out_channels == 8  # max(8, 64 // 16)
    assert isinstance(ca.bn1, nn.GroupNorm) and ca.bn1.num_groups == 1
    assert isinstance(ca.act, nn.Hardswish)
    assert LKCA(512).attn.conv1.out_channels == 32  # 512 // 16
    assert op.has_skip


def test_lkca_forced_residual_degrades_to_identity_when_attention_dies():
    op = LKCA(16).eval()
    op.attn = _DeadAttention()
    x = torch.randn(2, 16, 12, 12)
    torch.testing.assert_close(op(x), x)


def test_lkca_strides_and_changes_width_without_residual():
    op = LKCA(16, 32, stride=2).eval()
    assert not op.has_skip
    assert op(torch.randn(1, 16, 15, 15)).shape == (1, 32, 8, 8)
    with pytest.raises(ValueError, match='stride'):
        LKCA(16, stride=3)


def test_dw3_baseline_is_the_same_operator_without_attention():
    base = DepthwiseSeparable3x3(32)
    assert base.conv_dw.kernel_size == (3, 3) and base.conv_dw.padding == (1, 1)
    assert isinstance(base.attn, nn.Identity)
    lk = LKCA(32)
    lk_params = sum(p.numel() for n, p in lk.named_parameters() if not n.startswith('attn'))
    base_params = sum(p.numel() for p in base.parameters())
    assert lk_params - base_params == 32 * (25 - 9)  # only the kernel differs


def test_coord_attention_starts_as_scaled_pass_through():
    ca = CoordAttention(32, init_gate=0.8)
    x = torch.randn(2, 32, 7, 9)
    torch.testing.assert_close(ca(x), 0.8 * x)


def _randomise(module):
    torch.manual_seed(0)
    for p in module.parameters():
        nn.init.normal_(p, std=0.5)
    return module


def test_coord_attention_keeps_position_that_se_loses():
    """Same channel means, different layout: SE gates (global pool) cannot tell them apart; CA gates can."""
    ca = _randomise(CoordAttention(8)).eval()
    se = _randomise(create_block_attn('se', 8)).eval()
    a = torch.zeros(1, 8, 6, 6)
    a[..., :3, :] = 1.0  # blob on top
    b = torch.flip(a, dims=[2])  # same blob at the bottom: identical global mean
    gate = lambda m, x: m(x + 1e-3) / (x + 1e-3)  # noqa: E731
    torch.testing.assert_close(gate(se, a).mean((2, 3)), gate(se, b).mean((2, 3)))
    # the CA gates follow the blob: gating of the top rows differs between a and b
    assert (gate(ca, a)[..., :3, :] - gate(ca, b)[..., :3, :]).abs().max() > 1e-3


def test_coord_attention_groupnorm_is_batch_size_independent():
    x = torch.randn(2, 16, 8, 8)
    gn = _randomise(CoordAttention(16, norm='gn')).train()
    torch.testing.assert_close(gn(x)[:1], gn(x[:1]))
    bn = _randomise(CoordAttention(16, norm='bn')).train()
    assert not torch.allclose(bn(x)[:1], bn(x[:1]), atol=1e-4)


def test_coord_attention_rejects_unknown_norm():
    with pytest.raises(ValueError, match="norm must be one of"):
        CoordAttention(16, norm='ln')


def test_sru_matches_paper_equations():
    sru = SRU(8, max_groups=4)
    assert torch.equal(sru.gn.weight, torch.ones(8)) and torch.equal(sru.gn.bias, torch.zeros(8))  # GroupNorm's init
    x = torch.randn(2, 8, 5, 5)
    # gamma = 1: W_gamma = 1/C, W = sigmoid(GN(x) / C), and the threshold 0.5 selects exactly where GN(x) >= 0
    gn = nn.functional.group_norm(x, 4)
    w = torch.sigmoid(gn / 8)
    selected = (gn >= 0).float()
    x1, x2 = selected * w * x, (1 - selected) * w * x
    expected = torch.cat([x1[:, :4] + x2[:, 4:], x2[:, :4] + x1[:, 4:]], dim=1)
    torch.testing.assert_close(sru(x), expected)


def test_sru_groupnorm_scale_and_shift_get_gradients():
    """The threshold only selects and the sigmoid weights multiply, so gamma and beta train (0/1 weights would not)."""
    sru = SRU(8, max_groups=4)
    sru(torch.randn(2, 8, 5, 5)).square().sum().backward()
    assert sru.gn.weight.grad.abs().sum() > 0 and sru.gn.bias.grad.abs().sum() > 0


def test_cru_fuses_branches_with_a_per_channel_softmax():
    cru = _randomise(CRU(16))
    x = torch.randn(2, 16, 6, 6)
    up, low = cru.squeeze_up(x[:, :8]), cru.squeeze_low(x[:, 8:])
    y1 = cru.gwc(up) + cru.pwc1(up)
    y2 = torch.cat([cru.pwc2(low), low], 1)
    s1, s2 = y1.mean((2, 3), keepdim=True), y2.mean((2, 3), keepdim=True)
    b1 = s1.exp() / (s1.exp() + s2.exp())
    torch.testing.assert_close(cru(x), b1 * y1 + (1 - b1) * y2)
    assert cru.gwc.groups == 2 and cru.gwc.in_channels == 4 and cru.pwc2.out_channels == 12


def test_scconv_shapes_and_bad_channel_counts():
    assert SCConv(24)(torch.randn(1, 24, 9, 9)).shape == (1, 24, 9, 9)
    with pytest.raises(ValueError, match='even channel count'):
        SCConv(7)
    with pytest.raises(ValueError, match='CRU cannot split'):
        CRU(6)


def test_block_attention_factory_rejects_unknown_names():
    assert isinstance(create_block_attn(None, 8), nn.Identity)
    with pytest.raises(ValueError, match="Unknown attention 'cbam'"):
        create_block_attn('cbam', 8)


@pytest.mark.parametrize('norm', ['gn', 'bn'])
def test_coord_attention_export_form_computes_the_same_function(norm):
    torch.manual_seed(0)
    ca = CoordAttention(48, norm=norm)
    for conv in (ca.conv1, ca.conv_h, ca.conv_w):  # gates far from their pass-through start
        nn.init.normal_(conv.weight, std=0.5)
    if norm == 'bn':
        ca.bn1.running_mean.normal_()
        ca.bn1.running_var.uniform_(0.5, 2)
    ca.bn1.weight.data.uniform_(0.5, 2)
    ca.bn1.bias.data.normal_()
    ca.eval()
    exported = CoordAttentionExport(ca)
    for shape in [(1, 48, 7, 7), (3, 48, 5, 9), (2, 48, 12, 1)]:
        x = torch.randn(shape) * 3
        with torch.no_grad():
            reference, ours = ca(x), exported(x)
        assert (reference - x).abs().max() > 0.1  # the attention does something
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_export_form_swaps_every_coordinate_attention_and_leaves_the_model_alone():
    import timm

    from fewshot_lkca.heads import export_form

    model = timm.create_model('lkca_mobilenet', num_classes=0).eval()
    swapped = export_form(model)
    assert swapped is not model and any(isinstance(m, CoordAttention) for m in model.modules())
    assert not any(isinstance(m, CoordAttention) for m in swapped.modules())
    assert sum(isinstance(m, CoordAttentionExport) for m in swapped.modules()) == sum(
        isinstance(m, CoordAttention) for m in model.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(swapped(x), model(x), rtol=1e-4, atol=1e-5)
    plain = timm.create_model('lkca_mobilenet_dw3', num_classes=0)
    assert export_form(plain) is plain  # nothing to swap: no copy


def test_mirror_views_export_form_computes_the_same_function():
    import timm

    from fewshot_lkca.heads import CosineHead, ExportForm, FewShotClassifier, MirrorViewsExport, export_form

    torch.manual_seed(0)
    backbone = timm.create_model('lkca_mobilenet_050', num_classes=0).eval()
    model = FewShotClassifier(backbone, CosineHead(backbone.head_hidden_size, 4), mirror_views=True).eval()
    x = torch.randn(3, 3, 40, 40)
    assert (x.flip(-1) - x).abs().max() > 0.1
    for wrapped in (model, ExportForm(model)):  # the ExecuTorch export traces the first, ONNX the second
        swapped = export_form(wrapped, width=40)
        assert any(isinstance(m, MirrorViewsExport) for m in swapped.modules())
        assert not any(isinstance(m, FewShotClassifier) for m in swapped.modules())
        with torch.no_grad():
            reference, ours = wrapped(x), swapped(x)
        for a, b in zip(ours if isinstance(ours, tuple) else (ours,),
                        reference if isinstance(reference, tuple) else (reference,), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    without_width = export_form(model)  # the flip needs the width: the training form's flip stays
    assert not any(isinstance(m, MirrorViewsExport) for m in without_width.modules())
    with torch.no_grad():
        one = export_form(model, width=40)(x[:1])  # batch 1, as a device runs it
    torch.testing.assert_close(one, model(x[:1]), rtol=1e-4, atol=1e-5)


def test_mirror_views_export_form_traces_with_a_dynamic_batch():
    pytest.importorskip('onnxruntime')
    import timm

    from fewshot_lkca.export.onnx import export_onnx
    from fewshot_lkca.export.session import onnx_session
    from fewshot_lkca.heads import CosineHead, ExportForm, FewShotClassifier, export_form

    torch.manual_seed(0)
    backbone = timm.create_model('lkca_mobilenet_050', num_classes=0).eval()
    model = ExportForm(FewShotClassifier(backbone, CosineHead(backbone.head_hidden_size, 5), mirror_views=True))
    model = export_form(model, width=40)  # what ExecuTorch traces; ONNX keeps the flip (a faster Slice there)
    session = onnx_session(export_onnx(model.eval(), torch.randn(2, 3, 40, 40),
                                       output_name=('logits', 'features')).SerializeToString())
    for batch in (1, 3):  # exported at 2: a batch fixed by the trace would refuse both
        x = torch.randn(batch, 3, 40, 40)
        logits, features = session.run(None, {'image': x.numpy()})
        with torch.no_grad():
            reference = model(x)
        np.testing.assert_allclose(logits, reference[0].numpy(), atol=1e-4)
        np.testing.assert_allclose(features, reference[1].numpy(), atol=1e-4)
