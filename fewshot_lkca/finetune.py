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
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointError, atomic_write, load_backbone, load_checkpoint, save_checkpoint
from .config import ConfigError, FinetuneConfig, apply_overrides, parse_cli, resolve_config
from .heads import CosineHead, FewShotClassifier
from .metrics import mean_ci
from .models import create_backbone
from .models.factory import BackboneError
from .pretrain import cosine_lr

__all__ = ['build_parser', 'finetune_command', 'main', 'Task', 'build_task', 'RunError', 'build_classifier',
           'set_trainable', 'train_mode', 'make_optimizer', 'train_step', 'extract_features']

_logger = logging.getLogger(__name__)

CONFIG_FILE, LOG_FILE, METRICS_FILE = 'config.json', 'log.jsonl', 'metrics.json'
MODEL_FILE, STATE_FILE = 'model.safetensors', 'train_state.pt'


class RunError(RuntimeError):
    """The run directory cannot be used as asked (finished, not a run, ...)."""


# --------------------------------------------------------------------------------------------------- the task
@dataclass
class Task:
    """The few-shot task: which images are the support set and which are held out, per episode label."""
    dataset: object  # ImageDataset of the split, raw (no transform)
    class_names: list[str]
    support_idx: list[int]
    support_y: list[int]
    pool_idx: list[int]  # every other image of the task's classes
    pool_y: list[int]
    image_size: int


def _dataset_options(cfg: FinetuneConfig) -> dict:
    from .data import get_card

    reader = 'image_folder' if Path(cfg.data).expanduser().is_dir() else get_card(cfg.data)['reader']
    options = {}
    if reader == 'lookalike':
        options['cache'] = True  # render once; the support set is read every step
        if cfg.image_size:
            options['image_size'] = cfg.image_size
        if cfg.images_per_class:
            options['images_per_class'] = cfg.images_per_class
    return options


def _native_size(cfg: FinetuneConfig, dataset) -> int:
    if cfg.image_size:
        return cfg.image_size
    return int(getattr(dataset, 'image_size', 0) or 224)  # rendered sets know their size; photos: ImageNet's


def build_task(cfg: FinetuneConfig) -> Task:
    """Draw the task's classes and support set (episode 0 of the seed) and collect the held-out pool."""
    from .data import EpisodeSampler, get_dataset

    dataset = get_dataset(cfg.data, split=cfg.split, **_dataset_options(cfg))
    counts = {}
    for t in dataset.targets:
        counts[t] = counts.get(t, 0) + 1
    if len(counts) < cfg.n_way:
        raise ConfigError(f"--ways {cfg.n_way} needs {cfg.n_way} classes; '{cfg.data}' ({cfg.split}) has {len(counts)}")
    need = cfg.k_shot + cfg.n_query
    small = sorted((n, dataset.classes[c]) for c, n in counts.items() if n < need)
    if len(counts) - len(small) < cfg.n_way:
        n, name = small[0]
        raise ConfigError(f"class '{name}' has {n} images; {cfg.k_shot} shots + {cfg.n_query} queries need {need} "
                          f'(lower --shots/--queries or add images)')
    # Sampling with n_query keeps classes too small for an evaluation episode out of the task (with a warning).
    plan = EpisodeSampler(dataset, cfg.n_way, cfg.k_shot, cfg.n_query, seed=cfg.seed,
                          drop_small_classes=bool(small)).plan(0)
    label_of = {name: y for y, name in enumerate(plan.class_names)}
    support = set(plan.support_idx)
    pool_idx, pool_y = [], []
    for i, t in enumerate(dataset.targets):
        name = dataset.classes[t]
        if name in label_of and i not in support:
            pool_idx.append(i)
            pool_y.append(label_of[name])
    return Task(dataset, plan.class_names, plan.support_idx, plan.support_y, pool_idx, pool_y,
                _native_size(cfg, dataset))


