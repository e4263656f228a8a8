#!/usr/bin/env python3
"""monkeypox.py: tell monkeypox (mpox) skin lesions from other rashes in photos.

Transfer learning from an ImageNet-pretrained torchvision backbone: the backbone stays frozen, each
photo goes through it once (features are cached on disk), and a new linear head is trained on the
stored features. A research and teaching tool for datasets of photos: it is not a diagnosis.

    python monkeypox.py                     # train on ./monkeypoxdata, then predict TEST_IMAGE
    python monkeypox.py train --help        # every setting below is also a flag
    python monkeypox.py evaluate            # metrics on photos the model never saw
    python monkeypox.py predict photo.jpg   # one line per photo, and a plot
    python monkeypox.py export              # the model as one ONNX file, for runtimes outside PyTorch

Reading map: each command, and the functions it runs (defined below in this order).

    (no command)  run_default: train, then predict TEST_IMAGE and show it
    train         prepare (read_dataset, split_photos, resolve_weights, Extractor.features -> run_batches;
                  in int8, inference_model -> quantize_int8, calibrated on training photos first)
                  -> Run -> fit (fit_head, then finetune with --unfreeze) -> Run.finish (checkpoint files)
    cv            prepare -> per fold: Run -> fit -> score on the unseen fold -> report
    evaluate      load_model -> evaluation_photos -> score_photos (run_batches) -> metrics -> report
    predict       collect_images -> load_model -> score_photos (run_batches) -> plot_predictions
    download      fetch -> extract_rar -> layout_dataset
    export        load_checkpoint -> onnx_graph -> onnx_metadata -> onnx_parity -> atomic_write
                  (load_model is load_checkpoint, or load_onnx for a .onnx file: onnx_classifier scores)

Sections: Settings, Commands, Data, Model, Inference, Features, Training, Metrics and reports,
Checkpoints, ONNX, Plots, Download, Files and processes, CLI and main.
"""
# ================================================================================================
# Settings: edit them here, or override any of them with the flag named in its comment (those marked
# --set have no flag: --set NAME=VALUE). They are the defaults; after parsing, the code reads `cfg`.

# Paths
IMAGE_PATH = './monkeypoxdata'               # --data: class folders (Monkey Pox/, Others/), or train/ + val/ [+ test/]
MODEL_PATH = './chk/resnet101-cd907fc2.pth'  # --set: ImageNet weights file for ARCH; used when present (see WEIGHTS)
SAVE_PATH = './chk/monkeypox_model.pkl'      # --checkpoint: best model; `train --out DIR` writes DIR/monkeypox_model.pkl
TEST_IMAGE = './monkeypoxdata/test/test.jpg'  # --test-image: predicted and shown at the end of the default run
CACHE_DIR = ''              # --cache: feature cache folder ('' = OUT/cache); --no-cache keeps features in memory only
AUTO_DOWNLOAD = True        # --no-download: when IMAGE_PATH is missing or empty, train/cv fetch the public MSLD photos there
ARCHIVE_URL = ('https://github.com/ShamsNafisaAli/Monkeypox-Skin-Lesion-Dataset/raw/365f48b825a1f906f1e477453e7a0d1'
               '53bf99b74/Original%20Images.rar')  # --archive-url: the MSLD authors' archive; offline, a local copy

# The model and its head
ARCH = 'resnet101'          # --arch: any torchvision classification model (resnet18, resnet50, mobilenet_v2, ...)
WEIGHTS = 'auto'            # --weights: 'auto' (MODEL_PATH if present, else DEFAULT), a torchvision name, a file, or 'none'
VIEWS = 2                   # --views: random training crops (RandomResizedCrop + flip) stored per photo; all train the head
CROP_SCALE = 0.08           # --crop-scale: smallest share of a photo's area a RandomResizedCrop keeps
WEIGHT_DECAY = 'auto'       # --weight-decay: L2 penalty of the head on standardised features; 'auto': chosen by inner cv
SEED = 0                    # --seed: validation split, fine-tuning's shuffling, random weights of --weights none
VAL_FRACTION = 0.2          # --val-fraction: share of a flat dataset held out for the report, whole patients at a time

# Fine-tuning (the frozen head is fit to convergence; these shape the stages that --unfreeze trains)
UNFREEZE = 0                # --unfreeze: last backbone stages fine-tuned after the head (0 = frozen backbone)
EPOCHS = 15                 # --epochs: epochs of fine-tuning
LR = 0.001                  # --lr: Adam learning rate of the head while fine-tuning
BATCH_SIZE = 32             # --batch-size: photos per fine-tuning step
BACKBONE_LR = 0.0001        # --backbone-lr: Adam learning rate of the unfrozen stages

# Evaluation
POSITIVE_CLASS = 'auto'     # --positive-class: class screened for ('auto': the one named like mpox / monkey pox)
THRESHOLD = 0.5             # --threshold: a photo is called positive when P(positive class) >= this
TARGET_SENSITIVITY = 0.0    # --target-sensitivity: if > 0, pick the highest threshold reaching it on validation
FOLDS = 5                   # --folds: folds of `cv`, whole patients at a time
TEST_FRACTION = 0.2         # --set: `download` holds this share of the photos out in test/ (and VAL_FRACTION in val/)

# System
DEVICE = 'auto'             # --device: cuda when present, else cpu
PRECISION = 'auto'          # --precision: auto = int8 (frozen CNN, x86 CPU, when it pays), else bf16 if fast, else fp32
CALIBRATION_PHOTOS = 16     # --set: int8: training photos (the first by sha256) whose crops set the activation ranges
WORKERS = -1                # --workers: image decoding processes beside the backbone pass (-1: auto, see decode_workers)
EXTRACT_BATCH_SIZE = 16     # --extract-batch-size: crops per backbone pass (16 was fastest for ResNet101 on 2 cores)
COMPILE = 'auto'            # --compile: torch.compile the backbone for extraction: auto (when it pays), always, never
DIST_TIMEOUT = 300          # --set: seconds a torchrun rank waits for the others before failing (a rank died)
CHECKPOINT_SECONDS = 5.0    # --set: a better epoch is written at once, but at most this often (head epochs take ms)

# Preprocessing (ImageNet's, which the pretrained backbones expect)
IMAGE_SIZE = 224            # --set: side of the square crop the backbone sees
RESIZE = 256                # --set: evaluation resizes the short side to this, then centre-crops IMAGE_SIZE
MEAN = (0.485, 0.456, 0.406)  # --set: per-channel mean of the normalisation
STD = (0.229, 0.224, 0.225)   # --set: per-channel standard deviation of the normalisation

SETTINGS = [name for name in globals() if name.isupper()]  # the names above, in order: each is an entry of cfg
# ================================================================================================

import argparse
import ast
import contextlib
import copy
import csv
import dataclasses
import datetime
import functools
import hashlib
import io
import json
import math
import os
import pickle
import platform
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from tqdm import tqdm

CHECKPOINT_FORMAT = 'monkeypox.py checkpoint'
CHECKPOINT_VERSION = 1
CLASS_MAP_NAME = 'class_dict.pk'
RESUME_NAME = 'resume.pt'
EVAL_VIEW = 'eval'
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.jpe', '.jfif', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp',
                    '.ppm', '.pgm', '.heic', '.heif', '.avif')  # .heic and friends are reported, not silently ignored
DATASET_URL = 'https://github.com/ShamsNafisaAli/Monkeypox-Skin-Lesion-Dataset'
ARCHIVE_BYTES, ARCHIVE_MD5 = 1_476_879, '09bd765cb91e6658ff27f83fa869c65c'
DATASET_CITATION = ('Ali, S. N., Ahmed, M. T., Paul, J., Jahan, T., Sani, S. M. S., Noor, N., Hasan, T. (2022). '
                    'Monkeypox Skin Lesion Detection Using Deep Learning Models: A Feasibility Study. '
                    'arXiv:2207.03342')
NOT_A_DIAGNOSIS = 'Research tool, not a diagnosis: a photo classifier cannot replace a clinician or a PCR test.'
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated download is an error, never a half-grey photo


# ================================================================================================
# Commands: what `python monkeypox.py [command]` does, each as a short story

def run_default(cfg):
    """No command: the original script's flow. Train, then predict TEST_IMAGE and show it."""
    checkpoint, split = train(cfg)
    image = cfg.test_image
    if not os.path.isfile(image):
        if not split.val:
            say(f'{image} does not exist and there are no validation photos to show instead')
            return
        image = split.val[0].path
        say(f'{cfg.test_image} does not exist: predicting the held-out validation photo {image} instead')
    predict(parse_args(['predict', image, '--checkpoint', checkpoint, '--device', cfg.device, '--precision',
                        cfg.precision, '--workers', str(cfg.workers)] + ['--no-plot'] * cfg.no_plot
                       + [f'--set={pair}' for pair in cfg.set]))


def train(cfg):
    """Every training photo goes through the frozen backbone once per stored view (cached on disk); the
    new head is trained on those features, then with --unfreeze the last stages too, on fresh crops.
    The best epoch on the validation photos is saved. Returns the checkpoint's path and the split."""
    prep = prepare(cfg)
    model = prep.extractor.model()  # built only now when every feature came from the cache
    freeze(model)
    model.cpu()
    run = Run(cfg, model, prep.train, prep.val, prep.split.classes, prep.positive,
              meta=checkpoint_meta(cfg, prep), checkpoint=cfg.checkpoint)
    run.cache_dir = prep.extractor.cache.dir
    if cfg.resume:
        run.restore(read_resume(cfg, run.meta))
    try:
        fit(run)
        run.finish()
    except KeyboardInterrupt:
        run.save_interrupted()
        raise
    best = run.best
    if not len(prep.val.y):
        warn('no validation photos: every photo trained the model and this run can claim no accuracy; claim it '
             'from `python monkeypox.py cv`')
    say(f'saved {run.checkpoint} ({best["stage"]}' + (f' epoch {best["epoch"]}' if best['stage'] != 'head' else '')
        + (f', val balanced accuracy {best["metrics"]["balanced_accuracy"]:.3f}' if len(prep.val.y) else '')
        + f', threshold {best["threshold"]:.2f})')
    if not cfg.no_plot and is_main():
        say(f'plot: {plot_curves(run.history, run.head, os.path.join(cfg.out, "curves.png"))}')
    return run.checkpoint, prep.split


def cv(cfg):
    """Grouped, stratified k-fold cross-validation, the accuracy to quote: each fold's model is trained
    exactly as `train` trains (an inner patient-grouped split picks its best epoch and threshold) and
    scored on its fold, whose patients it never saw. In int8, the patients whose photos calibrated the
    backbone train every fold and are never scored."""
    prep = prepare(cfg, every_photo=True)
    photos, classes, positive = prep.train.photos, prep.split.classes, prep.positive
    held = calibration_patients(photos, prep.extractor.calibration)  # int8: they calibrate and train, never scored
    scored = [i for i in range(len(photos)) if i not in held]
    folds = grouped_folds([photos[i] for i in scored], cfg.folds, cfg.seed)
    if held:
        say(f'int8: the {len(held)} photos of the patients whose photos calibrated the backbone train every fold '
            f'and are never scored: {len(scored)} photos are')
    if cfg.unfreeze:  # every fold fine-tunes its own copy of the pretrained model
        pretrained = {k: v.clone() for k, v in prep.extractor.model().cpu().state_dict().items()}
    results, labels, probs, preds, untempered, edges = [], [], [], [], [], []
    for k in range(cfg.folds):
        t0 = time.time()
        test = [scored[j] for j, f in enumerate(folds) if f == k]
        in_test = set(test)
        inner_train, inner_val = grouped_split([p for i, p in enumerate(photos) if i not in in_test],
                                               cfg.val_fraction, cfg.seed)
        index = {p.path: i for i, p in enumerate(photos)}
        tr, va = [index[p.path] for p in inner_train], [index[p.path] for p in inner_val]
        if cfg.unfreeze:
            model = prep.extractor.model()
            model.load_state_dict(pretrained)
            freeze(model)
        else:  # the frozen backbone's features are all a head needs
            model = new_head(prep.train.x.shape[-1], len(classes), cfg.seed)
        run = Run(cfg, model, prep.train.subset(tr), prep.val.subset(va), classes, positive)
        run.cache_dir = prep.extractor.cache.dir
        with quiet():
            best = fit(run)
            p = run.probabilities(prep.val.subset(test))
            untempered += run.probabilities(prep.val.subset(test), run.head['temperature'])
        y = prep.val.y[test].tolist()
        m = metrics(y, p, classes, positive, best['threshold'])
        del m['bins']  # a fold's reliability bins: the pooled ones are drawn
        m.update(fold=k + 1, train=len(tr), val=len(va), test=len(test), epoch=best['epoch'], stage=best['stage'],
                 weight_decay=run.head['weight_decay'], seconds=time.time() - t0)
        say(f'fold {k + 1}/{cfg.folds}: balanced accuracy {m["balanced_accuracy"]:.3f} (weight decay '
            f'{run.head["weight_decay"]:g}, {best["stage"]} epoch {best["epoch"]}, {time.time() - t0:.0f}s)')
        results.append(m)
        labels, probs, preds = labels + y, probs + p, preds + decide(p, positive, best['threshold'])
        edges += [k + 1] if run.head.get('search') and on_grid_edge(run.head['search']) else []
    if edges:
        warn(f'the weight decay chosen in fold(s) {", ".join(map(str, edges))} is an end of the grid '
             f'({HEAD_GRID[0]:g} to {HEAD_GRID[-1]:g}): the inner folds found no best penalty inside it')
    pooled = metrics(labels, probs, classes, positive, None, preds)  # out of fold, each at its own threshold
    if positive is not None:  # what each fold's temperature did to its calibration
        pooled['untempered'] = calibration([y == positive for y in labels], [q[positive] for q in untempered])
        del pooled['untempered']['bins']
    result = {'folds': results, 'mean': aggregate(results, 'mean'), 'std': aggregate(results, 'sd'),
              'pooled': pooled, 'data': prep.what, 'arch': cfg.arch, 'weights': prep.spec.name, 'seed': cfg.seed,
              'precision': prep.extractor.precision, 'fidelity': prep.fidelity,
              'calibration_only': sorted(photos[i].path for i in held),
              'config': vars(cfg)}
    report(cfg, result, pooled, labels, probs, os.path.join(cfg.out, 'cv'),
           f'{cfg.folds}-fold cross-validation, pooled ({len(labels)} photos)', print_cv)
    return result


def evaluate(cfg):
    """Metrics of a checkpoint on photos it never saw: its own validation photos on the flat dataset it was
    trained on, the test/ (or val/) folder of a split dataset, or any other folder whole."""
    loaded = load_model(cfg.checkpoint, cfg)
    photos, what = evaluation_photos(loaded, cfg)
    probs, failures = checkpoint_probabilities(loaded, photos, cfg, 'evaluate')
    report_skipped(failures)
    scored = [i for i in range(len(photos)) if i in probs]
    labels, p = [photos[i].label for i in scored], [probs[i] for i in scored]
    m = metrics(labels, p, loaded.classes, loaded.positive, operating_threshold(cfg, loaded))
    m.update(images=what, checkpoint=cfg.checkpoint, skipped=failures)
    out = cfg.out or os.path.dirname(os.path.abspath(cfg.checkpoint))
    report(cfg, m, m, labels, p, out, f'{os.path.basename(os.path.normpath(cfg.data))}: {m["n"]} photos',
           lambda r: print_metrics(r, f'evaluated {what}\ncheckpoint {cfg.checkpoint} ({loaded.ckpt["arch"]}, epoch '
                                      f'{loaded.ckpt.get("epoch")})'))
    if cfg.sheet and not cfg.no_plot and is_main():
        rows = [{'path': photos[i].path, 'true': y, 'pred': d, 'probs': q}
                for i, y, d, q in zip(scored, labels, decide(p, loaded.positive, m['threshold']), p)]
        say(f'plot: {plot_sheet(rows, loaded.classes, os.path.join(out, "sheet.png"), loaded.pre)}')
    return m


def predict(cfg):
    """Classify photos: one line (or JSON object) per photo and a plot of them; unreadable ones are
    reported and skipped, and the exit code is 2 only when nothing could be predicted."""
    files, problems = collect_images(cfg.paths)
    loaded = load_model(cfg.checkpoint, cfg) if files else None
    results = []
    if files:
        probs, failures = checkpoint_probabilities(loaded, [Photo(f, -1, '') for f in files], cfg, 'predict')
        problems += failures
        threshold = operating_threshold(cfg, loaded)
        for i, f in enumerate(files):
            if i in probs:
                label = decide([probs[i]], loaded.positive, threshold)[0]
                results.append({'path': f, 'label': loaded.classes[label], 'probability': probs[i][label],
                                'probabilities': dict(zip(loaded.classes, probs[i]))})
    for r in results:
        if cfg.json and is_main():
            print(json.dumps(r), flush=True)
        elif not cfg.json:
            say(f'{r["path"]}\t{r["label"]}\t{r["probability"]:.3f}')
    for path, line in problems if is_main() else []:
        if cfg.json:
            print(json.dumps({'path': path, 'error': line}), flush=True)
        print(f'error: {line}', file=sys.stderr, flush=True)
    if not results:
        raise UserError('nothing could be predicted' + (f' ({len(problems)} problems above)' if problems else ''))
    if problems:
        say(f'{len(results)} photos predicted, {len(problems)} could not be')
    if not cfg.json:
        say(NOT_A_DIAGNOSIS)
    if not cfg.no_plot and is_main():
        plot_predictions(results, loaded, cfg)
    return results


