"""Export a finished fine-tuning run into its own directory, every artifact checked, the checks in export.json."""
import json
import logging
import tempfile
from pathlib import Path

from ..files import atomic_write
from ..metadata import PREPROCESSING_KEYS
from ..rundir import CONFIG_FILE, EXPORT_FILE, METRICS_FILE, MODEL_FILE
from .artifacts import write_device, write_onnx, write_onnx_int8
from .formats import DEFAULT_FORMATS, FORMATS, ExportError, check_formats
from .inputs import Inputs, read_inputs, reference

__all__ = ['export_run', 'export_after_finetune', 'summary_lines']

_logger = logging.getLogger(__name__)


def _merge_report(run_dir: Path, inputs: Inputs, artifacts: dict) -> dict:
    """export.json: this export's artifacts, plus earlier ones of the same checkpoint."""
    earlier = {}
    try:
        old = json.loads((run_dir / EXPORT_FILE).read_text())
        if old.get('checkpoint', {}).get('blake2b') == inputs.checkpoint_digest:
            earlier = old.get('artifacts', {})
    except (OSError, ValueError, AttributeError):
        pass  # none yet, or unreadable: it is rewritten whole
    meta = inputs.meta
    return dict(
        run_dir=str(run_dir),
        checkpoint=dict(path=str(run_dir / MODEL_FILE), blake2b=inputs.checkpoint_digest, model=meta['model'],
                        step=meta.get('step'), classes=meta['classes']),
        preprocessing={k: meta[k] for k in PREPROCESSING_KEYS},
        inputs=inputs.data_note,
        artifacts=dict(earlier, **artifacts),
    )


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
    if not (run_dir / CONFIG_FILE).is_file() or not (run_dir / MODEL_FILE).is_file():
        raise ExportError(f'{run_dir} is not a run directory (no config.json and model.safetensors)')
    if not (run_dir / METRICS_FILE).is_file():
        raise ExportError(f'{run_dir}: the run has not finished (no metrics.json); finish it with '
                          f'python -m fewshot_lkca.finetune --resume {run_dir}')
    if not formats:
        return {}
    inputs = read_inputs(run_dir, task)
    calibrated = [f for f in formats if f.endswith('-int8')]
    if calibrated and inputs.calibration is None:
        raise ExportError(f"{', '.join(calibrated)} needs the run's support images for calibration, but "
                          f'{inputs.data_note}')
    ref = reference(inputs)
    artifacts = {}
    try:
        # Artifacts are written in a staging folder beside them and renamed into place; it goes, whatever happens.
        with tempfile.TemporaryDirectory(prefix='.export-', dir=run_dir) as tmp:
            staging, fp32_path = Path(tmp), None
            for fmt in formats:
                path = run_dir / FORMATS[fmt].file
                if fmt == 'onnx':
                    artifacts[fmt] = write_onnx(inputs, ref, path, staging)
                    fp32_path = path
                elif fmt == 'onnx-int8':
                    if fp32_path is None:  # int8 is made from the fp32 model; not asked for, it is not kept
                        fp32_path = staging / 'model.onnx'
                        write_onnx(inputs, ref, fp32_path, staging)
                    artifacts[fmt] = write_onnx_int8(inputs, path, fp32_path, staging)
                else:
                    artifacts[fmt] = write_device(fmt, inputs, ref, path)
                for line in summary_lines({fmt: artifacts[fmt]}):
                    log(line)
    finally:  # what was exported before a failure is recorded
        report = _merge_report(run_dir, inputs, artifacts)
        if artifacts:
            atomic_write(run_dir / EXPORT_FILE, lambda tmp: tmp.write_text(json.dumps(report, indent=2) + '\n'))
    return report


def summary_lines(artifacts: dict) -> list[str]:
    """One line per artifact: file, size, and its check against PyTorch (or fp32, for int8)."""
    lines = []
    for fmt, rep in artifacts.items():
        head = f'{fmt}: {rep.get("path")}, {rep.get("size_bytes", 0) / 1e6:.2f} MB'
        check = rep.get('check') if fmt == 'onnx-int8' else None
        parity = rep.get('parity') or {}
        if check and 'accuracy_int8' not in check:
            lines.append(f'{head}; top-1 agrees with fp32 on {100 * check["top1_agreement"]:.1f} % of '
                         f'{check["images"]} training images (none was held out)')
        elif check:
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
    except KeyboardInterrupt:  # the run is finished and saved; the user stopped the export: say so, exit non-zero
        raise SystemExit(f'export interrupted; the run is complete, export it with: python -m fewshot_lkca.export '
                         f'{run_dir} --format {" ".join(formats)}') from None
    except Exception as e:  # the run is finished and saved whatever happens here
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log(f'warning: export failed ({message}); the run is complete, retry with: python -m fewshot_lkca.export '
            f'{run_dir} --format {" ".join(formats)}')
        _logger.debug('export failed', exc_info=True)
        return None
