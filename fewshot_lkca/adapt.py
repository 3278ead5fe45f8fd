"""Teach an exported model new classes on the device: ``python -m fewshot_lkca.adapt MODEL SUPPORT --out NEW``.

Runs on onnxruntime, numpy and Pillow alone (no torch). SUPPORT_DIR holds one folder of images per class. The
model's own feature part (its second output, fp32 or int8) turns each image into a feature vector; a cosine head
starts at the class prototypes and trains with numpy gradients (`fewshot_lkca.numpy_head`, the host's linear probe
with the settings chosen for it on val tasks); leave-one-out on the support set keeps the trained head only when it
does not do worse than the prototypes, as on the host (`fewshot_lkca.probe.guard_head`). The new head replaces the
old one inside the file (`fewshot_lkca.onnx_file`): the feature graph is copied byte for byte, the class names and
the "unknown" threshold go into its metadata, and ``predict`` runs it unchanged.

* ``--add``: the model keeps the classes it has (their head rows stay as they are) and learns SUPPORT_DIR's as
  more; ``--remove NAME``: drops a class (no images needed).
* "unknown": the threshold on the best class's cosine is the 5th percentile of the support images' scores under
  leave-one-out (each scored by a head that never saw it), so about 1 in 20 images of an enrolled class would be
  refused; ``predict`` answers ``unknown`` below it, unless ``--no-reject``. One image per class leaves nothing to
  calibrate on: no threshold, said so.

The input model is never modified: the new one is written to a temporary name and renamed onto ``--out``.

Examples::

    python -m fewshot_lkca.adapt model.int8.onnx my_photos/ --out mine.onnx
    python -m fewshot_lkca.adapt mine.onnx more_photos/ --add --out mine2.onnx
    python -m fewshot_lkca.adapt mine2.onnx --remove old_part --out mine3.onnx
"""
import argparse
import difflib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ConfigError
from .files import atomic_write
from .images import IMAGE_EXTENSIONS
from .metadata import MetadataError, decode_metadata, device_head, encode_metadata
from .numpy_head import fit_directions, loo_scores, unit
from .onnx_file import OnnxFile, OnnxFileError
from .predict import PredictError, load_rgb, preprocess
from .threads import add_threads_argument, check_threads

__all__ = ['AdaptError', 'SupportSet', 'HEAD_STEPS', 'HEAD_LR', 'HEAD_ANCHOR', 'LABEL_SMOOTHING', 'REJECT_QUANTILE',
           'read_support', 'DeviceModel', 'DeviceHead', 'fit_head', 'threshold', 'adapt', 'build_parser',
           'adapt_command', 'main']

# The host's linear probe (recipes/linear_probe.yaml), chosen on 50 val tasks: 100 full-batch steps at 0.003 x 10,
# a pull of 1 back to the prototypes, label smoothing 0.1 (fewshot_lkca.config).
HEAD_STEPS, HEAD_LR, HEAD_ANCHOR, LABEL_SMOOTHING = 100, 0.03, 1.0, 0.1
REJECT_QUANTILE = 0.05  # about 1 in 20 enrolled images below the threshold (measured: benchmarks/device_adapt.py)
MAX_SCORES = 512  # calibration scores kept in the metadata, so that --add can recalibrate over old and new classes
BATCH = 16


class AdaptError(ValueError):
    """The model or the support set cannot be used as asked (one line naming the file, class or option)."""


@dataclass
class SupportSet:
    """The readable images of SUPPORT_DIR, preprocessed: (N, 3, S, S) float32, labels, class names, skipped files."""
    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    skipped: list[str]


def _class_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        raise AdaptError(f'{root}: no such folder' if not root.exists() else f'{root}: not a folder')
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith('.'))
    if not folders:
        loose = [p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]
        hint = f' ({len(loose)} images lie in it directly: put each class in its own folder)' if loose else ''
        raise AdaptError(f'{root}: no class folders (expected {root}/CLASS_NAME/IMAGE){hint}')
    return folders


