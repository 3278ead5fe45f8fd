"""The onnxruntime-only predictor: the run's preprocessing reproduced without torch, output, one-line errors."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fewshot_lkca import predict
from fewshot_lkca.metadata import MARKER, MetadataError, decode_metadata, encode_metadata
from fewshot_lkca.predict import OnnxClassifier, PredictError, load_rgb

onnx = pytest.importorskip('onnx')
CLASSES = ['red', 'green', 'blue']
META = dict(model='toy', classes=CLASSES, image_size=32, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5],
            interpolation='bilinear', crop_pct=0.875)


def _toy_model(path, metadata: dict | None = META):
    """logits = 10 x the per-channel mean of the input: a red image is class 'red'. Built by hand, no exporter."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node('ReduceMean', ['image'], ['pooled'], axes=[2, 3], keepdims=0),
         helper.make_node('MatMul', ['pooled', 'weight'], ['logits'])],
        'toy', [helper.make_tensor_value_info('image', TensorProto.FLOAT, ['batch', 3, 32, 32])],
        [helper.make_tensor_value_info('logits', TensorProto.FLOAT, ['batch', 3])],
        [numpy_helper.from_array(10 * np.eye(3, dtype=np.float32), 'weight')])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)])
    model.ir_version = 8
    if metadata is not None:
        helper.set_model_props(model, encode_metadata(dict(metadata, **{MARKER: 'test'})))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _solid(path, colour, size=(40, 56)):
    Image.new('RGB', size, colour).save(path)
    return path


@pytest.fixture
def toy(tmp_path):
    return _toy_model(tmp_path / 'toy.onnx')


# ------------------------------------------------------------------------------------------------ preprocessing
@pytest.mark.parametrize('interpolation', ['bilinear', 'bicubic', 'nearest', 'area'])
def test_preprocessing_matches_the_packages_eval_transform(interpolation):
    from fewshot_lkca.data import eval_transform

    rng = np.random.default_rng(0)
    # enlarged (the look-alike set's 96 px -> 110), shrunk (a photo), non-square both ways
    for (h, w), side, crop_pct in [((96, 96), 96, 0.875), ((300, 451), 64, 0.875), ((45, 30), 40, 1.0)]:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        meta = dict(image_size=side, crop_pct=crop_pct, interpolation=interpolation, mean=[0.485, 0.456, 0.406],
                    std=[0.229, 0.224, 0.225])
        reference = eval_transform(dict(meta, input_size=(3, side, side)), size=side)(image).numpy()
        ours = predict.preprocess(image, meta)
        assert ours.shape == reference.shape == (3, side, side) and ours.dtype == np.float32
        grey_levels = np.abs(ours - reference) * 255 * np.array(meta['std'], np.float32)[:, None, None]
        if interpolation == 'bicubic':  # float weights vs OpenCV's fixed point: a rare one-level rounding difference
            assert grey_levels.max() < 1.01 and (grey_levels < 0.01).mean() > 0.999
        else:  # bit for bit before normalisation
            assert grey_levels.max() < 1e-3


def test_images_load_as_the_data_layer_loads_them(tmp_path):
    from fewshot_lkca.data import load_image

    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    rgba = np.dstack([rgb, rng.integers(0, 256, (20, 30), dtype=np.uint8)])
    files = {'rgb.png': Image.fromarray(rgb), 'rgba.png': Image.fromarray(rgba),  # modes follow the array shapes
             'gray.png': Image.fromarray(rgb[:, :, 0]), 'la.png': Image.fromarray(rgba[:, :, [0, 3]].copy()),
             'gray16.png': Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257),
             'cmyk.jpg': Image.fromarray(rgb).convert('CMYK')}
    palette = Image.fromarray(rgb).convert('P')
    palette.info['transparency'] = 0
    files['palette.png'] = palette
    for name, image in files.items():
        image.save(tmp_path / name)
    rotated = Image.fromarray(rgb)
    exif = rotated.getexif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees clockwise to view
    rotated.save(tmp_path / 'exif.jpg', exif=exif)
    assert {files[n].mode for n in files} >= {'RGBA', 'LA', 'I;16', 'CMYK', 'P'}
    for name in [*files, 'exif.jpg']:
        ours, theirs = load_rgb(tmp_path / name), load_image(tmp_path / name)
        assert ours.shape == theirs.shape and ours.dtype == np.uint8, name
        np.testing.assert_array_equal(ours, theirs, err_msg=name)
    assert load_rgb(tmp_path / 'exif.jpg').shape == (30, 20, 3)  # turned upright


# ------------------------------------------------------------------------------------------------ output
def test_text_output_ranks_classes_and_honours_top_k(toy, tmp_path, capsys):
    red, blue = _solid(tmp_path / 'red.png', (220, 30, 30)), _solid(tmp_path / 'blue.jpg', (20, 40, 230))
    predict.main([str(toy), str(red), str(blue), '--top-k', '2'])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(red) and lines[3] == str(blue) and len(lines) == 6
    assert lines[1].split()[0] == 'red' and lines[4].split()[0] == 'blue'
    first, second = (float(line.split()[1]) for line in lines[1:3])
    assert 100 >= first > second >= 0


def test_json_output_has_all_probabilities_when_asked(toy, tmp_path, capsys):
    green = _solid(tmp_path / 'green.png', (30, 200, 30), size=(300, 200))
    predict.main([str(toy), str(green), '--json', '--top-k', '10'])
    out = json.loads(capsys.readouterr().out)
    assert out['classes'] == CLASSES
    top = out['results'][0]['top']
    assert [t['label'] for t in top][0] == 'green' and len(top) == 3  # top-k is capped at the number of classes
    assert sum(t['probability'] for t in top) == pytest.approx(1.0)
    probs = [t['probability'] for t in top]
    assert probs == sorted(probs, reverse=True)


