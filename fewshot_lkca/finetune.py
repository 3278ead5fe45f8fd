"""Few-shot fine-tuning, the main job: ``python -m fewshot_lkca.finetune --shots 5``.

A task is ``n_way`` classes of a data set's novel split with ``k_shot`` labelled images each (the support set).
The run fine-tunes a backbone on the support set with a memory-lean recipe, then classifies the held-out images of
the same classes: ``eval_episodes`` random draws of ``n_query`` images per class give the accuracy's mean and 95%
confidence interval. Everything lands in a run directory: the resolved config, a JSONL log of every step,
``metrics.json``, plots, and the checkpoint as safetensors with class names and preprocessing.

Examples::

    python -m fewshot_lkca.finetune                       # built-in look-alike set, 5-way 5-shot
    python -m fewshot_lkca.finetune --shots 1 --recipe lean_1shot
    python -m fewshot_lkca.finetune --data path/to/folders --ways 3 --shots 5 --lr=0.005
    python -m fewshot_lkca.finetune --resume runs/lookalike-lkca_mobilenet-5w5s-seed0
"""
import argparse
import copy
import dataclasses
import logging
import sys
import time
from pathlib import Path

import torch
from torch import nn

from .adapters import adapter_blocks, add_adapters
from .checkpoint import CheckpointError, model_args, save_checkpoint
from .config import ConfigError, FinetuneConfig, config_for_command, parse_cli
from .errors import DataError, os_error
from .estimate import cross_validate, estimate_metrics, plan_estimate
from .freezing import freeze_groups, frozen_parameter_names, set_batchnorm_eval
from .heads import CosineHead, FewShotClassifier
from .metadata import preprocessing
from .models.factory import BackboneError
from .probe import guard_trunk
from .report import evaluate_task, plot_run, predict_pool, summary, task_line
from .rundir import (
    METRICS_FILE,
    MODEL_FILE,
    STATE_FILE,
    RunDir,
    RunError,
    add_run_arguments,
    load_state,
    new_run,
    open_resumed,
    save_state,
)
from .seeding import derive_seed
from .starting_point import start_backbone
from .task import Task, build_task, default_out, load_images, protocol
from .threads import set_threads
from .train import balanced_weights, create_optimizer, create_scheduler

__all__ = ['build_parser', 'finetune_command', 'main', 'build_classifier', 'set_trainable', 'train_mode',
           'make_optimizer', 'train_step']

_logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------ the model
def set_trainable(model: FewShotClassifier, cfg: FinetuneConfig, image_size: int) -> None:
    """The recipe's trainable parameters: the head always; the trunk past ``frozen_groups`` when fine-tuning (only
    its biases and norm scales and shifts with ``train_params='bias_norm'``, as TinyTL; only new zero-initialised
    residual adapters beside its blocks with ``train_params='adapters'``, `fewshot_lkca.adapters`)."""
    backbone = model.backbone
    if cfg.method != 'finetune':
        backbone.requires_grad_(False)
    elif cfg.train_params == 'adapters':
        names = adapter_blocks(backbone, frozen_parameter_names(backbone, cfg.frozen_groups))
        backbone.requires_grad_(False)
        add_adapters(backbone, names, image_size)  # new parameters: trainable
    else:
        freeze_groups(backbone, cfg.frozen_groups)
        if cfg.train_params == 'bias_norm':
            for p in backbone.parameters():
                p.requires_grad_(p.requires_grad and p.ndim == 1)
    if cfg.grad_checkpointing and hasattr(backbone, 'set_grad_checkpointing'):
        backbone.set_grad_checkpointing(True)


def train_mode(model: FewShotClassifier, cfg: FinetuneConfig) -> None:
    """Train mode, except BatchNorm statistics of the trunk when frozen (2-4 images make noisy statistics)."""
    model.train()
    if cfg.freeze_bn_stats or cfg.method != 'finetune':
        set_batchnorm_eval(model.backbone)


