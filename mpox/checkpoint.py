"""Checkpoints: what `train` writes and evaluate and predict read (nothing in them is ever run)."""

import dataclasses
import hashlib
import json
import os
import pickle
import sys

import torch
import torch.nn as nn
import torchvision

from .data import dataset_license, positive_index
from .files import atomic_write, safe_torch_load, write_csv
from .images import preprocessing
from .model import CHECKPOINT_FORMAT, WeightsMismatch, build_model, construct, guess_arch, head_name
from .system import UserError, first_line, say, warn


CHECKPOINT_VERSION = 1


CLASS_MAP_NAME = 'class_dict.pk'


RESUME_NAME = 'resume.pt'


def checkpoint_meta(cfg, prep):
    """Everything a checkpoint says besides its weights and epoch: enough to use it with nothing else."""
    split, positive = prep.split, prep.positive
    return {'format': CHECKPOINT_FORMAT, 'version': CHECKPOINT_VERSION, 'arch': cfg.arch,
            'classes': split.classes, 'positive_class': split.classes[positive] if positive is not None else None,
            'preprocess': preprocessing(cfg), 'weights': {'source': prep.spec.name, 'kind': prep.spec.kind,
                                                          'id': prep.spec.ident},
            'config': dict(vars(cfg)), 'precision': prep.extractor.precision, 'int8': prep.extractor.int8_calibration(),
            'fidelity': prep.fidelity, 'ood': prep.ood, 'trained_prevalence': trained_prevalence(split, positive),
            'copies': training_signatures(prep),
            'split': {'root': os.path.abspath(split.root), 'how': split.how, 'seed': cfg.seed, 'grouping': split.grouping,
                      'val_fraction': cfg.val_fraction, 'skipped': split.skipped, 'license': dataset_license(split.root),
                      **{part: [os.path.relpath(p.path, split.root) for p in getattr(split, part)]
                         for part in ('train', 'val')}},
            'versions': {'torch': str(torch.__version__), 'torchvision': torchvision.__version__,
                         'python': sys.version.split()[0]},
            'fingerprint': fingerprint(cfg, split, prep.spec)}


def training_signatures(prep):
    """The training photos' near-duplicate signatures, by path relative to the data folder, for evaluate to
    find copies of them: keypoints and descriptors, no pixels (about 10 KB a photo); None when the search
    was off."""
    if prep.copies is None:
        return None
    return [{'path': os.path.relpath(p.path, prep.split.root), **prep.copies[p.path].stored(pixels=False)}
            for p in prep.split.train if prep.copies[p.path] is not None]


def fingerprint(cfg, split, spec):
    """What a resumed run must share with the interrupted one: every setting but those that say only how a
    run goes (cfg.run_only: the flags marked so where the parser defines them), the photos and the weights."""
    keep = {k: v for k, v in vars(cfg).items() if k not in set(getattr(cfg, 'run_only', ()))}
    ids = [[p.sha for p in split.train], [p.sha for p in split.val], spec.ident]
    return hashlib.sha256(json.dumps([keep, ids], sort_keys=True, default=str).encode()).hexdigest()


def read_resume(cfg, meta):
    path = os.path.join(cfg.out, RESUME_NAME)
    resume = safe_torch_load(path, what='resume file') if os.path.exists(path) else None
    if resume is None:
        raise UserError(f'--resume: {path} does not exist (the run finished, or never started); drop --resume')
    if resume.get('format') != 'monkeypox.py resume' or resume.get('fingerprint') != meta['fingerprint']:
        raise UserError(f'--resume: {path} belongs to a run with other data or settings; use the same flags, '
                        'or drop --resume to start over')
    say(f'resuming from {resume["stage"]} epoch {resume["epoch"]}')
    return resume


def trained_prevalence(split, positive):
    """The share of the screened class among the training photos: the prevalence the head's probabilities
    are calibrated at (None without a screened class)."""
    if positive is None or not split.train:
        return None
    return sum(p.label == positive for p in split.train) / len(split.train)


@dataclasses.dataclass
class Loaded:
    model: nn.Module    # the PyTorch model (None for an exported ONNX file)
    ckpt: dict
    classes: list
    positive: int       # index of the screened class, or None
    pre: dict           # the preprocessing the model was trained with
    threshold: float    # the operating threshold it was trained for
    session: object = None  # an onnxruntime session, for an exported file
    scoring: str = None     # the precision predict and evaluate compute in, decided once (scoring_precision)

    @property
    def qparams(self):
        """The int8 activation ranges the checkpoint carries, or None."""
        return (self.ckpt.get('int8') or {}).get('qparams')

    @property
    def ood(self):
        """The out-of-distribution detector the checkpoint carries (its threshold; for a checkpoint, the
        training photos' features), or None for a model made without one."""
        return self.ckpt.get('ood')