def download(cfg, fix='fetch the file by hand and pass --url PATH'):
    """Fetch the authors' archive of the MSLD photos, verify it, and lay it out as train/ val/ test/ by
    patient. Everything happens in a temporary folder beside --dest, renamed into place at the end:
    an interrupted or failed download leaves --dest as it was. `fix`: what to do when offline."""
    dest = Path(cfg.dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not cfg.force:
        raise UserError(f'{dest} exists and is not empty; pass --force to replace it, or choose --dest')
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f'.{dest.name}-download-', dir=dest.parent))
    try:
        archive = work / 'archive.rar'
        fetch(cfg.url, archive, fix)
        size, md5 = archive.stat().st_size, hashlib.md5(archive.read_bytes()).hexdigest()
        if (size, md5) != (ARCHIVE_BYTES, ARCHIVE_MD5):
            raise UserError(f'{cfg.url}: got {size:,} bytes with md5 {md5}, expected {ARCHIVE_BYTES:,} bytes with '
                            f'md5 {ARCHIVE_MD5}; the download is damaged or not the MSLD archive. Nothing was written '
                            f'to {dest}')
        extract_rar(archive, work / 'all')
        layout_dataset(work / 'all', work / 'out', cfg)
        if dest.exists():
            os.replace(dest, work / 'replaced')
        os.replace(work / 'out', dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f'{dest}: the 228 MSLD photos in train/ val/ test/ (split by patient, seed {cfg.seed}; {dest / "SPLIT.csv"}); '
        f'license CC BY-NC, see {dest / "LICENSE.txt"}')
    return dest


def export(cfg):
    """The whole model (backbone, head, softmax) as one self-contained ONNX file in fp32 with a dynamic batch
    size, its classes, threshold and preprocessing in the file's metadata. The file is checked with
    onnx.checker and its probabilities compared with PyTorch's before it is written (atomically)."""
    onnx, ort = onnx_modules()
    out = cfg.out or os.path.splitext(cfg.checkpoint)[0] + '.onnx'
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):  # say so before the minutes of exporting
        raise UserError(f'cannot write {out}: {folder} is not a writable folder; choose another --out')
    loaded = load_checkpoint(cfg.checkpoint, cfg)
    own = loaded.ckpt.get('precision')
    fidelity = next((c for c in loaded.ckpt.get('fidelity') or [] if c['precision'] == own), None)
    unlike_fp32 = (f'{out} not written: {cfg.checkpoint} was trained on {own} features, which do not reproduce fp32 '
                   'for this model, and the ONNX file computes in fp32: it would answer differently from predict')
    if fidelity and not fidelity['faithful']:
        raise UserError(f'{unlike_fp32} (a probability could move by {fidelity["max"]:.2g} on its check photos); '
                        'retrain with --precision auto or fp32')
    model = onnx_graph(loaded, cfg.opset, onnx)
    onnx.helper.set_model_props(model, onnx_metadata(loaded, cfg.checkpoint))
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    worst, what, own_gap = onnx_parity(loaded, ort.InferenceSession(data, providers=['CPUExecutionProvider']), cfg)
    if worst > 1e-4:
        raise UserError(f'{out} not written: onnxruntime\'s probabilities differ from PyTorch\'s by up to {worst:.2g} '
                        f'on {what} (the limit is 1e-4); try another --opset, or report it with --debug')
    if own_gap is not None and own_gap > FIDELITY_LIMITS['max']:
        raise UserError(f'{unlike_fp32} (by up to {own_gap:.2g} on {what}); retrain with --precision auto or fp32')
    atomic_write(out, lambda f: f.write(data))
    say(f'exported {out} ({len(data) / 1e6:.1f} MB, opset {cfg.opset}, {loaded.ckpt["arch"]}, classes '
        f'{loaded.classes}): onnx.checker passed, onnxruntime agrees with PyTorch within {worst:.1g} on {what}')
    if own_gap is not None:
        say(f'note: {cfg.checkpoint} was trained on {own} features; the ONNX file computes them in fp32, within '
            f'{own_gap:.2g} of predict\'s probabilities on {what}')
    return out


# --- what train and cv share: their beginning, and the report cv shares with evaluate --------------

@dataclasses.dataclass
class Prepared:
    split: 'Split'           # the photos: training and validation (cv: every photo in both)
    what: str                # a sentence naming them
    spec: 'WeightsSpec'      # the backbone's weights
    positive: int            # index of the screened class (None: none)
    extractor: 'Extractor'   # the frozen backbone and its feature cache
    train: 'Features'        # the stored random views of the training photos
    val: 'Features'          # the evaluation view of the validation photos
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
            download(argparse.Namespace(**{**vars(cfg), 'dest': cfg.data, 'url': cfg.archive_url, 'force': False}),
                     fix='pass --archive-url PATH (or `download --url PATH`) with a copy of the archive, or --data DIR '
                         'with photos of your own')
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


# ================================================================================================
# Data: photos in class folders, their patients, and the splits that keep a patient on one side

@dataclasses.dataclass
class Photo:
    path: str    # file on disk
    label: int   # index into the class list
    sha: str     # sha256 of the bytes: the photo's identity in the feature cache and the split


@dataclasses.dataclass
class Split:
    root: str                 # the --data folder
    classes: list             # class names in index order
    train: list               # Photos
    val: list                 # Photos (may be empty)
    how: str                  # 'folders' (DIR/train + DIR/val) or 'grouped' (split here by patient)
    skipped: list = dataclasses.field(default_factory=list)  # [path, reason] of unreadable images


LAYOUT_HELP = ('Expected one folder per class, e.g. monkeypoxdata/Monkey Pox/*.jpg and monkeypoxdata/Others/*.jpg '
               '(or train/ and val/ folders each laid out so). Get the public Monkeypox Skin Lesion Dataset with '
               f'`python monkeypox.py download` ({DATASET_URL}, CC BY-NC).')


def read_dataset(root, memo=None, classes=None, parts=('train', 'val')):
    """(classes, photos by part) of --data, the one place that knows its two layouts: the DIR/train,
    DIR/val and DIR/test folders (those of `parts` that exist) when DIR/train exists, else DIR's class
    folders (part 'all'). With `classes` (a model's), every class folder must be one of them."""
    found = {}
    for part in parts if os.path.isdir(os.path.join(root, 'train')) else ['']:
        folder = os.path.join(root, part) if part else root
        if not part or os.path.isdir(folder):
            classes, found[part or 'all'] = read_photos(folder, classes, memo)
    if len(classes or []) < 2:
        raise UserError(f'{root} has only one class folder ({classes[0]!r}); a classifier needs at least two. '
                        f'{LAYOUT_HELP}')
    return classes, found


def split_photos(root, classes, parts, cfg):
    """Training and validation photos: the train/ and val/ folders as given, or the class folders split
    here by patient (--val-fraction, --seed)."""
    if 'all' not in parts:
        return Split(root, classes, parts['train'], parts.get('val', []), 'folders')
    return Split(root, classes, *grouped_split(parts['all'], cfg.val_fraction, cfg.seed), 'grouped')


def evaluation_photos(loaded, cfg):
    """Which photos `evaluate` scores, and a sentence saying so."""
    data, split = cfg.data, loaded.ckpt.get('split', {})
    _, parts = read_dataset(data, classes=loaded.classes, parts=('test', 'val'))
    if 'all' not in parts:
        part = next((p for p in ('test', 'val') if p in parts), None)
        if part is None:
            raise UserError(f'{data} has train/ but no val/ or test/ folder to evaluate on; pass --data FOLDER')
        return parts[part], f'{os.path.join(data, part)} ({part} folder, never used for training)'
    photos = parts['all']
    rel = {os.path.relpath(p.path, data): p for p in photos}
    trained = set(split.get('train', [])) | set(split.get('val', []))
    if split.get('how') == 'grouped' and trained and trained <= set(rel) and not cfg.all:
        if not split['val']:
            raise UserError(f'{cfg.checkpoint} was trained on every photo of {data} (--val-fraction 0): none is left '
                            'to evaluate on. Pass --all (its training photos: an optimistic score), or run `cv`')
        val = [rel[r] for r in split['val']]
        return val, (f'{data}: the {len(val)} validation photos of the checkpoint\'s split (seed {split["seed"]}); '
                     '--all for every photo')
    note = ' (--all: includes the photos the model was trained on)' if cfg.all and trained & set(rel) else ''
    return photos, f'{data}: all {len(photos)} photos{note}'


def read_photos(root, classes=None, memo=None):
    """Photos of an ImageFolder-style folder; with `classes`, its class names must be among them."""
    found, samples = scan_folder(root)
    if classes is None:
        classes = found
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise UserError(f'{os.path.join(root, unknown[0])}: class {unknown[0]!r} is not one of the model\'s '
                        f'classes {classes}; rename the folder or remove it')
    photos = []
    for path, label in samples:
        try:
            sha = sha256_file(path, memo)
        except OSError as e:
            raise UserError(f'{path}: cannot read ({e.strerror or e}); check its permissions') from e
        photos.append(Photo(path, classes.index(found[label]), sha))
    return classes, photos


def scan_folder(root):
    """(classes, [(path, label)]) of an ImageFolder-style folder, with one clear error per bad layout."""
    if not os.path.isdir(root):
        what = 'is not a folder' if os.path.exists(root) else 'does not exist'
        raise UserError(f'data folder {root} {what}. {LAYOUT_HELP}')
    try:
        folder = PhotoFolder(root)
    except OSError as e:
        raise UserError(f'cannot read {e.filename or root}: {e.strerror or e}; check its permissions') from e
    present = {label for _, label in folder.samples}
    empty = [c for k, c in enumerate(folder.classes) if k not in present]
    if empty:
        raise UserError(f'class folder {os.path.join(root, empty[0])} holds no images '
                        f'({", ".join(IMAGE_EXTENSIONS[:6])}, ...). Add photos or remove the folder.')
    return folder.classes, folder.samples


class PhotoFolder(torchvision.datasets.ImageFolder):
    """torchvision's ImageFolder that skips hidden folders (.git, .ipynb_checkpoints, __MACOSX) and
    hidden or non-image files (.DS_Store, README), and keeps empty class folders for a clear error."""

    def __init__(self, root):
        super().__init__(root, loader=load_rgb, is_valid_file=is_image_file, allow_empty=True)

    def find_classes(self, directory):
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not is_hidden(e.name))
        if not classes:
            raise UserError(f'{directory} has no class folders. {LAYOUT_HELP}')
        return classes, {c: i for i, c in enumerate(classes)}


def is_hidden(name):
    return name.startswith('.') or name in ('Thumbs.db', 'desktop.ini', '__MACOSX')


def is_image_file(path):
    name = os.path.basename(path)
    return not is_hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS)


def collect_images(paths):
    """Image files named on the command line or found (recursively) in named folders, and [path, problem]
    for each path that gave none."""
    files, problems = [], []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(d, f) for d, dirs, fs in os.walk(p) for f in fs if is_image_file(f)
                           and not any(is_hidden(part) for part in Path(os.path.relpath(d, p)).parts))
            if not found:
                problems.append([p, f'{p}: folder holds no images ({", ".join(IMAGE_EXTENSIONS[:5])}, ...)'])
            files += found
        elif os.path.isfile(p):
            files.append(p)
        else:
            problems.append([p, f'{p}: no such file or folder'])
    return files, problems


def drop_unreadable(split, failures):
    """Remove photos that could not be decoded; a class left without training photos is an error."""
    bad = {path for path, _ in failures}
    if not bad:
        return split
    for path, reason in failures:
        if [path, reason] not in split.skipped:
            split.skipped.append([path, reason])
    split.train = [p for p in split.train if p.path not in bad]
    split.val = [p for p in split.val if p.path not in bad]
    for label, name in enumerate(split.classes):
        if not any(p.label == label for p in split.train):
            raise UserError(f'class {name!r} has no readable training photos left '
                            f'({len(bad)} unreadable files skipped); add readable photos to it')
    return split


def print_split(split, note=''):
    how = {'folders': 'train/ and val/ folders', 'grouped': 'split by patient'}[split.how]
    say(f'data: {split.root} ({how}{note}): {len(split.train)} training, {len(split.val)} validation photos')
    width = max(len(c) for c in split.classes)
    say(f'  {"class":<{width}}  train    val')
    for k, c in enumerate(split.classes):
        say(f'  {c:<{width}}  {sum(p.label == k for p in split.train):5d}  {sum(p.label == k for p in split.val):5d}')


def group_key(path):
    """Patient of a photo: its class folder and file stem without a trailing _<digits> (P13_1, P13_2 -> P13)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.basename(os.path.dirname(path)), re.sub(r'_\d+$', '', stem)


def patient_groups(photos):
    """Group id per photo: same group key, or byte-identical files of one class (a duplicate under two
    names is still one photo and must not straddle a split)."""
    parent = list(range(len(photos)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first = {}
    for i, p in enumerate(photos):
        for key in (('name',) + group_key(p.path), ('bytes', p.label, p.sha)):
            j = first.setdefault(key, i)
            parent[find(i)] = find(j)
    return [find(i) for i in range(len(photos))]


def patients_by_class(photos):
    """For each class in index order, its patients as lists of photo indices (in order of first photo)."""
    groups, by_class = patient_groups(photos), {}
    for i, p in enumerate(photos):
        by_class.setdefault(p.label, {}).setdefault(groups[i], []).append(i)
    return [list(by_class[label].values()) for label in sorted(by_class)]


def grouped_folds(photos, folds, seed):
    """Stratified folds that keep each patient's photos together: per class, patients (largest first,
    ties in seeded random order) go to the fold holding fewest photos of that class."""
    rng, fold_of = random.Random(seed), [0] * len(photos)
    for order in patients_by_class(photos):
        rng.shuffle(order)
        order.sort(key=len, reverse=True)  # stable: equal sizes keep the shuffled order
        load = [0] * folds
        for idx in order:
            f = min(range(folds), key=lambda k: (load[k], k))
            load[f] += len(idx)
            for i in idx:
                fold_of[i] = f
    return fold_of


def grouped_split(photos, val_fraction, seed):
    """(train, val): per class, whole patients in seeded random order go to validation until it holds
    val_fraction of that class's photos."""
    rng, in_val = random.Random(seed), [False] * len(photos)
    for order in patients_by_class(photos):
        rng.shuffle(order)
        target, taken = round(val_fraction * sum(map(len, order))), 0
        for idx in order[:-1]:  # the last patient always stays in train, so train keeps every class
            if taken >= target:
                break
            taken += len(idx)
            for i in idx:
                in_val[i] = True
    return ([p for p, v in zip(photos, in_val) if not v], [p for p, v in zip(photos, in_val) if v])


# --- images: decoded as a person sees them, cut into the crops the backbone sees --------------------

def load_rgb(path, draft=None):
    """Open an image file as a person would see it: EXIF rotation applied, any mode made 8-bit RGB.
    `draft` (pixels) lets JPEG decode at a reduced scale no smaller than that, which is much faster
    for phone photos. Raises on anything unreadable; callers turn that into a per-file message."""
    with warnings.catch_warnings():
        warnings.simplefilter('error', Image.DecompressionBombWarning)  # refuse images past Pillow's limit
        with Image.open(path) as im:
            if draft and im.format == 'JPEG':
                im.draft('RGB', (draft, draft))
            im = ImageOps.exif_transpose(im)
            im.load()
            return to_rgb(im)


def to_rgb(im):
    """Any Pillow mode to RGB: 16-bit grey is scaled (not clipped to white), transparency goes on white."""
    if im.mode in ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I', 'F'):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith('I;16') or a.max(initial=0) > 255 else 255.0
        if im.mode == 'F' and a.max(initial=0) <= 1.0:
            top = 1.0
        im = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), 'L')
    if im.mode == 'P' and 'transparency' in im.info:
        im = im.convert('RGBA')
    if im.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La'):
        rgba = im.convert('RGBA')
        white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert('RGB')
    return im.convert('RGB')


def describe_image_error(path, e):
    """One line naming the file, what is wrong and the fix."""
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        size = re.search(r'\((\d+) pixels\)', str(e))
        size = f'{int(size.group(1)):,} pixels' if size else 'too many pixels'
        return (f'{path}: image too large ({size}, above Pillow\'s decompression-bomb limit of '
                f'{Image.MAX_IMAGE_PIXELS:,}); downscale it')
    if isinstance(e, UnidentifiedImageError) or (isinstance(e, OSError) and 'cannot identify' in str(e)):
        ext = os.path.splitext(path)[1].lower()
        if os.path.getsize(path) == 0:
            return f'{path}: empty file (0 bytes); copy the photo again'
        if ext in ('.heic', '.heif', '.avif'):
            return f'{path}: {ext[1:].upper()} is not readable here; convert it to JPEG or PNG'
        return f'{path}: not an image Pillow can read; remove it or convert it to JPEG or PNG'
    if isinstance(e, FileNotFoundError):
        return f'{path}: file disappeared while reading'
    reason = str(e).strip() or type(e).__name__
    return f'{path}: unreadable image ({reason}); the file is damaged or truncated, copy it again'


def report_skipped(failures, listed_in='', most=10):
    """One warning per unreadable file, naming it; past `most`, a count."""
    for _, reason in failures[:most]:
        warn(f'skipped {reason}')
    if len(failures) > most:
        warn(f'skipped {len(failures) - most} more unreadable files')
    if failures and listed_in:
        warn(f'{len(failures)} unreadable file(s) skipped in all; they are listed in {listed_in}')


def preprocessing(cfg, ckpt=None):
    """Image size, resize, mean and std: a checkpoint's own (predict and evaluate), else the settings'."""
    p = (ckpt or {}).get('preprocess') or {}
    return {'image_size': p.get('image_size', cfg.image_size), 'resize': p.get('resize', cfg.resize),
            'mean': list(p.get('mean', cfg.mean)), 'std': list(p.get('std', cfg.std))}


def eval_transform(pre):
    return T.Compose([T.Resize(pre['resize']), T.CenterCrop(pre['image_size']), T.PILToTensor()])


def train_transform(pre, crop_scale):
    return T.Compose([T.RandomResizedCrop(pre['image_size'], scale=(crop_scale, 1.0)), T.RandomHorizontalFlip(),
                      T.PILToTensor()])


def normalize(x, pre):
    """uint8 crops (as the transforms leave them: 4x less to copy and collate than floats) to the normalised
    floats a backbone expects. The inference backbone folds this into its first convolution instead."""
    mean, std = (torch.tensor(pre[k], device=x.device).view(1, -1, 1, 1) for k in ('mean', 'std'))
    return (x.float() / 255 - mean) / std


def view_seed(sha, view):
    """Seed of one random view of one photo: fixed by the photo's bytes and the view's name, so a view is
    the same crop in every run, process and rank, and cached features stay valid across --seed."""
    return int(hashlib.sha256(f'{sha}:{view}'.encode()).hexdigest()[:15], 16)


