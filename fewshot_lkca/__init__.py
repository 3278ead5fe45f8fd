"""fewshot_lkca: few-shot, memory-lean on-device fine-tuning built on the LKCA operator.

Importing the package registers the `lkca_mobilenet` family with timm::

    import fewshot_lkca, timm
    model = timm.create_model('lkca_mobilenet', num_classes=5)
"""
from . import models  # noqa: F401  (registers the models with timm)
from .models import create_backbone, list_backbones

__version__ = '0.1.0'
__all__ = ['create_backbone', 'list_backbones', '__version__']
