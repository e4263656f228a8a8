"""A torchvision backbone with a new head: building it, its weights, what is frozen."""

import contextlib
import dataclasses
import os
import sys

import torch
import torch.nn as nn
import torchvision

from .files import safe_torch_load, sha256_file
from .system import UserError, first_line, hidden_warnings


CHECKPOINT_FORMAT = 'monkeypox.py checkpoint'


def build_model(arch, num_classes, state=None, load_head=False, seed=0):
    """torchvision's `arch` with its classifier replaced by a new Linear(features, num_classes).
    `state`: a state_dict for this arch; its head is loaded only with `load_head` (a checkpoint of
    ours), otherwise the head is freshly initialised from `seed` (ImageNet weights have 1000 outputs)."""
    torch.manual_seed(seed)
    model = construct(arch, meta=state is not None)
    name = head_name(model)
    model.set_submodule(name, new_head(model.get_submodule(name).in_features, num_classes, seed))
    if state is None:
        return model.eval()
    head_keys = {f'{name}.weight', f'{name}.bias'}
    if not load_head:
        state = {k: v for k, v in state.items() if k not in head_keys}
    missing, unexpected = load_state(model, state)
    missing = [k for k in missing if load_head or k not in head_keys]
    if missing or unexpected:
        raise WeightsMismatch(arch, missing, unexpected)
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        fresh = construct(arch, meta=False)  # a buffer the state_dict does not carry: build for real
        fresh.set_submodule(name, model.get_submodule(name))
        fresh.load_state_dict({k: v for k, v in model.state_dict().items() if not v.is_meta}, strict=False)
        model = fresh
    return model.eval()


def pretrained_model(cfg, spec, num_classes):
    """--arch with --weights loaded and a fresh head, frozen; wrong weights are a one-line error."""
    state = load_weights(cfg.arch, spec)
    try:
        model = build_model(cfg.arch, num_classes, state, seed=cfg.seed)
    except WeightsMismatch as e:
        other = guess_arch(state)
        hint = f'they look like {other}: pass --arch {other}' if other else f'pass weights made for {cfg.arch}'
        raise UserError(f'weights {spec.name} {e}; {hint}') from e
    freeze(model)
    return model


def construct(arch, meta):
    """torchvision's `arch`, parameters on the meta device (no memory, no init) when `meta`."""
    with hidden_warnings((FutureWarning, 'The default weight initialization of')):  # googlenet, inception_v3
        if meta:
            try:
                with torch.device('meta'):
                    return torchvision.models.get_model(arch, weights=None)
            except Exception:  # some builders compute on tensors (regnet): build for real
                pass
        return torchvision.models.get_model(arch, weights=None)


def new_head(in_features, num_classes, seed):
    """The new classifier, drawn from `seed`: train's full model and cv's bare heads start alike."""
    torch.manual_seed(seed)
    return nn.Linear(in_features, num_classes)


def head_name(model):
    """Name of the classifier layer: the model's last nn.Linear (fc, classifier.1, heads.head, ...)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise UserError(f'{type(model).__name__} has no linear classifier layer to replace; choose another --arch')
    return names[-1]


@contextlib.contextmanager
def without_head(model):
    """The model with its head swapped for Identity: its output is then the features the head reads."""
    name = head_name(model)
    head = model.get_submodule(name)
    model.set_submodule(name, nn.Identity())
    try:
        yield model
    finally:
        model.set_submodule(name, head)


class WeightsMismatch(Exception):
    def __init__(self, arch, missing, unexpected):
        self.arch, self.missing, self.unexpected = arch, missing, unexpected
        parts = []
        if missing:
            parts.append(f'{len(missing)} tensors missing (e.g. {missing[0]})')
        if unexpected:
            parts.append(f'{len(unexpected)} unexpected (e.g. {unexpected[0]})')
        super().__init__(f'do not fit {arch}: ' + ', '.join(parts))


def load_state(model, state):
    """load_state_dict with assign (no copy: the tensors may be memory-mapped from the file), turning
    shape mismatches into a WeightsMismatch that names the tensor."""
    own = model.state_dict()
    bad = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if bad:
        k = bad[0]
        raise WeightsMismatch(f'{type(model).__name__} ({k} is {tuple(state[k].shape)} in the file, '
                              f'{tuple(own[k].shape)} in the model)', [], [])
    result = model.load_state_dict(state, strict=False, assign=True)
    return result.missing_keys, result.unexpected_keys


COMMON_ARCHS = ('resnet101', 'resnet50', 'resnet18', 'resnet34', 'resnet152', 'mobilenet_v2', 'mobilenet_v3_large',
                'mobilenet_v3_small', 'efficientnet_b0', 'densenet121', 'vgg16', 'convnext_tiny', 'vit_b_16',
                'wide_resnet50_2', 'resnext50_32x4d')


def guess_arch(state, prefer=None):
    """The torchvision architecture whose tensor names and shapes (classifier aside) match a state_dict."""
    for arch in dict.fromkeys([a for a in (prefer,) if a] + list(COMMON_ARCHS)):
        model = construct(arch, meta=True)
        own, head = model.state_dict(), head_name(model)
        body = {k for k in own if not k.startswith(head + '.')}
        if body == {k for k in state if not k.startswith(head + '.')} and \
                all(tuple(own[k].shape) == tuple(state[k].shape) for k in body):
            return arch
    return None


def backbone_stages(model):
    """The backbone's stages in order, the last ones being the first to unfreeze."""
    if all(hasattr(model, f'layer{i}') for i in range(1, 5)):
        return [getattr(model, f'layer{i}') for i in range(1, 5)]  # ResNet, ResNeXt, Wide ResNet
    features = getattr(model, 'features', None)
    if isinstance(features, nn.Sequential):
        return list(features)  # MobileNet, EfficientNet, VGG, DenseNet, ConvNeXt
    raise UserError(f'--unfreeze supports ResNets and models with a `features` stack (MobileNet, EfficientNet, '
                    f'ConvNeXt, VGG, DenseNet); not {type(model).__name__}')


