"""A user's own folder of photos: every class and image train, an honest estimate, a model of every class."""
import math

import numpy as np
import pytest
import torch
from conftest import COLOURS, RING, make_shapes_folder
from PIL import Image

from fewshot_lkca.checkpoint import load_checkpoint
from fewshot_lkca.config import FinetuneConfig, apply_overrides, config_for_command
from fewshot_lkca.errors import DataError, DataWarning
from fewshot_lkca.estimate import FOLDS, plan_estimate, wilson_interval
from fewshot_lkca.finetune import finetune_command
from fewshot_lkca.predict import OnnxClassifier
from fewshot_lkca.task import build_task, protocol
from fewshot_lkca.train import balanced_weights

UNEQUAL = dict(red_disc=3, green_bar=5, blue_square=8, yellow_ring=20)
QUIET = dict(progress=False, log=lambda *_: None)


def _cfg(data, out, **changes) -> FinetuneConfig:
    base = dict(data=str(data), out=str(out), weights='random', image_size=32, export=[])
    return apply_overrides(FinetuneConfig(), dict(base, **changes), source='test').validate()


@pytest.fixture
def photos(tmp_path):
    """4 classes of 3, 5, 8 and 20 images in PNG, JPEG and WebP, a text file and a truncated JPEG among them."""
    root = make_shapes_folder(tmp_path / 'photos', UNEQUAL, {**COLOURS, **RING}, mixed_formats=True)
    (root / 'red_disc' / 'notes.txt').write_text('not a photo')
    (root / 'green_bar' / 'broken.jpg').write_bytes((root / 'green_bar' / '1.jpg').read_bytes()[:200])
    return root


def test_a_plain_folder_trains_on_every_class_and_image_and_exports_them_all(photos, tmp_path):
    with pytest.warns(DataWarning, match='skipped 2 of 38 files'):
        metrics = finetune_command(_cfg(photos, tmp_path / 'run', export=['onnx']), **QUIET)
    assert metrics['task']['training_images'] == UNEQUAL  # all 36 usable images, every class
    est = metrics['estimate']
    assert est['method'] == 'cross-validation' and est['images'] == 36  # each image scored once, by a model without it
    assert est['ci95'][0] <= est['accuracy'] <= est['ci95'][1]
    _, meta = load_checkpoint(tmp_path / 'run' / 'model.safetensors')
    assert meta['classes'] == sorted(UNEQUAL)
    onnx = OnnxClassifier(tmp_path / 'run' / 'model.onnx')
    assert onnx.classes == sorted(UNEQUAL)
    assert onnx.classify([str(photos / 'yellow_ring' / '0.png')], top_k=4)[0]['top'][0]['label'] in UNEQUAL


def test_unequal_classes_train_balanced_with_the_trunk(photos, tmp_path):
    cfg = _cfg(photos, tmp_path / 'run', method='finetune', mirror_views=False, steps=2, batch_size=2)
    with pytest.warns(DataWarning):
        metrics = finetune_command(cfg, **QUIET)
    assert metrics['steps'] == 2 and metrics['estimate']['images'] == 36
    weight = balanced_weights(torch.tensor([0] * 3 + [1] * 20), 2)
    assert torch.allclose(weight * torch.tensor([3.0, 20.0]), torch.full((2,), 11.5))  # each class weighs the same


def test_a_train_val_layout_is_used_as_such(tmp_path):
    make_shapes_folder(tmp_path / 'photos' / 'train', 6)
    make_shapes_folder(tmp_path / 'photos' / 'val', 4)
    metrics = finetune_command(_cfg(tmp_path / 'photos', tmp_path / 'run'), **QUIET)
    assert metrics['task']['layout'] == 'train/val'
    assert sum(metrics['task']['training_images'].values()) == 18
    assert metrics['estimate']['method'] == 'val' and metrics['estimate']['images'] == 12


def test_big_classes_hold_a_share_out_and_the_model_then_trains_on_everything(tmp_path):
    folder = make_shapes_folder(tmp_path / 'photos', 12)
    task = build_task(_cfg(folder, tmp_path / 'run'))
    plan = plan_estimate(task, seed=0)
    assert plan.method == 'holdout' and len(plan.folds) == 1
    train, scored = plan.folds[0]
    assert len(scored) == 3 * math.ceil(0.2 * 12) and not set(train) & set(scored)
    assert len(task.support_idx) == 36 and not task.pool_idx  # the delivered model sees all 36


def test_every_fold_keeps_every_class_in_training(tmp_path):
    folder = make_shapes_folder(tmp_path / 'photos', dict(red_disc=2, green_bar=3, blue_square=7))
    task = build_task(_cfg(folder, tmp_path / 'run'))
    plan = plan_estimate(task, seed=3)
    assert len(plan.folds) <= FOLDS
    assert sorted(p for _, scored in plan.folds for p in scored) == list(range(12))  # each image scored once
    for train, _ in plan.folds:
        assert {task.support_y[p] for p in train} == {0, 1, 2}


def test_a_class_of_one_image_trains_but_is_named_as_not_estimated(tmp_path):
    folder = make_shapes_folder(tmp_path / 'photos', dict(red_disc=1, green_bar=4, blue_square=4))
    with pytest.warns(DataWarning, match='single image.*red_disc'):
        metrics = finetune_command(_cfg(folder, tmp_path / 'run'), **QUIET)
    assert metrics['task']['training_images']['red_disc'] == 1
    assert metrics['estimate']['unscored_classes'] == ['red_disc'] and metrics['estimate']['images'] == 8


def test_episode_options_or_a_card_keep_the_episodic_protocol(tmp_path):
    folder = make_shapes_folder(tmp_path / 'photos', 8)
    assert protocol(_cfg(folder, tmp_path / 'r')) == 'all'
    assert protocol(config_for_command(None, dict(data=str(folder), n_way='3', k_shot='2'), None)) == 'episode'
    assert protocol(FinetuneConfig()) == 'episode'  # the look-alike card
    (folder / 'novel.txt').write_text('red_disc\ngreen_bar\nblue_square\n')
    assert protocol(_cfg(folder, tmp_path / 'r')) == 'episode'  # a folder with split lists is a data set


def test_a_val_class_that_train_lacks_is_a_one_line_error(tmp_path):
    make_shapes_folder(tmp_path / 'photos' / 'train', 3)
    make_shapes_folder(tmp_path / 'photos' / 'val', 3, {**COLOURS, **RING})
    with pytest.raises(DataError, match="has classes that .*train has not: \\['yellow_ring'\\]"):
        build_task(_cfg(tmp_path / 'photos', tmp_path / 'run'))


def test_wilson_interval_is_sound_at_the_edges():
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    low, high = wilson_interval(10, 10)
    assert 0.6 < low < 0.8  # ten right of ten is not certainty


def test_over_a_hundred_classes_train_and_are_scored(tmp_path):
    rng = np.random.default_rng(0)
    for c in range(101):
        (tmp_path / 'photos' / f'part{c:03d}').mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(
                tmp_path / 'photos' / f'part{c:03d}' / f'{i}.png')
    metrics = finetune_command(_cfg(tmp_path / 'photos', tmp_path / 'run'), **QUIET)
    assert len(metrics['task']['classes']) == 101 and metrics['estimate']['images'] == 202
    tensors, _ = load_checkpoint(tmp_path / 'run' / 'model.safetensors')
    assert tensors['head.weight'].shape[0] == 101
