"""The pretraining job: data, model, the step loop with validation and checkpoints, and the final metrics."""
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import model_args, save_checkpoint
from ..metadata import preprocessing
from ..models import create_backbone
from ..rundir import (
    BEST_FILE,
    CURVE_FILE,
    LAST_FILE,
    LOG_FILE,
    METRICS_FILE,
    STATE_FILE,
    RunDir,
    load_state,
    new_run,
    open_resumed,
    save_state,
)
from ..seeding import derive_seed
from ..task import default_out
from ..train import Dist, StopRequest, create_optimizer, create_scheduler, init_distributed, prototypical_loss
from ..train.distributed import params_max_diff
from .config import PretrainConfig
from .distill import VIEWS_PER_PHOTO, distill_net, distill_transform, net_module
from .sampling import STEP, PretrainData, StepData, load_data

__all__ = ['pretrain_command']

_logger = logging.getLogger(__name__)

class _Net(nn.Module):
    """One forward per micro-batch (as DDP needs): logits of the first ``n_sup`` images, pre-logits of the rest."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor, n_sup: int):
        fmap = self.backbone.forward_features(images)
        logits = self.backbone.forward_head(fmap[:n_sup]) if n_sup else None
        features = self.backbone.forward_head(fmap[n_sup:], pre_logits=True) if n_sup < len(images) else None
        return logits, features


def _micro_loss(net: nn.Module, micro: dict, cfg: PretrainConfig, device: torch.device,
                step: int) -> tuple[torch.Tensor, float]:
    """Loss and accuracy (supervised batch accuracy, episode query accuracy, or agreement with the teacher)."""
    images, labels = micro['images'].to(device, non_blocking=True), micro['labels'].to(device)
    if cfg.distill:
        loss, agreement = net(images, step < cfg.local_steps)
        return loss, agreement.item()
    n_sup = len(labels)
    logits, features = net(images, n_sup)
    loss, acc = images.new_zeros(()), 0.0
    if n_sup:
        loss = nn.functional.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
        acc = (logits.argmax(1) == labels).float().mean().item()
    if micro['episodes']:
        start, losses, accs = 0, [], []
        for support_y, query_y in micro['episodes']:
            n_s, n_q = len(support_y), len(query_y)
            ep_loss, ep_acc = prototypical_loss(features[start:start + n_s], support_y.to(device),
                                                features[start + n_s:start + n_s + n_q], query_y.to(device), cfg.n_way)
            losses.append(ep_loss)
            accs.append(ep_acc.item())
            start += n_s + n_q
        weight = cfg.episodic_weight if n_sup else 1.0
        loss = loss + weight * torch.stack(losses).mean()
        acc = acc if n_sup else sum(accs) / len(accs)
    return loss, acc


def train_step(net: nn.Module, opt: torch.optim.Optimizer, micro_batches: list[dict], chunks: list[int], step: int,
               cfg: PretrainConfig, device: torch.device) -> torch.Tensor:
    """One optimizer step over this rank's micro-batches; returns [mean loss, mean accuracy, 0] on ``device``."""
    net.train()
    opt.zero_grad(set_to_none=True)
    totals = torch.zeros(3, device=device)  # loss, accuracy, and a slot for the stop request (collectives on device)
    for a, micro in enumerate(micro_batches):
        torch.manual_seed(derive_seed(cfg.seed, STEP, step, chunks[a]))  # dropout and the like: the same on resume
        # DDP averages gradients over ranks on the last micro-batch only; before it, they accumulate locally.
        last = a == len(micro_batches) - 1
        with contextlib.nullcontext() if last or not hasattr(net, 'no_sync') else net.no_sync():
            loss, acc = _micro_loss(net, micro, cfg, device, step)
            (loss / cfg.accum_steps).backward()
        totals[0] += loss.item() / cfg.accum_steps
        totals[1] += acc / cfg.accum_steps
    opt.step()
    return totals


def _build_backbone(cfg: PretrainConfig, n_classes: int) -> tuple[nn.Module, str]:
    """The backbone to train (with a classifier of the base classes, or the teacher's) and its weights' origin."""
    from ..checkpoint import load_backbone

    torch.manual_seed(cfg.seed)  # the same initialisation on every rank (DDP also broadcasts rank 0's)
    classes = n_classes if cfg.supervised or cfg.distill else 0
    kwargs = dict(pad_type=cfg.pad_type) if cfg.pad_type else {}
    if cfg.weights == 'random':
        return create_backbone(cfg.model, num_classes=classes, **kwargs), f'{cfg.model}, random initialisation'
    backbone, _, origin = load_backbone(cfg.model, cfg.weights, **kwargs)
    backbone.reset_classifier(classes)
    return backbone, origin


