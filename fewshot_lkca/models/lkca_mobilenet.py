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
"""
from dataclasses import dataclass
from functools import partial

import torch
from timm.layers import (
    BatchNormAct2d,
    ConvNormAct,
    DropPath,
    SelectAdaptivePool2d,
    create_conv2d,
    get_act_layer,
    make_divisible,
)
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers import ATTN_LAYERS, create_block_attn
from .transplant import mobilenetv3_to_lkca

__all__ = ['LKCAMobileNet', 'LKCABlock', 'BlockSpec', 'MIN_INPUT_SIZE']

# Five stride-2 stages: smaller inputs collapse to 1x1 before the last stage and the design stops making sense.
MIN_INPUT_SIZE = 32


@dataclass(frozen=True)
class BlockSpec:
    """One block of a stage: MobileNetV3's numbers, before width scaling."""
    exp_ratio: float
    out_chs: int
    stride: int
    act: str  # 'relu' or 'hard_swish'
    attn: bool  # True where MobileNetV3 has squeeze-excitation
    source_kernel: int  # MobileNetV3's depthwise kernel (the transplant zero-pads or crops it)


def _stage(n: int, exp_ratio: float, out_chs: int, stride: int, act: str, attn: bool, kernel: int):
    """``n`` blocks; only the first one strides."""
    return tuple(BlockSpec(exp_ratio, out_chs, stride if i == 0 else 1, act, attn, kernel) for i in range(n))


# MobileNetV3-Small (timm `mobilenetv3_small_100` arch_def), stages as tuples of blocks.
SMALL_STAGES = (
    _stage(1, 1.0, 16, 2, 'relu', True, 3),  # 112 px in
    _stage(1, 4.5, 24, 2, 'relu', False, 3) + _stage(1, 3.67, 24, 1, 'relu', False, 3),  # 56 px in
    _stage(1, 4.0, 40, 2, 'hard_swish', True, 5) + _stage(2, 6.0, 40, 1, 'hard_swish', True, 5),  # 28 px in
    _stage(2, 3.0, 48, 1, 'hard_swish', True, 5),  # 14 px in
    _stage(3, 6.0, 96, 2, 'hard_swish', True, 5),  # 14 px in
)
SMALL_HEAD = dict(last_chs=576, num_features=1024)

# MobileNetV3-Large (timm `mobilenetv3_large_100` arch_def).
LARGE_STAGES = (
    _stage(1, 1.0, 16, 1, 'relu', False, 3),  # 112 px in
    _stage(1, 4.0, 24, 2, 'relu', False, 3) + _stage(1, 3.0, 24, 1, 'relu', False, 3),
    _stage(3, 3.0, 40, 2, 'relu', True, 5),
    _stage(1, 6.0, 80, 2, 'hard_swish', False, 3) + _stage(1, 2.5, 80, 1, 'hard_swish', False, 3)
    + _stage(2, 2.3, 80, 1, 'hard_swish', False, 3),
    _stage(2, 6.0, 112, 1, 'hard_swish', True, 3),
    _stage(3, 6.0, 160, 2, 'hard_swish', True, 5),
)
LARGE_HEAD = dict(last_chs=960, num_features=1280)


class LKCABlock(nn.Module):
    """Inverted residual with a large-kernel depthwise conv and a swappable attention slot.

    With ``exp_ratio == 1`` the expansion is skipped (MobileNetV3's depthwise-separable first block).
    The residual is always taken when ``stride == 1`` and ``in_chs == out_chs`` (no opt-out).
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            stride: int = 1,
            exp_ratio: float = 1.0,
            dw_kernel_size: int = 5,
            act_layer: type[nn.Module] = nn.Hardswish,
            attn_layer: str | None = 'ca',
            bn_eps: float = 1e-3,
            drop_path_rate: float = 0.0,
            pad_type: str = '',
    ):
        super().__init__()
        mid_chs = make_divisible(in_chs * exp_ratio) if exp_ratio != 1.0 else in_chs
        norm_act = partial(BatchNormAct2d, eps=bn_eps, act_layer=act_layer)
        if exp_ratio != 1.0:
            self.conv_pw = create_conv2d(in_chs, mid_chs, 1)
            self.bn1 = norm_act(mid_chs)
        else:
            self.conv_pw = nn.Identity()
            self.bn1 = nn.Identity()
        self.conv_dw = create_conv2d(mid_chs, mid_chs, dw_kernel_size, stride=stride, depthwise=True,
                                     padding=pad_type)
        self.bn2 = norm_act(mid_chs)
        self.attn = create_block_attn(attn_layer, mid_chs)
        self.conv_pwl = create_conv2d(mid_chs, out_chs, 1)
        self.bn3 = BatchNormAct2d(out_chs, eps=bn_eps, apply_act=False)  # linear bottleneck
        self.has_skip = stride == 1 and in_chs == out_chs
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.bn1(self.conv_pw(x))
        x = self.bn2(self.conv_dw(x))
        x = self.attn(x)
        x = self.bn3(self.conv_pwl(x))
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


def _take_indices(num: int, indices: int | list[int] | tuple[int, ...] | None) -> list[int]:
    """timm's convention: None -> all, int n -> last n, sequence -> those (negative from the end)."""
    if indices is None:
        return list(range(num))
    if isinstance(indices, int):
        if not 0 < indices <= num:
            raise ValueError(f'last-n indices must be in 1..{num}, got {indices}')
        return list(range(num - indices, num))
    out = [i + num if i < 0 else i for i in indices]
    if any(not 0 <= i < num for i in out):
        raise ValueError(f'feature indices {list(indices)} out of range for {num} features')
    return out


