"""The few-shot classifier: a timm backbone's pre-logits features and a cosine head that starts as ProtoNet."""
import torch
from torch import nn

from .metadata import HEAD_INITIALIZER

__all__ = ['CosineHead', 'FewShotClassifier', 'ExportForm', 'class_prototypes']


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
        with torch.no_grad():
            head = model.head
            matrix = (head.scale * nn.functional.normalize(head.weight, dim=1)).t().contiguous()
        self.register_buffer(HEAD_INITIALIZER, matrix)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.features(x)
        return nn.functional.normalize(features, dim=1) @ getattr(self, HEAD_INITIALIZER), features
