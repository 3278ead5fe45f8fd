"""The attention slot of a block, by name: what the ablation twins swap in and out."""
from functools import partial

from timm.layers import SqueezeExcite, make_divisible
from torch import nn

from .coord_attention import CoordAttention
from .scconv import SCConv

__all__ = ['ATTN_LAYERS', 'create_block_attn']


def _mobilenetv3_se(channels: int, device=None, dtype=None) -> nn.Module:
    # MobileNetV3's SE: squeeze to channels/4 (rounded to 8), ReLU, hard-sigmoid gate; shapes match its checkpoints.
    return SqueezeExcite(channels, rd_channels=make_divisible(channels * 0.25, 8), act_layer=nn.ReLU,
                         gate_layer='hard_sigmoid', device=device, dtype=dtype)


ATTN_LAYERS = {
    'ca': partial(CoordAttention, norm='gn'),  # the LKCA design: coordinate attention, GroupNorm bottleneck
    'cabn': partial(CoordAttention, norm='bn'),  # the paper's BatchNorm bottleneck
    'se': _mobilenetv3_se,
    'scconv': SCConv,
}


def create_block_attn(name: str | None, channels: int, device=None, dtype=None) -> nn.Module:
    """Build the attention module called ``name`` for ``channels`` channels (``None`` gives an identity).

    ``device`` and ``dtype`` are timm's factory arguments: the module's tensors are created there.
    """
    if name is None:
        return nn.Identity()
    if name not in ATTN_LAYERS:
        raise ValueError(f"Unknown attention '{name}'; choose from {sorted(ATTN_LAYERS)} or None")
    return ATTN_LAYERS[name](channels, device=device, dtype=dtype)
