"""The few-shot classifier: a timm backbone's pre-logits features and a cosine head that starts as ProtoNet."""
import torch
from torch import nn

from .layers import CoordAttentionExport
from .metadata import HEAD_INITIALIZER

__all__ = ['CosineHead', 'CosineHeadExport', 'FewShotClassifier', 'MirrorViewsExport', 'ExportForm', 'export_form',
           'static_padding', 'class_prototypes']


def class_prototypes(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, D) mean feature of each class; a class with no sample is an error, not a zero vector."""
    counts = torch.bincount(labels, minlength=num_classes)
    if (counts == 0).any():
        missing = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f'the support set has no image of class(es) {missing}')
    protos = torch.zeros(num_classes, features.shape[1], dtype=features.dtype, device=features.device)
    protos.index_add_(0, labels, features)
    return protos / counts[:, None].to(features.dtype)


class CosineHead(nn.Module):
    """``logits = scale * cos(feature, w_c)``.

    Initialised from the support set's class means it *is* the nearest-prototype (cosine) classifier, so
    fine-tuning starts where ProtoNet ends. The temperature ``scale`` is learned.

    Args:
        in_features: Feature width.
        num_classes: Classes (the task's ``n_way``).
        scale: Initial temperature.
    """

    def __init__(self, in_features: int, num_classes: int, scale: float = 10.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, in_features) * 0.01)
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    @torch.no_grad()
    def init_from_prototypes(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Unit-length class means: the same predictions as the raw means, and steps that move the directions."""
        protos = class_prototypes(features.float(), labels, self.weight.shape[0])
        self.weight.copy_(nn.functional.normalize(protos, dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * nn.functional.normalize(x, dim=1) @ nn.functional.normalize(self.weight, dim=1).t()


class FewShotClassifier(nn.Module):
    """``head(backbone(x))`` where the backbone returns pre-logits features (``num_classes=0``).

    One module, so that export, quantization and checkpoints see the whole thing. With ``mirror_views`` an image is
    also seen flipped left-right (a mirrored object is the same object; pretraining's one augmentation) and the head
    reads the sum of both views' unit features: two backbone passes per image.
    """

    def __init__(self, backbone: nn.Module, head: CosineHead, mirror_views: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.mirror_views = mirror_views

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if not self.mirror_views:
            return self.backbone(x)
        both = self.backbone(torch.cat([x, x.flip(-1)]))  # one pass over the batch and its mirror images
        unit = nn.functional.normalize(both, dim=1)
        return unit.unflatten(0, (2, -1)).sum(0)  # (2N, D) -> (2, N, D): no slice at N, so the batch stays dynamic

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ExportForm(nn.Module):
    """What the ONNX export traces: ``(logits, features)``, the head as one (D, classes) matrix.

    ``logits = unit(features) @ M`` with ``M = scale * unit(W)^T``: the cosine head's function (the temperature folded
    into the matrix), with nothing for the exporter to fold, so M lands in the file as the initializer
    `fewshot_lkca.metadata.HEAD_INITIALIZER`. A device rewrites that one initializer to learn new classes
    (`fewshot_lkca.adapt`), reading the second output, the features the head sees.
    """

    def __init__(self, model: FewShotClassifier):
        super().__init__()
        self.model = model
        self.register_buffer(HEAD_INITIALIZER, CosineHeadExport(model.head).matrix)  # the one head-matrix rule

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.features(x)
        return nn.functional.normalize(features, dim=1) @ getattr(self, HEAD_INITIALIZER), features


class CosineHeadExport(nn.Module):
    """A trained `CosineHead` as constants and ops XNNPACK delegates: ``unit(x) @ M``, ``M = scale * unit(W)^T``.

    ``unit(x) = x * rsqrt(max(|x|^2, eps^2))`` (``normalize``'s function) with the squared norm as a product with a
    column of ones: ``normalize``'s pow, sum over a dim and expand, and a product of two computed tensors, are not
    delegated and split the program in three.
    """

    def __init__(self, head: CosineHead):
        super().__init__()
        with torch.no_grad():
            matrix = (head.scale * nn.functional.normalize(head.weight, dim=1)).t().contiguous()
        self.register_buffer('matrix', matrix)
        self.register_buffer('ones', torch.ones(matrix.shape[0], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _unit_rows(x, self.ones) @ self.matrix


def _unit_rows(x: torch.Tensor, ones: torch.Tensor) -> torch.Tensor:
    """``normalize(x, dim=1)`` with the squared norm as a product with a column of ones (delegated by XNNPACK)."""
    return x * torch.rsqrt(torch.clamp((x * x) @ ones, min=1e-24))


class MirrorViewsExport(nn.Module):
    """A mirror-views `FewShotClassifier` for a fixed input width, in ops XNNPACK delegates (one segment).

    The same function: the flip as a product with the (width x width) anti-identity (exact: one 1 per column), each
    view's unit feature as in `CosineHeadExport`, and the two views summed as two slices. ``aten.flip``,
    ``normalize`` and a sum over the view axis are not delegated and split the program in four.
    """

    def __init__(self, model: FewShotClassifier, width: int):
        super().__init__()
        self.backbone, self.head = model.backbone, model.head
        dim = model.head.weight.shape[1]
        self.register_buffer('reverse', torch.eye(width).flip(0))
        self.register_buffer('ones', torch.ones(dim, 1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        both = _unit_rows(self.backbone(torch.cat([x, x @ self.reverse])), self.ones)
        n = x.shape[0]  # a symbolic size under torch.export (len() would fix the batch)
        return both[:n] + both[n:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow's 'same' padding of one axis: (before, after), the extra pixel after."""
    total = max((-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def static_padding(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """A copy of ``model`` with every TensorFlow-'same' conv (timm's `Conv2dSame`, which computes its padding from the
    input's shape at run time) as a constant zero pad + an unpadded conv, for inputs of ``example``'s size: exports
    then hold no shape arithmetic (NCNN cannot run it). ``model`` itself when it has no such conv.

    The other exact form, symmetric padding of a kernel one tap longer (4x4 for a 3x3 stride-2 conv on an even
    input), tied in onnxruntime and ran 2.5x slower in ExecuTorch, where XNNPACK has no fast path for even depthwise
    kernels (lkca_mobilenet, 224 px, 1 thread, AMD EPYC, 2026-12-08; `docs/photos.md`).
    """
    import copy

    from timm.layers import Conv2dSame

    if not any(isinstance(m, Conv2dSame) for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    sizes, hooks = {}, []
    for m in model.modules():
        if isinstance(m, Conv2dSame):
            hooks.append(m.register_forward_pre_hook(lambda mod, args: sizes.__setitem__(mod, args[0].shape[-2:])))
    with torch.no_grad():
        model.eval()(example[:1])
    for h in hooks:
        h.remove()
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, Conv2dSame):
                (h, w), (kh, kw), (sh, sw), (dh, dw) = sizes[child], child.kernel_size, child.stride, child.dilation
                conv = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride, 0,
                                 child.dilation, child.groups, child.bias is not None)
                conv.load_state_dict(child.state_dict())
                pads = _same_pads(w, kw, sw, dw) + _same_pads(h, kh, sh, dh)  # (left, right, top, bottom)
                setattr(module, name, nn.Sequential(nn.ZeroPad2d(pads), conv))
    return model


def export_form(model: nn.Module, width: int | None = None, example: torch.Tensor | None = None) -> nn.Module:
    """What the ONNX and ExecuTorch exports trace: a copy of ``model`` computing the same function in ops device
    runtimes run well (``model`` itself when nothing changes): every coordinate attention as `CoordAttentionExport`,
    a cosine head as `CosineHeadExport`, and, given the input ``width``, a mirror-views classifier as
    `MirrorViewsExport` (ExecuTorch gives it: one XNNPACK segment instead of four); given an ``example`` input,
    TensorFlow-'same' convs with constant pads for its size (`static_padding`).

    Measured on lkca_mobilenet (shipped checkpoint, batch 1, 1 thread, AMD EPYC, 2026-12-04): ExecuTorch 28 delegate
    segments -> 1, fp32 0.90 -> 0.60 ms and int8 0.85 -> 0.53 ms at 96 px; onnxruntime fp32 1.50 -> 1.18 ms at 96 px,
    3.24 -> 2.90 ms at 224 px.
    """
    import copy

    from timm.layers.coord_attn import CoordAttn

    def mirrored(m):
        return isinstance(m, FewShotClassifier) and m.mirror_views and width is not None

    if example is not None:
        model = static_padding(model, example)
    if not any(isinstance(m, (CoordAttn, CosineHead)) or mirrored(m) for m in model.modules()):
        return model
    model = CoordAttentionExport.of(copy.deepcopy(model))
    if mirrored(model):
        model = MirrorViewsExport(model, width)
    for module in model.modules():
        for name, child in module.named_children():
            if mirrored(child):
                setattr(module, name, MirrorViewsExport(child, width))
    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, CosineHead):
                setattr(module, name, CosineHeadExport(child))
    return model
