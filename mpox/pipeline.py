"""The steps the commands share: preparing the photos and their features (train, cv), the report (evaluate,
cv), loading a model to score with (evaluate, predict)."""

import dataclasses
import json
import os
import time

import torch

from .checkpoint import load_checkpoint
from .data import DATASET_URL, Split, drop_unreadable, positive_index, print_split, read_dataset, split_photos
from .devices import resolve_device
from .download import DATASET_CITATION, download_dataset
from .features import Extractor, Features
from .fidelity import check_fidelity, precisions_to_try, remember_unfaithful
from .files import load_memo, save_memo
from .images import EVAL_VIEW, report_skipped
from .inference import classifier, score_photos
from .metrics import json_ready
from .model import WeightsSpec, resolve_weights
from .onnxfile import load_onnx, onnx_classifier
from .plots import plot_calibration, plot_confusion, plot_roc
from .precision import scoring_precision
from .system import NOT_A_DIAGNOSIS, UserError, gather, is_main, say


@dataclasses.dataclass
class Prepared:
    split: 'Split'           # the photos: training and validation (cv: every photo in both)
    what: str                # a sentence naming them
    spec: 'WeightsSpec'      # the backbone's weights
    positive: int            # index of the screened class (None: none)
    extractor: 'Extractor'   # the frozen backbone and its feature cache
    train_features: 'Features'  # the stored random views of the training photos
    val_features: 'Features'    # the evaluation view of the validation photos
    fidelity: list           # each faster arithmetic tried, checked against fp32 (check_fidelity), in order


def prepare(cfg, every_photo=False):
    """What train and cv start from: the photos (cv: every photo, its folds drawn later), the weights,
    the screened class, and the backbone's features of every photo, from the cache where it has them, in
    the fastest arithmetic that reproduces fp32 for this network and head (settle_precision)."""
    download_if_missing(cfg)
    memo = load_memo(cfg.cache)
    classes, parts = read_dataset(cfg.data, memo)
    split, what = split_photos(cfg.data, classes, parts, cfg), cfg.data
    if every_photo:
        split.train = split.val = parts.get('all') or split.train + split.val
        what = cfg.data if 'all' in parts else f'{cfg.data}/train + val (test/ left untouched)'
    spec = resolve_weights(cfg, memo)
    if is_main():
        save_memo(cfg.cache, memo)
    positive = positive_index(split.classes, cfg.positive_class)
    device = resolve_device(cfg.device)
    if not every_photo:
        print_split(split, f', seed {cfg.seed}, {cfg.val_fraction:.0%} held out' if split.how == 'grouped' else '')
        say(f'model: {cfg.arch}, weights {spec.name}, {device.type}, frozen backbone' +
            (f', then its last {cfg.unfreeze} stages fine-tuned' if cfg.unfreeze else ''))
    crops = len(split.train) * cfg.views + len(split.val)  # this run's, whatever the cache holds
    checks = []
    for precision in precisions_to_try(cfg, spec, device, crops):
        extractor = Extractor(cfg, split.classes, spec, precision=precision, calibration=split.train)
        train_f, val_f = extract_features(cfg, extractor, split, every_photo, what)
        if precision == 'fp32':
            break
        checks.append(check_fidelity(cfg, extractor, train_f, positive))
        if checks[-1]['faithful'] or cfg.precision != 'auto':
            break
        remember_unfaithful(cfg, extractor, checks[-1])
    return Prepared(split, what, spec, positive, extractor, train_f, val_f, checks)


