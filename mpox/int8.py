"""int8: a frozen backbone quantized after training, its activation ranges calibrated on training photos."""

import contextlib
import copy
import functools

import torch
import torch.nn as nn

from .data import patient_groups
from .devices import fast_bf16, int8_engine
from .system import UserError, gather, hidden_warnings


def int8_pays(arch, crops):
    """Whether 'auto' tries `arch`'s features in int8 for a run of `crops` crops: CNN families whose
    quantized graph was checked to build and run (attention models stay in bf16/fp32), on a CPU with int8
    kernels, when the crops repay calibrating and building the int8 graph (INT8_MIN_CROPS, against fp32 or
    against a CPU's fast bf16; docs/precision.md). Whether int8 is then kept is the fidelity check's call."""
    families = ('resnet', 'resnext', 'wide_resnet', 'regnet', 'vgg', 'mobilenet', 'efficientnet')  # not DenseNet:
    # its int8 concatenations join inputs quantized on different scales, which PyTorch warns is inaccurate
    least = INT8_MIN_CROPS['fast bf16' if fast_bf16() else 'fp32']
    return int8_engine() is not None and arch.startswith(families) and crops >= least


INT8_MIN_CROPS = {'fp32': 200, 'fast bf16': 300}  # crops from which int8 repays its build, against each (docs)
# what torch.ao.quantization says on every use: its deprecation in favour of torchao, the x86 recipe's own
# reduce_range setting, and quantized tensors' future; any other warning shows
QUANTIZATION_NOTICES = ((DeprecationWarning, 'torch.ao.quantization is deprecated'),
                        (UserWarning, 'Please use quant_min and quant_max to specify the range for observers'),
                        (UserWarning, 'torch.quantize_per_tensor, torch.quantize_per_channel and other quantized'))


@contextlib.contextmanager
def quantization():
    """PyTorch's x86 int8 engine for the block (put back after it), its routine notices hidden."""
    saved = torch.backends.quantized.engine
    torch.backends.quantized.engine = int8_engine() or saved
    try:
        with hidden_warnings(*QUANTIZATION_NOTICES):
            yield
    finally:
        torch.backends.quantized.engine = saved


def quantize_int8(backbone, qparams=None, calibrate=None):
    """The backbone's graph in int8, in place: PyTorch's post-training static quantization (FX mode, the x86
    engine's default recipe: weights int8 per output channel, activations uint8 per tensor over a 7-bit range,
    BatchNorm folded). The weights are quantized from the fp32 weights, so a network is fixed by its
    activation ranges: `qparams` (a checkpoint's: each observer's scale and zero point), else those
    HistogramObservers find while `calibrate(backbone)` runs crops through it (rank 0's, under torchrun).
    Either way the ranges are pinned (FixedQParamsObserver) before converting: the same qparams give the
    same network bit for bit. torch.ao.quantization is deprecated in favour of torchao, whose quantization
    needs torch.compile to be fast; it is still shipped and exact, and its routine notices are hidden."""
    from torch.ao.quantization.quantize_fx import convert_fx
    with quantization():
        net = observed_graph(backbone)
        if qparams is None:
            backbone.net = net
            with torch.inference_mode():
                calibrate(backbone)
            qparams = gather({name: [float(v) for v in obs.calculate_qparams()]
                              for name, obs in observers(net).items()})[0]
        pin_observers(net, qparams, fixed_observer)
        backbone.net = convert_fx(net).to(memory_format=torch.channels_last)
    backbone.qparams = qparams
    return backbone


def observed_graph(backbone):
    """A copy of the backbone's graph with PyTorch's int8 recipe applied up to its observers."""
    if backbone.net is None:
        raise UserError(f'--precision int8: {type(backbone.model).__name__} cannot be traced by torch.fx, which '
                        'int8 needs; use --precision fp32')
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx
    size = backbone.pre['image_size']
    with quantization():
        net = prepare_fx(copy.deepcopy(backbone.net), get_default_qconfig_mapping('x86'),
                         (torch.zeros(1, 3, size, size),))
    flat = flat_histogram_observer()
    for mod in net.modules():
        if type(mod) is flat.__base__:  # the same observer, its forward only
            mod.__class__ = flat
    return net


