"""The lkca_mobilenet family against timm's model contract (after timm's own tests/test_models.py)."""
import pytest
import timm
import torch
from torch import nn

import fewshot_lkca
from fewshot_lkca.models import MIN_INPUT_SIZE, mobilenetv3_to_lkca
from fewshot_lkca.models.factory import BackboneError

FAMILY = ['lkca_mobilenet', 'lkca_mobilenet_050', 'lkca_mobilenet_075', 'lkca_mobilenet_cabn', 'lkca_mobilenet_dw3',
          'lkca_mobilenet_large', 'lkca_mobilenet_scconv', 'lkca_mobilenet_se']
SIZE = 64  # small inputs keep the tests fast; the architecture is size-agnostic above 32 px


def test_import_registers_the_family():
    assert sorted(fewshot_lkca.list_backbones()) == FAMILY
    for name in FAMILY:
        assert timm.is_model(name)
        assert timm.models.get_pretrained_cfg(name).hf_hub_id.startswith('timm/')


@pytest.mark.parametrize('name', FAMILY)
def test_forward_shapes_and_finite(name):
    model = timm.create_model(name, num_classes=7).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model.forward_head(feats)
        pre = model.forward_head(feats, pre_logits=True)
    assert feats.shape == (2, model.num_features, SIZE // 32, SIZE // 32)
    assert pre.shape == (2, model.head_hidden_size)
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()


def test_family_differs_in_the_intended_thing_only():
    def describe(model):
        kernels = {m.kernel_size[0] for n, m in model.named_modules() if n.endswith('conv_dw')}
        attns = {type(m).__name__ for n, m in model.named_modules() if n.endswith('.attn')}
        return kernels, attns
    assert describe(timm.create_model('lkca_mobilenet')) == ({5}, {'CoordAttention', 'Identity'})
    assert describe(timm.create_model('lkca_mobilenet_dw3')) == ({3}, {'Identity'})
    assert describe(timm.create_model('lkca_mobilenet_se')) == ({5}, {'SEModule', 'Identity'})
    assert describe(timm.create_model('lkca_mobilenet_scconv')) == ({5}, {'SCConv', 'Identity'})
    cabn = timm.create_model('lkca_mobilenet_cabn')
    assert all(isinstance(m.bn1, nn.BatchNorm2d) for m in cabn.modules() if type(m).__name__ == 'CoordAttention')
    ca = timm.create_model('lkca_mobilenet')
    assert all(isinstance(m.bn1, nn.GroupNorm) for m in ca.modules() if type(m).__name__ == 'CoordAttention')
    # attention sits exactly where MobileNetV3-Small has SE: every block but stage 1's two
    assert [n for n, m in ca.named_modules() if n.endswith('.attn') and isinstance(m, nn.Identity)] == \
        ['blocks.1.0.attn', 'blocks.1.1.attn']


def test_reset_classifier_and_pre_logits():
    model = timm.create_model('lkca_mobilenet')
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), nn.Identity)
    assert model(torch.randn(1, 3, SIZE, SIZE)).shape == (1, model.head_hidden_size)


def test_group_matcher_splits_stem_and_blocks():
    model = timm.create_model('lkca_mobilenet')
    groups = timm.models.group_parameters(model, model.group_matcher(coarse=True))
    groups = [groups[i] for i in sorted(groups)]
    assert set(groups[0]) == {'conv_stem.weight', 'bn1.weight', 'bn1.bias'}
    assert all(n.startswith('blocks.0.') for n in groups[1])
    assert len(groups) == 1 + len(model.blocks) + 1  # stem, stages, head
    assert 'classifier.weight' in groups[-1]
    fine = timm.models.group_parameters(model, model.group_matcher(coarse=False))
    assert len(fine) > len(groups)


def test_grad_checkpointing_gives_same_outputs_and_grads():
    torch.manual_seed(0)
    model = timm.create_model('lkca_mobilenet', num_classes=5, drop_rate=0.0).train()
    for p in model.blocks[:2].parameters():
        p.requires_grad_(False)  # checkpointing must also work with a frozen prefix
    x = torch.randn(2, 3, SIZE, SIZE)

    def run():
        model.zero_grad()
        torch.manual_seed(1)
        out = model(x)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_out, ref_grads = run()
    model.set_grad_checkpointing(True)
    out, grads = run()
    torch.testing.assert_close(out, ref_out)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], msg=n)


