"""The Omniglot benchmark against the literature: pretrain on the background alphabets, test on the evaluation ones.

One command, for each backbone (default: ``lkca_mobilenet``, its 3x3 twin ``lkca_mobilenet_dw3`` and timm's
``tf_mobilenetv3_small_100``):

1. pretraining from scratch on the *base* classes (background alphabets minus the five val alphabets; the
   recipe's ``rotations`` adds 90/180/270 degree turns as classes, off by default: it lost at this budget) through
   `fewshot_lkca.pretrain` with ``recipes/pretrain_omniglot.yaml``; the val alphabets pick ``best.safetensors``;
   the wall time and the median step time are recorded;
2. export of the frozen backbone (pre-logits features) to ONNX fp32 (the package's
   `fewshot_lkca.export.onnx.export_onnx`) and int8
   (`fewshot_lkca.export.int8.quantize_onnx`, calibrated on upright images of the base split);
3. features of every image of the 20 evaluation alphabets (659 characters x 20 drawings) and of the 20 official
   one-shot runs, with PyTorch fp32, onnxruntime fp32 and onnxruntime int8;
4. nearest-prototype episodes (L2-normalised features, `fewshot_lkca.metrics.prototype_episode_accuracies`):
   5-way and 20-way, 1-shot and 5-shot, 15 queries per class, ``--episodes`` each (mean and 95% CI), the same
   episodes for every model and precision (so differences are paired); and the error rate over the 20 official
   20-way one-shot runs (nearest training drawing, cosine, as `fewshot_lkca.evaluate --omniglot-runs`).

It prints a Markdown table next to the literature's reference points and writes ``--out`` (JSON) and the table
beside it (``.md``)::

    python -m benchmarks.omniglot                                  # the three backbones, the recipe's settings
    python -m benchmarks.omniglot --models lkca_mobilenet --steps 500 --image-size 48 --threads 2
    python -m benchmarks.omniglot --quick                          # smoke run: a few steps, small evaluation
    python -m benchmarks.omniglot --reuse                          # evaluate finished pretraining runs again
    python -m benchmarks.omniglot --models lkca_mobilenet --pretrain-only   # one model now, --reuse later

Reference points are not all on this protocol: Prototypical Networks (Snell et al., 2017) used Vinyals et al.'s
split (1,200 training characters from background *and* evaluation alphabets, 423 test characters); here the
training characters come from the 25 non-val background alphabets only (779 characters) and the test characters
are all 659 of the evaluation alphabets. Lake et al.'s 20 one-shot runs are the same protocol as theirs.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from benchmarks.common import cpu_name

if TYPE_CHECKING:  # torch loads at run time, after main() has set the OpenMP wait policy
    import torch

MODELS = ('lkca_mobilenet', 'lkca_mobilenet_dw3', 'tf_mobilenetv3_small_100')
SETTINGS = ((5, 1), (5, 5), (20, 1), (20, 5))  # (n_way, k_shot), the literature's four
ENGINES = ('torch_fp32', 'onnx_fp32', 'onnx_int8')
TABLE_ENGINES = {'torch_fp32': 'fp32 (PyTorch)', 'onnx_int8': 'int8 (ONNX)'}
RECIPE = 'pretrain_omniglot'
# --quick: a smoke configuration that exercises every stage in about a minute (no meaningful accuracy).
QUICK = dict(steps=3, image_size=32, episodes=20, novel_classes=20, max_runs=2, calibration_images=8,
             pretrain_overrides=dict(batch_size='16', val_split='', eval_every='0'))

# Literature, accuracy in % (5-way 1-shot, 5-way 5-shot, 20-way 1-shot, 20-way 5-shot) or error in % on the runs.
REFERENCES = (
    dict(name='Prototypical Networks (Snell et al. 2017), Conv-4, 28 px *',
         accuracy={'5w1s': 98.8, '5w5s': 99.7, '20w1s': 96.0, '20w5s': 98.9}, runs_error=None),
    dict(name='Human (Lake et al. 2015)', accuracy={}, runs_error=4.5),
    dict(name='Bayesian Program Learning (Lake et al. 2015)', accuracy={}, runs_error=3.3),
)
def reference_note(results: list[dict]) -> str:
    """What the starred reference trained and tested on, next to what this run did."""
    note = ("* Vinyals et al.'s split: 1,200 training characters from background and evaluation alphabets "
            '(x4 rotations), 423 test characters.')
    if not results:
        return note
    pre = results[0]['pretrain']
    rotations = pre['config']['rotations']
    characters = pre['classes'] // 4 if rotations else pre['classes']
    return (f"{note} Here: {characters} training characters{' (x4 rotations)' if rotations else ' (no rotations)'} "
            f'from the background alphabets, all {results[0]["novel_classes"]} characters of the evaluation alphabets '
            'for testing.')


class BenchmarkError(ValueError):
    """Bad benchmark options or inputs (unknown model, missing data)."""


def setting_key(n_way: int, k_shot: int) -> str:
    return f'{n_way}w{k_shot}s'


@dataclass
class BenchConfig:
    """Every benchmark setting, with the reason for its default."""
    models: tuple[str, ...] = MODELS
    recipe: str = RECIPE  # the pretraining recipe (a name in recipes/ or a YAML file)
    steps: int = 0  # pretraining steps; 0 = the recipe's
    image_size: int = 0  # model input side in px, pretraining and evaluation alike; 0 = the recipe's
    threads: int = 2  # torch and onnxruntime threads: the development machine has 2 cores
    episodes: int = 600  # per setting: a 95% CI of about +-0.2-0.5 points at these accuracies
    n_query: int = 15  # queries per class, as Snell et al.; 20-way 5-shot then uses all 20 drawings of a class
    seed: int = 0  # pretraining, episode draws and calibration images
    int8: bool = True  # export and evaluate the int8 ONNX model (and ONNX fp32) next to PyTorch fp32
    calibration_images: int = 128  # upright base-split images for the int8 calibration
    novel_classes: int = 0  # evaluate on this many evaluation characters (drawn with the seed); 0 = all 659
    max_runs: int = 0  # official one-shot runs to use; 0 = all 20
    official_runs: str = ''  # all_runs.zip or its folder; '' = the one beside the Omniglot npz files
    pretrain_overrides: dict = field(default_factory=dict)  # PretrainConfig fields (text values), after the recipe
    runs_dir: str = 'runs/omniglot_benchmark'  # pretraining run directories, one per model
    out: str = 'benchmarks/results/omniglot.json'  # results JSON; the Markdown table goes beside it ('' = none)
    reuse: bool = False  # evaluate a finished pretraining run with the same config instead of training again
    pretrain_only: bool = False  # stop after pretraining (a long benchmark in parts on a shared machine; then --reuse)
    batch_size: int = 256  # images per forward pass while embedding
    progress: bool = True

    def validate(self) -> BenchConfig:
        if not self.models:
            raise BenchmarkError('give at least one model (--models)')
        for name in ('threads', 'episodes', 'n_query', 'calibration_images', 'batch_size'):
            if getattr(self, name) < 1:
                raise BenchmarkError(f'{name} must be >= 1, got {getattr(self, name)}')
        for name in ('steps', 'image_size', 'novel_classes', 'max_runs'):
            if getattr(self, name) < 0:
                raise BenchmarkError(f'{name} must be >= 0, got {getattr(self, name)}')
        if self.novel_classes and self.novel_classes < max(n for n, _ in SETTINGS):
            raise BenchmarkError(f'novel_classes must be 0 (all) or >= {max(n for n, _ in SETTINGS)} for the 20-way '
                                 f'episodes, got {self.novel_classes}')
        if self.n_query + max(k for _, k in SETTINGS) > 20:
            raise BenchmarkError(f'n_query {self.n_query} + 5 shots exceeds the 20 drawings of an Omniglot character')
        import timm

        import fewshot_lkca  # noqa: F401  (registers the lkca_mobilenet family with timm)

        unknown = [m for m in self.models if not timm.is_model(m)]
        if unknown:
            raise BenchmarkError(f'unknown model(s) {unknown}; e.g. {", ".join(MODELS)}')
        return self


# ------------------------------------------------------------------------------------------------ pretraining
def pretrain_config(bench: BenchConfig, model: str):
    """The resolved `PretrainConfig` of one model: recipe < benchmark options < ``pretrain_overrides``."""
    from fewshot_lkca.config import resolve_config
    from fewshot_lkca.pretrain import PretrainConfig

    overrides = dict(model=model, seed=str(bench.seed), out=str(Path(bench.runs_dir) / model))
    if bench.steps:
        overrides['steps'] = str(bench.steps)
    if bench.image_size:
        overrides['image_size'] = str(bench.image_size)
    overrides.update(bench.pretrain_overrides)
    return resolve_config(bench.recipe, overrides, config_cls=PretrainConfig)


def _finished_run(cfg) -> dict | None:
    """metrics.json of a finished run in ``cfg.out`` trained with exactly ``cfg``, else None."""
    root = Path(cfg.out)
    try:
        saved = json.loads((root / 'config.json').read_text())
        metrics = json.loads((root / 'metrics.json').read_text())
    except (OSError, ValueError):
        return None
    return metrics if saved == cfg.to_dict() else None


def _step_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / 'log.jsonl').read_text().splitlines() if line.strip()]


def _logged_wall_seconds(records: list[dict]) -> float:
    """Wall time of a finished run from its log (first step's start to last step's end, val included)."""
    return records[-1]['time'] - (records[0]['time'] - records[0]['sec'])


def pretrain(bench: BenchConfig, model: str, log=print) -> dict:
    """Pretrain ``model`` on the base classes (or reuse a finished identical run); returns what the table needs."""
    from fewshot_lkca.pretrain import pretrain_command

    cfg = pretrain_config(bench, model)
    metrics = _finished_run(cfg) if bench.reuse else None
    reused = metrics is not None
    if reused:
        wall = _logged_wall_seconds(_step_log(Path(cfg.out)))
        log(f'{model}: reusing the finished pretraining run {cfg.out}')
    else:
        start = time.perf_counter()
        metrics = pretrain_command(cfg, overwrite=True, progress=bench.progress, log=log, distributed=False)
        wall = time.perf_counter() - start
    # The median step is what the CPU gives one step when nobody else runs much: the wall time on a shared machine
    # mixes in everyone else's load.
    median_step = float(np.median([r['sec'] for r in _step_log(Path(cfg.out))]))
    best = (metrics.get('val') or {}).get('best')
    checkpoint = Path(cfg.out) / ('best.safetensors' if best else 'last.safetensors')
    return dict(config=cfg.to_dict(), run_dir=cfg.out, checkpoint=str(checkpoint), reused=reused,
                wall_seconds=round(wall, 1), train_seconds=round(metrics['train_seconds'], 1), steps=cfg.steps,
                median_step_seconds=round(median_step, 4), steps_x_median_seconds=round(cfg.steps * median_step, 1),
                classes=metrics['data']['classes'], images=metrics['data']['images'],
                image_size=metrics['data']['image_size'], train=metrics['train'],
                val_best=best, val_protocol=None if not metrics.get('val') else
                {k: metrics['val'][k] for k in ('split', 'n_way', 'k_shot', 'n_query', 'episodes')})


# ------------------------------------------------------------------------------------------------ the engines
def export_onnx(backbone: torch.nn.Module, size: int, path: Path) -> None:
    """fp32 ONNX of the frozen backbone (features out), dynamic batch, written atomically: the package's export."""
    import torch

    from fewshot_lkca.export.onnx import check_onnx, export_onnx, save_onnx

    proto = export_onnx(backbone, torch.zeros(2, 3, size, size), output_name='features')
    check_onnx(proto)
    save_onnx(proto, path)


