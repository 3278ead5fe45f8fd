"""The task layer's rules, decided once: the input size every command uses, and the episode class check."""
import numpy as np
import pytest
from conftest import make_shapes_folder

import fewshot_lkca.data as data
from fewshot_lkca.config import FinetuneConfig
from fewshot_lkca.data import DataError, ImageDataset, LookalikeDataset, usable_classes
from fewshot_lkca.evaluate import EvalConfig, _image_size
from fewshot_lkca.pretrain import PretrainConfig
from fewshot_lkca.pretrain.sampling import load_data
from fewshot_lkca.task import PHOTO_SIZE, build_task, input_size
from fewshot_lkca.train import Dist


class _Characters(ImageDataset):
    """Stands in for Omniglot (no ../shared needed): like the real reader, it does not know an image size."""

    def __init__(self, split='novel', **_):
        self.classes = [f'char{c}' for c in range(6)]
        self.targets = [c for c in range(6) for _ in range(20)]
        self.transform = None

    def load(self, index):
        return np.zeros((105, 105, 3), np.uint8)


def test_the_input_size_rule():
    assert input_size('omniglot') == (105, 'omniglot data card')
    assert input_size('lookalike', dataset=LookalikeDataset('novel', 2, 64)) == (64, 'data set')
    assert input_size('omniglot', image_size=84, checkpoint_size=96) == (84, 'image_size option')
    assert input_size('omniglot', checkpoint_size=96) == (96, 'checkpoint')


def test_photos_default_to_the_imagenet_size(tmp_path):
    (tmp_path / 'a').mkdir()
    assert input_size(str(tmp_path)) == (PHOTO_SIZE, 'default for photos')


def test_every_command_gives_omniglot_the_cards_size(monkeypatch):
    # The drift this rule fixed: fine-tuning on Omniglot used to base-pretrain at 224 px where pretrain and evaluate
    # used the card's 105 px.
    monkeypatch.setattr(data, 'get_dataset', lambda name, split=None, **kw: _Characters(split))
    finetune_size = build_task(FinetuneConfig(data='omniglot', n_way=5, k_shot=1, n_query=5)).image_size
    pretrain_size = load_data(PretrainConfig(data='omniglot', batch_size=8, val_k_shot=1, val_n_query=5), Dist()).size
    evaluate_size, _ = _image_size(EvalConfig(data='omniglot'), {}, _Characters())
    assert finetune_size == pretrain_size == evaluate_size == 105


def test_the_episode_class_check_names_the_data_and_the_fix():
    with pytest.raises(DataError, match=r"n_way=3 needs 3 classes .* 2 \+ 3 = 5 images each; only 2 of 3 classes of "
                                        r"'x' have them; the largest, 'b', has 9 \(lower --ways"):
        usable_classes([0] * 5 + [1] * 9 + [2] * 4, 3, 2, 3, ['a', 'b', 'c'], drop_small=True, warn=False, where="'x'")
    with pytest.raises(DataError, match=r"1 of 3 classes have fewer .*'c' has 4; lower --ways"):
        usable_classes([0] * 5 + [1] * 9 + [2] * 4, 2, 2, 3, ['a', 'b', 'c'])
    assert sorted(usable_classes([0] * 5 + [1] * 9 + [2] * 4, 2, 2, 3, drop_small=True, warn=False)) == [0, 1]


def test_a_checkpoint_passed_as_weights_sets_the_input_size(tmp_path):
    import torch

    from fewshot_lkca.checkpoint import save_checkpoint
    from fewshot_lkca.config import apply_overrides

    folder = make_shapes_folder(tmp_path / 'data', 6)
    weights = tmp_path / 'best.safetensors'
    save_checkpoint(weights, {'x': torch.zeros(1)}, dict(model='lkca_mobilenet', image_size=48))
    cfg = apply_overrides(FinetuneConfig(), dict(data=str(folder), weights=str(weights)), source='test')
    assert build_task(cfg).image_size == 48  # trained at 48 px: not the 224 px of photos
    assert build_task(apply_overrides(cfg, dict(image_size=64), source='test')).image_size == 64  # the option wins
