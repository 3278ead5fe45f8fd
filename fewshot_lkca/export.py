"""Export a fine-tuned run for deployment: ``python -m fewshot_lkca.export RUN_DIR --format onnx onnx-int8``.

Every format comes from one table (`FORMATS`): the file it writes into the run directory and what it needs
installed. A format that is unknown or whose packages are missing is refused before anything is written, with the
pip command to run. Every artifact is written under a temporary name and renamed into place, so an export that fails
leaves the run directory as it was.

Each artifact is checked against the PyTorch model on the run's own images, preprocessed as in the run (the support
set and the held-out images of the task), and the figures go to ``export.json`` in the run directory:

* ``onnx``: fp32, ``torch.onnx.export(dynamo=True, optimize=True)``, dynamic batch, ``onnx.checker`` clean, class
  names and preprocessing in the model's ``metadata_props`` (what `fewshot_lkca.predict` reads); logits max abs
  difference to PyTorch.
* ``onnx-int8``: the fp32 model quantized by `fewshot_lkca.quantize.quantize_onnx`, calibrated on the support set
  (topped up to 64 images with the run's training augmentation); top-1 agreement with fp32 and the accuracy of both
  on the held-out images.
* ``executorch``, ``executorch-int8``, ``ncnn``: device formats from `fewshot_lkca.runtimes` (batch 1).

Examples::

    python -m fewshot_lkca.export runs/lookalike-lkca_mobilenet-5w5s-finetune-seed0
    python -m fewshot_lkca.export runs/my-run --format onnx executorch-int8
"""
import argparse
import difflib
import hashlib
import importlib.util
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ['ExportError', 'Format', 'FORMATS', 'DEFAULT_FORMATS', 'EXPORT_FILE', 'check_formats', 'export_run',
           'export_after_finetune', 'summary_lines', 'build_parser', 'main']

_logger = logging.getLogger(__name__)

EXPORT_FILE = 'export.json'
DEFAULT_FORMATS = ('onnx', 'onnx-int8')
CALIBRATION_IMAGES = 64  # int8 ranges from the support set, topped up with augmented copies when it is smaller
MAX_CHECK_IMAGES = 300  # held-out images compared on (evenly spread over the pool when it holds more)
DEVICE_CHECK_IMAGES = 100  # batch-1 runtimes run one image at a time
_ONNX_MODULES = ('onnx', 'onnxscript', 'onnxruntime')


class ExportError(ValueError):
    """A run cannot be exported as asked (unknown format, missing package, unfinished run, failed conversion)."""


@dataclass(frozen=True)
class Format:
    """One export format.

    Attributes:
        file: The artifact's name in the run directory.
        what: One line for ``--help``.
        modules: Modules it needs; empty for device formats, which `fewshot_lkca.runtimes.missing_extra` checks.
    """
    file: str
    what: str
    modules: tuple[str, ...] = ()


FORMATS = {
    'onnx': Format('model.onnx', 'fp32 ONNX for onnxruntime, dynamic batch, preprocessing in its metadata',
                   _ONNX_MODULES),
    'onnx-int8': Format('model.int8.onnx', 'int8 (QDQ) ONNX calibrated on the support set', _ONNX_MODULES),
    'executorch': Format('model.pte', 'ExecuTorch, XNNPACK delegate, fp32, batch 1'),
    'executorch-int8': Format('model.int8.pte', 'ExecuTorch, XNNPACK delegate, int8 (pt2e), batch 1'),
    'ncnn': Format('model.ncnn.param', 'NCNN .param + .bin (through pnnx), fp32, batch 1'),
}


def _missing(fmt: str) -> str | None:
    """None when ``fmt`` can be exported here, else a message naming what to install."""
    modules = FORMATS[fmt].modules
    if not modules:
        from .runtimes import missing_extra

        return missing_extra(fmt)
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    if not absent:
        return None
    return f"format '{fmt}' needs {', '.join(absent)}, not installed: pip install {' '.join(absent)}"


