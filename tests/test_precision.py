"""The features' arithmetic: --precision auto keeps a faster one (int8, bf16) only where the fitted head cannot
tell it from fp32 on the check photos, falls back where it can and remembers that, and export refuses a
checkpoint whose answers the fp32 ONNX file would change."""
import pytest
import torch

import monkeypox as mp
import mpox.devices
import mpox.fidelity
import mpox.int8
import mpox.pipeline
import mpox.precision
from conftest import TINY, make_dataset, one_line_error

int8_here = pytest.mark.skipif(mpox.devices.int8_engine() is None, reason='int8 needs an x86 CPU with PyTorch\'s int8 kernels')


@pytest.fixture
def int8_from_any_crops(monkeypatch):
    """auto tries int8 whatever the run's size: these runs are far below the crops from which int8 pays."""
    monkeypatch.setitem(mpox.int8.INT8_MIN_CROPS, 'fp32', 0)
    monkeypatch.setitem(mpox.int8.INT8_MIN_CROPS, 'fast bf16', 0)


def checkpoint(out):
    return torch.load(out / 'monkeypox_model.pkl', weights_only=True)


@pytest.mark.slow
@int8_here
def test_auto_falls_back_from_an_int8_that_moves_the_heads_answers_and_remembers_it(tmp_path, cli,
                                                                                  int8_from_any_crops):
    data = make_dataset(tmp_path / 'd', per_class=16)
    args = ('train', '--data', data, *TINY, '--out', tmp_path / 'chk')
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    assert 'in int8, ' in r.stdout and 'precision: int8 does not reproduce fp32' in r.stdout, r.stdout
    ckpt = checkpoint(tmp_path / 'chk')
    tried = ckpt['fidelity']
    assert tried[0]['precision'] == 'int8' and not tried[0]['faithful']
    assert tried[0]['photos'] == 16 and tried[0]['limits'] == mpox.fidelity.FIDELITY_LIMITS
    assert any(tried[0][k] > v for k, v in mpox.fidelity.FIDELITY_LIMITS.items())
    used = [c for c in tried if c['precision'] == ckpt['precision']]  # fp32, or a bf16 that passed its own check
    assert ckpt['precision'] != 'int8' and ckpt['int8'] is None and all(c['faithful'] for c in used)
    again = cli(*args)  # the cache remembers: int8 is not tried again for this network and weights
    assert again.returncode == 0, again.stderr
    assert 'precision: int8 skipped: it did not reproduce fp32 for resnet18' in again.stdout
    assert 'in int8' not in again.stdout and checkpoint(tmp_path / 'chk')['precision'] == ckpt['precision']


@pytest.mark.slow
def test_an_arithmetic_that_reproduces_fp32_is_kept_and_one_that_does_not_is_reported(tmp_path):
    """bf16 keeps 8 bits of mantissa and moves this head's answers little; int8 on random weights moves them more
    (check_fidelity on the same photos, network and head)."""
    data = make_dataset(tmp_path / 'd', per_class=12)
    verdicts = {}
    for precision in ['bf16'] + (['int8'] if mpox.devices.int8_engine() else []):
        cfg = mp.parse_args(['train', '--data', str(data), *TINY, '--views', '1', '--precision', precision,
                             '--out', str(tmp_path / precision)])
        prep = mpox.pipeline.prepare(cfg)
        assert prep.extractor.precision == precision and len(prep.fidelity) == 1
        verdicts[precision] = prep.fidelity[0]
    assert verdicts['bf16']['faithful'], verdicts
    assert verdicts['bf16']['median'] <= mpox.fidelity.FIDELITY_LIMITS['median']
    if 'int8' in verdicts:
        assert not verdicts['int8']['faithful'] and verdicts['int8']['median'] > verdicts['bf16']['median']


def test_auto_tries_the_faster_arithmetics_first_and_ends_with_fp32():
    cpu = torch.device('cpu')
    assert mpox.precision.precision_candidates('auto', cpu, 'resnet101', 0)[-1] == 'fp32'
    assert mpox.precision.precision_candidates('fp32', cpu, 'resnet101', 10 ** 6) == ['fp32']
    many = mpox.precision.precision_candidates('auto', cpu, 'resnet101', 10 ** 6)
    assert many == (['int8'] if mpox.devices.int8_engine() else []) + (['bf16'] if mpox.devices.fast_bf16() else []) + ['fp32']
    assert 'int8' not in mpox.precision.precision_candidates('auto', cpu, None, 10 ** 6)  # fine-tuning: no int8


@pytest.mark.slow
@int8_here
def test_export_refuses_an_int8_checkpoint_whose_answers_fp32_would_change(tmp_path, cli):
    data = make_dataset(tmp_path / 'd', per_class=12)
    r = cli('train', '--data', data, *TINY, '--precision', 'int8', '--out', tmp_path / 'chk')
    assert r.returncode == 0, r.stderr
    assert 'warning: --precision int8: this model\'s answers will differ from fp32\'s' in r.stderr
    assert not checkpoint(tmp_path / 'chk')['fidelity'][0]['faithful']
    out = tmp_path / 'model.onnx'
    one_line_error(cli('export', '--checkpoint', tmp_path / 'chk' / 'monkeypox_model.pkl', '--out', out),
                   'not written', 'int8 features, which do not reproduce fp32', '--precision auto or fp32')
    assert not out.exists()
