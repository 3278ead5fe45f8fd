"""The few-shot task: which data, at which input size, which classes, which images train and which are held out.

Three rules live here and nowhere else:

* `dataset_options`: how a job reads a data set (the look-alike renderer's cache, size and count);
* `input_size`: the model's input side (the option; else a checkpoint's; else the data's own, as rendered or as its
  card states, e.g. Omniglot's 105 px; else 224 px for photos);
* the episode class check (`fewshot_lkca.data.usable_classes`), called by `build_task` before anything is written;
* `protocol`: a data set card (or a folder with split lists) gives the episodic protocol (``n_way`` classes drawn,
  ``k_shot`` images each train, the rest are held out); a plain folder of class folders gives ``'all'``: every class
  and every usable image train, and `fewshot_lkca.estimate` says how well the model does on images it never saw.
  ``PHOTOS/train`` and ``PHOTOS/val`` beside each other are used as such.
"""
import copy
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DataError, DataWarning

__all__ = ['Task', 'PHOTO_SIZE', 'is_folder', 'data_card', 'dataset_options', 'input_size', 'protocol',
           'build_task', 'load_images', 'default_out']

PHOTO_SIZE = 224  # a user's photos: the ImageNet input side the backbones were designed at


@dataclass
class Task:
    """The few-shot task: which images are the support set and which are held out, per episode label."""
    dataset: object  # ImageDataset of the split, raw (no transform)
    class_names: list[str]
    support_idx: list[int]
    support_y: list[int]
    pool_idx: list[int]  # every other image of the task's classes
    pool_y: list[int]
    image_size: int
    protocol: str = 'episode'  # 'episode' or 'all' (`protocol`)
    layout: str = ''  # 'all': 'train/val' when the folder has both, else 'one folder'


def is_folder(data: str) -> bool:
    """True when ``data`` names an image folder rather than a data set card."""
    return Path(data).expanduser().is_dir()


def data_card(data: str) -> dict | None:
    """The data card of a card name or .yaml file, None for an image folder (it has none)."""
    from .data import get_card

    return None if is_folder(data) else get_card(data)


def dataset_options(data: str, image_size: int = 0, images_per_class: int = 0, cache: bool = True) -> dict:
    """Reader options for a job: the look-alike set is rendered at the asked size and count, once (``cache``)."""
    card = data_card(data)
    if card is None or card['reader'] != 'lookalike':
        return {}
    options = dict(cache=cache)  # render once: the support set is read every step
    if image_size:
        options['image_size'] = image_size
    if images_per_class:
        options['images_per_class'] = images_per_class
    return options


def input_size(data: str, image_size: int = 0, dataset=None, checkpoint_size: int = 0) -> tuple[int, str]:
    """The model's input side and where it came from.

    Args:
        data: Card name or image-folder path.
        image_size: The ``image_size`` option; 0 = not set.
        dataset: The data set, when it knows its own size (the look-alike renderer does).
        checkpoint_size: The size a checkpoint was trained at; 0 = none.

    Example:
        >>> input_size('omniglot')  # doctest: +SKIP
        (105, 'omniglot data card')
    """
    if image_size:
        return int(image_size), 'image_size option'
    if checkpoint_size:
        return int(checkpoint_size), 'checkpoint'
    if getattr(dataset, 'image_size', 0):
        return int(dataset.image_size), 'data set'
    card = data_card(data)
    if card and card.get('image_size'):
        return int(card['image_size']), f'{card["name"]} data card'
    return PHOTO_SIZE, 'default for photos'


def protocol(cfg) -> str:
    """'episode' for a data set card or a folder with the split's class list (``<split>.txt``), 'all' for a plain
    folder of class folders; the ``protocol`` option, when not 'auto', decides."""
    if cfg.protocol != 'auto':
        return cfg.protocol
    if not is_folder(cfg.data):
        return 'episode'
    return 'episode' if (Path(cfg.data).expanduser() / f'{cfg.split}.txt').is_file() else 'all'


def build_task(cfg) -> Task:
    """The task of ``cfg``'s protocol: an episode (`_episode_task`) or every class and image (`_whole_task`)."""
    return _whole_task(cfg) if protocol(cfg) == 'all' else _episode_task(cfg)


