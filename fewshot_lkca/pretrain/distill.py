"""Distillation from an ImageNet teacher (pretraining ``method: distill``): the student learns to see what it sees.

The student (``lkca_mobilenet``, started from the transplant) and the frozen teacher see the same augmented view of
an unlabeled photo. The loss is the teacher's logits as soft targets (KL at ``temperature``, scaled by T^2, Hinton et
al. 2015) plus the cosine distance of the pre-logits features (a linear projection when the widths differ). The
images are few and only what ships offline, so the views vary a lot: random resized crops down to ``crop_min`` of
the area, flips, colour and grey (the "augmented image prior", Asano & Saeed, ICLR 2023).

A cheap first stage, ``local_steps``: each coordinate attention learns, on the teacher's own activations, to output
what the teacher's squeeze-excitation outputs in the same place (the transplant's only fresh part, trained block by
block, every block in parallel). Only teachers with the student's layout (the transplant source) have that stage.

BatchNorm statistics stay frozen (the student's are ImageNet's; a few hundred photos should not replace them).
Model selection: top-1 agreement with the teacher on held-out photos (`PhotoPool.split`), never trained on.
"""
import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import ConfigError
from ..errors import DataError

__all__ = ['PhotoPool', 'DistillNet', 'distill_transform', 'fidelity', 'view_crops', 'photo_data', 'distill_net',
           'net_module', 'VIEWS_PER_PHOTO']

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.tif', '.tiff')
# Photos are decoded once and kept downscaled: a 4K wallpaper decodes in ~0.1 s, too slow for every view of a step.
POOL_MAX_SIDE = 640
# Held-out photos are few (tens): several fixed views of each make the agreement less noisy.
VIEWS_PER_PHOTO = 4
# Input side when the config leaves it at 0: the teachers' and the transplant's ImageNet size.
DEFAULT_SIZE = 224


class PhotoPool:
    """Unlabeled photos of a folder (searched recursively), decoded once and kept in memory, at most
    ``POOL_MAX_SIDE`` px on the longer side. ``targets`` are all 0: the teacher gives the targets.

    `split` deals each photo to the train or the held-out part by a hash of its path relative to the folder, so
    the same photo is held out whatever else the folder holds.
    """

    classes = ['photos']

    def __init__(self, arrays: list[np.ndarray], names: list[str]) -> None:
        self.arrays, self.names = arrays, names
        self.targets = [0] * len(arrays)

    @classmethod
    def from_folder(cls, root: str | Path, warn=print) -> 'PhotoPool':
        from ..images import load_image

        root = Path(root)
        if not root.is_dir():
            raise DataError(f'distillation images: no such folder {root}')
        files = sorted(p for p in root.rglob('*') if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        arrays, names, bad = [], [], []
        for path in files:
            try:
                arrays.append(_downscale(load_image(path)))
                names.append(path.relative_to(root).as_posix())
            except Exception as e:  # noqa: BLE001 - any unreadable file is named and skipped
                bad.append(f'{path.name} ({type(e).__name__})')
        if bad:
            warn(f'warning: skipped {len(bad)} unreadable image(s) in {root}: {", ".join(bad[:5])}'
                 + (' ...' if len(bad) > 5 else ''))
        if len(arrays) < 2:
            raise DataError(f'distillation images: {root} holds {len(arrays)} readable image(s); at least 2 needed')
        return cls(arrays, names)

    def __len__(self) -> int:
        return len(self.arrays)

    def load(self, index: int) -> np.ndarray:
        return self.arrays[index]

    def split(self, holdout: float) -> tuple['PhotoPool', 'PhotoPool']:
        """(train, held-out): about ``holdout`` of the photos held out, chosen by a hash of their names."""
        def held(name: str) -> bool:
            return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 16 ** 8 < holdout

        parts = ([], [])
        for i, name in enumerate(self.names):
            parts[held(name)].append(i)
        if not parts[0] or (holdout > 0 and not parts[1]):
            raise DataError(f'distillation images: {len(self)} photos are too few to hold {holdout:.0%} out')
        return tuple(PhotoPool([self.arrays[i] for i in p], [self.names[i] for i in p]) for p in parts)


def _downscale(image: np.ndarray) -> np.ndarray:
    import cv2

    side = max(image.shape[:2])
    if side <= POOL_MAX_SIDE:
        return np.ascontiguousarray(image)
    scale = POOL_MAX_SIDE / side
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def distill_transform(cfg, size: int, crop_min: float):
    """One view of a photo: random resized crop (``crop_min`` to all of the area), flip, colour, grey, normalise."""
    from ..data.transforms import AlbumentationsTransform, _albumentations, _interpolation, resolve_data_cfg

    A = _albumentations()
    from albumentations.pytorch import ToTensorV2

    data_cfg = resolve_data_cfg(cfg, size)
    return AlbumentationsTransform(A.Compose([
        A.RandomResizedCrop(size=(size, size), scale=(crop_min, 1.0), interpolation=_interpolation(
            data_cfg['interpolation'])),
        A.HorizontalFlip(p=0.5),
        A.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.05, p=0.8),
        A.ToGray(p=0.3),
        A.Normalize(mean=data_cfg['mean'], std=data_cfg['std']),
        ToTensorV2(),
    ]))


