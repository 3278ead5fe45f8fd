"""int8 post-training static quantization of an exported ONNX model with onnxruntime.

`quantize_onnx` turns an fp32 ONNX classifier or feature extractor into a QDQ int8 model for onnxruntime's CPU
provider, calibrated on the caller's own (preprocessed) images. Every setting below was chosen by measurement on
`lkca_mobilenet` and `tf_mobilenetv3_small_100` (ImageNet weights at 224 px, and the look-alike base-pretrained
`lkca_mobilenet` at 96 px; batch 1, 1 thread, onnxruntime 1.31 on a 2-core AVX-512 VNNI CPU); each comment below
gives the measured reason. Agreement figures are top-1 agreement of a 5-way cosine classifier with its fp32 self
on the task's 275 held-out images.

What is quantized and what stays fp32:

* int8: every Conv except the stem (1x1 expand / project convs, the coordinate-attention and SE convs, the
  ``conv_head``), with ``Relu`` / ``Clip`` folded into their output quantization; the depthwise convs too unless
  `DEPTHWISE_PLANS` records fp32 depthwise as faster for the architecture (see there: measured on two CPUs).
* fp32: the stem conv (the one reading the image) and Gemm/MatMul (the classifier). Everything else (hard-swish,
  pools, GroupNorm, sigmoid gates, concat/split, residual adds) runs in fp32 between dequantize / quantize pairs, or
  fused by onnxruntime (``QLinearAdd``).

Example:
    >>> import numpy as np
    >>> from fewshot_lkca.export.int8 import quantize_onnx
    >>> report = quantize_onnx(Path('model.onnx'), Path('model.int8.onnx'), calibration)  # doctest: +SKIP
    >>> report['quantized_nodes']  # doctest: +SKIP
    {'Conv': 61, 'Relu': 5}
"""
import collections
import contextlib
import io
import logging
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..files import atomic_write
from .onnx import file_bytes, strip_unused_domains
from .session import onnx_session

__all__ = ['QuantizationError', 'QUANTIZED_OP_TYPES', 'DEPTHWISE_CHOICES', 'DEPTHWISE_PLANS', 'depthwise_plan',
           'quantize_onnx', 'plan_quantization']

log = logging.getLogger(__name__)

# Relu and Clip are "removable": quantizing them folds them into the producing conv's output range (lkca_mobilenet at
# 224 px: 1.20x -> 1.25x faster than fp32, 5-way agreement 53% -> 73%, both against leaving them fp32 between a
# dequantize and a quantize). Quantizing Add/Mul/Sigmoid/Concat too was slower (every small op wrapped in Q/DQ:
# lkca_mobilenet 13.3 ms against 8.6 ms profiled) and no more faithful. Gemm/MatMul are left out: here they are the
# classifier, a few thousand MACs, and the cosine head's MatMul alone in int8 cost 3 points of 5-way agreement.
QUANTIZED_OP_TYPES = ('Conv', 'Relu', 'Clip')
# Depthwise convs in int8 are faster or slower depending on the network around them, the same way on both CPUs
# measured, so the plan is recorded per architecture rather than timed on whatever machine exports (the former
# 'auto'). ONNX int8 speed-up over fp32 at batch 1, 1 thread, ImageNet weights, int8 / fp32 depthwise:
#
#   architecture              CPU                          96 px          224 px
#   lkca_mobilenet            AMD EPYC (Zen4, AVX-512 VNNI) 1.17x / 0.99x  1.11x / 1.07x   (2026-12-04, export form)
#   lkca_mobilenet            Intel Xeon (AVX-512 VNNI, AMX) 1.9x / 1.0x   'auto' chose int8 (2026-11, training form)
#   lkca_mobilenet_dw3        AMD EPYC                     0.93x / 1.01x  1.04x / 1.18x
#   tf_mobilenetv3_small_100  AMD EPYC                     0.97x / 1.07x  0.92x / 1.20x
#   tf_mobilenetv3_small_100  Intel Xeon                   0.9x / 1.2x    'auto' chose fp32
#
# (Both plans timed interleaved, 15 rounds; `python -m benchmarks.latency --runtimes onnx,onnx-int8 --depthwise
# int8`, then `--depthwise fp32`, repeats it.) int8 depthwise paid only in the network whose depthwise outputs feed a
# coordinate attention; in the others, fp32 depthwise was as fast or faster.
# Architectures not listed get int8 depthwise; 'auto' (time both here, keep int8 when >= 5% faster) stays available.
DEPTHWISE_PLANS = {'lkca_mobilenet': 'int8', 'lkca_mobilenet_dw3': 'fp32', 'tf_mobilenetv3_small_100': 'fp32'}
DEPTHWISE_CHOICES = ('int8', 'fp32', 'auto')
_CLEARLY_FASTER = 0.95
# Values below -3 all map to 0 through hard-swish, so a conv output read only by hard-swish is quantized over
# [max(min, -3), max]: lossless, and it gives the useful range twice the resolution or more (pre-activation minima
# reach -100 in lkca_mobilenet). 5-way agreement at 224 px 73% -> 77%.
_HARDSWISH_FLOOR = -3.0
# Percentile calibration (99.99th, asymmetric) rather than min/max: depthwise-conv outputs have a few outliers
# (max 109 where the 99.99th percentile is 34), and one per-tensor scale must serve every channel. 5-way agreement
# at 224 px 77% -> 85%, feature cosine 0.979 -> 0.988. onnxruntime's percentile default is symmetric, which wastes
# half the uint8 codes on a hard-swish output.
_PERCENTILE = 99.99


