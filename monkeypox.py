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
    python monkeypox.py serve               # a web page and a JSON API on the model, at http://127.0.0.1:8000/

Each command below is a short story; the machinery it calls lives in the package mpox/ beside this file,
one module per concern: data (photos, patients, splits), images (decoding, crops), model (backbones and
weights), devices, precision and int8 (the backbone's arithmetic), inference (the one scoring loop),
features (extraction and its cache), fidelity (which arithmetic is faithful), head (the penalised
regression), training (a run: head, fine-tuning, best epoch), metrics, checkpoint, onnxfile, plots,
gradcam, download, pipeline (the steps commands share), serve (the web page and API), files and system
(messages, errors, ranks).
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
PATIENTS = 'auto'           # --patients: auto (from file names, checked), none, re:REGEX, or a CSV file (path,patient)
NEAR_DUPLICATES = 'on'      # --near-duplicates: copies of a photo (turned, cropped, recoloured, renamed) join its patient

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
OOD_COVERAGE = 0.95         # --ood-coverage: share of photos like the training photos that pass the out-of-distribution check
PREVALENCE = 0.0            # --prevalence: share of the screened class where the photos come from, for PPV/NPV (0: none)

# System
DEVICE = 'auto'             # --device: cuda when present, else cpu
PRECISION = 'auto'          # --precision: auto = the fastest of int8, bf16, fp32 that answers as fp32 does (docs)
CALIBRATION_PHOTOS = 16     # --set: int8: training photos (the first by sha256) whose crops set the activation ranges
WORKERS = -1                # --workers: image decoding processes beside the backbone pass (-1: auto, see decode_workers)
EXTRACT_BATCH_SIZE = 16     # --extract-batch-size: crops per backbone pass (docs/speed.md)
COMPILE = 'auto'            # --compile: torch.compile the backbone for extraction: auto (when it pays), always, never
DIST_TIMEOUT = 300          # --dist-timeout: seconds a torchrun rank waits for the others before failing (a rank died)
CHECKPOINT_SECONDS = 5.0    # --checkpoint-seconds: a better epoch is written at once, but at most this often

# Serving (`serve`: the web page and JSON API)
HOST = '127.0.0.1'          # --host: the address served; another lets other machines in, and the page has no login
PORT = 8000                 # --port: the TCP port served (0: any free one, printed)
MAX_UPLOAD_MB = 20          # --max-upload-mb: a larger upload is refused (413) before it is read

# Preprocessing (ImageNet's, which the pretrained backbones expect)
IMAGE_SIZE = 224            # --set: side of the square crop the backbone sees
RESIZE = 256                # --set: evaluation resizes the short side to this, then centre-crops IMAGE_SIZE
MEAN = (0.485, 0.456, 0.406)  # --set: per-channel mean of the normalisation
STD = (0.229, 0.224, 0.225)   # --set: per-channel standard deviation of the normalisation

SETTINGS = [name for name in globals() if name.isupper()]  # the names above, in order: each is an entry of cfg

import argparse
import ast
import contextlib
import json
import math
import os
import re
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torchvision

from mpox.checkpoint import checkpoint_meta, load_checkpoint, read_resume
from mpox.data import Photo, collect_images, evaluation_photos, grouped_folds, grouped_split
from mpox.devices import int8_engine, resolve_device
from mpox.download import download_dataset
from mpox.fidelity import FIDELITY_LIMITS
from mpox.files import atomic_write
from mpox.head import on_grid_edge
from mpox.images import report_skipped
from mpox.int8 import calibration_patients
from mpox.metrics import aggregate, calibration, decide, metrics, operating_threshold, print_cv, print_metrics
from mpox.model import freeze, new_head
from mpox.onnxfile import OOD_PARITY, onnx_graph, onnx_metadata, onnx_modules, onnx_parity
from mpox.ood import predictive_values
from mpox.patients import training_copies, write_folds
from mpox.pipeline import (answer, answer_line, check_prevalence, checkpoint_probabilities, cv_prevalences, load_model,
                           ood_report, prepare, report)
from mpox.plots import plot_curves, plot_predictions, plot_sheet
from mpox.serve import Scorer, listen, serve_forever
from mpox.system import (NOT_A_DIAGNOSIS, UserError, first_line, init_distributed, is_lost_peer, is_main,
                         messages_to_stderr, process_state, quiet, say, warn)
from mpox.training import Run, fit


# ================================================================================================
# Commands: what `python monkeypox.py [command]` does, each as a short story

def run_default(cfg):
    """No command: train, then predict TEST_IMAGE (or a held-out validation photo) and show it."""
    checkpoint, split = train(cfg)
    image = cfg.test_image
    if not os.path.isfile(image):
        if not split.val:
            say(f'{image} does not exist and there are no validation photos to show instead')
            return
        image = split.val[0].path
        say(f'{cfg.test_image} does not exist: predicting the held-out validation photo {image} instead')
    shown = parse_args(['predict', image, '--checkpoint', checkpoint])
    for key, value in vars(cfg).items():  # every setting and flag the two commands share: this run's
        if hasattr(shown, key) and key not in ('command', 'checkpoint'):
            setattr(shown, key, value)
    predict(shown)


def train(cfg):
    """Every training photo goes through the frozen backbone once per stored view (cached on disk); the
    new head is trained on those features, then with --unfreeze the last stages too, on fresh crops.
    The best epoch on the validation photos is saved. Returns the checkpoint's path and the split."""
    prep = prepare(cfg)
    model = prep.extractor.model()  # built only now when every feature came from the cache
    freeze(model)
    model.cpu()
    run = Run(cfg, model, prep.train_features, prep.val_features, prep.split.classes, prep.positive,
              meta=checkpoint_meta(cfg, prep), checkpoint=cfg.checkpoint, precision=prep.extractor.precision)
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
    if not len(prep.val_features.y):
        warn('no validation photos: every photo trained the model and this run can claim no accuracy; claim it '
             'from `python monkeypox.py cv`')
    kept = best['stage'] if best['stage'] == 'head' else f'{best["stage"]} epoch {best["epoch"]}'
    if len(prep.val_features.y):
        kept += f', val balanced accuracy {best["metrics"]["balanced_accuracy"]:.3f}'
    say(f'saved {run.checkpoint} ({kept}, threshold {best["threshold"]:.2f})')
    if not cfg.no_plot and is_main():
        say(f'plot: {plot_curves(run.history, run.head_fit, os.path.join(cfg.out, "curves.png"))}')
    return run.checkpoint, prep.split


def cv(cfg):
    """Grouped, stratified k-fold cross-validation, the accuracy to quote: each fold's model is trained
    exactly as `train` trains (an inner patient-grouped split picks its best epoch and threshold) and
    scored on its fold, whose patients it never saw. In int8, the patients whose photos calibrated the
    backbone train every fold and are never scored."""
    prep = prepare(cfg, every_photo=True)
    prevalences = cv_prevalences(cfg, prep.positive)  # a bad --prevalence stops here, before the folds
    photos, classes, positive = prep.train_features.photos, prep.split.classes, prep.positive
    held = calibration_patients(photos, prep.extractor.calibration)  # int8: they calibrate and train, never scored
    scored = [i for i in range(len(photos)) if i not in held]
    folds = grouped_folds([photos[i] for i in scored], cfg.folds, cfg.seed)
    if is_main():
        write_folds(os.path.join(cfg.out, 'folds.csv'), photos, {photos[i].path: f for i, f in zip(scored, folds)},
                    cfg.data, classes)
    if held:
        say(f'int8: the {len(held)} photos of the patients whose photos calibrated the backbone train every fold '
            f'and are never scored: {len(scored)} photos are')
    if cfg.unfreeze:  # every fold fine-tunes its own copy of the pretrained model
        pretrained = {k: v.clone() for k, v in prep.extractor.model().cpu().state_dict().items()}
    results, labels, probs, preds, untempered, edges = [], [], [], [], [], []
    index = {p.path: i for i, p in enumerate(photos)}
    for k in range(cfg.folds):
        t0 = time.time()
        test = [scored[j] for j, f in enumerate(folds) if f == k]
        in_test = set(test)
        inner_train, inner_val = grouped_split([p for i, p in enumerate(photos) if i not in in_test],
                                               cfg.val_fraction, cfg.seed)
        tr, va = [index[p.path] for p in inner_train], [index[p.path] for p in inner_val]
        if cfg.unfreeze:
            model = prep.extractor.model()
            model.load_state_dict(pretrained)
            freeze(model)
        else:  # the frozen backbone's features are all a head needs
            model = new_head(prep.train_features.x.shape[-1], len(classes), cfg.seed)
        run = Run(cfg, model, prep.train_features.subset(tr), prep.val_features.subset(va), classes, positive,
                  precision=prep.extractor.precision)
        run.cache_dir = prep.extractor.cache.dir
        with quiet():
            best = fit(run)
            p, before_scaling = run.probabilities(prep.val_features.subset(test))
            untempered += before_scaling
        y = prep.val_features.y[test].tolist()
        m = metrics(y, p, classes, positive, best['threshold'])
        del m['bins']  # a fold's reliability bins: the pooled ones are drawn
        m.update(fold=k + 1, train=len(tr), val=len(va), test=len(test), epoch=best['epoch'], stage=best['stage'],
                 weight_decay=run.head_fit['weight_decay'], seconds=time.time() - t0)
        say(f'fold {k + 1}/{cfg.folds}: balanced accuracy {m["balanced_accuracy"]:.3f} (weight decay '
            f'{run.head_fit["weight_decay"]:g}, {best["stage"]} epoch {best["epoch"]}, {time.time() - t0:.0f}s)')
        results.append(m)
        labels, probs, preds = labels + y, probs + p, preds + decide(p, positive, best['threshold'])
        edges += [k + 1] if run.head_fit.get('search') and on_grid_edge(run.head_fit['search']) else []
    if edges:
        grid = run.head_fit['search']['grid']  # the grid the folds searched
        warn(f'the weight decay chosen in fold(s) {", ".join(map(str, edges))} is an end of the grid '
             f'({grid[0]:g} to {grid[-1]:g}): the inner folds found no best penalty inside it')
    pooled = metrics(labels, probs, classes, positive, None, preds)  # out of fold, each at its own threshold
    if positive is not None:  # what each fold's temperature did to its calibration
        pooled['untempered'] = calibration([y == positive for y in labels], [q[positive] for q in untempered])
        del pooled['untempered']['bins']
    result = {'folds': results, 'mean': aggregate(results, 'mean'), 'std': aggregate(results, 'sd'),
              'pooled': pooled, 'data': prep.what, 'arch': cfg.arch, 'weights': prep.spec.name, 'seed': cfg.seed,
              'precision': prep.extractor.precision, 'fidelity': prep.fidelity, 'grouping': prep.split.grouping,
              'calibration_only': sorted(photos[i].path for i in held),
              'predictive_values': [predictive_values(pooled, q) for q in prevalences],
              'config': vars(cfg)}
    report(cfg, result, pooled, labels, probs, os.path.join(cfg.out, 'cv'),
           f'{cfg.folds}-fold cross-validation, pooled ({len(labels)} photos)', print_cv)
    return result


def evaluate(cfg):
    """Metrics of a checkpoint on photos it never saw: its own validation photos on the flat dataset it was
    trained on, the test/ (or val/) folder of a split dataset, or any other folder whole."""
    loaded = load_model(cfg.checkpoint, cfg)
    photos, what = evaluation_photos(loaded, cfg)
    check_prevalence(cfg, loaded)
    if cfg.ood and loaded.ood is None:
        raise UserError(f'--ood: {cfg.checkpoint} has no out-of-distribution detector to measure; drop --ood')
    probs, scores, failures = checkpoint_probabilities(loaded, photos, cfg, 'evaluate')
    report_skipped(failures)
    out = cfg.out or os.path.dirname(os.path.abspath(cfg.checkpoint))
    copies = training_copies(loaded.ckpt.get('copies'), photos, cfg.data, out, cfg.checkpoint)
    scored = [i for i in range(len(photos)) if i in probs]
    labels, p = [photos[i].label for i in scored], [probs[i] for i in scored]
    m = metrics(labels, p, loaded.classes, loaded.positive, operating_threshold(cfg, loaded))
    m.update(images=what, checkpoint=cfg.checkpoint, skipped=failures, copies_of_training=copies)
    if scores is not None:
        m['ood'] = ood_report(loaded, cfg, [scores[i] for i in scored])
    if cfg.prevalence:
        m.update(predictive_values(m, cfg.prevalence))
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
        check_prevalence(cfg, loaded)
        probs, scores, failures = checkpoint_probabilities(loaded, [Photo(f, -1, '') for f in files], cfg, 'predict')
        problems += failures
        if scores is None:
            say(f'note: {cfg.checkpoint} has no out-of-distribution detector, so it cannot say when a photo is unlike '
                'its training photos (ood_score: null); a frozen-backbone `train` makes one, `export` carries it')
        threshold = operating_threshold(cfg, loaded)
        results = [answer(f, probs[i], scores and scores[i], loaded, threshold, cfg.prevalence)
                   for i, f in enumerate(files) if i in probs]
    for r in results:
        if cfg.json and is_main():
            print(json.dumps(r), flush=True)
        elif not cfg.json:
            say(answer_line(r, loaded))
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


def download(cfg):
    """Fetch the authors' archive of the MSLD photos, verify it, and lay it out as train/ val/ test/ by
    patient in --dest; an interrupted or failed download leaves --dest as it was."""
    dest = download_dataset(cfg.dest, cfg.url, cfg, cfg.force, fix='fetch the file by hand and pass --url PATH')
    say(f'{dest}: the 228 MSLD photos in train/ val/ test/ (split by patient, seed {cfg.seed}; {dest / "SPLIT.csv"}); '
        f'license CC BY-NC, see {dest / "LICENSE.txt"}')


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
    worst, what, own_gap, score_gap = onnx_parity(loaded, ort.InferenceSession(data, providers=['CPUExecutionProvider']), cfg)
    if worst > 1e-4:
        raise UserError(f'{out} not written: onnxruntime\'s probabilities differ from PyTorch\'s by up to {worst:.2g} '
                        f'on {what} (the limit is 1e-4); try another --opset, or report it with --debug')
    if score_gap is not None and score_gap > OOD_PARITY:
        raise UserError(f'{out} not written: onnxruntime\'s out-of-distribution score differs from PyTorch\'s by '
                        f'{score_gap:.2g} on {what} (the limit is {OOD_PARITY:g}); report it with --debug')
    if own_gap is not None and own_gap > FIDELITY_LIMITS['max']:
        raise UserError(f'{unlike_fp32} (by up to {own_gap:.2g} on {what}); retrain with --precision auto or fp32')
    atomic_write(out, lambda f: f.write(data))
    say(f'exported {out} ({len(data) / 1e6:.1f} MB, opset {cfg.opset}, {loaded.ckpt["arch"]}, classes '
        f'{loaded.classes}): onnx.checker passed, onnxruntime agrees with PyTorch within {worst:.1g} on {what}')
    if own_gap is not None:
        say(f'note: {cfg.checkpoint} was trained on {own} features; the ONNX file computes them in fp32, within '
            f'{own_gap:.2g} of predict\'s probabilities on {what}')
    return out


def serve(cfg):
    """A web page and a JSON API on one model, loaded once (docs/serve.md): each uploaded photo is scored in
    memory as predict scores a file, and answered as predict --json answers. Runs until Ctrl-C or SIGTERM."""
    sock = listen(cfg.host, cfg.port)  # a port in use is said before the model loads
    loaded = load_model(cfg.checkpoint, cfg)
    check_prevalence(cfg, loaded)
    serve_forever(Scorer(loaded, cfg), cfg, sock)



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


def setting(name):
    """The cfg entry of a setting: its flag's name (IMAGE_PATH is --data), else its name in lower case."""
    return SETTING_FLAGS.get(name, name.lower())


def build_parser():
    """The parser of every command, its defaults the settings at the top of this file as they are now. Flags
    marked run_only say how a run goes, never what model it makes: a resumed run may change them."""
    d = {setting(name): globals()[name] for name in SETTINGS}
    run_only_dests = set()

    def flag(parser, name, kind=None, help='', run_only=False, **kw):  # default: the setting it is named after
        dest = kw.setdefault('dest', name[2:].replace('-', '_'))
        if kind is not None:
            kw.update(type=kind, metavar=kw.get('metavar', METAVARS.get(kind, 'X')))
        if dest in d:
            kw.setdefault('default', d[dest])
        action = parser.add_argument(name, help=help, **kw)
        if run_only:
            run_only_dests.add(action.dest)
        return action

    general = argparse.ArgumentParser(add_help=False)  # every command, download included
    flag(general, '--debug', help='show tracebacks (or set MONKEYPOX_DEBUG=1)', action='store_true', run_only=True)
    settable = flag(general, '--set', metavar='NAME=VALUE', action='append', default=[], run_only=True)
    common = argparse.ArgumentParser(add_help=False, parents=[general])  # every command that runs a model
    flag(common, '--device', device_name, 'auto, cpu, cuda or cuda:N')
    flag(common, '--precision', help='backbone arithmetic; auto: in train and cv the fastest of int8 (a frozen CNN on '
         'an x86 CPU, when the crops repay it), bf16 (where the hardware is fast at it) and fp32 that answers as fp32 '
         'does for the fitted head; in evaluate and predict the checkpoint\'s own', choices=('auto', 'fp32', 'bf16', 'int8'))
    flag(common, '--workers', worker_count, 'image decoding processes (-1: auto)', run_only=True)
    flag(common, '--extract-batch-size', positive_int, 'crops per backbone pass', run_only=True)
    flag(common, '--compile', help='torch.compile the backbone for extraction (auto: when enough crops make it pay)',
         choices=('auto', 'always', 'never'))
    flag(common, '--dist-timeout', positive_float, 'seconds a torchrun rank waits for the others', run_only=True)

    training = argparse.ArgumentParser(add_help=False)
    flag(training, '--data', str, 'class folders, or train/ + val/ folders')
    flag(training, '--weight-decay', weight_decay, "the head's L2 penalty, or auto (grouped inner cross-validation)",
         metavar='L')
    flag(training, '--epochs', positive_int, 'fine-tuning epochs (with --unfreeze)')
    flag(training, '--finetune-epochs', positive_int, argparse.SUPPRESS, dest='epochs')  # another name of --epochs
    flag(training, '--lr', positive_float, 'Adam learning rate of the head while fine-tuning')
    flag(training, '--batch-size', positive_int, 'photos per fine-tuning step')
    flag(training, '--arch', arch_name, 'torchvision model name')
    flag(training, '--weights', str, 'auto, a torchvision weights name (DEFAULT, IMAGENET1K_V1, ...), a file, or none',
         metavar='W')
    flag(training, '--seed', int, 'split, initialisation and shuffling')
    flag(training, '--val-fraction', fraction, 'validation share of a flat dataset, whole patients at a time (0: none)')
    flag(training, '--patients', str, 'how photos group into patients: auto (file names, checked), none, re:REGEX '
         '(group 1 of a match on the file name) or a CSV file (path,patient)', metavar='P')
    flag(training, '--near-duplicates', help='on: copies of a photo under any name (turned, mirrored, cropped, '
         'recoloured, re-encoded) join its patient and are listed in OUT/near_duplicates.csv', choices=('on', 'off'))
    flag(training, '--sheet', help='also write OUT/near_duplicates.png: the copies found, side by side',
         action='store_true', run_only=True)
    flag(training, '--crop-scale', open_fraction, 'smallest share of the photo a training crop keeps')
    flag(training, '--views', positive_int, 'random training crops per photo')
    flag(training, '--out', str, 'folder for checkpoint, class map, summary, curves and cache',
         default=os.path.dirname(d['checkpoint']) or '.')
    flag(training, '--cache', str, 'feature cache folder; empty means OUT/cache')
    flag(training, '--archive-url', str, 'the MSLD archive, fetched when IMAGE_PATH is missing or empty (URL or file)',
         metavar='URL', run_only=True)
    flag(training, '--no-download', help='never download the public photos into a missing IMAGE_PATH',
         dest='auto_download', action='store_false', run_only=True)
    flag(training, '--no-cache', help='keep features in memory only', action='store_true')
    flag(training, '--positive-class', str, 'class screened for', metavar='NAME')
    flag(training, '--ood-coverage', open_fraction, 'share of held-out training photos the out-of-distribution '
         'check lets pass')
    flag(training, '--threshold', probability, 'P(positive class) at or above which a photo is called positive')
    flag(training, '--target-sensitivity', probability, 'if > 0: highest threshold reaching this validation sensitivity')
    flag(training, '--unfreeze', non_negative_int, 'also fine-tune the last N backbone stages after the head')
    flag(training, '--backbone-lr', positive_float, 'Adam learning rate of the unfrozen stages')
    flag(training, '--checkpoint-seconds', positive_float, 'a better epoch is written at most this often',
         run_only=True)
    flag(training, '--resume', help='continue an interrupted run in --out', action='store_true', run_only=True)
    flag(training, '--no-plot', help='write no pictures', action='store_true', run_only=True)

    checkpoint = argparse.ArgumentParser(add_help=False)
    flag(checkpoint, '--checkpoint', str, 'checkpoint written by train', metavar='FILE')
    flag(checkpoint, '--threshold', probability, 'override the checkpoint\'s operating threshold',
         dest='override_threshold', default=None)
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument('--json', action='store_true', help='print JSON')

    parser = argparse.ArgumentParser(prog='monkeypox.py', description=__doc__.split('\n\n')[0] + ' ' +
                                     NOT_A_DIAGNOSIS, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog='With no command: train, then predict --test-image (`python '
                                     'monkeypox.py run --help` lists its flags).')
    sub = parser.add_subparsers(dest='command', metavar='command')
    parser.commands = {}

    def command(name, parents, help):
        parser.commands[name] = sub.add_parser(name, parents=parents, help=help,
                                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        return parser.commands[name]
    p = command('run', [training, common], 'train, then predict and show TEST_IMAGE (the default)')
    flag(p, '--test-image', str, 'photo predicted after training', metavar='FILE')
    command('train', [training, common], 'train a classifier')
    screening = argparse.ArgumentParser(add_help=False)
    flag(screening, '--prevalence', open_fraction, 'share of the screened class among the people photographed: '
         'PPV/NPV (evaluate, cv) and post-test probabilities (predict) at it')
    p = command('evaluate', [checkpoint, common, output, screening], 'metrics on photos the model never saw')
    flag(p, '--data', str, 'dataset or folder of class folders to evaluate on')
    flag(p, '--ood', str, 'also score a folder of photos not of the trained classes: how well the '
         'out-of-distribution check flags them', default='')
    p.add_argument('--all', action='store_true', help='every photo of --data, even those trained on')
    flag(p, '--out', str, 'folder for the pictures (default: the checkpoint\'s)', default='')
    p.add_argument('--sheet', action='store_true', help='also write sheet.png: photos, mistakes first')
    p.add_argument('--no-plot', action='store_true', help='write no pictures')
    p = command('predict', [checkpoint, common, output, screening], 'classify photos')
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
    flag(p, '--patients', str, 'how photos group into patients (as train\'s --patients)', metavar='P')
    flag(p, '--near-duplicates', help='on: copies of a photo under any name stay on its side (as train\'s)',
         choices=('on', 'off'))
    p = command('export', [general], 'the model as one ONNX file, for runtimes outside PyTorch')
    flag(p, '--checkpoint', str, 'checkpoint written by train', metavar='FILE')
    flag(p, '--out', str, 'the .onnx file (empty: the checkpoint\'s path, ending .onnx)', default='', metavar='FILE')
    flag(p, '--opset', positive_int, 'ONNX opset', default=18)
    p.add_argument('--check', nargs='+', metavar='PHOTO', default=[],
                   help='photos to compare onnxruntime with PyTorch on (none: the checkpoint\'s validation photos)')
    p = command('cv', [training, common, output, screening], 'cross-validation by patient: the accuracy to quote')
    flag(p, '--folds', fold_count, 'folds, whole patients at a time')
    p = command('serve', [checkpoint, common, screening], 'a web page and a JSON API on the model (docs/serve.md)')
    flag(p, '--host', str, 'address to serve on; another than 127.0.0.1 lets other machines in, without a login',
         metavar='ADDR')
    flag(p, '--port', checked(int, lambda v: 0 <= v <= 65535, 'must be 0 to 65535', 'port'), 'TCP port (0: any free '
         'one)', metavar='N')
    flag(p, '--max-upload-mb', positive_float, 'a larger upload is refused (413)', metavar='MB')
    flags = {a.dest for p in parser.commands.values() for a in p._actions}
    parser.unflagged = [name for name in SETTINGS if setting(name) not in flags]
    settable.help = f'set any setting by its name; those without a flag of their own: {", ".join(parser.unflagged)}'
    parser.run_only = sorted(run_only_dests)
    return parser, d


METAVARS = {str: 'DIR', int: 'N', positive_int: 'N', non_negative_int: 'N', worker_count: 'N', fold_count: 'K',
            positive_float: 'X', open_fraction: 'F', fraction: 'F', probability: 'P', arch_name: 'NAME',
            device_name: 'DEV'}


def parse_args(argv):
    """The settings of one run: the flags given, over the settings at the top of this file. Every setting is
    an entry of the result (`cfg`), also those this command has no flag for; --set writes there too."""
    parser, defaults = build_parser()
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ('-h', '--help')):
        argv = ['run'] + list(argv)  # `python monkeypox.py [flags]`: train, then predict TEST_IMAGE
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
    if not 0 <= cfg.prevalence < 1:
        command_parser.error(f'PREVALENCE {cfg.prevalence}: must be 0 (none) or between 0 and 1')
    if not 0 < cfg.ood_coverage < 1:
        command_parser.error(f'OOD_COVERAGE {cfg.ood_coverage}: must be between 0 and 1')
    cfg.run_only = parser.run_only + ['download_missing', 'run_only']  # what a resumed run may change
    if cfg.command in ('run', 'train', 'cv'):
        cfg.cache = '' if cfg.no_cache else (cfg.cache or os.path.join(cfg.out, 'cache'))
        cfg.checkpoint = os.path.join(cfg.out, os.path.basename(cfg.checkpoint))
        # IMAGE_PATH, as shipped or edited or named by --data, is the one folder the photos may be downloaded into
        cfg.download_missing = cfg.auto_download and os.path.abspath(cfg.data) == os.path.abspath(defaults['data'])
        if cfg.weights == 'auto':  # MODEL_PATH holds weights for ARCH: used for that architecture only
            cfg.weights = cfg.model_path if cfg.arch == defaults['arch'] and os.path.isfile(cfg.model_path) else 'DEFAULT'
    return cfg


def apply_settings(cfg, parser):
    """--set NAME=VALUE into cfg (nanoGPT's configurator), any setting by its name: checked as its flag checks
    it where this command has one, else type-checked against the setting's default."""
    flags = {option: action for action in parser._actions for option in action.option_strings}
    for pair in cfg.set:
        name, equals, text = pair.partition('=')
        if name not in SETTINGS or not equals:
            parser.error(f'--set {pair}: expected NAME=VALUE with NAME one of the settings at the top of '
                         f'monkeypox.py ({", ".join(SETTINGS[:4])}, ...)')
        action = flags.get('--' + setting(name).replace('_', '-'))
        if action is not None and (action.type is not None or action.choices):
            try:
                value = action.type(text) if action.type else text
            except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
                parser.error(f'--set {name}={text}: {e}')
            if action.choices and value not in action.choices:
                parser.error(f'--set {name}={text}: choose from {", ".join(action.choices)}')
            setattr(cfg, action.dest, value)
            continue
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
            'download': download, 'export': export, 'serve': serve}


def main(argv=None):
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    debug = cfg.debug or os.environ.get('MONKEYPOX_DEBUG') == '1'
    distributed = int(os.environ.get('WORLD_SIZE', '1')) > 1  # from the start: joining the group can fail too
    who = f' (rank {os.environ.get("RANK", "?")})' if distributed else ''
    with process_state(), messages_to_stderr(getattr(cfg, 'json', False)):
        try:
            init_distributed(cfg)
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
            if isinstance(e.__cause__, KeyboardInterrupt):  # Ctrl-C or SIGTERM while a class was being made (an import)
                print(f'monkeypox.py{who}: stopped', file=sys.stderr)
                return 130
            if not distributed or not is_lost_peer(e):
                raise
            if debug:
                traceback.print_exc()
            print(f'monkeypox.py{who}: error: lost contact with the other ranks ({first_line(e)[:200]}); '
                  'one of them died or stalled: see its log. Files written so far are complete', file=sys.stderr)
            return 1
    return 0


def leave(code):
    """Exit without Python's teardown of torch's modules, which is slow (docs/speed.md) and does nothing a
    finished run needs: every file was written whole and closed, and the ranks were taken down."""
    with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more can be said anyway
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


if __name__ == '__main__':
    leave(main())
