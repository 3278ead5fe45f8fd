"""One typed config for fine-tuning; recipes are YAML overrides of it.

Precedence: the dataclass defaults < the recipe file < ``--key=value`` on the command line. Unknown keys and values
of the wrong type are refused with a one-line message (and a "did you mean" where one is close).

The recipe machinery works for any config dataclass (pretraining's `PretrainConfig` lives in
`fewshot_lkca.pretrain`). A dataclass names its kind of recipe in a ``recipe_kind`` class attribute; a recipe file's
kind is its name's prefix: ``recipes/pretrain_*.yaml`` are pretraining recipes, every other file is a fine-tuning one.
"""
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ['ConfigError', 'FinetuneConfig', 'RECIPE_DIR', 'list_recipes', 'load_recipe', 'apply_overrides',
           'resolve_config', 'parse_override', 'parse_cli', 'config_for_command']

# Recipes ship inside the package (an installed wheel has them); the repository's top-level recipes/ links to them.
RECIPE_DIR = Path(__file__).resolve().parent / 'recipes'


class ConfigError(ValueError):
    """A recipe or an override cannot be applied (unknown key, wrong type, bad value)."""


@dataclass
class FinetuneConfig:
    """Every fine-tuning setting, with the reason for its default."""

    # --- the task ---
    data: str = 'lookalike'  # built-in look-alike set: needs no download
    split: str = 'novel'  # the task's classes come from the split the backbone never trained on
    # 'episode': n_way classes drawn, k_shot images each train, the rest are held out (data set cards, benchmarks);
    # 'all': every class and image of a folder train, and the run estimates accuracy on images it never trained on
    # (fewshot_lkca.estimate); 'auto': 'all' for a plain folder of class folders, else 'episode' (fewshot_lkca.task)
    protocol: str = 'auto'
    n_way: int = 5  # classes to tell apart
    k_shot: int = 5  # labelled images per class (the support set)
    n_query: int = 15  # held-out images per class in each evaluation episode (the literature's 15)
    seed: int = 0  # picks the task's classes and support images, batches, augmentation
    image_size: int = 0  # input side in px; 0 = the data's native size (look-alike set: 96), else 224
    images_per_class: int = 0  # look-alike set: rendered images per class; 0 = the card's default

    # --- the starting point ---
    model: str = 'lkca_mobilenet'
    # 'auto' (the shipped checkpoint / base pretraining for a data set, ImageNet or the shipped one for photos: see
    # fewshot_lkca.starting_point), 'base' (pretrained on the data's base classes, cached), 'imagenet', 'random', a path
    weights: str = 'auto'
    base_steps: int = 600  # supervised steps of the cached base pretraining: ~3 min on 2 CPU cores (96 px)
    base_batch_size: int = 64
    base_lr: float = 2e-3  # AdamW
    # Rendered images per base class (look-alike set; 0 = the card's default). With 60, 600 steps memorised them (50%
    # train accuracy) and val NCM was 27.5%; with 300 it was 39.0% (novel 32.6%): measured, one seed each.
    base_images_per_class: int = 300

    # --- what is trained ---
    # 'protonet' (the cosine prototype head, no training), 'linear_probe' (head only) or 'finetune' (trunk too).
    # Chosen on 50 val tasks from the shipped start (benchmarks/results/select_val_*.json, 2026-12-03): protonet with
    # mirror views 74.9 %, protonet 73.1, tinytl_5shot 72.8, lean_5shot 70.8, every head-training grid point <= 73.1.
    method: str = 'protonet'
    frozen_groups: int = 4  # leading timm group_matcher groups kept frozen: stem + stages 0-2 (generic features)
    # of the groups past frozen_groups: 'all' parameters, 'adapters' (zero-initialised 1x1 residual adapters beside
    # each block, fewshot_lkca.adapters: the pretrained weights stay) or 'bias_norm' (biases, norm scales/shifts:
    # TinyTL, Cai et al. 2020; a few thousand parameters, and no weight gradients to store)
    train_params: str = 'all'
    freeze_bn_stats: bool = True  # batch statistics of 2-4 images are noise: keep the pretrained running stats
    grad_checkpointing: bool = True  # recompute trainable blocks' activations in backward: less memory
    head_init: str = 'prototypes'  # cosine head starts as the nearest-prototype classifier of the support set
    head_scale: float = 10.0  # cosine-logit temperature (learnable); 10 gives confident but trainable softmax
    # keep what training made only when leave-one-out on the support set does not say it is worse than the prototype
    # head it started from (fewshot_lkca.probe); 1-shot tasks cannot be checked and keep the prototypes
    guard: bool = True
    # the classifier also sees each image flipped left-right and reads both views (two backbone passes per image);
    # on 50 val tasks +1.8 +- 0.6 points for protonet at 5 shots (the job), +2.3 at 1 shot (benchmarks.adaptation)
    mirror_views: bool = True
    probe_anchor: float = 0.0  # linear probe: pull of the head back towards the prototypes (fewshot_lkca.probe)

    # --- optimisation ---
    steps: int = 200  # optimizer steps; 5-way 5-shot = 25 images, so 200 steps at batch 2 = 16 passes
    batch_size: int = 2  # memory-lean: activations scale with batch (batch 2: 62x less than full fine-tuning)
    # each step sees the whole support set in micro-batches of batch_size, gradients accumulated (memory: one
    # micro-batch); false: one random micro-batch per step
    accumulate: bool = False
    optimizer: str = 'sgd'  # 'sgd' or 'adamw'
    lr: float = 0.001  # trunk; 0.01 collapsed to one class from the base-pretrained start (two look-alike tasks)
    head_lr_scale: float = 10.0  # the new head moves faster than the pretrained trunk
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_steps: int = 5
    label_smoothing: float = 0.1  # 25 images are easy to memorise: soften the targets
    # what the support images go through while training: 'mirror' (a left-right flip half of the time: what base
    # pretraining saw), 'strong' (fewshot_lkca.data.train_transform: crops down to half the area, rotation, shear,
    # colour, blur, JPEG; the trunk recipes were measured with it) or 'none'
    augment: str = 'mirror'

    # --- evaluation and output ---
    eval_batch_size: int = 4  # prototypes and evaluation in small batches: inference must not set the job's peak
    eval_episodes: int = 600  # query draws from the held-out images of the task's classes (>= 600 for a CI)
    checkpoint_every: int = 25  # steps between resumable checkpoints
    # formats exported into the run directory at the end (fewshot_lkca.export.FORMATS); [] = none
    export: list[str] = field(default_factory=lambda: ['onnx', 'onnx-int8'])
    out: str = ''  # run directory; '' = runs/<data>-<model>-<n_way>w<k_shot>s-seed<seed>

    def validate(self) -> 'FinetuneConfig':
        """Refuse values that cannot work, naming the option."""
        positive = ('n_way', 'k_shot', 'batch_size', 'eval_batch_size', 'eval_episodes', 'checkpoint_every',
                    'base_batch_size')
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f'{name} must be >= 1, got {getattr(self, name)}')
        if self.n_way < 2:
            raise ConfigError(f'n_way must be >= 2 (one class is no classification), got {self.n_way}')
        for name in ('n_query', 'steps', 'warmup_steps', 'frozen_groups', 'image_size', 'images_per_class',
                     'base_steps', 'base_images_per_class'):
            if getattr(self, name) < 0:
                raise ConfigError(f'{name} must be >= 0, got {getattr(self, name)}')
        if self.n_query < 1:
            raise ConfigError(f'n_query must be >= 1 to evaluate, got {self.n_query}')
        choices = dict(method=('finetune', 'linear_probe', 'protonet'), optimizer=('sgd', 'adamw'),
                       head_init=('prototypes', 'random'), train_params=('all', 'bias_norm', 'adapters'),
                       augment=('none', 'mirror', 'strong'),
                       protocol=('auto', 'episode', 'all'))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {list(allowed)}, got '{getattr(self, name)}'")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f'label_smoothing must be in [0, 1), got {self.label_smoothing}')
        if self.lr <= 0 or self.head_scale <= 0:
            raise ConfigError('lr and head_scale must be > 0')
        if self.export:  # unknown formats and missing packages fail now, not after the run
            from .export.formats import ExportError, check_formats
            try:
                check_formats(self.export)
            except ExportError as e:
                raise ConfigError(f'export: {e}') from None
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


