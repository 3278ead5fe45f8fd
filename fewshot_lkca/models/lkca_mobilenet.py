"""LKCA-MobileNet: MobileNetV3's layout with large-kernel depthwise convs and coordinate attention.

The macro layout (stem, stage widths, strides, expansion ratios, ReLU/Hardswish placement, efficient head) is
MobileNetV3's (Howard et al., ICCV 2019, https://arxiv.org/abs/1905.02244). Each block is an inverted residual
whose spatial part is the LKCA recipe (see `fewshot_lkca.layers.lkca`)::

    [1x1 expand -> BN -> act] -> 5x5 depthwise -> BN -> act -> CoordAttention(GroupNorm) -> 1x1 project -> BN
    (+ input whenever stride is 1 and channels match: the forced residual)

Coordinate attention sits where MobileNetV3 has squeeze-excitation. Because a 3x3 kernel zero-padded to 5x5
computes the same convolution, ImageNet MobileNetV3 weights transplant into this network
(`fewshot_lkca.models.transplant`); only the attention is new, and it starts close to a pass-through.

Ablation twins differ from `lkca_mobilenet` in one thing each: `_dw3` (3x3 depthwise and no attention: the
design's own baseline), `_se` (MobileNetV3's SE instead of coordinate attention), `_cabn` (BatchNorm inside the
attention), `_scconv` (SCConv in the attention slot).

The blocks and MobileNetV3's stage specs are in `fewshot_lkca.models.blocks`.
"""
import torch
from timm.layers import (
    BatchNormAct2d,
    SelectAdaptivePool2d,
    create_conv2d,
    get_act_layer,
    get_device_dtype,
    make_divisible,
    register_notrace_function,
)
from timm.models import build_model_with_cfg, checkpoint, generate_default_cfgs, register_model
from torch import nn

from ..layers import ATTN_LAYERS
from .blocks import LARGE_HEAD, LARGE_STAGES, SMALL_HEAD, SMALL_STAGES, BlockSpec, LKCABlock, build_stages
from .transplant import mobilenetv3_to_lkca

__all__ = ['LKCAMobileNet', 'MIN_INPUT_SIZE']

# Five stride-2 stages: smaller inputs collapse to 1x1 before the last stage and the design stops making sense.
MIN_INPUT_SIZE = 32


@torch.fx.wrap  # torch.fx records a call instead of tracing into the shape checks (plain symbolic_trace) ...
@register_notrace_function  # ... and so do timm's tracers (feature_cls='fx', timm's FX tests)
def _check_input(x: torch.Tensor, in_chans: int, min_size: int = MIN_INPUT_SIZE) -> None:
    """Refuse an input the network cannot take, with the reason, instead of a shape error deep inside a conv.

    TorchScript compiles it where an FX graph of the model is scripted (``min_size`` is an argument for that: a
    module-level int is not visible to TorchScript).
    """
    if x.ndim != 4:
        raise ValueError(f'expected an image batch of shape (N, C, H, W), got a {x.ndim}-D tensor {list(x.shape)}')
    if x.shape[1] != in_chans:
        raise ValueError(f'model takes {in_chans}-channel images (in_chans={in_chans}), got {x.shape[1]} channels')
    if min(x.shape[-2:]) < min_size:
        raise ValueError(f'input {list(x.shape[-2:])} is too small to downsample 32x: '
                         f'use at least {min_size}x{min_size} px')


def _take_indices(num: int, indices: int | list[int] | tuple[int, ...] | None) -> tuple[list[int], int]:
    """timm's convention: None -> all, int n -> last n, sequence -> those (negative from the end); and the largest.

    timm's own `feature_take_indices` lives in a private module (``timm.models._features``), so it is not imported.
    """
    if indices is None:
        indices = num
    if isinstance(indices, int):
        if not 0 < indices <= num:
            raise ValueError(f'last-n indices must be in 1..{num}, got {indices}')
        take = list(range(num - indices, num))
    else:
        take = [i + num if i < 0 else i for i in indices]
        if any(not 0 <= i < num for i in take):
            raise ValueError(f'feature indices {list(indices)} out of range for {num} features')
    return take, max(take)


