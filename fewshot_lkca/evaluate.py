"""Episodic few-shot evaluation of a frozen backbone: ``python -m fewshot_lkca.evaluate --shots 1 5``.

The backbone's pre-logits features (``num_classes=0``) are computed once per image of the split, in eval mode, and
kept in memory; every N-way K-shot episode is then nearest-prototype (ProtoNet) classification of those cached
features (`fewshot_lkca.metrics.prototype_episode_accuracies`). The accuracy is reported as the mean over
``--episodes`` episodes (600 by default) with its 95% confidence interval, for each ``--shots`` value.

``--omniglot-runs all_runs.zip`` runs the official Omniglot protocol instead (Lake et al., Science 2015): in each of
the 20 runs, each of the 20 test drawings takes the class of its nearest (cosine) of the 20 training drawings; the
result is the error rate over the 400 test drawings (human error: 4.5 %).

The weights can be a fine-tuned checkpoint written by `fewshot_lkca.finetune`: its fine-tuned *backbone* is evaluated
with nearest prototypes. Its cosine head is not used, because it was trained for the task's own classes and means
nothing for the classes of a new episode.

Examples::

    python -m fewshot_lkca.evaluate --weights ../shared/weights/tf_mobilenetv3_small_100.in1k.pth --shots 1 5
    python -m fewshot_lkca.evaluate --weights runs/lookalike-lkca_mobilenet-5w5s-finetune-seed0/model.safetensors
    python -m fewshot_lkca.evaluate --data omniglot --ways 20 --shots 1 5 --weights path/to/base.safetensors
    python -m fewshot_lkca.evaluate --omniglot-runs ../shared/data/omniglot/all_runs.zip \\
        --model tf_mobilenetv3_small_100 --weights ../shared/weights/tf_mobilenetv3_small_100.in1k.pth
"""
import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import DEFAULT_MODEL, CheckpointError, load_backbone
from .config import ConfigError
from .console import quiet_console
from .errors import DataError
from .features import RawImages, embed_images
from .files import atomic_write
from .metadata import PREPROCESSING_KEYS, preprocessing
from .metrics import mean_ci, prototype_episode_accuracies
from .models import MIN_INPUT_SIZE
from .models.factory import BackboneError
from .task import input_size
from .threads import add_threads_argument, set_threads

__all__ = ['EvalConfig', 'build_parser', 'evaluate_command', 'main', 'nearest_neighbour_errors']

_OMNIGLOT_HUMAN_ERROR = 4.5  # % over the 20 runs, reported in the Science paper
# Options of the episode protocol (field -> flag) that the fixed Omniglot runs protocol refuses.
_EPISODE_OPTIONS = {'data': '--data', 'split': '--split', 'n_way': '--ways', 'k_shots': '--shots',
                    'n_query': '--queries', 'episodes': '--episodes'}


@dataclass
class EvalConfig:
    """Every evaluation setting, with the reason for its default."""
    model: str = ''  # timm name; '' = the checkpoint's model, else lkca_mobilenet
    weights: str = 'imagenet'  # 'imagenet', 'random', a source state_dict to transplant, or a .safetensors checkpoint
    data: str = 'lookalike'  # data card name or image-folder path; the built-in set needs no download
    split: str = 'novel'  # classes the backbone never trained on
    n_way: int = 5
    k_shots: tuple[int, ...] = (1, 5)  # the literature reports 1-shot and 5-shot side by side
    n_query: int = 15  # the literature's 15 queries per class
    episodes: int = 600  # >= 600 episodes make a 95% CI of about +-1 %
    image_size: int = 0  # 0 = the checkpoint's, else the data card's native size, else the model's pretrained cfg
    seed: int = 0  # picks the episodes, and the initialisation of --weights random
    omniglot_runs: str = ''  # all_runs.zip or its folder: the official 20-way one-shot protocol instead of episodes
    batch_size: int = 64  # images per forward pass while caching features
    json: str = ''  # also write the results to this file

    def validate(self) -> 'EvalConfig':
        """Refuse values that cannot work, naming the option."""
        if self.n_way < 2:
            raise ConfigError(f'n_way must be >= 2 (one class is no classification), got {self.n_way}')
        if not self.k_shots:
            raise ConfigError('give at least one k_shot (--shots)')
        for k in self.k_shots:
            if k < 1:
                raise ConfigError(f'k_shot must be >= 1, got {k}')
        self.k_shots = tuple(dict.fromkeys(int(k) for k in self.k_shots))  # drop repeats, keep the order
        for name in ('n_query', 'episodes', 'batch_size'):
            if getattr(self, name) < 1:
                raise ConfigError(f'{name} must be >= 1, got {getattr(self, name)}')
        if self.omniglot_runs:
            defaults = EvalConfig()
            clash = [flag for key, flag in _EPISODE_OPTIONS.items() if getattr(self, key) != getattr(defaults, key)]
            if clash:
                raise ConfigError(f'--omniglot-runs is the fixed 20-way one-shot protocol; drop {", ".join(clash)}')
        if self.image_size and not self.image_size >= MIN_INPUT_SIZE:
            raise ConfigError(f'image_size must be 0 (default) or >= {MIN_INPUT_SIZE} (the backbones downsample '
                              f'32x), got {self.image_size}')
        return self


