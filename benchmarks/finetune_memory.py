"""Training-step memory of each fine-tuning recipe: how much leaner than full fine-tuning is the lean recipe?

For every recipe in ``recipes/`` (``lean_5shot``, ``lean_1shot``, ``linear_probe``, ``full_finetune``; ``protonet``
has no training step) and every ``--models`` backbone (default ``lkca_mobilenet``), the benchmark builds what
`fewshot_lkca.finetune` builds: the backbone (pre-logits, random weights: memory does not depend on their values), a
``n_way`` `CosineHead` initialised from the prototypes of a ``n_way`` x ``k_shot`` support set of random images
(default 5 x 5 = 25 at 224 px), then `_set_trainable`, `_make_optimizer` and, each step, `_train_mode`, forward,
label-smoothed cross-entropy, ``zero_grad(set_to_none=True)``, backward and ``step`` - the body of finetune's loop.
The batch is the recipe's ``batch_size``, capped at the support size. Every recipe sees the same 25-image support
set (``lean_1shot``'s own ``k_shot: 1`` would only shrink the support set; its batch of 2 fits either).

Two measurements per recipe:

1. **Profiler peak** (deterministic for a given ``--threads``: parallel kernels allocate per-thread buffers, so
   ``lean_5shot`` reads 9.08 MiB at 1 thread and 9.37 at 2). One warm-up step (so that the optimizer state exists;
   its gradients are then dropped, see `measure_profiler`), then ONE step under
   ``torch.profiler.profile(activities=[CPU], profile_memory=True, record_shapes=True, with_stack=True)``, exported
   with ``prof.export_memory_timeline(path, device='cpu')`` as JSON: ``[times, sizes]``, where ``sizes[t]`` holds the
   bytes live at timestep ``t`` per category (index 0 is always 0, then the order of
   ``torch.profiler._memory_profiler._CATEGORY_TO_INDEX``). The number reported is the peak over timesteps of the
   sum over categories, minus the sum at the first timestep (tensors that exist before the step and are used in it:
   parameters, optimizer state, the input batch). The categories are torch's heuristics over the profiled data
   flow:

   * ``PARAMETER``: module parameters (found by the Python tracer or by data flow into an optimizer update).
   * ``OPTIMIZER_STATE``: the optimizer's state tensors (SGD momentum buffers, AdamW moments).
   * ``INPUT``: tensors that feed the model but do not depend on a gradient (the image batch, labels).
   * ``TEMPORARY``: tensors allocated and freed inside one operator (e.g. SGD's ``grad + weight_decay * param``).
   * ``ACTIVATION``: forward-pass tensors computed from the inputs, whether or not autograd keeps them for backward.
   * ``GRADIENT``: parameter gradients (``.grad``, AccumulateGrad outputs).
   * ``AUTOGRAD_DETAIL``: other tensors created inside the backward pass: activation gradients in flight and, with
     gradient checkpointing, the recomputed forward activations of the block being back-propagated.
   * ``Unknown``: allocations the profiler cannot tie to a categorised tensor: oneDNN's blocked-layout copies
     (reorders) of convolution inputs and weights and, depending on the data flow it saw, outputs of frozen layers.

   Units are MiB (2**20 bytes); the reference numbers in ../shared/ENVIRONMENT.md are in the same unit (this
   benchmark reproduces its 434 MiB for ``tf_mobilenetv3_small_100`` full fine-tuning and its 15.8 MiB for the
   lean settings with timm's checkpointing). With ``--explain N`` the benchmark also replays the profiler's
   allocation events and lists the N largest groups of allocations live at the peak by module and operator.
2. **RSS growth**: in a fresh ``python`` subprocess per recipe, ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after
   ``--rss-steps`` training steps minus before them. It includes the optimizer state created by the first
   step and the allocator's behaviour; it ranks configurations like the profiler but reads higher and varies by tens
   of MiB (ENVIRONMENT.md).

``protonet`` has no training step: its row is the memory of extracting the support set's features the way finetune
does (`fewshot_lkca.finetune.extract_features`, in chunks of ``eval_batch_size``), marked "inference".

Run from the repository root (defaults: about 1.5 minutes on 2 cores, most of it the 15 RSS processes)::

    python -m benchmarks.finetune_memory
    python -m benchmarks.finetune_memory --models lkca_mobilenet,tf_mobilenetv3_small_100,lkca_mobilenet_dw3
    python -m benchmarks.finetune_memory --recipes lean_5shot,full_finetune --explain 12 --no-rss
    python -m benchmarks.finetune_memory --lean-variants --out benchmarks/results/finetune_memory.json
    python -m benchmarks.finetune_memory --variant lean_5shot:batch_size=2,frozen_groups=5
"""
import argparse
import collections
import datetime
import functools
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import fewshot_lkca
from benchmarks.common import cpu_name
from fewshot_lkca.config import ConfigError, FinetuneConfig, apply_overrides, list_recipes, load_recipe
from fewshot_lkca.features import extract_features
from fewshot_lkca.finetune import build_classifier, make_optimizer, set_trainable, train_step
from fewshot_lkca.heads import FewShotClassifier
from fewshot_lkca.models import MIN_INPUT_SIZE
from fewshot_lkca.models.factory import BackboneError

