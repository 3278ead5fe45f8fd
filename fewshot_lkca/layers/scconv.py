"""SCConv: spatial and channel reconstruction convolution.

Paper: `SCConv: Spatial and Channel Reconstruction Convolution for Feature Redundancy`
(Li, Wen & He, CVPR 2023). Built from the paper's equations:

SRU (spatial reconstruction unit)
    ``W_gamma = gamma / sum(gamma)`` from the GroupNorm scales; ``W = sigmoid(GN(X) * W_gamma)``; the threshold
    (0.5) selects the informative positions ``M = [W >= 0.5]``; ``X1 = W1 * X``, ``X2 = W2 * X`` with
    ``W1 = M * W`` and ``W2 = (1 - M) * W``; cross reconstruction ``[X11 + X22, X21 + X12]`` (each split in
    channel halves). The paper's text sets the selected weights to exactly 1 and 0. That gate is a step function
    of gamma and beta: they would never receive a gradient and stay at their initialisation, dead parameters in
    every optimiser and checkpoint. Here the threshold only selects and the sigmoid weights multiply, so gamma and
    beta (and X, through the GroupNorm) train through the reweighted features, while the split into informative
    and redundant parts is the paper's. (Keeping the hard gate and making gamma, beta buffers would also remove
    the dead parameters, but would freeze the unit's notion of "informative" at GroupNorm's initialisation.)
    The GroupNorm starts as the GroupNorm paper's does (gamma = 1, beta = 0): ``W_gamma = 1/C``, so at
    initialisation a position is informative where it lies above its group's mean, and ``W`` is close to 0.5.
CRU (channel reconstruction unit)
    Split channels ``alpha*C`` / ``(1-alpha)*C`` (alpha = 1/2), squeeze each by ``r`` (= 2) with 1x1 convs.
    Upper: ``Y1 = GWC(Xup) + PWC1(Xup)`` (group-wise k x k conv with ``g`` = 2 groups plus a 1x1 conv, both to C).
    Lower: ``Y2 = [PWC2(Xlow), Xlow]`` (a 1x1 conv to ``C - (1-alpha)C/r`` channels, concatenated with its input:
    feature reuse). Fuse: ``S_m = GAP(Y_m)``, ``beta_1, beta_2 = softmax([S_1, S_2])`` per channel,
    ``Y = beta_1 * Y1 + beta_2 * Y2``. (Popular code takes the softmax over all 2C channels instead; the paper's
    equations take it per channel over the two branches, which is what we do.)
"""

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['SRU', 'CRU', 'SCConv']


def _group_count(channels: int, max_groups: int) -> int:
    """Largest divisor of ``channels`` that is <= ``max_groups`` (GroupNorm needs an exact division)."""
    return max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)


class SRU(nn.Module):
    """Spatial reconstruction unit: separate informative from redundant positions, then cross-reconstruct.

    Args:
        channels: Channels (even: the reconstruction swaps halves).
        max_groups: GroupNorm groups (the paper's 16), reduced to the largest divisor of ``channels``.
        gate_threshold: Sigmoid threshold separating informative weights (the paper's 0.5).

    The threshold selects and the sigmoid weights multiply (see the module docstring), so the GroupNorm's gamma and
    beta receive gradients; with the paper's 0/1 weights they would not.
    """

    def __init__(
            self,
            channels: int,
            max_groups: int = 16,
            gate_threshold: float = 0.5,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if channels % 2:
            raise ValueError(f'SRU needs an even channel count, got {channels}')
        self.gn = nn.GroupNorm(_group_count(channels, max_groups), channels, device=device, dtype=dtype)
        self.gate_threshold = gate_threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_gamma = (self.gn.weight / self.gn.weight.sum()).view(1, -1, 1, 1)  # (C,) -> (1, C, 1, 1)
        weights = torch.sigmoid(self.gn(x) * w_gamma)
        w1 = (weights >= self.gate_threshold).to(weights.dtype) * weights  # selected by the threshold, kept soft
        w2 = weights - w1
        x1 = w1 * x
        x2 = w2 * x
        x11, x12 = torch.chunk(x1, 2, dim=1)
        x21, x22 = torch.chunk(x2, 2, dim=1)
        return torch.cat([x11 + x22, x21 + x12], dim=1)


class CRU(nn.Module):
    """Channel reconstruction unit: split, cheap transform of both parts, softmax fuse.

    Args:
        channels: Input and output channels.
        alpha: Share of channels in the upper (rich) branch.
        squeeze_ratio: Squeeze ratio ``r`` of both branches.
        groups: Groups ``g`` of the group-wise conv.
        kernel_size: Kernel of the group-wise conv.
    """

    def __init__(
            self,
            channels: int,
            alpha: float = 0.5,
            squeeze_ratio: int = 2,
            groups: int = 2,
            kernel_size: int = 3,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.up_chs = int(alpha * channels)
        low_chs = channels - self.up_chs
        up_sq, low_sq = self.up_chs // squeeze_ratio, low_chs // squeeze_ratio
        if min(up_sq, low_sq) < 1 or up_sq % groups or channels % groups:
            raise ValueError(
                f'CRU cannot split {channels} channels with alpha={alpha}, r={squeeze_ratio}, g={groups}: '
                f'the squeezed upper part ({up_sq}) and C must be divisible by g')
        self.squeeze_up = nn.Conv2d(self.up_chs, up_sq, 1, bias=False, **dd)
        self.squeeze_low = nn.Conv2d(low_chs, low_sq, 1, bias=False, **dd)
        self.gwc = nn.Conv2d(up_sq, channels, kernel_size, padding=kernel_size // 2, groups=groups, bias=False, **dd)
        self.pwc1 = nn.Conv2d(up_sq, channels, 1, bias=False, **dd)
        self.pwc2 = nn.Conv2d(low_sq, channels - low_sq, 1, bias=False, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, low = torch.split(x, [self.up_chs, x.shape[1] - self.up_chs], dim=1)
        up = self.squeeze_up(up)
        low = self.squeeze_low(low)
        y1 = self.gwc(up) + self.pwc1(up)
        y2 = torch.cat([self.pwc2(low), low], dim=1)
        # (N, 2, C, 1, 1): softmax over the two branches, channel by channel.
        s = torch.stack([y1.mean((2, 3), keepdim=True), y2.mean((2, 3), keepdim=True)], dim=1)
        beta = F.softmax(s, dim=1)
        return beta[:, 0] * y1 + beta[:, 1] * y2


class SCConv(nn.Module):
    """SRU followed by CRU; same channels in and out, stride 1.

    Example:
        >>> m = SCConv(32)
        >>> m(torch.randn(2, 32, 14, 14)).shape
        torch.Size([2, 32, 14, 14])
    """

    def __init__(
            self,
            channels: int,
            max_groups: int = 16,
            gate_threshold: float = 0.5,
            alpha: float = 0.5,
            squeeze_ratio: int = 2,
            groups: int = 2,
            kernel_size: int = 3,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.sru = SRU(channels, max_groups=max_groups, gate_threshold=gate_threshold, **dd)
        self.cru = CRU(
            channels, alpha=alpha, squeeze_ratio=squeeze_ratio, groups=groups, kernel_size=kernel_size, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cru(self.sru(x))
