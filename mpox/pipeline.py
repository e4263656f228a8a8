"""The steps the commands share: preparing the photos and their features (train, cv), the report (evaluate,
cv), loading a model to score with (evaluate, predict)."""

import argparse
import dataclasses
import json
import os
import time

import torch

from .checkpoint import load_checkpoint
from .data import (DATASET_URL, Photo, Split, collect_images, drop_unreadable, positive_index, print_split,
                   read_dataset, read_photos, split_photos)
from .devices import resolve_device
from .download import DATASET_CITATION, download_dataset
from .features import Extractor, Features
from .fidelity import check_fidelity, precisions_to_try, remember_unfaithful
from .files import load_memo, save_memo
from .head import inner_folds
from .images import EVAL_VIEW, report_skipped
from .inference import classifier, score_photos
from .metrics import decide, json_ready, roc_auc
from .model import WeightsSpec, resolve_weights
from .onnxfile import load_onnx, onnx_classifier
from .ood import fit_ood, post_test_probability
from .patients import assign_patients, check_grouping, grouping, join_near_duplicates
from .plots import plot_calibration, plot_confusion, plot_pairs, plot_roc
from .precision import scoring_precision
from .system import NOT_A_DIAGNOSIS, UserError, gather, is_main, say, warn


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
    ood: dict = None         # the out-of-distribution detector of the training photos (train only)
    copies: dict = None      # {path: duplicates.Signature} of every photo (None: --near-duplicates off)


def prepare(cfg, every_photo=False):
    """What train and cv start from: the photos (cv: every photo, its folds drawn later), the weights,
    the screened class, and the backbone's features of every photo, from the cache where it has them, in
    the fastest arithmetic that reproduces fp32 for this network and head (fidelity.check_fidelity)."""
    download_if_missing(cfg)
    memo = load_memo(cfg.cache)
    classes, parts = read_dataset(cfg.data, memo)
    every = [p for part in parts.values() for p in part]
    assign_patients(every, cfg.data, cfg.patients)  # before any heavy work: a wrong grouping stops here
    grouped = every if every_photo else parts.get('all') or parts['train']
    if every_photo:
        least, need = cfg.folds, f'cv with {cfg.folds} folds'
    elif 'all' in parts and cfg.val_fraction > 0:
        least, need = 2, 'the validation split'
    else:
        least, need = (2, '--weight-decay auto') if cfg.weight_decay == 'auto' else (1, 'training')
    check_grouping(grouped, classes, cfg.patients, least, need)
    test = [] if 'all' in parts or cfg.near_duplicates == 'off' else test_photos(cfg.data, classes, memo)
    part_of = None if 'all' in parts else {p.path: part for part, photos in [*parts.items(), ('test', test)]
                                           for p in photos}
    pairs, signatures = join_near_duplicates(every + test, cfg.data, cfg.near_duplicates, cfg.cache,
                                             os.path.join(cfg.out, 'near_duplicates.csv'), part_of)
    if pairs:  # the groups the copies joined, checked as the names were
        check_grouping(grouped, classes, cfg.patients, least, need, copies_only=True)
        if cfg.sheet and not cfg.no_plot and is_main():
            say(f'plot: {plot_pairs(every + test, pairs, classes, os.path.join(cfg.out, "near_duplicates.png"))}')
    split, what = split_photos(cfg.data, classes, parts, cfg), cfg.data
    split.grouping = grouping(every, cfg.patients)
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
    extractor = None
    for precision in precisions_to_try(cfg, spec, device, crops):
        shared = extractor.built_model() if extractor else None  # the pretrained network, loaded once
        extractor = Extractor(cfg, split.classes, spec, precision=precision, calibration=split.train, model=shared)
        train_f, val_f, centre = extract_features(cfg, extractor, split, every_photo, what)
        if precision == 'fp32':
            break
        checks.append(check_fidelity(cfg, extractor, train_f, positive))
        if gather(checks[-1]['faithful'])[0] or cfg.precision != 'auto':  # rank 0's verdict: every rank goes on alike
            break
        remember_unfaithful(cfg, extractor, checks[-1])
    ood = None if every_photo else fit_detector(cfg, centre)
    copies = signatures and {p.path: s for p, s in zip(every + test, signatures)}
    return Prepared(split, what, spec, positive, extractor, train_f, val_f, checks, ood, copies)


