"""The one ONNX export of the package (the run exporter and the benchmarks both use it), and its file helpers.

``torch.onnx.export(dynamo=True, optimize=True)`` with a dynamic batch: the dynamo exporter handles adaptive pools
and GroupNorm with a dynamic batch (the legacy one fails on them); ``optimize=True`` folds the graph (702 -> 255
nodes, about 5x faster in onnxruntime for lkca_mobilenet at 96 px); onnxruntime's offline optimisation on top
measured no faster, so it is not applied.
"""
import os
import warnings
from pathlib import Path

import numpy as np

from ..files import atomic_write
from .formats import ExportError

__all__ = ['export_onnx', 'check_onnx', 'save_onnx', 'set_metadata', 'opset', 'parity', 'file_bytes',
           'strip_unused_domains']


def export_onnx(model, example, output_name: str | tuple[str, ...] = 'logits'):
    """The fp32 ``onnx.ModelProto`` of ``model`` (eval mode) with input ``image`` and a dynamic batch.

    Args:
        model: A torch module returning one tensor (or a tuple: then ``output_name`` names each).
        example: A (N, 3, S, S) input with N >= 2 (torch.export fixes a batch of 1 as a constant).

    Raises:
        ExportError: The exporter fails (one line naming its complaint).
    """
    import torch

    from ..heads import export_form

    # Ops onnxruntime runs well (same function). No width: onnxruntime's flip (a Slice) beat the mirror views'
    # product with the anti-identity (1.73 vs 1.87 ms, lkca_mobilenet classifier, 96 px, 1 thread, AMD EPYC).
    if example.shape[0] < 2:
        example = example.repeat(2, 1, 1, 1)
    model = export_form(model, example=example)
    output_names = [output_name] if isinstance(output_name, str) else list(output_name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # the exporter's deprecation and tracing notes are not the user's business
            program = torch.onnx.export(model.eval(), (example,), None, dynamo=True, optimize=True, verbose=False,
                                        input_names=['image'], output_names=output_names,
                                        dynamic_shapes=({0: torch.export.Dim('batch')},))
    except Exception as e:  # the exporter raises many types; one line names its complaint
        raise ExportError(f'ONNX export failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}') from e
    return program.model_proto


def check_onnx(proto, what: str = 'the exported ONNX model') -> None:
    """``onnx.checker`` with the full check (shape inference included), as an `ExportError`."""
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f'{what} fails onnx.checker: {str(e).splitlines()[0]}') from None


def save_onnx(proto, path: str | os.PathLike) -> None:
    """Write ``proto`` (weights inside the file) atomically: a failure leaves ``path`` as it was."""
    import onnx

    atomic_write(Path(path), lambda tmp: onnx.save_model(proto, str(tmp)))


def set_metadata(proto, props: dict[str, str]) -> None:
    """Replace the model's ``metadata_props`` with ``props``."""
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def opset(proto) -> int:
    return max(o.version for o in proto.opset_import if o.domain in ('', 'ai.onnx'))


def parity(reference: np.ndarray, other: np.ndarray) -> dict:
    """How far ``other``'s outputs are from ``reference``'s: max abs difference, the scale, top-1 agreement."""
    ref, out = reference.reshape(len(reference), -1), other.reshape(len(other), -1)
    return dict(images=len(ref), max_abs_diff=float(np.abs(ref - out).max()), max_abs_logit=float(np.abs(ref).max()),
                top1_agreement=float((ref.argmax(1) == out.argmax(1)).mean()))


def file_bytes(path: Path) -> int:
    """Bytes of an ONNX file plus its external-data files."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    total = path.stat().st_size
    locations = set()
    for tensor in onnx.load(str(path), load_external_data=False).graph.initializer:
        if uses_external_data(tensor):
            locations.add(ExternalDataInfo(tensor).location)
    return total + sum((path.parent / loc).stat().st_size for loc in locations if (path.parent / loc).is_file())


def strip_unused_domains(path: Path) -> None:
    """Drop opset imports no node uses (onnxruntime's optimizer declares its internal domains): other tools
    reject unknown domains."""
    import onnx

    model = onnx.load(str(path))
    used = {n.domain for n in model.graph.node} | {''}
    kept = [o for o in model.opset_import if o.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    onnx.save(model, str(path))