def build_classifier(backbone: nn.Module, support, support_y: torch.Tensor, cfg: FinetuneConfig) -> FewShotClassifier:
    """Backbone + cosine head (from the support set's prototypes, unless ``head_init='random'``); ``support``: the
    support images as one tensor, or an iterable of batches (`_batches`: never all of them in memory at once)."""
    feature_dim = getattr(backbone, 'head_hidden_size', None) or backbone.num_features  # pre-logits width
    model = FewShotClassifier(backbone, CosineHead(feature_dim, cfg.n_way, scale=cfg.head_scale), cfg.mirror_views)
    if cfg.head_init == 'prototypes':
        model.head.init_from_prototypes(_features(model, support, cfg.eval_batch_size), support_y)
    return model


def _batches(task: Task, indices: list[int], transform, batch_size: int):
    """Images ``indices`` of the task's data set through ``transform``, ``batch_size`` at a time (re-iterable)."""
    return [lambda i=i: load_images(task.dataset, indices[i:i + batch_size], transform)
            for i in range(0, len(indices), batch_size)]


@torch.no_grad()
def _features(model: FewShotClassifier, images, batch_size: int) -> torch.Tensor:
    """What the head reads (both views' with ``mirror_views``), in eval mode: of a tensor, ``batch_size`` images at a
    time, or of `_batches`."""
    model.eval()
    if isinstance(images, torch.Tensor):
        return torch.cat([model.features(images[i:i + batch_size]).float() for i in range(0, len(images), batch_size)])
    return torch.cat([model.features(load()).float() for load in images])


def train_step(model: FewShotClassifier, opt: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
               cfg: FinetuneConfig, weight: torch.Tensor | None = None) -> tuple[float, float]:
    """One optimizer step on ``images``, in micro-batches of ``batch_size`` whose gradients add up (so memory is that
    of one micro-batch); ``weight``: per-class loss weights (`balanced_weights`). Returns (loss, accuracy)."""
    train_mode(model, cfg)
    opt.zero_grad(set_to_none=True)
    total, right = 0.0, 0
    for start in range(0, len(images), cfg.batch_size):
        x, y = images[start:start + cfg.batch_size], labels[start:start + cfg.batch_size]
        logits = model(x)
        losses = nn.functional.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing, reduction='none')
        if weight is not None:
            losses = losses * weight[y]
        (losses.sum() / len(images)).backward()
        total += losses.sum().item()
        right += int((logits.argmax(1) == y).sum())
    opt.step()
    return total / len(images), right / len(images)


def _support_transform(backbone: nn.Module, augment: str, size: int, eval_tf):
    """The training transform of the support images (``augment='none'``: their evaluation transform)."""
    from .data import mirror_transform, train_transform

    choices = dict(mirror=mirror_transform, strong=train_transform)
    return choices[augment](backbone, size=size) if augment in choices else eval_tf


