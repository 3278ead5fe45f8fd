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

__all__ = ['CoordAttention', 'CoordAttentionExport', 'coord_attention_mip', 'gate_bias_for']

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


class CoordAttentionExport(nn.Module):
    """The function of a `CoordAttention` in ops that device runtimes delegate whole (the form exports trace).

    The training form pools with ``mean`` over one axis, transposes, splits and calls ``GroupNorm``: XNNPACK
    (ExecuTorch 1.5) delegates a mean only over (2, 3) with keepdim and has no group_norm or split, so each of those
    ops cut the graph (lkca_mobilenet: 28 delegate segments). Here, same numbers within float rounding:

    * strip means as ``avg_pool2d`` with a (1, W) and an (H, 1) window;
    * the transposes as reshapes (one of the two swapped axes has size 1, so the memory order is the same);
    * ``GroupNorm(1, C)`` written out: the statistics as means over (2, 3) of a (N, 1, C, L) view, ``rsqrt``, then
      the per-channel scale and shift (a BatchNorm bottleneck, in eval mode, is applied as it is);
    * the split as two slices.

    Built from a trained module with `CoordAttentionExport.of`, sharing its parameters.
    """

    def __init__(self, attention: CoordAttn):
        super().__init__()
        self.conv1, self.bn1, self.act = attention.conv1, attention.bn1, attention.act
        self.conv_h, self.conv_w, self.gate = attention.conv_h, attention.conv_w, attention.gate
        self.has_skip = attention.has_skip
        self.group_norm = isinstance(self.bn1, nn.GroupNorm)
        if self.group_norm and self.bn1.num_groups != 1:
            raise ValueError(f'the export form writes out GroupNorm with one group, got {self.bn1.num_groups}')

    @classmethod
    def of(cls, model: nn.Module) -> nn.Module:
        """``model`` with every coordinate attention in it (or itself) replaced by its export form, in place."""
        if isinstance(model, CoordAttn):
            return cls(model)
        for name, child in model.named_children():
            setattr(model, name, cls.of(child))
        return model

    def _norm(self, y: torch.Tensor) -> torch.Tensor:
        if not self.group_norm:
            return self.bn1(y)
        n, c, length, _ = y.shape
        flat = y.reshape(-1, 1, c, length)  # (N, C, L, 1) -> (N, 1, C, L): one group's values on the last two axes
        centred = flat - flat.mean((2, 3), keepdim=True)
        scaled = centred * torch.rsqrt((centred * centred).mean((2, 3), keepdim=True) + self.bn1.eps)
        return scaled.reshape(-1, c, length, 1) * self.bn1.weight.view(1, c, 1, 1) + self.bn1.bias.view(1, c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        x_h = nn.functional.avg_pool2d(x, (1, w))  # (N, C, H, 1)
        x_w = nn.functional.avg_pool2d(x, (h, 1)).reshape(-1, c, w, 1)  # (N, C, 1, W) -> (N, C, W, 1)
        y = self.act(self._norm(self.conv1(torch.cat([x_h, x_w], dim=2))))
        mip = y.shape[1]
        a_h = self.gate(self.conv_h(y[:, :, :h]))
        a_w = self.gate(self.conv_w(y[:, :, h:].reshape(-1, mip, 1, w)))
        out = x * a_w * a_h
        return out + x if self.has_skip else out

