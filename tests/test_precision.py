"""The features' arithmetic: --precision auto keeps a faster one (int8, bf16) only where the fitted head cannot
tell it from fp32 on the check photos, falls back where it can and remembers that, and export refuses a
checkpoint whose answers the fp32 ONNX file would change."""
import copy

import pytest
import torch

import monkeypox as mp
import mpox.devices
import mpox.fidelity
import mpox.images
import mpox.int8
import mpox.model
import mpox.pipeline
import mpox.precision
import mpox.system
from conftest import PRE, TINY, make_dataset, one_line_error, relative, with_batchnorm_statistics

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
def test_bf16_that_reproduces_fp32_is_kept_and_an_int8_that_does_not_is_rejected(tmp_path):
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


@pytest.mark.parametrize('arch', ['resnet18', 'mobilenet_v2', pytest.param('vit_b_16', marks=pytest.mark.slow)])
def test_the_inference_backbone_with_normalisation_and_batchnorm_folded_gives_the_plain_features(arch):
    model = with_batchnorm_statistics(mpox.model.build_model(arch, 2))
    x = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(), mpox.model.without_head(model):
        plain = model(mpox.images.normalize(x, PRE))
    backbone, _ = mpox.precision.inference_model(model, torch.device('cpu'), 'fp32', PRE)
    with torch.inference_mode():
        folded = backbone(x.contiguous(memory_format=torch.channels_last))
    assert relative(folded, plain) < 1e-5
    # ViT's input goes to shape checks before its first convolution: it is normalised first, not folded
    assert backbone.folded == (arch != 'vit_b_16')


@pytest.mark.slow
@pytest.mark.skipif(not mpox.devices.int8_engine(), reason='int8 kernels are for x86 CPUs')
def test_an_int8_backbone_rebuilt_from_its_activation_ranges_is_the_calibrated_one_bit_for_bit():
    cpu, g = torch.device('cpu'), torch.Generator().manual_seed(3)
    model = with_batchnorm_statistics(mpox.model.build_model('resnet18', 2))
    calibration, x = (torch.randint(0, 256, (n, 3, 224, 224), dtype=torch.uint8, generator=g) for n in (6, 3))
    calibrated, _ = mpox.precision.inference_model(model, cpu, 'int8', PRE, calibrate=lambda b: b(calibration))
    rebuilt, _ = mpox.precision.inference_model(model, cpu, 'int8', PRE, qparams=calibrated.qparams)
    fp32, _ = mpox.precision.inference_model(model, cpu, 'fp32', PRE)
    with torch.inference_mode():
        a, b, f = (net(x.contiguous(memory_format=torch.channels_last)) for net in (calibrated, rebuilt, fp32))
    assert rebuilt.qparams == calibrated.qparams and torch.equal(a, b)
    assert torch.nn.functional.cosine_similarity(a, f).min() > 0.98  # int8 is near, not equal
    assert isinstance(model.conv1, torch.nn.Conv2d)  # the model itself stays fp32
    with pytest.raises(mpox.system.UserError, match='does not fit the int8 graph'):  # ranges of some other graph
        mpox.precision.inference_model(model, cpu, 'int8', PRE, qparams={**calibrated.qparams, 'elsewhere.scale': 1.0})
    # an observer shared by ops that pass their input's quantization on is pinned under every one of its names
    with mpox.model.without_head(model):
        backbone = mpox.precision.Backbone(torch.fx.symbolic_trace(model), model, 'int8', PRE)
    net = mpox.int8.observed_graph(backbone)
    names = [n for n, m in net.named_modules(remove_duplicate=False) if n in mpox.int8.observers(net) or 'post_process' in n]
    assert len(names) > len(mpox.int8.observers(net))  # resnet18 has such aliases (its max pool, its average pool)
    # the calibration's observers see flat views of the activations, and find PyTorch's own ranges to the bit
    flat = mpox.int8.flat_histogram_observer()
    histograms = [o for o in mpox.int8.observers(net).values() if isinstance(o, flat.__base__)]
    assert histograms and all(type(o) is flat for o in histograms)
    plain = copy.deepcopy(net)
    for o in plain.modules():
        if type(o) is flat:
            o.__class__ = flat.__base__
    ranges = []
    for graph in (net, plain):
        backbone.net = graph  # the same Backbone: the normalisation stays folded into the first convolution
        with torch.inference_mode():
            backbone(calibration.contiguous(memory_format=torch.channels_last))
        ranges.append({k: [float(v) for v in o.calculate_qparams()] for k, o in mpox.int8.observers(graph).items()})
    assert ranges[0] == ranges[1] == calibrated.qparams
    mpox.int8.pin_observers(net, calibrated.qparams, mpox.int8.fixed_observer)
    assert all(type(net.get_submodule(n)).__name__ == 'FixedQParamsObserver' for n in names)


def test_auto_extracts_a_frozen_cnn_in_int8_on_x86_cpus_when_the_crops_repay_it(monkeypatch):
    cpu, many = torch.device('cpu'), 10 ** 4
    assert (mpox.precision.resolve_precision('auto', cpu, 'resnet101', many) == 'int8') == (mpox.devices.int8_engine() is not None)
    assert mpox.precision.resolve_precision('auto', cpu, 'vit_b_16', many) != 'int8'  # attention models stay in bf16/fp32
    assert mpox.precision.resolve_precision('auto', cpu, None, many) != 'int8'  # fine-tuning
    least = mpox.int8.INT8_MIN_CROPS
    assert least['fast bf16'] > least['fp32']  # bf16 is the faster alternative: int8 must save more to repay itself
    if mpox.devices.fast_bf16() and mpox.devices.int8_engine():
        assert mpox.precision.resolve_precision('auto', cpu, 'resnet101', least['fast bf16'] - 1) == 'bf16'
        assert mpox.precision.resolve_precision('auto', cpu, 'resnet101', least['fast bf16']) == 'int8'
    monkeypatch.setenv('ONEDNN_MAX_CPU_ISA', 'AVX2')  # no fast bf16: the fp32 threshold
    assert mpox.precision.resolve_precision('auto', cpu, 'resnet101', least['fp32'] - 1) == 'fp32'
    expected = 'int8' if mpox.devices.int8_engine() else 'fp32'
    assert mpox.precision.resolve_precision('auto', cpu, 'resnet101', least['fp32']) == expected
    with pytest.raises(SystemExit):
        mp.parse_args(['train', '--precision', 'int8', '--unfreeze', '1'])


def test_a_cpu_held_below_its_bf16_units_runs_fp32(monkeypatch):
    cpu = torch.device('cpu')
    monkeypatch.setenv('ONEDNN_MAX_CPU_ISA', 'AVX2')  # how bench_speed.py --isa avx2 runs (bf16 would be emulated)
    assert mpox.precision.resolve_precision('auto', cpu) == 'fp32'
    monkeypatch.setenv('ONEDNN_MAX_CPU_ISA', 'AVX512_CORE_AMX')
    fast = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert mpox.precision.resolve_precision('auto', cpu) == ('bf16' if fast else 'fp32')
