"""Shared fixtures: where ../shared is, and skips with a reason when it is absent (a user's clone has none)."""
from pathlib import Path

import pytest

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