def test_photos(root, classes, memo):
    """The photos of DIR/test, searched for copies of training photos (never trained or validated on): none
    without a test/ folder, or with one that does not fit the classes (said in one line)."""
    if not os.path.isdir(os.path.join(root, 'test')):
        return []
    try:
        return read_photos(os.path.join(root, 'test'), classes, memo)[1]
    except UserError as e:
        warn(f'{os.path.join(root, "test")} is not searched for copies of training photos: {e}')
        return []


def fit_detector(cfg, centre):
    """The out-of-distribution detector of the training photos' centre crops (`centre`: the view predict
    scores, which extract_features computed with the training views), its threshold set on photos held out
    by patient. None with --unfreeze, or when there are too few patients for the inner folds."""
    if cfg.unfreeze:  # fine-tuning moves the features the detector would be fit on
        say('out of distribution: no detector with --unfreeze (fine-tuning changes the features it reads)')
        return None
    ood = fit_ood(centre.x[:, 0], inner_folds(centre.photos), cfg.ood_coverage)
    if ood is None:
        warn('too few patients to set the out-of-distribution threshold: predict will not warn of photos unlike '
             'the training photos')
        return None
    say(f'out of distribution: a photo is unlike the training photos when its features lie further than '
        f'{ood["threshold"]:.3f} from the nearest of the {ood["photos"]} training photos\' (the distance '
        f'{cfg.ood_coverage:.0%} of photos held out by patient stay within)')
    return ood


def extract_features(cfg, extractor, split, every_photo, what):
    """The stored random views of the training photos, the evaluation view of the validation photos (cv:
    of every photo) and that of the training photos (the detector's; None with --unfreeze), from the cache
    where it has them; unreadable photos are reported and dropped. A training photo is decoded once for all
    its views."""
    t0 = time.time()
    views = [f'train{k}' for k in range(cfg.views)]
    centre = [] if cfg.unfreeze else [EVAL_VIEW]
    both, bad = extractor.features(split.train, views + centre)
    train_f = Features(both.photos, both.x[:, :cfg.views], both.y)
    centre_f = Features(both.photos, both.x[:, cfg.views:], both.y) if centre else None
    if every_photo and centre_f:  # cv: every photo's evaluation view is its centre crop
        val_f, bad_val = centre_f, []
    else:
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
    return train_f, val_f, centre_f


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
            # the archive's own names (MSLD's P13_1.jpg) group its split; --patients is for the training that follows
            layout = argparse.Namespace(**{**vars(cfg), 'patients': 'auto'})
            download_dataset(cfg.data, cfg.archive_url, layout, force=False,
                             fix='pass --archive-url PATH (or `download --url PATH`) with a copy of the archive, or '
                                 '--data DIR with photos of your own', cache=cfg.cache)
        except UserError as e:
            failure = str(e)
        else:
            say(f'{cfg.data}: the 228 MSLD photos in train/ val/ test/ (split by patient, seed {cfg.seed}); license '
                f'CC BY-NC, see {os.path.join(cfg.data, "LICENSE.txt")}')
    failure = gather(failure)[0]
    if failure:
        raise UserError(failure)