def _val_accuracy(net: nn.Module, backbone: nn.Module, val, transform, cfg: PretrainConfig,
                  device: torch.device) -> dict:
    """Mean and 95% CI of NCM episode accuracy on the val split (L2-normalised features, as `evaluate`), or of the
    top-1 agreement with the teacher on the held-out photos' views (distillation)."""
    from ..features import RawImages, embed_images
    from ..metrics import mean_ci, prototype_episode_accuracies

    if cfg.distill:
        return net_module(net).validate(val.to(device))

    features = embed_images(backbone, RawImages(val), transform, cfg.eval_batch_size, progress=False, device=device)
    accs = prototype_episode_accuracies(features, torch.tensor(val.targets), cfg.val_n_way, cfg.val_k_shot,
                                        cfg.val_n_query, cfg.val_episodes, seed=cfg.seed)
    return mean_ci(accs).as_dict()


def _build_net(cfg: PretrainConfig, data: PretrainData, dist: Dist, log) -> tuple[nn.Module, nn.Module, str, dict]:
    """The network to step (DDP-ready), its backbone, where its weights came from, and its checkpoint metadata."""
    if cfg.distill:
        net = distill_net(cfg, _build_backbone, data.size)
        backbone, origin = net.student, net.origin
        data.val = net.views(data.val)  # held-out photos -> fixed views, once
    else:
        backbone, origin = _build_backbone(cfg, len(data.base.classes))
        net = _Net(backbone)
    kind = dict(kind='distilled', teacher=cfg.teacher) if cfg.distill else dict(kind='base-pretrained')
    meta = dict(model=cfg.model, model_args=model_args(backbone), **kind, method=cfg.method, data=cfg.data,
                split=cfg.split, classes=[] if cfg.distill else list(data.base.classes),
                **preprocessing(backbone.pretrained_cfg, data.size), weights=origin)
    net = net.to(dist.device)
    if dist.world_size > 1 and cfg.sync_bn:
        if dist.device.type == 'cuda':
            import timm.layers

            net = timm.layers.convert_sync_batchnorm(net)  # keeps timm's BatchNormAct layers' activations
        else:
            log(f'note: torch has no SyncBatchNorm on CPU: BatchNorm statistics are per micro-batch '
                f'({cfg.batch_size // data.n_chunks} images), as accum_steps={data.n_chunks} gives in one process')
    return net, backbone, origin, meta


def _save_state(job: '_Loop') -> None:
    """last.safetensors for users, train_state.pt (what trains + optimizer, one atomic file) for --resume."""
    save_state(job.run, step=job.step, model=job.trained.state_dict(), optimizer=job.opt.state_dict(), best=job.best)
    save_checkpoint(job.run.path(LAST_FILE), job.backbone.state_dict(), dict(job.meta, step=job.step))


@dataclass
class _Loop:
    """The state the step loop carries."""
    cfg: PretrainConfig
    run: RunDir
    dist: Dist
    net: nn.Module
    backbone: nn.Module
    opt: torch.optim.Optimizer
    data: PretrainData
    transform: object
    meta: dict
    trained: nn.Module  # what the optimizer steps: the backbone, or (distillation) the student and its projection
    step: int = 0
    best: dict | None = None


def _after_step(job: _Loop, totals: torch.Tensor, lr: float, seconds: float, stopped: bool, bar) -> bool:
    """Log the step, validate when due (rank 0), and checkpoint when due or when the best val improved (-> True)."""
    cfg, step = job.cfg, job.step
    record = dict(step=step, loss=round(totals[0].item(), 5), lr=lr, batch_acc=round(totals[1].item(), 5),
                  sec=round(seconds, 4), time=time.time())
    due = job.data.val is not None and (step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0))
    improved = False
    if due and job.dist.main:
        result = _val_accuracy(job.net, job.backbone, job.data.val, job.transform, cfg, job.dist.device)
        record.update(val_acc=round(result['mean'], 5), val_ci95=round(result['ci95'], 5))
        improved = job.best is None or result['mean'] > job.best['mean']
        if improved:
            job.best = dict(result, step=step)
            save_checkpoint(job.run.path(BEST_FILE), job.backbone.state_dict(),
                            dict(job.meta, step=step, val_acc=result['mean'], val_ci95=result['ci95']))
        bar.set_postfix(loss=f'{record["loss"]:.3f}', val=f'{100 * result["mean"]:.1f}%')
    elif step % 10 == 0 or step == cfg.steps:
        bar.set_postfix(loss=f'{record["loss"]:.3f}', acc=f'{record["batch_acc"]:.2f}')
    if not job.dist.main:
        return False
    job.run.log(record)
    if step % cfg.checkpoint_every == 0 or step == cfg.steps or improved or stopped:
        _save_state(job)
        return True
    return False