class ViewDataset(torch.utils.data.Dataset):
    """Item i: photo i decoded once and cut into the views asked for ('eval', or a named random view), as
    uint8 tensors. Unreadable photos come back as an error line instead of raising, so one bad file skips
    one photo."""

    def __init__(self, photos, views, pre, crop_scale):
        self.photos, self.views, self.resize = photos, views, pre['resize']
        self.eval_tf, self.train_tf = eval_transform(pre), train_transform(pre, crop_scale)

    def __len__(self):
        return len(self.photos)

    def __getitem__(self, i):
        photo, views = self.photos[i], self.views[i]
        try:
            img = load_rgb(photo.path, draft=self.resize if views == [EVAL_VIEW] else 2 * self.resize)
        except Exception as e:  # any decoder failure on untrusted bytes means: skip this photo, say why
            return i, None, describe_image_error(photo.path, e)
        crops = []
        for view in views:
            if view == EVAL_VIEW:
                crops.append(self.eval_tf(img))
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(view_seed(photo.sha, view))
                    crops.append(self.train_tf(img))
        return i, torch.stack(crops), None


# ================================================================================================
# Model: a torchvision backbone with a new head, its weights, what is frozen, and its arithmetic

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
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # googlenet/inception init notices
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
        reason = getattr(e, 'reason', None) or str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f'cannot load {spec.name}: {file} is not there and downloading {spec.url} failed '
                        f'({reason}). Put the file there (or set MODEL_PATH / --weights to a copy of it), '
                        'or pass --weights none for random weights') from e


def resolve_device(device):
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    return torch.device(device)


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


def fast_bf16():
    """Whether this CPU runs bf16 natively (AVX-512 bf16 or AMX) and oneDNN may use it."""
    fast = getattr(torch.cpu, '_is_avx512_bf16_supported', lambda: False)() or \
        getattr(torch.cpu, '_is_amx_tile_supported', lambda: False)()
    isa = os.environ.get('ONEDNN_MAX_CPU_ISA', 'ALL').upper()  # oneDNN held below its bf16 units emulates bf16
    return fast and any(k in isa for k in ('BF16', 'FP16', 'AMX', 'AVX10', 'ALL'))


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


def autocast(device, precision):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == 'bf16')


# ================================================================================================
# Inference: the one loop that runs photos through a model (extraction, validation, evaluate, predict)

