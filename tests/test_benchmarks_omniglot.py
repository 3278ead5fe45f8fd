"""The Omniglot benchmark on a tiny synthetic Omniglot (npz layout + official-runs zip), and pretraining's rotations."""
import dataclasses
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import benchmarks.omniglot as bench
from fewshot_lkca.config import ConfigError, load_recipe
from fewshot_lkca.data.omniglot import VAL_ALPHABETS
from fewshot_lkca.pretrain import PretrainConfig, pretrain_command

SIDE = 105
BASE_ALPHABETS = {'Alpha': 4, 'Beta': 4}  # 8 base characters: 32 classes with rotations
EVAL_ALPHABETS = {'Gamma': 11, 'Delta': 11}  # 22 novel characters: enough for 20-way episodes
QUICK = ['--quick', '--models', 'lkca_mobilenet_050', '--threads', '1', '--no-progress']


# One thread throughout: equal numerics across processes, no thrashing on a shared 2-core CPU.
pytestmark = pytest.mark.usefixtures('one_thread')


def _glyph(rng: np.random.Generator, strokes: np.ndarray) -> np.ndarray:
    """One drawing of a character: its strokes, shifted and thickened a little per drawer; True = paper."""
    image = Image.new('L', (SIDE, SIDE), 255)
    draw = ImageDraw.Draw(image)
    dx, dy = rng.integers(-4, 5, 2)
    for x0, y0, x1, y1 in strokes:
        draw.line([(x0 + dx, y0 + dy), (x1 + dx, y1 + dy)], fill=0, width=int(rng.integers(3, 6)))
    return np.asarray(image) > 127


def _characters(rng: np.random.Generator, count: int) -> np.ndarray:
    """(count, 20, 105, 105) bool drawings, 20 drawers per character."""
    out = np.empty((count, 20, SIDE, SIDE), bool)
    for c in range(count):
        strokes = rng.integers(15, 90, (3, 4))
        out[c] = [_glyph(rng, strokes) for _ in range(20)]
    return out


def _png(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.where(array, 255, 0).astype(np.uint8)).save(buffer, format='PNG')
    return buffer.getvalue()


@pytest.fixture(scope='module')
def omniglot(tmp_path_factory) -> Path:
    """A synthetic Omniglot: the npz arrays, the alphabet ranges and 2 official-layout 20-way one-shot runs."""
    root = tmp_path_factory.mktemp('omniglot')
    rng = np.random.default_rng(0)
    background = {**dict.fromkeys(VAL_ALPHABETS, 2), **BASE_ALPHABETS}
    ranges, first = {'background': {}, 'evaluation': {}}, 1
    for name, count in background.items():
        ranges['background'][name] = [first, first + count - 1]
        first += count
    first = 965  # evaluation character ids start here in the real files (row = id - 965)
    for name, count in EVAL_ALPHABETS.items():
        ranges['evaluation'][name] = [first, first + count - 1]
        first += count
    (root / 'omniglot_alphabet_ranges.json').write_text(json.dumps(ranges))
    np.savez(root / 'images_background.npz', images=_characters(rng, sum(background.values())))
    evaluation = _characters(rng, sum(EVAL_ALPHABETS.values()))
    np.savez(root / 'images_evaluation.npz', images=evaluation)
    with zipfile.ZipFile(root / 'all_runs.zip', 'w') as runs:
        for r in (1, 2):
            chars = rng.permutation(len(evaluation))[:20]
            order = rng.permutation(20)  # test item j shows the character of training class order[j]
            labels = []
            for k, c in enumerate(chars):
                runs.writestr(f'run{r:02d}/training/class{k + 1:02d}.png', _png(evaluation[c, 0]))
            for j, k in enumerate(order):
                runs.writestr(f'run{r:02d}/test/item{j + 1:02d}.png', _png(evaluation[chars[k], 1]))
                labels.append(f'run{r:02d}/test/item{j + 1:02d}.png run{r:02d}/training/class{k + 1:02d}.png')
            runs.writestr(f'run{r:02d}/class_labels.txt', '\n'.join(labels) + '\n')
    return root


@pytest.fixture
def synthetic(omniglot, monkeypatch) -> Path:
    monkeypatch.setenv('FEWSHOT_LKCA_OMNIGLOT', str(omniglot))
    return omniglot