def check_formats(formats) -> list[str]:
    """The requested formats, checked: known names, packages installed; commas split, duplicates dropped.

    Raises:
        ExportError: An unknown name (with a suggestion) or a format whose packages are missing (with the pip
            command).

    Example:
        >>> check_formats(['onnx,onnx-int8', 'onnx'])
        ['onnx', 'onnx-int8']
    """
    names = []
    for item in [formats] if isinstance(formats, str) else formats:
        for name in str(item).split(','):
            name = name.strip()
            if name and name not in names:
                names.append(name)
    for name in names:
        if name not in FORMATS:
            close = difflib.get_close_matches(name, list(FORMATS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ''
            raise ExportError(f"unknown export format '{name}'{hint} (choose from {', '.join(FORMATS)})")
    for name in names:
        message = _missing(name)
        if message:
            raise ExportError(message)
    return names


# ------------------------------------------------------------------------------------------------- the run
@dataclass
class _Inputs:
    """What an export needs from a run: the model, its metadata, and the run's own images (eval preprocessing)."""
    model: object  # FewShotClassifier in eval mode
    meta: dict
    checkpoint_digest: str
    support: object  # torch (N, 3, S, S) or None when the run's data cannot be read here
    held_out: object  # torch (M, 3, S, S) or None
    held_out_y: np.ndarray | None
    calibration: np.ndarray | None
    data_note: str


def _load_model(run_dir: Path):
    from .checkpoint import CheckpointError, load_checkpoint
    from .heads import CosineHead, FewShotClassifier
    from .models import create_backbone

    path = run_dir / 'model.safetensors'
    tensors, meta = load_checkpoint(path)
    needed = ('model', 'classes', 'image_size', 'mean', 'std', 'interpolation', 'crop_pct')
    missing = [k for k in needed if k not in meta]
    if missing or 'head.weight' not in tensors:
        raise CheckpointError(f'{path} is not a fine-tuned classifier of this package (lacks '
                              f'{", ".join(missing) or "head.weight"})')
    weight = tensors['head.weight']
    if weight.shape[0] != len(meta['classes']):
        raise CheckpointError(f'{path}: the head has {weight.shape[0]} classes, the metadata names '
                              f'{len(meta["classes"])}')
    head = CosineHead(weight.shape[1], weight.shape[0])
    model = FewShotClassifier(create_backbone(meta['model'], num_classes=0), head)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise CheckpointError(f'{path} does not fit {meta["model"]}: {str(e).splitlines()[0]}') from None
    digest = hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
    return model.eval(), meta, digest


def _spread(n: int, limit: int) -> list[int]:
    """Up to ``limit`` positions evenly spread over ``range(n)`` (the pool is ordered by class)."""
    if n <= limit:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, limit).round().astype(int).tolist()))


def _read_inputs(run_dir: Path, task=None) -> _Inputs:
    """Model and images of a finished run; ``task`` (from the fine-tune job) saves rebuilding it."""
    import torch

    from .config import ConfigError, FinetuneConfig, apply_overrides
    from .data import DataError, eval_transform, train_transform
    from .finetune import _load_images, build_task

    model, meta, digest = _load_model(run_dir)
    config_path = run_dir / 'config.json'
    try:
        if task is None:
            saved = json.loads(config_path.read_text())
            cfg = apply_overrides(FinetuneConfig(), saved, source=str(config_path))
            task = build_task(cfg)
            seed = cfg.seed
        else:
            seed = json.loads(config_path.read_text()).get('seed', 0) if config_path.is_file() else 0
    except (OSError, ValueError, ConfigError, DataError) as e:  # the data lives elsewhere, or the config is gone
        note = f'the run\'s data cannot be read here ({str(e).splitlines()[0]})'
        return _Inputs(model, meta, digest, None, None, None, None, note)
    if list(task.class_names) != list(meta['classes']):
        raise ExportError(f'{run_dir}: the task rebuilt from config.json has classes {task.class_names}, the '
                          f'checkpoint {meta["classes"]}: the data changed since the run')
    size = meta['image_size']
    eval_tf = eval_transform(model.backbone, size=size)
    support = _load_images(task, task.support_idx, eval_tf)
    picks = _spread(len(task.pool_idx), MAX_CHECK_IMAGES)
    held_out = _load_images(task, [task.pool_idx[i] for i in picks], eval_tf) if picks else None
    held_out_y = np.array([task.pool_y[i] for i in picks])
    parts = [support]
    extra = CALIBRATION_IMAGES - len(support)
    if extra > 0:
        augment = train_transform(model.backbone, size=size)
        augment.set_random_seed(seed)  # the same calibration set every time the run is exported
        parts.append(_load_images(task, [task.support_idx[i % len(support)] for i in range(extra)], augment))
    calibration = torch.cat(parts).numpy().astype(np.float32)
    note = (f'{len(support)} support + {len(picks)} held-out images of the run, eval preprocessing; calibration: '
            f'{len(support)} support images + {max(extra, 0)} augmented copies')
    return _Inputs(model, meta, digest, support, held_out, held_out_y, calibration, note)