def run_batches(fn, photos, views, cfg, device, pre, desc):
    """This rank's share of `photos`, each decoded once (in decode_workers processes) and cut into its
    `views` (a list of view names per photo), through `fn` (a batch of crops on `device` -> one output
    row per crop) in batches of about --extract-batch-size crops. Yields (indices, outputs, failures) per
    batch: the photos whose crops gave the rows of `outputs` (on the CPU, views in photo order; None when
    there are none) and [index, reason] for each photo that could not be read. Any model plugs in as `fn`."""
    chunks = my_chunks(len(photos), max(1, cfg.extract_batch_size // max(map(len, views), default=1)))
    loader = photo_loader(photos, views, pre, cfg, device, batch_sampler=chunks, workers=len(chunks) > 1)
    with tqdm(total=sum(len(views[i]) for chunk in chunks for i in chunk), desc=desc, unit='crop', leave=False,
              disable=None if is_main() else True) as bar:
        for batch in loader:
            ok, out = [(i, x) for i, x, err in batch if err is None], None
            if ok:
                with torch.inference_mode():
                    out = fn(backbone_input(torch.cat([x for _, x in ok]), device)).cpu()
            bar.update(sum(len(views[i]) for i, _, _ in batch))
            yield [i for i, _ in ok], out, [[i, err] for i, _, err in batch if err]


def score_photos(fn, photos, cfg, device, pre, desc):
    """`fn`'s row for each photo's evaluation view, computed in batches shared among the ranks and gathered:
    ({photo index: row as a list}, sorted [path, reason] of the photos that could not be read)."""
    rows, failures = {}, []
    for done, out, bad in run_batches(fn, photos, [[EVAL_VIEW]] * len(photos), cfg, device, pre, desc):
        rows.update(zip(done, out.tolist() if out is not None else []))
        failures += [[photos[i].path, reason] for i, reason in bad]
    merged, every_failure = {}, []
    for part, fails in gather((rows, failures)):
        merged.update(part)
        every_failure += fails
    return merged, sorted(every_failure)


def classifier(model, device, precision, pre, probs=True, qparams=None):
    """A batch of uint8 crops -> class probabilities (or logits): the backbone in its precision (int8 with the
    `qparams` training calibrated), the head in fp32 on the features, exactly as training computes them."""
    backbone, head = inference_model(model, device, precision, pre, qparams)

    def fn(x):
        logits = head(backbone(x).float())
        return logits.softmax(1) if probs else logits
    return fn


def inference_model(model, device, precision, pre, qparams=None, calibrate=None):
    """The backbone and the head for passes without gradients (features, predict, evaluate, validation).
    The backbone takes uint8 crops, channels_last. Traced with torch.fx, it is rewritten exactly: the
    normalisation goes into the first convolution's weights (Backbone), and in fp32 each BatchNorm is folded
    into the convolution before it. In bf16 the BatchNorms stay, under autocast: folding first and rounding
    the folded weights to bf16 ran 1.4x faster but cost 1.4 points of cross-validated accuracy (MobileNetV2,
    MSLD, 6 fold seeds). In int8 the graph is quantized (quantize_int8) with the activation ranges `qparams`,
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
        with autocast(x.device, self.precision):
            if self.net is not None:
                return self.net(x)
            with without_head(self.model):
                return self.model(x)


# --- int8: a frozen backbone quantized after training, its activation ranges calibrated on training photos --

def int8_engine():
    """'x86' where PyTorch's own int8 kernels for x86 CPUs (fbgemm and oneDNN, VNNI and AMX when present) are
    there, else None (ARM, or a torch without them)."""
    x86 = platform.machine().lower() in ('x86_64', 'amd64')
    return 'x86' if x86 and 'x86' in torch.backends.quantized.supported_engines else None


def int8_pays(arch, crops):
    """Whether 'auto' extracts `arch`'s features in int8 for a run of `crops` crops: CNN families whose
    quantized graph was checked to build and run (attention models stay in bf16/fp32), on a CPU with int8
    kernels, when the crops repay calibrating and building the int8 graph. Measured for ResNet101 on 2
    cores: that costs 8-11 s (4-5 s of it the calibration), and saves about 68 ms a crop against fp32 held
    to AVX2 (156 -> 88 ms) and 30 against bf16 with AMX (50-60 -> 20-27 ms): it pays from about 200 crops
    without fast bf16 and 300 with it (the 410 crops of `train` on the MSLD photos: 25.8 s against 31.2 s
    cold, whole process, one run each). MobileNetV2's grouped cross-validated balanced accuracy, paired
    over 15 folds: -0.008 (se 0.011) against fp32 (README, Precision)."""
    families = ('resnet', 'resnext', 'wide_resnet', 'regnet', 'vgg', 'mobilenet', 'efficientnet')  # not DenseNet:
    # its int8 concatenations join inputs quantized on different scales, which PyTorch warns is inaccurate
    least = INT8_MIN_CROPS['fast bf16' if fast_bf16() else 'fp32']
    return int8_engine() is not None and arch.startswith(families) and crops >= least


INT8_MIN_CROPS = {'fp32': 200, 'fast bf16': 300}  # crops from which int8 repays its build, against each (docs)


def quantize_int8(backbone, qparams=None, calibrate=None):
    """The backbone's graph in int8, in place: PyTorch's post-training static quantization (FX mode, the x86
    engine's default recipe: weights int8 per output channel, activations uint8 per tensor over a 7-bit range,
    BatchNorm folded). The weights are quantized from the fp32 weights, so a network is fixed by its
    activation ranges: `qparams` (a checkpoint's: each observer's scale and zero point), else those
    HistogramObservers find while `calibrate(backbone)` runs crops through it (rank 0's, under torchrun).
    Either way the ranges are pinned (FixedQParamsObserver) before converting: the same qparams give the
    same network bit for bit. torch.ao.quantization is deprecated in favour of torchao, which needs
    torch.compile to be fast; it is still shipped and exact, and its warnings are kept quiet."""
    from torch.ao.quantization.quantize_fx import convert_fx
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # deprecation notices, and reduce_range's
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
    torch.backends.quantized.engine = int8_engine() or torch.backends.quantized.engine
    size = backbone.pre['image_size']
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # deprecation notices, and reduce_range's
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
    histogram do not depend on the order of the values, and on channels_last activations its reductions
    ran 1.6x faster so (ResNet101's calibration: 6.7 -> 4.2 s on 2 cores; the same ranges to the bit)."""
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
        # onto the same grid, 3x faster than the fused op on CPU; before Grad-CAM's stage nothing needs gradients
        return x.div(self.scale).round_().add_(self.zero).clamp_(self.low, self.high).sub_(self.zero).mul_(self.scale)


def int8_emulation(backbone, qparams):
    """The int8 backbone as differentiable fp32 arithmetic, for Grad-CAM: the same graph with each observer
    replaced by its rounding (FakeQuant) and the weights rounded per channel as the int8 kernels hold them.
    It follows the int8 network closely, not bit for bit (the kernels round their sums otherwise)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
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
    scored photo shaped the int8 activation ranges (measured: calibrating on photos cv then scored made
    its balanced accuracy about a point higher than calibrating without them)."""
    if not calibration:
        return set()
    groups, chosen = patient_groups(photos), {p.path for p in calibration}
    marked = {g for g, p in zip(groups, photos) if p.path in chosen}
    return {i for i, g in enumerate(groups) if g in marked}


def calibration_photos(photos, n):
    """The photos whose crops calibrate int8: the first n by content hash, so the same training photos give
    the same choice whatever their order or names."""
    return sorted(photos, key=lambda p: p.sha)[:n]


def photo_loader(photos, views, pre, cfg, device, workers=True, **batching):
    """The photos decoded and cut into their views, in decode_workers processes (none for a single batch)."""
    return torch.utils.data.DataLoader(ViewDataset(photos, views, pre, cfg.crop_scale), collate_fn=list, **batching,
                                       num_workers=decode_workers(cfg.workers, device) if workers else 0,
                                       pin_memory=device.type == 'cuda')


def backbone_input(x, device):
    return x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


def decode_workers(workers, device):
    """Decoding processes (--workers; -1: auto). With a GPU, one per spare core (up to 4) keeps it fed.
    On a CPU the backbone's threads already use every core and extra processes only compete with them: on
    2 cores, 1 worker made extraction 16% slower than decoding in the main process (MSLD, ResNet101, bf16)."""
    if workers >= 0:
        return workers
    cores = os.cpu_count() or 1
    if device.type == 'cuda':
        return max(0, min(4, cores - 1))
    return 0 if cores <= 4 else min(4, cores // 8)


# ================================================================================================
# Features: each photo goes through the frozen backbone once per view; the results are cached on disk

@dataclasses.dataclass
class Features:
    photos: list         # Photos, in row order
    x: torch.Tensor      # [photos, views, dim] backbone features
    y: torch.Tensor      # [photos] class indices

    def subset(self, idx):
        return Features([self.photos[i] for i in idx], self.x[idx], self.y[idx])


class Extractor:
    """Runs photos through the frozen backbone, once per (photo, view), reading and filling the cache.
    The model is built only when something is missing from the cache: a warm run never builds it."""

    def __init__(self, cfg, classes, spec, precision=None, calibration=(), crops=0):
        self.cfg, self.classes, self.spec = cfg, classes, spec
        self.device = resolve_device(cfg.device)
        self.precision = precision or resolve_precision(cfg.precision, self.device, None if cfg.unfreeze else cfg.arch,
                                                        crops)
        self.dtype = torch.bfloat16 if self.precision == 'bf16' else torch.float32  # of the stored features
        self.pre = preprocessing(cfg)
        self.about = {'arch': cfg.arch, 'weights': spec.name, 'weights_id': spec.ident,
                      'precision': self.precision, 'device': self.device.type, 'torch': str(torch.__version__),
                      'torchvision': torchvision.__version__, 'eval_transform': repr(eval_transform(self.pre)),
                      'train_transform': repr(train_transform(self.pre, cfg.crop_scale)),
                      'inference': 'uint8 crops, normalisation folded; bf16 autocast, fp32 with batchnorm folded'}
        # int8 features depend on the photos that calibrated them: their hashes are part of the key
        self.calibration = []
        if self.precision == 'int8':
            self.calibration = calibration_photos(calibration, cfg.calibration_photos)
            if not self.calibration:
                raise UserError('--precision int8 needs training photos to calibrate on, and there are none')
            self.about['int8'] = {'engine': 'x86', 'calibration': [p.sha for p in self.calibration]}
        key = hashlib.sha256(json.dumps(self.about, sort_keys=True).encode()).hexdigest()[:16]
        self.cache, self._model, self._backbone = FeatureCache(cfg.cache or None, key, self.about), None, None
        self.qparams = self.cache.read_json('int8.json') if self.precision == 'int8' else None
        if self.precision == 'int8' and RANKS.world > 1:  # caches can differ between machines: any rank's will do,
            self.qparams = next((q for q in gather(self.qparams) if q is not None), None)  # so all calibrate or none
        self.backbone_calls = 0  # batches that went through the backbone (the tests count them)
        self.crops, self.seconds, self.backbone_seconds = 0, 0.0, 0.0  # crops computed, wall time, time in the backbone
        self.setup_seconds = 0.0  # building the model and its inference form, once

    def model(self):
        """The pretrained model with a new head, frozen; built on first use."""
        if self._model is None:
            self._model = pretrained_model(self.cfg, self.spec, len(self.classes))
        return self._model

    def inference_backbone(self):
        """The backbone as extraction runs it, built once, whatever the number of passes (training views, then
        validation). In int8 it is calibrated here, unless the cache holds the calibration of these photos."""
        if self._backbone is None:
            self._backbone, _ = inference_model(self.model(), self.device, self.precision, self.pre, self.qparams,
                                                self.calibrate)
            if self.precision == 'int8' and self.qparams is None:
                self.qparams = self._backbone.qparams
                self.cache.write_json('int8.json', self.qparams)
        return self._backbone

    def calibrate(self, backbone):
        """int8: the calibration photos' evaluation crops through the observed backbone, every one on every rank."""
        t0 = time.perf_counter()
        views = [[EVAL_VIEW]] * len(self.calibration)
        for batch in photo_loader(self.calibration, views, self.pre, self.cfg, self.device,
                                  batch_size=max(1, self.cfg.extract_batch_size), workers=False):
            crops = [x for _, x, err in batch if err is None]
            if crops:
                backbone(backbone_input(torch.cat(crops), self.device))
        say(f'int8: activation ranges calibrated on the crops of {len(self.calibration)} photos '
            f'({time.perf_counter() - t0:.1f}s)')

    def int8_calibration(self):
        """What a checkpoint carries so that predict and evaluate compute training's int8 features."""
        if self.precision != 'int8':
            return None
        if self.qparams is None:  # every feature came from a cache whose calibration file was removed
            self.inference_backbone()
        return {'engine': 'x86', 'qparams': self.qparams, 'photos': [p.path for p in self.calibration]}

    def features(self, photos, views):
        """Features of the given views of each readable photo, and [path, reason] for each photo that could
        not be read (left out)."""
        keys = [[f'{p.sha}:{v}' for v in views] for p in photos]
        missing = {i: [v for v, k in zip(views, ks) if k not in self.cache.rows] for i, ks in enumerate(keys)}
        missing = {i: vs for i, vs in missing.items() if vs}
        if RANKS.world > 1:  # caches can differ between machines: compute whatever any rank lacks
            union = {}
            for part in gather(missing):
                for i, vs in part.items():
                    union.setdefault(i, set()).update(vs)
            missing = {i: [v for v in views if v in union[i]] for i in union}
        todo = sorted(missing)
        failures = self._extract([photos[i] for i in todo], [missing[i] for i in todo]) if todo else []
        bad = {path for path, _ in failures}
        keep = [i for i, p in enumerate(photos) if p.path not in bad]
        rows = [torch.stack([self.cache.rows[k] for k in keys[i]]) for i in keep]
        x = torch.stack(rows) if rows else torch.zeros(0, len(views), 0, dtype=self.dtype)
        return Features([photos[i] for i in keep], x, torch.tensor([photos[i].label for i in keep])), failures

    def _extract(self, photos, views):
        """Run this rank's share of the photos through the backbone, write its own cache packs (as it goes,
        and what it has on Ctrl-C), and share the results with the other ranks."""
        failures, pending, own, last_flush = [], ([], []), ([], []), time.time()
        most, backbone = max(map(len, views)), None

        def fn(x):  # timed apart from decoding, so that the time around the backbone can be told (benchmark)
            start = time.perf_counter()
            out = backbone(x).to(self.dtype).cpu()
            self.backbone_seconds += time.perf_counter() - start
            return out
        start = t0 = time.perf_counter()
        try:
            self.inference_backbone()  # int8 calibrates here: a Ctrl-C then stops the extraction as any other
            t0 = time.perf_counter()
            self.setup_seconds += t0 - start
            backbone = compiled(self._backbone, sum(map(len, views)),
                                max(1, self.cfg.extract_batch_size // most) * most, self)
            for done, f, bad in run_batches(fn, photos, views, self.cfg, self.device, self.pre,
                                            f'extract {self.cfg.arch} features'):
                failures += [[photos[i].path, reason] for i, reason in bad]
                if f is None:
                    continue
                keys = [f'{photos[i].sha}:{v}' for i in done for v in views[i]]
                self.backbone_calls += 1
                self.crops += len(f)
                for keep in (pending, own):
                    keep[0].extend(keys)
                    keep[1].append(f)
                if time.time() - last_flush > 30:  # long extractions save as they go
                    self.cache.put(pending[0], torch.cat(pending[1]))
                    pending, last_flush = ([], []), time.time()
        except KeyboardInterrupt:
            say(f'interrupted during feature extraction: {len(own[0])} features kept' +
                (f' in the cache {self.cache.dir}; run the same command again to continue' if self.cache.dir
                 else ' in memory only (--no-cache): nothing saved') + '; no checkpoint was written by this run')
            raise
        finally:
            if pending[0]:  # also on Ctrl-C: what was computed is kept, as complete packs (each rank its own)
                self.cache.put(pending[0], torch.cat(pending[1]))
            if RANKS.world == 1:
                self.cache.compact()
            self.seconds += time.perf_counter() - t0
        if RANKS.world > 1:  # every rank gets every feature; each wrote only its own packs
            failures = []
            for r, (keys, feats, fails) in enumerate(gather((own[0], torch.cat(own[1]) if own[1] else None,
                                                             failures))):
                failures += fails
                if r != RANKS.rank and feats is not None:
                    self.cache.rows.update(zip(keys, feats))
        return failures


def compiled(backbone, crops, batch, extractor):
    """The backbone through torch.compile when --compile says so: 'auto' compiles on CPUs for extractions long
    enough to pay for it. Measured on a 2-core Xeon with AMX (ResNet101, batch 16, bf16), alone: compiling
    took 44 s with a cold compile cache and 8 s with a warm one (PyTorch's on-disk caches) for a pass about
    1.4x faster (30-40 against 45-50 ms a crop); in fp32 (oneDNN held to AVX2) 42 s and 6 s for about 1.3x.
    Within a 2,000-photo run (tests/bench_speed.py) the cold compile cost about 80 s and saved 20 ms a crop.
    So it pays from about 4,000 crops cold, 600 warm. Not on GPUs, where extraction waits on decoding. The
    batch is fixed (the last one padded) so that one graph serves; any failure falls back to eager."""
    cfg, device = extractor.cfg, extractor.device
    key = hashlib.sha256(json.dumps([cfg.arch, extractor.precision, device.type, batch, str(torch.__version__),
                                     backbone.folded]).encode()).hexdigest()[:16]
    # PyTorch's compile caches (FX graphs, kernels) beside the features unless the user put them elsewhere; a
    # marker beside them says whether this graph was compiled there before (the warm threshold applies)
    folder = os.environ.get('TORCHINDUCTOR_CACHE_DIR') or (os.path.join(cfg.cache, 'compile') if cfg.cache else '')
    folder = Path(folder).resolve() if folder else None
    warm = bool(folder and (folder / f'compiled-{key}').exists())
    pays = compile_pays(crops, warm, device, extractor.precision)
    if not (cfg.compile == 'always' or cfg.compile == 'auto' and pays):
        return backbone
    if folder:
        os.environ['TORCHINDUCTOR_CACHE_DIR'] = str(folder)
    say(f'compiling the backbone for {crops} crops (torch.compile, {"warm" if warm else "cold"} compile cache)')
    fast = torch.compile(backbone, dynamic=False)
    marker = folder / f'compiled-{key}' if folder and not warm else None  # written once the graph has run

    def fn(x):
        nonlocal fast, marker
        if fast is not None:
            try:
                pad = x.new_zeros((batch - len(x),) + x.shape[1:]) if len(x) < batch else None
                out = fast(x if pad is None else torch.cat([x, pad]).contiguous(memory_format=torch.channels_last))
                if marker:
                    marker.parent.mkdir(parents=True, exist_ok=True)
                    marker.touch()
                    marker = None
                return out[:len(x)]
            except Exception as e:  # no compiler on this machine, an unsupported operator: eager is still right
                why = str(e).strip().splitlines()[0][:150] if str(e).strip() else type(e).__name__
                warn(f'torch.compile failed ({why}); extracting without it')
                fast = None
        return backbone(x)
    return fn


def compile_pays(crops, warm, device, precision):
    """Whether compiling the backbone saves time overall (see `compiled`, where the numbers come from). Not
    an int8 backbone: its quantized kernels are already the fast path (inductor does not take them over)."""
    return device.type == 'cpu' and precision != 'int8' and crops >= (600 if warm else 4000)


class FeatureCache:
    """Backbone features keyed by '<photo sha256>:<view>', for one model key (arch, weights, transforms,
    precision, device type and torch version hashed together). Stored in packs, each written whole
    (temporary file, then rename) with a digest of its contents: an interrupted write never appears,
    and a damaged pack is detected, reported, deleted and recomputed, never trusted."""

    def __init__(self, root, key, about):
        self.dir, self.rows, self.about = Path(root) / key if root else None, {}, about
        if self.dir and self.dir.is_dir():
            for pack in sorted(self.dir.glob('pack-*.pt')):
                self._read(pack)

    def _read(self, pack):
        try:
            data = torch.load(pack, map_location='cpu', weights_only=True)
            keys, feats = data['keys'], data['features']
            if data['digest'] != self.digest(keys, feats):
                raise ValueError('digest mismatch')
        except Exception as e:
            warn(f'feature cache {pack} is damaged ({str(e).splitlines()[0] if str(e) else type(e).__name__});'
                 ' deleted, its features will be recomputed')
            with contextlib.suppress(OSError):
                pack.unlink()
            return
        for k, row in zip(keys, feats):
            self.rows[k] = row

    @staticmethod
    def digest(keys, feats):
        h = hashlib.sha256('\n'.join(keys).encode())
        h.update(str((tuple(feats.shape), str(feats.dtype))).encode())
        h.update(feats.contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def put(self, keys, feats):
        """Keep the rows, and write them as one new pack (its path is returned; None in memory only)."""
        feats = feats.contiguous()
        for k, row in zip(keys, feats):
            self.rows[k] = row
        if self.dir is None or not keys:
            return
        if not (self.dir / 'about.json').exists():
            atomic_write(self.dir / 'about.json', lambda f: f.write(json.dumps(self.about, indent=1).encode()))
        path = self.dir / f'pack-{time.strftime("%Y%m%d-%H%M%S")}-{os.getpid()}-{os.urandom(4).hex()}.pt'
        torch_save({'keys': list(keys), 'features': feats, 'digest': self.digest(keys, feats)}, path)
        return path

    def read_json(self, name):
        """A small file beside the packs (int8.json: the calibration the features were computed with), or None."""
        try:
            return json.loads((self.dir / name).read_text()) if self.dir else None
        except (OSError, ValueError):
            return None

    def write_json(self, name, obj):
        if self.dir:
            atomic_write(self.dir / name, lambda f: f.write(json.dumps(obj).encode()))

    def compact(self, most=8):
        """Merge the packs into one once there are more than `most`, so a warm start reads few files."""
        if self.dir is None:
            return
        packs = sorted(self.dir.glob('pack-*.pt'))
        if len(packs) <= most:
            return
        keys = sorted(self.rows)
        merged = self.put(keys, torch.stack([self.rows[k] for k in keys]))
        for p in packs:
            if p != merged:
                with contextlib.suppress(OSError):
                    p.unlink()


# --- fidelity: a faster arithmetic is used only where the fitted head cannot tell it from fp32 -------------

FIDELITY_LIMITS = {'median': 0.005, 'max': 0.05, 'flips': 0.005}  # half the tolerance each: docs/precision.md


def check_fidelity(cfg, extractor, train, positive):
    """How closely the extractor's arithmetic reproduces fp32 where it matters, in the answers: the head is fit
    on the features as training fits it; the check photos (the int8 calibration photos: the first
    CALIBRATION_PHOTOS training photos by sha256) are run through the backbone both ways, and the head's logits
    on them give the changes the arithmetic makes (the head is linear: a change of features is a change of
    logits whatever the photo). Those changes are applied to the head's out-of-fold logits, which stand for
    photos it never saw (a training photo sits further from the threshold than a new one), pair by pair: the
    median and largest change of a probability, and the share of decisions that change at the threshold.
    Faithful when each is within FIDELITY_LIMITS, half the tolerance a user is promised (median 0.01, max 0.1,
    1% of decisions), because 16 photos show less than the worst of hundreds."""
    photos = extractor.calibration or calibration_photos(train.photos, cfg.calibration_photos)
    fast, _ = extractor.features(photos, [EVAL_VIEW])
    exact = Extractor(cfg, extractor.classes, extractor.spec, precision='fp32')
    exact._model = extractor._model  # the same pretrained network: built once, or only when a cache lacks it
    ref, _ = exact.features(fast.photos, [EVAL_VIEW])
    run = fitted_head(cfg, extractor, train, positive)
    with torch.no_grad():
        change = (run.model(fast.x[:, 0].float()) - run.model(ref.x[:, 0].float())).double()
    unseen = run.oof_logits if run.oof_logits is not None else run.model(train.x.flatten(0, 1).float()).double()
    before = unseen.softmax(1)[:, None]                             # [photos, 1, classes]
    after = (unseen[:, None] + change[None]).softmax(2)             # [photos, check photos, classes]
    moved = (after - before).abs().amax(2).flatten()
    threshold = run.best['threshold']
    flips = [a != b for a, b in zip(decide(after.flatten(0, 1).tolist(), positive, threshold),
                                    decide(before.expand_as(after).flatten(0, 1).tolist(), positive, threshold))]
    result = {'precision': extractor.precision, 'photos': len(change), 'median': float(moved.median()),
              'max': float(moved.max()), 'flips': float(np.mean(flips)),
              'limits': dict(FIDELITY_LIMITS)}
    result['faithful'] = all(result[k] <= v for k, v in FIDELITY_LIMITS.items())
    verdict = 'reproduces fp32' if result['faithful'] else 'does not reproduce fp32'
    say(f'precision: {extractor.precision} {verdict} closely enough for this head (on {len(change)} check photos: '
        f'probabilities move by {result["median"]:.4f} median, {result["max"]:.3f} at most, {result["flips"]:.1%} of '
        f'decisions change; limits {FIDELITY_LIMITS["median"]:g}, {FIDELITY_LIMITS["max"]:g}, '
        f'{FIDELITY_LIMITS["flips"]:.1%})' + ('' if result['faithful'] or cfg.precision != 'auto' else
                                           '; the features are computed again in the next arithmetic'))
    if not result['faithful'] and cfg.precision != 'auto':
        warn(f'--precision {extractor.precision}: this model\'s answers will differ from fp32\'s (a GPU, an ARM CPU, '
             'its ONNX export) by more than the limits; --precision auto or fp32 avoids that')
    return result


def fitted_head(cfg, extractor, train, positive):
    """The run that fits the head fit_head makes on these features (the penalty search is kept in the cache
    for the real fit)."""
    run = Run(cfg, new_head(train.x.shape[-1], len(extractor.classes), cfg.seed), train, train.subset([]),
              extractor.classes, positive)
    run.cache_dir = extractor.cache.dir
    with quiet():
        fit_head(run)
    return run


def precisions_to_try(cfg, spec, device, crops):
    """The arithmetics this run tries, fastest first: precision_candidates, less those found not to reproduce
    fp32 for this network and weights before (remember_unfaithful), which the line says."""
    candidates = precision_candidates(cfg.precision, device, None if cfg.unfreeze else cfg.arch, crops)
    if len(candidates) == 1:
        return candidates
    known = {}
    for part in gather(read_unfaithful(cfg)):  # any rank's record: the ranks must try the same arithmetics
        known.update(part)
    keep = [p for p in candidates if p == 'fp32' or fidelity_key(cfg, spec, device, p) not in known]
    for p in candidates:
        if p not in keep:
            m = known[fidelity_key(cfg, spec, device, p)]
            say(f'precision: {p} skipped: it did not reproduce fp32 for {cfg.arch} with these weights (a probability '
                f'could move by {m["max"]:.3f} on its check photos; {Path(cfg.cache, UNFAITHFUL_NAME)})')
    return keep


UNFAITHFUL_NAME = 'unfaithful-precisions.json'


def fidelity_key(cfg, spec, device, precision):
    return f'{cfg.arch}|{spec.ident}|{device.type}|{precision}|torch {torch.__version__}'


def read_unfaithful(cfg):
    try:
        return json.loads(Path(cfg.cache, UNFAITHFUL_NAME).read_text()) if cfg.cache else {}
    except (OSError, ValueError):
        return {}


def remember_unfaithful(cfg, extractor, fidelity):
    """Record in the cache that this network and weights need more than this arithmetic, so that later runs go
    straight to the next one."""
    if cfg.cache and is_main():
        known = read_unfaithful(cfg)
        known[fidelity_key(cfg, extractor.spec, extractor.device, extractor.precision)] = fidelity
        atomic_write(Path(cfg.cache, UNFAITHFUL_NAME), lambda f: f.write(json.dumps(known, indent=1).encode()))


def load_memo(cache):
    """sha256 of photos and weights files from an earlier run, by path, size and mtime (see sha256_file)."""
    if not cache:
        return {}
    try:
        with open(os.path.join(cache, 'hashes.json')) as f:
            return json.load(f)
    except (OSError, ValueError, TypeError):
        return {}


def save_memo(cache, memo):
    if cache:
        with contextlib.suppress(UserError):
            atomic_write(os.path.join(cache, 'hashes.json'), lambda f: f.write(json.dumps(memo).encode()))


# ================================================================================================
# Training: the head on stored features, fine-tuning, and the bookkeeping of one run

class Run:
    """One training run. What the fit functions read: the settings, the model (a full model, or cv's bare
    head on stored features), the training features (random views) and validation features (evaluation
    view), the classes, and a resumed run's state. What they leave here: the per-epoch history and
    progress lines, and the best epoch (copied, never referenced); with a `checkpoint` path, the atomic
    best checkpoint and the resume file too."""

    def __init__(self, cfg, model, train, val, classes, positive, meta=None, checkpoint=None):
        self.cfg, self.model, self.train, self.val = cfg, model, train, val
        self.classes, self.positive, self.meta, self.resume = classes, positive, meta, None
        self.head, self.cache_dir = {}, None  # the head's fit (fit_head); where its search is kept
        self.oof_logits = None  # the inner folds' out-of-fold logits of the training views, tempered (fit_head)
        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.history, self.best, self.best_written = [], None, None
        self.last_write = time.time()  # fast (head) epochs: the best is written once, at the end
        # only rank 0 writes files; every rank keeps the same history and best (their numbers are equal)
        self.checkpoint = checkpoint if checkpoint and is_main() else None

    def end_epoch(self, stage, epoch, epochs, train_stats, val, optimizer, seconds, threshold=None):
        """Record an epoch, print its line, keep it if it is the best, and save what a resume needs.
        `threshold`: the one to carry when there are no validation photos to choose it on."""
        row = {'stage': stage, 'epoch': epoch, 'train_loss': train_stats['loss'], 'train_accuracy':
               train_stats['accuracy'], 'val_loss': val['metrics']['loss'] if val else float('nan'),
               'val_accuracy': val['metrics']['accuracy'] if val else float('nan'),
               'val_balanced_accuracy': val['metrics']['balanced_accuracy'] if val else float('nan'),
               'seconds': seconds}
        self.history.append(row)
        improved = val is not None and (self.best is None or (val['metrics']['balanced_accuracy'],
                                                             -val['metrics']['loss']) > tuple(self.best['score']))
        if val is None or improved:  # with no validation photos the last epoch is the model
            self.best = {'stage': stage, 'epoch': epoch, 'state': trainable_state(self.model),
                         'score': [val['metrics']['balanced_accuracy'], -val['metrics']['loss']] if val else [],
                         'metrics': val['operating'] if val else {},
                         'threshold': val['threshold'] if val else threshold or self.cfg.threshold}
        v = (f' | val loss {row["val_loss"]:.3f} acc {row["val_accuracy"]:.3f} bal {row["val_balanced_accuracy"]:.3f}'
             if val else '')
        say(f'{stage} epoch {epoch:3d}/{epochs} | train loss {row["train_loss"]:.3f} acc {row["train_accuracy"]:.3f}'
            f'{v} | {seconds:.2f}s{" *" if improved else ""}')
        if self.checkpoint:
            if self.best is not self.best_written and time.time() - self.last_write >= self.cfg.checkpoint_seconds:
                self.write_best()
            torch_save({'format': 'monkeypox.py resume', 'fingerprint': self.meta['fingerprint'], 'stage': stage,
                        'epoch': epoch, 'trainable': trainable_state(self.model), 'history': self.history,
                        'optimizer': optimizer.state_dict() if optimizer else None, 'head': self.head,
                        'best': dict(self.best)}, os.path.join(self.cfg.out, RESUME_NAME))

    def restore(self, resume):
        self.resume, self.history, self.best, self.best_written = resume, resume['history'], resume['best'], None
        self.head = resume['head']

    def probabilities(self, f, temperature=1.0):
        """Class probabilities of the photos of `f` from their evaluation view: the head on the stored
        features while the backbone is frozen, the whole model on the photos once it was fine-tuned.
        (`temperature` multiplies the logits: the head's own temperature undoes its scaling.)"""
        if self.cfg.unfreeze:
            return photo_logits(self, f.photos).softmax(1).tolist()
        with torch.no_grad():
            logits = self.model.get_submodule(head_name(self.model))(f.x[:, 0].float())
        return (logits * temperature).softmax(1).tolist()

    def write_best(self, final=False):
        # the final write always happens: the checkpoint's history must be the whole run's, not the
        # history as it stood when the best epoch was last written
        if not self.checkpoint or self.best is None or (self.best is self.best_written and not final):
            return
        state = self.model.state_dict()
        state.update(self.best['state'])
        b = self.best
        ckpt = {**self.meta, 'model': {k: v.detach().cpu() for k, v in state.items()}, 'epoch': b['epoch'],
                'stage': b['stage'], 'threshold': b['threshold'], 'metrics': b['metrics'], 'history': self.history,
                'head': {k: v for k, v in self.head.items() if k != 'scale'}}
        torch_save(ckpt, self.checkpoint)
        write_class_map(ckpt['classes'], os.path.join(os.path.dirname(self.checkpoint), CLASS_MAP_NAME))
        self.best_written, self.last_write = self.best, time.time()

    def finish(self):
        self.write_best(final=True)
        if self.checkpoint:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.cfg.out, RESUME_NAME))
            write_summary(self.history, os.path.join(self.cfg.out, 'summary.csv'))
            atomic_write(os.path.join(self.cfg.out, 'config.json'),
                         lambda f: f.write(json.dumps(self.meta['config'], indent=1).encode()))

    def save_interrupted(self):
        """Ctrl-C or kill: the best epoch so far is written (complete, or not at all) before stopping."""
        saved = (f'best checkpoint so far (epoch {self.best["epoch"]}) in {self.checkpoint}' if self.best else
                 'no checkpoint yet')
        with contextlib.suppress(Exception):
            self.write_best()
        say(f'interrupted: {saved}; resume with --resume')


def fit(run):
    """Train run.model: the head on the stored features, then with --unfreeze the last stages on freshly
    augmented photos. The model leaves at its best epoch, which is returned."""
    if not (run.resume and run.resume['stage'] == 'finetune'):
        fit_head(run)
    if run.cfg.unfreeze:  # fine-tuning starts from the converged head (the last epoch), not an early best
        finetune(run)
    run.model.load_state_dict(run.best['state'], strict=False)
    return run.best


def fit_head(run):
    """The new head, fit to convergence on every training photo's stored views: the mean cross-entropy plus
    lambda/2 |W|^2 (bias free) on features standardised over those views, lambda being --weight-decay or,
    with 'auto', the choice of grouped inner cross-validation (search_weight_decay). Its logits are then
    divided by the temperature that best fits the inner folds' out-of-fold predictions (frozen backbone only:
    fine-tuning moves the model those predictions measured). Standardisation and temperature are folded into
    the saved Linear, so the checkpoint stays a plain torchvision state_dict and predict needs nothing more.
    Validation photos serve the report and the threshold, never the fit."""
    cfg, t0 = run.cfg, time.time()
    x, y = run.train.x.flatten(0, 1).double(), run.train.y.repeat_interleave(run.train.x.shape[1])
    auto, tune = cfg.weight_decay == 'auto', not len(run.val.y) and cfg.target_sensitivity > 0
    search = search_weight_decay(run, HEAD_GRID if auto else (float(cfg.weight_decay),))
    if search is None and (auto or tune):
        raise UserError(('--weight-decay auto' if auto else '--target-sensitivity without validation photos') +
                        ' needs two patients of every class or more among the training photos (inner folds by '
                        'patient); add photos' + (', or pass --weight-decay NUMBER (e.g. 1)' if auto else ''))
    lam = search['choice'] if search else float(cfg.weight_decay)
    edge = on_grid_edge(search) if auto else None
    if edge and not say.muted:  # cv's folds and the fidelity check fit quietly: cv says it once
        warn(f'weight decay {lam:g} is the {edge} of the {len(search["grid"])} tried ({search["grid"][0]:g} to '
             f'{search["grid"][-1]:g}): the inner folds found no best penalty inside the grid, so a value beyond it may '
             'fit better; pass --weight-decay NUMBER to try one')
    oof = torch.tensor(search['oof_logits'], dtype=torch.float64) if search else None
    space = RowSpace(x)
    weight, bias = space.linear(newton_softmax(space.a, y, len(run.classes), lam))
    temperature = 1.0 if cfg.unfreeze or search is None else fit_temperature(oof.flatten(0, 1), y)
    run.oof_logits = None if oof is None else oof.flatten(0, 1) / temperature  # the head's logits on unseen photos
    head = run.model.get_submodule(head_name(run.model))
    with torch.no_grad():
        head.weight.copy_(weight / temperature)
        head.bias.copy_(bias / temperature)
        logits = head(x.float())
    run.head = {'weight_decay': lam, 'auto': auto, 'scale': space.std.float(), 'temperature': temperature,
                'search': {k: v for k, v in search.items() if k != 'oof_logits'} if auto else None}
    threshold = cfg.threshold
    if search and run.positive is not None:
        truth = [v == run.positive for v in run.train.y.tolist()]
        oof_p = [(oof / t).softmax(2).mean(1)[:, run.positive].tolist() for t in (1.0, temperature)]  # views averaged
        run.head['ece'] = {'before': calibration(truth, oof_p[0])['ece'], 'after': calibration(truth, oof_p[1])['ece']}
        if tune:
            threshold = select_threshold(truth, oof_p[1], cfg.target_sensitivity, cfg.threshold)
    val = validate(lambda: head(run.val.x[:, 0].float()), run.val.y, run.classes, run.positive,
                   cfg) if len(run.val.y) else None
    say(f'head: weight decay {lam:g}' + (f', chosen by {search["folds"]} inner folds by patient (out-of-fold log loss '
                                         f'{search["loss"][search["grid"].index(lam)]:.3f})' if auto else ' (given)')
        + (f'; temperature {temperature:.2f}' + (f' (out-of-fold ECE {run.head["ece"]["before"]:.3f} -> '
                                                 f'{run.head["ece"]["after"]:.3f})' if 'ece' in run.head else '')
           if search and not cfg.unfreeze else '') + f'; {len(x)} views of {len(run.train.y)} photos, '
        f'{time.time() - t0:.2f}s')
    stats = {'loss': F.cross_entropy(logits, y).item(), 'accuracy': (logits.argmax(1) == y).float().mean().item()}
    run.end_epoch('head', 1, 1, stats, val, None, time.time() - t0, threshold)


def fit_temperature(logits, y):
    """The temperature T minimising the cross-entropy of softmax(logits / T): Newton's method on 1/T, a
    one-dimensional convex problem (Guo et al. 2017, temperature scaling)."""
    inverse = 1.0
    for _ in range(50):
        z = logits * inverse
        p = z.softmax(1)
        mean = (p * logits).sum(1)
        grad = (mean - logits.gather(1, y[:, None])[:, 0]).mean()
        curvature = ((p * logits * logits).sum(1) - mean * mean).mean()
        if abs(grad) < 1e-10 or curvature <= 0:
            break
        inverse = min(max(inverse - grad / curvature, inverse / 4), inverse * 4)
    return 1 / inverse


HEAD_GRID = tuple(float(f'{10 ** (e / 2):.4g}') for e in range(-8, 7))  # the lambdas 'auto' tries: 1e-4 ... 1e3
HEAD_FOLDS, HEAD_FOLD_SEED = 5, 0  # inner folds that choose lambda, drawn with a fixed seed: --seed cannot move it
HEAD_RULE = 'lowest mean out-of-fold log loss'  # how 'auto' picks lambda from the inner folds (choose_weight_decay)


def search_weight_decay(run, grid=HEAD_GRID):
    """lambda for the head by grouped inner cross-validation on the training photos: HEAD_FOLDS folds keeping
    each patient's photos together, the out-of-fold log loss of every lambda of the grid, and the lambda
    choose_weight_decay picks from them. Kept in the feature cache beside the features it was made on, so a
    warm run with the same features skips it. Also returns the out-of-fold logits of each photo's views at
    the choice: the temperature, and the threshold of a run without validation photos, come from them.
    None when there are too few patients of a class to make folds."""
    x, y, views = run.train.x.double(), run.train.y, run.train.x.shape[1]
    folds = inner_folds(run.train.photos)
    used = sorted(set(folds))
    if any(len({y[i].item() for i, f in enumerate(folds) if f != k}) < len(run.classes) for k in used) or len(used) < 2:
        return None  # a fold would train without some class: too few patients
    key = hashlib.sha256(x.float().numpy().tobytes() + json.dumps([y.tolist(), folds, grid, HEAD_RULE]).encode())
    path = run.cache_dir / f'head-search-{key.hexdigest()[:24]}.json' if run.cache_dir else None
    if path and path.exists():
        with contextlib.suppress(OSError, ValueError, KeyError):
            return json.loads(path.read_text())
    loss = torch.zeros(len(used), len(grid), dtype=torch.float64)
    oof = torch.zeros(len(grid), len(y), views, len(run.classes), dtype=torch.float64)
    for k, fold in enumerate(used):
        out = torch.tensor([f == fold for f in folds])
        space = RowSpace(x[~out].flatten(0, 1))
        held = space.project(x[out].flatten(0, 1))
        theta = None
        for j in reversed(range(len(grid))):  # strong to weak penalty, each fit starting from the last
            theta = newton_softmax(space.a, y[~out].repeat_interleave(views), len(run.classes), grid[j], theta)
            logits = held @ theta @ helmert(len(run.classes)).T
            loss[k, j] = F.cross_entropy(logits, y[out].repeat_interleave(views))
            oof[j, out] = logits.unflatten(0, (-1, views))
    mean, se = loss.mean(0), loss.std(0) / math.sqrt(len(used))
    choice = choose_weight_decay(mean.tolist(), se.tolist())
    search = {'grid': list(grid), 'loss': mean.tolist(), 'se': se.tolist(), 'best': grid[int(mean.argmin())],
              'choice': grid[choice], 'rule': HEAD_RULE, 'folds': len(used), 'oof_logits': oof[choice].tolist()}
    if path and is_main():
        atomic_write(path, lambda f: f.write(json.dumps(search).encode()))
    return search


def choose_weight_decay(loss, se):
    """Index of the lambda with the lowest mean out-of-fold log loss: the usual rule for a ridge-penalised
    classifier (scikit-learn's LogisticRegressionCV). `se`, the folds' standard errors, is kept for the
    report; a one-standard-error rule toward the stronger penalty chose less well on held-out folds (docs)."""
    return min(range(len(loss)), key=loss.__getitem__)


def on_grid_edge(search):
    """'lowest' or 'highest' when the chosen lambda is an end of its grid (a wider grid might do better)."""
    grid = search['grid']
    if len(grid) > 1 and search['choice'] in (grid[0], grid[-1]):
        return 'lowest' if search['choice'] == grid[0] else 'highest'
    return None


def inner_folds(photos):
    """The folds that choose the head's weight decay: by patient, stratified, always drawn the same way."""
    return grouped_folds(photos, HEAD_FOLDS, HEAD_FOLD_SEED)


class RowSpace:
    """Training rows standardised and, when they are fewer than the features, written in the coordinates of
    their own span. Under an L2 penalty the optimal weights lie in that span, so fitting there is exact, and
    the problem shrinks from the features' 512-2,048 dimensions to the number of rows."""

    def __init__(self, x):
        self.mean, self.std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
        z, self.back = (x - self.mean) / self.std, None
        if len(x) <= x.shape[1]:
            values, vectors = torch.linalg.eigh(z @ z.T)  # Z Z^T = U S^2 U^T: much faster than an SVD of Z
            keep = values > values[-1] * 1e-12
            s, u = values[keep].sqrt(), vectors[:, keep]
            z, self.back = u * s, (u / s).T @ z  # the rows' coordinates Z V, and V^T to go back
        self.a = self.coordinates(z)

    def coordinates(self, z):
        return torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], 1)  # the last column carries the bias

    def project(self, x):
        """Other rows in the same coordinates (standardised as the training rows were)."""
        z = (x - self.mean) / self.std
        return self.coordinates(z if self.back is None else z @ self.back.T)

    def linear(self, theta):
        """The fitted (weight, bias) as a Linear on the raw features: the standardisation folded in."""
        P = helmert(theta.shape[1] + 1)
        w = P @ theta[:-1].T
        w = (w if self.back is None else w @ self.back) / self.std  # K x D, per raw feature
        return w.float(), (P @ theta[-1] - w @ self.mean).float()


@functools.cache
def helmert(k):
    """An orthonormal basis (k x k-1) of the logit vectors summing to zero: the penalised optimum has W's rows
    summing to zero, so writing W = P Omega (P: this basis) loses nothing, keeps |W| = |Omega|, and leaves k - 1
    blocks to fit (one for two classes: plain logistic regression)."""
    return torch.linalg.qr(torch.eye(k, dtype=torch.float64) - 1 / k)[0][:, :k - 1]


def newton_softmax(a, y, num_classes, lam, theta=None, tol=1e-9):
    """Minimise mean cross-entropy(softmax(P (a theta)^T)) + lam/2 |theta without its last row|^2 by Newton's
    method with a backtracking line search: a (n x m, last column ones for the bias), y (n) class indices,
    theta (m x K-1). Converged when the gradient's largest entry is below `tol`; convex, so from anywhere."""
    P = helmert(num_classes)
    n, m = a.shape
    onehot = F.one_hot(y, num_classes).to(a.dtype)
    reg = torch.full((m, 1), float(lam), dtype=a.dtype)
    reg[-1] = 0  # the bias is not penalised

    def objective(t):
        logits = a @ t @ P.T
        return (torch.logsumexp(logits, 1) - (logits * onehot).sum(1)).mean() + 0.5 * (reg * t * t).sum()
    theta = torch.zeros(m, P.shape[1], dtype=a.dtype) if theta is None else theta
    f = objective(theta)
    for _ in range(100):
        p = (a @ theta @ P.T).softmax(1)
        grad = a.T @ ((p - onehot) @ P) / n + reg * theta
        if grad.abs().max() < tol:
            break
        pp = p @ P  # the softmax's curvature in the basis, per row: P^T (diag p - p p^T) P
        step = newton_step(a, (torch.einsum('ik,kc,kd->icd', p, P, P) - pp[:, :, None] * pp[:, None, :]) / n, reg,
                           grad)
        decrease, s = (grad * step).sum(), 1.0
        while s > 1e-6:  # backtracking: Newton's full step, or shorter until the objective falls enough
            new = theta - s * step
            f_new = objective(new)
            if f_new <= f - 0.25 * s * decrease:
                break
            s /= 2
        theta, f = new, f_new
    return theta


def newton_step(a, w, reg, grad):
    """H^-1 grad for the Hessian H = a^T w a + reg (w: per-row curvature blocks): by Cholesky for small problems
    (the usual few hundred coordinates: fastest), by conjugate gradients preconditioned with H's diagonal for
    large ones, where forming H would cost rows x coordinates^2."""
    m, q = grad.shape
    if m * q <= 1024:
        hess = torch.cat([torch.cat([(a.T * w[:, c, d]) @ a for d in range(q)], 1) for c in range(q)], 0)
        hess.diagonal().add_(reg.repeat(q, 1)[:, 0] + 1e-12)
        return torch.cholesky_solve(grad.T.reshape(-1, 1), torch.linalg.cholesky(hess)).reshape(q, m).T
    diag = (a * a).T @ torch.diagonal(w, dim1=1, dim2=2) + reg + 1e-12
    x, r = torch.zeros_like(grad), grad.clone()
    z = r / diag
    d, rz, goal = z, (r * z).sum(), min(0.1, grad.norm()) * grad.norm()  # inexact Newton: superlinear
    for _ in range(1000):
        hd = a.T @ torch.einsum('icd,id->ic', w, a @ d) + reg * d
        step = rz / (d * hd).sum()
        x, r = x + step * d, r - step * hd
        if r.norm() <= goal:
            break
        z = r / diag
        rz, rz_old = (r * z).sum(), rz
        d = z + rz / rz_old * d
    return x


def validate(logits_fn, y, classes, positive, cfg):
    """Validation metrics at --threshold ('metrics': they pick the best epoch and fill the history), the
    threshold the checkpoint will carry (--threshold, or the highest reaching --target-sensitivity) and
    the metrics at that threshold ('operating': stored, so they are what `evaluate` reports on the same
    photos). Epochs are compared at the fixed threshold: comparing them at a threshold tuned on the same
    photos picked epochs whose tuning flattered them, and cut cross-validated sensitivity at
    --target-sensitivity 0.8 from 0.83 to 0.75 (MobileNetV2, MSLD)."""
    with torch.no_grad():
        logits = logits_fn()
    loss = F.cross_entropy(logits, y).item()
    probs = logits.softmax(1)
    threshold = cfg.threshold
    if positive is not None and cfg.target_sensitivity > 0:
        threshold = select_threshold((y == positive).tolist(), probs[:, positive].tolist(), cfg.target_sensitivity,
                                     cfg.threshold)
    m, at = (metrics(y.tolist(), probs.tolist(), classes, positive, t) for t in (cfg.threshold, threshold))
    m['loss'] = at['loss'] = loss
    return {'metrics': m, 'threshold': threshold, 'operating': at}


def finetune(run):
    """Fine-tune the last --unfreeze stages and the head: Adam with --backbone-lr for the stages and LR
    for the head, on-the-fly RandomResizedCrop + flip (a new crop of every photo each epoch), BatchNorm
    in inference mode throughout (Keras's advice for small data: its statistics stay ImageNet's).
    Under torchrun: DistributedDataParallel, each rank a DistributedSampler share of every batch."""
    cfg, model, device = run.cfg, run.model, run.device
    head, stages = freeze(model, cfg.unfreeze)
    for k, v in model.named_parameters():  # the best so far (head stage) must carry these stages' weights too
        if v.requires_grad and k not in run.best['state']:
            run.best['state'][k] = v.detach().clone()
    model.to(device).to(memory_format=torch.channels_last)
    net = frozen_folded(model) if run.precision == 'fp32' else model
    net = net if RANKS.world == 1 else nn.parallel.DistributedDataParallel(  # gradients averaged across ranks
        net, device_ids=[device.index] if device.type == 'cuda' else None)
    optimizer = torch.optim.Adam([{'params': list(head.parameters()), 'lr': cfg.lr},
                                  {'params': [p for s in stages for p in s.parameters()], 'lr': cfg.backbone_lr}])
    # one sampler for one process or many: its seeded permutation makes the global batches the same
    sampler = torch.utils.data.DistributedSampler(range(len(run.train.photos)), num_replicas=RANKS.world,
                                                  rank=RANKS.rank, shuffle=True, seed=cfg.seed)
    base_lrs, per_rank = [g['lr'] for g in optimizer.param_groups], max(1, cfg.batch_size // RANKS.world)
    steps = math.ceil(len(sampler) / per_rank)  # per epoch, the same on every rank
    start = 1
    if run.resume and run.resume['stage'] == 'finetune':
        model.load_state_dict(run.resume['trainable'], strict=False)
        optimizer.load_state_dict(run.resume['optimizer'])
        start = run.resume['epoch'] + 1
    pre, scale = preprocessing(cfg), run.head['scale'].to(device)
    for epoch in range(start, cfg.epochs + 1):
        t0 = time.time()
        sampler.set_epoch(epoch)
        photos = [run.train.photos[i] for i in sampler]
        # a crop named by the epoch: reproducible, so --resume and every rank see the same pixels
        loader = photo_loader(photos, [[f'finetune{epoch}']] * len(photos), pre, cfg, device, batch_size=per_rank)
        total, correct, seen = 0.0, 0, 0
        for step, batch in enumerate(tqdm(loader, desc=f'finetune epoch {epoch}', unit='batch', leave=False,
                                          disable=None if is_main() else True)):
            factor = finetune_lr_factor((epoch - 1) * steps + step, steps, cfg.epochs)
            for group, lr in zip(optimizer.param_groups, base_lrs):
                group['lr'] = lr * factor
            bad = [err for _, _, err in batch if err]
            if bad:  # read fine moments ago, when its features were extracted
                raise UserError(f'{bad[0]} (it changed during training); fix it and run again with --resume')
            x = normalize(backbone_input(torch.cat([x for _, x, _ in batch]), device), pre)
            y = torch.tensor([photos[i].label for i, _, _ in batch], device=device)
            with autocast(device, run.precision):
                logits = net(x).float()
            loss = F.cross_entropy(logits, y)  # and the head's penalty, as it was fit: on standardised features
            loss = loss + run.head['weight_decay'] / 2 * (head.weight * scale).square().sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        total, correct, seen = map(sum, zip(*gather((total, correct, seen))))
        val = validate(lambda: photo_logits(run, run.val.photos), run.val.y, run.classes, run.positive,
                       cfg) if len(run.val.y) else None
        run.end_epoch('finetune', epoch, cfg.epochs, {'loss': total / max(seen, 1),
                      'accuracy': correct / max(seen, 1)}, val, optimizer, time.time() - t0)
    model.cpu()


def frozen_folded(model):
    """The model to fine-tune in fp32 with each frozen convolution + BatchNorm pair folded into one convolution
    (exact: BatchNorm stays in inference mode), traced with torch.fx. The trainable stages are the model's
    own modules, so the optimizer and the checkpoint see what training changes; a model torch.fx cannot
    trace is used as it is."""
    try:
        graph = torch.fx.symbolic_trace(model)
    except Exception:
        return model
    modules = dict(graph.named_modules())
    for node in list(graph.graph.nodes):
        conv = node.args[0] if node.op == 'call_module' and isinstance(modules[node.target], nn.BatchNorm2d) else None
        if conv is None or conv.op != 'call_module' or not isinstance(modules[conv.target], nn.Conv2d) or \
                len(conv.users) > 1 or any(p.requires_grad for p in [*modules[conv.target].parameters(),
                                                                     *modules[node.target].parameters()]):
            continue
        name = conv.target.replace('.', '_') + '_folded'  # a module of its own: the model's stays as it is
        graph.add_module(name, torch.nn.utils.fusion.fuse_conv_bn_eval(modules[conv.target], modules[node.target]))
        conv.target = name
        node.replace_all_uses_with(conv)
        graph.graph.erase_node(node)
    graph.recompile()
    return graph


def finetune_lr_factor(step, steps_per_epoch, epochs):
    """Learning-rate multiplier at a fine-tuning step: linear warm-up over the first epoch (Adam's first
    steps are large next to pretrained weights), then cosine decay to zero at the last step."""
    if step < steps_per_epoch:
        return (step + 1) / steps_per_epoch
    rest = max(1, steps_per_epoch * (epochs - 1))
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - steps_per_epoch) / rest)))