__all__ = ['RECIPES', 'BASELINE', 'LEAN_VARIANTS', 'MiB', 'Setup', 'recipe_config', 'parse_variant', 'build_setup',
           'profile_peak', 'measure_profiler', 'measure_rss', 'benchmark', 'format_table', 'main']

RECIPES = ('lean_5shot', 'lean_1shot', 'linear_probe', 'full_finetune', 'protonet')
BASELINE = 'full_finetune'  # the ratios' numerator
MiB = 2 ** 20
REPO = Path(__file__).resolve().parents[1]

# `--lean-variants`: what each FinetuneConfig knob does to the lean recipe's peak (the report's diagnosis).
LEAN_VARIANTS = (
    'lean_5shot:grad_checkpointing=false',
    'lean_5shot:frozen_groups=3',
    'lean_5shot:frozen_groups=5',
    'lean_5shot:batch_size=2',
    'lean_5shot:batch_size=2,frozen_groups=5',
    'lean_5shot:batch_size=1',
    'linear_probe:grad_checkpointing=true',
)

# The memory timeline's categories, in the order of the JSON export (its index 0 is a constant 0 column).
CATEGORIES = ('PARAMETER', 'OPTIMIZER_STATE', 'INPUT', 'TEMPORARY', 'ACTIVATION', 'GRADIENT', 'AUTOGRAD_DETAIL',
              'Unknown')


# ------------------------------------------------------------------------------------------------ the set-up
def recipe_config(recipe: str, model: str, overrides: dict[str, str] | None = None) -> FinetuneConfig:
    """The recipe's config for ``model``, with text ``overrides`` (``{'batch_size': '2'}``) on top, validated."""
    cfg = apply_overrides(load_recipe(recipe), dict(model=model), source='bench')
    return apply_overrides(cfg, overrides or {}, source='bench', from_text=True).validate()


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    """``'lean_5shot:batch_size=2,frozen_groups=5'`` -> ``('lean_5shot', {'batch_size': '2', 'frozen_groups': '5'})``.

    Unknown recipes, unknown keys and bad values raise `ConfigError` here, before anything is measured.
    """
    recipe, _, rest = spec.partition(':')
    overrides = {}
    for item in filter(None, (part.strip() for part in rest.split(','))):
        key, sep, value = item.partition('=')
        if not sep:
            raise ConfigError(f"variant '{spec}': '{item}' must look like key=value")
        overrides[key.strip()] = value.strip()
    recipe_config(recipe.strip(), 'lkca_mobilenet', overrides)  # unknown recipe / key / bad value: fail now
    return recipe.strip(), overrides


def _label(recipe: str, overrides: dict[str, str]) -> str:
    return recipe + (f" [{', '.join(f'{k}={v}' for k, v in overrides.items())}]" if overrides else '')


@dataclass
class Setup:
    """What one fine-tuning step needs, built as `fewshot_lkca.finetune.finetune_command` builds it."""
    cfg: FinetuneConfig
    model: FewShotClassifier
    opt: torch.optim.Optimizer | None  # None for protonet
    support_x: torch.Tensor
    images: torch.Tensor  # the step's batch
    labels: torch.Tensor

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad) if self.opt else 0


