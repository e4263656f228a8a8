"""The backbone's arithmetic (fp32, bf16, int8) and the inference form every scoring pass goes through."""

import contextlib
import copy

import torch
import torch.nn as nn

from .devices import autocast, fast_bf16, int8_engine, resolve_device
from .images import normalize
from .int8 import int8_pays, quantization, quantize_int8
from .model import head_name, without_head
from .system import UserError, say


def resolve_precision(precision, device, arch=None, crops=0):
    """fp32, bf16 or int8 (the backbone pass): the fastest arithmetic 'auto' may try. `arch` and `crops`: given
    for the features of a frozen backbone, which 'auto' tries in int8 where int8_pays says so; otherwise bf16
    where the hardware is fast at it."""
    return precision_candidates(precision, device, arch, crops)[0]


def precision_candidates(precision, device, arch=None, crops=0):
    """The arithmetics 'auto' tries for the backbone, fastest first, ending with fp32 (the reference every other
    one is checked against: check_fidelity); a given --precision alone."""
    if precision != 'auto':
        return [precision]
    if device.type == 'cuda':
        return ['bf16', 'fp32'] if torch.cuda.is_bf16_supported() else ['fp32']
    fast = ['int8'] if arch is not None and int8_pays(arch, crops) else []
    return fast + (['bf16'] if fast_bf16() else []) + ['fp32']


def scoring_precision(cfg, loaded, device):
    """--precision for evaluate and predict: auto means the checkpoint's own, so that they compute the numbers
    training validated: int8 with the checkpoint's calibration; fp32; bf16 unless this machine is not fast at
    it. An int8 checkpoint where int8 cannot run (a GPU, a CPU without x86 int8 kernels) is scored in fp32.
    Decided once per loaded model (its note printed once), whatever asks: the scores, then Grad-CAM."""
    if loaded.scoring is None:
        loaded.scoring = decide_scoring_precision(cfg, loaded, device)
    return loaded.scoring


def decide_scoring_precision(cfg, loaded, device):
    own = loaded.ckpt.get('precision')
    if cfg.precision == 'int8' and not loaded.ckpt.get('int8'):
        raise UserError(f'{cfg.checkpoint}: --precision int8 needs a checkpoint trained in int8 (it carries the '
                        f'calibration); this one was trained in {own or "fp32"}: drop --precision int8')
    if cfg.precision != 'auto':
        return cfg.precision
    if own == 'int8':
        if device.type == 'cpu' and int8_engine():
            return 'int8'
        say(f'note: {cfg.checkpoint} was trained on int8 features, which this {device.type} cannot compute: '
            'scoring in fp32, whose probabilities differ slightly from training\'s')
        return 'fp32'
    return 'fp32' if own == 'fp32' else resolve_precision('auto', device)


def inference_model(model, device, precision, pre, qparams=None, calibrate=None):
    """The backbone and the head for passes without gradients (features, predict, evaluate, validation).
    The backbone takes uint8 crops, channels_last. Traced with torch.fx, it is rewritten exactly: the
    normalisation goes into the first convolution's weights (Backbone), and in fp32 each BatchNorm is folded
    into the convolution before it. In bf16 the BatchNorms stay, under autocast: rounding folded weights to
    bf16 is faster but costs accuracy (docs/precision.md). In int8 the graph is quantized (quantize_int8) with the activation ranges `qparams`,
    or those `calibrate` measures (then found in backbone.qparams). Every pass that scores photos goes
    through here, so training, evaluate and predict compute the same numbers."""
    model.to(device)
    from torch.fx.experimental.optimization import fuse
    with without_head(model):
        try:  # fuse() works on a copy; symbolic_trace shares the model's modules (Backbone copies what it edits)
            graph = fuse(model) if precision == 'fp32' else torch.fx.symbolic_trace(model)
        except Exception:  # a model torch.fx cannot trace: unfolded, still correct
            graph = None
    backbone = Backbone(graph, model, precision, pre).to(device)
    if precision == 'int8':
        quantize_int8(backbone, qparams, calibrate)
    return backbone.eval(), model.get_submodule(head_name(model))


class Backbone(nn.Module):
    """A model's backbone for uint8 crops: x - 255 mean into a first convolution whose weights were divided by
    255 std per input channel, which is the normalisation exactly (zero padding included: the padded value
    is the mean in both), saving a pass over every crop. Used when the traced graph feeds the input straight
    into a convolution; otherwise (or for a model torch.fx cannot trace) the input is normalised first."""

    def __init__(self, graph, model, precision, pre):
        super().__init__()
        self.precision, self.pre, self.folded, self.qparams = precision, pre, False, None
        self.net, self.model = graph, model
        self.register_buffer('shift', 255 * torch.tensor(pre['mean']).view(1, -1, 1, 1), persistent=False)
        if graph is not None:
            users = list(next(n for n in graph.graph.nodes if n.op == 'placeholder').users)
            conv = graph.get_submodule(users[0].target) if len(users) == 1 and users[0].op == 'call_module' else None
            if isinstance(conv, nn.Conv2d) and conv.padding_mode == 'zeros':
                conv = copy.deepcopy(conv)
                with torch.no_grad():
                    conv.weight.div_(255 * torch.tensor(pre['std'], device=conv.weight.device).view(1, -1, 1, 1))
                graph.add_submodule(users[0].target, conv)
                self.folded = True
        self.to(memory_format=torch.channels_last)

    def forward(self, x):
        x = x.float() - self.shift if self.folded else normalize(x, self.pre)
        eager = not torch.compiler.is_compiling()  # its engine around the pass (a compiled graph has it built in)
        int8 = quantization() if self.precision == 'int8' and eager else contextlib.nullcontext()
        with autocast(x.device, self.precision), int8:
            if self.net is not None:
                return self.net(x)
            with without_head(self.model):
                return self.model(x)


def explained_qparams(cfg, loaded):
    """The int8 activation ranges Grad-CAM follows: the checkpoint's, when predict scores it in int8."""
    device = resolve_device(cfg.device)
    return loaded.qparams if scoring_precision(cfg, loaded, device) == 'int8' else None