def photo_logits(run, photos):
    """Logits of the whole model (as it is now) on the photos' evaluation view, in batches shared among
    the ranks."""
    pre = preprocessing(run.cfg)
    rows, failures = score_photos(classifier(run.model, run.device, run.precision, pre, probs=False), photos, run.cfg,
                                  run.device, pre, 'validate')
    if failures:  # read fine moments ago, when its features were extracted
        raise UserError(f'{failures[0][1]} (it changed during training); fix it and run again')
    return torch.tensor([rows[i] for i in range(len(photos))]) if photos else torch.zeros(0, 0)


def select_threshold(y_pos, p_pos, target, fallback):
    """Highest threshold t with sensitivity (share of positives with p >= t) of at least `target`
    (`fallback` when there are no positives to measure it on)."""
    scores = sorted((p for y, p in zip(y_pos, p_pos) if y), reverse=True)
    if not scores:
        return fallback
    k = max(1, math.ceil(target * len(scores) - 1e-9))
    return float(scores[min(k, len(scores)) - 1])


def positive_index(classes, positive):
    """Index of the class screened for: --positive-class, else the class named like mpox/monkeypox."""
    if positive and positive != 'auto':
        if positive not in classes:
            raise UserError(f'--positive-class {positive!r} is not one of the classes {classes}')
        return classes.index(positive)
    for i, c in enumerate(classes):
        if re.sub(r'[\s_-]+', '', c.lower()) in ('monkeypox', 'mpox', 'monkeypoxvirus'):
            return i
    return None