def _checkpoint_stage(stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Run a stage block by block, recomputing each block's activations in backward instead of storing them.

    A block with nothing to differentiate (frozen, with an input that needs no gradient) runs normally:
    checkpointing it would only add recomputation.
    """
    if not torch.is_grad_enabled():
        return stage(x)
    for block in stage:
        needs_grad = x.requires_grad or any(p.requires_grad for p in block.parameters())
        x = checkpoint(block, x) if needs_grad else block(x)
    return x


class LKCAMobileNet(nn.Module):
    """MobileNetV3-layout network of `LKCABlock`s with timm's model contract.

    Args:
        stages: Tuple of stages, each a tuple of `BlockSpec` (see `fewshot_lkca.models.blocks.SMALL_STAGES`).
        last_chs: Channels of the final 1x1 conv before pooling (MobileNetV3: 576 small, 960 large).
        num_features: Width of the post-pool head conv (the pre-logits feature size).
        num_classes: Classifier outputs (0 for none).
        in_chans: Input image channels.
        width: Channel multiplier (rounded to multiples of 8, as MobileNetV3).
        dw_kernel_size: Depthwise kernel of every block (5: LKCA; 3: the baseline twin).
        attn_layer: Attention in the blocks MobileNetV3 gives SE: 'ca', 'cabn', 'se', 'scconv' or None.
        stem_chs: Stem width (not scaled below width 0.75, as in MobileNetV3).
        bn_eps: BatchNorm epsilon (1e-3: the TensorFlow value the transplantable weights were trained with).
        drop_rate: Dropout before the classifier.
        drop_path_rate: Stochastic depth, rising linearly over blocks to this value.
        global_pool: Pooling type ('avg', 'max', ...; '' for none).
        pad_type: Padding of strided convs: '' (symmetric, ``k // 2``: static, exports everywhere) or 'same'
            (TensorFlow's asymmetric padding, which the `tf_` source weights were trained with).
        zero_init_last: Start the last BN of every residual block at zero scale, so each block starts as the
            identity (as timm's ResNets do). From scratch on the look-alike base classes this learnt 2.3x faster.
        device: Where the parameters and buffers are created (timm's factory argument; e.g. 'meta').
        dtype: Their dtype.
    """

    def __init__(
            self,
            stages: tuple[tuple[BlockSpec, ...], ...] = SMALL_STAGES,
            last_chs: int = 576,
            num_features: int = 1024,
            num_classes: int = 1000,
            in_chans: int = 3,
            width: float = 1.0,
            dw_kernel_size: int = 5,
            attn_layer: str | None = 'ca',
            stem_chs: int = 16,
            bn_eps: float = 1e-3,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            global_pool: str = 'avg',
            pad_type: str = '',
            zero_init_last: bool = True,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if not isinstance(in_chans, int) or in_chans < 1:
            raise ValueError(f'in_chans must be a positive int, got {in_chans!r}')
        if attn_layer is not None and attn_layer not in ATTN_LAYERS:
            raise ValueError(f"attn_layer must be one of {sorted(ATTN_LAYERS)} or None, got '{attn_layer}'")
        if dw_kernel_size % 2 == 0 or dw_kernel_size < 1:
            raise ValueError(f'dw_kernel_size must be a positive odd number, got {dw_kernel_size}')
        if pad_type not in ('', 'same'):
            raise ValueError(f"pad_type must be '' or 'same', got '{pad_type}'")
        dd = dict(device=device, dtype=dtype)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.pad_type = pad_type  # a checkpoint records it (`fewshot_lkca.checkpoint.model_args`)
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        hard_swish = get_act_layer('hard_swish')

        stem_chs = stem_chs if width < 0.75 else make_divisible(stem_chs * width)
        self.conv_stem = create_conv2d(in_chans, stem_chs, 3, stride=2, padding=pad_type, **dd)
        self.bn1 = BatchNormAct2d(stem_chs, eps=bn_eps, act_layer=hard_swish, **dd)
        self.blocks, stage_info = build_stages(
            stages, stem_chs, last_chs, width=width, dw_kernel_size=dw_kernel_size, attn_layer=attn_layer,
            bn_eps=bn_eps, drop_path_rate=drop_path_rate, pad_type=pad_type, **dd)
        # timm reports one feature per reduction level: the stem, then the last stage of each.
        info = [dict(num_chs=stem_chs, reduction=2, module='bn1')] + stage_info
        self.feature_info = [f for i, f in enumerate(info)
                             if i + 1 == len(info) or info[i + 1]['reduction'] != f['reduction']]
        self.stage_ends = [info.index(f) for f in self.feature_info]  # positions in (stem, *blocks)

        # MobileNetV3's efficient head: pool first, then a 1x1 conv with bias and no norm.
        self.num_features = stage_info[-1]['num_chs']
        self.head_hidden_size = num_features
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool)
        self.conv_head = create_conv2d(self.num_features, num_features, 1, bias=True, **dd)
        self.act2 = hard_swish()
        self.flatten = nn.Flatten(1) if global_pool else nn.Identity()
        self.classifier = nn.Linear(num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self._init_weights(zero_init_last)

    def _init_weights(self, zero_init_last: bool) -> None:
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv2d) and not name.endswith(('attn.conv_h', 'attn.conv_w')):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)
            elif zero_init_last and isinstance(m, LKCABlock) and m.has_skip:
                nn.init.zeros_(m.bn3.weight)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups: the stem, then stages (coarse) or blocks (fine); the head falls last."""
        return dict(
            stem=r'^conv_stem|^bn1',
            blocks=r'^blocks\.(\d+)' if coarse else r'^blocks\.(\d+)\.(\d+)',
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them.

        Blocks with nothing to differentiate (frozen, with an input that needs no gradient) run normally:
        checkpointing them would only add recomputation.
        """
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        dd = get_device_dtype(self)  # new layers go where the model is, in its dtype
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool)
            self.flatten = nn.Flatten(1) if global_pool else nn.Identity()
        self.classifier = nn.Linear(self.head_hidden_size, num_classes, **dd) if num_classes > 0 else nn.Identity()
        for m in (self.global_pool, self.flatten, self.classifier):
            m.train(self.training)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and not torch.compiler.is_compiling():
            _check_input(x, self.in_chans)
        x = self.bn1(self.conv_stem(x))
        # Stage by stage, rebinding x: `self.blocks(x)` would keep the 112 px stem output alive to the end.
        for stage in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = _checkpoint_stage(stage, x)
            else:
                x = stage(x)
        return x

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | list[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Features at the `feature_info` levels (the stem, then the last stage of each reduction), timm-style.

        Args:
            x: Image batch (N, C, H, W).
            indices: Levels to take: None for all, an int n for the last n, or a sequence (negative from the end).
            norm: Accepted for timm's signature; there is no final norm to apply.
            stop_early: With ``intermediates_only``, run no stage past the deepest level taken.
            output_fmt: Only 'NCHW'.
            intermediates_only: Return only the list of features.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got '{output_fmt}'")
        take_indices, max_index = _take_indices(len(self.stage_ends), indices)
        take_ends = [self.stage_ends[i] for i in take_indices]
        intermediates = []
        x = self.bn1(self.conv_stem(x))
        if 0 in take_ends:
            intermediates.append(x)
        stages = self.blocks[:self.stage_ends[max_index]] if stop_early and intermediates_only else self.blocks
        for stage_end, stage in enumerate(stages, start=1):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = _checkpoint_stage(stage, x)
            else:
                x = stage(x)
            if stage_end in take_ends:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        x = self.act2(self.conv_head(x))
        x = self.flatten(x)
        if pre_logits:
            return x
        if self.drop_rate > 0.0:
            x = nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        return self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_lkca_mobilenet(variant: str, pretrained: bool = False, **kwargs) -> LKCAMobileNet:
    return build_model_with_cfg(
        LKCAMobileNet,
        variant,
        pretrained,
        pretrained_filter_fn=mobilenetv3_to_lkca,
        feature_cfg=dict(flatten_sequential=True),
        **kwargs,
    )


def _cfg(source: str, **kwargs) -> dict:
    """Pretrained cfg: data settings are the source MobileNetV3's; its ImageNet weights are transplanted."""
    return {
        'hf_hub_id': f'timm/{source}',
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear', 'mean': (0.5, 0.5, 0.5), 'std': (0.5, 0.5, 0.5),
        'first_conv': 'conv_stem', 'classifier': 'classifier', 'license': 'apache-2.0',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'lkca_mobilenet.tf_in1k': _cfg('tf_mobilenetv3_small_100.in1k'),
    'lkca_mobilenet_075.tf_in1k': _cfg('tf_mobilenetv3_small_075.in1k'),
    'lkca_mobilenet_050.lamb_in1k': _cfg(
        'mobilenetv3_small_050.lamb_in1k', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        interpolation='bicubic'),
    'lkca_mobilenet_large.tf_in1k': _cfg('tf_mobilenetv3_large_100.in1k'),
    'lkca_mobilenet_dw3.tf_in1k': _cfg('tf_mobilenetv3_small_100.in1k'),
    'lkca_mobilenet_se.tf_in1k': _cfg('tf_mobilenetv3_small_100.in1k'),
    'lkca_mobilenet_cabn.tf_in1k': _cfg('tf_mobilenetv3_small_100.in1k'),
    'lkca_mobilenet_scconv.tf_in1k': _cfg('tf_mobilenetv3_small_100.in1k'),
})


@register_model
def lkca_mobilenet(pretrained: bool = False, **kwargs) -> LKCAMobileNet:
    """LKCA-MobileNet, MobileNetV3-Small layout, width 1.0."""
    return _create_lkca_mobilenet('lkca_mobilenet', pretrained, **dict(SMALL_HEAD, **kwargs))


@register_model
def lkca_mobilenet_075(pretrained: bool = False, **kwargs) -> LKCAMobileNet:
    """LKCA-MobileNet, MobileNetV3-Small layout, width 0.75."""
    return _create_lkca_mobilenet('lkca_mobilenet_075', pretrained, **dict(SMALL_HEAD, width=0.75, **kwargs))


@register_model
def lkca_mobilenet_050(pretrained: bool = False, **kwargs) -> LKCAMobileNet:
    """LKCA-MobileNet, MobileNetV3-Small layout, width 0.5."""
    # bn_eps: the source, timm's own mobilenetv3_small_050 (LAMB), was trained with PyTorch's BatchNorm eps
    return _create_lkca_mobilenet(
        'lkca_mobilenet_050', pretrained, **dict(SMALL_HEAD, width=0.5, bn_eps=1e-5, **kwargs))


@register_model
def lkca_mobilenet_large(pretrained: bool = False, **kwargs) -> LKCAMobileNet:
    """LKCA-MobileNet, MobileNetV3-Large layout, width 1.0."""
    return _create_lkca_mobilenet('lkca_mobilenet_large', pretrained, stages=LARGE_STAGES, **dict(LARGE_HEAD, **kwargs))


@register_model
def lkca_mobilenet_dw3(pretrained: bool = False, **kwargs) -> LKCAMobileNet:
    """Baseline twin: 3x3 depthwise convs and no attention."""
    return _create_lkca_mobilenet(
        'lkca_mobilenet_dw3', pretrained, **dict(SMALL_HEAD, dw_kernel_size=3, attn_layer=None, **kwargs))


@register_model
def lkca_mobilenet_se(pretrained: bool = False, **kwargs) -> LKCAMobileNet:
    """Ablation twin: MobileNetV3's squeeze-excitation instead of coordinate attention."""
    return _create_lkca_mobilenet('lkca_mobilenet_se', pretrained, **dict(SMALL_HEAD, attn_layer='se', **kwargs))


@register_model
def lkca_mobilenet_cabn(pretrained: bool = False, **kwargs) -> LKCAMobileNet:
    """Ablation twin: BatchNorm instead of GroupNorm in the coordinate attention bottleneck."""
    return _create_lkca_mobilenet('lkca_mobilenet_cabn', pretrained, **dict(SMALL_HEAD, attn_layer='cabn', **kwargs))


@register_model
def lkca_mobilenet_scconv(pretrained: bool = False, **kwargs) -> LKCAMobileNet:
    """Ablation twin: SCConv (SRU + CRU) in the attention slot instead of coordinate attention."""
    return _create_lkca_mobilenet(
        'lkca_mobilenet_scconv', pretrained, **dict(SMALL_HEAD, attn_layer='scconv', **kwargs))
