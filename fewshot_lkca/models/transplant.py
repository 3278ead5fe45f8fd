"""Transplant ImageNet MobileNetV3 weights (timm checkpoints) into an `LKCAMobileNet`.

The two networks share their macro layout, so most tensors carry over by name. The differences:

* Depthwise kernels: a 3x3 kernel zero-padded to 5x5 computes the same convolution, so 3x3 -> 5x5 is exact;
  5x5 -> 3x3 (the `_dw3` twin) keeps the centre crop, which is not exact, and is reported.
* MobileNetV3's first block is depthwise-separable (``conv_dw, bn1, se, conv_pw, bn2``); ours is the same block
  with the expansion skipped (``conv_dw, bn2, attn, conv_pwl, bn3``).
* Attention: SE weights carry over into the `_se` twin. Coordinate attention is new: its gate convs start at zero
  weight, and their biases make the gates reproduce what the source SE outputs for the channel-mean input (computed
  from the BatchNorm parameters in front of it). The new block so starts as the source block with an averaged SE:
  a pass-through of the source network's features, which training then refines per position. SCConv has no
  counterpart and starts fresh.
"""
import logging
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

__all__ = ['TransplantReport', 'mobilenetv3_to_lkca']

_logger = logging.getLogger(__name__)

# Gates are kept away from 0 and 1, where the sigmoid has no gradient left.
_GATE_RANGE = (0.02, 0.98)


@dataclass
class TransplantReport:
    """What a transplant did, tensor by tensor name."""
    copied: list[str] = field(default_factory=list)
    padded: list[str] = field(default_factory=list)  # depthwise kernels zero-padded (exact)
    cropped: list[str] = field(default_factory=list)  # depthwise kernels centre-cropped (approximate)
    gates_from_se: list[str] = field(default_factory=list)  # coordinate-attention gate biases set from the SE
    fresh: list[str] = field(default_factory=list)  # target tensors left at their initialisation
    unused: list[str] = field(default_factory=list)  # source tensors with no place in the target

    def summary(self, target: dict[str, torch.Tensor]) -> str:
        def count(keys):
            return sum(target[k].numel() for k in keys if k in target)
        moved = self.copied + self.padded + self.cropped
        return (f'transplanted {len(moved)} tensors ({count(moved):,} values; {len(self.padded)} depthwise kernels '
                f'zero-padded, {len(self.cropped)} centre-cropped); {len(self.gates_from_se)} attention gates set '
                f'from SE; fresh: {len(self.fresh)} tensors ({count(self.fresh):,} values); '
                f'unused from source: {len(self.unused)}')