# ------------------------------------------------------------------------------------------------ the model
def _start_backbone(cfg: FinetuneConfig, image_size: int, log) -> tuple[nn.Module, str]:
    """The backbone to fine-tune (pre-logits output) and a line saying where its weights came from."""
    if cfg.weights != 'base':
        backbone, _, origin = load_backbone(cfg.model, cfg.weights)
        return backbone, origin
    from .pretrain import base_pretrained

    log(f'starting point: {cfg.model} pretrained on the base classes of {cfg.data} (cached after the first run)')
    state, path, cached = base_pretrained(cfg.model, cfg.data, image_size, cfg.base_steps, cfg.base_batch_size,
                                          cfg.base_lr, seed=0, images_per_class=cfg.base_images_per_class)
    backbone = create_backbone(cfg.model, num_classes=0)
    backbone.load_state_dict(state)
    return backbone, f'{cfg.model} pretrained on {cfg.data} base classes ({"cached" if cached else "new"}: {path})'


def _frozen_names(backbone: nn.Module, frozen_groups: int) -> set[str]:
    """Parameters of the first ``frozen_groups`` groups of timm's coarse group_matcher (stem, then stages)."""
    import timm

    groups = timm.models.group_parameters(backbone, backbone.group_matcher(coarse=True))
    ordered = [groups[k] for k in sorted(groups)]
    return {name for group in ordered[:frozen_groups] for name in group}


def set_trainable(model: FewShotClassifier, cfg: FinetuneConfig) -> None:
    backbone = model.backbone
    if cfg.method != 'finetune':
        backbone.requires_grad_(False)
    else:
        frozen = _frozen_names(backbone, cfg.frozen_groups)
        for name, p in backbone.named_parameters():
            p.requires_grad_(name not in frozen)
    if cfg.grad_checkpointing and hasattr(backbone, 'set_grad_checkpointing'):
        backbone.set_grad_checkpointing(True)


def train_mode(model: FewShotClassifier, cfg: FinetuneConfig) -> None:
    """Train mode, except BatchNorm statistics of the trunk when frozen (2-4 images make noisy statistics)."""
    model.train()
    if cfg.freeze_bn_stats or cfg.method != 'finetune':
        for m in model.backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