def test_classifier_probabilities_are_the_models_softmax(toy, tmp_path):
    clf = OnnxClassifier(toy)
    image = load_rgb(_solid(tmp_path / 'x.png', (120, 60, 200)))
    x = predict.preprocess(image, clf.meta)
    expected = 10 * x.mean(axis=(1, 2))
    expected = np.exp(expected - expected.max()) / np.exp(expected - expected.max()).sum()
    np.testing.assert_allclose(clf.probabilities(x[None])[0], expected, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ no torch
HEAVY = ('torch', 'timm', 'cv2', 'albumentations')


def test_predict_runs_without_importing_torch(toy, tmp_path):
    red = _solid(tmp_path / 'red.png', (220, 30, 30))
    # python -m fewshot_lkca.predict, with Python's own import log: nothing heavy may appear in it
    done = subprocess.run([sys.executable, '-X', 'importtime', '-m', 'fewshot_lkca.predict', str(toy), str(red),
                           '--json'], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)['results'][0]['top'][0]['label'] == 'red'
    imported = {line.rsplit('|', 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith('import time')}
    assert 'onnxruntime' in imported and not {m for m in imported if m.split('.')[0] in HEAVY}
    # fewshot-lkca predict (the console script's main)
    code = (f'import sys\nfrom fewshot_lkca.cli import main\nmain(["predict", {str(toy)!r}, {str(red)!r}])\n'
            f'print("HEAVY", sorted(m for m in {HEAVY!r} if m in sys.modules))')
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[1].split()[0] == 'red' and done.stdout.splitlines()[-1] == 'HEAVY []'


# ------------------------------------------------------------------------------------------------ errors
def _bad_inputs(tmp_path, toy):
    text = tmp_path / 'notes.txt'
    text.write_text('not an image')
    empty = tmp_path / 'empty.png'
    empty.touch()
    image = _solid(tmp_path / 'ok.png', (1, 2, 3))
    return {
        'missing image': ([str(toy), str(tmp_path / 'nope.jpg')], 'nope.jpg: no such file'),
        'not an image': ([str(toy), str(text)], 'notes.txt: not an image file Pillow can read'),
        'empty image': ([str(toy), str(empty)], 'empty.png: empty file'),
        'a folder': ([str(toy), str(tmp_path)], 'not a file'),
        'missing model': ([str(tmp_path / 'none.onnx'), str(image)], 'none.onnx: no such model file'),
        'not onnx': ([str(text), str(image)], 'notes.txt: not an ONNX model onnxruntime can load'),
        'foreign onnx': ([str(_toy_model(tmp_path / 'plain.onnx', None)), str(image)],
                         'plain.onnx is not a fewshot_lkca model'),
        'top-k': ([str(toy), str(image), '--top-k', '0'], '--top-k must be >= 1'),
    }


@pytest.mark.parametrize('case', ['missing model', 'not onnx', 'foreign onnx', 'top-k'])
def test_a_bad_model_or_option_is_a_one_line_error(case, toy, tmp_path, capsys):
    argv, message = _bad_inputs(tmp_path, toy)[case]
    with pytest.raises(SystemExit) as exc:
        predict.main(argv)
    text = str(exc.value)
    assert text.startswith('error: ') and '\n' not in text and message in text, text
    assert capsys.readouterr().out == ''


@pytest.mark.parametrize('case', ['missing image', 'not an image', 'empty image', 'a folder'])
def test_a_bad_image_is_named_in_its_line_while_the_others_are_classified(case, toy, tmp_path, capsys):
    (model, bad), message = _bad_inputs(tmp_path, toy)[case]
    good = str(_solid(tmp_path / 'good.png', (200, 10, 10)))
    with pytest.raises(SystemExit) as exc:
        predict.main([model, good, bad, good])
    assert str(exc.value) == 'error: 1 of 3 images could not be classified (named above)'
    lines = capsys.readouterr().out.splitlines()
    assert lines.count(good) == 2 and message in '\n'.join(lines)
    results = OnnxClassifier(model).classify([good, bad, good])
    assert 'top' in results[0] and 'top' in results[2] and message in results[1]['error']


def test_predict_streams_in_fixed_batches(toy, tmp_path, monkeypatch):
    clf = OnnxClassifier(toy)
    seen = []
    real = clf.logits
    monkeypatch.setattr(clf, 'logits', lambda batch: seen.append(len(batch)) or real(batch))
    image = str(_solid(tmp_path / 'one.png', (1, 2, 3)))
    assert len(clf.classify([image] * (2 * clf.max_batch + 3))) == 2 * clf.max_batch + 3
    assert seen == [clf.max_batch, clf.max_batch, 3]  # never more than one batch of images in memory


def test_metadata_is_checked_field_by_field():
    props = encode_metadata(dict(META, **{MARKER: '0.1.0'}))
    assert decode_metadata(props)['classes'] == CLASSES and decode_metadata(props)['image_size'] == 32
    with pytest.raises(MetadataError, match="lacks 'crop_pct'"):
        decode_metadata({k: v for k, v in props.items() if k != 'crop_pct'})
    with pytest.raises(MetadataError, match="'classes' does not parse"):
        decode_metadata(dict(props, classes='[red, green'))
    with pytest.raises(MetadataError, match='unusable preprocessing'):
        decode_metadata(dict(props, crop_pct='1.5'))


def test_oversized_images_are_refused_before_decoding(tmp_path):
    big = _solid(tmp_path / 'big.png', (0, 0, 0), size=(40, 30))
    with pytest.raises(PredictError, match='over the .* MP limit'):
        load_rgb(big, max_pixels=1000)