_FIELDS = _fields(FinetuneConfig)
# Recipe kind -> file-name prefix of its recipes in recipes/; files without a listed prefix are fine-tuning recipes.
_RECIPE_PREFIXES = {'pretrain': 'pretrain_'}


def _did_you_mean(key: str, names=_FIELDS) -> str:
    close = difflib.get_close_matches(key, list(names), n=1)
    return f"; did you mean '{close[0]}'?" if close else ''


def _coerce(key: str, value: Any, from_text: bool, cls: type = FinetuneConfig) -> Any:
    """Check (YAML) or convert (command-line text) ``value`` to the type of field ``key`` of dataclass ``cls``."""
    hint = typing.get_type_hints(cls)[key]
    origin = typing.get_origin(hint)
    if origin is list or hint is list:
        if from_text:
            value = [] if value in ('', '[]', 'none', 'None') else [v.strip() for v in str(value).split(',')]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f'{key} must be a list of strings, got {value!r}')
        return value
    if isinstance(hint, types.UnionType):
        hint = next(t for t in typing.get_args(hint) if t is not type(None))
    if hint is bool:
        if from_text:
            lowered = str(value).lower()
            if lowered in ('1', 'true', 'yes', 'on'):
                return True
            if lowered in ('0', 'false', 'no', 'off'):
                return False
        if isinstance(value, bool):
            return value
        raise ConfigError(f'{key} must be true or false, got {value!r}')
    if hint is int:
        if from_text:
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f'{key} must be an integer, got {value!r}') from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f'{key} must be an integer, got {value!r}')
        return value
    if hint is float:
        if from_text:
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f'{key} must be a number, got {value!r}') from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f'{key} must be a number, got {value!r}')
        return float(value)
    if hint is str:
        if value is None:
            return ''
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f'{key} must be a string, got {value!r}')
        return str(value)
    raise ConfigError(f'{key}: unsupported field type {hint}')  # pragma: no cover - a new field type


