"""Speed that changes no number: every rewrite of the backbone gives the plain model's features, compiling
follows the measured threshold, and the benchmark runs (its timings live in the benchmark, not here)."""

import copy
import pytest
import torch

import monkeypox as mp
import mpox.devices
import mpox.features
import mpox.images
import mpox.int8
import mpox.model
import mpox.precision
import mpox.system
import mpox.training

PRE = {'image_size': 224, 'resize': 256, 'mean': list(mp.MEAN), 'std': list(mp.STD)}


def with_batchnorm_statistics(model, seed=0):
    """ImageNet-like BatchNorm statistics (a fresh model's are 0 and 1, which any folding gets right)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


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


def test_fine_tuning_folds_only_the_frozen_batchnorms_and_keeps_outputs_and_gradients():
    model = with_batchnorm_statistics(mpox.model.build_model('resnet18', 2))
    mpox.model.freeze(model, 1)  # layer4 and fc train
    folded = mpox.training.frozen_folded(model)
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 1, 0])
    grads = []
    for net in (model, folded):
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})
    assert relative(folded(x), model(x)) < 1e-5
    assert grads[0].keys() == grads[1].keys() and any(k.startswith('layer4.') for k in grads[0])
    for k in grads[0]:
        assert relative(grads[1][k], grads[0][k]) < 1e-4, k
    folded_names = [n for n, m in folded.named_children() if n.endswith('_folded')]
    assert folded_names and not any(n.startswith('layer4') for n in folded_names)  # trainable BatchNorms stay
    assert all(isinstance(model.get_submodule(n), torch.nn.BatchNorm2d) for n in ('bn1', 'layer1.0.bn1'))


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
    if mpox.devices.fast_bf16() and mpox.devices.int8_engine():  # int8 from 300 crops where bf16 is the alternative
        assert mpox.precision.resolve_precision('auto', cpu, 'resnet101', 299) == 'bf16'
        assert mpox.precision.resolve_precision('auto', cpu, 'resnet101', 300) == 'int8'
    monkeypatch.setenv('ONEDNN_MAX_CPU_ISA', 'AVX2')  # no fast bf16: int8 from 200 crops
    assert mpox.precision.resolve_precision('auto', cpu, 'resnet101', 199) == 'fp32'
    assert mpox.precision.resolve_precision('auto', cpu, 'resnet101', 200) == ('int8' if mpox.devices.int8_engine() else 'fp32')
    with pytest.raises(SystemExit):
        mp.parse_args(['train', '--precision', 'int8', '--unfreeze', '1'])


def test_compiling_follows_the_measured_threshold(tmp_path, monkeypatch):
    cpu, cuda = torch.device('cpu'), torch.device('cuda')
    assert not mpox.features.compile_pays(3999, False, cpu, 'fp32') and mpox.features.compile_pays(4000, False, cpu, 'bf16')  # cold cache
    assert not mpox.features.compile_pays(599, True, cpu, 'fp32') and mpox.features.compile_pays(600, True, cpu, 'fp32')  # warm
    assert not mpox.features.compile_pays(10 ** 6, True, cuda, 'bf16')  # extraction on a GPU waits on decoding
    assert not mpox.features.compile_pays(10 ** 6, True, cpu, 'int8')  # quantized kernels are the fast path already
    backbone, _ = mpox.precision.inference_model(mpox.model.build_model('resnet18', 2), cpu, 'fp32', PRE)
    monkeypatch.setenv('TORCHINDUCTOR_CACHE_DIR', str(tmp_path / 'compile'))  # compiled() points torch there
    for flag, crops, compiles in (('auto', 100, False), ('never', 10 ** 6, False), ('auto', 4000, True),
                                  ('always', 1, True)):
        cfg = mp.parse_args(['train', '--compile', flag, '--device', 'cpu', '--cache', str(tmp_path), '--precision',
                             'fp32'])
        extractor = mpox.features.Extractor(cfg, ['a', 'b'], mpox.model.resolve_weights(cfg))
        fn = mpox.features.compiled(backbone, crops, 16, extractor)
        assert (fn is not backbone) == compiles, (flag, crops)  # the eager backbone, untouched, or a wrapper
    # compiling happens at the first batch, not here: nothing was compiled, so no marker claims a warm cache
    assert not list((tmp_path / 'compile').glob('compiled-*'))


def test_a_cpu_held_below_its_bf16_units_runs_fp32(monkeypatch):
    cpu = torch.device('cpu')
    monkeypatch.setenv('ONEDNN_MAX_CPU_ISA', 'AVX2')  # how bench_speed.py --isa avx2 runs (bf16 would be emulated)
    assert mpox.precision.resolve_precision('auto', cpu) == 'fp32'
    monkeypatch.setenv('ONEDNN_MAX_CPU_ISA', 'AVX512_CORE_AMX')
    fast = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert mpox.precision.resolve_precision('auto', cpu) == ('bf16' if fast else 'fp32')


@pytest.mark.slow
def test_the_benchmark_runs_on_a_few_synthetic_photos(capsys):
    import bench_speed  # its main() in this process (torch is imported already); its `train` runs are processes
    bench_speed.main(['--photos', '8', '--arch', 'mobilenet_v3_small', '--trials', '1'])
    out = capsys.readouterr().out
    assert 'CPU flags:' in out and 'matmul peaks measured now' in out
    assert out.count('crops/s (eager)') == 1  # at 8 photos, neither a warm compile cache nor N/4 is run:
    assert 'nothing compiled' in out and 'too few photos to compare memory' in out  # they say so
    assert 'decoding and the rest' in out and 'peak RSS' in out