def freeze(model, unfreeze=0):
    """Freeze everything but the head and the last `unfreeze` stages, and return the trainable modules.
    The model stays in eval mode throughout training: BatchNorm uses and keeps its ImageNet statistics."""
    model.requires_grad_(False)
    head = model.get_submodule(head_name(model))
    stages = backbone_stages(model)[-unfreeze:] if unfreeze else []
    for m in [head] + stages:
        m.requires_grad_(True)
    model.eval()
    return head, stages


def trainable_state(model):
    """Copies (never references) of the tensors that training changes."""
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


@dataclasses.dataclass
class WeightsSpec:
    kind: str          # 'file', 'torchvision' or 'none'
    name: str          # file path, weights enum name (e.g. ResNet101_Weights.IMAGENET1K_V2), or 'none'
    ident: str         # what identifies the numbers: sha256 of the file, the torchvision file name, or the seed
    url: str = ''


def resolve_weights(cfg, memo=None):
    """What --weights means for --arch, without loading anything yet ('auto' was resolved when parsing)."""
    arch, weights = cfg.arch, cfg.weights
    if weights.lower() == 'none':
        return WeightsSpec('none', 'none', f'random-init:{arch}:seed{cfg.seed}:torch{str(torch.__version__)}')
    if os.path.sep in weights or os.path.exists(weights) or weights.endswith(('.pth', '.pt', '.pkl', '.bin')):
        if not os.path.isfile(weights):
            raise UserError(f'weights file {weights} does not exist; pass an existing file, a torchvision weights '
                            'name (DEFAULT, IMAGENET1K_V1, ...) or --weights none')
        return WeightsSpec('file', weights, sha256_file(weights, memo))
    try:
        enum = torchvision.models.get_model_weights(arch)
        w = enum[weights] if weights in enum.__members__ else enum.verify(weights)
    except (KeyError, ValueError, TypeError):
        names = ', '.join(torchvision.models.get_model_weights(arch).__members__)
        raise UserError(f'--weights {weights}: not a file, and not a weights name of {arch} ({names}, none)')
    return WeightsSpec('torchvision', f'{type(w).__name__}.{w.name}', os.path.basename(w.url), w.url)


def load_weights(arch, spec):
    """The state_dict that --weights names (None for random init), loaded without executing code."""
    if spec.kind == 'none':
        return None
    if spec.kind == 'file':
        state = safe_torch_load(spec.name, what='weights file')
        if isinstance(state, dict) and state.get('format') == CHECKPOINT_FORMAT:
            state = state['model']  # start from one of our checkpoints
        elif isinstance(state, dict) and isinstance(state.get('state_dict'), dict):
            state = state['state_dict']
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise UserError(f'{spec.name} is not a state_dict (name -> tensor) of {arch}; '
                            'pass the .pth file torchvision publishes for it')
        return {k.removeprefix('module.'): v for k, v in state.items()}  # DistributedDataParallel prefix
    file = os.path.join(torch.hub.get_dir(), 'checkpoints', spec.ident)
    try:
        return torch.hub.load_state_dict_from_url(spec.url, progress=sys.stderr.isatty(), check_hash=True,
                                                  weights_only=True, map_location='cpu')
    except Exception as e:
        reason = getattr(e, 'reason', None) or first_line(e)
        raise UserError(f'cannot load {spec.name}: {file} is not there and downloading {spec.url} failed '
                        f'({reason}). Put the file there (or set MODEL_PATH / --weights to a copy of it), '
                        'or pass --weights none for random weights') from e