def _check_summary(summary: dict, episodes: int) -> None:
    assert summary['n'] == episodes
    assert 0.0 <= summary['mean'] <= 1.0 and 0.0 <= summary['ci95'] <= 1.0


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_quick_run_pretrains_exports_and_reports_every_setting(synthetic, tmp_path, capsys):
    out = tmp_path / 'results' / 'omniglot.json'
    bench.main(QUICK + ['--runs', str(tmp_path / 'runs'), '--out', str(out), '--set', 'rotations=true'])
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    (r,) = result['results']
    assert r['model'] == 'lkca_mobilenet_050' and r['image_size'] == 32
    pre = r['pretrain']
    assert pre['steps'] == 3 and pre['wall_seconds'] > 0 and not pre['reused']
    median = pre['median_step_seconds']
    assert median > 0 and pre['steps_x_median_seconds'] == pytest.approx(3 * median, abs=0.1)
    assert pre['config']['rotations'] and pre['classes'] == 4 * sum(BASE_ALPHABETS.values())  # --set reaches it
    assert Path(pre['checkpoint']).name == 'last.safetensors'  # --quick trains without val selection
    assert set(r['engines']) == set(bench.ENGINES)
    for engine in r['engines'].values():
        assert set(engine['episodes']) == {'5w1s', '5w5s', '20w1s', '20w5s'}
        for summary in engine['episodes'].values():
            _check_summary(summary, episodes=20)
        runs = engine['official_runs']
        assert runs['runs'] == 2 and runs['tests'] == 40 and 0 <= runs['errors'] <= 40
        assert runs['error'] == pytest.approx(runs['errors'] / 40) and sum(runs['per_run']) == runs['errors']
    assert r['parity']['onnx_fp32_max_abs_diff'] < 1e-3  # the export computes what PyTorch computes
    assert 0.5 < r['parity']['int8_feature_cosine_mean'] <= 1.0 + 1e-6
    assert r['export']['int8_bytes'] < r['export']['fp32_bytes']
    assert result['protocol']['novel_classes'] == 20 and result['protocol']['novel_images'] == 400
    assert result['machine']['threads'] == 1 and 'start' in result['machine']['load_average_1min']

    table = result['table']
    assert '| lkca_mobilenet_050 | fp32 (PyTorch) |' in table and '| lkca_mobilenet_050 | int8 (ONNX) |' in table
    assert '| 98.8 | 99.7 | 96.0 | 98.9 | - |' in table and '| 4.5 % |' in table and '| 3.3 % |' in table
    assert table in printed and table in out.with_suffix('.md').read_text()
    assert len(result['verdicts']) == 1 and 'int8 (ONNX)' in result['verdicts'][0]
    assert result['reference_note'].endswith('Here: 8 training characters (x4 rotations) from the background '
                                             'alphabets, all 20 characters of the evaluation alphabets for testing.')


@pytest.mark.slow
def test_pretrain_only_then_reuse_evaluates_the_finished_run(synthetic, tmp_path):
    common = dict(models=('lkca_mobilenet_050',), threads=1, int8=False, runs_dir=str(tmp_path / 'runs'), out='',
                  progress=False, **{k: v for k, v in bench.QUICK.items() if k != 'pretrain_overrides'},
                  pretrain_overrides=dict(bench.QUICK['pretrain_overrides']))
    quiet = dict(log=lambda *_: None)
    trained = bench.run_benchmark(bench.BenchConfig(**common, pretrain_only=True), **quiet)
    assert trained['pretrain_only'] and 'results' not in trained
    assert not trained['pretrain']['lkca_mobilenet_050']['reused']
    first = bench.run_benchmark(bench.BenchConfig(**common, reuse=True), **quiet)
    again = bench.run_benchmark(bench.BenchConfig(**common, reuse=True), **quiet)
    a, b = first['results'][0], again['results'][0]
    assert a['pretrain']['reused'] and b['pretrain']['reused']
    assert a['pretrain']['wall_seconds'] > 0  # from the run's log
    assert set(a['engines']) == {'torch_fp32'} and '| int8 (ONNX) |' not in first['table']
    for key in ('episodes', 'official_runs'):  # the evaluation is deterministic
        assert a['engines']['torch_fp32'][key] == b['engines']['torch_fp32'][key]
    changed = bench.BenchConfig(**dict(common, steps=4), reuse=True)  # another config: trained again, not reused
    assert not bench.run_benchmark(changed, **quiet)['results'][0]['pretrain']['reused']


# ------------------------------------------------------------------------------------------------ the table
def _fake_result(model: str, accuracy: float, error: float) -> dict:
    summary = dict(mean=accuracy, ci95=0.002, n=600)
    engine = dict(episodes={k: summary for k in ('5w1s', '5w5s', '20w1s', '20w5s')},
                  official_runs=dict(error=error, errors=round(400 * error), tests=400))
    return dict(model=model, pretrain=dict(wall_seconds=321.4, steps=900, median_step_seconds=0.2534),
                engines=dict(torch_fp32=engine, onnx_int8=engine))


def test_table_has_a_row_per_model_and_precision_then_the_references():
    table = bench.format_table([_fake_result('lkca_mobilenet', 0.99, 0.04), _fake_result('dw3', 0.5, 0.5)])
    rows = table.splitlines()
    assert len(rows) == 2 + 2 * 2 + len(bench.REFERENCES)
    assert rows[2] == ('| lkca_mobilenet | fp32 (PyTorch) | 99.00 +- 0.20 | 99.00 +- 0.20 | 99.00 +- 0.20 | '
                       '99.00 +- 0.20 | 4.00 % (16/400) | 321 s (900 steps x 0.25 s) |')
    assert rows[3].startswith('| lkca_mobilenet | int8 (ONNX) |')
    assert rows[-1] == '| Bayesian Program Learning (Lake et al. 2015) | - | - | - | - | - | 3.3 % | - |'


