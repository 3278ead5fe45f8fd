"""benchmarks/finetune_memory.py: the set-up mirrors finetune, the profiler peaks order as the recipes must, and the
RSS subprocess reads its own growth (not the parent's high-water mark). Small images keep it to seconds."""
import pytest
import torch

from benchmarks import finetune_memory as fm
from fewshot_lkca.config import ConfigError

SIZE = 48  # the family needs at least 32 px; 48 keeps full fine-tuning's batch of 25 cheap


@pytest.fixture(scope='module')
def rows():
    return fm.benchmark(['lkca_mobilenet'], ['full_finetune', 'lean_5shot', 'linear_probe', 'protonet'],
                        image_size=SIZE, rss=False)


@pytest.mark.slow
def test_rows_describe_what_finetune_trains(rows):
    full, lean, probe, proto = rows
    assert [r['recipe'] for r in rows] == ['full_finetune', 'lean_5shot', 'linear_probe', 'protonet']
    from fewshot_lkca.config import load_recipe
    expected = [min(load_recipe(r['recipe']).batch_size, 25) for r in rows[:3]] + [25]  # capped at the 5 x 5 set
    assert [r['batch'] for r in rows] == expected
    assert probe['trainable'] == 5 * 1024 + 1  # the cosine head only: (n_way, features) weight and its scale
    assert full['trainable'] > lean['trainable'] > probe['trainable'] > 0
    assert proto['inference'] and proto['trainable'] == 0 and not lean['inference']


@pytest.mark.slow
def test_profiler_peaks_order_and_ratios(rows):
    full, lean, probe, proto = rows
    assert full['peak_mb'] > lean['peak_mb'] > 0
    # A frozen backbone trains nothing but the head, so it cannot need more than the lean recipe.
    assert probe['peak_mb'] <= lean['peak_mb']
    assert full['peak_at']['phase'] == 'backward'  # activations of 25 images peak when backward starts
    assert full['peak_ratio'] == 1.0
    assert lean['peak_ratio'] == pytest.approx(full['peak_mb'] / lean['peak_mb'])
    for row in rows:
        assert sum(row['categories_mb'].values()) == pytest.approx(row['peak_mb'], abs=1e-6)
    assert full['categories_mb']['ACTIVATION'] > 0.8 * full['peak_mb']  # saved activations dominate full FT


@pytest.mark.slow
def test_profiler_peak_is_deterministic(rows):
    cfg = fm.recipe_config('lean_5shot', 'lkca_mobilenet')
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as benchmark() runs it; idle OpenMP threads on a busy machine only cost time
    try:
        again = fm.measure_profiler(cfg, SIZE, explain=3)
    finally:
        torch.set_num_threads(threads)
    assert again['peak_mb'] == rows[1]['peak_mb']  # earlier sessions in this process must not change it
    assert len(again['live_at_peak']) == 3
    assert sum(g['mb'] for g in again['live_at_peak']) <= again['peak_mb'] + 1e-6


@pytest.mark.slow
def test_rss_subprocess_measures_its_own_growth():
    row = fm.measure_rss('full_finetune', 'lkca_mobilenet', image_size=SIZE, steps=1)
    assert row['rss_after_mb'] >= row['rss_before_mb'] > 0
    assert row['rss_growth_mb'] > 10  # 25 images of activations; 0 would mean the parent's high-water mark leaked in
    if row['hwm_growth_mb'] is not None:  # Linux: the per-image VmHWM agrees with ru_maxrss
        assert row['rss_growth_mb'] == pytest.approx(row['hwm_growth_mb'], abs=2)


def test_variants_are_config_overrides():
    recipe, overrides = fm.parse_variant('lean_5shot:batch_size=2, frozen_groups=5')
    assert (recipe, overrides) == ('lean_5shot', {'batch_size': '2', 'frozen_groups': '5'})
    cfg = fm.recipe_config(recipe, 'tf_mobilenetv3_small_100', overrides)
    assert (cfg.model, cfg.batch_size, cfg.frozen_groups, cfg.grad_checkpointing) == (
        'tf_mobilenetv3_small_100', 2, 5, True)
    with pytest.raises(ConfigError, match='did you mean'):
        fm.parse_variant('lean_5shot:batch=2')
    with pytest.raises(ConfigError, match='unknown recipe'):
        fm.parse_variant('lean_9shot')
    with pytest.raises(SystemExit):
        fm.main(['--recipes', 'lean_5shot,nope', '--no-rss'])


def test_table_shows_ratios():
    def row(recipe, batch, peak, rss, inference=False):
        return dict(model='m', recipe=recipe, label=recipe, overrides={}, inference=inference, batch=batch,
                    trainable=1000, peak_mb=peak, peak_ratio=400 / peak, peak_at=dict(phase='backward'),
                    rss_growth_mb=rss, rss_ratio=None if rss is None else 500 / rss)

    table = fm.format_table([row('full_finetune', 25, 400, 500), row('lean_5shot', 4, 8, 25),
                             row('protonet', 25, 80, None, inference=True)])
    lines = table.splitlines()
    assert len(lines) == 5 and lines[0].startswith('| recipe | batch |')
    assert '| baseline |' in lines[2] and '| 50.0x less |' in lines[3] and '| 20.0x less |' in lines[3]
    assert 'inference' in lines[4] and lines[4].endswith('| - | - |')