def load_checkpoint(path, cfg):
    """A checkpoint written by `train`: its model rebuilt from the file alone."""
    ckpt = safe_torch_load(path)
    if isinstance(ckpt, dict) and ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        ckpt = bare_state_dict_checkpoint(ckpt, path, cfg)
    if not isinstance(ckpt, dict) or ckpt.get('format') != CHECKPOINT_FORMAT:
        raise UserError(f'{path} is not a monkeypox.py checkpoint (no "format" entry); '
                        'pass the file `train` wrote (chk/monkeypox_model.pkl)')
    missing = [k for k in ('model', 'arch', 'classes', 'preprocess') if k not in ckpt]
    if missing:
        raise UserError(f'{path} is an incomplete checkpoint (missing {", ".join(missing)}); retrain')
    classes = list(ckpt['classes'])
    try:
        model = build_model(ckpt['arch'], len(classes), ckpt['model'], load_head=True)
    except WeightsMismatch as e:
        raise UserError(f'{path}: its weights {e}; the file is damaged, or its {len(classes)} class names '
                        'do not match its head') from e
    except Exception as e:
        raise UserError(f'{path}: cannot rebuild {ckpt["arch"]} ({first_line(e)}); this torchvision may lack it') from e
    model.requires_grad_(False)  # for scoring: nothing in it trains (Grad-CAM's gradients start at a stage)
    pc = ckpt.get('positive_class')
    return Loaded(model, ckpt, classes, classes.index(pc) if pc in classes else None, preprocessing(cfg, ckpt),
                  ckpt.get('threshold', cfg.threshold))


def bare_state_dict_checkpoint(state, path, cfg):
    """A bare state_dict (torch.save(model.state_dict())) is usable when the class names can be had
    from class_dict.pk beside it and the architecture from the tensors; else say how to make it so."""
    state = {k.removeprefix('module.'): v for k, v in state.items()}
    class_map = os.path.join(os.path.dirname(os.path.abspath(path)), CLASS_MAP_NAME)
    arch = guess_arch(state, cfg.arch)
    if arch is None:
        raise UserError(f'{path} is a bare state_dict ({len(state)} tensors) of no architecture this tool knows; '
                        'retrain with `python monkeypox.py train`')
    if not os.path.exists(class_map):
        raise UserError(f'{path} is a bare {arch} state_dict without class names; put its {CLASS_MAP_NAME} '
                        '(a pickled {index: name} dict) beside it, or retrain with `python monkeypox.py train`')
    names = read_class_map(class_map)
    classes = [names[i] for i in range(len(names))]
    outputs = state[f'{head_name(construct(arch, meta=True))}.weight'].shape[0]
    if outputs != len(classes):
        raise UserError(f'{path}: its head has {outputs} outputs but {class_map} names {len(classes)} classes; '
                        'use the class map written with these weights')
    warn(f'{path} is a bare state_dict: using {arch} (from its tensors), classes {classes} from {class_map}, '
         f'the preprocessing of the settings and threshold {cfg.threshold}')
    positive = positive_index(classes, 'auto')
    return {'format': CHECKPOINT_FORMAT, 'version': CHECKPOINT_VERSION, 'model': state, 'arch': arch,
            'classes': classes, 'positive_class': classes[positive] if positive is not None else None,
            'preprocess': preprocessing(cfg), 'threshold': cfg.threshold}


def write_class_map(classes, path):
    """class_dict.pk: {index: name}, pickled: the class map a bare state_dict needs beside it."""
    atomic_write(path, lambda f: pickle.dump({i: c for i, c in enumerate(classes)}, f, protocol=4))


class PlainDataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):  # dicts, ints and strings need no class: anything else is refused
        raise pickle.UnpicklingError(f'refused {module}.{name}')


def read_class_map(path):
    """class_dict.pk back as {index: name}, through an unpickler that can build nothing but plain data."""
    try:
        with open(path, 'rb') as f:
            classes = PlainDataUnpickler(f).load()
    except FileNotFoundError:
        raise UserError(f'class map {path} does not exist')
    except Exception as e:
        raise UserError(f'class map {path} refused: it must be a pickled {{index: name}} dict of ints and '
                        f'strings only ({first_line(e)}); nothing in it was run') from e
    if not (isinstance(classes, dict) and classes and all(isinstance(k, int) for k in classes)
            and all(isinstance(v, str) for v in classes.values()) and sorted(classes) == list(range(len(classes)))):
        raise UserError(f'class map {path} is not an {{index: name}} dict with indices 0..n-1')
    return classes


def write_summary(history, path):
    header = list(history[0]) if history else ['epoch']
    write_csv(path, header, [[h[k] for k in header] for h in history])