def read_support(root: str | os.PathLike, meta: dict, log=print) -> SupportSet:
    """Every readable image of each class folder of ``root``, preprocessed as the model's metadata says.

    Unreadable files are skipped and named; a class left without an image is an error.
    """
    root = Path(root)
    images, labels, classes, skipped = [], [], [], []
    for folder in _class_folders(root):
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith('.'))
        count = 0
        for path in files:
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                skipped.append(f'{path}: not an image file (extension {path.suffix or "none"})')
                continue
            try:
                images.append(preprocess(load_rgb(path), meta))
            except PredictError as e:
                skipped.append(str(e))
                continue
            labels.append(len(classes))
            count += 1
        if count == 0:
            raise AdaptError(f"class '{folder.name}' has no readable image in {folder}")
        classes.append(folder.name)
    for line in skipped:
        log(f'skipped {line}')
    return SupportSet(np.stack(images), np.array(labels), classes, skipped)


class DeviceModel:
    """An exported model of this package with a rewritable head: its bytes, metadata, head and an onnxruntime session.

    Raises:
        AdaptError: Missing, not an ONNX model, or one without this package's metadata or head.
    """

    def __init__(self, path: str | os.PathLike, threads: int = 1):
        from .export.session import onnx_session

        self.path = Path(path)
        if not self.path.is_file():
            raise AdaptError(f'{self.path}: no such model file')
        try:
            self.file = OnnxFile.read(self.path)
            self.meta = decode_metadata(self.file.metadata, str(self.path))
            self.head = device_head(self.file.metadata, str(self.path))
            self.matrix = self.file.initializer(self.head['initializer'])  # (D, classes)
        except (OnnxFileError, MetadataError) as e:
            raise AdaptError(str(e)) from None
        if self.matrix.shape != (self.head['dim'], len(self.meta['classes'])):
            raise AdaptError(f'{self.path}: the head is {self.matrix.shape}, the metadata names '
                             f'{len(self.meta["classes"])} classes of {self.head["dim"]} features')
        try:
            self.session = onnx_session(self.file.data, threads)
        except Exception as e:  # onnxruntime raises its own exception types, not importable by name
            raise AdaptError(f'{self.path}: onnxruntime cannot load it ({str(e).splitlines()[0][:160]})') from None
        names = [o.name for o in self.session.get_outputs()]
        if self.head['features'] not in names:
            raise AdaptError(f"{self.path}: no '{self.head['features']}' output (outputs {names}); export it again")
        self.input_name = self.session.get_inputs()[0].name

    @property
    def classes(self) -> list[str]:
        return list(self.meta['classes'])

    def directions(self) -> np.ndarray:
        """(classes, D) unit class directions of the current head."""
        return unit(self.matrix.T.astype(np.float64))

    def features(self, images: np.ndarray) -> np.ndarray:
        """(N, D) features the head reads, ``BATCH`` images at a time."""
        out = [self.session.run([self.head['features']], {self.input_name: images[i:i + BATCH]})[0]
               for i in range(0, len(images), BATCH)]
        return np.concatenate(out).astype(np.float64)

    def stored_scores(self) -> dict[str, list[float]]:
        """The calibration scores an earlier adaptation stored, per class (none: an empty dict)."""
        try:
            scores = json.loads(self.file.metadata.get('reject', '{}')).get('scores', {})
            return {str(c): [float(s) for s in v] for c, v in scores.items()} if isinstance(scores, dict) else {}
        except (ValueError, TypeError, AttributeError):
            return {}


def threshold(scores) -> float | None:
    """The "unknown" threshold: the `REJECT_QUANTILE` quantile of the leave-one-out scores (a list, or lists per
    class); None with fewer than two."""
    pooled = [s for v in scores.values() for s in v] if isinstance(scores, dict) else list(scores)
    return float(np.quantile(pooled, REJECT_QUANTILE)) if len(pooled) >= 2 else None


