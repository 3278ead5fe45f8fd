"""benchmarks/backbones.py: its counts, its timing loop and its report, on small models at a small size."""
import json
import time

import pytest
import timm
import torch
from torch import nn

from benchmarks import backbones

SIZE = 64  # the smallest size worth timing; the family needs at least 32 px


def test_macs_are_flops_over_two_of_conv_and_matmul():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert backbones.count_macs(conv, torch.randn(1, 3, 10, 10)) == 10 * 10 * 8 * 3 * 9
    assert backbones.count_macs(nn.Linear(16, 4), torch.randn(1, 16)) == 16 * 4


def test_params_and_macs_of_the_family():
    x = torch.randn(1, 3, SIZE, SIZE)
    small, large = timm.create_model('lkca_mobilenet'), timm.create_model('lkca_mobilenet_large')
    assert backbones.count_params(small) == sum(p.numel() for p in small.parameters())
    assert 0 < backbones.count_macs(small, x) < backbones.count_macs(large, x)


class _Sleeper:
    """A stand-in model that takes a known time and counts its calls."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.calls = 0

    def __call__(self):
        self.calls += 1
        time.sleep(self.seconds)


def test_round_robin_counts_and_orders_by_time():
    fast, slow = _Sleeper(0.001), _Sleeper(0.003)
    samples = backbones.time_round_robin({'fast': fast, 'slow': slow}, runs=7, warmup=2, rounds=3)
    assert [len(samples['fast']), len(samples['slow'])] == [9, 9]  # 3 rounds x ceil(7 / 3)
    assert fast.calls == slow.calls == 2 + 9
    median = {k: sorted(v)[len(v) // 2] for k, v in samples.items()}
    assert 1.0 <= median['fast'] < median['slow'] < 10.0


def test_benchmark_rows_are_sane():
    names = ['lkca_mobilenet_050', backbones.REFERENCE]
    rows = backbones.benchmark(names, size=SIZE, runs=6, warmup=2, rounds=2)
    assert [r['model'] for r in rows] == names
    model = timm.create_model('lkca_mobilenet_050')
    assert rows[0]['params_m'] == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6)
    for row in rows:
        assert row['macs_m'] > 0 and row['torch_n'] == 6 and 'onnx_ms' not in row
        assert 0 < row['torch_q1'] <= row['torch_ms'] <= row['torch_q3']
    assert rows[0]['torch_vs_ref'] == pytest.approx(rows[0]['torch_ms'] / rows[1]['torch_ms'])
    assert rows[1]['torch_vs_ref'] == 1.0


@pytest.mark.slow  # one dynamo export: about 4 s
def test_benchmark_through_onnxruntime():
    rows = backbones.benchmark(['lkca_mobilenet_050'], size=SIZE, runs=4, warmup=1, rounds=2, onnx=True)
    assert 'onnx_error' not in rows[0], rows[0].get('onnx_error')
    assert rows[0]['onnx_n'] == 4 and 0 < rows[0]['onnx_q1'] <= rows[0]['onnx_ms'] <= rows[0]['onnx_q3']
    assert rows[0]['onnx_vs_ref'] is None  # the reference was not measured


def test_failed_export_is_reported_in_its_row(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError('no exporter today\nsecond line')

    monkeypatch.setattr(backbones, 'onnx_call', refuse)
    rows = backbones.benchmark(['lkca_mobilenet_050'], size=SIZE, runs=2, warmup=0, rounds=1, onnx=True)
    assert rows[0]['onnx_error'] == 'RuntimeError: no exporter today'
    assert rows[0]['torch_ms'] > 0 and rows[0]['torch_vs_ref'] is None  # the reference was not measured
    assert 'export failed: RuntimeError: no exporter today' in backbones.format_table(rows, onnx=True)


def test_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / 'results' / 'bench.json'
    backbones.main(['--models', 'lkca_mobilenet_dw3', '--runs', '4', '--warmup', '1', '--rounds', '2',
                    '--size', str(SIZE), '--out', str(out)])
    lines = capsys.readouterr().out.splitlines()
    table = [line for line in lines if line.startswith('| ')]
    assert table[0].startswith('| model | params (M) | MACs (M) | torch ms (median) | vs tf_mnv3_small |')
    assert [line.split(' | ')[0] for line in table[1:]] == ['| lkca_mobilenet_dw3', f'| {backbones.REFERENCE}']
    assert any('FLOPs / 2' in line and 'only' in line for line in lines)
    saved = json.loads(out.read_text())
    assert saved['meta']['size'] == SIZE and saved['meta']['threads'] == 1 and saved['meta']['samples'] == 4
    assert [r['model'] for r in saved['rows']] == ['lkca_mobilenet_dw3', backbones.REFERENCE]


@pytest.mark.parametrize('option', [['--runs', '0'], ['--rounds', '5', '--runs', '4'], ['--size', '16'],
                                    ['--models', 'lkca_mobilenet_tiny']])
def test_cli_refuses_bad_options(option, capsys):
    with pytest.raises(SystemExit):
        backbones.main(option)
    assert 'error:' in capsys.readouterr().err