def _whole_task(cfg) -> Task:
    """Every class and every usable image of a folder train; ``train/`` + ``val/`` beside each other: val's images
    are the held-out pool, else there is none (`fewshot_lkca.estimate` holds images out itself)."""
    from .data import ImageFolderDataset, get_dataset

    root = Path(cfg.data).expanduser()
    if (root / 'train').is_dir() and (root / 'val').is_dir():
        train = get_dataset(root / 'train')
        extra = sorted(p.name for p in (root / 'val').iterdir() if p.is_dir() and p.name not in train.classes
                       and not p.name.startswith('.'))
        if extra:
            raise DataError(f'{root / "val"} has classes that {root / "train"} has not: {extra[:5]}')
        in_val = [c for c in train.classes if (root / 'val' / c).is_dir()]
        if len(in_val) < len(train.classes):
            warnings.warn(f'{root / "val"} has no folder for {sorted(set(train.classes) - set(in_val))[:5]}: their '
                          'accuracy is not estimated', DataWarning, stacklevel=2)
        val = ImageFolderDataset(root / 'val', classes=in_val)
        dataset, pool_idx, pool_y = _joined(train, val)
        layout = 'train/val'
    else:
        dataset, pool_idx, pool_y, layout = get_dataset(cfg.data, split=cfg.split), [], [], 'one folder'
    size, _ = input_size(cfg.data, cfg.image_size, dataset, _checkpoint_size(cfg.weights))
    support_idx = list(range(len(dataset.targets) - len(pool_idx)))
    return Task(dataset, list(dataset.classes), support_idx, [dataset.targets[i] for i in support_idx], pool_idx,
                pool_y, size, 'all', layout)


def _joined(train, val):
    """One data set of train's images then val's (labels as train's), and the positions and labels of val's."""
    joined = copy.copy(train)
    labels = [train.classes.index(val.classes[t]) for t in val.targets]
    joined.samples = list(train.samples) + list(val.samples)
    joined.targets = list(train.targets) + labels
    return joined, list(range(len(train.targets), len(joined.targets))), labels


def _episode_task(cfg) -> Task:
    """Draw the task's classes and support set (episode 0 of the seed) and collect the held-out pool.

    Args:
        cfg: A `fewshot_lkca.config.FinetuneConfig` (data, split, n_way, k_shot, n_query, seed, image_size,
            images_per_class).

    Raises:
        DataError: The data cannot be read, or too few of its classes can fill an episode.
    """
    from .data import EpisodeSampler, get_dataset, usable_classes

    dataset = get_dataset(cfg.data, split=cfg.split, **dataset_options(cfg.data, cfg.image_size,
                                                                        cfg.images_per_class))
    usable_classes(dataset.targets, cfg.n_way, cfg.k_shot, cfg.n_query, dataset.classes, drop_small=True, warn=False,
                   where=f"'{cfg.data}' ({cfg.split})")
    # Classes too small for an evaluation episode stay out of the task (with a warning), while n_way remain.
    plan = EpisodeSampler(dataset, cfg.n_way, cfg.k_shot, cfg.n_query, seed=cfg.seed, drop_small_classes=True).plan(0)
    label_of = {name: y for y, name in enumerate(plan.class_names)}
    support = set(plan.support_idx)
    pool_idx, pool_y = [], []
    for i, t in enumerate(dataset.targets):
        name = dataset.classes[t]
        if name in label_of and i not in support:
            pool_idx.append(i)
            pool_y.append(label_of[name])
    size, _ = input_size(cfg.data, cfg.image_size, dataset, _checkpoint_size(cfg.weights))
    return Task(dataset, plan.class_names, plan.support_idx, plan.support_y, pool_idx, pool_y, size)


def _checkpoint_size(weights: str) -> int:
    """The input side a ``--weights`` checkpoint of this package was trained at (0: none, or not such a file)."""
    from .checkpoint import checkpoint_meta

    return int(checkpoint_meta(weights).get('image_size') or 0) if weights else 0


def load_images(dataset, indices: list[int], transform) -> torch.Tensor:
    """(N, 3, S, S) images ``indices`` of ``dataset`` through ``transform``."""
    return torch.stack([transform(dataset.load(i)) for i in indices])


def default_out(data: str, *parts) -> Path:
    """runs/<data name>-<parts...>: the default run directory of a job."""
    name = Path(os.fspath(data)).name or 'data'
    return Path('runs') / '-'.join([name, *map(str, parts)])
