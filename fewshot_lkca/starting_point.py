"""Where fine-tuning starts: the backbone's weights, and one line saying where they came from.

``weights`` is ``'base'`` (pretrained on the data set's base classes by `fewshot_lkca.pretrain`, cached), or anything
`fewshot_lkca.checkpoint.load_backbone` takes: ``'imagenet'``, ``'random'``, a checkpoint or a source state_dict.
"""
from torch import nn

__all__ = ['start_backbone']


def start_backbone(cfg, image_size: int, log=print, progress: bool = True) -> tuple[nn.Module, str]:
    """The backbone to fine-tune (pre-logits output) and a line saying where its weights came from.

    Args:
        cfg: A `fewshot_lkca.config.FinetuneConfig` (model, weights, data and the ``base_*`` settings).
        image_size: The task's input side (base pretraining runs at it).
    """
    from .checkpoint import load_backbone

    if cfg.weights != 'base':
        backbone, _, origin = load_backbone(cfg.model, cfg.weights)
        return backbone, origin
    from .models import create_backbone
    from .pretrain import base_pretrained

    log(f'starting point: {cfg.model} pretrained on the base classes of {cfg.data} (cached after the first run)')
    state, path, cached = base_pretrained(cfg.model, cfg.data, image_size, cfg.base_steps, cfg.base_batch_size,
                                          cfg.base_lr, seed=0, images_per_class=cfg.base_images_per_class,
                                          progress=progress)
    backbone = create_backbone(cfg.model, num_classes=0)
    backbone.load_state_dict(state)
    return backbone, f'{cfg.model} pretrained on {cfg.data} base classes ({"cached" if cached else "new"}: {path})'