# ------------------------------------------------------------------------------------------------ the backbone
def _data_cfg(backbone: nn.Module, meta: dict) -> dict:
    """The backbone's pretrained cfg, with the preprocessing a checkpoint recorded (mean, std, ...) on top."""
    cfg = dict(backbone.pretrained_cfg)
    for key in PREPROCESSING_KEYS:
        if key in meta and key != 'image_size':
            cfg[key] = tuple(meta[key]) if isinstance(meta[key], list) else meta[key]
    return cfg


# ------------------------------------------------------------------------------------------------ the protocols
def _image_size(cfg: EvalConfig, meta: dict, dataset=None) -> tuple[int, str]:
    """The input side and where it came from (`fewshot_lkca.task.input_size`: option, checkpoint, data, photos)."""
    return input_size(cfg.data, cfg.image_size, dataset, int(meta.get('image_size') or 0))


def _overlap_note(meta: dict, classes: list[str]) -> str:
    trained = set(meta.get('classes') or ())
    shared = trained & set(classes)
    if not shared:
        return ''
    return (f'note: the checkpoint was trained on {len(shared)} of these {len(classes)} classes; episodes that '
            f'draw them are not held out')


def _episodes(cfg: EvalConfig, backbone: nn.Module, meta: dict, progress: bool, log) -> dict:
    from .data import eval_transform, get_dataset, usable_classes

    # The data as its card defines it (the look-alike set rendered at 96 px): only the model input follows size.
    dataset = get_dataset(cfg.data, split=cfg.split)
    size, size_from = _image_size(cfg, meta, dataset)
    usable_classes(dataset.targets, cfg.n_way, max(cfg.k_shots), cfg.n_query, dataset.classes, drop_small=True,
                   warn=False, where=f"'{cfg.data}' ({cfg.split})")  # before any feature is computed
    data_cfg = _data_cfg(backbone, meta)
    transform = eval_transform(data_cfg, size=size)
    note = _overlap_note(meta, dataset.classes)
    if note:
        log(note)

    start = time.perf_counter()
    features = embed_images(backbone, RawImages(dataset), transform, cfg.batch_size, progress)
    seconds = time.perf_counter() - start
    log(f'{cfg.data} ({cfg.split}): {len(dataset.classes)} classes, {len(dataset)} images; model input {size} px '
        f'({size_from}); {features.shape[1]}-d features in {seconds:.1f} s')
    labels = torch.tensor(dataset.targets)
    results = []
    for k in cfg.k_shots:
        accs = prototype_episode_accuracies(features, labels, cfg.n_way, k, cfg.n_query, cfg.episodes, seed=cfg.seed)
        ci = mean_ci(accs)
        results.append(dict(n_way=cfg.n_way, k_shot=k, n_query=cfg.n_query, episodes=ci.n, mean=ci.mean,
                            ci95=ci.ci95, accuracy_pct=100 * ci.mean, ci95_pct=100 * ci.ci95,
                            accuracies=[round(a, 6) for a in accs.tolist()]))
    return dict(
        protocol='episodes',
        data=dict(data=cfg.data, split=cfg.split, classes=len(dataset.classes), images=len(dataset),
                  image_size=size, image_size_from=size_from, preprocessing=preprocessing(data_cfg, size)),
        feature_dim=int(features.shape[1]),
        feature_seconds=seconds,
        chance=1.0 / cfg.n_way,
        results=results,
    )


