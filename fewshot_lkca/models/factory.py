"""`create_backbone`: timm's `create_model` with the checks a user of an offline device needs."""
import difflib
import functools
import os
import socket
from pathlib import Path

import timm
from torch import nn

__all__ = ['create_backbone', 'list_backbones', 'imagenet_available', 'BackboneError']

_HUB_HOST = ('huggingface.co', 443)


class BackboneError(ValueError):
    """A backbone cannot be built as asked (unknown name, missing weights, ...)."""


def list_backbones() -> list[str]:
    """The models of this package (timm lists all others too)."""
    return timm.list_models('lkca_mobilenet*')


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get('HF_HUB_OFFLINE', '0') not in ('0', '', 'false', 'False'):
        return False
    try:
        with socket.create_connection(_HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def _in_hub_cache(hf_hub_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return any(isinstance(try_to_load_from_cache(hf_hub_id, f), str)
               for f in ('model.safetensors', 'pytorch_model.bin', 'open_clip_pytorch_model.bin'))


@functools.cache
def imagenet_available(name: str) -> tuple[bool, str]:
    """Whether timm can load ``name``'s ImageNet weights here (hub cache, or the hub online), and how it knows.

    Asked once per process: offline, the hub check costs up to a few seconds.
    """
    cfg = timm.models.get_pretrained_cfg(name) if timm.is_model(name) else None
    hub_id = cfg.hf_hub_id if cfg else None
    if not hub_id:
        return False, f'{name} has no ImageNet weights in timm'
    if _in_hub_cache(hub_id):
        return True, f'{hub_id} in the Hugging Face cache'
    if _hub_reachable():
        return True, f'{hub_id} from the Hugging Face hub'
    return False, f'{hub_id} is neither cached nor reachable offline'


def _check_state_dict_file(path: Path) -> None:
    """Refuse a file that is not a readable state_dict before timm tries to use it (never unpickles objects)."""
    import torch
    try:
        if path.suffix == '.safetensors':
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises several types for a bad file: name it and the reason, in one line
        why = 'the file is empty' if path.stat().st_size == 0 else f'{type(e).__name__}: {_first_line(e)}'
        raise BackboneError(f'cannot read weights file {path}: {why}') from e
    if isinstance(state, dict) and 'state_dict' in state and isinstance(state['state_dict'], dict):
        state = state['state_dict']
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f'weights file {path} does not hold a state_dict (a dict of tensors)')


def create_backbone(
        name: str,
        pretrained: bool = False,
        weights: str | os.PathLike | None = None,
        **kwargs,
) -> nn.Module:
    """Build a timm model by name, failing fast with a one-line reason.

    Args:
        name: Any timm model name, e.g. ``'lkca_mobilenet'`` or ``'tf_mobilenetv3_small_100'``.
        pretrained: Load ImageNet weights (for LKCA models: transplanted from the source MobileNetV3).
        weights: Local state_dict file of the *source* weights (implies ``pretrained``): what timm would download,
            e.g. ``tf_mobilenetv3_small_100.in1k.pth``. Needed offline.
        **kwargs: Passed to `timm.create_model` (``num_classes``, ``in_chans``, ``drop_path_rate``, ...).

    Example:
        >>> model = create_backbone('lkca_mobilenet', num_classes=5)
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ''
        raise BackboneError(f"unknown model '{name}'{hint} (ours: {', '.join(list_backbones())})")
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise BackboneError(f'weights file not found: {path}')
        _check_state_dict_file(path)
        kwargs['pretrained_cfg_overlay'] = dict(kwargs.get('pretrained_cfg_overlay') or {}, file=str(path))
        pretrained = True
    elif pretrained:
        hub_id = timm.models.get_pretrained_cfg(name).hf_hub_id if timm.models.get_pretrained_cfg(name) else None
        if hub_id and not _in_hub_cache(hub_id) and not _hub_reachable():
            raise BackboneError(
                f"pretrained weights for '{name}' come from the Hugging Face hub ({hub_id}), which is not reachable "
                f'and not cached; pass weights=PATH to a local copy of that state_dict')
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (RuntimeError, KeyError, ValueError) as e:
        if weights is not None:  # a file of the wrong model (shapes, names) or not a state_dict at all
            raise BackboneError(f"weights file {weights} does not fit '{name}': {_first_line(e)}") from e
        raise


def _first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none: an empty file's EOFError)."""
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__
