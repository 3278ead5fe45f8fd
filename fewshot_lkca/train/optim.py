"""Optimizer and learning-rate schedule, from timm's factories (`timm.optim`, `timm.scheduler`).

The schedule is stepped per optimizer update (``t_in_epochs=False``): ``scheduler.step_update(step)`` before step
``step`` sets every group's rate from its own base rate, so a resumed run picks the schedule up at its step.
"""
import torch
from torch import nn

__all__ = ['OPTIMIZERS', 'create_optimizer', 'create_scheduler']

# Our config's names -> timm's. 'sgd' is classical momentum SGD ('momentum' in timm, whose 'sgd' is Nesterov's).
OPTIMIZERS = {'sgd': 'momentum', 'adamw': 'adamw'}


def create_optimizer(model_or_groups: nn.Module | list[dict], name: str, lr: float, weight_decay: float = 0.0,
                     momentum: float = 0.9) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2``.

    Args:
        model_or_groups: A module (its trainable parameters; norms and biases get no weight decay) or explicit
            parameter groups (each may carry its own ``lr``).
        name: A key of `OPTIMIZERS`.
    """
    from timm.optim import create_optimizer_v2

    kwargs = dict(momentum=momentum) if OPTIMIZERS[name] == 'momentum' else {}
    return create_optimizer_v2(model_or_groups, opt=OPTIMIZERS[name], lr=lr, weight_decay=weight_decay, **kwargs)


def create_scheduler(optimizer: torch.optim.Optimizer, steps: int, warmup_steps: int = 0):
    """Linear warm-up from 0 over ``warmup_steps``, then cosine decay towards 0 at ``steps`` (timm's
    ``CosineLRScheduler``, per update)."""
    from timm.scheduler import CosineLRScheduler

    warmup = min(warmup_steps, max(0, steps - 1))
    return CosineLRScheduler(optimizer, t_initial=max(2, steps - warmup), lr_min=0.0, warmup_t=warmup,
                             warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