def depthwise_plan(architecture: str | None) -> str:
    """The recorded depthwise plan ('int8' or 'fp32') for a timm architecture name; 'int8' when not recorded."""
    return DEPTHWISE_PLANS.get(architecture or '', 'int8')


class QuantizationError(ValueError):
    """Bad input to `quantize_onnx` (missing or unreadable model, unusable calibration data, unsafe output path)."""


class _ArrayReader:
    """onnxruntime CalibrationDataReader over the rows of one array, one image at a time (static batch 1 works)."""

    def __init__(self, input_name: str, images: np.ndarray):
        self.input_name = input_name
        self.images = images
        self.index = 0

    def get_next(self) -> dict | None:
        if self.index >= len(self.images):
            return None
        self.index += 1
        return {self.input_name: self.images[self.index - 1:self.index]}

    def rewind(self) -> None:
        self.index = 0


def _load(fp32_path: Path):
    import onnx

    if not fp32_path.is_file():
        raise QuantizationError(f'ONNX model not found: {fp32_path}')
    try:
        return onnx.load(str(fp32_path))  # also reads the weights file the dynamo exporter may write beside it
    except Exception as e:  # protobuf and onnx raise several types for a damaged file
        raise QuantizationError(f'cannot read ONNX model {fp32_path}: {type(e).__name__}: '
                                f'{str(e).strip().splitlines()[0] if str(e).strip() else "unreadable"}') from e


def _image_input(model, fp32_path: Path):
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise QuantizationError(f'expected one image input, {fp32_path} has {len(inputs)}')
    dims = [d.dim_value if d.HasField('dim_value') else None for d in inputs[0].type.tensor_type.shape.dim]
    return inputs[0].name, dims


def _check_calibration(calibration, dims: list) -> np.ndarray:
    if not isinstance(calibration, np.ndarray):
        raise QuantizationError(f'calibration must be a numpy array, got {type(calibration).__name__}')
    if calibration.ndim != 4:
        raise QuantizationError(f'calibration must be N x C x H x W, got shape {calibration.shape}')
    if len(calibration) == 0:
        raise QuantizationError('calibration holds no image')
    if calibration.dtype != np.float32:
        raise QuantizationError(f'calibration must be float32 (preprocessed images), got {calibration.dtype}')
    if len(dims) == 4:
        for axis, name in ((1, 'channels'), (2, 'height'), (3, 'width')):
            if dims[axis] is not None and dims[axis] != calibration.shape[axis]:
                raise QuantizationError(f'calibration {name} is {calibration.shape[axis]}, the model expects '
                                        f'{dims[axis]} (model input shape {dims})')
    if not np.isfinite(calibration).all():
        raise QuantizationError('calibration holds NaN or infinite values')
    return np.ascontiguousarray(calibration)


