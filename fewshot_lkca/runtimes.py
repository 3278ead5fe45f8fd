"""Device runtimes: ExecuTorch (``.pte``, XNNPACK delegate, fp32 or int8) and NCNN (through pnnx).

Each export writes its artifact atomically, runs it back with its own runtime in this process and compares the
logits with PyTorch's, so the returned report says how far the device model is from the one that was trained.

* ExecuTorch: ``torch.export`` -> (int8: pt2e with executorch's `XNNPACKQuantizer`, calibrated on the caller's
  images) -> ``to_edge_transform_and_lower`` with the `XnnpackPartitioner` -> ``.pte``. Nodes the partitioner does
  not take run in ExecuTorch's portable kernels; the report lists them by op type.
* NCNN: ``torch.jit.trace`` -> the pnnx converter (its own binary) -> ``NAME.param`` + ``NAME.bin`` (fp32 weights).

Both formats have a fixed input shape: the ``example``'s (batch 1 and the run's image size in practice). The
packages live in the optional ``device`` extra; `missing_extra` says what to install without importing anything.

Example:
    >>> from fewshot_lkca.runtimes import missing_extra
    >>> msg = missing_extra('ncnn')  # None when pnnx and ncnn are importable
"""
import importlib.util
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

from .checkpoint import atomic_write

__all__ = [
    'FORMATS', 'RuntimeExportError', 'MissingExtraError', 'missing_extra', 'require_extra',
    'export_executorch', 'run_executorch', 'export_ncnn', 'run_ncnn', 'ncnn_bin_path',
]

log = logging.getLogger(__name__)

# format -> {module that must be importable: what pip installs it}; the same requirements as the `device` extra.
# executorch 1.5.x is the line built against torch 2.14 and pins torchao 0.18.x, whose pt2e flow (prepare/convert)
# the int8 export calls directly. pnnx/ncnn: the first releases tested with torch 2.14.1.
FORMATS: dict[str, dict[str, str]] = {
    'executorch': {'executorch': 'executorch~=1.5.1'},
    'executorch-int8': {'executorch': 'executorch~=1.5.1', 'torchao': 'torchao~=0.18.0'},
    'ncnn': {'pnnx': 'pnnx>=20261020', 'ncnn': 'ncnn>=1.0.20261020'},
}
_EXTRA = "fewshot-lkca[device]"


class RuntimeExportError(ValueError):
    """A device export or run-back cannot proceed: bad input, a failed conversion, an artifact that does not fit."""


class MissingExtraError(RuntimeExportError):
    """The packages of a device format are not installed; the message says what to pip install."""


def missing_extra(fmt: str) -> str | None:
    """None when the packages that ``fmt`` needs are importable, else a one-line message naming what to install.

    Only looks the modules up (`importlib.util.find_spec`): nothing heavy is imported.

    Args:
        fmt: ``'executorch'``, ``'executorch-int8'`` or ``'ncnn'``.

    Raises:
        RuntimeExportError: Unknown format.
    """
    if fmt not in FORMATS:
        raise RuntimeExportError(f"unknown device format '{fmt}' (choose from {', '.join(FORMATS)})")
    absent = {m: req for m, req in FORMATS[fmt].items() if not _importable(m)}
    if not absent:
        return None
    return (f"format '{fmt}' needs {', '.join(absent)}, which {'is' if len(absent) == 1 else 'are'} not installed: "
            f"pip install {' '.join(repr(r) for r in absent.values())}  (or the whole extra: pip install '{_EXTRA}')")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken install, or a module object without a spec
        return False


def require_extra(fmt: str) -> None:
    """Raise `MissingExtraError` with `missing_extra`'s message when ``fmt`` cannot run here."""
    message = missing_extra(fmt)
    if message is not None:
        raise MissingExtraError(message)


# ---------------------------------------------------------------------------------------------------------------
# input checks and PyTorch references