# ------------------------------------------------------------------------------------------------ fitting
def make_optimizer(model: FewShotClassifier, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """The head at ``lr * head_lr_scale`` (it is new), the trainable trunk at ``lr``."""
    trunk = [p for p in model.backbone.parameters() if p.requires_grad]
    groups = [dict(params=list(model.head.parameters()), lr=cfg.lr * cfg.head_lr_scale)]
    if trunk:
        groups.append(dict(params=trunk, lr=cfg.lr))
    return create_optimizer(groups, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum)


def _save_state(run: RunDir | None, model, opt, step: int, meta: dict) -> None:
    """train_state.pt (model, optimizer, step: one atomic file, all --resume reads), then model.safetensors."""
    if run is None:  # a model of the accuracy estimate: nothing to resume
        return
    state = model.state_dict()
    save_state(run, step=step, model=state, optimizer=opt.state_dict())
    save_checkpoint(run.path(MODEL_FILE), state, dict(meta, step=step))


def fit(cfg: FinetuneConfig, backbone: nn.Module, task: Task, eval_tf, run: RunDir | None = None,
        resume: dict | None = None, meta: dict | None = None, progress: bool = False, log=print) -> tuple:
    """The recipe on ``task``'s support set: the prototype head, then the linear probe or training (guarded).

    ``run``: the run directory that logs and checkpoints, None for a model of the accuracy estimate
    (`fewshot_lkca.estimate`), which keeps nothing; ``resume``: the run's saved state (`fewshot_lkca.rundir.load_state`)
    to continue from. Returns the model and what to report of it.
    """
    start_step = int(resume['step']) if resume else 0
    support_y = torch.tensor(task.support_y)
    support = _batches(task, task.support_idx, eval_tf, cfg.eval_batch_size)
    model = build_classifier(backbone, support, support_y, cfg)
    weight = balanced_weights(support_y, model.head.weight.shape[0])
    steps = cfg.steps if cfg.method != 'protonet' else 0
    if cfg.method == 'linear_probe':  # a frozen backbone: the head trains on the support set's features, cached
        return model, _probe(model, support, support_y, cfg, log)
    set_trainable(model, cfg, task.image_size)
    start = {k: v.clone() for k, v in model.state_dict().items()}  # what the guard falls back to (adapters at 0)
    opt = make_optimizer(model, cfg)
    if resume:
        try:
            model.load_state_dict(resume['model'])
            opt.load_state_dict(resume['optimizer'])
        except (RuntimeError, ValueError, KeyError) as e:
            raise RunError(f'{run.path(STATE_FILE)} does not fit this run ({str(e).splitlines()[0][:120]}); start it '
                           'again with --overwrite') from None
        log(f'resuming at step {start_step} of {steps}')
    if run is not None:
        run.trim_log(start_step)  # records past the saved step are replayed
    train_tf = _support_transform(backbone, cfg.augment, task.image_size, eval_tf)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    views = ', each image and its mirror image' if cfg.mirror_views else ''
    if steps == 0:
        log(f'recipe: {cfg.method}: the class prototypes of the support set{views}, no training')
    else:
        what = cfg.method + (f' ({cfg.train_params})' if cfg.method == 'finetune' and cfg.train_params != 'all' else '')
        log(f'recipe: {what}, {trainable / 1e6:.3f} M trainable parameters, batch {cfg.batch_size}, {steps} '
            f'steps' + (f', first {cfg.frozen_groups} parameter groups frozen' if cfg.method == 'finetune' else '')
            + views)
    losses = _train(model, opt, task, cfg, run, (start_step, steps), (train_tf, support_y, weight), meta, progress)
    if run is not None:
        losses = [r['loss'] for r in run.records()]  # with the steps before a resume
    guard = (guard_trunk(model, start, lambda: _features(model, support, cfg.eval_batch_size), support_y, losses, log)
             if cfg.guard and steps else None)
    if run is not None and guard is not None and guard['kept'] == 'prototypes':
        save_checkpoint(run.path(MODEL_FILE), model.state_dict(), dict(meta, step=0, guard='reverted'))
    return model, dict(trainable_parameters=trainable, steps=steps, guard=guard)


def _train(model: FewShotClassifier, opt, task: Task, cfg: FinetuneConfig, run: RunDir | None, span: tuple,
           labels: tuple, meta: dict, progress: bool) -> list[float]:
    """Steps ``span = (start, end)`` on the support set, logged, checkpointed, resumable after Ctrl-C (with a run);
    returns the losses of these steps."""
    from tqdm.auto import tqdm

    (step, steps), (train_tf, support_y, weight) = span, labels
    scheduler = create_scheduler(opt, steps, cfg.warmup_steps) if steps else None
    losses = []
    try:
        bar = tqdm(total=steps, initial=step, desc='fine-tuning', disable=not progress or steps == 0, unit='step')
        while step < steps:
            # Everything random at step t comes from (seed, t): a resumed run replays the same batches.
            g = torch.Generator().manual_seed(derive_seed(cfg.seed, step))
            torch.manual_seed(derive_seed(cfg.seed, step))
            if hasattr(train_tf, 'set_random_seed'):
                train_tf.set_random_seed(derive_seed(cfg.seed, step))
            # accumulate: every support image each step, in micro-batches; else one random micro-batch per step
            batch = torch.randperm(len(task.support_idx), generator=g)[:None if cfg.accumulate else cfg.batch_size]
            images = load_images(task.dataset, [task.support_idx[i] for i in batch], train_tf)
            scheduler.step_update(step)
            loss, batch_acc = train_step(model, opt, images, support_y[batch], cfg, weight)
            step += 1
            losses.append(loss)
            if run is not None:
                run.log(dict(step=step, loss=round(loss, 5), lr=opt.param_groups[0]['lr'], batch_acc=batch_acc,
                             time=time.time()))
            bar.update(1)
            bar.set_postfix(loss=f'{loss:.3f}')
            if step % cfg.checkpoint_every == 0 or step == steps:
                _save_state(run, model, opt, step, meta)
        bar.close()
    except KeyboardInterrupt:
        if run is None:
            raise
        _save_state(run, model, opt, step, meta)
        raise SystemExit(f'\ninterrupted at step {step}; continue with: python -m fewshot_lkca.finetune '
                         f'--resume {run.root}') from None
    if steps == 0:
        _save_state(run, model, opt, 0, meta)
    return losses


def _probe(model: FewShotClassifier, support, support_y: torch.Tensor, cfg: FinetuneConfig, log) -> dict:
    """The linear probe: the cosine head trained on cached support features, kept if the guard agrees."""
    from .probe import fit_head, guard_head

    features = _features(model, support, cfg.eval_batch_size)
    n_classes = model.head.weight.shape[0]
    fit = dict(lr=cfg.lr * cfg.head_lr_scale, scale=cfg.head_scale, label_smoothing=cfg.label_smoothing,
               anchor=cfg.probe_anchor)
    guard = guard_head(features, support_y, n_classes, cfg.steps, **fit) if cfg.guard and cfg.steps else None
    if guard is None or guard['kept'] == 'trained':
        model.head = fit_head(features, support_y, n_classes, cfg.steps, **fit)
    if guard is not None:
        log(f'guard: kept the {guard["kept"]} head ({guard["reason"]})')
    trainable = sum(p.numel() for p in model.head.parameters())
    log(f'recipe: linear_probe, {trainable / 1e6:.3f} M trainable parameters on cached features, {cfg.steps} '
        'full-batch steps')
    return dict(trainable_parameters=trainable, steps=cfg.steps, guard=guard)


# ------------------------------------------------------------------------------------------------ the run
def _open_run(cfg: FinetuneConfig, resume: Path | None, overwrite: bool) -> tuple[FinetuneConfig, RunDir]:
    """The config and run directory: a new run (checked, not yet written) or a resumed one."""
    if resume is None:
        shape = 'all' if protocol(cfg) == 'all' else f'{cfg.n_way}w{cfg.k_shot}s'
        out = cfg.out or default_out(cfg.data, cfg.model, shape, cfg.method, f'seed{cfg.seed}')
        cfg = dataclasses.replace(cfg, out=str(out))
        return cfg, new_run(cfg.out, overwrite)
    return open_resumed(resume, FinetuneConfig)


def finetune_command(cfg: FinetuneConfig, resume: Path | None = None, overwrite: bool = False,
                     progress: bool = True, log=print) -> dict:
    """Run (or resume) one fine-tuning job; returns the metrics written to ``metrics.json``.

    The run directory is locked for the job's life (`fewshot_lkca.rundir.RunDir.lock`); it is written only once the
    data and the starting point have loaded, so a start that fails leaves nothing that blocks the retry.
    """
    cfg, run = _open_run(cfg, resume, overwrite)
    with run.lock():
        return _run(cfg, run, resume, progress, log)


def _run(cfg: FinetuneConfig, run: RunDir, resume: Path | None, progress: bool, log) -> dict:
    from .data import eval_transform

    state = load_state(run) if resume is not None else None  # a damaged file: one line, before any work
    if resume is not None and state is None:
        log(f'{run.path(STATE_FILE)} is missing: nothing to resume from, training again from step 0')
    torch.manual_seed(cfg.seed)
    task = build_task(cfg)  # bad data fails here, before a run directory is written
    if task.protocol == 'all':
        cfg = dataclasses.replace(cfg, protocol='all', n_way=len(task.class_names))
    log(task_line(cfg, task))
    backbone, origin = start_backbone(cfg, task.image_size, log, progress)
    log(f'weights: {origin}')
    if resume is None:
        run.start(cfg)
    eval_tf = eval_transform(backbone, size=task.image_size)
    meta = dict(model=cfg.model, model_args=model_args(backbone), classes=task.class_names,
                **preprocessing(backbone.pretrained_cfg, task.image_size),
                weights=origin, data=cfg.data, mirror_views=cfg.mirror_views)
    plan = plan_estimate(task, cfg.seed) if task.protocol == 'all' else None
    scored = None
    if plan is not None and plan.folds:  # models of the estimate first: each from its own copy of the start
        def fit_and_predict(sub: Task) -> torch.Tensor:
            model, _ = fit(cfg, copy.deepcopy(backbone), sub, eval_tf, log=lambda *_: None)
            return predict_pool(model, sub, eval_tf, cfg.eval_batch_size)

        scored = cross_validate(task, plan, fit_and_predict, log)
    model, extra = fit(cfg, backbone, task, eval_tf, run, state, meta, progress, log)
    if plan is not None and scored is None:  # train/val: the delivered model classifies val
        scored = predict_pool(model, task, eval_tf, cfg.eval_batch_size, progress), torch.tensor(task.pool_y)
    metrics = (estimate_metrics(*scored, task, plan) if plan is not None else
               evaluate_task(model, task, cfg, eval_tf, progress))
    return _finish(model, metrics, extra, task, cfg, run, meta, origin, log)


def _finish(model: FewShotClassifier, metrics: dict, extra: dict, task: Task, cfg: FinetuneConfig, run: RunDir,
            meta: dict, origin: str, log) -> dict:
    """Write the checkpoint, metrics.json and the PNGs, print the summary, export: the end of every recipe."""
    if not run.path(MODEL_FILE).is_file() or extra.get('guard') is not None or cfg.method == 'linear_probe':
        save_checkpoint(run.path(MODEL_FILE), model.state_dict(), dict(meta, step=extra['steps']))
    metrics.update(weights=origin, run_dir=str(run.root), **extra)
    plot_run(run, metrics, task.class_names, log)
    run.write_json(METRICS_FILE, metrics)
    run.path(STATE_FILE).unlink(missing_ok=True)  # optimizer state is only for resuming
    summary(metrics, cfg, run, log)
    if cfg.export:  # after metrics.json: a failed export is a warning, never a lost run
        from .export import export_after_finetune
        export_after_finetune(run.root, cfg.export, task=task, log=log)
    return metrics


# ------------------------------------------------------------------------------------------------ the CLI
def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog='fewshot-lkca finetune', description=__doc__.splitlines()[0],
        epilog='Any recipe field can be set with --key=value, e.g. --lr=0.005 --frozen_groups=3.')
    parser.add_argument('--ways', type=int, dest='n_way', help='classes in the task (n_way)')
    parser.add_argument('--shots', type=int, dest='k_shot', help='labelled images per class (k_shot)')
    parser.add_argument('--queries', type=int, dest='n_query', help='held-out images per class per episode')
    parser.add_argument('--data', help='data set card name (lookalike, omniglot, ...) or an image-folder path')
    parser.add_argument('--recipe', help='recipe name in recipes/ or a YAML file (default: the dataclass defaults)')
    parser.add_argument('--model', help='backbone name (timm)')
    parser.add_argument('--weights', help="'auto' (default), 'base', 'imagenet', 'random', or a checkpoint / source "
                                          'state_dict path')
    add_run_arguments(parser, 'runs/<data>-<model>-<ways>w<shots>s-<method>-seed<seed>')
    return parser


def _parse(argv: list[str]) -> tuple[argparse.Namespace, dict[str, str]]:
    return parse_cli(build_parser(), argv,
                     named=('n_way', 'k_shot', 'n_query', 'data', 'model', 'weights', 'out', 'seed'))


def main(argv: list[str] | None = None) -> None:
    from .console import quiet_console

    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, overrides = _parse(argv)
        cfg = config_for_command(args.recipe, overrides, args.resume)
        set_threads(args.threads)
        with quiet_console():
            finetune_command(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    except (ConfigError, RunError, CheckpointError, BackboneError, DataError) as e:
        raise SystemExit(f'error: {e}') from None
    except KeyboardInterrupt:  # before training started (training saves and says how to resume)
        raise SystemExit('interrupted before training started: nothing to resume') from None
    except OSError as e:  # a full disk, an unwritable --out, a folder under a file
        raise SystemExit(f'error: {os_error(e)}') from None


if __name__ == '__main__':
    main()
