"""ONNX: the model as one file for runtimes outside PyTorch, and scoring such a file with onnxruntime."""

import argparse
import contextlib
import copy
import io
import json
import os
import tempfile

import torch
import torch.nn as nn
import torchvision

from .checkpoint import Loaded
from .data import Photo
from .devices import int8_engine
from .files import sha256_file
from .images import normalize
from .inference import classifier, score_photos
from .model import head_name
from .ood import distances
from .system import NOT_A_DIAGNOSIS, UserError, first_line, world


ONNX_FORMAT = 'monkeypox.py onnx 1'


def onnx_modules():
    """onnx and onnxruntime, imported only on the paths that need them (train does not pay for them)."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise UserError(f'ONNX export and scoring need onnx, onnxruntime and onnxscript ({e.name} is missing): '
                        'pip install -r requirements.txt') from e
    onnxruntime.set_default_logger_severity(3)
    return onnx, onnxruntime


OOD_PARITY = 1e-2  # runtimes' out-of-distribution scores agree within this (a distance: sqrt(2 - 2 cos) near 0
# magnifies a float's rounding; the threshold on MSLD is near 0.8)


class Exported(nn.Module):
    """What the ONNX file computes from normalised images: the class probabilities and, for a model with an
    out-of-distribution detector, each photo's score (its features' distance to the training photos')."""

    def __init__(self, model, ood):
        super().__init__()
        name = head_name(model)
        self.head, self.backbone = model.get_submodule(name), copy.deepcopy(model)
        self.backbone.set_submodule(name, nn.Identity())
        self.k = ood['k'] if ood else None
        self.register_buffer('bank', ood['bank'].float() if ood else torch.zeros(0))

    def forward(self, x):
        features = self.backbone(x)
        probabilities = self.head(features).softmax(1)
        if self.k is None:
            return probabilities
        return probabilities, distances(features, self.bank, self.k)


def onnx_graph(loaded, opset, onnx):
    """torch.onnx.export of the model and a softmax on normalised fp32 images, and the out-of-distribution
    score as a second output when the model has a detector, batch size free, weights inside the one file
    (this torch writes them beside it by default: a single file is what atomic writing, the checksum and the
    truncation checks need)."""
    net = Exported(loaded.model.float(), loaded.ood).eval()
    outputs = ['probabilities'] + (['ood_score'] if loaded.ood else [])
    size = loaded.pre['image_size']
    with tempfile.TemporaryDirectory() as tmp:
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):  # the exporter's chatter
            torch.onnx.export(net, (torch.zeros(2, 3, size, size),), os.path.join(tmp, 'model.onnx'),
                              input_names=['image'], output_names=outputs, opset_version=opset,
                              dynamic_shapes=({0: torch.export.Dim('batch', min=1, max=4096)},), external_data=False)
        return onnx.load(os.path.join(tmp, 'model.onnx'))


def onnx_metadata(loaded, checkpoint):
    """What the file says of itself (metadata_props): enough to reproduce its probabilities anywhere."""
    pre = loaded.pre
    return {'monkeypox.format': ONNX_FORMAT, 'classes': json.dumps(loaded.classes),
            'positive_class': loaded.classes[loaded.positive] if loaded.positive is not None else '',
            'threshold': repr(float(loaded.threshold)), 'arch': loaded.ckpt['arch'],
            'preprocess': json.dumps({
                **pre, 'input': 'image: float32 [batch, 3, image_size, image_size], RGB, (pixel / 255 - mean) / std',
                'output': 'probabilities: [batch, classes], in the order of classes; ood_score (with a detector): '
                          '[batch], the distance of the L2-normalised features to the nearest training photo\'s; '
                          'above ood_threshold, a photo is unlike the training photos',
                'decode': 'JPEG decoded by Pillow in draft mode at the smallest 1/2, 1/4 or 1/8 scale keeping both '
                          'sides >= resize (Image.draft("RGB", (resize, resize))); EXIF rotation applied; RGB',
                'resize_how': 'shorter side to resize, bilinear with antialiasing (torchvision Resize on a PIL image)',
                'crop': 'centre crop of image_size x image_size'}),
            'checkpoint_sha256': sha256_file(checkpoint), 'torch': str(torch.__version__),
            'torchvision': torchvision.__version__, 'temperature': repr((loaded.ckpt.get('head') or {}).get(
                'temperature', 1.0)), 'head_trained_on': f'{loaded.ckpt.get("precision") or "fp32"} features',
            'not_a_diagnosis': NOT_A_DIAGNOSIS,
            **({'ood_threshold': repr(float(loaded.ood['threshold'])), 'ood_coverage': repr(loaded.ood['coverage']),
                'ood_k': repr(loaded.ood['k'])}
               if loaded.ood else {}),
            **({'trained_prevalence': repr(loaded.ckpt['trained_prevalence'])}
               if loaded.ckpt.get('trained_prevalence') is not None else {})}