def view_crops(pool: PhotoPool, cfg, size: int, per_image: int, seed: int) -> torch.Tensor:
    """A fixed set of ``per_image`` views of every photo (seeded), for validation and fidelity: (N, 3, size, size).
    The first view of each photo is the plain centre crop, the others are random crops (a third of the area or more)."""
    from ..data import eval_transform

    centre = eval_transform(cfg, size=size)
    crops = distill_transform(cfg, size, crop_min=1 / 3)
    crops.set_random_seed(seed)
    views = []
    for i in range(len(pool)):
        image = pool.load(i)
        views.append(centre(image))
        views += [crops(image) for _ in range(per_image - 1)]
    return torch.stack(views)


def attention_pairs(student: nn.Module, teacher: nn.Module) -> list[tuple[str, str]]:
    """(student attention, teacher SE) module names in the same block, when the layouts match; else []."""
    s = {n.rsplit('.', 1)[0]: n for n, m in student.named_modules() if n.endswith('.attn')
         and not isinstance(m, nn.Identity)}
    t = {n.rsplit('.', 1)[0]: n for n, m in teacher.named_modules() if n.endswith('.se')
         and not isinstance(m, nn.Identity)}
    return [(s[b], t[b]) for b in s if b in t] if s.keys() == t.keys() else []


def photo_data(cfg) -> tuple['PhotoPool', 'PhotoPool', int]:
    """The training photos, the held-out ones and the input side of a distillation config."""
    train, held = PhotoPool.from_folder(cfg.data).split(cfg.holdout)
    return train, held, cfg.image_size or DEFAULT_SIZE


def distill_net(cfg, build_backbone, size: int) -> 'DistillNet':
    """Teacher, student (``build_backbone(cfg, n_classes)``, with a classifier of the teacher's classes, copied from
    the teacher where the widths match) and the loss between them."""
    from .teachers import TeacherInput, load_teacher

    teacher = load_teacher(cfg.teacher, cfg.teacher_weights)
    student, origin = build_backbone(cfg, teacher.num_classes)
    if student.head_hidden_size == teacher.head_hidden_size:  # the transplant's classifier is the source's already
        student.get_classifier().load_state_dict(teacher.get_classifier().state_dict())
    net = DistillNet(student, teacher, TeacherInput(student.pretrained_cfg, teacher.pretrained_cfg, size),
                     cfg.temperature, cfg.feature_weight, cfg.freeze_bn, size=size, seed=cfg.seed, origin=origin)
    if cfg.local_steps and not net.pairs:
        raise ConfigError(f'local_steps needs a teacher with the student\'s layout; {cfg.teacher} has none: set '
                          'local_steps=0 or teacher=tf_mobilenetv3_small_100')
    return net


