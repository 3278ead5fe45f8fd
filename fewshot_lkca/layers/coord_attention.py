"""Coordinate Attention with a selectable bottleneck norm.

Paper: `Coordinate Attention for Efficient Mobile Network Design` (Hou et al., CVPR 2021),
https://arxiv.org/abs/2103.02907

timm's `CoordAttn` already computes exactly the operator we want (strip means, shared 1x1 bottleneck, two
sigmoid gates); this module only fixes the design choices on top of it:

* bottleneck width ``mip = max(8, C // 16)`` (the paper's formula with reduction 16), not timm's
  ``make_divisible(C * rd_ratio * 2/3)``;
* ``GroupNorm(1, mip)`` in the bottleneck by default: a few-shot episode trains on 2-25 images, where
  BatchNorm statistics over the batch are noise;
* biased 1x1 convs (as in the paper) initialised so the attention starts as a near pass-through.
"""
import math

import torch
from timm.layers import GroupNorm1
from timm.layers.coord_attn import CoordAttn
from torch import nn

__all__ = ['CoordAttention', 'coord_attention_mip', 'gate_bias_for']

_NORMS = {'gn': GroupNorm1, 'bn': nn.BatchNorm2d}


def coord_attention_mip(channels: int, reduction: int = 16, min_mip: int = 8) -> int:
    """Bottleneck width of coordinate attention: ``max(min_mip, channels // reduction)``."""
    return max(min_mip, channels // reduction)


def gate_bias_for(gate_product: float) -> float:
    """Gate bias so that ``sigmoid(b) * sigmoid(b) == gate_product`` when the gate's weights are zero."""
    if not 0.0 < gate_product < 1.0:
        raise ValueError(f'gate_product must be in (0, 1), got {gate_product}')
    g = math.sqrt(gate_product)
    return math.log(g / (1.0 - g))


class CoordAttention(CoordAttn):
    """Coordinate attention: ``out = x * a_h * a_w`` with gates from H- and W-strip means.

    Pooling uses ``mean`` over one spatial axis ((N, C, H, W) -> (N, C, H, 1) and (N, C, 1, W)), which exports to
    ONNX with dynamic batch and image size.

    Args:
        channels: Channels of the attended feature map.
        reduction: Bottleneck reduction; ``mip = max(min_mip, channels // reduction)``.
        min_mip: Smallest bottleneck width.
        norm: ``'gn'`` (GroupNorm with one group: batch-size independent) or ``'bn'`` (BatchNorm, the paper's).
        act_layer: Bottleneck activation (Hardswish in the paper).
        init_gate: Product of the two gates at initialisation. The gate convs start at zero weight with this
            bias, so the block starts as ``x * init_gate`` everywhere: close to a pass-through.

    Example:
        >>> ca = CoordAttention(64)
        >>> ca(torch.randn(2, 64, 14, 14)).shape
        torch.Size([2, 64, 14, 14])
    """

    def __init__(
            self,
            channels: int,
            reduction: int = 16,
            min_mip: int = 8,
            norm: str = 'gn',
            act_layer: type[nn.Module] = nn.Hardswish,
            init_gate: float = 0.9,
            device=None,
            dtype=None,
    ):
        if norm not in _NORMS:
            raise ValueError(f"CoordAttention norm must be one of {sorted(_NORMS)}, got '{norm}'")
        super().__init__(
            channels,
            rd_channels=coord_attention_mip(channels, reduction, min_mip),
            bias=True,
            act_layer=act_layer,
            norm_layer=_NORMS[norm],
            gate_layer='sigmoid',
            device=device,
            dtype=dtype,
        )
        self.init_gate = init_gate
        self.reset_gates(init_gate)

    @torch.no_grad()
    def reset_gates(self, gate_product: float | torch.Tensor) -> None:
        """Zero the gate weights and set their biases so that ``a_h * a_w == gate_product`` (scalar or per channel)."""
        # Checked and computed on the CPU: the module may live on 'meta' (timm builds models there to inspect them).
        gate_product = torch.as_tensor(gate_product, dtype=self.conv_h.bias.dtype, device='cpu')
        if ((gate_product <= 0) | (gate_product >= 1)).any():
            raise ValueError('gate_product must lie in (0, 1)')
        g = gate_product.sqrt()
        bias = torch.log(g / (1 - g)).to(self.conv_h.bias.device).expand_as(self.conv_h.bias)
        for conv in (self.conv_h, self.conv_w):
            conv.weight.zero_()
            conv.bias.copy_(bias)