def apply_overrides(cfg: FinetuneConfig, overrides: dict[str, Any], source: str, from_text: bool = False
                    ) -> FinetuneConfig:
    """A copy of ``cfg`` (any config dataclass) with ``overrides`` applied; ``source`` names where they came from."""
    fields = _fields(type(cfg))
    changes = {}
    for key, value in overrides.items():
        key = key.replace('-', '_')
        if key not in fields:
            raise ConfigError(f"unknown option '{key}' in {source}{_did_you_mean(key, fields)}")
        try:
            changes[key] = _coerce(key, value, from_text, type(cfg))
        except ConfigError as e:
            raise ConfigError(f'{source}: {e}') from None
    return dataclasses.replace(cfg, **changes)


def _recipe_kind_of(name: str) -> str:
    return next((kind for kind, prefix in _RECIPE_PREFIXES.items() if name.startswith(prefix)), 'finetune')


def list_recipes(kind: str = 'finetune') -> list[str]:
    """Names of the recipes of one kind in recipes/ (a recipe is also accepted as a path to any YAML file).

    Args:
        kind: ``'finetune'`` (the default) or ``'pretrain'`` (the ``pretrain_*`` files).
    """
    return sorted(p.stem for p in RECIPE_DIR.glob('*.yaml') if _recipe_kind_of(p.stem) == kind)