def _check_names(model: DeviceModel, new: list[str], add: bool, remove: list[str]) -> list[str]:
    """The classes the model keeps, after ``remove``; refuses a name that is not there or that --add would repeat."""
    for name in remove:
        if name not in model.classes:
            close = difflib.get_close_matches(name, model.classes, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f' (it has {", ".join(model.classes[:10])})'
            raise AdaptError(f"--remove {name}: {model.path} has no class '{name}'{hint}")
    kept = [c for c in model.classes if c not in remove] if (add or remove) else []
    clash = sorted(set(kept) & set(new))
    if clash:
        raise AdaptError(f"class '{clash[0]}' is already in {model.path}: rename its folder, or --remove it first "
                         f'(--add keeps the classes the model has)')
    if not kept and not new:
        raise AdaptError(f'nothing would be left: {model.path} has only {", ".join(model.classes)}')
    return kept


@dataclass
class DeviceHead:
    """A head fitted on the device: unit class directions, what the guard decided, and the leave-one-out scores
    (each support image's best cosine under a head that never saw it, with its label) the threshold is taken from."""
    directions: np.ndarray
    decision: dict
    loo_best: np.ndarray
    loo_labels: np.ndarray


def fit_head(features: np.ndarray, labels: np.ndarray, n_way: int, scale: float, known: np.ndarray | None = None,
             steps: int = HEAD_STEPS) -> DeviceHead:
    """The host's linear probe and its guard, in numpy: train from the prototypes (classes 0..K-1 ``known``, kept),
    and keep the trained head only when leave-one-out on the support set is not worse than the prototypes'."""
    fit = dict(scale=scale, label_smoothing=LABEL_SMOOTHING, anchor=HEAD_ANCHOR, known=known)
    left, cos_trained, pred_trained = loo_scores(features, labels, n_way, steps, HEAD_LR, **fit)
    _, cos_protos, pred_protos = loo_scores(features, labels, n_way, 0, HEAD_LR, **fit)
    if len(left):
        acc_trained = float((pred_trained == labels[left]).mean())
        acc_protos = float((pred_protos == labels[left]).mean())
        trained = acc_trained >= acc_protos
        decision = dict(loo_trained=acc_trained, loo_prototypes=acc_protos)
        why = (f'leave-one-out on the support set: trained head {100 * acc_trained:.0f} % '
               f'{">=" if trained else "<"} prototypes {100 * acc_protos:.0f} %')
    else:
        trained, decision = False, {}
        why = 'one image per class: leave-one-out cannot tell, so the prototypes stay'
    decision.update(kept='trained' if trained else 'prototypes', reason=why)
    directions = fit_directions(features, labels, n_way, steps if trained else 0, HEAD_LR, **fit)
    cos = cos_trained if trained else cos_protos
    return DeviceHead(directions, decision, cos.max(1) if len(left) else np.zeros(0), labels[left])


def adapt(model: DeviceModel, support: SupportSet | None, out: Path, *, add: bool = False, remove=(),
          reject: bool = True, steps: int = HEAD_STEPS, log=print) -> dict:
    """Fit the head to ``support`` (or only drop ``remove``) and write the adapted model to ``out``.

    Returns:
        What was done: classes, images, the guard's decision, leave-one-out accuracy, threshold, seconds.
    """
    start = time.perf_counter()
    new = support.classes if support is not None else []
    kept = _check_names(model, new, add, list(remove))
    known = model.directions()[[model.classes.index(c) for c in kept]] if kept else np.zeros((0, model.head['dim']))
    classes, report = kept + new, dict(classes=kept + new, kept_classes=kept, new_classes=new)
    scores = {c: v for c, v in model.stored_scores().items() if c in kept}
    if support is None:
        directions = known
    else:
        feats = model.features(support.images)
        labels = support.labels + len(kept)
        head = fit_head(feats, labels, len(classes), model.head['scale'], known, steps)
        directions = head.directions
        report.update(head.decision, images=len(labels), skipped=len(support.skipped))
        per_class = MAX_SCORES // len(classes)  # what the metadata keeps: an even share per class
        for c, name in enumerate(classes[len(kept):], start=len(kept)):
            scores[name] = [round(float(s), 4) for s in head.loo_best[head.loo_labels == c]][:per_class]
        log(f'head: kept the {report["kept"]} ({report["reason"]})')
    limit = threshold(scores) if reject else None
    report.update(threshold=limit, calibration_scores=sum(len(v) for v in scores.values()))
    matrix = (model.head['scale'] * directions.T).astype(np.float32)  # (D, classes)
    props = dict(model.file.metadata)
    props.update(encode_metadata(dict(
        classes=classes, reject=dict(threshold=limit, quantile=REJECT_QUANTILE, scores=scores),
        adapted=dict(by='fewshot_lkca.adapt', kept=kept, added=new, removed=list(remove),
                     images=report.get('images', 0)))))
    data = model.file.rewrite({model.head['initializer']: matrix}, props)
    if support is not None:
        report['check_max_abs_diff'] = _check(data, model, support.images[:4], unit(feats[:4]) @ matrix)
    try:
        atomic_write(out, lambda tmp: tmp.write_bytes(data))
    except OSError as e:
        raise AdaptError(f'cannot write {out}: {e.strerror or e}') from None
    report['seconds'] = round(time.perf_counter() - start, 3)
    return report


def _check(data: bytes, model: DeviceModel, images: np.ndarray, expected: np.ndarray) -> float:
    """Run the rewritten model: its logits must be the numpy head's on the same images (else nothing is written)."""
    from .export.session import onnx_session

    try:
        session = onnx_session(data, 1)
        logits = session.run([session.get_outputs()[0].name], {model.input_name: images})[0]
    except Exception as e:  # onnxruntime's own exception types
        first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise AdaptError(f'the adapted model does not run ({first}); nothing was written') from None
    diff = float(np.abs(logits - expected).max())
    if not diff <= 1e-3 * max(1.0, model.head['scale']):
        raise AdaptError(f'the adapted model disagrees with its head by {diff:.2e}; nothing was written')
    return diff


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog='fewshot-lkca adapt', description=__doc__.splitlines()[0])
    parser.add_argument('model', type=Path, help='an ONNX model exported by fewshot_lkca (fp32 or int8)')
    parser.add_argument('support', type=Path, nargs='?', help='a folder of class folders of images')
    parser.add_argument('--out', type=Path, required=True, help='where the adapted model goes')
    parser.add_argument('--add', action='store_true', help="keep the model's classes and learn SUPPORT's as more")
    parser.add_argument('--remove', action='append', default=[], metavar='NAME', help='drop a class (repeatable)')
    parser.add_argument('--no-reject', action='store_true', help='store no "unknown" threshold')
    parser.add_argument('--steps', type=int, default=HEAD_STEPS, help=f'head training steps (default {HEAD_STEPS})')
    add_threads_argument(parser)
    return parser