def net_module(net: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return getattr(net, 'module', net)


class DistillNet(nn.Module):
    """Student, frozen teacher and the projection between their features; ``forward`` returns (loss, agreement).

    Args:
        student: The backbone to train, with a classifier of the teacher's classes.
        teacher: The frozen teacher (`fewshot_lkca.pretrain.teachers.load_teacher`).
        teacher_input: The student's input batch -> the teacher's (`TeacherInput`).
        temperature: Of the softened logits (KL).
        feature_weight: Weight of the pre-logits cosine term.
        freeze_bn: Keep the student's BatchNorm statistics (eval-mode BatchNorm while training).
        size, seed: Input side and seed of the validation views (`views`).
        origin: Where the student's weights came from, in words (the run's log and checkpoint).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, teacher_input: nn.Module, temperature: float,
                 feature_weight: float, freeze_bn: bool = True, size: int = DEFAULT_SIZE, seed: int = 0,
                 origin: str = '') -> None:
        super().__init__()
        self.size, self.seed, self.origin = size, seed, origin
        self.student, self.teacher, self.teacher_input = student, teacher, teacher_input
        s_dim, t_dim = student.head_hidden_size, teacher.head_hidden_size
        self.projection = nn.Identity() if s_dim == t_dim else nn.Linear(s_dim, t_dim, bias=False)
        self.temperature, self.feature_weight, self.freeze_bn = temperature, feature_weight, freeze_bn
        self.pairs = attention_pairs(student, teacher)

    def views(self, pool: 'PhotoPool') -> torch.Tensor:
        """The fixed views of held-out photos that validation scores (see `view_crops`)."""
        return view_crops(pool, self.student.pretrained_cfg, self.size, VIEWS_PER_PHOTO, self.seed)

    def validate(self, views: torch.Tensor) -> dict:
        """Top-1 agreement with the teacher on ``views`` (mean, 95 % CI) with the feature cosine."""
        from ..metrics import mean_ci

        result = fidelity(self.student, self.teacher, self.teacher_input, self.projection, views)
        return dict(mean_ci(result['per_view']).as_dict(), cosine=result['cosine'], top5=result['top5'])

    def trained(self) -> nn.ModuleDict:
        """What the optimizer steps and ``train_state.pt`` keeps: the student and the projection."""
        return nn.ModuleDict(dict(student=self.student, projection=self.projection))

    def train(self, mode: bool = True) -> 'DistillNet':
        super().train(mode)
        self.teacher.eval()
        if mode and self.freeze_bn:
            for m in self.student.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, images: torch.Tensor, local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if local:
            return self._local_loss(images)
        with torch.no_grad():
            t_in = self.teacher_input(images)
            t_feat = self.teacher.forward_head(self.teacher.forward_features(t_in), pre_logits=True)
            t_logits = self.teacher.get_classifier()(t_feat)
        s_feat = self.student.forward_head(self.student.forward_features(images), pre_logits=True)
        s_logits = self.student.get_classifier()(s_feat)
        T = self.temperature
        log_p, log_q = nn.functional.log_softmax(s_logits / T, 1), nn.functional.log_softmax(t_logits / T, 1)
        kl = nn.functional.kl_div(log_p, log_q, reduction='batchmean', log_target=True) * T * T
        cos = nn.functional.cosine_similarity(self.projection(s_feat), t_feat, dim=1)
        loss = kl + self.feature_weight * (1 - cos).mean()
        return loss, (s_logits.argmax(1) == t_logits.argmax(1)).float().mean()

    def _local_loss(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each attention's output against the teacher SE's, on the teacher's input to it (relative squared error)."""
        captured = {}
        modules = dict(self.teacher.named_modules())
        hooks = [modules[t].register_forward_hook(_capture(captured, t)) for _, t in self.pairs]
        try:
            with torch.no_grad():
                self.teacher.forward_features(self.teacher_input(images))
        finally:
            for h in hooks:
                h.remove()
        student_modules = dict(self.student.named_modules())
        losses = []
        for s, t in self.pairs:
            x, target = captured[t]
            out = student_modules[s](x)
            losses.append((out - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-8))
        loss = torch.stack(losses).mean()
        return loss, (1 - loss.detach()).clamp(0, 1)  # a stand-in for agreement in the log: 1 - relative error


def _capture(store: dict, name: str):
    def hook(_module, inputs, output):
        store[name] = (inputs[0], output)
    return hook


@torch.no_grad()
def fidelity(student: nn.Module, teacher: nn.Module, teacher_input: nn.Module, projection: nn.Module,
             views: torch.Tensor, batch_size: int = 64) -> dict:
    """How closely the student reproduces the teacher on ``views``: top-1 agreement (and its per-view list, for a
    CI), mean cosine of the (projected) pre-logits features, and top-5 overlap of the teacher's top-1."""
    was = student.training
    student.eval()
    agree, cos, top5 = [], [], []
    for i in range(0, len(views), batch_size):
        x = views[i:i + batch_size]
        t_feat = teacher.forward_head(teacher.forward_features(teacher_input(x)), pre_logits=True)
        t_top = teacher.get_classifier()(t_feat).argmax(1)
        s_feat = student.forward_head(student.forward_features(x), pre_logits=True)
        s_logits = student.get_classifier()(s_feat)
        agree.append((s_logits.argmax(1) == t_top).float())
        top5.append((s_logits.topk(5, 1).indices == t_top[:, None]).any(1).float())
        cos.append(nn.functional.cosine_similarity(projection(s_feat), t_feat, dim=1))
    student.train(was)
    agree, cos, top5 = torch.cat(agree), torch.cat(cos), torch.cat(top5)
    return dict(agreement=agree.mean().item(), per_view=agree.tolist(), cosine=cos.mean().item(),
                top5=top5.mean().item(), views=len(views))