def extract_features(cfg, extractor, split, every_photo, what):
    """The stored random views of the training photos and the evaluation view of the validation photos (cv:
    of every photo), from the cache where it has them; unreadable photos are reported and dropped."""
    t0 = time.time()
    train_f, bad = extractor.features(split.train, [f'train{k}' for k in range(cfg.views)])
    val_f, bad_val = extractor.features(train_f.photos if every_photo else split.val, [EVAL_VIEW])
    if bad + bad_val:
        report_skipped(bad + bad_val, listed_in='' if every_photo else 'the checkpoint (split.skipped)')
        drop_unreadable(split, bad + bad_val)
    ex = extractor
    if ex.crops:
        done = (f'{ex.crops} crops computed at {ex.crops / ex.seconds:.1f} crops/s (backbone '
                f'{ex.backbone_seconds / ex.crops * 1e3:.1f} ms a crop, all else '
                f'{(ex.seconds - ex.backbone_seconds) / ex.crops * 1e3:.1f}; model ready in {ex.setup_seconds:.1f}s)')
    else:
        done = 'all from cache'
    if every_photo:
        say(f'cv: {what}, {len(train_f.photos)} photos, {cfg.folds} folds by patient (seed {cfg.seed}); '
            f'{cfg.arch}, weights {extractor.spec.name}, {ex.precision} features in {time.time() - t0:.1f}s')
    else:
        cache = f' (cache {extractor.cache.dir})' if extractor.cache.dir else ''
        say(f'features: {len(split.train)}x{cfg.views} training views + {len(split.val)} validation photos in '
            f'{ex.precision}, {done}, {time.time() - t0:.1f}s{cache}')
    return train_f, val_f


def download_if_missing(cfg):
    """The default run, train and cv fetch the public photos into IMAGE_PATH first when it is missing or empty,
    as torchvision's datasets do with download=True; never into another folder, which a user named for
    their own photos. Under torchrun rank 0 downloads while the others wait."""
    if not cfg.download_missing or (os.path.isdir(cfg.data) and any(os.scandir(cfg.data))):
        return
    failure = None
    if is_main():
        say(f'{cfg.data} is missing or empty, so the public Monkeypox Skin Lesion Dataset (MSLD, 228 photos) is '
            f'downloaded into it first. License: CC BY-NC 4.0, non-commercial use only, with attribution. '
            f'Cite: {DATASET_CITATION}. ({DATASET_URL}; --no-download turns this off)')
        try:
            download_dataset(cfg.data, cfg.archive_url, cfg, force=False,
                             fix='pass --archive-url PATH (or `download --url PATH`) with a copy of the archive, or '
                                 '--data DIR with photos of your own')
        except UserError as e:
            failure = str(e)
    failure = gather(failure)[0]
    if failure:
        raise UserError(failure)


def report(cfg, result, m, labels, probs, out, title, print_text):
    """The end of evaluate and cv: the result printed (or as one JSON object), then confusion.png and
    roc.png of the metrics `m` on photos with true `labels` and probabilities `probs`, in `out`."""
    if cfg.json:
        if is_main():
            print(json.dumps(json_ready(result)))
    else:
        print_text(result)
        say(NOT_A_DIAGNOSIS)
    if cfg.no_plot or not is_main():
        return
    classes, positive = m['classes'], m['classes'].index(m['positive_class']) if m['positive_class'] else None
    say(f'plot: {plot_confusion(m["confusion_matrix"], classes, os.path.join(out, "confusion.png"), title)}')
    if positive is not None:
        path = plot_roc([y == positive for y in labels], [q[positive] for q in probs], os.path.join(out, 'roc.png'),
                        title, classes[positive], m if m['threshold'] is not None else None)
        say(f'plot: {path}')
        say(f'plot: {plot_calibration(m, os.path.join(out, "calibration.png"), title)}')


def checkpoint_probabilities(loaded, photos, cfg, desc):
    """Class probabilities of the photos by a loaded checkpoint, computed as its training computed them, or
    by an exported ONNX file, run by onnxruntime on the CPU: the same loop, another model."""
    if loaded.session is not None:
        return score_photos(onnx_classifier(loaded.session, loaded.pre), photos, cfg, torch.device('cpu'), loaded.pre,
                            desc)
    device = resolve_device(cfg.device)
    fn = classifier(loaded.model, device, scoring_precision(cfg, loaded, device), loaded.pre, qparams=loaded.qparams)
    return score_photos(fn, photos, cfg, device, loaded.pre, desc)


def load_model(path, cfg):
    """What predict and evaluate score with: a checkpoint, or an ONNX file that `export` wrote."""
    return load_onnx(path, cfg) if str(path).lower().endswith('.onnx') else load_checkpoint(path, cfg)