def _check_images(inputs: _Inputs):
    """Images to compare runtimes on: the run's own, or (data unreadable) seeded random ones, said so in the report."""
    import torch

    if inputs.support is not None:
        parts = [inputs.support] + ([inputs.held_out] if inputs.held_out is not None else [])
        return torch.cat(parts), 'support + held-out images of the run'
    size = inputs.meta['image_size']
    return torch.randn(16, 3, size, size, generator=torch.Generator().manual_seed(0)), 'random inputs (no data)'


@dataclass
class _Reference:
    images: object  # torch (N, 3, S, S)
    logits: np.ndarray
    source: str


def _reference(inputs: _Inputs) -> _Reference:
    import torch

    images, source = _check_images(inputs)
    with torch.no_grad():
        logits = torch.cat([inputs.model(images[i:i + 32]) for i in range(0, len(images), 32)]).numpy()
    return _Reference(images, logits, source)


# ------------------------------------------------------------------------------------------------- ONNX
def _onnx_metadata(meta: dict, precision: str) -> dict[str, str]:
    from . import __version__
    from .predict import MARKER, encode_metadata

    keep = ('model', 'classes', 'image_size', 'mean', 'std', 'interpolation', 'crop_pct', 'step')
    fields = {k: meta[k] for k in keep if k in meta}
    if meta.get('data'):  # the data set's name, not a path on the training machine
        fields['data'] = Path(str(meta['data'])).name
    return encode_metadata(dict(fields, precision=precision, **{MARKER: __version__}))


def _save_onnx(proto, path: Path, staging: Path) -> None:
    """Write into ``staging`` (a folder beside ``path``), then rename: a failure leaves ``path`` as it was."""
    import onnx

    staged = staging / path.name
    onnx.save_model(proto, str(staged))
    os.replace(staged, path)


def _set_metadata(proto, props: dict[str, str]) -> None:
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])


def _run_onnx(session, images: np.ndarray) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i:i + 32]})[0] for i in range(0, len(images), 32)])


def _parity(reference: np.ndarray, other: np.ndarray) -> dict:
    return dict(images=len(reference), max_abs_diff=float(np.abs(reference - other).max()),
                max_abs_logit=float(np.abs(reference).max()),
                top1_agreement=float((reference.argmax(1) == other.argmax(1)).mean()))


def _export_onnx(inputs: _Inputs, ref: _Reference, path: Path, staging: Path) -> dict:
    """fp32 ONNX with dynamic batch and our metadata, checked, written atomically, compared with PyTorch."""
    import onnx
    import torch

    start = time.perf_counter()
    example = ref.images[:2]  # batch 2: torch.export would fix a batch of 1 as a constant
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # the exporter's deprecation and tracing notes are not the user's business
            # dynamo=True handles adaptive pools and GroupNorm with a dynamic batch (the legacy exporter does not);
            # optimize=True folds the graph: 702 -> 255 nodes, about 5x faster in onnxruntime (lkca_mobilenet, 96 px);
            # onnxruntime's offline optimisation on top of it measured no faster, so it is not applied.
            program = torch.onnx.export(inputs.model, (example,), None, dynamo=True, optimize=True, verbose=False,
                                        input_names=['image'], output_names=['logits'],
                                        dynamic_shapes=({0: torch.export.Dim('batch')},))
    except Exception as e:  # the exporter raises many types; one line names its complaint
        raise ExportError(f'ONNX export failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}') from e
    proto = program.model_proto
    _set_metadata(proto, _onnx_metadata(inputs.meta, 'fp32'))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f'the exported ONNX model fails onnx.checker: {str(e).splitlines()[0]}') from None
    _save_onnx(proto, path, staging)
    seconds = time.perf_counter() - start
    logits = _run_onnx(_session(path), ref.images.numpy())
    return dict(format='onnx', path=str(path), precision='fp32', size_bytes=path.stat().st_size,
                opset=max(o.version for o in proto.opset_import if o.domain in ('', 'ai.onnx')),
                nodes=len(proto.graph.node), input=dict(name='image', shape=['batch', 3, *example.shape[2:]]),
                exporter=dict(dynamo=True, optimize=True, torch=torch.__version__), checker='ok',
                parity=dict(_parity(ref.logits, logits), inputs=ref.source), seconds=round(seconds, 1))