def _check_images(name: str, images, like: torch.Tensor | None = None) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise RuntimeExportError(f'{name} must be a torch.Tensor, got {type(images).__name__}')
    if images.ndim != 4 or images.shape[0] == 0:
        raise RuntimeExportError(f'{name} must be N x C x H x W with N >= 1, got shape {tuple(images.shape)}')
    if not images.is_floating_point():
        raise RuntimeExportError(f'{name} must be floating point, got {images.dtype}')
    if not torch.isfinite(images).all():
        raise RuntimeExportError(f'{name} holds NaN or infinite values')
    if like is not None and images.shape[1:] != like.shape[1:]:
        raise RuntimeExportError(f'{name} images are {tuple(images.shape[1:])}, the example is {tuple(like.shape[1:])}'
                                 ' (device formats have one fixed input shape)')
    return images.detach().to('cpu', torch.float32).contiguous()


def _chunks(images: torch.Tensor, batch: int) -> list[torch.Tensor]:
    """Batches of the program's fixed size; a short last one is filled up with images from the start."""
    short = len(images) % batch
    if short:
        copies = -(-batch // len(images))  # enough repeats to fill one batch even when N < batch
        images = torch.cat([images, images.repeat(copies, 1, 1, 1)[:batch - short]])
    return list(images.split(batch))


def _run_in_batches(fn, images: torch.Tensor, batch: int) -> np.ndarray:
    """``fn`` over ``images`` in the program's fixed batch; the padding rows are dropped again."""
    outs = [np.asarray(fn(chunk)) for chunk in _chunks(images, batch)]
    return np.concatenate(outs)[:len(images)]


def _parity(reference: np.ndarray, device: np.ndarray) -> dict:
    ref = reference.reshape(len(reference), -1)
    dev = device.reshape(len(device), -1)
    return {
        'images': len(ref),
        'max_abs_diff': float(np.abs(ref - dev).max()),
        'max_abs_logit': float(np.abs(ref).max()),  # the scale the difference is to be read against
        'top1_agreement': float((ref.argmax(1) == dev.argmax(1)).mean()),
    }


class _EvalMode:
    """Eval mode for the export; afterwards every submodule gets its own mode back (a fine-tuning model keeps its
    frozen BatchNorm layers in eval mode inside a training model, and ``model.train()`` would undo that)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.modes = [(m, m.training) for m in model.modules()]

    def __enter__(self):
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        for module, training in self.modes:
            module.training = training


def _pytorch_logits(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    out = model(x)
    if not isinstance(out, torch.Tensor):
        raise RuntimeExportError(f'the model must return one tensor (the logits), got {type(out).__name__}')
    return out.numpy()


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise RuntimeExportError(f'model must be a torch.nn.Module, got {type(model).__name__}')


# ---------------------------------------------------------------------------------------------------------------
# ExecuTorch


def _op_name(target) -> str:
    return str(getattr(target, '__name__', target))


def _lower_to_pte(exported) -> tuple[bytes, dict]:
    """XNNPACK-lowered ``.pte`` bytes of an ExportedProgram, and what stayed outside the delegate."""
    import operator

    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
    outside, segments = Counter(), 0
    for node in edge.exported_program().graph_module.graph.nodes:
        if node.op != 'call_function' or node.target is operator.getitem:
            continue  # getitem only unpacks tuples (delegate outputs, GroupNorm's three results)
        if _op_name(node.target) == 'executorch_call_delegate':
            segments += 1
        else:
            outside[_op_name(node.target)] += 1
    program = edge.to_executorch()
    return program.buffer, {'delegate': 'XnnpackBackend', 'delegated_segments': segments,
                            'ops_outside_delegate': dict(outside.most_common())}


def _quantize_int8(model: nn.Module, example: torch.Tensor, calibration: torch.Tensor):
    """pt2e post-training static int8 with XNNPACK's scheme: per-channel symmetric weights, per-tensor activations."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    graph = torch.export.export(model, (example,)).module()
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for chunk in _chunks(calibration, len(example)):
            prepared(chunk)
    converted = convert_pt2e(prepared)
    return torch.export.export(converted, (example,))


def export_executorch(model: nn.Module, path: Path, example: torch.Tensor, calibration: torch.Tensor | None = None,
                      *, check: torch.Tensor | None = None) -> dict:
    """Write ``model`` as an ExecuTorch ``.pte`` with the XNNPACK delegate; fp32, or int8 when calibrated.

    The program's input shape is ``example``'s (fixed). The written file is loaded back with ExecuTorch's runtime
    and its logits compared with the PyTorch model's.

    Args:
        model: The classifier (e.g. a `FewShotClassifier`); exported in eval mode, its own mode is restored after.
        path: The ``.pte`` to write (atomically: a failed export leaves an existing file untouched).
        example: Input of the program's fixed shape, e.g. ``(1, 3, 224, 224)``.
        calibration: Images (N x C x H x W, preprocessed like ``example``) that calibrate int8 activations; None
            exports fp32.
        check: Further images to compare on (held-out images give an honest int8 figure; the calibration images
            are compared on as well).

    Returns:
        A JSON-able report: ``path``, ``precision``, ``size_bytes``, ``input_shape``, ``delegated_segments``,
        ``ops_outside_delegate`` (edge op name -> count), ``parity`` (per image set: max abs logits difference,
        the largest logit, top-1 agreement), ``seconds``, ``versions``.

    Raises:
        MissingExtraError: executorch (or torchao for int8) is not installed.
        RuntimeExportError: Bad input, or the model does not export.

    Example:
        >>> report = export_executorch(model, Path('model.pte'), torch.randn(1, 3, 224, 224))  # doctest: +SKIP
        >>> report['parity']['example']['max_abs_diff'] < 1e-4  # doctest: +SKIP
        True
    """
    precision = 'fp32' if calibration is None else 'int8'
    require_extra('executorch' if calibration is None else 'executorch-int8')
    _check_model(model)
    example = _check_images('example', example)
    sets = {'example': example}
    if calibration is not None:
        sets['calibration'] = calibration = _check_images('calibration', calibration, example)
    if check is not None:
        sets['check'] = _check_images('check', check, example)
    path = Path(path)
    if not path.parent.is_dir():
        raise RuntimeExportError(f'output folder does not exist: {path.parent}')

    start = time.perf_counter()
    with _EvalMode(model), torch.no_grad():
        references = {k: _run_in_batches(lambda b: _pytorch_logits(model, b), v, len(example)) for k, v in sets.items()}
        try:
            if calibration is None:
                exported = torch.export.export(model, (example,))
            else:
                exported = _quantize_int8(model, example, calibration)
            buffer, delegation = _lower_to_pte(exported)
        except Exception as e:  # export and lowering raise many types; the one line names the stage's complaint
            raise RuntimeExportError(f'ExecuTorch {precision} export failed: {type(e).__name__}: '
                                     f'{_first_line(e)}') from e
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(buffer))
    seconds = time.perf_counter() - start

    run = _load_executorch(str(path.resolve()), _file_version(path))
    parity = {k: _parity(references[k], _run_in_batches(lambda b: run(b.numpy()), v, len(example)))
              for k, v in sets.items()}
    report = {
        'format': 'executorch', 'path': str(path), 'precision': precision, 'size_bytes': path.stat().st_size,
        'input_shape': list(example.shape), **delegation, 'parity': parity, 'seconds': round(seconds, 1),
        'versions': _versions('torch', 'executorch', 'torchao'),
    }
    if calibration is not None:
        report['calibration_images'] = len(calibration)
    log.info('wrote %s (%s, %.2f MB, %d ops outside the delegate)', path, precision, report['size_bytes'] / 1e6,
             sum(delegation['ops_outside_delegate'].values()))
    return report