def test_verdicts_compare_the_int8_model_with_every_reference():
    (line,) = bench.verdicts([_fake_result('lkca_mobilenet', 0.99, 0.04)])
    assert line.startswith('- lkca_mobilenet int8 (ONNX):')
    assert '5w1s 99.00 vs 98.8 beats' in line and '5w5s 99.00 vs 99.7 misses;' in line
    assert '20w1s 99.00 vs 96.0 beats' in line
    assert 'runs error 4.00 % vs Human 4.5 % beats' in line and 'vs Bayesian Program Learning 3.3 % misses' in line
    (close,) = bench.verdicts([_fake_result('m', 0.9885, 0.04)])
    assert '5w1s 98.85 vs 98.8 beats (within CI)' in close


def test_paired_difference_uses_the_same_episodes():
    accs = {'a': {'torch_fp32': {'5w1s': torch.tensor([1.0, 0.8])}},
            'b': {'torch_fp32': {'5w1s': torch.tensor([0.9, 0.8])}}}
    lines, paired = bench.paired_lines([dict(model='a'), dict(model='b')], accs)
    assert paired['a - b']['5w1s']['mean'] == pytest.approx(0.05)
    assert lines == ['- a minus b (fp32, paired over the same episodes, points): 5w1s +5.00 +- 6.93']


# ------------------------------------------------------------------------------------------------ options and errors
def test_quick_and_explicit_options_combine():
    cfg = bench.config_from_args(bench.build_parser().parse_args(
        ['--quick', '--steps', '7', '--models', 'a, b', '--set', 'lr=0.01', '--set', 'batch_size=8']))
    assert cfg.steps == 7 and cfg.episodes == bench.QUICK['episodes'] and cfg.models == ('a', 'b')
    assert cfg.pretrain_overrides == dict(batch_size='8', val_split='', eval_every='0', lr='0.01')
    assert bench.QUICK['pretrain_overrides']['batch_size'] == '16'  # the preset itself is not changed
    full = bench.config_from_args(bench.build_parser().parse_args([]))
    assert full.models == bench.MODELS and full.episodes == 600 and full.int8 and full.out.endswith('omniglot.json')


def test_benchmark_options_override_the_recipe():
    recipe = load_recipe(bench.RECIPE, config_cls=PretrainConfig)
    assert recipe.data == 'omniglot' and recipe.weights == 'random'  # background alphabets only, from scratch
    cfg = bench.pretrain_config(bench.BenchConfig(steps=11, image_size=40, pretrain_overrides=dict(lr='0.01')),
                                'lkca_mobilenet_dw3')
    assert (cfg.model, cfg.steps, cfg.image_size, cfg.lr) == ('lkca_mobilenet_dw3', 11, 40, 0.01)
    assert cfg.out == str(Path(bench.BenchConfig().runs_dir) / 'lkca_mobilenet_dw3')
    assert dataclasses.replace(cfg, model=recipe.model, steps=recipe.steps, image_size=recipe.image_size, lr=recipe.lr,
                               out=recipe.out) == recipe  # nothing else changed


@pytest.mark.parametrize('argv, message', [
    (['--models', 'lkca_mobilenet,no_such_net'], "unknown model(s) ['no_such_net']"),
    (['--episodes', '0'], 'episodes must be >= 1'),
    (['--novel-classes', '5'], 'novel_classes must be 0 (all) or >= 20'),
    (['--set', 'no_such_option=1'], "unknown option 'no_such_option'"),
    (['--omniglot-runs', '/nonexistent/all_runs.zip'], 'official one-shot runs not found'),
])
def test_bad_options_are_one_line_errors(synthetic, argv, message, tmp_path):
    with pytest.raises(SystemExit) as exc:
        bench.main(argv + ['--runs', str(tmp_path / 'runs'), '--out', '', '--no-progress'])
    assert str(exc.value).startswith('error: ') and message in str(exc.value) and '\n' not in str(exc.value)
    assert not (tmp_path / 'runs').exists()  # refused before any pretraining


# ------------------------------------------------------------------------------------------------ rotations
def test_pretraining_with_rotations_trains_four_classes_per_character(synthetic, tmp_path):
    cfg = PretrainConfig(data='omniglot', rotations=True, model='lkca_mobilenet_050', image_size=32, steps=1,
                         batch_size=8, val_split='', out=str(tmp_path / 'run')).validate()
    metrics = pretrain_command(cfg, progress=False, log=lambda *_: None)
    assert metrics['data']['classes'] == 4 * sum(BASE_ALPHABETS.values())
    upright = pretrain_command(PretrainConfig(**dict(cfg.to_dict(), rotations=False, out=str(tmp_path / 'upright'))),
                               progress=False, log=lambda *_: None)
    assert upright['data']['classes'] == sum(BASE_ALPHABETS.values())


def test_rotations_on_other_data_are_refused(tmp_path):
    cfg = PretrainConfig(data='lookalike', rotations=True, out=str(tmp_path / 'run')).validate()
    with pytest.raises(ConfigError, match="rotations=true applies to Omniglot only, not to 'lookalike'"):
        pretrain_command(cfg, progress=False, log=lambda *_: None)
    assert not (tmp_path / 'run').exists()