class LKCAMobileNet(nn.Module):
    """MobileNetV3-layout network of `LKCABlock`s with timm's model contract.

    Args:
        stages: Tuple of stages, each a tuple of `BlockSpec` (see `SMALL_STAGES`).
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
    ):
        super().__init__()
        if not isinstance(in_chans, int) or in_chans < 1:
            raise ValueError(f'in_chans must be a positive int, got {in_chans!r}')
        if attn_layer is not None and attn_layer not in ATTN_LAYERS:
            raise ValueError(f"attn_layer must be one of {sorted(ATTN_LAYERS)} or None, got '{attn_layer}'")
        if dw_kernel_size % 2 == 0 or dw_kernel_size < 1:
            raise ValueError(f'dw_kernel_size must be a positive odd number, got {dw_kernel_size}')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        hard_swish = get_act_layer('hard_swish')
        acts = {'relu': nn.ReLU, 'hard_swish': hard_swish}

        def scale(c: int) -> int:
            return make_divisible(c * width)

        stem_chs = stem_chs if width < 0.75 else scale(stem_chs)
        if pad_type not in ('', 'same'):
            raise ValueError(f"pad_type must be '' or 'same', got '{pad_type}'")
        self.conv_stem = create_conv2d(in_chans, stem_chs, 3, stride=2, padding=pad_type)
        self.bn1 = BatchNormAct2d(stem_chs, eps=bn_eps, act_layer=hard_swish)
        self.feature_info = [dict(num_chs=stem_chs, reduction=2, module='bn1')]

        num_blocks = sum(len(s) for s in stages)
        dpr = [drop_path_rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]
        in_chs, reduction, block_idx = stem_chs, 2, 0
        stage_modules = []
        for stage_idx, stage in enumerate(stages):
            blocks = []
            for spec in stage:
                out_chs = scale(spec.out_chs)
                blocks.append(LKCABlock(
                    in_chs, out_chs, stride=spec.stride, exp_ratio=spec.exp_ratio, dw_kernel_size=dw_kernel_size,
                    act_layer=acts[spec.act], attn_layer=attn_layer if spec.attn else None, bn_eps=bn_eps,
                    drop_path_rate=dpr[block_idx], pad_type=pad_type))
                in_chs, reduction, block_idx = out_chs, reduction * spec.stride, block_idx + 1
            stage_modules.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=in_chs, reduction=reduction, module=f'blocks.{stage_idx}'))
        last_chs = scale(last_chs)
        stage_modules.append(nn.Sequential(ConvNormAct(
            in_chs, last_chs, 1, norm_layer=nn.BatchNorm2d, norm_kwargs=dict(eps=bn_eps), act_layer=hard_swish)))
        self.feature_info.append(dict(num_chs=last_chs, reduction=reduction, module=f'blocks.{len(stages)}'))
        self.blocks = nn.Sequential(*stage_modules)
        # timm reports one feature per reduction level: keep the last module of each.
        info = self.feature_info
        self.feature_info = [f for i, f in enumerate(info)
                             if i + 1 == len(info) or info[i + 1]['reduction'] != f['reduction']]

        # MobileNetV3's efficient head: pool first, then a 1x1 conv with bias and no norm.
        self.num_features = last_chs
        self.head_hidden_size = num_features
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool)
        self.conv_head = create_conv2d(last_chs, num_features, 1, bias=True)
        self.act2 = hard_swish()
        self.flatten = nn.Flatten(1) if global_pool else nn.Identity()
        self.classifier = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()
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
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool)
            self.flatten = nn.Flatten(1) if global_pool else nn.Identity()
        self.classifier = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.unused
    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f'expected an image batch of shape (N, C, H, W), got a {x.ndim}-D tensor {tuple(x.shape)}')
        if x.shape[1] != self.in_chans:
            raise ValueError(f'model takes {self.in_chans}-channel images (in_chans={self.in_chans}), '
                             f'got {x.shape[1]} channels')
        if min(x.shape[-2:]) < MIN_INPUT_SIZE:
            raise ValueError(f'input {tuple(x.shape[-2:])} is too small to downsample 32x: '
                             f'use at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} px')

    @torch.jit.ignore
    def _run_stage(self, stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if not (self.grad_checkpointing and torch.is_grad_enabled()):
            return stage(x)
        for block in stage:
            needs_grad = x.requires_grad or any(p.requires_grad for p in block.parameters())
            x = checkpoint(block, x, use_reentrant=False) if needs_grad else block(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and not torch.compiler.is_compiling():
            self._check_input(x)
        x = self.bn1(self.conv_stem(x))
        # Stage by stage, rebinding x: `self.blocks(x)` would keep the 112 px stem output alive to the end.
        if self.grad_checkpointing and not torch.jit.is_scripting():
            for stage in self.blocks:
                x = self._run_stage(stage, x)
        else:
            for stage in self.blocks:
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
        """Features at the `feature_info` levels (stem, then the last block of each reduction), timm-style."""
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got '{output_fmt}'")
        take = _take_indices(len(self.feature_info), indices)
        wanted = {self.feature_info[i]['module'] for i in take}
        last_wanted = self.feature_info[max(take)]['module']
        intermediates = []
        x = self.bn1(self.conv_stem(x))
        if 'bn1' in wanted:
            intermediates.append(x)
        for stage_idx, stage in enumerate(self.blocks):
            if stop_early and intermediates_only and len(intermediates) == len(take):
                break
            x = self._run_stage(stage, x)
            if f'blocks.{stage_idx}' in wanted:
                intermediates.append(x)
            if stop_early and intermediates_only and f'blocks.{stage_idx}' == last_wanted:
                break
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