def ort_session(path: Path, threads: int):
    from fewshot_lkca.export.session import onnx_session

    return onnx_session(path, threads, spin=False)  # idle threads spinning take CPU from a shared 2-core machine


class TorchEngine:
    """Features of a float32 N x 3 x H x W array with the PyTorch backbone."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        self.backbone = backbone.eval()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.backbone(torch.from_numpy(images)).float().numpy()


class OnnxEngine:
    """Features of a float32 N x 3 x H x W array with an onnxruntime session."""

    def __init__(self, session) -> None:
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: images})[0]


def embed(engines: dict, images, transform, batch_size: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Features of every image with every engine (each batch preprocessed once), and each engine's seconds."""
    features = {name: [] for name in engines}
    seconds = dict.fromkeys(engines, 0.0)
    for start in range(0, len(images), batch_size):
        batch = np.stack([transform(images[i]).numpy() for i in range(start, min(start + batch_size, len(images)))])
        for name, engine in engines.items():
            tick = time.perf_counter()
            features[name].append(engine(batch))
            seconds[name] += time.perf_counter() - tick
    return {name: np.concatenate(chunks) for name, chunks in features.items()}, seconds


# ------------------------------------------------------------------------------------------------ the data
class _Images:
    """HxWx3 uint8 arrays of chosen samples of a data set, by position (no transform)."""

    def __init__(self, dataset, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.dataset.load(self.indices[i])


@dataclass
class EvalData:
    """What every model is evaluated on: the evaluation-alphabet images, the official runs, calibration images."""
    novel: _Images
    labels: torch.Tensor
    classes: int
    runs: list
    calibration: _Images
    runs_path: str


def load_eval_data(bench: BenchConfig) -> EvalData:
    """The novel split (optionally a seeded subset of its characters), the official runs, calibration images."""
    import torch

    from fewshot_lkca.data import get_dataset, read_one_shot_runs

    novel = get_dataset('omniglot', split='novel')
    rng = np.random.default_rng(bench.seed)
    n_classes = len(novel.classes)
    chosen = sorted(rng.choice(n_classes, bench.novel_classes, replace=False).tolist()) if bench.novel_classes and \
        bench.novel_classes < n_classes else list(range(n_classes))
    relabel = {c: i for i, c in enumerate(chosen)}
    indices = [i for i, t in enumerate(novel.targets) if t in relabel]
    labels = torch.tensor([relabel[novel.targets[i]] for i in indices])

    runs_path = bench.official_runs or str(Path(getattr(novel, 'root', '.')) / 'all_runs.zip')
    if not Path(runs_path).exists():
        raise BenchmarkError(f'official one-shot runs not found: {runs_path} (pass --omniglot-runs)')
    runs = read_one_shot_runs(runs_path)
    if bench.max_runs:
        runs = runs[:bench.max_runs]

    # Calibration: upright base-split images (never the evaluation alphabets), spread over characters by the seed.
    base = get_dataset('omniglot', split='base')
    picked = rng.choice(len(base), min(bench.calibration_images, len(base)), replace=False)
    return EvalData(_Images(novel, indices), labels, len(chosen), runs, _Images(base, sorted(picked.tolist())),
                    runs_path)


# ------------------------------------------------------------------------------------------------ the protocols
def episode_accuracies(features: np.ndarray, labels: torch.Tensor, episodes: int, n_query: int,
                       seed: int) -> dict[str, torch.Tensor]:
    """Per-episode accuracies of each setting; episode i of a setting is the same draw for every feature set."""
    import torch

    from fewshot_lkca.metrics import prototype_episode_accuracies

    feats = torch.from_numpy(features)
    return {setting_key(n, k): prototype_episode_accuracies(feats, labels, n, k, n_query, episodes, seed=seed)
            for n, k in SETTINGS}


def runs_errors(features: np.ndarray, runs: list) -> dict:
    """Error rate over the official runs: each test drawing takes the class of its nearest training drawing."""
    import torch

    from fewshot_lkca.evaluate import nearest_neighbour_errors
    from fewshot_lkca.metrics import mean_ci

    n_train, n_test = len(runs[0].train_images), len(runs[0].test_images)
    feats = torch.from_numpy(features).view(len(runs), n_train + n_test, -1)
    answers = torch.stack([torch.as_tensor(r.answers) for r in runs])
    errors = nearest_neighbour_errors(feats[:, :n_train], feats[:, n_train:], answers)
    ci = mean_ci((errors.double() / n_test).tolist())
    return dict(runs=len(runs), tests=len(runs) * n_test, errors=int(errors.sum()), error=ci.mean, ci95=ci.ci95,
                per_run=errors.tolist())


def _summary(accs: dict[str, torch.Tensor]) -> dict:
    from fewshot_lkca.metrics import mean_ci

    return {key: mean_ci(values.tolist()).as_dict() for key, values in accs.items()}


def _paired(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    """Mean and 95% CI of a - b over the same episodes, per setting."""
    return _summary({key: a[key] - b[key] for key in a})


# ------------------------------------------------------------------------------------------------ one model
def evaluate_model(bench: BenchConfig, model: str, pre: dict, data: EvalData, work: Path,
                   log=print) -> tuple[dict, dict]:
    """Every engine of one pretrained model on the episodes and the runs; returns (results, per-episode accuracies)."""
    from fewshot_lkca.checkpoint import load_backbone
    from fewshot_lkca.data import eval_transform
    from fewshot_lkca.evaluate import _data_cfg  # the checkpoint's preprocessing over the backbone's cfg

    backbone, meta, _ = load_backbone(model, pre['checkpoint'])
    size = int(meta.get('image_size') or pre['image_size'])
    transform = eval_transform(_data_cfg(backbone, meta), size=size)
    engines = {'torch_fp32': TorchEngine(backbone)}
    export = {}
    if bench.int8:
        from fewshot_lkca.export.int8 import depthwise_plan, quantize_onnx

        work.mkdir(parents=True, exist_ok=True)
        fp32_path, int8_path = work / f'{model}.onnx', work / f'{model}.int8.onnx'
        tick = time.perf_counter()
        export_onnx(backbone, size, fp32_path)
        export_seconds = time.perf_counter() - tick
        calibration = np.stack([transform(data.calibration[i]).numpy() for i in range(len(data.calibration))])
        tick = time.perf_counter()
        with _quiet_quantizer():
            report = quantize_onnx(fp32_path, int8_path, calibration, depthwise=depthwise_plan(model))
        export = dict(onnx_fp32=str(fp32_path), onnx_int8=str(int8_path), export_seconds=round(export_seconds, 1),
                      quantize_seconds=round(time.perf_counter() - tick, 1), fp32_bytes=report['fp32_bytes'],
                      int8_bytes=report['int8_bytes'], calibration_images=len(calibration),
                      calibration_source='omniglot base split (background alphabets, upright)',
                      quantized_nodes=report['quantized_nodes'], kept_fp32_nodes=report['kept_fp32_nodes'],
                      settings=report['settings'])
        engines['onnx_fp32'] = OnnxEngine(ort_session(fp32_path, bench.threads))
        engines['onnx_int8'] = OnnxEngine(ort_session(int8_path, bench.threads))

    tick = time.perf_counter()
    novel_features, seconds = embed(engines, data.novel, transform, bench.batch_size)
    run_images = [image for run in data.runs for image in (*run.train_images, *run.test_images)]
    run_features, _ = embed(engines, run_images, transform, bench.batch_size)
    log(f'{model}: {len(data.novel)} evaluation images and {len(run_images)} run images embedded at {size} px by '
        f'{", ".join(engines)} in {time.perf_counter() - tick:.0f} s')

    engines_out, accs = {}, {}
    for name in engines:
        accs[name] = episode_accuracies(novel_features[name], data.labels, bench.episodes, bench.n_query, bench.seed)
        engines_out[name] = dict(episodes=_summary(accs[name]),
                                 official_runs=runs_errors(run_features[name], data.runs),
                                 images_per_second=round(len(data.novel) / max(seconds[name], 1e-9), 1))
    result = dict(model=model, image_size=size, novel_classes=data.classes,
                  feature_dim=int(novel_features['torch_fp32'].shape[1]),
                  pretrain=pre, export=export, engines=engines_out)
    if bench.int8:
        reference = novel_features['torch_fp32']
        result['parity'] = dict(
            onnx_fp32_max_abs_diff=float(np.abs(novel_features['onnx_fp32'] - reference).max()),
            int8_feature_cosine_mean=float(_cosine(novel_features['onnx_int8'], reference).mean()),
            int8_feature_cosine_min=float(_cosine(novel_features['onnx_int8'], reference).min()),
            int8_minus_fp32=_paired(accs['onnx_int8'], accs['torch_fp32']))
    return result, accs


@contextlib.contextmanager
def _quiet_quantizer():
    """onnxruntime's quantizer prints progress and logs advice on the root logger: not this table's business."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return (a * b).sum(1)


# ------------------------------------------------------------------------------------------------ the table
def _pct(summary: dict) -> str:
    return f"{100 * summary['mean']:.2f} +- {100 * summary['ci95']:.2f}"


def format_table(results: list[dict]) -> str:
    """Markdown: one row per model and precision, then the references (accuracy %, runs error %)."""
    heads = [f'{n}-way {k}-shot' for n, k in SETTINGS]
    lines = ['| model | precision | ' + ' | '.join(heads) + ' | official runs: error | pretraining |',
             '|:---|:---|' + '---:|' * len(SETTINGS) + '---:|---:|']  # pretraining: wall (steps x median step)
    for r in results:
        pre = r['pretrain']
        for engine, label in TABLE_ENGINES.items():
            if engine not in r['engines']:
                continue
            e = r['engines'][engine]
            cells = [_pct(e['episodes'][setting_key(n, k)]) for n, k in SETTINGS]
            runs = e['official_runs']
            lines.append(f"| {r['model']} | {label} | " + ' | '.join(cells) +
                         f" | {100 * runs['error']:.2f} % ({runs['errors']}/{runs['tests']}) | "
                         f"{pre['wall_seconds']:.0f} s ({pre['steps']} steps x {pre['median_step_seconds']:.2f} s) |")
    for ref in REFERENCES:
        cells = [f"{ref['accuracy'][setting_key(n, k)]:.1f}" if setting_key(n, k) in ref['accuracy'] else '-'
                 for n, k in SETTINGS]
        error = f"{ref['runs_error']:.1f} %" if ref['runs_error'] is not None else '-'
        lines.append(f"| {ref['name']} | - | " + ' | '.join(cells) + f' | {error} | - |')
    return '\n'.join(lines)


def verdicts(results: list[dict]) -> list[str]:
    """One line per int8 model: which reference points it beats (mean; 'within CI' where the CI reaches them)."""
    lines = []
    for r in results:
        engine = 'onnx_int8' if 'onnx_int8' in r['engines'] else 'torch_fp32'
        e = r['engines'][engine]
        parts = []
        for ref in REFERENCES:
            for key, value in ref['accuracy'].items():
                s = e['episodes'][key]
                mean, ci = 100 * s['mean'], 100 * s['ci95']
                word = 'beats' if mean > value else 'misses'
                tied = ' (within CI)' if abs(mean - value) <= ci else ''
                parts.append(f'{key} {mean:.2f} vs {value} {word}{tied}')
            if ref['runs_error'] is not None:
                error = 100 * e['official_runs']['error']
                word = 'beats' if error < ref['runs_error'] else 'misses'
                parts.append(f"runs error {error:.2f} % vs {ref['name'].split(' (')[0]} {ref['runs_error']} % {word}")
        lines.append(f"- {r['model']} {TABLE_ENGINES[engine]}: " + '; '.join(parts))
    return lines


def paired_lines(results: list[dict], accs: dict[str, dict]) -> tuple[list[str], dict]:
    """Each model minus the first one (fp32, same episodes), in accuracy points."""
    if len(results) < 2:
        return [], {}
    first = results[0]['model']
    lines, out = [], {}
    for r in results[1:]:
        diff = _paired(accs[first]['torch_fp32'], accs[r['model']]['torch_fp32'])
        out[f"{first} - {r['model']}"] = diff
        cells = ', '.join(f"{key} {100 * d['mean']:+.2f} +- {100 * d['ci95']:.2f}" for key, d in diff.items())
        lines.append(f"- {first} minus {r['model']} (fp32, paired over the same episodes, points): {cells}")
    return lines, out


# ------------------------------------------------------------------------------------------------ the command
def run_benchmark(bench: BenchConfig, log=print) -> dict:
    """Pretrain, export and evaluate every model; returns the results (also written to ``bench.out``)."""
    import torch

    bench.validate()
    for model in bench.models:  # every config resolves before the first (long) pretraining starts
        pretrain_config(bench, model)
    threads = torch.get_num_threads()
    torch.set_num_threads(bench.threads)
    start, loads = time.perf_counter(), [os.getloadavg()[0]]
    try:
        if bench.pretrain_only:
            pretrained = [pretrain(bench, model, log) for model in bench.models]
            for model, pre in zip(bench.models, pretrained, strict=True):
                log(f"{model}: {pre['steps']} steps in {pre['wall_seconds']:.0f} s -> {pre['checkpoint']}")
            return dict(pretrain_only=True, pretrain=dict(zip(bench.models, pretrained, strict=True)))
        data = load_eval_data(bench)
        results, accs = [], {}
        for model in bench.models:
            pre = pretrain(bench, model, log)
            loads.append(os.getloadavg()[0])
            tick = time.perf_counter()
            result, accs[model] = evaluate_model(bench, model, pre, data, Path(bench.runs_dir) / 'onnx', log)
            result['evaluation_seconds'] = round(time.perf_counter() - tick, 1)  # export, quantization, features
            results.append(result)
            loads.append(os.getloadavg()[0])
    finally:
        torch.set_num_threads(threads)
    table = format_table(results)
    lines, paired = paired_lines(results, accs)
    import onnxruntime

    note = reference_note(results)
    pretraining = sum(r['pretrain']['wall_seconds'] for r in results)
    reused = [r['model'] for r in results if r['pretrain']['reused']]
    out = dict(
        benchmark='omniglot', date=datetime.date.today().isoformat(),
        wall_seconds=round(time.perf_counter() - start, 1), pretraining_wall_seconds=round(pretraining, 1),
        reused_pretraining=reused,
        machine=dict(cpu=cpu_name(), cores=os.cpu_count(), threads=bench.threads, platform=platform.platform(),
                     torch=torch.__version__, onnxruntime=onnxruntime.__version__,
                     load_average_1min=dict(start=loads[0], end=loads[-1], mean=round(sum(loads) / len(loads), 2),
                                            samples=loads)),
        settings=dict({k: v for k, v in dataclasses.asdict(bench).items() if k != 'progress'},
                      models=list(bench.models), settings=[setting_key(n, k) for n, k in SETTINGS]),
        protocol=dict(novel_classes=data.classes, novel_images=len(data.novel), official_runs=len(data.runs),
                      runs_path=data.runs_path, n_query=bench.n_query, episodes=bench.episodes,
                      classifier='nearest prototype on L2-normalised features (runs: nearest drawing, cosine)'),
        references=list(REFERENCES), reference_note=note, results=results, paired_vs_first=paired,
        table=table, verdicts=verdicts(results))
    where = f' (reused runs, from their logs: {", ".join(reused)})' if reused else ''
    text = '\n'.join([f"Omniglot, {out['date']}: {out['machine']['cpu']}, {bench.threads} threads, load average "
                      f"{loads[0]:.1f} -> {loads[-1]:.1f}; this command {out['wall_seconds']:.0f} s, pretraining "
                      f'{pretraining:.0f} s{where}', '', table, '', note, '', *out['verdicts'], *lines])
    log('')
    log(text)
    if bench.out:
        from fewshot_lkca.files import atomic_write

        path = Path(bench.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(out, indent=2) + '\n'))
        atomic_write(path.with_suffix('.md'), lambda tmp: tmp.write_text(text + '\n'))
        log(f'results: {path} and {path.with_suffix(".md")}')
    return out


def build_parser() -> argparse.ArgumentParser:
    d = BenchConfig()
    parser = argparse.ArgumentParser(prog='python -m benchmarks.omniglot', description=__doc__.splitlines()[0])
    parser.add_argument('--models', help=f'comma-separated backbones (default: {",".join(d.models)})')
    parser.add_argument('--recipe', help=f'pretraining recipe (default: {d.recipe})')
    parser.add_argument('--steps', type=int, help="pretraining steps (default: the recipe's)")
    parser.add_argument('--image-size', type=int, dest='image_size', help="input side in px (default: the recipe's)")
    parser.add_argument('--threads', type=int, help=f'CPU threads (default: {d.threads})')
    parser.add_argument('--episodes', type=int, help=f'episodes per setting (default: {d.episodes})')
    parser.add_argument('--seed', type=int, help=f'default: {d.seed}')
    parser.add_argument('--calibration-images', type=int, dest='calibration_images',
                        help=f'int8 calibration images from the base split (default: {d.calibration_images})')
    parser.add_argument('--novel-classes', type=int, dest='novel_classes',
                        help='evaluate on this many evaluation characters (default: all)')
    parser.add_argument('--omniglot-runs', dest='official_runs', metavar='PATH',
                        help='all_runs.zip or its folder (default: beside the Omniglot npz files)')
    parser.add_argument('--no-int8', dest='int8', action='store_false', default=None,
                        help='PyTorch fp32 only: no ONNX export or quantization')
    parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                        help='PretrainConfig override for every model, e.g. --set lr=0.004')
    parser.add_argument('--runs', dest='runs_dir', help=f'pretraining run directories (default: {d.runs_dir})')
    parser.add_argument('--out', help=f"results JSON, the table beside it as .md; '' = none (default: {d.out})")
    parser.add_argument('--reuse', action='store_true', default=None,
                        help='reuse finished pretraining runs with the same config instead of training again')
    parser.add_argument('--pretrain-only', dest='pretrain_only', action='store_true', default=None,
                        help='stop after pretraining; evaluate later with --reuse')
    parser.add_argument('--quick', action='store_true', help='smoke configuration: a few steps, small evaluation')
    parser.add_argument('--no-progress', dest='progress', action='store_false', default=None, help='no progress bars')
    return parser


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Defaults < ``--quick`` < the explicit options."""
    from fewshot_lkca.config import parse_override

    changes = {}
    if args.quick:
        changes.update(QUICK)
        changes['pretrain_overrides'] = dict(QUICK['pretrain_overrides'])
        changes['runs_dir'] = 'runs/omniglot_benchmark_quick'
        changes['out'] = ''
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ('quick', 'set', 'models')}
    changes.update(given)
    if args.models:
        changes['models'] = tuple(m.strip() for m in args.models.split(',') if m.strip())
    if args.set:
        changes['pretrain_overrides'] = dict(changes.get('pretrain_overrides', {}),
                                             **dict(parse_override(s) for s in args.set))
    return dataclasses.replace(BenchConfig(), **changes)


def main(argv: list[str] | None = None) -> None:
    from fewshot_lkca.checkpoint import CheckpointError
    from fewshot_lkca.config import ConfigError
    from fewshot_lkca.data import DataError
    from fewshot_lkca.export.int8 import QuantizationError
    from fewshot_lkca.models.factory import BackboneError
    from fewshot_lkca.rundir import RunError

    args = build_parser().parse_args(argv)
    try:
        run_benchmark(config_from_args(args))
    except (BenchmarkError, ConfigError, DataError, RunError, CheckpointError, BackboneError, QuantizationError) as e:
        raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
    main()
