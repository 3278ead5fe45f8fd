"""The shipped checkpoint: it matches its model card, loads, and `--weights auto` picks it where it should."""
import shutil

import pytest
import torch

import fewshot_lkca.models.factory as factory
import fewshot_lkca.weights as weights
from fewshot_lkca.checkpoint import load_backbone
from fewshot_lkca.starting_point import resolve_auto
from fewshot_lkca.weights import SHIPPED, ShippedWeightsError, model_card, sha256, shipped_checkpoint


def test_the_shipped_checkpoint_matches_its_card_and_loads():
    entry = SHIPPED['lookalike']
    card = model_card('lookalike')
    assert card is not None, f'{entry.card_path} is missing: run make weights'
    assert sha256(entry.path) == card['sha256'] and shipped_checkpoint('lookalike') == entry.path
    for key in ('command', 'data', 'steps', 'train_seconds', 'machine', 'val', 'date'):
        assert card[key], key
    assert card['weights'] == 'random initialisation' and card['config']['weights'] == 'random'
    backbone, meta, origin = load_backbone('', str(entry.path))
    assert meta['model'] == entry.model and 'lookalike' in origin
    with torch.no_grad():
        features = backbone(torch.zeros(2, 3, 96, 96))
    assert features.shape == (2, backbone.head_hidden_size) and torch.isfinite(features).all()


def test_the_shipped_photo_checkpoint_matches_its_card_and_loads_with_its_padding():
    entry = SHIPPED['photos']
    card = model_card('photos')
    assert card is not None, f'{entry.card_path} is missing: run make distill'
    assert sha256(entry.path) == card['sha256'] and shipped_checkpoint('photos') == entry.path
    assert card['config']['method'] == 'distill' and card['teacher']['name'] == 'tf_mobilenetv3_small_100'
    assert card['photos'] and all(p['licences'] for p in card['photos'])  # every photo source names its licence
    assert entry.path.stat().st_size < 10e6
    backbone, meta, _ = load_backbone('', str(entry.path))
    assert backbone.pad_type == 'same' and meta['model_args'] == {'pad_type': 'same'}
    with torch.no_grad():
        features = backbone(torch.zeros(1, 3, 224, 224))
    assert features.shape == (1, backbone.head_hidden_size) and torch.isfinite(features).all()


def test_a_damaged_copy_is_refused(tmp_path, monkeypatch):
    entry = SHIPPED['lookalike']
    shutil.copy(entry.path, tmp_path / entry.path.name)
    shutil.copy(entry.card_path, tmp_path / entry.card_path.name)
    monkeypatch.setattr(weights, 'WEIGHTS_DIR', tmp_path)
    assert shipped_checkpoint('lookalike') == tmp_path / entry.path.name
    data = bytearray((tmp_path / entry.path.name).read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / entry.path.name).write_bytes(bytes(data))
    with pytest.raises(ShippedWeightsError, match='does not match the sha256'):
        shipped_checkpoint('lookalike')


def test_auto_takes_the_shipped_checkpoint_for_its_data_set():
    chosen, why = resolve_auto('lkca_mobilenet', 'lookalike')
    assert chosen == str(SHIPPED['lookalike'].path) and 'shipped' in why
    assert resolve_auto('lkca_mobilenet_dw3', 'lookalike')[0] == 'base'  # none shipped for that model


def test_auto_on_a_folder_of_photos_takes_the_photo_checkpoint_online_and_offline(tmp_path, monkeypatch):
    (tmp_path / 'a').mkdir()
    for online in (False, True):
        monkeypatch.setattr(factory, 'imagenet_available', lambda name, online=online: (online, 'either'))
        chosen, why = resolve_auto('lkca_mobilenet', str(tmp_path))
        assert chosen == str(SHIPPED['photos'].path) and 'distilled from ImageNet' in why


def test_auto_on_a_folder_of_photos_never_needs_base_classes(tmp_path, monkeypatch):
    (tmp_path / 'a').mkdir()
    monkeypatch.setitem(weights.SHIPPED, 'photos', weights.Shipped('not-shipped', 'photos', 'x', method='distill'))
    monkeypatch.setattr(factory, 'imagenet_available', lambda name: (False, 'offline'))
    chosen, why = resolve_auto('lkca_mobilenet', str(tmp_path))
    assert chosen == str(SHIPPED['lookalike'].path) and 'ImageNet weights unavailable (offline)' in why
    monkeypatch.setattr(factory, 'imagenet_available', lambda name: (True, 'cached'))
    chosen, why = resolve_auto('lkca_mobilenet', str(tmp_path))
    assert (chosen, why) == ('imagenet', 'a folder of photos: ImageNet weights (cached)')
    monkeypatch.setattr(factory, 'imagenet_available', lambda name: (False, 'offline'))
    assert resolve_auto('tf_mobilenetv3_small_100', str(tmp_path))[0] == 'random'