@lru_cache(maxsize=8)
def _load_executorch(path: str, version: tuple[int, int]):
    """A ``numpy -> numpy`` callable for the .pte at ``path``; cached per file version, so repeated runs skip loading.

    ``version`` (mtime in ns, size) is part of the cache key: a rewritten file is loaded anew.
    """
    from executorch.runtime import Runtime

    try:
        method = Runtime.get().load_program(Path(path)).load_method('forward')
    except Exception as e:  # the runtime raises RuntimeError or ValueError for a damaged or foreign file
        raise RuntimeExportError(f'cannot load ExecuTorch program {path}: {_first_line(e)}') from e
    meta = method.metadata.input_tensor_meta(0)
    shape = tuple(meta.sizes())

    def run(x: np.ndarray) -> np.ndarray:
        x = _check_array(x, shape, path)
        return method.execute((torch.from_numpy(x),))[0].numpy()

    return run


def run_executorch(path: Path, x: np.ndarray, *, num_threads: int | None = None) -> np.ndarray:
    """Run a ``.pte`` on ``x`` with ExecuTorch's runtime (XNNPACK included) and return its first output.

    Args:
        path: A file written by `export_executorch`.
        x: float32 array of the program's fixed input shape.
        num_threads: Size of ExecuTorch's (process-wide) thread pool; None leaves it as it is.

    Raises:
        MissingExtraError: executorch is not installed.
        RuntimeExportError: Missing or unreadable file, or ``x`` of another shape or type.
    """
    require_extra('executorch')
    path = Path(path)
    if not path.is_file():
        raise RuntimeExportError(f'no such ExecuTorch program: {path}')
    if num_threads is not None:
        _set_executorch_threads(num_threads)
    return _load_executorch(str(path.resolve()), _file_version(path))(x)