def test_residual_blocks_start_as_identity_unless_asked():
    model = timm.create_model('lkca_mobilenet').eval()
    skips = [b for stage in model.blocks for b in stage if getattr(b, 'has_skip', False)]
    assert len(skips) >= 4
    with torch.no_grad():
        for block in skips:
            x = torch.randn(2, block.bn3.num_features, 8, 8)  # a skip block keeps its channels
            torch.testing.assert_close(block(x), x)
        plain = timm.create_model('lkca_mobilenet', zero_init_last=False).eval()
        block = [b for stage in plain.blocks for b in stage if getattr(b, 'has_skip', False)][0]
        x = torch.randn(2, block.bn3.num_features, 8, 8)
        assert not torch.allclose(block(x), x)


def test_every_trainable_parameter_gets_a_gradient():
    # Without the zero-initialised residual branches (tested above), which get their gradient from step 2 on.
    model = timm.create_model('lkca_mobilenet', num_classes=5, zero_init_last=False).train()
    model(torch.randn(2, 3, SIZE, SIZE)).logsumexp(1).mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    # Gate convs start at zero weight, so the bottleneck before them gets its gradient from the second step on;
    # everything else must move on the first step.
    silent = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert all('.attn.conv1.' in n or '.attn.bn1.' in n for n in silent), silent


@pytest.mark.parametrize('name', ['lkca_mobilenet', 'lkca_mobilenet_large'])
def test_features_only_matches_feature_info(name):
    model = timm.create_model(name, features_only=True).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        feats = model(x)
    assert [f.shape[1] for f in feats] == model.feature_info.channels()
    assert [SIZE // f.shape[-1] for f in feats] == model.feature_info.reduction()
    picked = timm.create_model(name, features_only=True, out_indices=(2, 4))
    assert picked.feature_info.channels() == [model.feature_info.channels()[i] for i in (2, 4)]


def test_forward_intermediates_align_with_features_only():
    torch.manual_seed(0)
    model = timm.create_model('lkca_mobilenet').eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        feats = timm.create_model('lkca_mobilenet', features_only=True).eval()
        feats.load_state_dict({k.replace('blocks.', 'blocks_', 1): v for k, v in model.state_dict().items()
                               if not k.startswith(('conv_head', 'classifier'))})
        for a, b in zip(inter, feats(x), strict=True):
            torch.testing.assert_close(a, b)
        only = model.forward_intermediates(x, indices=2, intermediates_only=True, stop_early=True)
    assert [t.shape for t in only] == [t.shape for t in inter[-2:]]


@pytest.mark.parametrize('name', FAMILY)
def test_factory_device_and_dtype_reach_every_tensor(name):
    """timm's `device=` / `dtype=` (timm builds models on 'meta' to inspect them), also for a new classifier."""
    model = timm.create_model(name, device='meta', dtype=torch.float64)
    tensors = dict(model.named_parameters(), **dict(model.named_buffers()))
    assert not [n for n, t in tensors.items() if t.device.type != 'meta'], 'not on meta'
    assert not [n for n, t in tensors.items() if t.is_floating_point() and t.dtype != torch.float64], 'not float64'
    model.eval().reset_classifier(3)
    assert (model.classifier.weight.device.type, model.classifier.weight.dtype) == ('meta', torch.float64)
    assert not model.classifier.training
    assert model(torch.randn(1, 3, SIZE, SIZE, device='meta', dtype=torch.float64)).shape == (1, 3)


@pytest.mark.filterwarnings('ignore:The TorchScript type system:UserWarning')  # torch's own, scripting a GraphModule
def test_fx_trace_matches_eager_and_keeps_the_input_check():
    model = timm.create_model('lkca_mobilenet', num_classes=4).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert traced(x).equal(model(x))
        with pytest.raises(ValueError, match='3-channel images'):
            traced(torch.randn(1, 1, SIZE, SIZE))
        # the check is a scriptable function: an FX graph of the model scripts too (timm's FX + TorchScript test)
        assert torch.jit.script(traced)(x).equal(model(x))


def test_scconv_twin_trains_every_parameter():
    model = timm.create_model('lkca_mobilenet_scconv', num_classes=5, zero_init_last=False).train()
    model(torch.randn(2, 3, SIZE, SIZE)).logsumexp(1).mean().backward()
    sru = [n for n, _ in model.named_parameters() if '.sru.gn.' in n]
    assert sru and not [n for n, p in model.named_parameters() if p.grad is None]
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in sru)


