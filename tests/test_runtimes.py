"""Device runtimes: the extra check, and ExecuTorch / NCNN round trips (skipped when the `device` extra is absent)."""
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import timm  # noqa: F401  (first: fewshot_lkca registers its models when timm is imported)
import torch
from torch import nn

from fewshot_lkca.export import formats, ncnn
from fewshot_lkca.export.executorch import export_executorch, run_executorch
from fewshot_lkca.export.formats import ExportError, MissingExtraError, RuntimeExportError, missing_extra
from fewshot_lkca.export.ncnn import export_ncnn, ncnn_bin_path, run_ncnn
from fewshot_lkca.heads import CosineHead, FewShotClassifier
from fewshot_lkca.layers import LKCA

SIZE = 32


class _Tiny(nn.Module):
    """Stem conv -> LKCA (5x5 DW + coordinate attention with GroupNorm) -> global pool: the ops that matter, small."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.op = LKCA(16)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.op(self.stem(x))).flatten(1)


def _tiny_classifier() -> FewShotClassifier:
    torch.manual_seed(0)
    backbone = _Tiny()
    for name, p in backbone.named_parameters():
        if '.attn.' in f'.{name}':
            nn.init.normal_(p, std=0.3)  # non-trivial gates, so the strip pools and GroupNorm matter
    return FewShotClassifier(backbone, CosineHead(16, 3)).eval()


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _logits(model, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).numpy()


def _no_leftovers(folder, *keep):
    assert sorted(p.name for p in folder.iterdir()) == sorted(keep)  # no temporary file or folder stays behind


# --- the extra check: runs whether or not the extra is installed ---------------------------------------------


def _pretend_absent(monkeypatch, *absent):
    real = importlib.util.find_spec
    monkeypatch.setattr(formats.importlib.util, 'find_spec',
                        lambda name, *a: None if name in absent else real(name, *a) or object())


@pytest.mark.parametrize('fmt', ['executorch', 'executorch-int8', 'ncnn'])
def test_missing_extra_is_none_when_the_packages_are_found(monkeypatch, fmt):
    _pretend_absent(monkeypatch)
    assert missing_extra(fmt) is None


def test_missing_extra_names_only_what_is_absent_and_how_to_install_it(monkeypatch):
    _pretend_absent(monkeypatch, 'torchao')
    assert missing_extra('executorch') is None
    message = missing_extra('executorch-int8')
    assert "pip install 'torchao~=0.18.0'" in message and 'executorch~=' not in message
    assert "fewshot-lkca[device]" in message
    _pretend_absent(monkeypatch, 'pnnx', 'ncnn')
    assert "pip install 'pnnx>=20261020' 'ncnn>=1.0.20261020'" in missing_extra('ncnn')


def test_unknown_format_is_refused_with_the_choices():
    with pytest.raises(ExportError, match="unknown export format 'tflite'.*executorch-int8"):
        missing_extra('tflite')


def test_missing_extra_imports_no_runtime():
    code = ('import sys; from fewshot_lkca.export.formats import missing_extra\n'
            'for f in ("executorch", "executorch-int8", "ncnn"): missing_extra(f)\n'
            'print(sorted(m for m in ("executorch", "torchao", "pnnx", "ncnn") if m in sys.modules))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == '[]'


@pytest.mark.parametrize('call', ['fp32', 'int8', 'ncnn'])
def test_export_without_the_extra_is_refused_and_writes_nothing(monkeypatch, tmp_path, call):
    _pretend_absent(monkeypatch, 'executorch', 'torchao', 'pnnx', 'ncnn')
    model, x = _tiny_classifier(), _images(1)
    with pytest.raises(MissingExtraError, match='pip install'):
        if call == 'ncnn':
            export_ncnn(model, tmp_path / 'model.ncnn.param', x)
        else:
            export_executorch(model, tmp_path / 'model.pte', x, _images(4) if call == 'int8' else None)
    _no_leftovers(tmp_path)


def test_ncnn_files_are_named_by_the_param_file():
    assert ncnn_bin_path('run/model.ncnn.param').as_posix() == 'run/model.ncnn.bin'
    with pytest.raises(RuntimeExportError, match='.param'):
        ncnn_bin_path('run/model.ncnn.bin')


# --- ExecuTorch round trips ----------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def pte_fp32(tmp_path_factory):
    pytest.importorskip('executorch', reason="ExecuTorch not installed (pip install 'fewshot-lkca[device]')")
    folder = tmp_path_factory.mktemp('pte')
    model = _tiny_classifier().train()
    model.backbone.op.bn1.eval()  # as fine-tuning freezes BatchNorm statistics inside a training model
    report = export_executorch(model, folder / 'model.pte', _images(1), check=_images(3, seed=1))
    assert model.training and model.head.training and not model.backbone.op.bn1.training  # every mode given back
    return folder, model.eval(), report


@pytest.mark.slow
def test_executorch_fp32_matches_pytorch_and_reports_the_portable_ops(pte_fp32):
    folder, model, report = pte_fp32
    _no_leftovers(folder, 'model.pte')
    assert json.loads(json.dumps(report)) == report
    assert report['precision'] == 'fp32' and report['input_shape'] == [1, 3, SIZE, SIZE]
    assert report['size_bytes'] == (folder / 'model.pte').stat().st_size
    for images in report['parity'].values():
        assert images['max_abs_diff'] < 1e-4 and images['top1_agreement'] == 1.0
    assert report['parity']['check']['images'] == 3
    # the export form (fewshot_lkca.heads.export_form): the whole classifier is one XNNPACK delegate
    assert report['delegated_segments'] == 1 and report['ops_outside_delegate'] == {}

    x = _images(1, seed=5)
    np.testing.assert_allclose(run_executorch(folder / 'model.pte', x.numpy(), num_threads=1), _logits(model, x),
                               atol=1e-4)


@pytest.mark.slow
def test_run_executorch_refuses_bad_input(pte_fp32, tmp_path):
    folder = pte_fp32[0]
    with pytest.raises(RuntimeExportError, match=r'shape \[1, 3, 32, 32\] \(fixed at export\), got \[1, 3, 64, 64\]'):
        run_executorch(folder / 'model.pte', np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(RuntimeExportError, match='float32'):
        run_executorch(folder / 'model.pte', np.zeros((1, 3, SIZE, SIZE), np.float64))
    with pytest.raises(RuntimeExportError, match='no such ExecuTorch program'):
        run_executorch(tmp_path / 'absent.pte', np.zeros((1, 3, SIZE, SIZE), np.float32))
    (tmp_path / 'junk.pte').write_bytes(b'not a program')
    with pytest.raises(RuntimeExportError, match='cannot load ExecuTorch program'):
        run_executorch(tmp_path / 'junk.pte', np.zeros((1, 3, SIZE, SIZE), np.float32))


@pytest.mark.slow
def test_executorch_int8_is_quantized_and_agrees_on_top1(tmp_path):
    pytest.importorskip('torchao', reason="torchao not installed (pip install 'fewshot-lkca[device]')")
    pytest.importorskip('executorch', reason="ExecuTorch not installed (pip install 'fewshot-lkca[device]')")
    model, calibration = _tiny_classifier(), _images(8, seed=2)
    fp32 = export_executorch(model, tmp_path / 'fp32.pte', _images(1))
    report = export_executorch(model, tmp_path / 'int8.pte', _images(1), calibration)
    assert report['precision'] == 'int8' and report['calibration_images'] == 8
    parity = report['parity']['calibration']
    assert parity['images'] == 8
    assert 1e-3 < parity['max_abs_diff'] < 0.25 * parity['max_abs_logit']  # quantized, yet close to fp32
    assert parity['top1_agreement'] >= 0.75
    assert not any('quantize' in op for op in report['ops_outside_delegate'])  # q/dq all run inside XNNPACK
    assert report['size_bytes'] != fp32['size_bytes']


@pytest.mark.slow
def test_failed_executorch_export_keeps_the_existing_file(tmp_path):
    pytest.importorskip('executorch', reason="ExecuTorch not installed (pip install 'fewshot-lkca[device]')")

    class DataDependent(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x  # branches on data: torch.export refuses

    (tmp_path / 'model.pte').write_bytes(b'old')
    with pytest.raises(RuntimeExportError, match='ExecuTorch fp32 export failed'):
        export_executorch(DataDependent(), tmp_path / 'model.pte', _images(1))
    assert (tmp_path / 'model.pte').read_bytes() == b'old'
    _no_leftovers(tmp_path, 'model.pte')


def test_export_executorch_refuses_mismatched_calibration(monkeypatch, tmp_path):
    _pretend_absent(monkeypatch)  # inputs are checked before anything of ExecuTorch is imported
    with pytest.raises(RuntimeExportError, match='one fixed input shape'):
        export_executorch(_tiny_classifier(), tmp_path / 'm.pte', _images(1), torch.randn(4, 3, 48, 48))
    with pytest.raises(RuntimeExportError, match='NaN'):
        export_executorch(_tiny_classifier(), tmp_path / 'm.pte', _images(1), torch.full((2, 3, SIZE, SIZE), np.nan))
    _no_leftovers(tmp_path)


# --- NCNN round trips ----------------------------------------------------------------------------------------


def _needs_ncnn():
    for name in ('pnnx', 'ncnn'):
        pytest.importorskip(name, reason=f"{name} not installed (pip install 'fewshot-lkca[device]')")


def test_ncnn_round_trip_matches_pytorch(tmp_path):
    _needs_ncnn()
    model = _tiny_classifier()
    report = export_ncnn(model, tmp_path / 'model.ncnn.param', _images(1))
    _no_leftovers(tmp_path, 'model.ncnn.param', 'model.ncnn.bin')
    assert json.loads(json.dumps(report)) == report
    assert report['parity']['example']['max_abs_diff'] < 1e-4
    assert report['layers']['GroupNorm'] == 1 and report['layers']['ConvolutionDepthWise'] == 1
    x = _images(3, seed=4)  # NCNN runs image by image; the batch comes back stacked
    np.testing.assert_allclose(run_ncnn(tmp_path / 'model.ncnn.param', x.numpy(), num_threads=1), _logits(model, x),
                               atol=1e-4)
    with pytest.raises(RuntimeExportError, match=r'shape \[3, 32, 32\] \(fixed at export\), got \[3, 40, 40\]'):
        run_ncnn(tmp_path / 'model.ncnn.param', np.zeros((1, 3, 40, 40), np.float32))


def test_failed_ncnn_export_keeps_the_existing_pair(monkeypatch, tmp_path):
    _needs_ncnn()

    def half_written(cmd, cwd, **kwargs):  # pnnx dying after the .param, before the .bin
        (cwd / 'model.ncnn.param').write_text('7767517\n')
        return subprocess.CompletedProcess(cmd, 1, '', 'pnnx: unsupported operator\n')

    (tmp_path / 'model.ncnn.param').write_text('old param')
    (tmp_path / 'model.ncnn.bin').write_bytes(b'old bin')
    monkeypatch.setattr(ncnn.subprocess, 'run', half_written)
    with pytest.raises(RuntimeExportError, match=r'pnnx could not convert the model \(exit 1\): pnnx: unsupported'):
        export_ncnn(_tiny_classifier(), tmp_path / 'model.ncnn.param', _images(1))
    assert (tmp_path / 'model.ncnn.param').read_text() == 'old param'
    assert (tmp_path / 'model.ncnn.bin').read_bytes() == b'old bin'
    _no_leftovers(tmp_path, 'model.ncnn.param', 'model.ncnn.bin')


def test_a_model_must_return_the_logits_tensor(tmp_path):
    _needs_ncnn()

    class DictOut(nn.Module):
        def forward(self, x):
            return {'logits': x.mean((2, 3))}

    with pytest.raises(RuntimeExportError, match='must return one tensor .* got dict'):
        export_ncnn(DictOut(), tmp_path / 'model.ncnn.param', _images(1))
    _no_leftovers(tmp_path)


def test_run_ncnn_names_a_missing_bin(tmp_path):
    _needs_ncnn()
    (tmp_path / 'model.ncnn.param').write_text('7767517\n1 1\n')
    with pytest.raises(RuntimeExportError, match=r'no such NCNN file: .*model\.ncnn\.bin'):
        run_ncnn(tmp_path / 'model.ncnn.param', np.zeros((1, 3, SIZE, SIZE), np.float32))


@pytest.mark.slow
@pytest.mark.parametrize('name', ['lkca_mobilenet', 'lkca_mobilenet_dw3', 'tf_mobilenetv3_small_100'])
def test_backbones_with_a_cosine_head_convert_to_ncnn(tmp_path, name):
    _needs_ncnn()
    torch.manual_seed(0)
    backbone = timm.create_model(name, num_classes=0).eval()
    model = FewShotClassifier(backbone, CosineHead(backbone.head_hidden_size, 5)).eval()
    report = export_ncnn(model, tmp_path / 'model.ncnn.param', torch.randn(1, 3, 64, 64))
    assert report['parity']['example']['max_abs_diff'] < 1e-3


@pytest.mark.slow
def test_lkca_mobilenet_exports_to_executorch(tmp_path):
    pytest.importorskip('executorch', reason="ExecuTorch not installed (pip install 'fewshot-lkca[device]')")
    torch.manual_seed(0)
    backbone = timm.create_model('lkca_mobilenet', num_classes=0).eval()
    model = FewShotClassifier(backbone, CosineHead(backbone.head_hidden_size, 5)).eval()
    report = export_executorch(model, tmp_path / 'model.pte', torch.randn(1, 3, 64, 64))
    assert report['parity']['example']['max_abs_diff'] < 1e-4
    # the export form (fewshot_lkca.heads.export_form): one XNNPACK delegate, nothing left outside (the training
    # form split into 28 segments around 9 GroupNorms, 18 single-axis means and 9 splits)
    assert report['delegated_segments'] == 1 and report['ops_outside_delegate'] == {}


@pytest.mark.slow
@pytest.mark.parametrize('precision', ['fp32', 'int8'])
def test_mirror_views_classifier_is_one_executorch_segment(tmp_path, precision):
    pytest.importorskip('executorch', reason="ExecuTorch not installed (pip install 'fewshot-lkca[device]')")
    if precision == 'int8':
        pytest.importorskip('torchao', reason="torchao not installed (pip install 'fewshot-lkca[device]')")
    torch.manual_seed(0)
    backbone = timm.create_model('lkca_mobilenet_050', num_classes=0).eval()
    model = FewShotClassifier(backbone, CosineHead(backbone.head_hidden_size, 5), mirror_views=True).eval()
    x = torch.randn(1, 3, 48, 48)
    calibration = torch.randn(8, 3, 48, 48) if precision == 'int8' else None
    report = export_executorch(model, tmp_path / 'model.pte', x, calibration, check=torch.randn(2, 3, 48, 48))
    if precision == 'fp32':
        for images in report['parity'].values():
            assert images['max_abs_diff'] < 1e-4 and images['top1_agreement'] == 1.0
    # the flip as a product with the anti-identity, the views' normalisation as a product with ones and their sum
    # as two slices (fewshot_lkca.heads.MirrorViewsExport): the training form split into 4 segments around them
    assert report['delegated_segments'] == 1 and report['ops_outside_delegate'] == {}
