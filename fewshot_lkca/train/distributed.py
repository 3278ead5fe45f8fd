"""Where this process stands in a torchrun job: rank, world size, device (set up by timm's ``timm.utils``)."""
import os
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ['Dist', 'init_distributed', 'params_max_diff']


@dataclass
class Dist:
    """Rank, world size, device, and whether this job opened the process group (and so closes it)."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device('cpu')
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.owns_group:
            torch.distributed.destroy_process_group()


def init_distributed(device: str, distributed: bool = True) -> Dist:
    """Join the torchrun job the environment describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Without those variables (a plain ``python -m``), or with ``distributed=False``, nothing distributed is set up.

    Args:
        device: 'auto' (CUDA when present), 'cpu' or 'cuda'.
    """
    device_type = 'cuda' if device == 'cuda' or (device == 'auto' and torch.cuda.is_available()) else 'cpu'
    if not distributed or int(os.environ.get('WORLD_SIZE', 1)) < 2:
        return Dist(device=torch.device(device_type))
    if torch.distributed.is_initialized():  # the caller opened the group (timm's set-up would open it again)
        local_rank = int(os.environ.get('LOCAL_RANK', 0))
        if device_type == 'cuda':
            torch.cuda.set_device(local_rank)
        where = f'cuda:{local_rank}' if device_type == 'cuda' else 'cpu'
        return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(), torch.device(where))
    from timm.utils import init_distributed_device_so

    info = init_distributed_device_so(device=device_type)  # gloo on CPU, nccl on CUDA; sets the CUDA device
    return Dist(info['global_rank'], info['world_size'], torch.device(info['device']), owns_group=True)


def params_max_diff(module: nn.Module, dist: Dist) -> float:
    """Largest difference of any parameter between this rank and rank 0 (DDP keeps them identical)."""
    if dist.world_size == 1:
        return 0.0
    flat = torch.cat([p.detach().flatten() for p in module.parameters()])
    reference = flat.clone()
    torch.distributed.broadcast(reference, src=0)
    diff = (flat - reference).abs().max().reshape(1)
    torch.distributed.all_reduce(diff, op=torch.distributed.ReduceOp.MAX)
    return diff.item()
