"""Base-class pretraining: ``python -m fewshot_lkca.pretrain``, the honest starting point of few-shot fine-tuning.

A backbone learns on the *base* classes of a data set card; the novel classes (the few-shot tasks) are never seen,
and model selection uses the card's *val* classes only: every ``eval_every`` steps, nearest-class-mean (NCM) episode
accuracy on the val split decides ``best.safetensors``; ``last.safetensors`` is the latest state. Both are what
``finetune --weights`` and ``evaluate --weights`` take.

Methods (``--method``):

- ``supervised``: cross-entropy over all base classes (label smoothing, random mirror), AdamW, warm-up + cosine.
- ``episodic``: prototypical meta-training (Snell et al., NeurIPS 2017): N-way K-shot episodes of the base classes,
  loss = cross-entropy of the negative squared Euclidean distances of the queries to the class prototypes.
- ``both``: the two losses summed each step (``episodic_weight`` scales the episodic one).

The same command scales out unchanged under ``torchrun`` (one or many nodes): DistributedDataParallel (gloo on CPU,
nccl on GPU), a step-indexed distributed sampler, logging and checkpoints on rank 0 only. ``batch_size`` and
``episodes_per_step`` are *global*: each step's samples are split into ``world_size x accum_steps`` equal chunks,
rank r trains on chunks ``r * accum_steps ...``, one micro-batch per chunk. The samples of step t are a function of
(seed, t) alone, so a resumed run replays the same batches, and 2 processes x batch b see exactly the samples of
1 process x batch 2b in 2 micro-batches (``accum_steps=2``).

BatchNorm under DDP: on GPUs (``sync_bn``, default) the statistics are synchronised over the global batch
(SyncBatchNorm), so results do not depend on the GPU count. torch has no CPU SyncBatchNorm: with gloo every rank
normalises its own chunk, exactly as one process does with ``accum_steps = world_size``.

Examples::

    python -m fewshot_lkca.pretrain                                   # look-alike base classes, supervised
    python -m fewshot_lkca.pretrain --recipe pretrain_episodic
    torchrun --nproc_per_node 4 -m fewshot_lkca.pretrain --data omniglot --steps=5000
    python -m fewshot_lkca.pretrain --resume runs/lookalike-lkca_mobilenet-pretrain-supervised-seed0
    python -m fewshot_lkca.finetune --weights runs/lookalike-lkca_mobilenet-pretrain-supervised-seed0/best.safetensors
"""
from .cache import base_pretrained, cache_dir
from .cli import build_parser, main
from .config import PretrainConfig
from .loop import pretrain_command
from .sampling import StepSampler

__all__ = ['PretrainConfig', 'pretrain_command', 'base_pretrained', 'cache_dir', 'StepSampler', 'build_parser', 'main']
