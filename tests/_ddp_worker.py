"""A torchrun worker for tests/test_pretrain.py: ``python -m fewshot_lkca.pretrain`` plus two test hooks.

Usage: ``torchrun --nproc_per_node 2 tests/_ddp_worker.py DUMP_DIR STOP_RANK STOP_STEP [pretrain options]``

- Every rank saves its own final parameters to ``DUMP_DIR/rank<r>.pt`` (only rank 0 writes the run directory, so
  this is how a test sees that the ranks stayed in sync).
- Rank ``STOP_RANK`` sends itself SIGINT during step ``STOP_STEP`` (1-based; 0 = never), as Ctrl-C would. Every
  rank then writes the exit message to ``DUMP_DIR/stop<r>.txt`` and, in the same process, continues the run with
  ``--resume`` (one launch instead of two keeps the test short). The worker opens the process group itself, so
  both calls share it: opening a second one in the same process races on torchrun's store keys.
"""
import os
import signal
import sys

import torch

import fewshot_lkca.pretrain as pretrain
import fewshot_lkca.pretrain.loop as loop

dump_dir, stop_rank, stop_step = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rank = int(os.environ['RANK'])
params_max_diff, train_step = loop.params_max_diff, loop.train_step
steps_started = []


def dump_then_check(backbone, dist_ctx):
    torch.save({k: v.detach().cpu() for k, v in backbone.state_dict().items()}, f'{dump_dir}/rank{rank}.pt')
    return params_max_diff(backbone, dist_ctx)


def maybe_interrupt_then_step(net, opt, micro, chunks, step, *args, **kwargs):
    # The training loop calls train_step once per step, before its forward pass.
    steps_started.append(step)
    if rank == stop_rank and len(steps_started) == stop_step:
        os.kill(os.getpid(), signal.SIGINT)
    return train_step(net, opt, micro, chunks, step, *args, **kwargs)


loop.params_max_diff = dump_then_check
loop.train_step = maybe_interrupt_then_step
argv = sys.argv[4:]
torch.distributed.init_process_group('gloo')
try:
    pretrain.main(argv)
except SystemExit as stop:
    with open(f'{dump_dir}/stop{rank}.txt', 'w') as f:
        f.write(str(stop.code))
    pretrain.main(['--resume', argv[argv.index('--out') + 1], '--no-progress'])
torch.distributed.destroy_process_group()
