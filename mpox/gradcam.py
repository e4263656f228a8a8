"""Grad-CAM: where in the crop the model looked for the class it predicted."""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T

from .images import normalize
from .int8 import FakeQuant, int8_emulation
from .model import backbone_stages, head_name, without_head
from .precision import Backbone


MAP_OPACITY = 0.45  # of the heat map drawn over the crop (predict --explain, serve's map)


def grad_cam(model, pre, qparams=None):
    """Grad-CAM (Selvaraju et al. 2017) on the last convolutional stage, through torch hooks: its activations
    weighted by their mean gradient of the class's log-probability (not its raw score, so evidence shared by
    all classes cancels). The map is the mean of those of the crop and its three flips, flipped back:
    stride-2 convolutions with padding 1 shift each feature cell half a cell up and left of where upsampling
    puts it, and the flips cancel that. Bicubic upsampling lets the maximum fall between cells (bilinear
    pins it to a cell centre). A checkpoint trained on int8 features (`qparams`) is explained through its
    int8 network, emulated with gradients (int8_emulation): the fp32 network is not the one its head was
    trained on. How often the maximum falls where the class's evidence is: docs/evaluate-predict.md.
    Returns explain(photo, class index) -> (the centre crop the model saw, a [0, 1] map), the network built
    once; `photo` is the decoded image as scoring decodes it (load_rgb, drafted at the resize)."""
    stage, device = backbone_stages(model)[-1], next(model.parameters()).device
    if qparams:
        with without_head(model):
            backbone = int8_emulation(Backbone(torch.fx.symbolic_trace(model), model, 'int8', pre), qparams).to(device)
        backbone.net.requires_grad_(False)  # frozen: only the activations from the stage on carry gradients
        layer, head = stage_output(backbone.net, model, stage), model.get_submodule(head_name(model))

        def run(x):
            return head(backbone(x.contiguous(memory_format=torch.channels_last)))
    else:
        layer = stage

        def run(x):
            return model(normalize(x, pre))

    def explain(photo, target):
        saved = {}

        def hook(_, __, out):  # the last call wins: a module called twice (ResNet's relu) ends with the stage
            # The stage's output, cut from the frozen backbone before it as a leaf that takes gradients: the
            # backward pass runs through the pooling and the head only, not back to the input
            out = saved['act'] = out.detach().requires_grad_(True)
            out.register_hook(lambda g: saved.__setitem__('grad', g))
            return out

        crop = T.Compose([T.Resize(pre['resize']), T.CenterCrop(pre['image_size'])])(photo)
        x, flips = T.PILToTensor()(crop)[None], [(), (3,), (2,), (2, 3)]
        x = torch.cat([x.flip(dims) if dims else x for dims in flips]).to(device)
        handle = layer.register_forward_hook(hook)
        try:
            with torch.enable_grad():
                run(x).log_softmax(1)[:, target].sum().backward()
        finally:
            handle.remove()
        act, grad = saved['act'].detach(), saved['grad'].detach()
        cams = F.relu((grad.mean(dim=(2, 3), keepdim=True) * act).sum(1, keepdim=True))
        cam = sum(cams[k:k + 1].flip(dims) if dims else cams[k:k + 1] for k, dims in enumerate(flips)) / len(flips)
        cam = F.interpolate(cam, size=crop.size[::-1], mode='bicubic', align_corners=False)[0, 0]
        cam = (cam - cam.min()) / (cam.max() - cam.min() + 1e-12)
        return np.asarray(crop), cam.cpu().numpy()
    return explain


def stage_output(graph, model, stage):
    """In a traced graph of `model`, a module (an identity, added) whose output is the output of `stage`, one
    of the model's submodules: after the rounding that follows the stage's last node when int8 put one
    there. Its own module, because a rounding module is shared with the ops that pass its values on."""
    name = next(n for n, m in model.named_modules() if m is stage)
    last = [n for n in graph.graph.nodes if n.op == 'call_module' and (n.target == name or
                                                                       n.target.startswith(name + '.'))][-1]
    users = list(last.users)
    if len(users) == 1 and users[0].op == 'call_module' and isinstance(graph.get_submodule(users[0].target), FakeQuant):
        last = users[0]
    graph.add_submodule('stage_output', nn.Identity())
    with graph.graph.inserting_after(last):
        tap = graph.graph.call_module('stage_output', (last,))
    last.replace_all_uses_with(tap)
    tap.args = (last,)  # replace_all_uses_with rewired the tap itself too
    graph.recompile()
    return graph.get_submodule('stage_output')