def _export_onnx_int8(inputs: _Inputs, path: Path, fp32_path: Path, staging: Path) -> dict:
    """int8 ONNX from the fp32 one, calibrated on the support set, checked against fp32 on the held-out images."""
    import onnx

    from .quantize import quantize_onnx

    start = time.perf_counter()
    quantized = staging / f'quantized.{path.name}'
    report = quantize_onnx(fp32_path, quantized, inputs.calibration)
    proto = onnx.load(str(quantized))
    _set_metadata(proto, _onnx_metadata(inputs.meta, 'int8'))  # whatever the quantizer kept, ours is complete
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f'the int8 ONNX model fails onnx.checker: {str(e).splitlines()[0]}') from None
    _save_onnx(proto, path, staging)
    seconds = time.perf_counter() - start
    out = dict(format='onnx-int8', path=str(path), precision='int8', size_bytes=path.stat().st_size,
               nodes=len(proto.graph.node), calibration_images=len(inputs.calibration), quantization=report,
               seconds=round(seconds, 1))
    if inputs.held_out is not None:
        images = inputs.held_out.numpy()
        fp32 = _run_onnx(_session(fp32_path), images)
        int8 = _run_onnx(_session(path), images)
        labels = inputs.held_out_y
        out['check'] = dict(images=len(images), inputs='held-out images of the run (not used for calibration)',
                            top1_agreement=float((fp32.argmax(1) == int8.argmax(1)).mean()),
                            accuracy_fp32=float((fp32.argmax(1) == labels).mean()),
                            accuracy_int8=float((int8.argmax(1) == labels).mean()),
                            max_abs_diff=float(np.abs(fp32 - int8).max()))
    return out


# ------------------------------------------------------------------------------------------------- device formats
def _export_device(fmt: str, inputs: _Inputs, ref: _Reference, path: Path) -> dict:
    import torch

    from . import runtimes

    example = ref.images[:1]
    if fmt == 'ncnn':
        return runtimes.export_ncnn(inputs.model, path, example)
    calibration = torch.from_numpy(inputs.calibration) if fmt == 'executorch-int8' else None
    check = inputs.held_out[:DEVICE_CHECK_IMAGES] if inputs.held_out is not None else ref.images
    return runtimes.export_executorch(inputs.model, path, example, calibration, check=check)


# ------------------------------------------------------------------------------------------------- the job
def _merge_report(run_dir: Path, inputs: _Inputs, artifacts: dict) -> dict:
    """export.json: this export's artifacts, plus earlier ones of the same checkpoint."""
    path = run_dir / EXPORT_FILE
    earlier = {}
    try:
        old = json.loads(path.read_text())
        if old.get('checkpoint', {}).get('blake2b') == inputs.checkpoint_digest:
            earlier = old.get('artifacts', {})
    except (OSError, ValueError, AttributeError):
        pass  # none yet, or unreadable: it is rewritten whole
    meta = inputs.meta
    return dict(
        run_dir=str(run_dir),
        checkpoint=dict(path=str(run_dir / 'model.safetensors'), blake2b=inputs.checkpoint_digest,
                        model=meta['model'], step=meta.get('step'), classes=meta['classes']),
        preprocessing={k: meta[k] for k in ('image_size', 'mean', 'std', 'interpolation', 'crop_pct')},
        inputs=inputs.data_note,
        artifacts=dict(earlier, **artifacts),
    )


def _write_report(run_dir: Path, report: dict) -> None:
    from .checkpoint import atomic_write

    atomic_write(run_dir / EXPORT_FILE, lambda tmp: tmp.write_text(json.dumps(report, indent=2) + '\n'))


def export_run(run_dir: str | Path, formats=DEFAULT_FORMATS, task=None, log=print) -> dict:
    """Export a finished run into its own directory and record the checks in ``export.json``.

    Args:
        run_dir: A run directory written by ``python -m fewshot_lkca.finetune`` (finished: metrics.json exists).
        formats: Names from `FORMATS` (a comma-separated string per item is fine).
        task: The run's `fewshot_lkca.finetune.Task`, when the caller has it; else rebuilt from config.json.
        log: Where the one-line summary of each artifact goes.

    Returns:
        The contents of ``export.json``.

    Raises:
        ExportError: Unknown format, missing package, unfinished run, a conversion that fails its checks.
        CheckpointError: The run's model.safetensors is missing or does not fit.

    Example:
        >>> report = export_run('runs/my-run', ['onnx'])  # doctest: +SKIP
        onnx: runs/my-run/model.onnx, 5.5 MB; logits max abs diff 1.5e-05 vs PyTorch on 300 images ...
    """
    formats = check_formats(formats)
    run_dir = Path(run_dir)
    if not (run_dir / 'config.json').is_file() or not (run_dir / 'model.safetensors').is_file():
        raise ExportError(f'{run_dir} is not a run directory (no config.json and model.safetensors)')
    if not (run_dir / 'metrics.json').is_file():
        raise ExportError(f'{run_dir}: the run has not finished (no metrics.json); finish it with '
                          f'python -m fewshot_lkca.finetune --resume {run_dir}')
    if not formats:
        return {}
    inputs = _read_inputs(run_dir, task)
    calibrated = [f for f in formats if f.endswith('-int8')]
    if calibrated and inputs.calibration is None:
        raise ExportError(f"{', '.join(calibrated)} needs the run's support images for calibration, but "
                          f'{inputs.data_note}')
    ref = _reference(inputs)
    artifacts = {}
    try:
        # Artifacts are written in a staging folder beside them and renamed into place; it goes, whatever happens.
        with tempfile.TemporaryDirectory(prefix='.export-', dir=run_dir) as tmp:
            staging, fp32_path = Path(tmp), None
            for fmt in formats:
                path = run_dir / FORMATS[fmt].file
                if fmt == 'onnx':
                    artifacts[fmt] = _export_onnx(inputs, ref, path, staging)
                    fp32_path = path
                elif fmt == 'onnx-int8':
                    if fp32_path is None:  # int8 is made from the fp32 model; not asked for, it is not kept
                        (staging / 'fp32').mkdir()
                        fp32_path = staging / 'fp32' / 'model.onnx'
                        _export_onnx(inputs, ref, fp32_path, staging)
                    artifacts[fmt] = _export_onnx_int8(inputs, path, fp32_path, staging)
                else:
                    artifacts[fmt] = _export_device(fmt, inputs, ref, path)
                for line in summary_lines({fmt: artifacts[fmt]}):
                    log(line)
    finally:  # what was exported before a failure is recorded
        report = _merge_report(run_dir, inputs, artifacts)
        if artifacts:
            _write_report(run_dir, report)
    return report


