"""Classify images with an exported model: ``python -m fewshot_lkca.predict MODEL.onnx IMAGE...``.

Runs on onnxruntime, numpy and Pillow alone (no torch, no timm, no OpenCV), so it runs on a device that holds only
the exported file. Everything it needs travels inside the ONNX model's metadata (written by `fewshot_lkca.export`):
class names and the evaluation preprocessing of the run. That preprocessing is reproduced here to match
`fewshot_lkca.data.eval_transform`: resize the shorter side to ``image_size / crop_pct`` with OpenCV's
interpolation rules (reimplemented in numpy), centre crop ``image_size``, ``(x / 255 - mean) / std``.

Examples::

    python -m fewshot_lkca.predict runs/my-run/model.onnx photo1.jpg photo2.png
    python -m fewshot_lkca.predict runs/my-run/model.int8.onnx photos/*.jpg --top-k 3 --json

A model adapted on the device (`fewshot_lkca.adapt`) carries an "unknown" threshold on the best class's cosine: an
image scoring below it is answered ``unknown`` (its classes are still listed); ``--no-reject`` ignores the threshold.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from .config import ConfigError
from .errors import DataError
from .images import MAX_PIXELS, load_image
from .metadata import MetadataError, decode_metadata, device_head, rejection
from .threads import add_threads_argument, check_threads

__all__ = ['PredictError', 'OnnxClassifier', 'load_rgb', 'resize', 'preprocess', 'build_parser', 'predict_command',
           'main']


class PredictError(ValueError):
    """A model or an image cannot be used (missing, unreadable, not exported by this package)."""


def load_rgb(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An upright HxWx3 uint8 RGB array, loaded by the data layer's own loader (`fewshot_lkca.images.load_image`).

    Raises:
        PredictError: The file is missing, not an image, corrupt or too large.
    """
    path = Path(path)
    if not path.is_file():
        raise PredictError(f'{path}: no such file' if not path.exists() else f'{path}: not a file')
    try:
        return load_image(path, max_pixels=max_pixels)
    except DataError as e:
        raise PredictError(str(e)) from None


# ------------------------------------------------------------------------------------------------- resizing
def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """OpenCV's bicubic kernel (a = -0.75) at the 4 taps around a fractional position ``t`` in [0, 1)."""
    a = -0.75
    w0 = ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a
    w1 = ((a + 2) * t - (a + 3)) * t * t + 1
    w2 = ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1
    return np.stack([w0, w1, w2, 1 - w0 - w1 - w2], axis=1)


