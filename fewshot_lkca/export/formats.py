"""The one table of export formats: the file each writes, what it is, and the packages it needs (torch-free).

A format whose packages are missing is refused before anything is written, with the pip command to run; lookups use
`importlib.util.find_spec` only, so nothing heavy is imported to answer.

Example:
    >>> check_formats(['onnx,onnx-int8', 'onnx'])
    ['onnx', 'onnx-int8']
"""
import difflib
import importlib.util
from dataclasses import dataclass, field

__all__ = ['ExportError', 'RuntimeExportError', 'MissingExtraError', 'Format', 'FORMATS', 'DEFAULT_FORMATS',
           'check_formats', 'missing_extra']

_DEVICE_EXTRA = 'fewshot-lkca[device]'
_ONNX = {'onnx': 'onnx', 'onnxscript': 'onnxscript', 'onnxruntime': 'onnxruntime'}
# executorch 1.5.x is the line built against torch 2.14 and pins torchao 0.18.x, whose pt2e flow (prepare/convert)
# the int8 export calls directly. pnnx/ncnn: the first releases tested with torch 2.14.1.
_EXECUTORCH = {'executorch': 'executorch~=1.5.1'}


class ExportError(ValueError):
    """A run cannot be exported as asked (unknown format, missing package, unfinished run, failed conversion)."""


class RuntimeExportError(ExportError):
    """A device export or run-back cannot proceed: bad input, a failed conversion, an artifact that does not fit."""


class MissingExtraError(RuntimeExportError):
    """The packages of a format are not installed; the message says what to pip install."""


@dataclass(frozen=True)
class Format:
    """One export format.

    Attributes:
        file: The artifact's name in the run directory.
        what: One line for ``--help``.
        requires: Module that must be importable -> what pip installs it.
        batch_one: The artifact has a fixed input of one image (device runtimes); else a dynamic batch.
    """
    file: str
    what: str
    requires: dict[str, str] = field(default_factory=dict)
    batch_one: bool = False

    @property
    def device(self) -> bool:
        """Installed with the ``device`` extra rather than the package itself."""
        return not set(self.requires) <= set(_ONNX)


FORMATS = {
    'onnx': Format('model.onnx', 'fp32 ONNX for onnxruntime, dynamic batch, preprocessing in its metadata', _ONNX),
    'onnx-int8': Format('model.int8.onnx', 'int8 (QDQ) ONNX calibrated on the support set', _ONNX),
    'executorch': Format('model.pte', 'ExecuTorch, XNNPACK delegate, fp32, batch 1', _EXECUTORCH, batch_one=True),
    'executorch-int8': Format('model.int8.pte', 'ExecuTorch, XNNPACK delegate, int8 (pt2e), batch 1',
                              dict(_EXECUTORCH, torchao='torchao~=0.18.0'), batch_one=True),
    'ncnn': Format('model.ncnn.param', 'NCNN .param + .bin (through pnnx), fp32, batch 1',
                   {'pnnx': 'pnnx>=20261020', 'ncnn': 'ncnn>=1.0.20261020'}, batch_one=True),
}
DEFAULT_FORMATS = ('onnx', 'onnx-int8')


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken install, or a module object without a spec
        return False


def missing_extra(fmt: str) -> str | None:
    """None when the packages that ``fmt`` needs are importable, else a one-line message naming what to install.

    Raises:
        ExportError: Unknown format.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format '{fmt}' (choose from {', '.join(FORMATS)})")
    spec = FORMATS[fmt]
    absent = {m: req for m, req in spec.requires.items() if not _importable(m)}
    if not absent:
        return None
    extra = f"  (or the whole extra: pip install '{_DEVICE_EXTRA}')" if spec.device else ''
    return (f"format '{fmt}' needs {', '.join(absent)}, which {'is' if len(absent) == 1 else 'are'} not installed: "
            f"pip install {' '.join(repr(r) if spec.device else r for r in absent.values())}{extra}")


def check_formats(formats) -> list[str]:
    """The requested formats, checked: known names, packages installed; commas split, duplicates dropped.

    Raises:
        ExportError: An unknown name (with a suggestion) or a format whose packages are missing (with the pip
            command).
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
        message = missing_extra(name)
        if message:
            raise MissingExtraError(message)
    return names
