"""Blocks and stage specs of LKCA-MobileNet (`fewshot_lkca.models.lkca_mobilenet`).

The stage specs are MobileNetV3's (timm's `mobilenetv3_small_100` / `mobilenetv3_large_100` arch_defs) written as
explicit tuples of `BlockSpec`; `build_stages` turns them into the network's `blocks` and their `feature_info`.
Module names here are checkpoint keys (``blocks.{stage}.{block}.conv_dw.weight``, ...): they do not change.
"""
from dataclasses import dataclass
from functools import partial

import torch
from timm.layers import BatchNormAct2d, ConvNormAct, DropPath, create_conv2d, get_act_layer, make_divisible
from torch import nn

from ..layers import create_block_attn

__all__ = ['BlockSpec', 'LKCABlock', 'SMALL_STAGES', 'SMALL_HEAD', 'LARGE_STAGES', 'LARGE_HEAD', 'build_stages']


@dataclass(frozen=True)
class BlockSpec:
    """One block of a stage: MobileNetV3's numbers, before width scaling."""
    exp_ratio: float
    out_chs: int
    stride: int
    act: str  # 'relu' or 'hard_swish'
    attn: bool  # True where MobileNetV3 has squeeze-excitation
    source_kernel: int  # MobileNetV3's depthwise kernel (the transplant zero-pads or crops it)


def _stage(n: int, exp_ratio: float, out_chs: int, stride: int, act: str, attn: bool, kernel: int):
    """``n`` blocks; only the first one strides."""
    return tuple(BlockSpec(exp_ratio, out_chs, stride if i == 0 else 1, act, attn, kernel) for i in range(n))


# MobileNetV3-Small (timm `mobilenetv3_small_100` arch_def), stages as tuples of blocks.
SMALL_STAGES = (
    _stage(1, 1.0, 16, 2, 'relu', True, 3),  # 112 px in
    _stage(1, 4.5, 24, 2, 'relu', False, 3) + _stage(1, 3.67, 24, 1, 'relu', False, 3),  # 56 px in
    _stage(1, 4.0, 40, 2, 'hard_swish', True, 5) + _stage(2, 6.0, 40, 1, 'hard_swish', True, 5),  # 28 px in
    _stage(2, 3.0, 48, 1, 'hard_swish', True, 5),  # 14 px in
    _stage(3, 6.0, 96, 2, 'hard_swish', True, 5),  # 14 px in
)
SMALL_HEAD = dict(last_chs=576, num_features=1024)

# MobileNetV3-Large (timm `mobilenetv3_large_100` arch_def).
LARGE_STAGES = (
    _stage(1, 1.0, 16, 1, 'relu', False, 3),  # 112 px in
    _stage(1, 4.0, 24, 2, 'relu', False, 3) + _stage(1, 3.0, 24, 1, 'relu', False, 3),
    _stage(3, 3.0, 40, 2, 'relu', True, 5),
    _stage(1, 6.0, 80, 2, 'hard_swish', False, 3) + _stage(1, 2.5, 80, 1, 'hard_swish', False, 3)
    + _stage(2, 2.3, 80, 1, 'hard_swish', False, 3),
    _stage(2, 6.0, 112, 1, 'hard_swish', True, 3),
    _stage(3, 6.0, 160, 2, 'hard_swish', True, 5),
)
LARGE_HEAD = dict(last_chs=960, num_features=1280)


