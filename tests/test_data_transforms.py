"""albumentations pipelines: sizes and normalisation from the pretrained cfg, seeding, pickling, workers."""

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fewshot_lkca.data import LookalikeDataset, eval_transform, train_transform
from fewshot_lkca.data.transforms import resolve_data_cfg

CFG = {"input_size": (3, 224, 224), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "crop_pct": 0.875,
       "interpolation": "bilinear"}  # fmt: skip


def test_eval_transform_follows_the_pretrained_cfg():
    transform = eval_transform(CFG)
    white = transform(np.full((60, 90, 3), 255, np.uint8))
    assert white.shape == (3, 224, 224) and white.dtype == torch.float32
    assert torch.allclose(white, torch.ones_like(white))  # (1 - 0.5) / 0.5
    assert torch.allclose(transform(np.zeros((60, 90, 3), np.uint8)), -torch.ones(3, 224, 224))


def test_eval_transform_centre_crops_after_resizing_by_crop_pct():
    image = np.zeros((100, 100, 3), np.uint8)
    image[:, :6] = 255  # a bar at the left edge: 6% of the width, cut off by a 0.875 centre crop
    out = eval_transform(CFG, size=64)(image)
    assert out.shape == (3, 64, 64)
    assert out.max() < 0  # nothing of the bar survives


def test_size_overrides_only_the_side():
    cfg = resolve_data_cfg(CFG, size=96)
    assert cfg["input_size"] == (3, 96, 96) and cfg["mean"] == (0.5, 0.5, 0.5)


def test_train_transform_output_and_seeded_randomness():
    transform = train_transform(CFG, size=64)
    image = LookalikeDataset("novel", 1, 64).load(0)
    transform.set_random_seed(3)
    a = transform(image)
    transform.set_random_seed(3)
    b = transform(image)
    c = transform(image)
    assert a.shape == (3, 64, 64) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(b, c)


@pytest.mark.parametrize("build", [eval_transform, train_transform])
def test_transforms_pickle(build):
    transform = build(CFG, size=32)
    restored = pickle.loads(pickle.dumps(transform))
    image = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    transform.set_random_seed(0)
    restored.set_random_seed(0)
    assert torch.equal(transform(image), restored(image))


@pytest.mark.slow
def test_transforms_work_in_dataloader_workers():
    dataset = LookalikeDataset("val", images_per_class=2, image_size=32, transform=train_transform(CFG, size=32))
    batches = list(DataLoader(dataset, batch_size=8, num_workers=2))
    assert sum(len(y) for _, y in batches) == len(dataset) == 2 * len(dataset.classes)
    assert batches[0][0].shape == (8, 3, 32, 32)