def onnx_parity(loaded, session, cfg):
    """The largest difference between onnxruntime's and PyTorch's fp32 probabilities, and on what: the --check
    photos, else the checkpoint's validation photos still on disk, else synthetic crops. For a checkpoint
    trained on bf16 or int8 features, also the largest difference from the probabilities predict computes
    (else None); with a detector, the largest difference of the out-of-distribution score (else None)."""
    split = loaded.ckpt.get('split') or {}
    paths = cfg.check or [p for p in (os.path.join(split.get('root', ''), r) for r in split.get('val', [])[:16])
                          if os.path.isfile(p)]
    cpu, own = torch.device('cpu'), loaded.ckpt.get('precision')
    ort = onnx_classifier(session, loaded.pre)
    torch_runs = [classifier(loaded.model, cpu, 'fp32', loaded.pre, ood=loaded.ood)]
    if own == 'bf16' or (own == 'int8' and loaded.qparams and int8_engine()):
        torch_runs.append(classifier(loaded.model, cpu, own, loaded.pre, qparams=loaded.qparams, ood=loaded.ood))

    classes = len(loaded.classes)

    def gap(x):  # the runtimes on the same crops, decoded once: probabilities, then the out-of-distribution score
        theirs, ours = ort(x), [fn(x) for fn in torch_runs]
        gaps = [(mine[:, :classes] - theirs[:, :classes]).abs().amax(1) for mine in ours]
        scores = [(ours[0][:, classes] - theirs[:, classes]).abs()] if loaded.ood else []
        return torch.stack(gaps + scores, 1)
    if paths:
        single = argparse.Namespace(**{**vars(cfg), 'workers': 0, 'device': 'cpu'})
        rows, failed = score_photos(gap, [Photo(p, -1, '') for p in paths], single, cpu, loaded.pre, 'check')
        if failed:
            raise UserError(f'--check: {failed[0][1]}')
        worst, what = torch.tensor(list(rows.values())).amax(0).tolist(), f'{len(rows)} photos'
    else:
        size = loaded.pre['image_size']
        x = torch.randint(0, 256, (8, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            worst, what = gap(x).amax(0).tolist(), '8 synthetic crops'
    own = worst[1] if len(torch_runs) > 1 else None
    return worst[0], what, own, worst[-1] if loaded.ood else None


def onnx_classifier(session, pre):
    """A batch of uint8 crops -> probabilities (then the out-of-distribution score, when the file has one), by
    onnxruntime: the loop's model, from another runtime."""
    def fn(x):
        outputs = session.run(None, {'image': normalize(x, pre).contiguous().numpy()})
        return torch.cat([torch.from_numpy(outputs[0])] + [torch.from_numpy(o).reshape(-1, 1) for o in outputs[1:]], 1)
    return fn


def load_onnx(path, cfg):
    """An ONNX file that `export` wrote, for predict and evaluate: an onnxruntime session on the CPU, with the
    classes, threshold and preprocessing its metadata carries."""
    if getattr(cfg, 'explain', False):
        raise UserError('--explain draws Grad-CAM, which needs the PyTorch checkpoint: pass it as --checkpoint')
    refused = [f'--precision {cfg.precision}'] if cfg.precision in ('bf16', 'int8') else []
    refused += [f'--device {cfg.device}'] if cfg.device not in ('auto', 'cpu') else []
    refused += ['torchrun'] if world() > 1 else []
    if refused:
        raise UserError(f'{path}: an ONNX file runs in fp32 on the CPU, in one process; drop {" and ".join(refused)}, '
                        'or score the PyTorch checkpoint')
    onnx, ort = onnx_modules()
    if not os.path.isfile(path):
        raise UserError(f'ONNX file {path} does not exist; write one with `python monkeypox.py export`')
    try:
        model = onnx.load(path)
        onnx.checker.check_model(model)
    except Exception as e:
        first = first_line(e)[:150]
        raise UserError(f'{path} is not a readable ONNX file ({first}): truncated or not ONNX; export it again') from e
    meta = {p.key: p.value for p in model.metadata_props}
    if meta.get('monkeypox.format') != ONNX_FORMAT:
        raise UserError(f'{path} is an ONNX model without this tool\'s metadata (classes, threshold, preprocessing); '
                        'export the checkpoint with `python monkeypox.py export`')
    classes, pre = json.loads(meta['classes']), json.loads(meta['preprocess'])
    session = ort.InferenceSession(model.SerializeToString(), providers=['CPUExecutionProvider'])
    ood = {'threshold': float(meta['ood_threshold']), 'coverage': float(meta['ood_coverage'])} \
        if 'ood_threshold' in meta else None
    prevalence = float(meta['trained_prevalence']) if 'trained_prevalence' in meta else None
    return Loaded(None, {'arch': meta['arch'], 'epoch': None, 'precision': 'fp32', 'ood': ood,
                         'trained_prevalence': prevalence}, classes,
                  classes.index(meta['positive_class']) if meta['positive_class'] in classes else None,
                  {k: pre[k] for k in ('image_size', 'resize', 'mean', 'std')}, float(meta['threshold']), session)