def build_setup(cfg: FinetuneConfig, image_size: int = 224, n_way: int = 5, k_shot: int = 5, seed: int = 0) -> Setup:
    """Backbone, prototype-initialised cosine head, trainable flags and optimizer, plus one batch of the support set,
    built with finetune's own functions."""
    cfg = apply_overrides(cfg, dict(n_way=n_way, k_shot=k_shot), source='bench')
    torch.manual_seed(cfg.seed)
    backbone = fewshot_lkca.create_backbone(cfg.model, num_classes=0)
    g = torch.Generator().manual_seed(seed)
    support_x = torch.randn(n_way * k_shot, 3, image_size, image_size, generator=g)
    support_y = torch.arange(n_way).repeat_interleave(k_shot)
    model = build_classifier(backbone, support_x, support_y, cfg)
    if cfg.method == 'protonet':
        return Setup(cfg, model, None, support_x, support_x, support_y)
    set_trainable(model, cfg, image_size)
    opt = make_optimizer(model, cfg)
    batch = torch.randperm(len(support_x), generator=g)[:min(cfg.batch_size, len(support_x))]
    return Setup(cfg, model, opt, support_x, support_x[batch], support_y[batch])


def _train_step(setup: Setup) -> float:
    return train_step(setup.model, setup.opt, setup.images, setup.labels, setup.cfg)[0]


def _protonet_features(setup: Setup) -> torch.Tensor:
    """ProtoNet's only computation: the support set's features (finetune's `extract_features`)."""
    return extract_features(setup.model.backbone, setup.support_x, setup.cfg.eval_batch_size)


def _work(setup: Setup) -> Callable[[], object]:
    return functools.partial(_train_step if setup.opt is not None else _protonet_features, setup)


# ------------------------------------------------------------------------------------------ profiler peak
def _live_at_peak(prof, module_names: dict[int, str]) -> tuple[dict, list[dict]]:
    """Replay the profiler's CPU allocation events: where the peak happens, and what is live then.

    Reads torch's private event tree (``prof.profiler.kineto_results.experimental_event_tree()``, which
    `torch.profiler._memory_profiler` itself uses); only the ``peak_at`` and ``--explain`` details depend on it.
    Returns ``(peak_at, groups)``: the phase of the allocation that reaches the peak (forward, backward, optimizer
    step) and the block holding most of the live bytes that have a module (backward formulas have none), and the
    allocations made in the profiled window that are live at the peak, grouped by (phase, module, operator),
    largest first.
    """
    from torch._C._profiler import _EventType

    allocations = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.typed[0] == _EventType.Allocation and event.typed[1].device.type == 'cpu':
            allocations.append(event)
    allocations.sort(key=lambda e: e.start_time_ns)

    def describe(event) -> tuple[str, str, str]:
        phase, module, op = 'forward', '', ''
        parent = event.parent
        while parent is not None:
            name = parent.name
            if name.startswith('Optimizer.step') or 'torch/optim/' in name:
                phase = 'optimizer step'
            elif phase == 'forward' and ('autograd::engine' in name or 'torch/autograd/' in name):
                phase = 'backward'
            if not op and name.startswith('aten::') and not name.startswith(('aten::empty', 'aten::resize')):
                op = name
            if not module and parent.typed[0] == _EventType.PyCall and parent.typed[1].module is not None:
                module = module_names.get(parent.typed[1].module.self_ptr, parent.name)
            parent = parent.parent
        return phase, module or '-', op or '?'

    live, total, peak, peak_event, peak_live = {}, 0, 0, None, {}
    for event in allocations:
        fields = event.typed[1]
        if fields.alloc_size > 0:
            live[fields.ptr] = (fields.alloc_size, event)
        else:
            live.pop(fields.ptr, None)
        total += fields.alloc_size
        if total > peak:
            peak, peak_event, peak_live = total, event, dict(live)
    groups, blocks = collections.Counter(), collections.Counter()
    for size, event in peak_live.values():
        phase, module, op = describe(event)
        groups[phase, module, op] += size
        if module != '-':
            parts = module.split('.')
            blocks['.'.join(parts[:4] if parts[1:2] == ['blocks'] else parts[:2])] += size  # backbone.blocks.S.B
    peak_at = {}
    if peak_event is not None:
        peak_at = dict(phase=describe(peak_event)[0], replay_mb=peak / MiB)
        if blocks:
            (block, size), = blocks.most_common(1)
            peak_at.update(module=block, module_mb=size / MiB)
    return peak_at, [dict(phase=p, module=m, op=o, mb=b / MiB) for (p, m, o), b in groups.most_common()]