def summary_lines(artifacts: dict) -> list[str]:
    """One line per artifact: file, size, and its check against PyTorch (or fp32, for int8)."""
    lines = []
    for fmt, rep in artifacts.items():
        head = f'{fmt}: {rep.get("path")}, {rep.get("size_bytes", 0) / 1e6:.2f} MB'
        check = rep.get('check') if fmt == 'onnx-int8' else None
        parity = rep.get('parity') or {}
        if check:
            lines.append(f'{head}; top-1 agrees with fp32 on {100 * check["top1_agreement"]:.1f} % of '
                         f'{check["images"]} held-out images, accuracy {100 * check["accuracy_int8"]:.1f} % '
                         f'(fp32 {100 * check["accuracy_fp32"]:.1f} %)')
        elif 'max_abs_diff' in parity:
            lines.append(f'{head}; logits max abs diff {parity["max_abs_diff"]:.1e} vs PyTorch on {parity["images"]} '
                         f'images, top-1 agreement {100 * parity["top1_agreement"]:.1f} %')
        elif parity:  # device formats: one entry per image set
            name, best = next(((k, parity[k]) for k in ('check', 'example') if k in parity), next(iter(parity.items())))
            lines.append(f'{head}; logits max abs diff {best["max_abs_diff"]:.1e} vs PyTorch on {best["images"]} '
                         f'{name} images, top-1 agreement {100 * best["top1_agreement"]:.1f} %')
        else:
            lines.append(head)
    return lines


def export_after_finetune(run_dir: Path, formats, task=None, log=print) -> dict | None:
    """The fine-tune job's last step: export, but never fail the finished run; a failure is one warning line."""
    log(f'exporting {", ".join(formats)} ...')
    try:
        return export_run(run_dir, formats, task=task, log=log)
    except (Exception, KeyboardInterrupt) as e:  # the run is finished and saved whatever happens here
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log(f'warning: export failed ({message}); the run is complete, retry with: python -m fewshot_lkca.export '
            f'{run_dir} --format {" ".join(formats)}')
        _logger.debug('export failed', exc_info=True)
        return None


# ------------------------------------------------------------------------------------------------- the CLI
def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    table = '\n'.join(f'  {name:<16} {f.file:<18} {f.what}' for name, f in FORMATS.items())
    parser = parser or argparse.ArgumentParser(
        prog='fewshot-lkca export', description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=f'formats:\n{table}')
    parser.add_argument('run_dir', type=Path, metavar='RUN_DIR', help='a finished fine-tuning run directory')
    parser.add_argument('--format', nargs='+', dest='formats', default=list(DEFAULT_FORMATS), metavar='FORMAT',
                        help=f'one or more of {", ".join(FORMATS)} (default: {" ".join(DEFAULT_FORMATS)})')
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .models.factory import BackboneError
    from .quantize import QuantizationError
    from .runtimes import RuntimeExportError

    errors = (ExportError, CheckpointError, ConfigError, DataError, BackboneError, QuantizationError,
              RuntimeExportError)
    try:
        export_run(args.run_dir, args.formats)
    except errors as e:
        raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
    main()