def test_torchscript_matches_eager():
    model = timm.create_model('lkca_mobilenet', num_classes=4).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


def test_model_kwargs():
    gray = timm.create_model('lkca_mobilenet', in_chans=1, num_classes=2)
    assert gray(torch.randn(1, 1, SIZE, SIZE)).shape == (1, 2)
    model = timm.create_model('lkca_mobilenet', drop_path_rate=0.5, drop_rate=0.5).train()
    x = torch.randn(2, 3, SIZE, SIZE)
    assert not torch.allclose(model(x), model(x))
    assert model.eval()(x).equal(model(x))


@pytest.mark.parametrize('batch', [1, 2])
@pytest.mark.parametrize('name', ['lkca_mobilenet', 'lkca_mobilenet_cabn'])
def test_micro_batch_training_step_is_finite_and_sensible(name, batch):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(batch, 3, SIZE, SIZE), torch.arange(batch) % 5
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float('inf'))
        assert torch.isfinite(grad_norm) and 0 < grad_norm < 100
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # three steps on the same images must fit them better


def test_bad_inputs_get_clear_errors():
    model = timm.create_model('lkca_mobilenet').eval()
    with pytest.raises(ValueError, match=r'\(N, C, H, W\)'):
        model(torch.randn(3, SIZE, SIZE))
    with pytest.raises(ValueError, match='3-channel images'):
        model(torch.randn(1, 1, SIZE, SIZE))
    with pytest.raises(ValueError, match=f'at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}'):
        model(torch.randn(1, 3, 16, 64))
    with pytest.raises(ValueError, match='in_chans'):
        timm.create_model('lkca_mobilenet', in_chans=0)
    with pytest.raises(ValueError, match='pad_type'):
        timm.create_model('lkca_mobilenet', pad_type='valid')
    with pytest.raises(BackboneError, match="unknown model 'lkca_mobilnet'; did you mean 'lkca_mobilenet'"):
        fewshot_lkca.create_backbone('lkca_mobilnet')
    with pytest.raises(BackboneError, match='weights file not found'):
        fewshot_lkca.create_backbone('lkca_mobilenet', weights='/nonexistent/w.pth')


def test_bad_weight_files_are_refused(tmp_path):
    garbage = tmp_path / 'garbage.pth'
    garbage.write_text('not a checkpoint')
    with pytest.raises(BackboneError, match='cannot read weights file'):
        fewshot_lkca.create_backbone('lkca_mobilenet', weights=garbage)
    unrelated = tmp_path / 'unrelated.pth'
    torch.save({'fc.weight': torch.zeros(2, 2)}, unrelated)
    with pytest.raises(BackboneError, match='not a MobileNetV3 checkpoint'):
        fewshot_lkca.create_backbone('lkca_mobilenet', weights=unrelated)
    wrong = tmp_path / 'small.pth'
    torch.save(timm.create_model('mobilenetv3_small_100').state_dict(), wrong)
    with pytest.raises(BackboneError, match='does not fit'):
        fewshot_lkca.create_backbone('lkca_mobilenet_large', weights=wrong)


def _reference_mnv3(state_dict=None):
    """timm MobileNetV3-Small with symmetric padding and TF's BN eps: the same function our layout computes."""
    ref = timm.create_model('mobilenetv3_small_100', bn_eps=1e-3).eval()
    if state_dict is not None:
        ref.load_state_dict(state_dict)
    return ref


