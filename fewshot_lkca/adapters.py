"""Task-specific residual adapters (Li et al., CVPR 2022): a zero-initialised 1x1 conv beside each trainable block.

The adapter of a block reads the block's input and adds its output to the block's: ``block(x) + A(x)``, with ``A`` a
1x1 conv from the block's input to its output channels (strided like the block). ``A`` starts at zero, so before the
first step the network is exactly the pretrained one and the cosine head from the prototypes is ProtoNet; training
changes ``A`` (and the head) only, a few thousand weights per block, while every pretrained weight stays as it was.

The adapter hangs off its block as the submodule ``adapter`` and joins the block's output through a forward hook, so
the pretrained weights keep their checkpoint keys and a checkpoint gains ``<block>.adapter.weight`` tensors only:
`restore_adapters` rebuilds them from those keys when a checkpoint is loaded (for export, or as a starting point).
"""
import torch
from torch import nn

__all__ = ['ADAPTER_KEY', 'add_adapters', 'restore_adapters', 'adapter_blocks']

ADAPTER_KEY = '.adapter.weight'


def _add_adapter_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output + module.adapter(args[0])


def _attach(block: nn.Module, in_chs: int, out_chs: int, stride: int) -> None:
    weight = next(block.parameters())
    block.adapter = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False, device=weight.device, dtype=weight.dtype)
    nn.init.zeros_(block.adapter.weight)
    block.register_forward_hook(_add_adapter_output)


def adapter_blocks(backbone: nn.Module, frozen: set[str]) -> list[str]:
    """Names of the blocks (children of the backbone's stages ``blocks.<i>``) none of whose parameters is frozen."""
    names = []
    for stage_name, stage in backbone.blocks.named_children():
        for block_name, block in stage.named_children():
            name = f'blocks.{stage_name}.{block_name}'
            params = [f'{name}.{p}' for p, _ in block.named_parameters()]
            if params and not any(p in frozen for p in params):
                names.append(name)
    return names


@torch.no_grad()
def add_adapters(backbone: nn.Module, names: list[str], image_size: int) -> int:
    """Attach a zero adapter to each named block; its channels come from one probe pass at ``image_size``, its
    stride is the block's. Returns the number of adapter weights."""
    shapes, hooks = {}, []
    for name in names:
        hooks.append(backbone.get_submodule(name).register_forward_hook(
            lambda m, args, out, name=name: shapes.__setitem__(name, (args[0].shape, out.shape))))
    was_training = backbone.training
    weight = next(backbone.parameters())
    backbone.eval()(torch.zeros(1, 3, image_size, image_size, device=weight.device, dtype=weight.dtype))
    backbone.train(was_training)
    for hook in hooks:
        hook.remove()
    total = 0
    for name in names:
        (_, c_in, _, _), (_, c_out, _, _) = shapes[name]
        block = backbone.get_submodule(name)
        _attach(block, c_in, c_out, _stride_of(block))
        total += c_in * c_out
    return total


def restore_adapters(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str = '') -> None:
    """Recreate the adapters a state dict holds (keys ``<prefix><block>.adapter.weight``), before loading it."""
    for key, weight in tensors.items():
        if key.startswith(prefix) and key.endswith(ADAPTER_KEY):
            block = module.get_submodule(key[len(prefix):-len(ADAPTER_KEY)])
            if not hasattr(block, 'adapter'):
                out_chs, in_chs = weight.shape[:2]
                _attach(block, in_chs, out_chs, _stride_of(block))


def _stride_of(block: nn.Module) -> int:
    """A block's stride: the largest stride of its convs (the depthwise one in an inverted residual)."""
    strides = [m.stride[0] for m in block.modules() if isinstance(m, nn.Conv2d)]
    return max(strides, default=1)