def _run_steps(job: _Loop, progress: bool) -> bool:
    """Train from ``job.step`` to ``cfg.steps``; returns whether a stop was requested (the state is saved)."""
    from tqdm.auto import tqdm

    cfg, dist = job.cfg, job.dist
    data = StepData(job.data.base, job.transform, cfg, job.data.chunks, job.data.n_chunks, job.data.sampler,
                    job.data.episodes)
    loader = torch.utils.data.DataLoader(data, batch_size=None, sampler=range(job.step, cfg.steps),
                                         num_workers=cfg.num_workers, pin_memory=dist.device.type == 'cuda')
    scheduler = create_scheduler(job.opt, cfg.steps, min(cfg.warmup_steps, cfg.steps // 10))
    bar = tqdm(total=cfg.steps, initial=job.step, desc='pretraining', unit='step',
               disable=not progress or not dist.main)
    stopped, saved_at = False, job.step
    with StopRequest() as stop:
        tick = time.perf_counter()
        try:
            for micro_batches in loader:  # this rank's micro-batches of step `job.step`
                scheduler.step_update(job.step)
                lr = job.opt.param_groups[0]['lr']
                totals = train_step(job.net, job.opt, micro_batches, job.data.chunks, job.step, cfg, dist.device)
                job.step += 1
                totals[2] = float(stop.requested)
                if dist.world_size > 1:  # the global figures, and a stop request from any rank stops all
                    torch.distributed.all_reduce(totals)
                    totals[:2] /= dist.world_size
                stopped = totals[2].item() > 0
                if _after_step(job, totals, lr, time.perf_counter() - tick, stopped, bar):
                    saved_at = job.step
                bar.update(1)
                if stopped:
                    break
                tick = time.perf_counter()  # a step's time: loading its data and training, not val or saving
        except KeyboardInterrupt:  # raised where no signal handler could be installed, or a second Ctrl-C
            stopped = True
            if dist.main and saved_at != job.step:
                _save_state(job)
    bar.close()
    return stopped


def _metrics(job: _Loop, origin: str, max_diff: float) -> dict:
    cfg, data, records = job.cfg, job.data, job.run.records()
    tail = records[-max(1, len(records) // 10):]
    history = [dict(step=r['step'], mean=r['val_acc'], ci95=r['val_ci95']) for r in records if 'val_acc' in r]
    if cfg.distill:
        protocol = dict(split='held-out photos', measure='top-1 agreement with the teacher', views=len(data.val))
    else:
        protocol = dict(split=cfg.val_split, n_way=cfg.val_n_way, k_shot=cfg.val_k_shot, n_query=cfg.val_n_query,
                        episodes=cfg.val_episodes, measure='NCM accuracy')
    val = None if data.val is None else dict(protocol, best=job.best, last=history[-1] if history else None,
                                             history=history)
    return dict(
        method=cfg.method, steps=cfg.steps, data=dict(data=cfg.data, split=cfg.split, classes=len(data.base.classes),
                                                      images=len(data.base), image_size=data.size),
        world_size=job.dist.world_size, global_batch=cfg.batch_size if cfg.supervised or cfg.distill else 0,
        episodes_per_step=cfg.episodes_per_step if cfg.episodic else 0, accum_steps=cfg.accum_steps,
        train=dict(loss=sum(r['loss'] for r in tail) / len(tail),
                   batch_acc=sum(r['batch_acc'] for r in tail) / len(tail), last_steps=len(tail)),
        val=val, train_seconds=sum(r['sec'] for r in records), rank_param_max_diff=max_diff, weights=origin,
        checkpoints=dict(best=str(job.run.path(BEST_FILE)) if job.best else None, last=str(job.run.path(LAST_FILE))),
        run_dir=str(job.run.root))


def _resume_state(job: _Loop) -> None:
    state = load_state(job.run, required=('step', 'model', 'optimizer', 'best'))
    job.trained.load_state_dict(state['model'])
    job.opt.load_state_dict(state['optimizer'])
    job.step, job.best = int(state['step']), state['best']


def _train(cfg: PretrainConfig, run: RunDir, resuming: bool, dist: Dist, progress: bool, log) -> dict:
    from ..data import eval_transform
    from ..plots import plot_training_curve

    data = load_data(cfg, dist)
    net, backbone, origin, meta = _build_net(cfg, data, dist, log)
    trained = net.trained() if cfg.distill else backbone
    opt = create_optimizer(trained, 'adamw', cfg.lr, cfg.weight_decay)
    transform = distill_transform(backbone, data.size, cfg.crop_min) if cfg.distill else \
        eval_transform(backbone, size=data.size)
    job = _Loop(cfg, run, dist, net, backbone, opt, data, transform, meta, trained)
    dist.barrier()  # every rank has checked the run directory before rank 0 writes it
    if resuming and run.path(STATE_FILE).is_file():
        _resume_state(job)
    dist.barrier()  # every rank has read the state before rank 0 writes again
    if dist.main and resuming:
        run.trim_log(job.step)
    elif dist.main:
        run.start(cfg)
    if dist.world_size > 1:
        # broadcasts rank 0's parameters and buffers; distillation's local stage leaves the trunk without gradients
        job.net = nn.parallel.DistributedDataParallel(net, find_unused_parameters=cfg.distill)
    per_rank = f'{cfg.batch_size // dist.world_size} images' if cfg.supervised or cfg.distill else ''
    if cfg.episodic:
        per_rank += (' + ' if per_rank else '') + f'{cfg.episodes_per_step // dist.world_size} episodes'
    what = f'{len(data.base)} photos, {len(data.val) // VIEWS_PER_PHOTO} held out, teacher {cfg.teacher})' \
        if cfg.distill else f'{cfg.split}): {len(data.base.classes)} classes, {len(data.base)} images'
    log(f'pretraining {cfg.model} ({origin}) on {cfg.data} ({what} at {data.size} px; {cfg.method}, {cfg.steps} '
        f'steps; {dist.world_size} process(es) on {dist.device.type}, {per_rank} per rank and step'
        + (f' in {cfg.accum_steps} micro-batches' if cfg.accum_steps > 1 else ''))
    if resuming:
        log(f'resuming at step {job.step} of {cfg.steps}')
    if _run_steps(job, progress):
        dist.barrier()  # rank 0's checkpoint is written before anyone exits
        if not dist.main:
            raise SystemExit(1)
        launcher = 'torchrun ... -m' if dist.world_size > 1 else 'python -m'
        raise SystemExit(f'\ninterrupted at step {job.step}; continue with: {launcher} fewshot_lkca.pretrain '
                         f'--resume {run.root}')
    max_diff = params_max_diff(backbone, dist)
    if not dist.main:
        dist.barrier()
        return {}
    if max_diff > 0:
        _logger.warning('parameters differ between ranks by up to %.3g: the ranks did not step in sync', max_diff)
    metrics = _metrics(job, origin, max_diff)
    if not plot_training_curve(run.path(LOG_FILE), run.path(CURVE_FILE)):
        log('matplotlib is not installed: no training curve (pip install fewshot-lkca[plots])')
    run.write_json(METRICS_FILE, metrics)
    run.path(STATE_FILE).unlink(missing_ok=True)  # model + optimizer state is only for resuming
    _summary(metrics, log)
    dist.barrier()
    return metrics


def _summary(metrics: dict, log) -> None:
    train = metrics['train']
    log('')
    log(f'{metrics["method"]} pretraining, {metrics["steps"]} steps in {metrics["train_seconds"]:.0f} s: training '
        f'loss {train["loss"]:.3f}, batch accuracy {100 * train["batch_acc"]:.1f} % (last {train["last_steps"]} steps)')
    val = metrics['val']
    if val and val['best']:
        best, last = val['best'], val['last']
        how = f'{val["n_way"]}-way {val["k_shot"]}-shot NCM' if 'n_way' in val else val['measure']
        log(f'val ({val["split"]}) {how}: best {100 * best["mean"]:.1f} +- '
            f'{100 * best["ci95"]:.1f} % at step {best["step"]}, last {100 * last["mean"]:.1f} %')
    log(f'run directory: {metrics["run_dir"]} (best.safetensors, last.safetensors, metrics.json, log.jsonl)')


def pretrain_command(cfg: PretrainConfig, resume: Path | None = None, overwrite: bool = False,
                     progress: bool = True, log=print, distributed: bool = True) -> dict:
    """Run (or resume) one pretraining job; returns the metrics written to ``metrics.json``.

    Under torchrun every rank calls this with the same arguments; rank 0 alone writes the run directory (which
    ``--resume`` must find on storage every rank can read) and returns the metrics, the other ranks return {}.

    Args:
        cfg: The resolved config (ignored with ``resume``: the run's saved config is used).
        resume: A run directory to continue.
        overwrite: Replace a finished or unfinished run in ``cfg.out``.
        distributed: False keeps a single process even inside a torchrun job (`base_pretrained`).
    """
    if resume is not None:
        cfg, run = open_resumed(resume, PretrainConfig)
    else:
        out = cfg.out or default_out(cfg.data, cfg.model, 'pretrain', cfg.method, f'seed{cfg.seed}')
        cfg = dataclasses.replace(cfg, out=str(out))
        run = new_run(cfg.out, overwrite)
    dist = init_distributed(cfg.device, distributed)
    try:
        with run.lock() if dist.main else contextlib.nullcontext():  # rank 0 alone writes the run directory
            return _train(cfg, run, resume is not None, dist, progress, log if dist.main else _quiet)
    finally:
        dist.close()


def _quiet(*_args) -> None:
    """The log of ranks other than 0."""