# ================================================================================================
# Metrics and reports

def decide(probs, positive, threshold):
    """Predicted class per row of probabilities: the positive class when its probability reaches the
    threshold, else the most probable other class (plain argmax when there is no positive class)."""
    preds = []
    for p in probs:
        if positive is None:
            preds.append(max(range(len(p)), key=p.__getitem__))
        elif p[positive] >= threshold:
            preds.append(positive)
        else:
            preds.append(max((k for k in range(len(p)) if k != positive), key=p.__getitem__))
    return preds


def operating_threshold(cfg, loaded):
    """evaluate's and predict's --threshold when given, else the one the checkpoint was trained for."""
    return cfg.override_threshold if cfg.override_threshold is not None else loaded.threshold


def metrics(labels, probs, classes, positive, threshold, preds=None):
    """Everything `evaluate` reports, as plain numbers (JSON-ready). `preds`: decisions already made
    (cv's pooled folds, each at its own threshold) instead of deciding at `threshold`."""
    preds = decide(probs, positive, threshold) if preds is None else preds
    n, C = len(labels), len(classes)
    cm = [[0] * C for _ in range(C)]
    for y, p in zip(labels, preds):
        cm[y][p] += 1
    recall = [cm[k][k] / sum(cm[k]) if sum(cm[k]) else float('nan') for k in range(C)]
    col = [sum(cm[r][k] for r in range(C)) for k in range(C)]
    precision = [cm[k][k] / col[k] if col[k] else float('nan') for k in range(C)]
    present = [r for r in recall if not math.isnan(r)]
    m = {'n': n, 'classes': list(classes), 'threshold': threshold,
         'positive_class': classes[positive] if positive is not None else None,
         'accuracy': sum(cm[k][k] for k in range(C)) / n if n else float('nan'),
         'balanced_accuracy': sum(present) / len(present) if present else float('nan'),
         'precision': dict(zip(classes, precision)), 'recall': dict(zip(classes, recall)),
         'support': {c: sum(cm[k]) for k, c in enumerate(classes)}, 'confusion_matrix': cm,
         'sensitivity': None, 'sensitivity_ci': None, 'specificity': None, 'specificity_ci': None, 'auc': None,
         'log_loss': None, 'brier': None, 'ece': None}
    if positive is not None:
        tp, P = cm[positive][positive], sum(cm[positive])
        tn, N = sum(cm[r][c] for r in range(C) for c in range(C) if positive not in (r, c)), n - P
        m.update(sensitivity=tp / P if P else float('nan'), sensitivity_ci=wilson(tp, P),
                 specificity=tn / N if N else float('nan'), specificity_ci=wilson(tn, N),
                 auc=roc_auc([y == positive for y in labels], [p[positive] for p in probs]),
                 **calibration([y == positive for y in labels], [p[positive] for p in probs]))
    return m


def calibration(y_pos, p_pos, bins=10):
    """How honest the probabilities of the screened class are: the log loss, the Brier score (mean of
    (p - y)^2) and the expected calibration error (|observed share - mean p| over `bins` equal-width bins,
    weighted by count), with the bins (count, mean p, observed share) for the reliability diagram."""
    n = len(p_pos)
    if not n:
        return {'log_loss': float('nan'), 'brier': float('nan'), 'ece': float('nan'), 'bins': []}
    cells = [[] for _ in range(bins)]
    for y, p in zip(y_pos, p_pos):
        cells[min(int(p * bins), bins - 1)].append((p, float(y)))
    cells = [(len(c), sum(p for p, _ in c) / len(c), sum(y for _, y in c) / len(c)) if c else (0, None, None)
             for c in cells]
    return {'log_loss': -sum(math.log(max(p if y else 1 - p, 1e-15)) for y, p in zip(y_pos, p_pos)) / n,
            'brier': sum((p - y) ** 2 for y, p in zip(y_pos, p_pos)) / n,
            'ece': sum(k / n * abs(share - mean) for k, mean, share in cells if k), 'bins': cells}


def wilson(k, n, z=1.959963984540054):
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return [float('nan'), float('nan')]
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [max(0.0, centre - half), min(1.0, centre + half)]


def roc_auc(y_pos, scores):
    """Area under the ROC curve: the probability that a positive outscores a negative, ties counting half
    (which is what the trapezoids under the curve's tied steps add up to)."""
    if all(y_pos) or not any(y_pos):
        return float('nan')
    fpr, tpr, _ = roc_curve(y_pos, scores)
    return sum((fpr[k] - fpr[k - 1]) * (tpr[k] + tpr[k - 1]) / 2 for k in range(1, len(fpr)))


def roc_curve(y_pos, scores):
    """(false positive rates, true positive rates, thresholds), thresholds from high to low: one sweep
    down the sorted scores, a point after each run of equal scores."""
    P = sum(map(bool, y_pos))
    N = len(y_pos) - P
    fpr, tpr, thr = [0.0], [0.0], [float('inf')]
    tp = fp = 0
    ranked = sorted(zip(scores, y_pos), key=lambda t: -t[0])
    for k, (s, y) in enumerate(ranked):
        tp, fp = tp + bool(y), fp + (not y)
        if k + 1 == len(ranked) or ranked[k + 1][0] != s:
            fpr.append(fp / N if N else float('nan'))
            tpr.append(tp / P if P else float('nan'))
            thr.append(s)
    return fpr, tpr, thr


def aggregate(dicts, how):
    """The mean or the sample sd (`how`, NaN ignored) of the same number in each metrics dict; text is kept."""
    first = dicts[0]
    if isinstance(first, dict):
        return {k: aggregate([d[k] for d in dicts], how) for k in first}
    if isinstance(first, list) and first and not isinstance(first[0], str):
        return [aggregate([d[i] for d in dicts], how) for i in range(len(first))]
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        values = np.array([v for v in dicts if v is not None and not math.isnan(v)], dtype=float)
        if how == 'sd':
            return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        return float(np.mean(values)) if len(values) else float('nan')
    return first


def json_ready(obj):
    """NaN is not JSON: report it as null."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj


def number(x, missing='n/a'):
    return missing if x is None or (isinstance(x, float) and math.isnan(x)) else f'{x:.3f}'


def print_metrics(m, title):
    say(title)
    say(f'accuracy {number(m["accuracy"])}   balanced accuracy {number(m["balanced_accuracy"])}   ({m["n"]} photos)')
    if m['positive_class'] is not None:
        pc = m['positive_class']
        ci = lambda c: '' if c is None or math.isnan(c[0]) else f' (95% CI {c[0]:.2f}-{c[1]:.2f})'  # noqa: E731
        say(f'{pc}: called when P({pc}) >= {m["threshold"]:.2f}')
        say(f'  sensitivity {number(m["sensitivity"])}{ci(m["sensitivity_ci"])}   '
            f'specificity {number(m["specificity"])}{ci(m["specificity_ci"])}   ROC AUC {number(m["auc"])}')
        say(f'  P({pc}): log loss {number(m["log_loss"])}   Brier {number(m["brier"])}   ECE {number(m["ece"])}'
            ' (10 bins)')
    width = max(10, max(len(c) for c in m['classes']))
    say(f'  {"class":<{width}}  precision  recall      n')
    for c in m['classes']:
        say(f'  {c:<{width}}  {number(m["precision"][c], "  n/a"):>9}  {number(m["recall"][c], "  n/a"):>6}  '
            f'{m["support"][c]:5d}')
    say('  confusion matrix (rows: true class, columns: predicted):')
    for c, row in zip(m['classes'], m['confusion_matrix']):
        say(f'  {c:<{width}}  ' + '  '.join(f'{v:5d}' for v in row))


def print_cv(result):
    pooled = result['pooled']
    screened = pooled['positive_class'] is not None
    keys = ['accuracy', 'balanced_accuracy'] + (['sensitivity', 'specificity', 'auc'] if screened else [])
    names = {'accuracy': 'accuracy', 'balanced_accuracy': 'balanced', 'sensitivity': 'sensitivity',
             'specificity': 'specificity', 'auc': 'ROC AUC'}
    say('fold  train  val  test  epoch' + ''.join(f'{names[k]:>16}' for k in keys) + '  threshold')
    for m in result['folds']:
        say(f'{m["fold"]:4d}  {m["train"]:5d}  {m["val"]:3d}  {m["test"]:4d}  {m["epoch"]:5d}'
            + ''.join(f'{number(m[k]):>16}' for k in keys) + f'  {m["threshold"]:9.2f}')
    say('mean ± sd' + ' ' * 20 + ''.join(f'{number(result["mean"][k]) + " ± " + number(result["std"][k]):>16}'
                                        for k in keys))
    if screened:
        ci = lambda c: f'(95% CI {c[0]:.2f}-{c[1]:.2f})'  # noqa: E731
        say(f'pooled out-of-fold ({pooled["n"]} photos, {pooled["positive_class"]} screened): sensitivity '
            f'{number(pooled["sensitivity"])} {ci(pooled["sensitivity_ci"])}, specificity '
            f'{number(pooled["specificity"])} {ci(pooled["specificity_ci"])}, ROC AUC {number(pooled["auc"])}; '
            f'P({pooled["positive_class"]}): log loss {number(pooled["log_loss"])}, Brier {number(pooled["brier"])}, '
            f'ECE {number(pooled["ece"])} (without the temperature: {number(pooled["untempered"]["ece"])})')


# ================================================================================================
# Checkpoints: written by `train`, read by evaluate and predict (and nothing in them is ever run)

def checkpoint_meta(cfg, prep):
    """Everything a checkpoint says besides its weights and epoch: enough to use it with nothing else."""
    split, positive = prep.split, prep.positive
    return {'format': CHECKPOINT_FORMAT, 'version': CHECKPOINT_VERSION, 'arch': cfg.arch,
            'classes': split.classes, 'positive_class': split.classes[positive] if positive is not None else None,
            'preprocess': preprocessing(cfg), 'weights': {'source': prep.spec.name, 'kind': prep.spec.kind,
                                                          'id': prep.spec.ident},
            'config': dict(vars(cfg)), 'precision': prep.extractor.precision, 'int8': prep.extractor.int8_calibration(),
            'fidelity': prep.fidelity,
            'split': {'root': os.path.abspath(split.root), 'how': split.how, 'seed': cfg.seed,
                      'val_fraction': cfg.val_fraction, 'skipped': split.skipped,
                      **{part: [os.path.relpath(p.path, split.root) for p in getattr(split, part)]
                         for part in ('train', 'val')}},
            'versions': {'torch': str(torch.__version__), 'torchvision': torchvision.__version__,
                         'python': sys.version.split()[0]},
            'fingerprint': fingerprint(cfg, split, prep.spec)}


def fingerprint(cfg, split, spec):
    """What a resumed run must share with the interrupted one."""
    keep = {k: v for k, v in vars(cfg).items() if k not in ('resume', 'workers', 'no_plot', 'extract_batch_size', 'debug',
                                                            'dist_timeout', 'checkpoint_seconds', 'auto_download',
                                                            'download_missing', 'archive_url')}
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
        raise UserError(f'{path}: cannot rebuild {ckpt["arch"]} ({e}); this torchvision may lack it') from e
    model.requires_grad_(False)  # for scoring: nothing in it trains (Grad-CAM's gradients start at a stage)
    pc = ckpt.get('positive_class')
    return Loaded(model, ckpt, classes, classes.index(pc) if pc in classes else None, preprocessing(cfg, ckpt),
                  ckpt.get('threshold', cfg.threshold))


def checkpoint_probabilities(loaded, photos, cfg, desc):
    """Class probabilities of the photos by a loaded checkpoint, computed as its training computed them, or
    by an exported ONNX file, run by onnxruntime on the CPU: the same loop, another model."""
    if loaded.session is not None:
        return score_photos(onnx_classifier(loaded.session, loaded.pre), photos, cfg, torch.device('cpu'), loaded.pre,
                            desc)
    device = resolve_device(cfg.device)
    fn = classifier(loaded.model, device, scoring_precision(cfg, loaded, device), loaded.pre, qparams=loaded.qparams)
    return score_photos(fn, photos, cfg, device, loaded.pre, desc)


def explained_qparams(cfg, loaded):
    """The int8 activation ranges Grad-CAM follows: the checkpoint's, when predict scores it in int8."""
    device = resolve_device(cfg.device)
    return loaded.qparams if scoring_precision(cfg, loaded, device) == 'int8' else None


def load_model(path, cfg):
    """What predict and evaluate score with: a checkpoint, or an ONNX file that `export` wrote."""
    return load_onnx(path, cfg) if str(path).lower().endswith('.onnx') else load_checkpoint(path, cfg)


