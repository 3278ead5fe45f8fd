"""Exporting a finished run: the format table, refusals that write nothing, the ONNX artifacts and their checks."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import COLOURS, make_shapes_folder

import fewshot_lkca.export as export
import fewshot_lkca.export.run  # noqa: F401  (export.run: the job, patched below)
from fewshot_lkca.config import ConfigError, FinetuneConfig, apply_overrides
from fewshot_lkca.export import ExportError, check_formats, export_run
from fewshot_lkca.finetune import finetune_command

pytest.importorskip('onnxruntime')


def _cfg(data: Path, out: Path, **changes) -> FinetuneConfig:
    base = dict(data=str(data), out=str(out), protocol='episode', n_way=3, k_shot=2, n_query=4, weights='random',
                image_size=32,
                method='finetune', mirror_views=False, steps=2, batch_size=2, eval_episodes=2, export=[])
    return apply_overrides(FinetuneConfig(), dict(base, **changes), source='test').validate()


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return make_shapes_folder(tmp_path_factory.mktemp('data') / 'shapes')


@pytest.fixture(scope='module')
def run_dir(folder, tmp_path_factory):
    """A finished run with nothing exported (a few seconds: random 32 px backbone, 2 steps)."""
    out = tmp_path_factory.mktemp('runs') / 'plain'
    finetune_command(_cfg(folder, out), progress=False, log=lambda *_: None)
    return out


@pytest.fixture(scope='module')
def exported(folder, tmp_path_factory):
    """A run that exported its default formats at the end of fine-tuning, and the lines it logged."""
    out = tmp_path_factory.mktemp('runs') / 'exported'
    lines = []
    cfg = _cfg(folder, out, export=list(export.DEFAULT_FORMATS))
    finetune_command(cfg, progress=False, log=lines.append)
    return out, lines


def _listing(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}


# ------------------------------------------------------------------------------------------------ the format table
def test_formats_are_checked_by_name_and_by_installed_packages(monkeypatch):
    assert FinetuneConfig().export == ['onnx', 'onnx-int8']
    assert check_formats(['onnx,onnx-int8', ' onnx']) == ['onnx', 'onnx-int8']
    with pytest.raises(ExportError, match="unknown export format 'onx'; did you mean 'onnx'"):
        check_formats(['onx'])
    with pytest.raises(ConfigError, match="export: unknown export format 'tflite'.*choose from onnx"):
        apply_overrides(FinetuneConfig(), {'export': 'onnx,tflite'}, source='test', from_text=True).validate()
    assert apply_overrides(FinetuneConfig(), {'export': '[]'}, source='t', from_text=True).validate().export == []

    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'onnxscript' else real(name, *a))
    with pytest.raises(ExportError, match="'onnx' needs onnxscript, which is not installed: pip install onnxscript"):
        check_formats(['onnx'])


def test_a_device_format_without_its_packages_is_refused_with_the_pip_command(monkeypatch, run_dir):
    import fewshot_lkca.export.formats as formats
    monkeypatch.setattr(formats, 'missing_extra',
                        lambda fmt: f"format '{fmt}' needs ncnn: pip install pnnx ncnn" if fmt == 'ncnn' else None)
    before = _listing(run_dir)
    with pytest.raises(SystemExit) as exc:
        export.main([str(run_dir), '--format', 'onnx', 'ncnn'])
    assert str(exc.value) == "error: format 'ncnn' needs ncnn: pip install pnnx ncnn"
    assert _listing(run_dir) == before  # refused before anything was exported


def test_runs_that_cannot_be_exported_are_refused(run_dir, tmp_path):
    with pytest.raises(ExportError, match='is not a run directory'):
        export_run(tmp_path, ['onnx'])
    unfinished = tmp_path / 'unfinished'
    shutil.copytree(run_dir, unfinished)
    (unfinished / 'metrics.json').unlink()
    with pytest.raises(ExportError, match='the run has not finished.*--resume'):
        export_run(unfinished, ['onnx'])


def test_int8_without_the_runs_images_is_refused_up_front(folder, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(folder, data)
    run = tmp_path / 'run'
    finetune_command(_cfg(data, run), progress=False, log=lambda *_: None)
    shutil.rmtree(data)  # the run moved to a machine without its photos
    before = _listing(run)
    with pytest.raises(ExportError, match="onnx-int8 needs the run's support images for calibration, but the run's"):
        export_run(run, ['onnx', 'onnx-int8'])
    assert _listing(run) == before


# ------------------------------------------------------------------------------------------ failures write nothing
def test_a_failed_export_leaves_the_run_directory_as_it_was(run_dir, monkeypatch):
    import onnx
    (run_dir / 'model.onnx').write_bytes(b'an earlier export')
    before = _listing(run_dir)

    def exporter_fails(*args, **kwargs):
        raise RuntimeError('unsupported operator aten::something\nlong trace')
    monkeypatch.setattr(torch.onnx, 'export', exporter_fails)
    with pytest.raises(ExportError, match='^ONNX export failed: RuntimeError: unsupported operator aten::something$'):
        export_run(run_dir, ['onnx'])
    assert _listing(run_dir) == before

    class Program:  # the exporter succeeds, writing the file dies half way
        model_proto = onnx.helper.make_model(onnx.helper.make_graph([], 'g', [], []))

    def half_write(proto, path, *args, **kwargs):
        Path(path).write_bytes(b'half a model')
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(torch.onnx, 'export', lambda *a, **k: Program())
    monkeypatch.setattr(onnx.checker, 'check_model', lambda *a, **k: None)
    monkeypatch.setattr(onnx, 'save_model', half_write)
    with pytest.raises(OSError, match='No space left'):
        export_run(run_dir, ['onnx'])
    assert _listing(run_dir) == before
    (run_dir / 'model.onnx').unlink()


def test_an_export_failure_never_loses_the_finished_run(folder, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ExportError('the exporter broke')
    monkeypatch.setattr(export.run, 'export_run', broken)
    lines = []
    metrics = finetune_command(_cfg(folder, tmp_path / 'run', export=['onnx']), progress=False, log=lines.append)
    assert (tmp_path / 'run' / 'metrics.json').is_file() and metrics['episodes']['n'] == 2
    warning = [line for line in lines if line.startswith('warning: ')]
    assert warning == [f'warning: export failed (the exporter broke); the run is complete, retry with: python -m '
                       f'fewshot_lkca.export {tmp_path / "run"} --format onnx']


def test_device_formats_go_through_the_runtimes_module(run_dir, monkeypatch):
    import fewshot_lkca.export.executorch as executorch
    import fewshot_lkca.export.formats as formats
    calls = {}

    def fake_executorch(model, path, example, calibration=None, *, check=None):
        calls['executorch'] = (tuple(example.shape), None if calibration is None else tuple(calibration.shape),
                               len(check), model.training)
        Path(path).write_bytes(b'pte')
        return dict(format='executorch', path=str(path), size_bytes=3,
                    parity=dict(check=dict(images=len(check), max_abs_diff=1e-6, top1_agreement=1.0)))
    monkeypatch.setattr(formats, 'missing_extra', lambda fmt: None)
    monkeypatch.setattr(executorch, 'export_executorch', fake_executorch)
    lines = []
    report = export_run(run_dir, ['executorch-int8'], log=lines.append)
    held_out = 3 * (12 - 2)
    assert calls['executorch'] == ((1, 3, 32, 32), (export.CALIBRATION_IMAGES, 3, 32, 32), held_out, False)
    assert (run_dir / 'model.int8.pte').read_bytes() == b'pte'
    assert json.loads((run_dir / 'export.json').read_text())['artifacts']['executorch-int8'] == \
        report['artifacts']['executorch-int8']
    assert lines == [f'executorch-int8: {run_dir / "model.int8.pte"}, 0.00 MB; logits max abs diff 1.0e-06 vs '
                     f'PyTorch on {held_out} check images, top-1 agreement 100.0 %']
    for name in ('model.int8.pte', 'export.json'):
        (run_dir / name).unlink()


# ------------------------------------------------------------------------------------------------ real exports (slow)
@pytest.mark.slow
def test_finetune_exports_onnx_with_metadata_and_pytorch_parity(exported):
    import onnx

    from fewshot_lkca.predict import decode_metadata

    run, lines = exported
    report = json.loads((run / 'export.json').read_text())
    onnx_report = report['artifacts']['onnx']
    proto = onnx.load(str(run / 'model.onnx'))
    onnx.checker.check_model(proto, full_check=True)
    meta = decode_metadata({p.key: p.value for p in proto.metadata_props})
    assert meta['classes'] == report['checkpoint']['classes'] and sorted(meta['classes']) == sorted(COLOURS)
    assert (meta['image_size'], meta['mean'], meta['interpolation'], meta['precision']) == \
        (32, [0.5, 0.5, 0.5], 'bilinear', 'fp32')
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value  # dynamic batch
    parity = onnx_report['parity']
    assert parity['images'] == 3 * 2 + 3 * 10 and parity['max_abs_diff'] < 1e-4 and parity['top1_agreement'] == 1
    assert any(line.startswith(f'onnx: {run / "model.onnx"}, ') and 'max abs diff' in line for line in lines)
    assert not [p for p in run.iterdir() if p.name.startswith('.')]  # no staging folder or temporary file left


@pytest.mark.slow
def test_finetune_exports_int8_checked_against_fp32(exported):
    run, lines = exported
    rep = json.loads((run / 'export.json').read_text())['artifacts']['onnx-int8']
    assert (run / 'model.int8.onnx').stat().st_size == rep['size_bytes'] < (run / 'model.onnx').stat().st_size
    assert rep['calibration_images'] == export.CALIBRATION_IMAGES and 'settings' in rep['quantization']
    check = rep['check']
    assert check['images'] == 3 * 10 and all(0 <= check[k] <= 1 for k in ('top1_agreement', 'accuracy_fp32',
                                                                          'accuracy_int8'))
    assert any(line.startswith('onnx-int8: ') and 'agrees with fp32' in line for line in lines)


@pytest.mark.slow
def test_predict_on_the_exported_models_matches_pytorch(exported, folder):
    from fewshot_lkca.checkpoint import load_checkpoint
    from fewshot_lkca.data import eval_transform, load_image
    from fewshot_lkca.heads import CosineHead, FewShotClassifier
    from fewshot_lkca.models import create_backbone
    from fewshot_lkca.predict import OnnxClassifier

    run, _ = exported
    tensors, meta = load_checkpoint(run / 'model.safetensors')
    head = CosineHead(tensors['head.weight'].shape[1], tensors['head.weight'].shape[0])
    model = FewShotClassifier(create_backbone(meta['model'], num_classes=0), head)
    model.load_state_dict(tensors)
    images = sorted(folder.rglob('*.png'))[::7]
    x = torch.stack([eval_transform(model.backbone, size=meta['image_size'])(load_image(p)) for p in images])
    with torch.no_grad():
        expected = model.eval()(x).softmax(1).numpy()
    fp32 = OnnxClassifier(run / 'model.onnx')
    result = fp32.classify(images, top_k=1)
    np.testing.assert_allclose(fp32.probabilities(x.numpy()), expected, atol=1e-5)
    assert [r['top'][0]['label'] for r in result] == [meta['classes'][i] for i in expected.argmax(1)]
    int8 = OnnxClassifier(run / 'model.int8.onnx')
    assert int8.meta['precision'] == 'int8' and int8.classes == meta['classes']
    assert len(int8.classify(images[:2], top_k=2)[1]['top']) == 2


@pytest.mark.slow
def test_the_exported_models_are_adaptable_on_the_device(exported, folder, tmp_path):
    import onnx

    from fewshot_lkca.adapt import DeviceModel, adapt, read_support
    from fewshot_lkca.metadata import FEATURES_OUTPUT, HEAD_INITIALIZER
    from fewshot_lkca.numpy_head import unit
    from fewshot_lkca.predict import OnnxClassifier

    run, _ = exported
    for name in ('model.onnx', 'model.int8.onnx'):
        proto = onnx.load(str(run / name))
        assert [o.name for o in proto.graph.output] == ['logits', FEATURES_OUTPUT]
        assert proto.graph.output[0].type.tensor_type.shape.dim[1].dim_param == 'classes'
        model = DeviceModel(run / name)
        assert model.matrix.shape == (model.head['dim'], 3)
        # the head in the file is the cosine head: logits = unit(features) @ matrix
        support = read_support(folder, model.meta, log=lambda *_: None)
        images = support.images[::9]
        clf = OnnxClassifier(run / name)
        np.testing.assert_allclose(clf.logits(images), unit(model.features(images)) @ model.matrix, atol=1e-4)
        two = tmp_path / 'two' / 'x'
        (two / 'a').mkdir(parents=True)
        (two / 'b').mkdir()
        paths = sorted(folder.rglob('*.png'))
        for i, path in enumerate(paths[:4] + paths[-4:]):
            shutil.copy(path, two / ('a' if i < 4 else 'b') / path.name)
        out = tmp_path / f'adapted.{name}'
        adapt(model, read_support(two, model.meta, log=lambda *_: None), out, log=lambda *_: None)
        onnx.checker.check_model(onnx.load(str(out)), full_check=True)
        assert OnnxClassifier(out).classes == ['a', 'b'] and HEAD_INITIALIZER in {
            i.name for i in onnx.load(str(out)).graph.initializer}
        shutil.rmtree(tmp_path / 'two')


@pytest.mark.slow
def test_int8_alone_keeps_no_fp32_model(run_dir):
    report = export_run(run_dir, ['onnx-int8'], log=lambda *_: None)
    assert (run_dir / 'model.int8.onnx').is_file() and not (run_dir / 'model.onnx').exists()
    assert list(report['artifacts']) == ['onnx-int8']
    assert not [p for p in run_dir.iterdir() if p.name.startswith('.')]
    for name in ('model.int8.onnx', 'export.json'):
        (run_dir / name).unlink()
