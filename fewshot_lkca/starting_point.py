"""Where fine-tuning starts: the backbone's weights, and one line saying where they came from and why.

``weights``:

* ``'auto'`` (the default): a data set with base classes gets the checkpoint shipped for it (`fewshot_lkca.weights`),
  else base pretraining on those classes (cached); a user's folder of photos gets the shipped photo checkpoint
  (distilled from ImageNet MobileNetV3-Small, online or offline alike), else ImageNet weights when timm can load them
  (its hub cache, or online), else the shipped look-alike checkpoint. No default fails on a plain folder.
* ``'base'``: pretrained on the data set's base classes by `fewshot_lkca.pretrain` (cached after the first run).
* anything `fewshot_lkca.checkpoint.load_backbone` takes: ``'imagenet'``, ``'random'``, a checkpoint or a source
  state_dict file.
"""
from torch import nn

__all__ = ['start_backbone', 'resolve_auto']


def _has_base_split(data: str) -> bool:
    from .task import data_card

    card = data_card(data)
    return card is not None and 'base' in card.get('splits', {})


def resolve_auto(model: str, data: str) -> tuple[str, str]:
    """What ``weights='auto'`` means for ``model`` on ``data``: a ``weights`` value and the reason, in words."""
    from .models.factory import imagenet_available
    from .weights import SHIPPED, shipped_checkpoint

    if _has_base_split(data):
        path = shipped_checkpoint(data, model)
        if path is not None:
            return str(path), f'the checkpoint shipped for {data} (pretrained from scratch on its base classes)'
        return 'base', f'no checkpoint is shipped for {model} on {data}: pretraining on its base classes'
    photos = shipped_checkpoint('photos', model)
    if photos is not None:
        return str(photos), ('a folder of photos: the checkpoint shipped for photos (distilled from ImageNet '
                             'MobileNetV3-Small; the same online and offline)')
    available, why = imagenet_available(model)
    if available:
        return 'imagenet', f'a folder of photos: ImageNet weights ({why})'
    fallback = next((d for d, entry in SHIPPED.items() if entry.model == model and shipped_checkpoint(d, model)
                     and d != 'photos'), None)
    if fallback is None:
        return 'random', f'a folder of photos, ImageNet weights unavailable ({why}) and no checkpoint shipped for ' \
                         f'{model}: random initialisation'
    return str(shipped_checkpoint(fallback, model)), (f'a folder of photos, ImageNet weights unavailable ({why}): the '
                                                      f'checkpoint shipped for {fallback}')


def start_backbone(cfg, image_size: int, log=print, progress: bool = True) -> tuple[nn.Module, str]:
    """The backbone to fine-tune (pre-logits output) and a line saying where its weights came from.

    Args:
        cfg: A `fewshot_lkca.config.FinetuneConfig` (model, weights, data and the ``base_*`` settings).
        image_size: The task's input side (base pretraining runs at it).
    """
    from .checkpoint import load_backbone

    weights = cfg.weights
    if weights == 'auto':
        weights, why = resolve_auto(cfg.model, cfg.data)
        log(f'starting point (--weights auto): {why}')
    if weights != 'base':
        backbone, _, origin = load_backbone(cfg.model, weights)
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