def _set_executorch_threads(num_threads: int) -> None:
    from executorch.extension.pybindings import portable_lib

    if num_threads < 1:
        raise RuntimeExportError(f'num_threads must be >= 1, got {num_threads}')
    if portable_lib._threadpool_get_thread_count() != num_threads:
        portable_lib._unsafe_reset_threadpool(num_threads)  # safe here: no method is running in this process


def _check_array(x, shape: tuple[int, ...], what) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise RuntimeExportError(f'input must be a numpy array, got {type(x).__name__}')
    if x.dtype != np.float32:
        raise RuntimeExportError(f'input must be float32, got {x.dtype}')
    if tuple(x.shape) != shape:
        raise RuntimeExportError(f'{what} takes input of shape {list(shape)} (fixed at export), got {list(x.shape)}')
    return np.ascontiguousarray(x)


# ---------------------------------------------------------------------------------------------------------------
# NCNN


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
    _check_model(model)
    example = _check_images('example', example)
    path = Path(path)
    bin_path = ncnn_bin_path(path)
    if not path.parent.is_dir():
        raise RuntimeExportError(f'output folder does not exist: {path.parent}')
    import pnnx

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f'.{path.name}.', dir=path.parent) as tmp:
        tmp = Path(tmp)
        with _EvalMode(model), torch.no_grad():
            reference = _pytorch_logits(model, example)
            try:
                with warnings.catch_warnings():
                    # The shape is fixed by design (TracerWarning says so per shape check); pnnx reads TorchScript,
                    # which torch 2.14 marks deprecated (FutureWarning): pnnx also reads ONNX if trace goes away.
                    warnings.simplefilter('ignore', torch.jit.TracerWarning)
                    warnings.simplefilter('ignore', FutureWarning)
                    traced = torch.jit.trace(model, (example,))
            except Exception as e:  # tracing raises many types
                raise RuntimeExportError(f'NCNN export: torch.jit.trace failed: {_first_line(e)}') from e
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
        'layers': layers, 'parity': {'example': _parity(reference, exact), 'example_fp16': _parity(reference, fp16)},
        'seconds': round(seconds, 1),
        'versions': _versions('torch', 'pnnx', 'ncnn'),
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
    net, expected = _load_ncnn(str(param_path.resolve()), _file_version(param_path), _file_version(bin_path),
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


# ---------------------------------------------------------------------------------------------------------------


def _file_version(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out
