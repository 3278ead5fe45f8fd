"""The LKCA operator (large-kernel coordinate attention) and its plain 3x3 depthwise baseline.

LKCA is a depthwise-separable convolution with a large kernel and coordinate attention after it::

    x -> DW kxk (stride s, no bias) -> PW 1x1 -> BN -> Hardswish -> CoordAttention(GroupNorm) -> (+ x)

* 5x5 depthwise: a larger receptive field at nearly the cost of 3x3 (depthwise MACs are a small share of a
  MobileNet; measured 1.03x latency for all-5x5 MobileNetV3-Small on this CPU).
* Coordinate attention pools along H and W separately, so the gates keep *where* a feature is, which SE's global
  pool throws away; its bottleneck uses GroupNorm so that batch size 2 trains stably.
* Forced residual whenever stride is 1 and channels match: if the attention collapses (gates -> 0), the block
  degrades to the identity instead of killing the signal, i.e. the network degrades to a plain conv stack.
"""
from collections.abc import Callable

import torch
from timm.layers import BatchNormAct2d, DropPath, create_conv2d
from torch import nn

from .coord_attention import CoordAttention

__all__ = ['LKCA', 'DepthwiseSeparable3x3']


class LKCA(nn.Module):
    """Large-kernel depthwise-separable conv with coordinate attention and a forced residual.

    Args:
        in_chs: Input channels.
        out_chs: Output channels (default: ``in_chs``).
        stride: Stride of the depthwise conv.
        dw_kernel_size: Depthwise kernel size (5: the large-kernel design; padding ``k // 2``).
        attn_layer: Callable ``(channels, device=, dtype=) -> nn.Module`` for the attention on the output, or None.
        act_layer: Activation after the pointwise conv's BatchNorm.
        drop_path_rate: Stochastic depth on the residual branch.

    Example:
        >>> op = LKCA(32)
        >>> op(torch.randn(2, 32, 28, 28)).shape
        torch.Size([2, 32, 28, 28])
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int | None = None,
            stride: int = 1,
            dw_kernel_size: int = 5,
            attn_layer: Callable[..., nn.Module] | None = CoordAttention,
            act_layer: type[nn.Module] = nn.Hardswish,
            drop_path_rate: float = 0.0,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        out_chs = out_chs or in_chs
        if stride not in (1, 2):
            raise ValueError(f'LKCA stride must be 1 or 2, got {stride}')
        self.conv_dw = create_conv2d(in_chs, in_chs, dw_kernel_size, stride=stride, depthwise=True, **dd)
        self.conv_pw = create_conv2d(in_chs, out_chs, 1, **dd)
        self.bn1 = BatchNormAct2d(out_chs, act_layer=act_layer, **dd)
        self.attn = attn_layer(out_chs, **dd) if attn_layer is not None else nn.Identity()
        self.has_skip = stride == 1 and in_chs == out_chs
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_dw(x)
        x = self.conv_pw(x)
        x = self.bn1(x)
        x = self.attn(x)
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


class DepthwiseSeparable3x3(LKCA):
    """The baseline the LKCA claim is measured against: the same operator with a 3x3 kernel and no attention."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int | None = None,
            stride: int = 1,
            act_layer: type[nn.Module] = nn.Hardswish,
            drop_path_rate: float = 0.0,
            device=None,
            dtype=None,
    ):
        super().__init__(
            in_chs, out_chs, stride=stride, dw_kernel_size=3, attn_layer=None,
            act_layer=act_layer, drop_path_rate=drop_path_rate, device=device, dtype=dtype,
        )