def adapt_command(args: argparse.Namespace, log=print) -> dict:
    """Check the options, read the model and the support set, adapt, and print what was done."""
    if args.support is None and not args.remove:
        raise AdaptError('give a SUPPORT folder of class folders, or --remove NAME')
    if args.support is not None and args.remove and not args.add:
        raise AdaptError('--remove with a SUPPORT folder replaces every class anyway: add --add to keep the others')
    if args.steps < 0:
        raise AdaptError(f'--steps must be >= 0, got {args.steps}')
    try:
        check_threads(args.threads)
    except ConfigError as e:
        raise AdaptError(str(e)) from None
    if args.out.exists() and args.out.is_dir():
        raise AdaptError(f'--out {args.out} is a folder; give a file name such as {args.out / "adapted.onnx"}')
    if not args.out.parent.is_dir():
        raise AdaptError(f'--out {args.out}: the folder {args.out.parent} does not exist')
    if args.out.exists() and args.model.exists() and args.out.resolve() == args.model.resolve():
        raise AdaptError(f'--out {args.out} is the input model: choose another name (the input is kept as it is)')
    model = DeviceModel(args.model, threads=args.threads)
    if args.support is not None:  # a name clash or a bad --remove is refused before any image is read
        _check_names(model, [f.name for f in _class_folders(args.support)], args.add, args.remove)
    support = read_support(args.support, model.meta, log) if args.support is not None else None
    report = adapt(model, support, args.out, add=args.add, remove=args.remove, reject=not args.no_reject,
                   steps=args.steps, log=log)
    counts = np.bincount(support.labels).tolist() if support is not None else []
    if support is not None:
        plural = 'es' if len(support.classes) > 1 else ''
        log(f'learned {len(support.classes)} class{plural} from {report["images"]} images '
            f'({", ".join(f"{c} {n}" for c, n in zip(support.classes, counts, strict=True))})'
            + (f', kept {len(report["kept_classes"])} it had' if report['kept_classes'] else ''))
    if args.remove:
        log(f'removed {", ".join(args.remove)}')
    if report['threshold'] is not None:
        log(f'unknown: below cosine {report["threshold"]:.3f} (5th percentile of {report["calibration_scores"]} '
            'leave-one-out scores)')
    elif not args.no_reject:
        log('unknown: no threshold (each class has one image; leave-one-out needs two): predict never answers unknown')
    log(f'wrote {args.out} ({len(report["classes"])} classes: {", ".join(report["classes"][:10])}'
        f'{" ..." if len(report["classes"]) > 10 else ""}) in {report["seconds"]:.2f} s')
    return report


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        adapt_command(args)
    except AdaptError as e:
        raise SystemExit(f'error: {e}') from None
    except KeyboardInterrupt:
        raise SystemExit(f'interrupted: {args.out} was not written (or is as it was)') from None


if __name__ == '__main__':
    main()