def _optimize_basic(model, path: Path) -> None:
    """onnxruntime's basic (portable) graph optimizations: constant folding, BatchNorm and other folds into Conv."""
    # From bytes, so that the written copy holds its weights rather than pointing into the exporter's side file.
    onnx_session(model.SerializeToString(), optimization='basic', save_optimized=path)


def _consumers(model) -> dict[str, list]:
    consumers = collections.defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            consumers[name].append(node)
    return consumers


def plan_quantization(model, depthwise: bool = True) -> dict[str, dict[str, str]]:
    """Which Conv nodes of ``model`` stay fp32, and why.

    Args:
        model: An ONNX ModelProto.
        depthwise: Quantize the depthwise convs (``group`` > 1) too.

    Returns:
        ``{node_name: {'op_type': 'Conv', 'reason': 'stem' | 'depthwise'}}``.
    """
    graph_inputs = {i.name for i in model.graph.input}
    keep = {}
    for node in model.graph.node:
        if node.op_type != 'Conv':
            continue
        group = next((a.i for a in node.attribute if a.name == 'group'), 1)
        if node.input[0] in graph_inputs:
            # The stem conv (3 input channels, 224 px) ran 3x slower in int8 (443 vs 154 us): onnxruntime's uint8
            # path has no fast kernel for a 3-channel image, and the image then needs no quantize node.
            keep[node.name] = dict(op_type='Conv', reason='stem')
        elif group > 1 and not depthwise:
            keep[node.name] = dict(op_type='Conv', reason='depthwise')
    return keep


def _hardswish_inputs(model) -> set[str]:
    """Tensors read only by hard-swish: a HardSwish node, or HardSigmoid(x) * x as onnxruntime rewrites it."""
    out = set()
    for name, nodes in _consumers(model).items():
        sigmoids = [n for n in nodes if n.op_type == 'HardSigmoid' and _is_hardswish_gate(n)]
        swish = [n for n in nodes if n.op_type == 'HardSwish']
        gated = {n.output[0] for n in sigmoids}
        muls = [n for n in nodes if n.op_type == 'Mul' and gated & set(n.input)]
        if nodes and len(sigmoids) + len(swish) + len(muls) == len(nodes) and (swish or (sigmoids and muls)):
            out.add(name)
    return out


def _is_hardswish_gate(node) -> bool:
    attrs = {a.name: a.f for a in node.attribute}
    return abs(attrs.get('alpha', 0.2) - 1 / 6) < 1e-6 and abs(attrs.get('beta', 0.5) - 0.5) < 1e-6


def _clip_ranges(cache: Path, floors: Iterable[str]) -> int:
    """Raise the calibrated minimum of each tensor in ``floors`` to the hard-swish floor; returns how many moved."""
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, load_tensors_data, save_tensors_data

    ranges = load_tensors_data(cache)
    floors = set(floors)
    data, moved = {}, 0
    for name in ranges:
        low, high = (np.asarray(v, dtype=np.float32) for v in ranges.data[name].range_value)
        if name in floors and low < _HARDSWISH_FLOOR:
            low, moved = np.asarray(_HARDSWISH_FLOOR, dtype=np.float32), moved + 1
        data[name] = TensorData(lowest=low, highest=high)
    save_tensors_data(TensorsData(ranges.calibration_method, data), cache)
    return moved


