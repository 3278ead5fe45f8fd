"""Export a fine-tuned run for deployment: ``python -m fewshot_lkca.export RUN_DIR --format onnx onnx-int8``.

Every format comes from one table (`FORMATS`): the file it writes into the run directory and what it needs
installed. A format that is unknown or whose packages are missing is refused before anything is written, with the
pip command to run. Every artifact is written under a temporary name and renamed into place, so an export that fails
leaves the run directory as it was.

Each artifact is checked against the PyTorch model on the run's own images, preprocessed as in the run (the support
set and the held-out images of the task), and the figures go to ``export.json`` in the run directory.

Modules, in the order data flows through them::

    formats     the one format table: file, description, packages needed (torch-free)
    inputs      what an export reads from a run: the classifier, its metadata, the run's images
    onnx        the one ONNX export (also used by the benchmarks); session: onnxruntime sessions (torch-free)
    int8        onnxruntime static int8 quantization
    executorch, ncnn, device   the device runtimes and what they share
    artifacts   one writer per format, each checked against PyTorch (or fp32)
    run, cli    the job (export.json) and its command line

Examples::

    python -m fewshot_lkca.export runs/lookalike-lkca_mobilenet-5w5s-finetune-seed0
    python -m fewshot_lkca.export runs/my-run --format onnx executorch-int8
"""
from .formats import DEFAULT_FORMATS, FORMATS, ExportError, Format, MissingExtraError, RuntimeExportError, check_formats
from .inputs import CALIBRATION_IMAGES
from .run import export_after_finetune, export_run, summary_lines

__all__ = ['ExportError', 'RuntimeExportError', 'MissingExtraError', 'Format', 'FORMATS', 'DEFAULT_FORMATS',
           'CALIBRATION_IMAGES', 'check_formats', 'export_run', 'export_after_finetune', 'summary_lines', 'main']


def main(argv: list[str] | None = None) -> None:
    """``python -m fewshot_lkca.export`` (see `fewshot_lkca.export.cli`)."""
    from .cli import main as cli_main

    cli_main(argv)
