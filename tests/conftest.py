"""Shared fixtures: where ../shared is, and skips with a reason when it is absent (a user's clone has none)."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared'
MNV3_WEIGHTS = SHARED / 'weights' / 'tf_mobilenetv3_small_100.in1k.pth'
OMNIGLOT = SHARED / 'data' / 'omniglot'


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f'{path} is absent (../shared is only in the development workplace)')
    return path


@pytest.fixture(scope='session')
def shared_dir() -> Path:
    return _require(SHARED)


@pytest.fixture(scope='session')
def mnv3_weights() -> Path:
    """ImageNet tf_mobilenetv3_small_100 state_dict from ../shared/weights."""
    return _require(MNV3_WEIGHTS)


@pytest.fixture(scope='session')
def omniglot_dir() -> Path:
    return _require(OMNIGLOT)


COLOURS = {'red_disc': (200, 40, 40), 'green_bar': (40, 180, 60), 'blue_square': (40, 60, 200)}
RING = {'yellow_ring': (230, 210, 40)}  # a fourth class for tests that need more ways


def make_shapes_folder(root: Path, per_class: int | dict = 12, classes: dict | None = None,
                       mixed_formats: bool = False) -> Path:
    """A tiny image folder: one class per coloured shape (disc, bar, square, ring) on noise, 48 px; ``per_class``: one
    count for every class or a count per class name; ``mixed_formats``: PNG, JPEG and WebP in turn."""
    rng = np.random.default_rng(0)
    formats = ('png', 'jpg', 'webp') if mixed_formats else ('png',)
    for name, colour in (classes or COLOURS).items():
        (root / name).mkdir(parents=True)
        for i in range(per_class[name] if isinstance(per_class, dict) else per_class):
            image = Image.fromarray(rng.integers(0, 60, (48, 48, 3), dtype=np.uint8))
            draw = ImageDraw.Draw(image)
            x, y = rng.integers(4, 20, 2)
            box = [int(x), int(y), int(x) + 22, int(y) + 22]
            if 'disc' in name:
                draw.ellipse(box, fill=colour)
            elif 'bar' in name:
                draw.rectangle([box[0], box[1], box[0] + 6, box[3]], fill=colour)
            elif 'ring' in name:
                draw.ellipse(box, outline=colour, width=4)
            else:
                draw.rectangle(box, fill=colour)
            image.save(root / name / f'{i}.{formats[i % len(formats)]}')
    return root


@pytest.fixture
def one_thread():
    """torch on one CPU thread for the test, restored after: other tests (benchmarks) change the thread count, and
    kernels sum in a thread-count-dependent order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