def _taps(src: int, dst: int, kind: str, shrink: bool, rows: bool) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights, both (dst, taps), of one axis, following OpenCV's ``cv2.resize`` rules.

    ``rows`` marks the vertical axis: OpenCV clamps a linear tap's position at the image border horizontally but
    only its row index vertically.
    """
    scale = 1.0 / (dst / src)  # as OpenCV computes it: floor() of a product can differ from src / dst's
    d = np.arange(dst, dtype=np.float64)
    if kind == 'nearest':  # OpenCV's nearest has no half-pixel offset
        idx = np.minimum(np.floor(d * scale), src - 1).astype(np.int64)[:, None]
        return idx, np.ones(idx.shape)
    if kind == 'area' and shrink:  # each output pixel averages the input area it covers
        lo = d * scale
        hi = np.minimum(lo + scale, src)
        idx = np.floor(lo).astype(np.int64)[:, None] + np.arange(int(np.ceil(scale)) + 1)
        w = np.clip(np.minimum(hi[:, None], idx + 1) - np.maximum(lo[:, None], idx), 0, None)
        return np.minimum(idx, src - 1), w / w.sum(axis=1, keepdims=True)
    if kind == 'area':  # OpenCV enlarges with 'area' as a linear filter with sharper weights
        base = np.floor(d * scale)
        frac = (d + 1) - (base + 1) / scale
        frac = np.where(frac <= 0, 0.0, frac - np.floor(frac)).astype(np.float32).astype(np.float64)
    else:
        centre = ((d + 0.5) * scale - 0.5).astype(np.float32).astype(np.float64)  # OpenCV computes it in float32
        base = np.floor(centre)
        frac = centre - base
    base = base.astype(np.int64)
    if kind == 'cubic':  # taps outside the image repeat the border pixel
        return np.clip(base[:, None] + np.arange(-1, 3), 0, src - 1), _cubic_weights(frac)
    if not rows:
        frac = np.where((base < 0) | (base >= src - 1), 0.0, frac)  # outside: the border pixel, unblended
    idx = np.clip(np.stack([base, base + 1], axis=1), 0, src - 1)
    return idx, np.stack([1 - frac, frac], axis=1)


def _linear_fixed_point(image: np.ndarray, height: int, width: int, kind: str) -> np.ndarray:
    """OpenCV's two-tap uint8 resize, bit for bit: 11-bit weights, then its rounding of the vertical pass."""
    ix, wx = _taps(image.shape[1], width, kind, False, rows=False)
    iy, wy = _taps(image.shape[0], height, kind, False, rows=True)
    cx, cy = np.rint(wx * 2048).astype(np.int32), np.rint(wy * 2048).astype(np.int32)
    pixels = image.astype(np.int32)
    rows = pixels[:, ix[:, 0]] * cx[None, :, 0, None] + pixels[:, ix[:, 1]] * cx[None, :, 1, None]  # x 2048
    top, bottom = rows[iy[:, 0]] >> 4, rows[iy[:, 1]] >> 4
    out = (((top * cy[:, 0, None, None]) >> 16) + ((bottom * cy[:, 1, None, None]) >> 16) + 2) >> 2
    return np.clip(out, 0, 255).astype(np.uint8)