def report(cfg, result, m, labels, probs, out, title, print_text):
    """The end of evaluate and cv: the result printed (or as one JSON object), then confusion.png, roc.png
    and calibration.png of the metrics `m` on photos with true `labels` and probabilities `probs`, in `out`."""
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
    by an exported ONNX file, run by onnxruntime on the CPU: the same loop, another model. Returns
    ({index: probabilities}, {index: out-of-distribution score} or None without a detector, failures)."""
    device, precision, fn = scoring_function(loaded, cfg)
    rows, failures = score_photos(fn, photos, cfg, device, loaded.pre, desc)
    if loaded.ood is None:
        return rows, None, failures
    return {i: r[:-1] for i, r in rows.items()}, {i: r[-1] for i, r in rows.items()}, failures


def scoring_function(loaded, cfg):
    """(device, precision, fn) that score a loaded model as its training scored: the checkpoint's backbone in its
    scoring precision with its head and out-of-distribution detector (inference.classifier), or onnxruntime on
    the CPU for an exported file."""
    if loaded.session is not None:
        return torch.device('cpu'), 'fp32', onnx_classifier(loaded.session, loaded.pre)
    device = resolve_device(cfg.device)
    precision = scoring_precision(cfg, loaded, device)
    return device, precision, classifier(loaded.model, device, precision, loaded.pre, qparams=loaded.qparams,
                                         ood=loaded.ood)


def load_model(path, cfg):
    """What predict and evaluate score with: a checkpoint, or an ONNX file that `export` wrote."""
    return load_onnx(path, cfg) if str(path).lower().endswith('.onnx') else load_checkpoint(path, cfg)


CV_PREVALENCES = (0.01, 0.1, 0.5)  # cv's PPV and NPV: the MSLD share of mpox (45%) is far above a clinic's


def check_prevalence(cfg, loaded):
    """--prevalence needs a screened class: one line otherwise; predict's post-test probability needs the
    prevalence the model was trained at, which a model made without it lacks (a note says so)."""
    if cfg.prevalence and loaded.positive is None:
        raise UserError(f'--prevalence: {cfg.checkpoint} has no screened class (classes {loaded.classes}), so there is '
                        'no positive call to give a PPV or NPV for; drop --prevalence')
    if cfg.prevalence and cfg.command == 'predict' and not loaded.ckpt.get('trained_prevalence'):
        say(f'note: {cfg.checkpoint} does not record the prevalence it was trained at, so predict gives no post-test '
            'probability; evaluate --prevalence still gives PPV and NPV')


def cv_prevalences(cfg, positive):
    """The prevalences cv gives PPV and NPV at: a few by default, and --prevalence."""
    if positive is None:
        if cfg.prevalence:
            raise UserError('--prevalence: these classes have no screened class (--positive-class NAME names one)')
        return []
    return sorted(set(CV_PREVALENCES) | ({cfg.prevalence} if cfg.prevalence else set()))


def answer(path, probs, score, loaded, threshold, prevalence):
    """One photo's answer, as predict prints it and --json holds it: the class, its probability, the
    out-of-distribution score and verdict (None without a detector) and, at a --prevalence, the post-test
    probability of the screened class."""
    label = decide([probs], loaded.positive, threshold)[0]
    found = {'path': path, 'label': loaded.classes[label], 'probability': probs[label],
             'probabilities': dict(zip(loaded.classes, probs)), 'ood_score': score,
             'unlike_training': None if score is None else bool(score > loaded.ood['threshold'])}
    trained = loaded.ckpt.get('trained_prevalence')
    if prevalence and trained:
        found['prevalence'] = prevalence
        found['post_test_probability'] = post_test_probability(probs[loaded.positive], trained, prevalence)
    return found


def answer_line(found, loaded):
    """predict's line for one photo: path, class and probability, then what qualifies them."""
    line = f'{found["path"]}\t{found["label"]}\t{found["probability"]:.3f}'
    if 'post_test_probability' in found:
        line += (f'\tP({loaded.classes[loaded.positive]}) at prevalence {found["prevalence"]:g}: '
                 f'{found["post_test_probability"]:.3f}')
    if found['unlike_training']:
        line += '\twarning: unlike the training photos, the answer is a guess about something it was not trained on'
    return line


def ood_report(loaded, cfg, scores):
    """evaluate's out-of-distribution lines: how many evaluated photos the detector flags, and with --ood DIR
    how well it tells those photos (not of the trained classes) from the evaluated ones (ROC AUC, share
    flagged)."""
    threshold = loaded.ood['threshold']
    report = {'threshold': threshold, 'coverage': loaded.ood.get('coverage'), 'n': len(scores),
              'flagged': sum(s > threshold for s in scores)}
    if not cfg.ood:
        return report
    files, problems = collect_images([cfg.ood])
    if not files:
        raise UserError(f'--ood {cfg.ood}: {problems[0][1].split(": ", 1)[-1]}; pass a folder of photos that are not '
                        'of the trained classes')
    _, outside, failures = checkpoint_probabilities(loaded, [Photo(f, -1, '') for f in files], cfg, 'ood')
    report_skipped(failures)
    far = list(outside.values())
    report.update(ood_folder=cfg.ood, ood_n=len(far), ood_flagged=sum(s > threshold for s in far),
                  ood_auroc=roc_auc([0] * len(scores) + [1] * len(far), list(scores) + far))
    return report
