"""Few-shot data: readers, the built-in look-alike set, learn2learn episodes, albumentations pipelines.

Every reader is an `ImageDataset` returning (HxWx3 uint8 image, class index) before its transform, with
`classes` and `targets` lists. learn2learn and albumentations are imported only when episodes or
transforms are built, so importing this package stays light.

Example:
    >>> from fewshot_lkca.data import EpisodeSampler, get_dataset
    >>> novel = get_dataset("lookalike", split="novel", images_per_class=20, image_size=64)
    >>> episode = EpisodeSampler(novel, n_way=5, k_shot=1, n_query=3, seed=0).sample(0)
    >>> episode.support_y.tolist()
    [0, 1, 2, 3, 4]
"""

from ..errors import CorruptImageError, DataError, DataWarning, ImageTooLargeError
from .base import ImageDataset
from .cards import get_card, get_dataset, list_datasets
from .episodes import Episode, EpisodePlan, EpisodeSampler, labelled_loader, usable_classes
from .folders import ImageFolderDataset, load_image
from .lookalike import LookalikeDataset, lookalike_classes, render_lookalike
from .omniglot import OmniglotDataset, OmniglotFolderDataset, OneShotRun, read_one_shot_runs
from .transforms import eval_transform, mirror_transform, train_transform

__all__ = [
    "CorruptImageError",
    "DataError",
    "DataWarning",
    "Episode",
    "EpisodePlan",
    "EpisodeSampler",
    "ImageDataset",
    "ImageFolderDataset",
    "ImageTooLargeError",
    "LookalikeDataset",
    "OmniglotDataset",
    "OmniglotFolderDataset",
    "OneShotRun",
    "eval_transform",
    "mirror_transform",
    "get_card",
    "get_dataset",
    "labelled_loader",
    "list_datasets",
    "load_image",
    "lookalike_classes",
    "read_one_shot_runs",
    "render_lookalike",
    "train_transform",
    "usable_classes",
]