def profile_peak(fn: Callable[[], object], timeline: Path | None = None, module: nn.Module | None = None,
                 explain: int = 0) -> dict:
    """Profile one call of ``fn``; the memory timeline's peak minus start, in MiB, and the categories at the peak.

    Returns ``peak_mb``, ``start_mb``, ``categories_mb`` (each category's bytes at the peak minus at the start),
    ``peak_at`` (phase and module of the allocation that reaches the peak; empty if torch's private event tree
    is not readable) and, with ``explain``, ``live_at_peak``: the ``explain`` largest groups of allocations live then.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = timeline or Path(tmp) / 'timeline.json'
        with warnings.catch_warnings():  # export_memory_timeline is deprecated in favour of CUDA-only snapshots
            warnings.simplefilter('ignore', FutureWarning)
            prof.export_memory_timeline(str(path), device='cpu')
        _, sizes = json.loads(Path(path).read_text())
    totals = [sum(s) for s in sizes]
    i = max(range(len(totals)), key=totals.__getitem__)
    result = dict(
        peak_mb=(totals[i] - totals[0]) / MiB,
        start_mb=totals[0] / MiB,
        categories_mb={name: (sizes[i][k + 1] - sizes[0][k + 1]) / MiB for k, name in enumerate(CATEGORIES)
                       if sizes[i][k + 1] != sizes[0][k + 1]},
    )
    names = {id(m): name or type(m).__name__ for name, m in module.named_modules()} if module is not None else {}
    try:
        peak_at, groups = _live_at_peak(prof, names)
    except Exception as e:  # private API: the headline numbers above do not depend on it
        peak_at, groups = dict(error=f'{type(e).__name__}: {e}'), []
    result['peak_at'] = peak_at
    if explain:
        result['live_at_peak'] = groups[:explain]
    return result


def measure_profiler(cfg: FinetuneConfig, image_size: int = 224, n_way: int = 5, k_shot: int = 5,
                     timeline: Path | None = None, explain: int = 0) -> dict:
    """Profiler peak of one training step (after one warm-up step), or of protonet's feature extraction."""
    setup = build_setup(cfg, image_size, n_way, k_shot)
    work = _work(setup)
    work()  # warm-up: optimizer state exists, lazy initialisations are done
    if setup.opt is not None:
        # The profiler cannot size frees of blocks allocated before it started, except at addresses it saw in an
        # earlier session of this process: the warm-up's gradients, which the step's zero_grad frees, would count
        # as freed or not depending on what was profiled before. Dropped now, they are in neither the start nor
        # the step. (finetune drops them after its forward; the first session of a fresh process, which cannot
        # see that free either, reads the same peak minus start.)
        setup.opt.zero_grad(set_to_none=True)
    gc.collect()
    result = profile_peak(work, timeline, setup.model, explain)
    result.update(batch=len(setup.images), trainable=setup.trainable)
    return result


# ------------------------------------------------------------------------------------------------ RSS growth
def _maxrss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / MiB if sys.platform == 'darwin' else rss / 1024  # bytes on macOS, KiB on Linux


def _proc_status_mb(field: str) -> float | None:
    """``VmRSS`` (now) or ``VmHWM`` (this process image's peak) from /proc/self/status, MiB; None off Linux."""
    try:
        for line in Path('/proc/self/status').read_text().splitlines():
            if line.startswith(field + ':'):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# Linux keeps ru_maxrss across execve, and a fork/vfork child starts from its parent's RSS: a process started
# straight from this one (about 1 GB after importing torch, more after profiling full fine-tuning) would report
# our high-water mark as its own. Started by a small launcher, the measuring process starts from the launcher's
# ~10 MiB. (VmHWM in /proc/self/status is per process image and needs no launcher: the rows carry it as a check.)
_LAUNCHER = 'import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)'