def _source_key_map(state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
    """Map source checkpoint names to target names."""
    ds_blocks = {m.group(1) for k in state_dict if (m := re.match(r'(blocks\.\d+\.\d+)\.conv_dw\.', k))
                 and f'{m.group(1)}.conv_pwl.weight' not in state_dict}
    ds_rename = {'bn1': 'bn2', 'conv_pw': 'conv_pwl', 'bn2': 'bn3'}
    mapping = {}
    for key in state_dict:
        m = re.match(r'(blocks\.\d+\.\d+)\.([a-z_0-9]+)\.(.+)', key)
        if m is None:
            mapping[key] = key  # stem, head, classifier
            continue
        block, part, rest = m.groups()
        if block in ds_blocks:
            part = ds_rename.get(part, part)
        if part == 'se':
            part, rest = 'attn', rest.replace('conv_reduce', 'fc1').replace('conv_expand', 'fc2')
        elif part == 'bn1' and f'{block}.conv.weight' in state_dict:
            part = 'bn'  # the final 1x1 ConvBnAct: timm names its norm `bn1` there, `bn` in ConvNormAct
        mapping[key] = f'{block}.{part}.{rest}'
    return mapping


def _fit_depthwise(src: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, str] | None:
    """Zero-pad or centre-crop a (C, 1, k, k) depthwise kernel to ``shape``; None if that is not the mismatch."""
    if src.ndim != 4 or src.shape[:2] != shape[:2] or src.shape[1] != 1:
        return None
    k_src, k_dst = src.shape[-1], shape[-1]
    if k_src < k_dst:
        p = (k_dst - k_src) // 2
        return nn.functional.pad(src, (p, p, p, p)), 'padded'
    c = (k_src - k_dst) // 2
    return src[..., c:c + k_dst, c:c + k_dst].clone(), 'cropped'


def _mean_activation(bn_weight: torch.Tensor, bn_bias: torch.Tensor, act: nn.Module) -> torch.Tensor:
    """E[act(gamma * z + beta)] for z ~ N(0, 1) per channel: the channel mean SE pools, in expectation."""
    z, w = np.polynomial.hermite_e.hermegauss(32)
    z = torch.as_tensor(z, dtype=torch.float32)
    w = torch.as_tensor(w / w.sum(), dtype=torch.float32)
    pre = bn_weight.float()[:, None] * z[None, :] + bn_bias.float()[:, None]
    return (act(pre) * w[None, :]).sum(1)


def _se_gate(src: dict[str, torch.Tensor], se_prefix: str, pooled: torch.Tensor) -> torch.Tensor:
    """MobileNetV3 SE gate (ReLU bottleneck, hard-sigmoid) for a pooled channel vector."""
    w1, b1 = src[f'{se_prefix}.conv_reduce.weight'].flatten(1), src[f'{se_prefix}.conv_reduce.bias']
    if w1.shape[1] != pooled.numel():
        raise ValueError(f'{se_prefix} squeezes {w1.shape[1]} channels, the target block has {pooled.numel()}: '
                         'is this the checkpoint of the matching source model?')
    w2, b2 = src[f'{se_prefix}.conv_expand.weight'].flatten(1), src[f'{se_prefix}.conv_expand.bias']
    hidden = torch.relu(w1.float() @ pooled + b1.float())
    return nn.functional.hardsigmoid(w2.float() @ hidden + b2.float())


@torch.no_grad()
def mobilenetv3_to_lkca(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn``: turn a MobileNetV3 state dict into a full state dict for ``model``.

    Tensors with no source keep the model's own initialisation, so the result loads strictly. The report is
    logged and kept as ``model.transplant_report``.
    """
    target = model.state_dict()
    out = dict(target)
    report = TransplantReport()
    filled = set()
    for src_key, dst_key in _source_key_map(state_dict).items():
        src = state_dict[src_key]
        if dst_key.startswith('classifier.'):
            out[dst_key] = src  # timm's load_pretrained drops it when num_classes differs from the source's
            filled.add(dst_key)
            continue
        if dst_key not in target:
            report.unused.append(src_key)
            continue
        if src.shape == target[dst_key].shape:
            out[dst_key] = src.to(target[dst_key].dtype)
            report.copied.append(dst_key)
        elif dst_key == 'conv_stem.weight' and src.shape[0] == target[dst_key].shape[0]:
            out[dst_key] = src  # other in_chans: timm's load_pretrained adapts the first conv after this filter
            report.copied.append(dst_key)
        elif (fitted := _fit_depthwise(src, target[dst_key].shape)) is not None:
            out[dst_key] = fitted[0].to(target[dst_key].dtype)
            getattr(report, fitted[1]).append(dst_key)
        else:
            raise ValueError(f'{src_key} {tuple(src.shape)} does not fit {dst_key} {tuple(target[dst_key].shape)}: '
                             'is this the checkpoint of the matching source model?')
        filled.add(dst_key)

    # Coordinate-attention gates: start each block where the source SE would have put its channels.
    for name, module in model.named_modules():
        if not hasattr(module, 'reset_gates'):
            continue
        block = name.rsplit('.attn', 1)[0]
        src_block = next((k.rsplit('.se.', 1)[0] for k in state_dict
                          if k.startswith(block + '.se.conv_reduce.weight')), None)
        if src_block is None:
            continue
        bn_prefix = f'{block}.bn2'  # target name of the norm+act in front of the attention
        act = model.get_submodule(bn_prefix).act
        pooled = _mean_activation(out[f'{bn_prefix}.weight'], out[f'{bn_prefix}.bias'], act)
        gate = _se_gate(state_dict, f'{src_block}.se', pooled).clamp(*_GATE_RANGE)
        g = gate.sqrt()  # split evenly over the H and W gates
        bias = torch.log(g / (1 - g))
        for conv in ('conv_h', 'conv_w'):
            out[f'{name}.{conv}.weight'] = torch.zeros_like(target[f'{name}.{conv}.weight'])
            out[f'{name}.{conv}.bias'] = bias.to(target[f'{name}.{conv}.bias'].dtype)
            report.gates_from_se.append(f'{name}.{conv}.bias')
            filled.add(f'{name}.{conv}.bias')

    if 'conv_stem.weight' not in filled or len(filled) < len(target) // 2:
        raise ValueError(f'only {len(filled)} of {len(target)} tensors found a source tensor: '
                         'this is not a MobileNetV3 checkpoint of the matching layout')
    report.fresh = [k for k in target if k not in filled and not k.endswith('num_batches_tracked')]
    model.transplant_report = report
    _logger.info('%s: %s', type(model).__name__, report.summary(target))
    return out