def resize(image: np.ndarray, height: int, width: int, interpolation: str = 'bilinear') -> np.ndarray:
    """Resize an HxWxC uint8 image as ``cv2.resize`` does (bilinear bit for bit, others within one grey level).

    Args:
        image: HxWxC uint8.
        height: Output height.
        width: Output width.
        interpolation: A timm interpolation name: 'bicubic', 'nearest', 'area'; anything else is bilinear (the
            same mapping as `fewshot_lkca.data.transforms`).

    Example:
        >>> resize(np.zeros((4, 6, 3), np.uint8), 2, 3).shape
        (2, 3, 3)
    """
    kind = {'bicubic': 'cubic', 'nearest': 'nearest', 'area': 'area'}.get(interpolation, 'linear')
    src_h, src_w = image.shape[:2]
    if (src_h, src_w) == (height, width):
        return image
    shrink = src_h >= height and src_w >= width  # OpenCV averages areas only when neither side grows
    if kind == 'linear' or (kind == 'area' and not shrink):
        return _linear_fixed_point(image, height, width, kind)
    out = image
    for axis, (src, dst) in ((1, (src_w, width)), (0, (src_h, height))):  # OpenCV: horizontal pass first
        idx, w = _taps(src, dst, kind, shrink, rows=axis == 0)
        moved = np.moveaxis(out, axis, 0)  # (src, other, C)
        out = np.moveaxis(np.einsum('dk...,dk->d...', moved[idx], w.astype(np.float32)), 0, axis)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def preprocess(image: np.ndarray, meta: dict) -> np.ndarray:
    """HxWx3 uint8 RGB -> 3 x S x S float32, as `fewshot_lkca.data.eval_transform` does for the same settings.

    Args:
        image: The image (e.g. from `load_rgb`).
        meta: ``image_size``, ``crop_pct``, ``interpolation``, ``mean``, ``std`` (see `decode_metadata`).
    """
    side = meta['image_size']
    short = round(side / meta['crop_pct'])
    h, w = image.shape[:2]
    scale = short / min(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    image = resize(image, new_h, new_w, meta['interpolation'])
    top, left = (new_h - side) // 2, (new_w - side) // 2
    crop = image[top:top + side, left:left + side]
    # one lookup table per channel, as albumentations normalises uint8 images
    mean = np.asarray(meta['mean'], np.float32)[:, None] * 255
    std = np.asarray(meta['std'], np.float32)[:, None] * 255
    lut = (np.arange(256, dtype=np.float32) - mean) * (np.float32(1) / std)
    return np.stack([lut[c][crop[:, :, c]] for c in range(3)])


# ------------------------------------------------------------------------------------------------- the model
class OnnxClassifier:
    """An exported fewshot_lkca ONNX model (fp32 or int8) with its class names and preprocessing.

    Args:
        path: The ``.onnx`` file written by ``python -m fewshot_lkca.export``.
        threads: onnxruntime intra-op threads; 0 lets onnxruntime choose.

    Raises:
        PredictError: Missing file, not an ONNX model, or an ONNX model without our metadata.

    Example:
        >>> clf = OnnxClassifier('runs/my-run/model.onnx')  # doctest: +SKIP
        >>> clf.classify(['photo.jpg'], top_k=2)  # doctest: +SKIP
        [{'image': 'photo.jpg', 'top': [{'label': 'knife-011', 'probability': 0.91}, ...]}]
    """

    def __init__(self, path: str | os.PathLike, threads: int = 0, reject: bool = True):
        from .export.session import onnx_session

        self.path = Path(path)
        if not self.path.is_file():
            raise PredictError(f'{self.path}: no such model file')
        try:
            self.session = onnx_session(self.path, threads)
        except Exception as e:  # onnxruntime raises its own exception types, not importable by name
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise PredictError(f'{self.path}: not an ONNX model onnxruntime can load ({first[:160]})') from None
        try:
            self.meta = decode_metadata(self.session.get_modelmeta().custom_metadata_map, str(self.path))
            threshold = rejection(self.meta, str(self.path)) if reject else None
            # the threshold is on the cosine: logits / the head's temperature
            self.scale = device_head(self.meta, str(self.path))['scale'] if threshold is not None else None
        except MetadataError as e:
            raise PredictError(str(e)) from None
        self.threshold = threshold
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise PredictError(f'{self.path}: expected one image input (N, 3, H, W), got '
                               f'{[(i.name, i.shape) for i in inputs]}')
        outputs = self.session.get_outputs()
        width = outputs[0].shape[-1] if outputs and outputs[0].shape else None
        if isinstance(width, int) and width != len(self.meta['classes']):
            raise PredictError(f'{self.path}: the model has {width} outputs, its metadata names '
                               f'{len(self.meta["classes"])} classes')
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        batch = inputs[0].shape[0]
        self.max_batch = batch if isinstance(batch, int) and batch > 0 else 16  # dynamic batch: 16 at a time
        self.classes = list(self.meta['classes'])

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """(N, classes) logits of a preprocessed (N, 3, S, S) float32 batch."""
        rows = []
        for i in range(0, len(batch), self.max_batch):
            try:
                (logits,) = self.session.run([self.output_name], {self.input_name: batch[i:i + self.max_batch]})
            except Exception as e:  # onnxruntime's own exception types are not importable by name
                raise PredictError(f'{self.path}: onnxruntime cannot run it on these images '
                                   f'({str(e).splitlines()[0][:160]})') from None
            rows.append(logits)
        return np.concatenate(rows).astype(np.float64)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """(N, classes) softmax probabilities of a preprocessed (N, 3, S, S) float32 batch."""
        logits = self.logits(batch)
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        return exp / exp.sum(axis=1, keepdims=True)

    def classify(self, images: list[str | os.PathLike], top_k: int = 5) -> list[dict]:
        """Top-``top_k`` classes of each image file, most probable first (`iter_classify`, collected)."""
        return list(self.iter_classify(images, top_k))

    def iter_classify(self, images, top_k: int = 5):
        """One result per image file, in order, ``max_batch`` images in memory at a time whatever their number: the
        top classes (``top``), or ``error`` for a file that is missing or not a readable image (the others go on).
        With a threshold, ``unknown`` says whether the best class's cosine (``score``) fell below it."""
        k = min(top_k, len(self.classes))
        images = list(images)
        for start in range(0, len(images), self.max_batch):
            chunk, errors, arrays = images[start:start + self.max_batch], {}, []
            for i, path in enumerate(chunk):
                try:
                    arrays.append(preprocess(load_rgb(path), self.meta))
                except PredictError as e:
                    errors[i] = str(e)
            logits = self.logits(np.stack(arrays)) if arrays else np.zeros((0, len(self.classes)))
            exp = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs, rows = iter(exp / exp.sum(axis=1, keepdims=True)), iter(logits)
            for i, path in enumerate(chunk):
                if i in errors:
                    yield dict(image=str(path), error=errors[i])
                    continue
                row, logit = next(probs), next(rows)
                order = np.argsort(-row, kind='stable')[:k]
                result = dict(image=str(path), top=[dict(label=self.classes[c], probability=float(row[c]))
                                                    for c in order])
                if self.threshold is not None:
                    score = float(logit.max() / self.scale)
                    result.update(unknown=score < self.threshold, score=score)
                yield result


# ------------------------------------------------------------------------------------------------- the CLI
def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog='fewshot-lkca predict', description=__doc__.splitlines()[0])
    parser.add_argument('model', type=Path, help='an ONNX model written by fewshot_lkca.export (fp32 or int8)')
    parser.add_argument('images', type=Path, nargs='+', metavar='IMAGE', help='image files to classify')
    parser.add_argument('--top-k', type=int, default=5, help='classes to show per image (default 5)')
    parser.add_argument('--json', action='store_true', help='print one JSON document instead of text')
    parser.add_argument('--no-reject', action='store_true',
                        help='never answer "unknown" (ignore the threshold an adapted model carries)')
    add_threads_argument(parser)
    return parser