@torch.no_grad()
def extract_features(backbone: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Features in eval mode, ``batch_size`` images at a time (the memory-lean job's peak is set here too)."""
    backbone.eval()
    return torch.cat([backbone(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def build_classifier(backbone: nn.Module, support_x: torch.Tensor, support_y: torch.Tensor,
                     cfg: FinetuneConfig) -> FewShotClassifier:
    """Backbone + cosine head (from the support set's prototypes, unless ``head_init='random'``)."""
    feature_dim = getattr(backbone, 'head_hidden_size', None) or backbone.num_features  # pre-logits width
    head = CosineHead(feature_dim, cfg.n_way, scale=cfg.head_scale)
    if cfg.head_init == 'prototypes':
        head.init_from_prototypes(extract_features(backbone, support_x, cfg.eval_batch_size), support_y)
    return FewShotClassifier(backbone, head)


def train_step(model: FewShotClassifier, opt: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
               cfg: FinetuneConfig) -> tuple[float, float]:
    """One optimizer step on a batch; returns (loss, batch accuracy)."""
    train_mode(model, cfg)
    logits = model(images)
    loss = nn.functional.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item(), (logits.argmax(1) == labels).float().mean().item()


def _load_images(task: Task, indices: list[int], transform) -> torch.Tensor:
    return torch.stack([transform(task.dataset.load(i)) for i in indices])


# ------------------------------------------------------------------------------------------------ the run
class _Run:
    """Files of one run directory."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, name: str) -> Path:
        return self.root / name

    def write_json(self, name: str, obj) -> None:
        atomic_write(self.path(name), lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + '\n'))

    def log(self, record: dict) -> None:
        with open(self.path(LOG_FILE), 'a') as f:
            f.write(json.dumps(record) + '\n')

    @property
    def finished(self) -> bool:
        return self.path(METRICS_FILE).is_file()


def _default_out(cfg: FinetuneConfig) -> Path:
    name = Path(cfg.data).name or 'data'
    return Path('runs') / f'{name}-{cfg.model}-{cfg.n_way}w{cfg.k_shot}s-{cfg.method}-seed{cfg.seed}'


def _open_resumed_run(resume: Path) -> tuple[FinetuneConfig, _Run, int]:
    """The saved config of an interrupted run and the step its last checkpoint reached."""
    run = _Run(resume)
    if not run.path(CONFIG_FILE).is_file():
        raise RunError(f'--resume {resume}: not a run directory (no {CONFIG_FILE})')
    if run.finished:
        raise RunError(f'--resume {resume}: the run already finished (see {run.path(METRICS_FILE)})')
    saved = json.loads(run.path(CONFIG_FILE).read_text())
    cfg = apply_overrides(FinetuneConfig(), saved, source=str(run.path(CONFIG_FILE))).validate()
    step = 0
    if run.path(STATE_FILE).is_file() and run.path(MODEL_FILE).is_file():
        step = int(torch.load(run.path(STATE_FILE), weights_only=True)['step'])
    return cfg, run, step


def _check_new_run(cfg: FinetuneConfig, overwrite: bool) -> _Run:
    """Refuse to clobber a finished run, an unfinished one, or a folder that is not a run."""
    root = Path(cfg.out) if cfg.out else _default_out(cfg)
    run = _Run(root)
    if run.finished and not overwrite:
        raise RunError(f'{root} holds a finished run; pass --overwrite to replace it or --out for another directory')
    if root.exists() and any(root.iterdir()) and not run.path(CONFIG_FILE).is_file():
        raise RunError(f'{root} exists and is not a run directory; choose another --out')
    if run.path(CONFIG_FILE).is_file() and not run.finished and not overwrite:
        raise RunError(f'{root} holds an unfinished run; continue it with --resume {root} or pass --overwrite')
    return run


def _start_run(cfg: FinetuneConfig, run: _Run) -> None:
    run.root.mkdir(parents=True, exist_ok=True)
    for name in (LOG_FILE, STATE_FILE, MODEL_FILE, METRICS_FILE):
        run.path(name).unlink(missing_ok=True)
    cfg.out = str(run.root)
    run.write_json(CONFIG_FILE, cfg.to_dict())


def make_optimizer(model: FewShotClassifier, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    trunk = [p for p in model.backbone.parameters() if p.requires_grad]
    head = list(model.head.parameters())
    groups = [dict(params=head, lr=cfg.lr * cfg.head_lr_scale, base_lr=cfg.lr * cfg.head_lr_scale)]
    if trunk:
        groups.append(dict(params=trunk, lr=cfg.lr, base_lr=cfg.lr))
    if cfg.optimizer == 'adamw':
        return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _save_state(run: _Run, model, opt, step: int, meta: dict) -> None:
    save_checkpoint(run.path(MODEL_FILE), model.state_dict(), dict(meta, step=step))
    atomic_write(run.path(STATE_FILE), lambda tmp: torch.save(dict(step=step, optimizer=opt.state_dict()), tmp))


def _episode_accuracies(correct: torch.Tensor, labels: torch.Tensor, n_way: int, n_query: int, episodes: int,
                        seed: int) -> torch.Tensor:
    """Per-episode accuracy of ``episodes`` draws of ``n_query`` held-out images per class (fixed predictions)."""
    by_class = [(labels == c).nonzero().flatten() for c in range(n_way)]
    accs = torch.empty(episodes)
    for e in range(episodes):
        g = torch.Generator().manual_seed(seed * 1_000_003 + e)
        picks = [idx[torch.randperm(len(idx), generator=g)[:n_query]] for idx in by_class]
        accs[e] = correct[torch.cat(picks)].float().mean()
    return accs


def _confused_pairs(confusion: torch.Tensor, names: list[str], top: int = 5) -> list[dict]:
    off = confusion.clone().float()
    off.fill_diagonal_(0)
    pairs = []
    for flat in off.flatten().argsort(descending=True)[:top].tolist():
        true, pred = divmod(flat, len(names))
        if off[true, pred] > 0:
            pairs.append(dict(true=names[true], predicted=names[pred], count=int(off[true, pred])))
    return pairs


def finetune_command(cfg: FinetuneConfig, resume: Path | None = None, overwrite: bool = False,
                     progress: bool = True, log=print) -> dict:
    """Run (or resume) one fine-tuning job; returns the metrics written to ``metrics.json``."""
    from tqdm.auto import tqdm

    from .data import eval_transform, train_transform

    if resume is not None:
        cfg, run, start_step = _open_resumed_run(resume)
    else:
        run, start_step = _check_new_run(cfg, overwrite), 0
    torch.manual_seed(cfg.seed)
    task = build_task(cfg)  # bad data fails here, before a run directory is written
    if resume is None:
        _start_run(cfg, run)
    log(f'task: {cfg.n_way}-way {cfg.k_shot}-shot on {cfg.data} ({cfg.split}): {", ".join(task.class_names)}; '
        f'{len(task.pool_idx)} held-out images')
    backbone, origin = _start_backbone(cfg, task.image_size, log)
    log(f'weights: {origin}')
    eval_tf = eval_transform(backbone, size=task.image_size)
    support_x = _load_images(task, task.support_idx, eval_tf)
    support_y = torch.tensor(task.support_y)
    model = build_classifier(backbone, support_x, support_y, cfg)
    meta = dict(model=cfg.model, classes=task.class_names, image_size=task.image_size,
                mean=list(backbone.pretrained_cfg['mean']), std=list(backbone.pretrained_cfg['std']),
                interpolation=backbone.pretrained_cfg.get('interpolation', 'bilinear'),
                crop_pct=backbone.pretrained_cfg.get('crop_pct', 0.875), weights=origin, data=cfg.data)

    steps = cfg.steps if cfg.method != 'protonet' else 0
    set_trainable(model, cfg)
    opt = make_optimizer(model, cfg)
    if start_step:
        tensors, _ = load_checkpoint(run.path(MODEL_FILE))
        model.load_state_dict(tensors)
        opt.load_state_dict(torch.load(run.path(STATE_FILE), weights_only=True)['optimizer'])
        log(f'resuming at step {start_step} of {steps}')
    train_tf = train_transform(backbone, size=task.image_size) if cfg.augment else eval_tf
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f'recipe: {cfg.method}, {trainable / 1e6:.3f} M trainable parameters, batch {cfg.batch_size}, {steps} steps'
        + (f', first {cfg.frozen_groups} parameter groups frozen' if cfg.method == 'finetune' else ''))

    step = start_step
    try:
        bar = tqdm(total=steps, initial=start_step, desc='fine-tuning', disable=not progress or steps == 0,
                   unit='step')
        while step < steps:
            # Everything random at step t comes from (seed, t): a resumed run replays the same batches.
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            torch.manual_seed(cfg.seed * 1_000_003 + step)
            if hasattr(train_tf, 'set_random_seed'):
                train_tf.set_random_seed(cfg.seed * 1_000_003 + step)
            batch = torch.randperm(len(task.support_idx), generator=g)[:cfg.batch_size]
            images = (_load_images(task, [task.support_idx[i] for i in batch], train_tf) if cfg.augment
                      else support_x[batch])
            labels = support_y[batch]
            lr_factor = cosine_lr(step, steps, 1.0, warmup=cfg.warmup_steps)
            for group in opt.param_groups:
                group['lr'] = group['base_lr'] * lr_factor
            loss, batch_acc = train_step(model, opt, images, labels, cfg)
            step += 1
            run.log(dict(step=step, loss=round(loss, 5), lr=opt.param_groups[0]['lr'], batch_acc=batch_acc,
                         time=time.time()))
            bar.update(1)
            bar.set_postfix(loss=f'{loss:.3f}')
            if step % cfg.checkpoint_every == 0 or step == steps:
                _save_state(run, model, opt, step, meta)
        bar.close()
    except KeyboardInterrupt:
        _save_state(run, model, opt, step, meta)
        raise SystemExit(f'\ninterrupted at step {step}; continue with: python -m fewshot_lkca.finetune '
                         f'--resume {run.root}') from None

    if steps == 0:
        _save_state(run, model, opt, 0, meta)
    metrics = _evaluate(model, task, cfg, eval_tf, progress)
    metrics.update(weights=origin, trainable_parameters=trainable, steps=steps, run_dir=str(run.root))
    _plots(run, metrics, task.class_names, log)
    run.write_json(METRICS_FILE, metrics)
    run.path(STATE_FILE).unlink(missing_ok=True)  # optimizer state is only for resuming
    _summary(metrics, cfg, run, log)
    if cfg.export:  # after metrics.json: a failed export is a warning, never a lost run
        from .export import export_after_finetune
        export_after_finetune(run.root, cfg.export, task=task, log=log)
    return metrics


@torch.no_grad()
def _evaluate(model: FewShotClassifier, task: Task, cfg: FinetuneConfig, eval_tf, progress: bool) -> dict:
    from tqdm.auto import tqdm

    model.eval()
    preds = []
    bs = cfg.eval_batch_size
    for i in tqdm(range(0, len(task.pool_idx), bs), desc='evaluating', disable=not progress, unit='batch'):
        preds.append(model(_load_images(task, task.pool_idx[i:i + bs], eval_tf)).argmax(1))
    pred = torch.cat(preds)
    truth = torch.tensor(task.pool_y)
    correct = pred == truth
    accs = _episode_accuracies(correct, truth, cfg.n_way, cfg.n_query, cfg.eval_episodes, cfg.seed)
    confusion = torch.zeros(cfg.n_way, cfg.n_way, dtype=torch.long)
    confusion.index_put_((truth, pred), torch.ones_like(truth), accumulate=True)
    per_class = {name: (confusion[c, c] / confusion[c].sum()).item() for c, name in enumerate(task.class_names)}
    return dict(
        task=dict(n_way=cfg.n_way, k_shot=cfg.k_shot, n_query=cfg.n_query, classes=task.class_names,
                  data=cfg.data, split=cfg.split, seed=cfg.seed),
        query_accuracy=accs[0].item(),
        episodes=mean_ci(accs).as_dict(),
        held_out_accuracy=correct.float().mean().item(),
        per_class_accuracy=per_class,
        most_confused=_confused_pairs(confusion, task.class_names),
        confusion=confusion.tolist(),
        chance=1.0 / cfg.n_way,
    )


def _plots(run: _Run, metrics: dict, names: list[str], log) -> None:
    try:
        from .plots import plot_confusion, plot_training_curve
    except ImportError:  # matplotlib is an extra ('plots'); the metrics stand without pictures
        log('matplotlib is not installed: no PNGs (pip install fewshot-lkca[plots])')
        return
    plot_confusion(metrics['confusion'], names, run.path('confusion.png'))
    if run.path(LOG_FILE).is_file():
        plot_training_curve(run.path(LOG_FILE), run.path('training_curve.png'))


def _summary(metrics: dict, cfg: FinetuneConfig, run: _Run, log) -> None:
    ep = metrics['episodes']
    log('')
    log(f'{cfg.n_way}-way {cfg.k_shot}-shot, {cfg.method}: accuracy {100 * ep["mean"]:.1f} +- {100 * ep["ci95"]:.1f} % '
        f'(95% CI over {ep["n"]} episodes of {cfg.n_query} queries/class; chance {100 * metrics["chance"]:.0f} %)')
    worst = min(metrics['per_class_accuracy'].items(), key=lambda kv: kv[1])
    log(f'hardest class: {worst[0]} ({100 * worst[1]:.0f} %)'
        + (f'; most confused: {metrics["most_confused"][0]["true"]} -> {metrics["most_confused"][0]["predicted"]}'
           if metrics['most_confused'] else ''))
    log(f'run directory: {run.root} (metrics.json, log.jsonl, model.safetensors, confusion.png)')


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
    parser.add_argument('--weights', help="'base', 'imagenet', 'random', or a checkpoint / source state_dict path")
    parser.add_argument('--out', help='run directory (default: runs/<data>-<model>-<ways>w<shots>s-...)')
    parser.add_argument('--seed', type=int)
    parser.add_argument('--resume', type=Path, metavar='RUN_DIR', help='continue a run that was interrupted')
    parser.add_argument('--overwrite', action='store_true', help='replace a finished run in --out')
    parser.add_argument('--no-progress', action='store_true', help='no progress bars')
    return parser


def _parse(argv: list[str]) -> tuple[argparse.Namespace, dict[str, str]]:
    return parse_cli(build_parser(), argv,
                     named=('n_way', 'k_shot', 'n_query', 'data', 'model', 'weights', 'out', 'seed'))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, overrides = _parse(argv)
        if args.resume is not None:
            cfg = FinetuneConfig()  # replaced by the run's saved config
            if overrides:
                raise ConfigError('--resume continues the saved config; drop the other options')
        else:
            cfg = resolve_config(args.recipe, overrides)
        finetune_command(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    except (ConfigError, RunError, CheckpointError, BackboneError) as e:
        raise SystemExit(f'error: {e}') from None
    except Exception as e:
        from .data import DataError
        if isinstance(e, DataError):
            raise SystemExit(f'error: {e}') from None
        raise


if __name__ == '__main__':
    main()
