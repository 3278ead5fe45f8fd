"""Training parts shared by fine-tuning and pretraining: optimizer and schedule (timm's), losses, distribution,
and a clean stop on Ctrl-C. Nothing here knows about data sets or run directories."""
from .distributed import Dist, init_distributed
from .losses import balanced_weights, prototypical_loss
from .optim import create_optimizer, create_scheduler
from .stop import StopRequest

__all__ = ['Dist', 'init_distributed', 'prototypical_loss', 'balanced_weights', 'create_optimizer', 'create_scheduler',
           'StopRequest']
