"""Checkpoints shipped inside the package, each trained by the repository's own command.

One entry per kind of data (`SHIPPED`): the backbone, its file beside this module (fp16 safetensors with the
package's metadata), the model card next to it (command, data, steps, wall time, machine, val figures, sha256), and the
pretraining recipe that makes it:

- ``lookalike``: from random initialisation on the look-alike base classes (``make weights``);
- ``photos``: distilled from ImageNet MobileNetV3-Small on offline photos, starting from its transplant (``make
  distill``): the starting point of a folder of real photos.

`ship` writes both files from a finished run; `shipped_checkpoint` checks the file against its card's hash before
anything loads it.

Example:
    >>> path = shipped_checkpoint('lookalike')  # doctest: +SKIP
    >>> path.name  # doctest: +SKIP
    'lkca_mobilenet-lookalike.safetensors'
"""
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ['Shipped', 'SHIPPED', 'WEIGHTS_DIR', 'ShippedWeightsError', 'shipped_checkpoint', 'model_card', 'sha256']

WEIGHTS_DIR = Path(__file__).resolve().parent


class ShippedWeightsError(ValueError):
    """A shipped checkpoint is missing or does not match its model card."""


@dataclass(frozen=True)
class Shipped:
    model: str
    data: str
    recipe: str  # the pretraining recipe (fewshot_lkca/recipes/) that trains it
    method: str = 'supervised'  # the pretraining method of that recipe ('distill': from an ImageNet teacher)
    make: str = 'make weights'  # the make target that runs it

    @property
    def stem(self) -> str:
        return f'{self.model}-{self.data}'

    @property
    def path(self) -> Path:
        return WEIGHTS_DIR / f'{self.stem}.safetensors'

    @property
    def card_path(self) -> Path:
        return WEIGHTS_DIR / f'{self.stem}.json'


SHIPPED = {
    'lookalike': Shipped('lkca_mobilenet', 'lookalike', 'pretrain_lookalike'),
    'photos': Shipped('lkca_mobilenet', 'photos', 'pretrain_distill_imagenet', method='distill', make='make distill'),
}


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def model_card(data: str) -> dict | None:
    """The model card of ``data``'s shipped checkpoint, None when there is none."""
    entry = SHIPPED.get(data)
    if entry is None or not entry.card_path.is_file():
        return None
    return json.loads(entry.card_path.read_text())


def shipped_checkpoint(data: str, model: str = '') -> Path | None:
    """The shipped checkpoint for ``data`` (and ``model``, if given), verified; None when none is shipped.

    Raises:
        ShippedWeightsError: The file is there but does not match its model card (damaged or replaced).
    """
    entry = SHIPPED.get(data)
    if entry is None or (model and model != entry.model) or not entry.path.is_file():
        return None
    card = model_card(data)
    if card is None:
        raise ShippedWeightsError(f'{entry.path} has no model card ({entry.card_path.name}) beside it')
    if sha256(entry.path) != card['sha256']:
        raise ShippedWeightsError(f'{entry.path} does not match the sha256 in {entry.card_path.name} (damaged or '
                                  'replaced); reinstall the package or rebuild it with: make weights')
    return entry.path
