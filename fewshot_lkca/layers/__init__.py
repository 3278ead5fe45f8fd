"""Operators of the LKCA design family."""
from .attention import ATTN_LAYERS, create_block_attn
from .coord_attention import CoordAttention, CoordAttentionExport, coord_attention_mip, gate_bias_for
from .lkca import LKCA, DepthwiseSeparable3x3
from .scconv import CRU, SRU, SCConv

__all__ = [
    'ATTN_LAYERS', 'create_block_attn', 'CoordAttention', 'CoordAttentionExport', 'coord_attention_mip',
    'gate_bias_for',
    'LKCA', 'DepthwiseSeparable3x3', 'CRU', 'SRU', 'SCConv',
]

if 'timm' in __import__('sys').modules:  # timm may have been first imported from here: register the models now
    from .. import _register_models

    _register_models(layers_ready=True)