def _recipe_path(name_or_path: str | os.PathLike, kind: str = 'finetune') -> Path:
    path = Path(name_or_path)
    if path.suffix in ('.yaml', '.yml'):
        if not path.is_file():
            raise ConfigError(f'recipe file {path} does not exist')
        return path
    path = RECIPE_DIR / f'{name_or_path}.yaml'
    if path.is_file() and _recipe_kind_of(str(name_or_path)) != kind:
        raise ConfigError(f"recipe '{name_or_path}' is a {_recipe_kind_of(str(name_or_path))} recipe, not a {kind} "
                          f"one; known {kind} recipes: {', '.join(list_recipes(kind))}")
    if not path.is_file():
        close = difflib.get_close_matches(str(name_or_path), list_recipes(kind), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ''
        raise ConfigError(f"unknown recipe '{name_or_path}'{hint}; known: {', '.join(list_recipes(kind))}")
    return path


def load_recipe(name_or_path: str | os.PathLike, base: FinetuneConfig | None = None,
                config_cls: type | None = None) -> FinetuneConfig:
    """Defaults (or ``base``) with the recipe's overrides applied.

    Args:
        name_or_path: A recipe name in recipes/ of the config's kind, or a YAML file.
        base: The config to apply the recipe to; its type decides the kind.
        config_cls: The config dataclass when there is no ``base`` (default `FinetuneConfig`).
    """
    import yaml

    cls = type(base) if base is not None else (config_cls or FinetuneConfig)
    path = _recipe_path(name_or_path, getattr(cls, 'recipe_kind', 'finetune'))
    try:
        overrides = yaml.safe_load(path.read_text(encoding='utf-8')) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f'recipe {path} is not valid YAML: {str(e).splitlines()[0]}') from None
    if not isinstance(overrides, dict):
        raise ConfigError(f'recipe {path} must be a mapping of option: value')
    return apply_overrides(base if base is not None else cls(), overrides, source=f'recipe {path}')


def parse_override(text: str) -> tuple[str, str]:
    """``'key=value'`` (a leading ``--`` is allowed) -> ``(key, value)``."""
    body = text[2:] if text.startswith('--') else text
    if '=' not in body:
        raise ConfigError(f"override '{text}' must look like --key=value")
    key, value = body.split('=', 1)
    return key.strip(), value.strip()



def parse_cli(parser, argv: list[str], named: tuple[str, ...]) -> tuple[Any, dict[str, str]]:
    """Parse a command line: the parser's options, plus ``--key=value`` overrides of any config field.

    Returns:
        The parsed options and the overrides (the ``named`` options that were given, as text, and every
        ``--key=value``), ready for `resolve_config`.
    """
    args, rest = parser.parse_known_args(argv)
    overrides = {}
    for item in rest:
        if not item.startswith('--'):
            raise ConfigError(f"unexpected argument '{item}' (config fields are set as --key=value)")
        key, value = parse_override(item)
        overrides[key] = value
    for key in named:
        value = getattr(args, key)
        if value is not None:
            overrides[key] = str(value)
    return args, overrides

def resolve_config(recipe: str | None, overrides: dict[str, str], config_cls: type = FinetuneConfig) -> FinetuneConfig:
    """Defaults < recipe < command-line overrides (text values), validated (``config_cls``: any config dataclass)."""
    cfg = load_recipe(recipe, config_cls=config_cls) if recipe else config_cls()
    return apply_overrides(cfg, overrides, source='the command line', from_text=True).validate()


def config_for_command(recipe: str | None, overrides: dict[str, str], resume, config_cls: type = FinetuneConfig):
    """A training command's config: defaults < recipe < overrides; with ``resume`` the run's saved config is used, so
    any other option is refused (the returned defaults are replaced by the command)."""
    if resume is not None:
        if overrides or recipe:
            raise ConfigError('--resume continues the saved config; drop the other options')
        return config_cls()
    cfg = resolve_config(recipe, overrides, config_cls=config_cls)
    episode_options = {'n_way', 'k_shot', 'n_query'} & set(overrides)
    if getattr(cfg, 'protocol', None) == 'auto' and episode_options:
        cfg = dataclasses.replace(cfg, protocol='episode')  # --ways / --shots / --queries ask for episodes
    return cfg