@pytest.mark.parametrize('source, pad_type', [('mobilenetv3_small_100', ''), ('tf_mobilenetv3_small_100', 'same')])
def test_transplant_is_exact_where_the_architectures_agree(source, pad_type):
    """SE twin + 3x3 kernels zero-padded to 5x5 must compute exactly what MobileNetV3 computes.

    With symmetric padding it matches timm's MobileNetV3 with symmetric padding; with ``pad_type='same'`` it matches
    the TensorFlow-padded `tf_` model the published weights come from.
    """
    torch.manual_seed(0)
    ref = timm.create_model(source, bn_eps=1e-3).eval()
    for m in ref.modules():  # non-trivial BN statistics so that a mis-mapped norm shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    model = timm.create_model('lkca_mobilenet_se', pad_type=pad_type).eval()
    model.load_state_dict(mobilenetv3_to_lkca(ref.state_dict(), model))
    assert len(model.transplant_report.padded) == 3 and not model.transplant_report.fresh
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)


def test_transplanted_attention_starts_where_the_se_was():
    torch.manual_seed(0)
    ref = _reference_mnv3()
    model = timm.create_model('lkca_mobilenet').eval()
    model.load_state_dict(mobilenetv3_to_lkca(ref.state_dict(), model))
    report = model.transplant_report
    assert len(report.gates_from_se) == 2 * 9  # 9 blocks had SE
    assert all('.attn.' in k for k in report.fresh)  # only the attention bottleneck is new
    # With zero gate weights, CA multiplies each channel by a constant: the SE's gate for the mean input.
    ca = model.blocks[2][0].attn
    x = torch.rand(1, ca.conv_h.out_channels, 5, 5)
    gate = (ca(x) / x).flatten(2)
    torch.testing.assert_close(gate.min(-1).values, gate.max(-1).values)
    assert ((gate > 0.0) & (gate < 1.0)).all()


def _nearest_mean_accuracy(features: torch.Tensor, labels: torch.Tensor, episodes: int = 100, seed: int = 0) -> float:
    """5-way 5-shot nearest-class-mean accuracy over random episodes (15 queries per class)."""
    g = torch.Generator().manual_seed(seed)
    features = nn.functional.normalize(features, dim=1)
    classes = labels.unique()
    correct = total = 0
    for _ in range(episodes):
        picked = classes[torch.randperm(len(classes), generator=g)[:5]]
        protos, queries, targets = [], [], []
        for j, c in enumerate(picked):
            idx = (labels == c).nonzero().flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            protos.append(features[idx[:5]].mean(0))
            queries.append(features[idx[5:20]])
            targets += [j] * len(idx[5:20])
        pred = torch.cdist(torch.cat(queries), torch.stack(protos)).argmin(1)
        correct += (pred == torch.tensor(targets)).sum().item()
        total += len(targets)
    return correct / total


@pytest.mark.shared
@pytest.mark.slow
def test_imagenet_transplant_from_shared_weights(mnv3_weights, omniglot_dir):
    """The transplanted network keeps the source's few-shot features (background alphabets: tuning data)."""
    import numpy as np
    se_twin = fewshot_lkca.create_backbone('lkca_mobilenet_se', weights=mnv3_weights, num_classes=0).eval()
    ref = _reference_mnv3(torch.load(mnv3_weights, weights_only=True))
    ref.reset_classifier(0)
    x = torch.rand(2, 3, 96, 96) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(se_twin(x), ref(x), rtol=1e-4, atol=1e-4)

    chars = np.load(omniglot_dir / 'images_background.npz')['images'][:30]  # 30 characters x 20 drawers
    images = torch.from_numpy(chars.reshape(-1, 1, 105, 105).astype(np.float32)).expand(-1, 3, -1, -1)
    images = nn.functional.interpolate(images, size=96, mode='bilinear', antialias=True) * 2 - 1
    labels = torch.arange(30).repeat_interleave(20)
    models = {
        'source': ref,
        'transplant': fewshot_lkca.create_backbone('lkca_mobilenet', weights=mnv3_weights, num_classes=0),
        'random': timm.create_model('lkca_mobilenet', num_classes=0),
    }
    acc = {}
    with torch.no_grad():
        for name, model in models.items():
            acc[name] = _nearest_mean_accuracy(model.eval()(images), labels)
    assert acc['transplant'] > acc['source'] - 0.03, acc
    assert acc['transplant'] > acc['random'] + 0.2, acc