def nearest_neighbour_errors(train_features: torch.Tensor, test_features: torch.Tensor,
                             answers: torch.Tensor) -> torch.Tensor:
    """Per-run error counts of one-shot classification by the nearest (cosine) training image.

    Args:
        train_features: (R, C, D) one feature per class of each run.
        test_features: (R, T, D) features of each run's test images.
        answers: (R, T) index of the right training image of each test image.

    Returns:
        (R,) number of wrongly classified test images in each run.

    Example:
        >>> train = torch.eye(3).expand(2, 3, 3)
        >>> nearest_neighbour_errors(train, train[:, [2, 0, 1]], torch.tensor([[2, 0, 1], [0, 0, 1]])).tolist()
        [0, 1]
    """
    train = nn.functional.normalize(train_features.float(), dim=-1)
    test = nn.functional.normalize(test_features.float(), dim=-1)
    predicted = (test @ train.transpose(1, 2)).argmax(-1)
    return (predicted != answers).sum(-1)


def _omniglot_runs(cfg: EvalConfig, backbone: nn.Module, meta: dict, progress: bool, log) -> dict:
    from .data import eval_transform, read_one_shot_runs

    runs = read_one_shot_runs(cfg.omniglot_runs)
    size, size_from = input_size('omniglot', cfg.image_size, checkpoint_size=int(meta.get('image_size') or 0))
    data_cfg = _data_cfg(backbone, meta)
    images = [image for run in runs for image in (*run.train_images, *run.test_images)]
    start = time.perf_counter()
    features = embed_images(backbone, images, eval_transform(data_cfg, size=size), cfg.batch_size, progress)
    seconds = time.perf_counter() - start
    n_train, n_test = len(runs[0].train_images), len(runs[0].test_images)
    if any(len(r.train_images) != n_train or len(r.test_images) != n_test for r in runs):
        raise DataError(f'{cfg.omniglot_runs}: runs differ in size; expected {n_train} training and {n_test} test '
                        f'images in each')
    features = features.view(len(runs), n_train + n_test, -1)
    answers = torch.stack([torch.as_tensor(r.answers) for r in runs])
    errors = nearest_neighbour_errors(features[:, :n_train], features[:, n_train:], answers)
    per_run = [dict(run=r.name, errors=int(e), tests=n_test, error_pct=100 * int(e) / n_test)
               for r, e in zip(runs, errors.tolist(), strict=True)]
    ci = mean_ci([r['error_pct'] / 100 for r in per_run])
    log(f'{cfg.omniglot_runs}: {len(runs)} runs of {n_train}-way one-shot, {len(images)} images; model input '
        f'{size} px ({size_from}); {features.shape[-1]}-d features in {seconds:.1f} s')
    return dict(
        protocol='omniglot-runs',
        data=dict(runs_path=str(cfg.omniglot_runs), runs=len(runs), n_way=n_train, tests_per_run=n_test,
                  image_size=size, image_size_from=size_from, preprocessing=preprocessing(data_cfg, size)),
        feature_dim=int(features.shape[-1]),
        feature_seconds=seconds,
        runs=per_run,
        error_rate_pct=100 * ci.mean,
        error_ci95_pct=100 * ci.ci95,
        accuracy_pct=100 * (1 - ci.mean),
        human_error_rate_pct=_OMNIGLOT_HUMAN_ERROR,
    )


# ------------------------------------------------------------------------------------------------ the command
def evaluate_command(cfg: EvalConfig, progress: bool = True, log=print) -> dict:
    """Evaluate one backbone or checkpoint; returns the settings and results (also written to ``cfg.json``).

    Example:
        >>> r = evaluate_command(EvalConfig(weights='random', n_way=3, k_shots=(1,), episodes=10, image_size=32),
        ...                      progress=False, log=lambda *_: None)  # doctest: +SKIP
        >>> r['results'][0]['episodes']  # doctest: +SKIP
        10
    """
    cfg.validate()
    with torch.random.fork_rng(devices=[]):  # --weights random: the same seed, the same backbone
        torch.manual_seed(cfg.seed)
        backbone, meta, origin = load_backbone(cfg.model, cfg.weights)
    model = cfg.model or meta.get('model') or DEFAULT_MODEL
    log(f'weights: {origin}')
    if cfg.omniglot_runs:
        out = _omniglot_runs(cfg, backbone, meta, progress, log)
    else:
        out = _episodes(cfg, backbone, meta, progress, log)
    settings = asdict(cfg)
    settings.update(model=model, weights_origin=origin, k_shots=list(cfg.k_shots))
    for key in _EPISODE_OPTIONS if cfg.omniglot_runs else ('omniglot_runs',):  # only what the protocol used
        settings.pop(key)
    result = dict(settings=settings, **out)
    _summary(result, log)
    if cfg.json:
        path = Path(cfg.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(result, indent=2) + '\n'))
        log(f'results: {path}')
    return result


