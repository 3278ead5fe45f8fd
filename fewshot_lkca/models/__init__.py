"""Backbones registered with timm on import."""
from .blocks import BlockSpec, LKCABlock
from .factory import create_backbone, list_backbones
from .lkca_mobilenet import MIN_INPUT_SIZE, LKCAMobileNet
from .transplant import TransplantReport, mobilenetv3_to_lkca

__all__ = [
    'create_backbone', 'list_backbones', 'MIN_INPUT_SIZE', 'BlockSpec', 'LKCABlock', 'LKCAMobileNet',
    'TransplantReport', 'mobilenetv3_to_lkca',
]
