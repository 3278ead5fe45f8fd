"""Recipes and overrides: defaults < recipe < command line; unknown keys and wrong types refused."""
import pytest

from fewshot_lkca.config import (
    ConfigError,
    FinetuneConfig,
    apply_overrides,
    list_recipes,
    load_recipe,
    parse_override,
    resolve_config,
)


@pytest.mark.parametrize('name', list_recipes())
def test_every_recipe_loads_and_validates(name):
    cfg = load_recipe(name).validate()
    assert isinstance(cfg, FinetuneConfig)


def test_the_expected_recipes_exist():
    assert {'lean_5shot', 'lean_1shot', 'linear_probe', 'protonet', 'full_finetune'} <= set(list_recipes())
    lean, full = load_recipe('lean_5shot'), load_recipe('full_finetune')
    assert 2 <= lean.batch_size <= 4 and lean.frozen_groups > 0 and lean.freeze_bn_stats and lean.grad_checkpointing
    assert full.frozen_groups == 0 and not full.freeze_bn_stats and full.batch_size == full.n_way * full.k_shot
    assert load_recipe('protonet').method == 'protonet' and load_recipe('linear_probe').method == 'linear_probe'


def test_precedence_defaults_recipe_command_line():
    assert FinetuneConfig().k_shot == 5
    assert load_recipe('lean_1shot').k_shot == 1
    cfg = resolve_config('lean_1shot', {'k_shot': '3', 'lr': '0.5', 'augment': 'none', 'export': 'onnx,onnx-int8'})
    assert (cfg.k_shot, cfg.lr, cfg.augment, cfg.export) == (3, 0.5, 'none', ['onnx', 'onnx-int8'])
    assert cfg.batch_size == load_recipe('lean_1shot').batch_size  # untouched fields keep the recipe's value


def test_unknown_keys_get_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match="unknown option 'batchsize' in the command line; did you mean 'batch_size'"):
        resolve_config(None, {'batchsize': '2'})
    recipe = tmp_path / 'mine.yaml'
    recipe.write_text('learning_rate: 0.1\n')
    with pytest.raises(ConfigError, match=r"unknown option 'learning_rate' in recipe .*mine.yaml"):
        load_recipe(recipe)
    with pytest.raises(ConfigError, match="unknown recipe 'lean5shot' \\(did you mean 'lean_5shot'\\?\\)"):
        load_recipe('lean5shot')


def test_wrong_types_are_refused(tmp_path):
    recipe = tmp_path / 'bad.yaml'
    recipe.write_text('steps: "many"\n')
    with pytest.raises(ConfigError, match='steps must be an integer'):
        load_recipe(recipe)
    recipe.write_text('guard: 3\n')
    with pytest.raises(ConfigError, match='guard must be true or false'):
        load_recipe(recipe)
    recipe.write_text('- a list\n')
    with pytest.raises(ConfigError, match='must be a mapping'):
        load_recipe(recipe)
    recipe.write_text('steps: [1\n')
    with pytest.raises(ConfigError, match='not valid YAML'):
        load_recipe(recipe)
    with pytest.raises(ConfigError, match="lr must be a number, got 'fast'"):
        resolve_config(None, {'lr': 'fast'})


def test_bad_values_are_refused():
    with pytest.raises(ConfigError, match='k_shot must be >= 1, got 0'):
        resolve_config(None, {'k_shot': '0'})
    with pytest.raises(ConfigError, match='n_way must be >= 2'):
        resolve_config(None, {'n_way': '1'})
    with pytest.raises(ConfigError, match="method must be one of"):
        resolve_config(None, {'method': 'maml'})
    with pytest.raises(ConfigError, match='must look like --key=value'):
        parse_override('--lr')
    assert parse_override('--lr=0.1') == ('lr', '0.1')


def test_apply_overrides_accepts_dashes_and_leaves_the_original():
    base = FinetuneConfig()
    changed = apply_overrides(base, {'batch-size': 3}, source='test')
    assert changed.batch_size == 3 and base.batch_size == FinetuneConfig().batch_size != 3
