"""Fidelity: a faster arithmetic is used for features only where the fitted head cannot tell it from fp32."""

import json
from pathlib import Path

import numpy as np
import torch

from .features import Extractor
from .files import atomic_write
from .images import EVAL_VIEW
from .int8 import calibration_photos
from .metrics import decide
from .model import new_head
from .precision import precision_candidates
from .system import gather, is_main, quiet, say, warn
from .training import Run, fit_head


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
    # the same pretrained network: built once, or only when a cache lacks it
    exact = Extractor(cfg, extractor.classes, extractor.spec, precision='fp32', model=extractor.built_model())
    ref, _ = exact.features(fast.photos, [EVAL_VIEW])
    run = fitted_head(cfg, extractor, train, positive)
    with torch.no_grad():
        change = (run.model(fast.x[:, 0].float()) - run.model(ref.x[:, 0].float())).double()
        unseen = run.oof_logits if run.oof_logits is not None else run.model(train.x.flatten(0, 1).float()).double()
    before = unseen.softmax(1)[:, None]                             # [photos, 1, classes]
    after = (unseen[:, None] + change[None]).softmax(2)             # [photos, check photos, classes]
    moved = (after - before).abs().amax(2).flatten()
    threshold = run.best['threshold']
    decided = decide(before[:, 0].tolist(), positive, threshold)  # each unseen photo's decision, once
    flips = [a != decided[i // len(change)] for i, a in enumerate(decide(after.flatten(0, 1).tolist(), positive,
                                                                           threshold))]
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
    # rank 0's candidates and any rank's record: every rank must try the same arithmetics, in the same order
    candidates, records = gather(precision_candidates(cfg.precision, device, None if cfg.unfreeze else cfg.arch,
                                                      crops))[0], gather(read_unfaithful(cfg))
    if len(candidates) == 1:
        return candidates
    known = {}
    for part in records:
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
    """The record of arithmetics found unfaithful, {key: check}; a missing or damaged file is an empty record."""
    try:
        known = json.loads(Path(cfg.cache, UNFAITHFUL_NAME).read_text()) if cfg.cache else {}
    except (OSError, ValueError):
        return {}
    if not isinstance(known, dict):
        return {}
    return {k: v for k, v in known.items() if isinstance(v, dict) and isinstance(v.get('max'), (int, float))}


def remember_unfaithful(cfg, extractor, fidelity):
    """Record in the cache that this network and weights need more than this arithmetic, so that later runs go
    straight to the next one."""
    if cfg.cache and is_main():
        known = read_unfaithful(cfg)
        known[fidelity_key(cfg, extractor.spec, extractor.device, extractor.precision)] = fidelity
        atomic_write(Path(cfg.cache, UNFAITHFUL_NAME), lambda f: f.write(json.dumps(known, indent=1).encode()))