def _rss_child(spec: dict) -> dict:
    """In this (fresh) process: set up, then ru_maxrss before and after the steps (protonet: the extraction)."""
    torch.set_num_threads(spec['threads'])
    cfg = recipe_config(spec['recipe'], spec['model'], spec['overrides'])
    setup = build_setup(cfg, spec['size'], spec['n_way'], spec['k_shot'])
    work = _work(setup)
    gc.collect()
    before, hwm_before, current = _maxrss_mb(), _proc_status_mb('VmHWM'), _proc_status_mb('VmRSS')
    for _ in range(spec['steps'] if setup.opt is not None else 1):
        work()
    after, hwm_after = _maxrss_mb(), _proc_status_mb('VmHWM')
    return dict(rss_before_mb=before, rss_after_mb=after, rss_growth_mb=after - before, rss_now_before_mb=current,
                hwm_growth_mb=None if hwm_before is None else hwm_after - hwm_before)


def measure_rss(recipe: str, model: str, overrides: dict[str, str] | None = None, image_size: int = 224,
                n_way: int = 5, k_shot: int = 5, steps: int = 3, threads: int = 1, timeout: float = 600) -> dict:
    """RSS growth (MiB) over ``steps`` training steps in a fresh process (``python -m benchmarks.finetune_memory``).

    Returns ``rss_growth_mb`` (ru_maxrss after minus before), the two readings, the process's RSS right before
    the steps (``rss_now_before_mb``) and ``hwm_growth_mb``, the same growth read from /proc's VmHWM (Linux).
    """
    spec = dict(recipe=recipe, model=model, overrides=overrides or {}, size=image_size, n_way=n_way, k_shot=k_shot,
                steps=steps, threads=threads)
    child = [sys.executable, '-m', 'benchmarks.finetune_memory', '--rss-child', json.dumps(spec)]
    proc = subprocess.run([sys.executable, '-c', _LAUNCHER, *child], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ['no output'])[-1]
        raise RuntimeError(f'RSS subprocess for {recipe} on {model} failed (exit {proc.returncode}): {tail}')
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------------------------ the benchmark
def benchmark(
        models: Sequence[str] = ('lkca_mobilenet',),
        recipes: Sequence[str] = RECIPES,
        variants: Sequence[tuple[str, dict[str, str]]] = (),
        image_size: int = 224,
        n_way: int = 5,
        k_shot: int = 5,
        rss: bool = True,
        rss_steps: int = 3,
        rss_repeats: int = 3,
        threads: int = 1,
        timeline_dir: Path | None = None,
        explain: int = 0,
        log: Callable[[str], object] | None = None,
) -> list[dict]:
    """One row per (model, recipe or variant): batch, trainable parameters, profiler peak and RSS growth in MiB.

    The RSS growth is the median of ``rss_repeats`` fresh processes (each one's readings are in ``rss_samples``).

    Ratios (``peak_ratio``, ``rss_ratio``) are the model's `BASELINE` value over the row's (how many times less),
    None when the baseline is not measured. Rows of protonet carry ``inference=True``.

    Example:
        >>> rows = benchmark(['lkca_mobilenet'], ['lean_5shot', 'full_finetune'], image_size=64, rss=False)
        >>> rows[0]['peak_ratio']  # full fine-tuning's peak / lean_5shot's
    """
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    try:
        for model in models:
            model_rows = []
            for recipe, overrides in [(r, {}) for r in recipes] + list(variants):
                cfg = recipe_config(recipe, model, overrides)
                label = _label(recipe, overrides)
                if log:
                    log(f'{model} / {label}: profiling')
                timeline = None
                if timeline_dir is not None:
                    timeline_dir.mkdir(parents=True, exist_ok=True)
                    timeline = timeline_dir / f"{model}-{label.replace(' ', '').replace(',', '-')}.json"
                row = dict(model=model, recipe=recipe, overrides=overrides, label=label,
                           inference=cfg.method == 'protonet')
                row.update(measure_profiler(cfg, image_size, n_way, k_shot, timeline, explain))
                if timeline is not None:
                    row['timeline'] = str(timeline)
                if rss:
                    if log:
                        log(f'{model} / {label}: RSS in {rss_repeats} fresh process(es)')
                    samples = [measure_rss(recipe, model, overrides, image_size, n_way, k_shot, rss_steps, threads)
                               for _ in range(rss_repeats)]
                    row['rss_samples'] = samples
                    for key in ('rss_growth_mb', 'hwm_growth_mb'):
                        values = [s[key] for s in samples if s[key] is not None]
                        row[key] = statistics.median(values) if values else None
                model_rows.append(row)
            base = next((r for r in model_rows if r['recipe'] == BASELINE and not r['overrides']), None)
            for row in model_rows:
                for key, ratio in (('peak_mb', 'peak_ratio'), ('rss_growth_mb', 'rss_ratio')):
                    value, ref = row.get(key), (base or {}).get(key)
                    row[ratio] = ref / value if value and ref and value > 0 else None
            rows += model_rows
    finally:
        torch.set_num_threads(saved_threads)
    return rows


