"""ExecuTorch: ``torch.export`` -> (int8: pt2e with executorch's `XNNPACKQuantizer`, calibrated on the caller's
images) -> ``to_edge_transform_and_lower`` with the `XnnpackPartitioner` -> ``.pte``.

Nodes the partitioner does not take run in ExecuTorch's portable kernels; the report lists them by op type.
"""
import contextlib
import logging
import os
import sys
import time
from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..files import atomic_write
from ..heads import export_form
from .device import (
    EvalMode,
    RuntimeExportError,
    check_images,
    check_model,
    chunks,
    file_version,
    first_line,
    parity,
    pytorch_logits,
    require_extra,
    run_in_batches,
    versions,
)

__all__ = ['export_executorch', 'run_executorch']

log = logging.getLogger(__name__)
# torchao (imported by executorch) registers an Enum with torch's pytree, which logs a deprecation warning for it on
# every import: nothing the user can act on.
logging.getLogger('torch.utils._pytree').addFilter(lambda record: 'is an Enum subclass' not in str(record.msg))


@contextlib.contextmanager
def _native_stderr_silenced():
    """ExecuTorch's runtime probes the CPU in C++ and prints what it cannot read (cpuinfo_utils.cpp) to file
    descriptor 2; failures still surface as Python exceptions, so the C-level stderr is muted while it loads."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, 'w') as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


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
        for chunk in chunks(calibration, len(example)):
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
    check_model(model)
    example = check_images('example', example)
    sets = {'example': example}
    if calibration is not None:
        sets['calibration'] = calibration = check_images('calibration', calibration, example)
    if check is not None:
        sets['check'] = check_images('check', check, example)
    path = Path(path)
    if not path.parent.is_dir():
        raise RuntimeExportError(f'output folder does not exist: {path.parent}')

    start = time.perf_counter()
    with EvalMode(model), torch.no_grad():
        references = {k: run_in_batches(lambda b: pytorch_logits(model, b), v, len(example)) for k, v in sets.items()}
        try:
            traced = export_form(model, example.shape[-1], example).eval()  # ops XNNPACK delegates (one segment)
            if calibration is None:
                exported = torch.export.export(traced, (example,))
            else:
                exported = _quantize_int8(traced, example, calibration)
            buffer, delegation = _lower_to_pte(exported)
        except Exception as e:  # export and lowering raise many types; the one line names the stage's complaint
            raise RuntimeExportError(f'ExecuTorch {precision} export failed: {type(e).__name__}: '
                                     f'{first_line(e)}') from e
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(buffer))
    seconds = time.perf_counter() - start

    run = _load_executorch(str(path.resolve()), file_version(path))
    checks = {k: parity(references[k], run_in_batches(lambda b: run(b.numpy()), v, len(example)))
              for k, v in sets.items()}
    report = {
        'format': 'executorch', 'path': str(path), 'precision': precision, 'size_bytes': path.stat().st_size,
        'input_shape': list(example.shape), **delegation, 'parity': checks, 'seconds': round(seconds, 1),
        'versions': versions('torch', 'executorch', 'torchao'),
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
        with _native_stderr_silenced():
            method = Runtime.get().load_program(Path(path)).load_method('forward')
    except Exception as e:  # the runtime raises RuntimeError or ValueError for a damaged or foreign file
        raise RuntimeExportError(f'cannot load ExecuTorch program {path}: {first_line(e)}') from e
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
    return _load_executorch(str(path.resolve()), file_version(path))(x)


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