def bare_state_dict_checkpoint(state, path, cfg):
    """A bare state_dict (the original script saved one) is usable when the class names can be had
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


def safe_torch_load(path, what='checkpoint'):
    """torch.load that never executes code from the file, with one-line errors for what goes wrong."""
    if not os.path.exists(path):
        raise UserError(f'{what} {path} does not exist' + (
            '; train one with `python monkeypox.py train` or pass --checkpoint FILE' if what == 'checkpoint' else ''))
    if os.path.isdir(path):
        raise UserError(f'{what} {path} is a folder; pass the file inside it')
    if os.path.getsize(path) == 0:
        raise UserError(f'{what} {path} is empty (0 bytes); copy it again or retrain')
    try:
        try:
            return torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        except RuntimeError as e:
            if 'mmap' not in str(e) and 'zip' not in str(e):
                raise
            return torch.load(path, map_location='cpu', weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        raise UserError(f'{what} {path} holds Python objects beyond tensors and plain data, and is refused '
                        'unloaded (loading it could run code). Use a file written by this tool or by '
                        'torch.save(model.state_dict())') from e
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f'{what} {path} is truncated or corrupt ({first}); copy it again or retrain') from e


def write_class_map(classes, path):
    """class_dict.pk: {index: name}, pickled, as the original script wrote it."""
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
                        f'strings only ({e}); nothing in it was run') from e
    if not (isinstance(classes, dict) and classes and all(isinstance(k, int) for k in classes)
            and all(isinstance(v, str) for v in classes.values()) and sorted(classes) == list(range(len(classes)))):
        raise UserError(f'class map {path} is not an {{index: name}} dict with indices 0..n-1')
    return classes


def write_summary(history, path):
    def write(f):
        text = io.StringIO()
        w = csv.DictWriter(text, fieldnames=list(history[0]) if history else ['epoch'])
        w.writeheader()
        w.writerows(history)
        f.write(text.getvalue().encode())
    atomic_write(path, write)


# ================================================================================================
# ONNX: the model for runtimes outside PyTorch (onnxruntime on servers, phones and in browsers)

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


def onnx_graph(loaded, opset, onnx):
    """torch.onnx.export of the model and a softmax on normalised fp32 images, batch size free, weights inside
    the one file (this torch writes them beside it by default: a single file is what atomic writing, the
    checksum and the truncation checks need)."""
    net = nn.Sequential(loaded.model.float().eval(), nn.Softmax(1))
    size = loaded.pre['image_size']
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter('ignore')
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):  # the exporter's chatter
            torch.onnx.export(net, (torch.zeros(2, 3, size, size),), os.path.join(tmp, 'model.onnx'),
                              input_names=['image'], output_names=['probabilities'], opset_version=opset,
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
                'output': 'probabilities: [batch, classes], in the order of classes',
                'decode': 'JPEG decoded by Pillow in draft mode at the smallest 1/2, 1/4 or 1/8 scale keeping both '
                          'sides >= resize (Image.draft("RGB", (resize, resize))); EXIF rotation applied; RGB',
                'resize_how': 'shorter side to resize, bilinear with antialiasing (torchvision Resize on a PIL image)',
                'crop': 'centre crop of image_size x image_size'}),
            'checkpoint_sha256': sha256_file(checkpoint), 'torch': str(torch.__version__),
            'torchvision': torchvision.__version__, 'temperature': repr((loaded.ckpt.get('head') or {}).get(
                'temperature', 1.0)), 'head_trained_on': f'{loaded.ckpt.get("precision") or "fp32"} features',
            'not_a_diagnosis': NOT_A_DIAGNOSIS}


def onnx_parity(loaded, session, cfg):
    """The largest difference between onnxruntime's and PyTorch's fp32 probabilities, and on what: the --check
    photos, else the checkpoint's validation photos still on disk, else synthetic crops. For a checkpoint
    trained on bf16 or int8 features, also the largest difference from the probabilities predict computes."""
    split = loaded.ckpt.get('split') or {}
    paths = cfg.check or [p for p in (os.path.join(split.get('root', ''), r) for r in split.get('val', [])[:16])
                          if os.path.isfile(p)]
    cpu, own = torch.device('cpu'), loaded.ckpt.get('precision')
    ort = onnx_classifier(session, loaded.pre)
    torch_runs = [classifier(loaded.model, cpu, 'fp32', loaded.pre)]
    if own == 'bf16' or (own == 'int8' and loaded.qparams and int8_engine()):
        torch_runs.append(classifier(loaded.model, cpu, own, loaded.pre, qparams=loaded.qparams))

    def gap(x):  # the runtimes on the same crops, decoded once
        p = ort(x)
        return torch.stack([(fn(x) - p).abs().amax(1) for fn in torch_runs], 1)
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
    return worst[0], what, worst[1] if len(worst) > 1 else None


def onnx_classifier(session, pre):
    """A batch of uint8 crops -> probabilities, by onnxruntime: the loop's model, from another runtime."""
    return lambda x: torch.from_numpy(session.run(None, {'image': normalize(x, pre).contiguous().numpy()})[0])


def load_onnx(path, cfg):
    """An ONNX file that `export` wrote, for predict and evaluate: an onnxruntime session on the CPU, with the
    classes, threshold and preprocessing its metadata carries."""
    if getattr(cfg, 'explain', False):
        raise UserError('--explain draws Grad-CAM, which needs the PyTorch checkpoint: pass it as --checkpoint')
    refused = [f'--precision {cfg.precision}'] if cfg.precision in ('bf16', 'int8') else []
    refused += [f'--device {cfg.device}'] if cfg.device not in ('auto', 'cpu') else []
    refused += ['torchrun'] if RANKS.world > 1 else []
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
        first = str(e).strip().splitlines()[0][:150] if str(e).strip() else type(e).__name__
        raise UserError(f'{path} is not a readable ONNX file ({first}): truncated or not ONNX; export it again') from e
    meta = {p.key: p.value for p in model.metadata_props}
    if meta.get('monkeypox.format') != ONNX_FORMAT:
        raise UserError(f'{path} is an ONNX model without this tool\'s metadata (classes, threshold, preprocessing); '
                        'export the checkpoint with `python monkeypox.py export`')
    classes, pre = json.loads(meta['classes']), json.loads(meta['preprocess'])
    session = ort.InferenceSession(model.SerializeToString(), providers=['CPUExecutionProvider'])
    return Loaded(None, {'arch': meta['arch'], 'epoch': None, 'precision': 'fp32'}, classes,
                  classes.index(meta['positive_class']) if meta['positive_class'] in classes else None,
                  {k: pre[k] for k in ('image_size', 'resize', 'mean', 'std')}, float(meta['threshold']), session)


# ================================================================================================
# Plots

def new_figure(figsize, rows=1, cols=1, window=False):
    """A matplotlib figure and its axes grid: through pyplot only for a window; a file needs no GUI
    backend, and skipping pyplot's import saves a fifth of a second on every run."""
    if window:
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(rows, cols, figsize=figsize, squeeze=False)
    else:
        from matplotlib.figure import Figure
        fig = Figure(figsize=figsize)
        axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def save_figure(fig, path):
    atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=100))
    return path


def plot_predictions(results, loaded, cfg):
    """The photos as a person sees them (not the normalised tensor), with the answer in the title; with
    --explain, beside each the crop the model saw with its Grad-CAM heat map of the predicted class."""
    shown, per = results[:16 if not cfg.explain else 4], 2 if cfg.explain else 1
    display = sys.platform in ('darwin', 'win32') or os.environ.get('DISPLAY') or os.environ.get('WAYLAND_DISPLAY')
    window = not cfg.plot and bool(display)
    path = cfg.plot or os.path.join(os.path.dirname(os.path.abspath(cfg.checkpoint)), 'prediction.png')
    cols = min(4 // per, len(shown)) * per
    rows = math.ceil(len(shown) * per / cols)
    fig, axes = new_figure((4 * cols, 4.4 * rows), rows, cols, window)
    for ax in axes.flat:
        ax.axis('off')
    explain = grad_cam(loaded.model, loaded.pre, explained_qparams(cfg, loaded)) if cfg.explain else None
    for k, r in enumerate(shown):
        ax = axes.flat[k * per]
        ax.imshow(load_rgb(r['path']))
        ax.set_title(f'{r["label"]} ({r["probability"]:.0%})\n{os.path.basename(r["path"])}', fontsize=10)
        if cfg.explain:
            crop, heat = explain(r['path'], loaded.classes.index(r['label']))
            ax = axes.flat[k * per + 1]
            ax.imshow(crop)
            ax.imshow(heat, cmap='jet', alpha=0.45, extent=(-0.5, crop.shape[1] - 0.5, crop.shape[0] - 0.5, -0.5))
            ax.set_title(f'Grad-CAM: {r["label"]}\n(centre crop the model saw)', fontsize=10)
    fig.text(0.5, 0.0, 'monkeypox.py: a research tool, not a diagnosis', ha='center', fontsize=8)
    if window:
        import matplotlib.pyplot as plt
        plt.show()
    else:
        say(f'plot: {save_figure(fig, path)}')
    return path


def plot_curves(history, head, path):
    """curves.png: how the head's weight decay was chosen (inner-cv log loss against lambda, the choice
    marked), then training and validation loss and accuracy per epoch wherever epochs ran (fine-tuning)."""
    epochs = len(history) > 1
    fig, axes = new_figure((5 * (1 + 2 * epochs), 4), 1, 1 + 2 * epochs)
    ax, search = axes[0, 0], head.get('search')
    if search:
        ax.errorbar(search['grid'], search['loss'], yerr=search['se'], fmt='o-', capsize=3, label='out-of-fold')
        ax.axvline(search['choice'], color='red', ls='--', label=f'chosen: {search["choice"]:g}')
        ax.set_xlim(search['grid'][0] / 2, search['grid'][-1] * 2)  # the whole grid, its ends included
        ax.set(xscale='log', xlabel='weight decay (lambda)', ylabel='log loss',
               title=f'head: {search["folds"]} inner folds by patient')
        ax.legend()
    else:
        ax.text(0.5, 0.5, f'weight decay {head.get("weight_decay", float("nan")):g}\n(given, not searched)',
                ha='center', va='center', transform=ax.transAxes)
        ax.set(title='head', xticks=[], yticks=[])
    ax.grid(alpha=0.3)
    x = list(range(len(history)))  # 0: the head, then the fine-tuning epochs
    for ax, key, name in zip(axes[0, 1:], ('loss', 'accuracy'), ('cross-entropy loss', 'accuracy')):
        ax.plot(x, [r[f'train_{key}'] for r in history], 'o-', label='train')
        ax.plot(x, [r[f'val_{key}'] for r in history], 's-', label='validation')
        if key == 'accuracy':
            ax.plot(x, [r['val_balanced_accuracy'] for r in history], '^--', label='validation, balanced')
        ax.set(xlabel='fine-tuning epoch (0: the head alone)', title=name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def plot_calibration(m, path, title):
    """calibration.png: the reliability diagram of P(screened class): observed share against mean predicted
    probability per bin (marker area: photos in it), the diagonal being perfect calibration."""
    fig, ((ax,),) = new_figure((5, 5))
    cells = [c for c in m['bins'] if c[0]]
    ax.plot([0, 1], [0, 1], color='grey', lw=0.8, ls='--', label='perfectly calibrated')
    ax.plot([c[1] for c in cells], [c[2] for c in cells], 'o-', label=f'ECE {m["ece"]:.3f}')
    ax.scatter([c[1] for c in cells], [c[2] for c in cells], s=[12 * c[0] ** 0.8 for c in cells], alpha=0.4)
    ax.set(xlabel=f'mean predicted P({m["positive_class"]})', ylabel='observed share', xlim=(0, 1), ylim=(0, 1))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc='upper left')
    fig.tight_layout()
    return save_figure(fig, path)


def plot_confusion(cm, classes, path, title):
    """confusion.png: counts and row percentages, true class down, predicted class across."""
    fig, ((ax,),) = new_figure((5.5, 4.5))
    rows = np.array(cm, dtype=float)
    share = rows / np.maximum(rows.sum(1, keepdims=True), 1)
    ax.imshow(share, cmap='Blues', vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f'{int(rows[i, j])}\n{share[i, j]:.0%}', ha='center', va='center',
                    color='white' if share[i, j] > 0.6 else 'black', fontsize=12)
    ax.set(xticks=range(len(classes)), xticklabels=classes, yticks=range(len(classes)), yticklabels=classes,
           xlabel='predicted', ylabel='true')
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_roc(y_pos, scores, path, title, positive_name, operating=None):
    """roc.png: the ROC curve of the screened class, AUC in the legend, and the operating point of
    `operating` (the metrics evaluate reports) marked."""
    fig, ((ax,),) = new_figure((5, 5))
    fpr, tpr, _ = roc_curve(y_pos, scores)
    ax.plot(fpr, tpr, lw=2, label=f'ROC, AUC {roc_auc(y_pos, scores):.3f}')
    ax.plot([0, 1], [0, 1], color='grey', lw=0.8, ls='--', label='chance')
    if operating is not None:
        ax.plot(1 - operating['specificity'], operating['sensitivity'], 'o', color='red', ms=9,
                label=f'operating point, threshold {operating["threshold"]:.2f}')
    ax.set(xlabel='1 - specificity (false positive rate)', ylabel=f'sensitivity for {positive_name}',
           xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc='lower right')
    fig.tight_layout()
    return save_figure(fig, path)


def plot_sheet(rows, classes, path, pre, most=24):
    """sheet.png: photos with true and predicted class, mistakes framed in red, worst mistakes first."""
    rows = sorted(rows, key=lambda r: (r['true'] == r['pred'], -r['probs'][r['pred']] if r['true'] != r['pred']
                                       else r['probs'][r['pred']]))[:most]
    cols = 6
    nrows = max(1, math.ceil(len(rows) / cols))
    fig, axes = new_figure((2.2 * cols, 2.6 * nrows), nrows, cols)
    for ax in axes.flat:
        ax.axis('off')
    for ax, r in zip(axes.flat, rows):
        ax.imshow(load_rgb(r['path'], draft=pre['resize']))
        wrong = r['true'] != r['pred']
        ax.set_title(f'true {classes[r["true"]]}\npred {classes[r["pred"]]} {r["probs"][r["pred"]]:.0%}',
                     fontsize=7, color='red' if wrong else 'black')
        if wrong:
            ax.axis('on')
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor('red')
                spine.set_linewidth(4)
    fig.tight_layout()
    return save_figure(fig, path)


def grad_cam(model, pre, qparams=None):
    """Grad-CAM (Selvaraju et al. 2017) on the last convolutional stage, through torch hooks: its activations
    weighted by their mean gradient of the class's log-probability (not its raw score, so evidence shared by
    all classes cancels). The map is the mean of those of the crop and its three flips, flipped back:
    stride-2 convolutions with padding 1 shift each feature cell half a cell up and left of where upsampling
    puts it, and the flips cancel that. Bicubic upsampling lets the maximum fall between cells (bilinear
    pins it to a cell centre). On red-disc photos the maximum falls inside the disc on 40/40 photos, 27/40
    without the two (tests/). A checkpoint trained on int8 features (`qparams`) is explained through its
    int8 network, emulated with gradients (int8_emulation): the fp32 network is not the one its head was
    trained on (on those photos, with a MobileNetV2: 19/20 so, 8/20 through the fp32 network).
    Returns explain(path, class index) -> (the centre crop the model saw, a [0, 1] map), the network built once."""
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

    def explain(path, target):
        saved = {}

        def hook(_, __, out):  # the last call wins: a module called twice (ResNet's relu) ends with the stage
            # The stage's output, cut from the frozen backbone before it as a leaf that takes gradients: the
            # backward pass runs through the pooling and the head only (3x faster than to the input)
            out = saved['act'] = out.detach().requires_grad_(True)
            out.register_hook(lambda g: saved.__setitem__('grad', g))
            return out

        crop = T.Compose([T.Resize(pre['resize']), T.CenterCrop(pre['image_size'])])(load_rgb(path))
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


# ================================================================================================
# Download: the public MSLD photos

def fetch(url, path, fix):
    """Download url (http, https, file, or a local path) to path, with a progress bar and a timeout."""
    import urllib.error
    import urllib.request
    if os.path.exists(url):
        url = Path(url).resolve().as_uri()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(path, 'wb') as f:
            total = int(response.headers.get('Content-Length') or 0) or None
            with tqdm(total=total, unit='B', unit_scale=True, desc='download', disable=None, leave=False) as bar:
                for chunk in iter(lambda: response.read(1 << 16), b''):
                    f.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, 'reason', None) or e
        raise UserError(f'cannot download {url}: {reason}. Check the network, or {fix}') from e


def safe_member(name):
    """An archive member's path as parts, refusing any that would land outside the destination."""
    name = name.replace('\\', '/')
    parts = [p for p in name.split('/') if p not in ('', '.')]
    if name.startswith('/') or re.match(r'^[A-Za-z]:', name) or '..' in parts:
        raise UserError(f'archive member {name!r} would be written outside the destination; refusing the archive')
    return parts


def extract_rar(archive, out):
    """Images of a RAR archive as out/<class folder>/<file>, every member name checked first."""
    try:
        from unrar.cffi import rarfile
    except ImportError as e:
        raise UserError('`download` reads RAR archives with unrar2-cffi: pip install -r requirements.txt') from e
    try:
        rar = rarfile.RarFile(str(archive))
        members = [(info, safe_member(info.filename)) for info in rar.infolist()]
        for info, parts in members:
            if info.is_dir() or not is_image_file(parts[-1]) or len(parts) < 2:
                continue
            target = Path(out, parts[-2], parts[-1])
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(rar.read(info))
    except UserError:
        raise
    except Exception as e:
        raise UserError(f'{archive}: cannot read the RAR archive ({e})') from e


def layout_dataset(src, out, cfg):
    """train/ val/ test/ by patient and class (test: TEST_FRACTION, val: VAL_FRACTION of all photos), a copy
    of one test photo as test/test.jpg (TEST_IMAGE), SPLIT.csv and the dataset's license and citation."""
    classes, photos = read_photos(str(src))
    rest, test = grouped_split(photos, cfg.test_fraction, cfg.seed)
    train, val = grouped_split(rest, cfg.val_fraction / (1 - cfg.test_fraction), cfg.seed)
    rows = []
    for name, part in (('train', train), ('val', val), ('test', test)):
        for p in part:
            rel = Path(name, classes[p.label], os.path.basename(p.path))
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p.path, out / rel)
            rows.append({'path': rel.as_posix(), 'class': classes[p.label], 'split': name,
                         'patient': '/'.join(group_key(p.path)), 'sha256': p.sha})
    shutil.copyfile(test[0].path, out / 'test' / 'test.jpg')
    with open(out / 'SPLIT.csv', 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out / 'LICENSE.txt').write_text(
        'Monkeypox Skin Lesion Dataset (MSLD), original images.\n'
        f'Source: {DATASET_URL}\nLicense: CC BY-NC 4.0 (non-commercial use, with attribution).\n'
        f'Cite: {DATASET_CITATION}\n'
        'The photos were collected by the authors from news portals, websites and case reports.\n'
        f'test/test.jpg is a copy of test/{classes[test[0].label]}/{os.path.basename(test[0].path)}.\n')


# ================================================================================================
# Files and processes: messages, atomic writes, and the ranks of a torchrun

class UserError(Exception):
    """Bad input or usage: reported in one line, exit code 2, no traceback."""


def say(*args, **kwargs):
    """Progress and reports: stdout, or stderr while stdout carries --json output."""
    if not say.muted:
        print(*args, **kwargs, file=sys.stderr if say.to_stderr else sys.stdout, flush=True)


say.to_stderr = say.muted = False


def warn(message):
    if is_main():
        print(f'warning: {message}', file=sys.stderr, flush=True)