def _times(ratio: float | None) -> str:
    if ratio is None:
        return '-'
    if abs(ratio - 1) < 1e-9:
        return 'baseline'
    return f'{ratio:.1f}x less' if ratio >= 1 else f'{1 / ratio:.1f}x more'


def format_table(rows: Sequence[dict]) -> str:
    """Markdown table of `benchmark` rows (one model's or several: then a model column leads)."""
    several = len({r['model'] for r in rows}) > 1
    head = (['model'] if several else []) + [
        'recipe', 'batch', 'trainable params', 'profiler peak (MiB)', f'vs {BASELINE}', 'peak in',
        'RSS growth (MiB)', f'vs {BASELINE}']
    lines = ['| ' + ' | '.join(head) + ' |',
             '|' + '|'.join([':---'] * (2 if several else 1) + ['---:'] * 4 + [':---'] + ['---:'] * 2) + '|']
    for r in rows:
        rss = r.get('rss_growth_mb')
        label = r['label'] + (' (inference: support features)' if r['inference'] else '')
        cells = ([r['model']] if several else []) + [
            label, str(r['batch']), f"{r['trainable']:,}", f"{r['peak_mb']:.2f}", _times(r['peak_ratio']),
            r.get('peak_at', {}).get('phase', '?'), '-' if rss is None else f'{rss:.1f}', _times(r.get('rss_ratio'))]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def format_details(rows: Sequence[dict]) -> str:
    """Per row: the categories at the peak, where the peak happens and (``--explain``) what is live then."""
    lines = []
    for r in rows:
        cats = ', '.join(f'{k} {v:+.2f}' for k, v in sorted(r['categories_mb'].items(), key=lambda kv: -abs(kv[1]))
                         if abs(v) >= 0.005)
        at = r.get('peak_at', {})
        where = f"reached in the {at.get('phase', '?')}" + (
            f"; {at['module_mb']:.2f} MiB of it made by {at['module']}" if 'module' in at else '')
        lines.append(f"- {r['model']} / {r['label']}: {r['peak_mb']:.2f} MiB at the peak = {cats or 'nothing'}; "
                     + where)
        for g in r.get('live_at_peak', []):
            lines.append(f"    {g['mb']:7.3f} MiB  {g['phase']:<14} {g['module']:<40} {g['op']}")
    return '\n'.join(lines)


