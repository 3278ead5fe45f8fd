"""NCNN: ``torch.jit.trace`` -> the pnnx converter (its own binary) -> ``NAME.param`` + ``NAME.bin`` (fp32 weights)."""
import logging
import os
import subprocess
import tempfile
import time
import warnings
from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..heads import static_padding
from .device import (
    EvalMode,
    RuntimeExportError,
    check_images,
    check_model,
    file_version,
    first_line,
    parity,
    pytorch_logits,
    require_extra,
    versions,
)

__all__ = ['export_ncnn', 'run_ncnn', 'ncnn_bin_path']

log = logging.getLogger(__name__)


def ncnn_bin_path(param_path: Path) -> Path:
    """The weights file that goes with an NCNN ``.param``: same name, ``.bin`` (``model.ncnn.param`` -> ``.bin``)."""
    param_path = Path(param_path)
    if param_path.suffix != '.param':
        raise RuntimeExportError(f'an NCNN model is named by its .param file (e.g. model.ncnn.param), got {param_path}')
    return param_path.with_suffix('.bin')


def export_ncnn(model: nn.Module, path: Path, example: torch.Tensor) -> dict:
    """Write ``model`` as an NCNN ``.param`` + ``.bin`` pair (fp32 weights) through pnnx, and run it back.

    Both files are converted in a temporary folder beside ``path`` and then renamed into place (``.bin`` first, so a
    new ``.param`` never meets an old ``.bin``); a failed conversion leaves existing files untouched.

    Args:
        model: The classifier; traced in eval mode, its own mode is restored after.
        path: The ``.param`` to write, e.g. ``run/model.ncnn.param``; the weights go to ``run/model.ncnn.bin``.
        example: Input of the model's fixed shape, e.g. ``(1, 3, 224, 224)``.

    Returns:
        A JSON-able report: ``path``, ``bin_path``, ``size_bytes`` (both files), ``input_shape``, ``layers`` (NCNN
        layer type -> count), ``parity`` on ``example`` computed in fp32 and with NCNN's default fp16 storage and
        arithmetic (``example_fp16``), ``seconds``, ``versions``.

    Raises:
        MissingExtraError: pnnx or ncnn is not installed.
        RuntimeExportError: Bad input, or pnnx cannot convert the model.
    """
    require_extra('ncnn')
    check_model(model)
    example = check_images('example', example)
    path = Path(path)
    bin_path = ncnn_bin_path(path)
    if not path.parent.is_dir():
        raise RuntimeExportError(f'output folder does not exist: {path.parent}')
    import pnnx

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f'.{path.name}.', dir=path.parent) as tmp:
        tmp = Path(tmp)
        with EvalMode(model), torch.no_grad():
            reference = pytorch_logits(model, example)
            try:
                with warnings.catch_warnings():
                    # The shape is fixed by design (TracerWarning says so per shape check); pnnx reads TorchScript,
                    # which torch 2.14 marks deprecated (FutureWarning): pnnx also reads ONNX if trace goes away.
                    warnings.simplefilter('ignore', torch.jit.TracerWarning)
                    warnings.simplefilter('ignore', FutureWarning)
                    # TF-'same' pads as constants for the example's size: NCNN runs no shape arithmetic
                    traced = torch.jit.trace(static_padding(model, example).eval(), (example,))
            except Exception as e:  # tracing raises many types
                raise RuntimeExportError(f'NCNN export: torch.jit.trace failed: {first_line(e)}') from e
        traced.save(str(tmp / 'model.pt'))
        shape = ','.join(str(s) for s in example.shape)
        # pnnx writes its by-products (pnnx param/bin/onnx, python scripts) next to its input: all stay in tmp.
        cmd = [pnnx.EXEC_PATH, 'model.pt', f'inputshape=[{shape}]f32', 'fp16=0', 'device=cpu',
               'ncnnparam=model.ncnn.param', 'ncnnbin=model.ncnn.bin']
        done = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        new_param, new_bin = tmp / 'model.ncnn.param', tmp / 'model.ncnn.bin'
        if done.returncode != 0 or not new_param.is_file() or not new_bin.is_file():
            tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ['no output']
            raise RuntimeExportError(f'pnnx could not convert the model (exit {done.returncode}): {tail[0]}')
        _record_ncnn_input_shape(new_param, tuple(example.shape[1:]))
        layers = _ncnn_layers(new_param)
        os.replace(new_bin, bin_path)
        os.replace(new_param, path)
    seconds = time.perf_counter() - start

    exact, fp16 = run_ncnn(path, example.numpy()), run_ncnn(path, example.numpy(), fp16=True)
    report = {
        'format': 'ncnn', 'path': str(path), 'bin_path': str(bin_path), 'precision': 'fp32',
        'size_bytes': path.stat().st_size + bin_path.stat().st_size, 'input_shape': list(example.shape),
        'layers': layers, 'parity': {'example': parity(reference, exact), 'example_fp16': parity(reference, fp16)},
        'seconds': round(seconds, 1),
        'versions': versions('torch', 'pnnx', 'ncnn'),
    }
    log.info('wrote %s + %s (%.2f MB)', path, bin_path.name, report['size_bytes'] / 1e6)
    return report


