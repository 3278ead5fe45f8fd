"""What a recipe trains: the one freezing rule (timm's ``group_matcher`` groups) and BatchNorm's mode.

Every model of the package and timm's own expose ``group_matcher(coarse=True)``: the stem first, then one group per
stage. ``frozen_groups=k`` freezes the first ``k`` of them: the generic early features stay as pretrained.
"""
import timm
from torch import nn

__all__ = ['frozen_parameter_names', 'freeze_groups', 'set_batchnorm_eval']


def frozen_parameter_names(backbone: nn.Module, frozen_groups: int) -> set[str]:
    """Parameters of the first ``frozen_groups`` groups of timm's coarse group_matcher (stem, then stages)."""
    groups = timm.models.group_parameters(backbone, backbone.group_matcher(coarse=True))
    ordered = [groups[k] for k in sorted(groups)]
    return {name for group in ordered[:frozen_groups] for name in group}


def freeze_groups(backbone: nn.Module, frozen_groups: int) -> None:
    """Freeze the first ``frozen_groups`` groups, train the rest (``requires_grad``)."""
    frozen = frozen_parameter_names(backbone, frozen_groups)
    for name, p in backbone.named_parameters():
        p.requires_grad_(name not in frozen)


def set_batchnorm_eval(module: nn.Module) -> None:
    """BatchNorm layers use (and keep) their running statistics: batch statistics of 2-4 images are noise."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
