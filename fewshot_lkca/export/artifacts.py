"""One writer per format: it makes the artifact, writes it atomically, and checks it against PyTorch (or fp32).

* ``onnx``: fp32 (`fewshot_lkca.export.onnx.export_onnx`), ``onnx.checker`` clean, class names and preprocessing in
  ``metadata_props`` (`fewshot_lkca.metadata`); logits max abs difference to PyTorch on the run's images.
* ``onnx-int8``: the fp32 model quantized by `fewshot_lkca.export.int8.quantize_onnx`, calibrated on the support
  set; top-1 agreement with fp32 and the accuracy of both on held-out images never used for calibration.
* ``executorch``, ``executorch-int8``, ``ncnn``: device formats (batch 1), run back with their own runtimes.
"""
import os
import time
from pathlib import Path

import numpy as np

from .formats import ExportError
from .inputs import Inputs, Reference
from .onnx import check_onnx, export_onnx, opset, parity, save_onnx, set_metadata
from .session import onnx_session, run_onnx

__all__ = ['write_onnx', 'write_onnx_int8', 'write_device']

DEVICE_CHECK_IMAGES = 100  # batch-1 runtimes run one image at a time


def _onnx_metadata(inputs: Inputs, precision: str) -> dict[str, str]:
    from .. import __version__
    from ..metadata import CLASSIFIER_KEYS, FEATURES_OUTPUT, HEAD_INITIALIZER, MARKER, encode_metadata

    meta, head = inputs.meta, inputs.model.head
    fields = {k: meta[k] for k in (*CLASSIFIER_KEYS, 'step') if k in meta}
    if meta.get('data'):  # the data set's name, not a path on the training machine
        fields['data'] = Path(str(meta['data'])).name
    fields['head'] = dict(initializer=HEAD_INITIALIZER, features=FEATURES_OUTPUT, scale=float(head.scale.detach()),
                          dim=int(head.weight.shape[1]))
    return encode_metadata(dict(fields, precision=precision, **{MARKER: __version__}))


def _classes_dynamic(proto) -> None:
    """Name the logits' class dimension rather than fix it: a device that rewrites the head changes it."""
    logits = next((o for o in proto.graph.output if o.name == 'logits'), None)
    if logits is None or len(logits.type.tensor_type.shape.dim) != 2:
        return  # not the export form's graph: the checks that follow say what is wrong with it
    dim = logits.type.tensor_type.shape.dim[1]
    dim.Clear()
    dim.dim_param = 'classes'
    from ..metadata import HEAD_INITIALIZER

    # no inferred copy of a shape the class count fixes (the logits', the head matrix's)
    kept = [v for v in proto.graph.value_info if v.name not in (logits.name, HEAD_INITIALIZER)]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(kept)


def write_onnx(inputs: Inputs, ref: Reference, path: Path, staging: Path) -> dict:
    """fp32 ONNX with dynamic batch and our metadata, checked, run on the reference images (batch 1 and more) in
    ``staging``, and only then renamed onto ``path``: a model that fails a check never lands in the run directory."""
    import torch

    start = time.perf_counter()
    from ..heads import ExportForm
    from ..metadata import FEATURES_OUTPUT

    proto = export_onnx(ExportForm(inputs.model), ref.images[:2], output_name=('logits', FEATURES_OUTPUT))
    _classes_dynamic(proto)
    set_metadata(proto, _onnx_metadata(inputs, 'fp32'))
    check_onnx(proto)
    staged = staging / f'checked.{path.name}'
    save_onnx(proto, staged)
    seconds = time.perf_counter() - start
    try:
        session = onnx_session(staged)
        logits = run_onnx(session, ref.images.numpy())
        run_onnx(session, ref.images[:1].numpy())  # batch 1, as a device runs it
    except Exception as e:  # onnxruntime's own exception types are not importable by name
        raise ExportError(f'the exported ONNX model does not run in onnxruntime: {str(e).splitlines()[0]}') from e
    os.replace(staged, path)
    size = inputs.meta['image_size']
    return dict(format='onnx', path=str(path), precision='fp32', size_bytes=path.stat().st_size, opset=opset(proto),
                nodes=len(proto.graph.node), input=dict(name='image', shape=['batch', 3, size, size]),
                exporter=dict(dynamo=True, optimize=True, torch=torch.__version__), checker='ok',
                parity=dict(parity(ref.logits, logits), inputs=ref.source), seconds=round(seconds, 1))


def write_onnx_int8(inputs: Inputs, path: Path, fp32_path: Path, staging: Path) -> dict:
    """int8 ONNX from the fp32 one, calibrated on the support set, checked against fp32 on the held-out images."""
    import onnx

    from .int8 import depthwise_plan, quantize_onnx

    start = time.perf_counter()
    quantized = staging / f'quantized.{path.name}'
    report = quantize_onnx(fp32_path, quantized, inputs.calibration, depthwise=depthwise_plan(inputs.meta['model']))
    proto = onnx.load(str(quantized))
    _classes_dynamic(proto)  # the quantizer's shape inference fixed it again
    set_metadata(proto, _onnx_metadata(inputs, 'int8'))  # whatever the quantizer kept, ours is complete
    check_onnx(proto, 'the int8 ONNX model')
    save_onnx(proto, path)
    seconds = time.perf_counter() - start
    out = dict(format='onnx-int8', path=str(path), precision='int8', size_bytes=path.stat().st_size,
               nodes=len(proto.graph.node), calibration_images=len(inputs.calibration), quantization=report,
               seconds=round(seconds, 1))
    if inputs.held_out is not None:
        images = inputs.held_out.numpy()
        fp32, int8 = run_onnx(onnx_session(fp32_path), images), run_onnx(onnx_session(path), images)
        labels = inputs.held_out_y
        out['check'] = dict(images=len(images), inputs='held-out images of the run (not used for calibration)',
                            top1_agreement=float((fp32.argmax(1) == int8.argmax(1)).mean()),
                            accuracy_fp32=float((fp32.argmax(1) == labels).mean()),
                            accuracy_int8=float((int8.argmax(1) == labels).mean()),
                            max_abs_diff=float(np.abs(fp32 - int8).max()))
    elif inputs.support is not None:  # every image trained (a whole folder): agreement on them, no accuracy
        images = inputs.support.numpy()
        fp32, int8 = run_onnx(onnx_session(fp32_path), images), run_onnx(onnx_session(path), images)
        out['check'] = dict(images=len(images), inputs='training images of the run (its calibration set too: the run '
                                                       'held no images out)',
                            top1_agreement=float((fp32.argmax(1) == int8.argmax(1)).mean()),
                            max_abs_diff=float(np.abs(fp32 - int8).max()))
    return out


def write_device(fmt: str, inputs: Inputs, ref: Reference, path: Path) -> dict:
    """ExecuTorch (fp32 or int8) or NCNN, batch 1, run back and compared with PyTorch."""
    import torch

    example = ref.images[:1]
    if fmt == 'ncnn':
        from .ncnn import export_ncnn

        return export_ncnn(inputs.model, path, example)
    from .executorch import export_executorch

    calibration = torch.from_numpy(inputs.calibration) if fmt == 'executorch-int8' else None
    check = inputs.held_out[:DEVICE_CHECK_IMAGES] if inputs.held_out is not None else ref.images
    return export_executorch(inputs.model, path, example, calibration, check=check)