def predict_command(model: Path, images: list[Path], top_k: int = 5, as_json: bool = False, threads: int = 0,
                    out=print, reject: bool = True) -> list[dict]:
    """Classify ``images`` with ``model`` and print the result; returns it too."""
    if top_k < 1:
        raise PredictError(f'--top-k must be >= 1, got {top_k}')
    try:
        check_threads(threads)
    except ConfigError as e:
        raise PredictError(str(e)) from None
    clf = OnnxClassifier(model, threads=threads, reject=reject)
    results = []
    width = max(len(c) for c in clf.classes)
    for result in clf.iter_classify(images, top_k=top_k):  # printed as they come: a long list shows progress
        results.append(result)
        if as_json:
            continue
        out(result['image'])
        if 'error' in result:
            out(f'  error: {result["error"]}')
        elif result.get('unknown'):
            out(f'  unknown (best cosine {result["score"]:.3f} < threshold {clf.threshold:.3f}; nearest classes below)')
        for item in result.get('top', []):
            out(f'  {item["label"]:<{width}}  {100 * item["probability"]:5.1f} %')
    if as_json:
        out(json.dumps(dict(model=str(model), classes=clf.classes, threshold=clf.threshold, results=results), indent=2))
    return results


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        results = predict_command(args.model, args.images, top_k=args.top_k, as_json=args.json, threads=args.threads,
                                  reject=not args.no_reject)
    except PredictError as e:
        raise SystemExit(f'error: {e}') from None
    failed = sum('error' in r for r in results)
    if failed:  # the others were classified; the exit status says not all were
        raise SystemExit(f'error: {failed} of {len(results)} images could not be classified (named above)')


if __name__ == '__main__':
    main()