class LKCABlock(nn.Module):
    """Inverted residual with a large-kernel depthwise conv and a swappable attention slot.

    With ``exp_ratio == 1`` the expansion is skipped (MobileNetV3's depthwise-separable first block).
    The residual is always taken when ``stride == 1`` and ``in_chs == out_chs`` (no opt-out).
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            stride: int = 1,
            exp_ratio: float = 1.0,
            dw_kernel_size: int = 5,
            act_layer: type[nn.Module] = nn.Hardswish,
            attn_layer: str | None = 'ca',
            bn_eps: float = 1e-3,
            drop_path_rate: float = 0.0,
            pad_type: str = '',
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        mid_chs = make_divisible(in_chs * exp_ratio) if exp_ratio != 1.0 else in_chs
        norm_act = partial(BatchNormAct2d, eps=bn_eps, act_layer=act_layer)
        if exp_ratio != 1.0:
            self.conv_pw = create_conv2d(in_chs, mid_chs, 1, **dd)
            self.bn1 = norm_act(mid_chs, **dd)
        else:
            self.conv_pw = nn.Identity()
            self.bn1 = nn.Identity()
        self.conv_dw = create_conv2d(mid_chs, mid_chs, dw_kernel_size, stride=stride, depthwise=True,
                                     padding=pad_type, **dd)
        self.bn2 = norm_act(mid_chs, **dd)
        self.attn = create_block_attn(attn_layer, mid_chs, **dd)
        self.conv_pwl = create_conv2d(mid_chs, out_chs, 1, **dd)
        self.bn3 = BatchNormAct2d(out_chs, eps=bn_eps, apply_act=False, **dd)  # linear bottleneck
        self.has_skip = stride == 1 and in_chs == out_chs
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.bn1(self.conv_pw(x))
        x = self.bn2(self.conv_dw(x))
        x = self.attn(x)
        x = self.bn3(self.conv_pwl(x))
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


def build_stages(
        stages: tuple[tuple[BlockSpec, ...], ...],
        in_chs: int,
        last_chs: int,
        width: float = 1.0,
        dw_kernel_size: int = 5,
        attn_layer: str | None = 'ca',
        bn_eps: float = 1e-3,
        drop_path_rate: float = 0.0,
        pad_type: str = '',
        device=None,
        dtype=None,
) -> tuple[nn.Sequential, list[dict]]:
    """One `nn.Sequential` of `LKCABlock` per stage, then MobileNetV3's final 1x1 conv as a stage of its own.

    Args:
        stages: Tuple of stages, each a tuple of `BlockSpec`.
        in_chs: Channels coming from the stem (stride 2).
        last_chs: Channels of the final 1x1 conv, before width scaling.
        width: Channel multiplier (rounded to multiples of 8, as MobileNetV3).
        dw_kernel_size, attn_layer, bn_eps, pad_type: As `LKCABlock`; the attention goes only where the spec has it.
        drop_path_rate: Stochastic depth, rising linearly over blocks to this value.

    Returns:
        The blocks and one timm ``feature_info`` dict per stage (``module='blocks.{i}'``).
    """
    dd = dict(device=device, dtype=dtype)
    acts = {'relu': nn.ReLU, 'hard_swish': get_act_layer('hard_swish')}
    num_blocks = sum(len(s) for s in stages)
    dpr = [drop_path_rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]
    reduction, block_idx = 2, 0
    stage_modules, feature_info = [], []
    for stage_idx, stage in enumerate(stages):
        blocks = []
        for spec in stage:
            out_chs = make_divisible(spec.out_chs * width)
            blocks.append(LKCABlock(
                in_chs, out_chs, stride=spec.stride, exp_ratio=spec.exp_ratio, dw_kernel_size=dw_kernel_size,
                act_layer=acts[spec.act], attn_layer=attn_layer if spec.attn else None, bn_eps=bn_eps,
                drop_path_rate=dpr[block_idx], pad_type=pad_type, **dd))
            in_chs, reduction, block_idx = out_chs, reduction * spec.stride, block_idx + 1
        stage_modules.append(nn.Sequential(*blocks))
        feature_info.append(dict(num_chs=in_chs, reduction=reduction, module=f'blocks.{stage_idx}'))
    last_chs = make_divisible(last_chs * width)
    stage_modules.append(nn.Sequential(ConvNormAct(
        in_chs, last_chs, 1, norm_layer=nn.BatchNorm2d, norm_kwargs=dict(eps=bn_eps), act_layer=acts['hard_swish'],
        **dd)))
    feature_info.append(dict(num_chs=last_chs, reduction=reduction, module=f'blocks.{len(stages)}'))
    return nn.Sequential(*stage_modules), feature_info