# ------------------------------------------------------------------------------------------------ the CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python -m benchmarks.finetune_memory', description=__doc__.split('\n\n')[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--models', default='lkca_mobilenet', help='comma-separated timm model names')
    parser.add_argument('--recipes', default=','.join(RECIPES), help='comma-separated recipe names')
    parser.add_argument('--variant', action='append', default=[], metavar='RECIPE:KEY=VALUE[,KEY=VALUE]',
                        help='also measure a recipe with FinetuneConfig overrides (repeatable)')
    parser.add_argument('--lean-variants', action='store_true',
                        help=f"add the diagnosis variants: {'; '.join(LEAN_VARIANTS)}")
    parser.add_argument('--size', type=int, default=224, help='image height and width (px)')
    parser.add_argument('--ways', type=int, default=5, help='classes of the task (n_way)')
    parser.add_argument('--shots', type=int, default=5, help='support images per class (k_shot)')
    parser.add_argument('--threads', type=int, default=1, help='torch threads')
    parser.add_argument('--rss-steps', type=int, default=3, help='training steps of each RSS subprocess')
    parser.add_argument('--rss-repeats', type=int, default=3,
                        help='fresh processes per row; the table shows the median RSS growth')
    parser.add_argument('--no-rss', action='store_true', help='skip the RSS subprocesses (profiler only)')
    parser.add_argument('--explain', type=int, default=0, metavar='N',
                        help='list the N largest groups of allocations live at each peak')
    parser.add_argument('--timeline-dir', type=Path, help='keep the memory timeline JSON files here')
    parser.add_argument('--out', type=Path, help='also write the rows and settings to this JSON file')
    parser.add_argument('--rss-child', help=argparse.SUPPRESS)  # internal: one RSS measurement, JSON in and out
    return parser


def command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.rss_child:
        print(json.dumps(_rss_child(json.loads(args.rss_child))))
        return 0
    models = list(dict.fromkeys(m.strip() for m in args.models.split(',') if m.strip()))
    recipes = list(dict.fromkeys(r.strip() for r in args.recipes.split(',') if r.strip()))
    unknown = [r for r in recipes if r not in list_recipes()]
    if unknown:
        parser.error(f"unknown recipe(s) {', '.join(unknown)}; known: {', '.join(list_recipes())}")
    for option, value, low in (('--size', args.size, MIN_INPUT_SIZE), ('--ways', args.ways, 2),
                               ('--shots', args.shots, 1), ('--threads', args.threads, 1),
                               ('--rss-steps', args.rss_steps, 1), ('--rss-repeats', args.rss_repeats, 1),
                               ('--explain', args.explain, 0)):
        if value < low:
            parser.error(f'{option} must be at least {low}, got {value}')
    try:
        variants = [parse_variant(v) for v in list(LEAN_VARIANTS if args.lean_variants else ()) + args.variant]
    except ConfigError as e:
        parser.error(str(e))

    started = time.perf_counter()
    try:
        rows = benchmark(models, recipes, variants, args.size, args.ways, args.shots, not args.no_rss,
                         args.rss_steps, args.rss_repeats, args.threads, args.timeline_dir, args.explain,
                         log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except (BackboneError, ConfigError) as e:
        parser.error(str(e))
    import timm

    meta = dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
        cpu=f'{cpu_name()}/{platform.machine()}', cores=os.cpu_count(), torch=torch.__version__,
        timm=timm.__version__, threads=args.threads, size=args.size, n_way=args.ways, k_shot=args.shots,
        rss_steps=None if args.no_rss else args.rss_steps, rss_repeats=None if args.no_rss else args.rss_repeats,
        unit='MiB', seconds=round(time.perf_counter() - started, 1))
    print(f"Fine-tuning memory, {meta['date']}, {meta['cpu']}, {meta['cores']} cores, torch {meta['torch']}, "
          f"timm {meta['timm']}, {args.threads} thread{'s' if args.threads > 1 else ''}, {args.size} px, "
          f'{args.ways}-way {args.shots}-shot (support {args.ways * args.shots} images)')
    for model in models:
        print(f'\n{model}\n')
        print(format_table([r for r in rows if r['model'] == model]))
    rss_note = ('' if args.no_rss else f' RSS growth: ru_maxrss of a fresh process after {args.rss_steps} steps minus '
                f'before them, median of {args.rss_repeats} processes; a growth of a few MiB means the steps fit '
                f'under the set-up\'s own high-water mark, and its ratio means little.')
    print(f'\nProfiler peak: one training step after one warm-up step, memory timeline (torch.profiler, CPU), peak of '
          f'the per-timestep sum minus its value at the start, MiB.{rss_note} Ratios: {BASELINE} / row. Details of '
          f'each peak (backward formulas carry no module: parameter gradients appear as the backward op making them):'
          f'\n')
    print(format_details(rows))
    print(f"\nTotal time: {meta['seconds']:.0f} s.")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + '\n')
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    return command(parser.parse_args(argv), parser)


if __name__ == '__main__':
    sys.exit(main())
