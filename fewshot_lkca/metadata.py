"""What a trained model carries about itself, torch-free: class names, preprocessing, origin.

One schema for every place that writes or reads it: the checkpoint's safetensors metadata (`fewshot_lkca.checkpoint`),
the ONNX model's ``metadata_props`` (`fewshot_lkca.export`), and the device side that has only the exported file
(`fewshot_lkca.predict`). Preprocessing is derived from the backbone's timm ``pretrained_cfg`` (the house rule: data
settings live there) by `preprocessing`, and nowhere else.

Example:
    >>> meta = dict(model='lkca_mobilenet', classes=['a', 'b'], **preprocessing({'mean': (0.5,) * 3}, 96))
    >>> decode_metadata(encode_metadata(dict(meta, fewshot_lkca='0.1.0')))['image_size']
    96
"""
import json
import math
from collections.abc import Mapping

__all__ = ['MARKER', 'PREPROCESSING_KEYS', 'CLASSIFIER_KEYS', 'HEAD_INITIALIZER', 'FEATURES_OUTPUT', 'MetadataError',
           'preprocessing', 'encode_metadata', 'decode_metadata', 'check_classifier_meta', 'device_head', 'rejection']

MARKER = 'fewshot_lkca'  # ONNX metadata key naming the exporting package version: "one of our models"
# key -> type, as the exported file stores them (ONNX metadata values are strings; lists travel as JSON)
_PREPROCESSING_TYPES = {'image_size': int, 'mean': list, 'std': list, 'interpolation': str, 'crop_pct': float}
PREPROCESSING_KEYS = tuple(_PREPROCESSING_TYPES)
_CLASSIFIER_TYPES = {'model': str, 'classes': list, **_PREPROCESSING_TYPES}
CLASSIFIER_KEYS = tuple(_CLASSIFIER_TYPES)  # what a fine-tuned classifier's checkpoint must hold to be exported
# The exported head, for learning on the device (fewshot_lkca.adapt): logits = unit(features) @ HEAD_INITIALIZER, a
# (D, classes) fp32 matrix (the cosine head's unit class directions times its temperature, transposed), and the
# features the head reads are the model's second output. The ONNX metadata key 'head' holds them as JSON.
HEAD_INITIALIZER = 'fewshot_lkca_head'
FEATURES_OUTPUT = 'features'
# timm's defaults when a pretrained cfg leaves a field out (timm.data.resolve_data_config does the same)
_DEFAULTS = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation='bilinear', crop_pct=0.875)


class MetadataError(ValueError):
    """A model's metadata is missing, not ours, or unusable (the message names the field)."""


def preprocessing(pretrained_cfg: Mapping, image_size: int) -> dict:
    """The evaluation preprocessing of a backbone at ``image_size`` px, as stored with every model it makes.

    Args:
        pretrained_cfg: The backbone's timm ``pretrained_cfg`` (or a checkpoint's metadata: the same keys).
        image_size: The input side the model was trained at.
    """
    out = dict(image_size=int(image_size))
    for key, default in _DEFAULTS.items():
        value = pretrained_cfg.get(key) or default
        out[key] = [float(v) for v in value] if isinstance(value, (list, tuple)) else value
    out['crop_pct'] = float(out['crop_pct'])
    return out


def encode_metadata(meta: Mapping) -> dict[str, str]:
    """Metadata values as ONNX ``metadata_props`` strings: text stays text, everything else becomes JSON."""
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in meta.items()}


def _check_values(meta: dict, source: str) -> None:
    names = meta['classes']
    if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise MetadataError(f'{source}: metadata class names must be distinct, non-empty strings, got {names[:5]}')
    mean, std = meta['mean'], meta['std']
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in mean + std)
    if (len(mean) != 3 or len(std) != 3 or not numbers or min(std, default=0) <= 0
            or not 0 < meta['crop_pct'] <= 1 or meta['image_size'] < 1):
        raise MetadataError(f'{source}: metadata holds unusable preprocessing (mean {mean}, std {std}, crop_pct '
                            f'{meta["crop_pct"]}, image_size {meta["image_size"]})')


def decode_metadata(props: Mapping[str, str], source: str = 'the model') -> dict:
    """The class names and preprocessing stored by `encode_metadata` in an exported model, checked.

    Raises:
        MetadataError: ``props`` lack our marker or a field, or a field does not parse or makes no sense.
    """
    if MARKER not in props:
        raise MetadataError(f'{source} is not a fewshot_lkca model (no class names or preprocessing in its '
                            'metadata); export a run with: python -m fewshot_lkca.export RUN_DIR')
    meta = dict(props)
    for key, kind in _CLASSIFIER_TYPES.items():
        if key not in props:
            raise MetadataError(f"{source}: metadata lacks '{key}' (re-export it with python -m fewshot_lkca.export)")
        try:
            value = kind(props[key]) if kind is not list else json.loads(props[key])
        except ValueError:
            raise MetadataError(f"{source}: metadata '{key}' does not parse: {props[key][:80]!r}") from None
        if kind is list and not isinstance(value, list):
            raise MetadataError(f"{source}: metadata '{key}' must be a JSON list, got {props[key][:80]!r}")
        meta[key] = value
    _check_values(meta, source)
    return meta


def check_classifier_meta(meta: Mapping, n_outputs: int, source: str) -> None:
    """Refuse a classifier checkpoint's metadata that lacks a field or names another number of classes.

    Raises:
        MetadataError: A missing field, or ``len(classes) != n_outputs``.
    """
    missing = [k for k in CLASSIFIER_KEYS if k not in meta]
    if missing:
        raise MetadataError(f'{source} is not a fine-tuned classifier of this package (lacks {", ".join(missing)})')
    if len(meta['classes']) != n_outputs:
        raise MetadataError(f'{source}: the head has {n_outputs} classes, the metadata names {len(meta["classes"])}')


def device_head(meta: Mapping, source: str = 'the model') -> dict:
    """The exported head's description (``initializer``, ``features`` output, ``scale``, ``dim``) from ``meta['head']``.

    Raises:
        MetadataError: The model was exported before the head could be rewritten, or the entry does not parse.
    """
    if 'head' not in meta:
        raise MetadataError(f'{source} has no rewritable head (exported by an older fewshot_lkca); export its run '
                            'again with: python -m fewshot_lkca.export RUN_DIR')
    try:
        head = json.loads(meta['head']) if isinstance(meta['head'], str) else dict(meta['head'])
        head = dict(initializer=str(head['initializer']), features=str(head['features']), scale=float(head['scale']),
                    dim=int(head['dim']))
    except (ValueError, KeyError, TypeError):
        raise MetadataError(f"{source}: metadata 'head' does not parse: {str(meta['head'])[:80]!r}") from None
    if not (head['scale'] > 0 and head['dim'] > 0):
        raise MetadataError(f"{source}: metadata 'head' holds an unusable scale or width: {head}")
    return head


def rejection(meta: Mapping, source: str = 'the model') -> float | None:
    """The stored "unknown" threshold on the best class's cosine (``meta['reject']``), or None when there is none.

    Raises:
        MetadataError: The entry does not parse.
    """
    if 'reject' not in meta:
        return None
    try:
        entry = json.loads(meta['reject']) if isinstance(meta['reject'], str) else dict(meta['reject'])
        threshold = entry.get('threshold')
        return None if threshold is None else float(threshold)
    except (ValueError, TypeError, AttributeError):
        raise MetadataError(f"{source}: metadata 'reject' does not parse: {str(meta['reject'])[:80]!r}") from None