@contextlib.contextmanager
def quiet():
    """Silence the per-epoch lines (cv trains many heads and prints one table)."""
    saved, say.muted = say.muted, True
    try:
        yield
    finally:
        say.muted = saved


def sha256_file(path, memo=None):
    """sha256 of a file's bytes; `memo` (dict) skips re-reading files whose size and mtime are unchanged."""
    st = os.stat(path)
    stamp, key = [st.st_size, st.st_mtime_ns], os.path.abspath(path)
    if memo is not None and memo.get(key, [None])[:2] == stamp:
        return memo[key][2]
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    if memo is not None:
        memo[key] = stamp + [h.hexdigest()]
    return h.hexdigest()


UMASK = os.umask(0o022)  # read it (the only way is to set it), then put it back
os.umask(UMASK)


def atomic_write(path, write):
    """Call write(file) on a temporary file beside `path`, then rename it over `path`: readers see
    the old file or the new one, never half of one, and a failed or interrupted write leaves no trace."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    except OSError as e:
        raise UserError(f'cannot write {path}: {e.strerror or e}; choose a writable folder (--out)') from e
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600; give the file what open() would have
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f'cannot write {path}: {e.strerror or e}; the previous file, if any, is unchanged. '
                        'Free some disk space or choose another folder (--out)') from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def torch_save(obj, path):
    """torch.save through atomic_write. Serialised in memory first: torch's zip writer reports a full
    disk as an obscure RuntimeError, a plain file write reports it as the OSError it is."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


RANKS = argparse.Namespace(rank=0, world=1, local=0)  # where this process stands under torchrun (0 of 1 without)


def is_main():
    return RANKS.rank == 0


def gather(obj):
    """Every rank's `obj`, in rank order ([obj] in a single process)."""
    if RANKS.world == 1:
        return [obj]
    out = [None] * RANKS.world
    dist.all_gather_object(out, obj)
    return out


def my_chunks(n, size):
    """This rank's share of range(n) in fixed chunks: chunk k is [k*size, (k+1)*size) and rank r takes chunks
    r, r+W, ...: every item is processed once, in a batch that is the same whatever the number of ranks."""
    chunks = [list(range(s, min(s + size, n))) for s in range(0, n, size)]
    return chunks[RANKS.rank::RANKS.world]


def init_distributed(cfg):
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on GPUs, gloo on CPUs), pin this rank
    to its local GPU, and let only rank 0 speak."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world <= 1:
        return
    if cfg.command == 'download':
        raise UserError('download runs in one process: use python monkeypox.py download, not torchrun')
    RANKS.rank, RANKS.world, RANKS.local = int(os.environ['RANK']), world, int(os.environ.get('LOCAL_RANK', '0'))
    cuda = cfg.device != 'cpu' and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(RANKS.local)
        cfg.device = f'cuda:{RANKS.local}'
    dist.init_process_group('nccl' if cuda else 'gloo', timeout=datetime.timedelta(seconds=cfg.dist_timeout))
    say.muted = not is_main()


def is_lost_peer(e):
    text = str(e).lower()
    return isinstance(e, dist.DistError) or any(w in text for w in ('gloo', 'nccl', 'connection', 'timed out',
                                                                      'timeout', 'peer'))


def stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # `kill` stops a run as Ctrl-C does: what is done is saved, nothing is half-written


@contextlib.contextmanager
def process_state():
    """What main() changes in its process, put back when it returns: the SIGTERM handler, the message
    switches, the torchrun ranks and the global random generators (so that main can run many times in
    one process, as the tests run it)."""
    saved = (signal.getsignal(signal.SIGTERM), say.muted, say.to_stderr, dict(vars(RANKS)),
             torch.random.get_rng_state(), random.getstate(), np.random.get_state())
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        signal.signal(signal.SIGTERM, saved[0])
        say.muted, say.to_stderr = saved[1], saved[2]
        vars(RANKS).update(saved[3])
        torch.random.set_rng_state(saved[4])
        random.setstate(saved[5])
        np.random.set_state(saved[6])


# ================================================================================================
# CLI and main

def checked(convert, ok, requirement, name):
    """An argparse type: `convert` the text, then refuse values that fail `ok`, saying what is needed."""
    def parse(text):
        v = convert(text)
        if not ok(v):
            raise argparse.ArgumentTypeError(f'{requirement}, not {text}')
        return v
    parse.__name__ = name  # argparse names it in "invalid <name> value"
    return parse


positive_int = checked(int, lambda v: v > 0, 'must be a positive integer', 'positive integer')
non_negative_int = checked(int, lambda v: v >= 0, 'must be 0 or more', 'integer')
worker_count = checked(int, lambda v: v >= -1, 'must be -1 (auto) or more', 'integer')
positive_float = checked(float, lambda v: v > 0 and not math.isinf(v), 'must be a positive number', 'number')
open_fraction = checked(float, lambda v: 0 < v < 1, 'must be between 0 and 1 (exclusive)', 'fraction')
probability = checked(float, lambda v: 0 <= v <= 1, 'must be between 0 and 1', 'probability')
fraction = checked(float, lambda v: 0 <= v < 1, 'must be 0 or more and below 1', 'fraction')
weight_decay = checked(lambda t: t if t == 'auto' else float(t), lambda v: v == 'auto' or 0 <= v < math.inf,
                       "must be 'auto' or a number of 0 or more", 'weight decay')
fold_count = checked(int, lambda v: v >= 2, 'needs at least 2 folds', 'fold count')
arch_name = checked(str, lambda v: v in torchvision.models.list_models(module=torchvision.models),
                    'must be a torchvision classification model (resnet101, resnet18, mobilenet_v2, ...)', 'model')
device_name = checked(str, lambda v: v in ('auto', 'cpu', 'cuda') or re.fullmatch(r'cuda:\d+', v),
                      'choose auto, cpu, cuda or cuda:N', 'device')


SETTING_FLAGS = {'IMAGE_PATH': 'data', 'SAVE_PATH': 'checkpoint', 'CACHE_DIR': 'cache'}  # else name.lower()
SETTABLE = ('MODEL_PATH', 'TEST_FRACTION', 'CALIBRATION_PHOTOS', 'IMAGE_SIZE', 'RESIZE', 'MEAN', 'STD', 'DIST_TIMEOUT',
            'CHECKPOINT_SECONDS')


def setting(name):
    """The cfg entry of a setting: its flag's name (IMAGE_PATH is --data), else its name in lower case."""
    return SETTING_FLAGS.get(name, name.lower())


def build_parser():
    """The parser of every command, its defaults the settings at the top of this file as they are now."""
    d = {setting(name): globals()[name] for name in SETTINGS}

    def flag(parser, name, kind, help, **kw):  # a flag whose default is the setting it is named after
        dest = kw.setdefault('dest', name[2:].replace('-', '_'))
        parser.add_argument(name, type=kind, default=kw.pop('default', d.get(dest)), help=help,
                            metavar=kw.pop('metavar', METAVARS.get(kind, 'X')), **kw)

    general = argparse.ArgumentParser(add_help=False)  # every command, download included
    general.add_argument('--debug', action='store_true', help='show tracebacks (or set MONKEYPOX_DEBUG=1)')
    general.add_argument('--set', metavar='NAME=VALUE', action='append', default=[],
                         help=f'override a setting without a flag of its own: {", ".join(SETTABLE)}')
    common = argparse.ArgumentParser(add_help=False, parents=[general])  # every command that runs a model
    flag(common, '--device', device_name, 'auto, cpu, cuda or cuda:N')
    common.add_argument('--precision', choices=('auto', 'fp32', 'bf16', 'int8'), default=d['precision'],
                        help='backbone arithmetic; auto = a frozen CNN backbone in int8 on x86 CPUs when the crops '
                             'repay its calibration (200 crops, 300 on CPUs fast at bf16), else bf16 where the '
                             'hardware is fast at it, else fp32')
    flag(common, '--workers', worker_count, 'image decoding processes (-1: auto)')
    flag(common, '--extract-batch-size', positive_int, 'crops per backbone pass')
    common.add_argument('--compile', choices=('auto', 'always', 'never'), default=d['compile'],
                        help='torch.compile the backbone for extraction (auto: when enough crops make it pay)')

    training = argparse.ArgumentParser(add_help=False)
    flag(training, '--data', str, 'class folders, or train/ + val/ folders')
    flag(training, '--weight-decay', weight_decay, "the head's L2 penalty, or auto (grouped inner cross-validation)",
         metavar='L')
    flag(training, '--epochs', positive_int, 'fine-tuning epochs (with --unfreeze)')
    flag(training, '--finetune-epochs', positive_int, argparse.SUPPRESS, dest='epochs')  # its name until 2026-11
    flag(training, '--lr', positive_float, 'Adam learning rate of the head while fine-tuning')
    flag(training, '--batch-size', positive_int, 'photos per fine-tuning step')
    flag(training, '--arch', arch_name, 'torchvision model name')
    flag(training, '--weights', str, 'auto, a torchvision weights name (DEFAULT, IMAGENET1K_V1, ...), a file, or none',
         metavar='W')
    flag(training, '--seed', int, 'split, initialisation and shuffling')
    flag(training, '--val-fraction', fraction, 'validation share of a flat dataset, whole patients at a time (0: none)')
    flag(training, '--crop-scale', open_fraction, 'smallest share of the photo a training crop keeps')
    flag(training, '--views', positive_int, 'random training crops per photo')
    flag(training, '--out', str, 'folder for checkpoint, class map, summary, curves and cache',
         default=os.path.dirname(d['checkpoint']) or '.')
    flag(training, '--cache', str, 'feature cache folder; empty means OUT/cache')
    flag(training, '--archive-url', str, 'the MSLD archive, fetched when IMAGE_PATH is missing or empty (URL or file)',
         metavar='URL')
    training.add_argument('--no-download', dest='auto_download', action='store_false', default=d['auto_download'],
                          help='never download the public photos into a missing IMAGE_PATH')
    training.add_argument('--no-cache', action='store_true', help='keep features in memory only')
    flag(training, '--positive-class', str, 'class screened for', metavar='NAME')
    flag(training, '--threshold', probability, 'P(positive class) at or above which a photo is called positive')
    flag(training, '--target-sensitivity', probability, 'if > 0: highest threshold reaching this validation sensitivity')
    flag(training, '--unfreeze', non_negative_int, 'also fine-tune the last N backbone stages after the head')
    flag(training, '--backbone-lr', positive_float, 'Adam learning rate of the unfrozen stages')
    training.add_argument('--resume', action='store_true', help='continue an interrupted run in --out')
    training.add_argument('--no-plot', action='store_true', help='write no pictures')

    checkpoint = argparse.ArgumentParser(add_help=False)
    flag(checkpoint, '--checkpoint', str, 'checkpoint written by train', metavar='FILE')
    flag(checkpoint, '--threshold', probability, 'override the checkpoint\'s operating threshold',
         dest='override_threshold', default=None)
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument('--json', action='store_true', help='print JSON')

    parser = argparse.ArgumentParser(prog='monkeypox.py', description=__doc__.split('\n\n')[0] + ' ' +
                                     NOT_A_DIAGNOSIS, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog='With no command: train, then predict --test-image (the original '
                                     'script\'s flow); `python monkeypox.py run --help` lists its flags.')
    sub = parser.add_subparsers(dest='command', metavar='command')
    parser.commands = {}

    def command(name, parents, help):
        parser.commands[name] = sub.add_parser(name, parents=parents, help=help,
                                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        return parser.commands[name]
    p = command('run', [training, common], 'train, then predict and show TEST_IMAGE (the default)')
    flag(p, '--test-image', str, 'photo predicted after training', metavar='FILE')
    command('train', [training, common], 'train a classifier')
    p = command('evaluate', [checkpoint, common, output], 'metrics on photos the model never saw')
    flag(p, '--data', str, 'dataset or folder of class folders to evaluate on')
    p.add_argument('--all', action='store_true', help='every photo of --data, even those trained on')
    flag(p, '--out', str, 'folder for the pictures (default: the checkpoint\'s)', default='')
    p.add_argument('--sheet', action='store_true', help='also write sheet.png: photos, mistakes first')
    p.add_argument('--no-plot', action='store_true', help='write no pictures (confusion.png, roc.png)')
    p = command('predict', [checkpoint, common, output], 'classify photos')
    p.add_argument('paths', nargs='+', metavar='PATH', help='image files or folders')
    g = p.add_mutually_exclusive_group()
    flag(g, '--plot', str, 'save the plot to FILE (PNG)', default='', metavar='FILE')
    g.add_argument('--no-plot', action='store_true', help='no plot')
    p.add_argument('--explain', action='store_true', help='add a Grad-CAM heat map of the predicted class')
    p = command('download', [general], 'fetch the public MSLD photos (CC BY-NC)')
    flag(p, '--dest', str, 'folder to create (train/ val/ test/)', default=d['data'])
    flag(p, '--url', str, 'where the authors\' archive is (URL or file)', default=d['archive_url'], metavar='URL')
    p.add_argument('--force', action='store_true', help='replace a non-empty --dest')
    flag(p, '--seed', int, 'the patient-grouped split')
    p = command('export', [general], 'the model as one ONNX file, for runtimes outside PyTorch')
    flag(p, '--checkpoint', str, 'checkpoint written by train', metavar='FILE')
    flag(p, '--out', str, 'the .onnx file (empty: the checkpoint\'s path, ending .onnx)', default='', metavar='FILE')
    flag(p, '--opset', positive_int, 'ONNX opset', default=18)
    p.add_argument('--check', nargs='+', metavar='PHOTO', default=[],
                   help='photos to compare onnxruntime with PyTorch on (none: the checkpoint\'s validation photos)')
    p = command('cv', [training, common, output], 'cross-validation by patient: the accuracy to quote')
    flag(p, '--folds', fold_count, 'folds, whole patients at a time')
    return parser, d


METAVARS = {str: 'DIR', int: 'N', positive_int: 'N', non_negative_int: 'N', worker_count: 'N', fold_count: 'K',
            positive_float: 'X', open_fraction: 'F', fraction: 'F', probability: 'P', arch_name: 'NAME',
            device_name: 'DEV'}


def parse_args(argv):
    """The settings of one run: the flags given, over the settings at the top of this file. Every setting is
    an entry of the result (`cfg`), also those this command has no flag for; --set writes there too."""
    parser, defaults = build_parser()
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ('-h', '--help')):
        argv = ['run'] + list(argv)  # `python monkeypox.py [flags]` is the original script's flow
    cfg = parser.parse_args(argv)
    for key, value in defaults.items():
        if not hasattr(cfg, key):
            setattr(cfg, key, value)
    command_parser = parser.commands[cfg.command]
    apply_settings(cfg, command_parser)
    if getattr(cfg, 'device', 'cpu').startswith('cuda') and not torch.cuda.is_available():
        command_parser.error(f'--device {cfg.device}: no CUDA GPU is available here; use --device cpu or auto')
    if getattr(cfg, 'precision', '') == 'int8':
        if cfg.unfreeze or resolve_device(cfg.device).type != 'cpu' or not int8_engine():
            command_parser.error('--precision int8: for a frozen backbone on an x86 CPU (its int8 kernels); '
                                 'drop --unfreeze or --device cuda, or use --precision fp32')
    if cfg.calibration_photos < 1:
        command_parser.error(f'--set CALIBRATION_PHOTOS={cfg.calibration_photos}: must be at least 1')
    if cfg.command in ('run', 'train', 'cv'):
        cfg.cache = '' if cfg.no_cache else (cfg.cache or os.path.join(cfg.out, 'cache'))
        cfg.checkpoint = os.path.join(cfg.out, os.path.basename(cfg.checkpoint))
        # IMAGE_PATH, as shipped or edited or named by --data, is the one folder the photos may be downloaded into
        cfg.download_missing = cfg.auto_download and os.path.abspath(cfg.data) == os.path.abspath(defaults['data'])
        if cfg.weights == 'auto':  # MODEL_PATH holds weights for ARCH: used for that architecture only
            cfg.weights = cfg.model_path if cfg.arch == defaults['arch'] and os.path.isfile(cfg.model_path) else 'DEFAULT'
    return cfg


def apply_settings(cfg, parser):
    """--set NAME=VALUE into cfg, for the settings that have no flag, type-checked against their defaults
    (nanoGPT's configurator, restricted to the names in SETTABLE)."""
    for pair in cfg.set:
        name, equals, text = pair.partition('=')
        if name not in SETTABLE or not equals:
            parser.error(f'--set {pair}: expected NAME=VALUE with NAME one of {", ".join(SETTABLE)}; '
                         'the other settings have flags of their own')
        current = getattr(cfg, setting(name))
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare string, such as a path
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        if type(value) is not type(current) or (isinstance(current, tuple) and len(value) != len(current)):
            parser.error(f'--set {name}={text}: must be like {current!r}')
        setattr(cfg, setting(name), value)


COMMANDS = {'run': run_default, 'train': train, 'evaluate': evaluate, 'predict': predict, 'cv': cv,
            'download': download, 'export': export}


def main(argv=None):
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    debug, who = cfg.debug or os.environ.get('MONKEYPOX_DEBUG') == '1', ''
    with process_state():
        say.to_stderr = getattr(cfg, 'json', False)
        try:
            init_distributed(cfg)
            who = f' (rank {RANKS.rank})' if RANKS.world > 1 else ''
            COMMANDS[cfg.command](cfg)
        except UserError as e:
            if debug:
                traceback.print_exc()
            print(f'monkeypox.py{who}: error: {e}', file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f'monkeypox.py{who}: stopped', file=sys.stderr)
            return 130
        except BrokenPipeError:  # `... | head` closed stdout: stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
        except (dist.DistError, RuntimeError) as e:
            if RANKS.world == 1 or not is_lost_peer(e):
                raise
            if debug:
                traceback.print_exc()
            print(f'monkeypox.py{who}: error: lost contact with the other ranks ({str(e).strip().splitlines()[0][:200]}); '
                  'one of them died or stalled: see its log. Files written so far are complete', file=sys.stderr)
            return 1
    return 0


def leave(code):
    """Exit without Python's teardown of torch's modules, which took 1.6 s on 2 cores and does nothing a
    finished run needs: every file was written whole and closed, and the ranks were taken down."""
    with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more can be said anyway
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


if __name__ == '__main__':
    leave(main())
