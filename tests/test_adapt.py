"""Learning on the device: the numpy head against the torch probe, the file rewrite, adapt's commands and refusals."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot_lkca import adapt, numpy_head, predict
from fewshot_lkca.metadata import FEATURES_OUTPUT, HEAD_INITIALIZER, MARKER, encode_metadata
from fewshot_lkca.onnx_file import OnnxFile, OnnxFileError
from fewshot_lkca.probe import _fit_many

onnx = pytest.importorskip('onnx')
pytest.importorskip('onnxruntime')
COLOURS = {'red': (220, 30, 30), 'green': (30, 200, 30), 'blue': (30, 30, 220), 'yellow': (230, 220, 20)}
META = dict(model='toy', classes=['a', 'b'], image_size=16, mean=[0.5] * 3, std=[0.5] * 3, interpolation='bilinear',
            crop_pct=1.0)
HEAVY = ('torch', 'timm', 'cv2', 'albumentations')


# ------------------------------------------------------------------------------------------------ numpy head
@pytest.mark.parametrize('anchor,smoothing', [(0.0, 0.1), (1.0, 0.0), (1.0, 0.1)])
def test_numpy_head_matches_the_torch_probe_step_for_step(anchor, smoothing):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(14, 32)).astype(np.float32)
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3])  # unequal classes: the balancing counts
    masks = np.ones((3, 14), bool)
    masks[1, 0], masks[2, [6, 11]] = False, False  # leave-one-out style problems
    for steps in (1, 7, 60):
        ours = numpy_head.fit_many(feats, labels, masks, 4, steps, 0.05, scale=10.0, label_smoothing=smoothing,
                                   anchor=anchor)
        theirs = _fit_many(torch.from_numpy(feats), torch.from_numpy(labels), torch.from_numpy(masks), 4, steps, 0.05,
                           10.0, smoothing, anchor).numpy()
        assert np.abs(ours - theirs).max() < 1e-4
        unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
        assert np.abs(10 * unit @ ours[0].T - 10 * unit @ theirs[0].T).max() < 1e-4  # the logits, too
    assert np.abs(ours - numpy_head.fit_many(feats, labels, masks, 4, 0, 0.05)).max() > 1e-2  # training moved them


def test_numpy_head_keeps_known_classes_and_learns_the_new_ones():
    rng = np.random.default_rng(1)
    known = numpy_head.unit(rng.normal(size=(2, 16)))
    feats = np.concatenate([rng.normal(size=(4, 16)) + 6 * np.eye(16)[5], rng.normal(size=(4, 16)) - 6 * np.eye(16)[5]])
    labels = np.array([2] * 4 + [3] * 4)
    out = numpy_head.fit_directions(feats, labels, 4, 50, 0.05, anchor=1.0, known=known)
    assert np.allclose(out[:2], known)  # not forgotten
    assert out[2, 5] > 0.5 and out[3, 5] < -0.5
    left, cos, predicted = numpy_head.loo_scores(feats, labels, 4, known=known)
    assert len(left) == 8 and (predicted == labels).all() and cos.shape == (8, 4)


# ------------------------------------------------------------------------------------------------ a toy model
def _toy_model(path, classes=('a', 'b'), head=None, metadata=True, features_output=True):
    """features = per-channel means (N, 3) through a fixed 3 x 4 matrix; logits = unit(features) @ head (4 x C)."""
    from onnx import TensorProto, helper, numpy_helper

    head = np.eye(4, len(classes), dtype=np.float32) * 10 if head is None else head
    nodes = [helper.make_node('ReduceMean', ['image'], ['pooled'], axes=[2, 3], keepdims=0),
             helper.make_node('MatMul', ['pooled', 'lift'], [FEATURES_OUTPUT]),
             helper.make_node('ReduceL2', [FEATURES_OUTPUT], ['norm'], axes=[1], keepdims=1),
             helper.make_node('Div', [FEATURES_OUTPUT, 'norm'], ['unit']),
             helper.make_node('MatMul', ['unit', HEAD_INITIALIZER], ['logits'])]
    lift = np.array([[1, 0, 0, 0.3], [0, 1, 0, 0.3], [0, 0, 1, 0.3]], np.float32)
    outputs = [helper.make_tensor_value_info('logits', TensorProto.FLOAT, ['batch', 'classes'])]
    if features_output:
        outputs.append(helper.make_tensor_value_info(FEATURES_OUTPUT, TensorProto.FLOAT, ['batch', 4]))
    graph = helper.make_graph(nodes, 'toy', [helper.make_tensor_value_info('image', TensorProto.FLOAT,
                                                                           ['batch', 3, 16, 16])], outputs,
                              [numpy_helper.from_array(lift, 'lift'), numpy_helper.from_array(head, HEAD_INITIALIZER)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)])
    model.ir_version = 8
    if metadata:
        meta = dict(META, classes=list(classes), **{MARKER: 'test'})
        meta['head'] = dict(initializer=HEAD_INITIALIZER, features=FEATURES_OUTPUT, scale=10.0, dim=4)
        helper.set_model_props(model, encode_metadata(meta))
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def _photos(root, classes, per_class=5, seed=0):
    """Class folders of solid colours with a little noise, mixed formats."""
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(COLOURS[name]) + rng.normal(0, 12, (20, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f'{i}.{("png", "jpg")[i % 2]}')
    return root


@pytest.fixture
def toy(tmp_path):
    return _toy_model(tmp_path / 'toy.onnx')


def _adapt(*argv):
    args = adapt.build_parser().parse_args([str(a) for a in argv])
    lines = []
    return adapt.adapt_command(args, log=lines.append), lines


# ------------------------------------------------------------------------------------------------ the file
def test_rewriting_the_head_keeps_every_other_byte_and_passes_the_checker(toy, tmp_path):
    file = OnnxFile.read(toy)
    assert file.metadata['classes'] == '["a", "b"]'
    assert np.array_equal(file.initializer(HEAD_INITIALIZER), np.eye(4, 2, dtype=np.float32) * 10)
    new_head = np.arange(12, dtype=np.float32).reshape(4, 3)
    data = file.rewrite({HEAD_INITIALIZER: new_head}, dict(file.metadata, classes='["x", "y", "z"]'))
    (tmp_path / 'new.onnx').write_bytes(data)
    model = onnx.load(str(tmp_path / 'new.onnx'))
    onnx.checker.check_model(model, full_check=True)
    ours = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    assert np.array_equal(ours[HEAD_INITIALIZER], new_head) and ours['lift'].shape == (3, 4)
    assert {p.key: p.value for p in model.metadata_props}['classes'] == '["x", "y", "z"]'
    original = onnx.load(str(toy))
    assert [n.SerializeToString() for n in model.graph.node] == [n.SerializeToString() for n in original.graph.node]
    with pytest.raises(OnnxFileError, match="no initializer named 'nope'"):
        file.initializer('nope')
    with pytest.raises(OnnxFileError, match='not an ONNX model'):
        OnnxFile(b'\x07\x07\x07 this is text', 'junk.onnx')


# ------------------------------------------------------------------------------------------------ adapt
def test_adapt_learns_classes_answers_unknown_and_predict_runs_it(toy, tmp_path):
    support = _photos(tmp_path / 'support', ['red', 'green'])
    before = toy.read_bytes()
    report, lines = _adapt(toy, support, '--out', tmp_path / 'mine.onnx')
    assert toy.read_bytes() == before  # the input model is never modified
    assert report['classes'] == ['green', 'red'] and report['images'] == 10 and report['threshold'] is not None
    assert any(line.startswith('wrote ') for line in lines)
    probe = _photos(tmp_path / 'probe', ['red', 'green', 'blue'], per_class=2, seed=5)
    clf = predict.OnnxClassifier(tmp_path / 'mine.onnx')
    results = clf.classify([probe / 'red/0.png', probe / 'green/1.jpg', probe / 'blue/0.png'])
    assert [r['top'][0]['label'] for r in results[:2]] == ['red', 'green']
    assert [r['unknown'] for r in results] == [False, False, True]  # blue was never enrolled
    unrejected = predict.OnnxClassifier(tmp_path / 'mine.onnx', reject=False).classify([probe / 'blue/0.png'])
    assert 'unknown' not in unrejected[0]
    # the head in the file is the numpy head trained on the same features
    model = adapt.DeviceModel(tmp_path / 'mine.onnx')
    feats = model.features(adapt.read_support(support, model.meta, log=lambda *_: None).images)
    logits = clf.logits(adapt.read_support(support, model.meta, log=lambda *_: None).images)
    assert np.abs(numpy_head.unit(feats) @ model.matrix - logits).max() < 1e-4


def test_add_keeps_the_old_classes_and_remove_drops_one(toy, tmp_path):
    _adapt(toy, _photos(tmp_path / 's1', ['red', 'green']), '--out', tmp_path / 'one.onnx')
    first = adapt.DeviceModel(tmp_path / 'one.onnx')
    report, lines = _adapt(tmp_path / 'one.onnx', _photos(tmp_path / 's2', ['blue']), '--add', '--out',
                           tmp_path / 'two.onnx')
    second = adapt.DeviceModel(tmp_path / 'two.onnx')
    assert second.classes == ['green', 'red', 'blue'] and report['kept_classes'] == ['green', 'red']
    assert np.allclose(second.matrix[:, :2], first.matrix, atol=1e-6)  # the old rows, untouched
    assert set(json.loads(second.file.metadata['reject'])['scores']) == {'red', 'green', 'blue'}
    probe = _photos(tmp_path / 'probe', ['red', 'blue'], per_class=1, seed=9)
    tops = [r['top'][0]['label'] for r in predict.OnnxClassifier(tmp_path / 'two.onnx').classify(
        [probe / 'red/0.png', probe / 'blue/0.png'])]
    assert tops == ['red', 'blue']
    _adapt(tmp_path / 'two.onnx', '--remove', 'green', '--out', tmp_path / 'three.onnx')
    third = adapt.DeviceModel(tmp_path / 'three.onnx')
    assert third.classes == ['red', 'blue'] and np.allclose(third.matrix, second.matrix[:, [1, 2]])
    assert set(json.loads(third.file.metadata['reject'])['scores']) == {'red', 'blue'}


def test_one_image_per_class_works_without_a_threshold(toy, tmp_path):
    report, lines = _adapt(toy, _photos(tmp_path / 's', ['red', 'green', 'blue'], per_class=1), '--out',
                           tmp_path / 'one.onnx')
    assert report['kept'] == 'prototypes' and report['threshold'] is None
    assert any('no threshold' in line for line in lines)
    assert 'unknown' not in predict.OnnxClassifier(tmp_path / 'one.onnx').classify([tmp_path / 's/red/0.png'])[0]


def test_unreadable_files_are_skipped_and_named(toy, tmp_path):
    support = _photos(tmp_path / 's', ['red', 'green'])
    (support / 'red' / 'broken.jpg').write_bytes(b'\xff\xd8 not a jpeg')
    (support / 'green' / 'notes.txt').write_text('hello')
    report, lines = _adapt(toy, support, '--out', tmp_path / 'out.onnx')
    assert report['images'] == 10 and report['skipped'] == 2
    assert any('broken.jpg' in line for line in lines) and any('notes.txt' in line for line in lines)


def test_bad_input_is_one_line_and_writes_nothing(toy, tmp_path):
    support = _photos(tmp_path / 's', ['red', 'green'])
    empty_class = _photos(tmp_path / 'e', ['red'])
    (empty_class / 'green').mkdir()
    (empty_class / 'green' / 'bad.png').write_bytes(b'')
    loose = tmp_path / 'loose'
    loose.mkdir()
    Image.new('RGB', (8, 8)).save(loose / 'x.png')
    plain = _toy_model(tmp_path / 'plain.onnx', metadata=False)
    featureless = _toy_model(tmp_path / 'nofeat.onnx', features_output=False)
    (tmp_path / 'junk.onnx').write_bytes(b'not a model at all')
    out = tmp_path / 'out.onnx'
    cases = {
        'no such folder': ([toy, tmp_path / 'nope', '--out', out], 'nope: no such folder'),
        'no class folders': ([toy, loose, '--out', out], 'no class folders'),
        'class without images': ([toy, empty_class, '--out', out], "class 'green' has no readable image"),
        'not our model': ([plain, support, '--out', out], 'not a fewshot_lkca model'),
        'no features output': ([featureless, support, '--out', out], "no 'features' output"),
        'not a model': ([tmp_path / 'junk.onnx', support, '--out', out], 'junk.onnx: not an ONNX model'),
        'missing model': ([tmp_path / 'none.onnx', support, '--out', out], 'none.onnx: no such model file'),
        'out is the input': ([toy, support, '--out', toy], 'is the input model'),
        'out folder missing': ([toy, support, '--out', tmp_path / 'no' / 'x.onnx'], 'does not exist'),
        'remove unknown name': ([toy, '--remove', 'c', '--out', out], "has no class 'c'"),
        'remove everything': ([toy, '--remove', 'a', '--remove', 'b', '--out', out], 'nothing would be left'),
        'nothing to do': ([toy, '--out', out], 'give a SUPPORT folder'),
    }
    for name, (argv, message) in cases.items():
        with pytest.raises(SystemExit) as info:
            adapt.main([str(a) for a in argv])
        text = str(info.value)
        assert text.startswith('error: ') and message in text and '\n' not in text, (name, text)
        assert not out.exists(), name
    _adapt(toy, support, '--out', tmp_path / 'two.onnx')
    with pytest.raises(SystemExit, match="class 'green' is already in"):
        adapt.main([str(tmp_path / 'two.onnx'), str(support), '--add', '--out', str(out)])
    assert not out.exists()


def test_adapt_runs_without_importing_torch(toy, tmp_path):
    support = _photos(tmp_path / 's', ['red', 'green'])
    done = subprocess.run([sys.executable, '-X', 'importtime', '-m', 'fewshot_lkca.adapt', str(toy), str(support),
                           '--out', str(tmp_path / 'out.onnx')], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'wrote' in done.stdout
    imported = {line.rsplit('|', 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith('import time')}
    assert 'onnxruntime' in imported and not {m for m in imported if m.split('.')[0] in HEAVY}
    code = (f'import sys\nfrom fewshot_lkca.cli import main\nmain(["adapt", {str(toy)!r}, {str(support)!r}, "--out", '
            f'{str(tmp_path / "cli.onnx")!r}])\nprint("HEAVY", sorted(m for m in {HEAVY!r} if m in sys.modules))')
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == 'HEAVY []' and (tmp_path / 'cli.onnx').is_file()