def _ncnn_layers(param_path: Path) -> dict[str, int]:
    """Layer type -> count from an NCNN .param (line 1: magic, line 2: counts, then one layer per line)."""
    lines = param_path.read_text().splitlines()[2:]
    return dict(Counter(line.split()[0] for line in lines if line.strip()).most_common())


def run_ncnn(param_path: Path, x: np.ndarray, *, num_threads: int | None = None, fp16: bool = False) -> np.ndarray:
    """Run an NCNN model (``.param`` + its ``.bin``) on ``x`` on the CPU and return its output, batch first.

    NCNN runs one image at a time: the images of ``x`` go through one by one and the outputs are stacked.

    Args:
        param_path: The ``.param`` written by `export_ncnn` (its ``.bin`` beside it).
        x: float32 array N x C x H x W with the exported C x H x W.
        num_threads: NCNN threads; None keeps NCNN's default.
        fp16: Let NCNN use fp16 storage and arithmetic where the CPU has them (its own default, and what phones
            run); False computes in fp32, which is what parity with PyTorch is measured in.

    Raises:
        MissingExtraError: ncnn is not installed.
        RuntimeExportError: Missing files, or ``x`` of another shape or type.
    """
    require_extra('ncnn')
    param_path = Path(param_path)
    bin_path = ncnn_bin_path(param_path)
    for p in (param_path, bin_path):
        if not p.is_file():
            raise RuntimeExportError(f'no such NCNN file: {p}')
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 4:
        raise RuntimeExportError('input must be a float32 numpy array N x C x H x W, got '
                                 f'{getattr(x, "dtype", type(x).__name__)} {list(getattr(x, "shape", []))}')
    net, expected = _load_ncnn(str(param_path.resolve()), file_version(param_path), file_version(bin_path),
                               num_threads, fp16)
    if expected is not None and tuple(x.shape[1:]) != expected:
        raise RuntimeExportError(f'{param_path} takes images of shape {list(expected)} (fixed at export), '
                                 f'got {list(x.shape[1:])}')
    import ncnn

    outs = []
    for image in np.ascontiguousarray(x):
        extractor = net.create_extractor()
        extractor.input(net.input_names()[0], ncnn.Mat(image).clone())
        status, out = extractor.extract(net.output_names()[0])
        if status != 0:
            raise RuntimeExportError(f'NCNN could not run {param_path} (status {status})')
        outs.append(np.array(out))
    return np.stack(outs)


@lru_cache(maxsize=8)
def _load_ncnn(param: str, param_version: tuple, bin_version: tuple, num_threads: int | None, fp16: bool):
    import ncnn

    net = ncnn.Net()
    net.opt.use_vulkan_compute = False  # CPU only: the parity figures must not depend on a GPU driver
    for option in ('use_fp16_storage', 'use_fp16_packed', 'use_fp16_arithmetic'):
        setattr(net.opt, option, fp16)  # before load_model: NCNN converts the weights while loading them
    if num_threads is not None:
        net.opt.num_threads = num_threads
    if net.load_param(param) != 0 or net.load_model(str(ncnn_bin_path(Path(param)))) != 0:
        raise RuntimeExportError(f'NCNN cannot load {param} and its .bin (damaged, or not an NCNN model)')
    return net, _ncnn_input_shape(Path(param))


def _ncnn_input_shape(param_path: Path) -> tuple[int, ...] | None:
    """C x H x W from the Input layer's shape params (``0=w 1=h 2=c``, written by `export_ncnn`), or None."""
    for line in Path(param_path).read_text().splitlines()[2:]:
        fields = line.split()
        if fields and fields[0] == 'Input':
            params = dict(f.split('=', 1) for f in fields[_ncnn_params_start(fields):] if '=' in f)
            if all(k in params for k in '012'):
                return int(params['2']), int(params['1']), int(params['0'])
            return None
    return None


def _ncnn_params_start(fields: list[str]) -> int:
    """Index of a layer line's first ``k=v`` param: type, name, #inputs, #outputs, then the blob names."""
    return 4 + int(fields[2]) + int(fields[3])


def _record_ncnn_input_shape(param_path: Path, chw: tuple[int, ...]) -> None:
    """Put C x H x W into the Input layer (``0=w 1=h 2=c``: NCNN's own shape hint) so `run_ncnn` can check inputs."""
    lines = param_path.read_text().splitlines()
    for i, line in enumerate(lines[2:], start=2):
        fields = line.split()
        if fields and fields[0] == 'Input' and len(fields) == _ncnn_params_start(fields):  # no params yet
            c, h, w = chw
            lines[i] = f'{line} 0={w} 1={h} 2={c}'
            break
    param_path.write_text('\n'.join(lines) + '\n')