@functools.cache
def flat_histogram_observer():
    """PyTorch's HistogramObserver, shown each activation as one flat run of memory: its min, max and
    histogram do not depend on the order of the values, and on channels_last activations a flat view spares
    its reductions a strided walk: the same ranges to the bit, found faster (docs/precision.md)."""
    from torch.ao.quantization.observer import HistogramObserver

    class FlatHistogramObserver(HistogramObserver):
        def forward(self, x):
            v = x.detach()
            if v.dim() == 4 and v.is_contiguous(memory_format=torch.channels_last):
                v = v.permute(0, 2, 3, 1)  # NHWC in memory: this view is contiguous, reshape copies nothing
            super().forward(v.reshape(-1))
            return x
    return FlatHistogramObserver


def observers(net):
    """The graph's observers by name (the first of each one's names)."""
    from torch.ao.quantization.observer import ObserverBase
    return {name: mod for name, mod in net.named_modules() if isinstance(mod, ObserverBase)}


def pin_observers(net, qparams, make):
    """Replace each observer of `net` by make(observer, scale, zero_point) with the scale and zero point
    `qparams` gives it, under every name it has (ops that pass their input's quantization on, pooling and
    flattening, share their input's observer); refused when the names differ (a torch that builds the
    int8 graph otherwise)."""
    found = observers(net)
    if set(found) != set(qparams):
        raise UserError('the int8 calibration this model carries does not fit the int8 graph this torch builds '
                        f'(torch {torch.__version__}); pass --precision fp32, or retrain with this torch')
    made = {id(obs): make(obs, float(qparams[name][0]), int(qparams[name][1])) for name, obs in found.items()}
    for name, mod in list(net.named_modules(remove_duplicate=False)):
        if id(mod) in made:
            net.set_submodule(name, made[id(mod)])


def fixed_observer(obs, scale, zero):
    from torch.ao.quantization.observer import FixedQParamsObserver
    return FixedQParamsObserver(scale, zero, dtype=obs.dtype, qscheme=obs.qscheme, quant_min=obs.quant_min,
                                quant_max=obs.quant_max)


class FakeQuant(nn.Module):
    """An activation rounded to its int8 grid and back, in fp32, with gradients (straight through)."""

    def __init__(self, obs, scale, zero):
        super().__init__()
        self.scale, self.zero = scale, zero
        self.low, self.high = torch.iinfo(obs.dtype).min, torch.iinfo(obs.dtype).max

    def forward(self, x):
        if x.requires_grad:
            return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero, self.low, self.high)
        # onto the same grid in plain arithmetic, cheaper than the fused op on CPU; before Grad-CAM's stage nothing
        # needs gradients
        return x.div(self.scale).round_().add_(self.zero).clamp_(self.low, self.high).sub_(self.zero).mul_(self.scale)


def int8_emulation(backbone, qparams):
    """The int8 backbone as differentiable fp32 arithmetic, for Grad-CAM: the same graph with each observer
    replaced by its rounding (FakeQuant) and the weights rounded per channel as the int8 kernels hold them.
    It follows the int8 network closely, not bit for bit (the kernels round their sums otherwise)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    with quantization():
        net = observed_graph(backbone)
        pin_observers(net, qparams, FakeQuant)
        weight_observer = get_default_qconfig_mapping('x86').global_qconfig.weight
        for mod in net.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                obs = weight_observer()
                obs(mod.weight)
                scale, zero = obs.calculate_qparams()
                info = torch.iinfo(obs.dtype)
                with torch.no_grad():
                    mod.weight.copy_(torch.fake_quantize_per_channel_affine(
                        mod.weight, scale.float(), zero.int(), obs.ch_axis, info.min, info.max))
    backbone.net = net
    return backbone


def calibration_patients(photos, calibration):
    """Indices of the photos of every patient with a photo in `calibration`: cv never scores them, so no
    scored photo shaped the int8 activation ranges (calibrating on photos it then scores flatters cv:
    docs/precision.md)."""
    if not calibration:
        return set()
    groups, chosen = patient_groups(photos), {p.path for p in calibration}
    marked = {g for g, p in zip(groups, photos) if p.path in chosen}
    return {i for i, g in enumerate(groups) if g in marked}


def calibration_photos(photos, n):
    """The photos whose crops calibrate int8: the first n by content hash, so the same training photos give
    the same choice whatever their order or names."""
    return sorted(photos, key=lambda p: p.sha)[:n]