def _runtime_ops(path: Path) -> dict[str, int]:
    """Op types of the graph onnxruntime actually runs (after its fusions) for ``path``."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        onnx_session(path, save_optimized=Path(tmp) / 'runtime.onnx')
        graph = onnx.load(str(Path(tmp) / 'runtime.onnx'), load_external_data=False).graph
    return dict(sorted(collections.Counter(n.op_type for n in graph.node).items()))


def _timings(paths: dict[str, Path], image: np.ndarray, rounds: int = 12, per_round: int = 5) -> dict[str, float]:
    """Batch-1 milliseconds of each model (1 thread) and the median over rounds of their per-round ratio.

    The models take turns every round and the decision reads the ratio of the same round's medians, so that load
    from other processes (which comes and goes) hits both sides of each ratio alike.
    """
    import time

    sessions = {key: onnx_session(path, threads=1) for key, path in paths.items()}
    feeds = {key: {s.get_inputs()[0].name: image} for key, s in sessions.items()}
    for key, session in sessions.items():  # warm-up
        for _ in range(3):
            session.run(None, feeds[key])
    per_key = {key: [] for key in paths}
    for _ in range(rounds):
        for key, session in sessions.items():
            samples = []
            for _ in range(per_round):
                start = time.perf_counter()
                session.run(None, feeds[key])
                samples.append((time.perf_counter() - start) * 1e3)
            per_key[key].append(float(np.median(samples)))
    first, second = paths
    ratios = np.array(per_key[first]) / np.array(per_key[second])
    return {**{key: float(np.median(v)) for key, v in per_key.items()}, 'ratio': float(np.median(ratios))}


class _DropAdvice(logging.Filter):
    """onnxruntime's advice to run its pre-processing, logged on the root logger for every quantize_static call.
    Measured (2026-11): its pre-processing splits Hardswish into HardSigmoid + Mul and doubled the int8 time."""

    def filter(self, record: logging.LogRecord) -> bool:
        return 'pre-processing before quantization' not in str(record.msg)


@contextlib.contextmanager
def _quiet_quantizer():
    """Silence the quantizer's progress prints and its pre-processing advice (neither is news to our user)."""
    root, advice = logging.getLogger(), _DropAdvice()
    root.addFilter(advice)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # onnxruntime prints its percentile progress
            yield
    finally:
        root.removeFilter(advice)


def quantize_onnx(fp32_path: Path, out_path: Path, calibration: np.ndarray, *, depthwise: str = 'int8') -> dict:
    """Quantize ``fp32_path`` to int8 (QDQ, onnxruntime CPU) and write it to ``out_path`` atomically.

    Args:
        fp32_path: An fp32 ONNX model with one image input (N x 3 x H x W).
        out_path: Where the int8 model goes; must differ from ``fp32_path``.
        calibration: float32 N x 3 x H x W images, preprocessed exactly as at inference (e.g. the run's support
            images, augmented to about 64).
        depthwise: 'int8' or 'fp32' for the depthwise convs (`depthwise_plan` gives the recorded one of an
            architecture), or 'auto': build both and keep int8 depthwise only when it runs at least 5% faster on
            this machine (batch 1, 1 thread; a second or two).

    Returns:
        A JSON-able report: the settings, the nodes quantized and kept fp32 by op type, the op types onnxruntime
        runs, both file sizes, and (``'auto'``) the two timings behind the choice.

    Raises:
        QuantizationError: Missing or unreadable model, calibration of the wrong type, shape or values, an unknown
            ``depthwise``, or an output path equal to the input or in a missing folder.
    """
    import onnx

    if depthwise not in DEPTHWISE_CHOICES:
        raise QuantizationError(f"depthwise must be one of {list(DEPTHWISE_CHOICES)}, got '{depthwise}'")
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    model = _load(fp32_path)
    input_name, dims = _image_input(model, fp32_path)
    calibration = _check_calibration(calibration, dims)
    if out_path.resolve() == fp32_path.resolve():
        raise QuantizationError(f'out_path is the fp32 model itself ({fp32_path}); choose another file')
    if not out_path.parent.is_dir():
        raise QuantizationError(f'output folder does not exist: {out_path.parent}')

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fused = tmp / 'fp32_basic.onnx'
        _optimize_basic(model, fused)
        prepared = onnx.load(str(fused))
        plans = {'int8': plan_quantization(prepared, depthwise=True), 'fp32': plan_quantization(prepared, False)}
        if plans['int8'] == plans['fp32']:  # no depthwise conv: one plan
            wanted = ['int8']
        else:
            wanted = ['int8', 'fp32'] if depthwise == 'auto' else [depthwise]
        built, moved = _build_plans(fused, prepared, plans, dict.fromkeys(wanted), input_name, calibration, tmp)
        timings = None
        if len(built) == 2:
            timings = _timings(built, calibration[:1])  # ratio: int8-depthwise time / fp32-depthwise time
            choice = 'int8' if timings['ratio'] < _CLEARLY_FASTER else 'fp32'
        else:
            choice = wanted[0]
        # Built in the scratch folder and copied into place: a failure above never touches out_path's folder.
        atomic_write(out_path, lambda t: shutil.copyfile(built[choice], t))
    report = _report(prepared, plans[choice], fp32_path, out_path, calibration, moved, choice, depthwise)
    if timings is not None:
        report['depthwise_timing_ms'] = {k: round(v, 4) for k, v in timings.items()}
    return report