def _summary(result: dict, log) -> None:
    log('')
    if result['protocol'] == 'omniglot-runs':
        log(f'Omniglot official {result["data"]["n_way"]}-way one-shot runs (nearest training image, cosine): '
            'errors per run')
        runs = result['runs']
        for row in range(0, len(runs), 5):
            log('  ' + '   '.join(f'{r["run"]} {r["errors"]:2d}/{r["tests"]}' for r in runs[row:row + 5]))
        log(f'error rate: {result["error_rate_pct"]:.2f} % +- {result["error_ci95_pct"]:.2f} (95% CI over '
            f'{len(runs)} runs; accuracy {result["accuracy_pct"]:.2f} %; human {result["human_error_rate_pct"]} %)')
        return
    chance = 100 * result['chance']
    for r in result['results']:
        log(f'{r["n_way"]}-way {r["k_shot"]}-shot: {r["accuracy_pct"]:.2f} +- {r["ci95_pct"]:.2f} % '
            f'({r["episodes"]} episodes, {r["n_query"]} queries/class; chance {chance:.0f} %)')


# ------------------------------------------------------------------------------------------------ the CLI
def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    d = EvalConfig()
    parser = parser or argparse.ArgumentParser(prog='fewshot-lkca evaluate', description=__doc__.splitlines()[0])
    parser.add_argument('--model', help=f'timm backbone name (default: the checkpoint\'s, else {DEFAULT_MODEL})')
    parser.add_argument('--weights', help="'imagenet', 'random', a source state_dict to transplant (.pth), or a "
                                          f'.safetensors checkpoint of finetune / base pretraining '
                                          f'(default: {d.weights})')
    parser.add_argument('--data', help=f'data set card name or image-folder path (default: {d.data})')
    parser.add_argument('--split', help=f'split whose classes make the episodes (default: {d.split})')
    parser.add_argument('--ways', type=int, dest='n_way', help=f'classes per episode (default: {d.n_way})')
    parser.add_argument('--shots', type=int, nargs='+', dest='k_shots', metavar='K',
                        help=f'support images per class, one or more values (default: {" ".join(map(str, d.k_shots))})')
    parser.add_argument('--queries', type=int, dest='n_query', help=f'query images per class (default: {d.n_query})')
    parser.add_argument('--episodes', type=int, help=f'episodes per setting (default: {d.episodes})')
    parser.add_argument('--image-size', type=int, dest='image_size',
                        help="input side in px (default: the checkpoint's, else the data card's, else the model's)")
    parser.add_argument('--seed', type=int, help=f'episode seed; also seeds --weights random (default: {d.seed})')
    parser.add_argument('--omniglot-runs', dest='omniglot_runs', metavar='PATH',
                        help='all_runs.zip or its folder: run the official Omniglot 20-way one-shot protocol '
                             'instead of episodes')
    parser.add_argument('--batch-size', type=int, dest='batch_size',
                        help=f'images per forward pass (default: {d.batch_size})')
    parser.add_argument('--json', metavar='FILE', help='also write settings and results as JSON')
    parser.add_argument('--no-progress', action='store_true', help='no progress bars')
    add_threads_argument(parser)
    return parser


def _config(args: argparse.Namespace) -> EvalConfig:
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ('no_progress', 'threads')}
    if 'k_shots' in given:
        given['k_shots'] = tuple(given['k_shots'])
    return EvalConfig(**given)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        set_threads(args.threads)
        with quiet_console():
            evaluate_command(_config(args), progress=not args.no_progress)
    except (ConfigError, CheckpointError, BackboneError, DataError) as e:
        raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
    main()
