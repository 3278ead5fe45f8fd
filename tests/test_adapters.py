"""Residual adapters: step 0 is the pretrained network, only they train, and a checkpoint brings them back."""
import torch
from conftest import make_shapes_folder

from fewshot_lkca import create_backbone
from fewshot_lkca.adapters import ADAPTER_KEY, adapter_blocks, add_adapters
from fewshot_lkca.checkpoint import load_backbone
from fewshot_lkca.config import FinetuneConfig, apply_overrides
from fewshot_lkca.export.inputs import load_classifier
from fewshot_lkca.finetune import finetune_command
from fewshot_lkca.freezing import frozen_parameter_names


def test_zero_adapters_leave_the_network_as_it_was():
    torch.manual_seed(0)
    backbone = create_backbone('lkca_mobilenet', num_classes=0).eval()
    x = torch.randn(2, 3, 64, 64)
    before = backbone(x)
    names = adapter_blocks(backbone, frozen_parameter_names(backbone, 4))
    assert names and all(n.startswith(('blocks.3.', 'blocks.4.', 'blocks.5.')) for n in names)
    assert add_adapters(backbone, names, 64) > 0
    assert torch.equal(backbone(x), before)
    assert sum(k.endswith(ADAPTER_KEY) for k in backbone.state_dict()) == len(names)


def test_an_adapter_run_trains_only_adapters_and_its_checkpoint_and_onnx_bring_them_back(tmp_path):
    folder = make_shapes_folder(tmp_path / 'data', 8)
    cfg = apply_overrides(FinetuneConfig(), dict(
        data=str(folder), out=str(tmp_path / 'run'), protocol='episode', n_way=3, k_shot=3, n_query=4,
        weights='random', image_size=32, method='finetune', train_params='adapters', steps=3, guard=False,
        mirror_views=False, lr=0.05, optimizer='adamw', eval_episodes=2, export=['onnx']), source='test').validate()
    metrics = finetune_command(cfg, progress=False, log=lambda *_: None)
    model, _, _ = load_classifier(tmp_path / 'run' / 'model.safetensors')
    adapters = {k: v for k, v in model.state_dict().items() if k.endswith(ADAPTER_KEY)}
    assert adapters and any(v.abs().sum() > 0 for v in adapters.values())  # they trained
    assert metrics['trainable_parameters'] == sum(v.numel() for v in adapters.values()) + model.head.weight.numel() + 1
    assert metrics['trainable_parameters'] < 0.1 * sum(p.numel() for p in model.parameters())
    onnx = tmp_path / 'run' / 'export.json'
    assert onnx.is_file() and '"top1_agreement": 1.0' in onnx.read_text()  # ONNX, adapters included, agrees
    backbone, _, _ = load_backbone(None, str(tmp_path / 'run' / 'model.safetensors'))  # a start for another run
    assert any(k.endswith(ADAPTER_KEY) for k in backbone.state_dict())