def _options() -> dict:
    """quantize_static's settings, each with its measured reason."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

    return dict(
        quant_format=QuantFormat.QDQ,  # QOperator measured the same speed (2.19 vs 2.22 ms); QDQ is the standard
        op_types_to_quantize=list(QUANTIZED_OP_TYPES),
        per_channel=True,  # one scale per output channel: depthwise kernels differ by orders of magnitude
        # uint8 activations with int8 weights: onnxruntime's fast x86 path (u8s8). int8 activations left 24 of 53
        # convs of tf_mobilenetv3_small_100 unfused (5.4 ms vs 2.2 ms).
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        # reduce_range (7-bit weights) is onnxruntime's advice for CPUs without VNNI, where u8s8 products can
        # saturate; this CPU has VNNI, so it could not be measured here, and it halves the weights' resolution.
        reduce_range=False,
        calibrate_method=CalibrationMethod.Percentile,
        extra_options=dict(CalibPercentile=_PERCENTILE, CalibTensorRangeSymmetric=False),
    )


def _build_plans(fused: Path, prepared, plans: dict, choices, input_name: str, calibration: np.ndarray,
                 tmp: Path) -> tuple[dict[str, Path], int]:
    """Calibrate once (every tensor's range is kept), apply the hard-swish floors, then quantize each plan."""
    from onnxruntime.quantization import quantize_static

    options, cache = _options(), tmp / 'ranges.json'
    with _quiet_quantizer():
        quantize_static(str(fused), str(tmp / 'first.onnx'), _ArrayReader(input_name, calibration),
                        calibration_cache_path=str(cache), nodes_to_exclude=sorted(plans['int8']), **options)
        moved = _clip_ranges(cache, _hardswish_inputs(prepared))
        built = {}
        for choice in choices:
            built[choice] = tmp / f'int8_dw_{choice}.onnx'
            quantize_static(str(fused), str(built[choice]), None, calibration_cache_path=str(cache),
                            nodes_to_exclude=sorted(plans[choice]), **options)
            strip_unused_domains(built[choice])
    return built, moved


def _report(prepared, keep: dict, fp32_path: Path, out_path: Path, calibration: np.ndarray, moved: int, choice: str,
            depthwise: str) -> dict:
    import onnxruntime as ort

    quantized = collections.Counter(n.op_type for n in prepared.graph.node
                                    if n.op_type in QUANTIZED_OP_TYPES and n.name not in keep)
    kept = collections.Counter(f"{v['op_type']} ({v['reason']})" for v in keep.values())
    fp32_ops = collections.Counter(n.op_type for n in prepared.graph.node if n.op_type not in QUANTIZED_OP_TYPES)
    return dict(
        fp32_model=str(fp32_path), int8_model=str(out_path),
        settings=dict(format='QDQ', activations='uint8 per-tensor', weights='int8 symmetric per-channel',
                      calibration=f'percentile {_PERCENTILE} asymmetric', calibration_images=len(calibration),
                      calibration_shape=list(calibration.shape), hardswish_floor=_HARDSWISH_FLOOR,
                      hardswish_inputs_clipped=moved, depthwise=choice, depthwise_requested=depthwise,
                      preprocessing='onnxruntime basic graph optimizations', onnxruntime=ort.__version__),
        quantized_nodes=dict(sorted(quantized.items())),
        kept_fp32_nodes=dict(sorted(kept.items())),
        fp32_op_types=dict(sorted(fp32_ops.items())),
        runtime_ops=_runtime_ops(out_path),
        fp32_bytes=file_bytes(fp32_path), int8_bytes=out_path.stat().st_size,
    )
