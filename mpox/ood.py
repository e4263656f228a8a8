"""Out of distribution: how unlike the training photos a photo is, from its backbone features, and PPV/NPV.

The score is the distance from a photo's L2-normalised features to those of its k-th nearest training photo
(nearest neighbours in feature space: Sun et al. 2022, "Out-of-distribution detection with deep nearest
neighbors"). Its threshold is set on training photos held out by
patient (the head's inner folds): each fold's photos are scored against the other folds' photos, and the
threshold lets a stated share of them pass. A softmax probability cannot say this: a photo unlike anything
the head saw still falls on one side of it.
"""
import math

import torch

OOD_NEIGHBOURS = 1  # k: the distance to the k-th nearest training photo (docs/ood.md: k = 1, 3, 5 compared)


def normalised(x):
    """Features scaled to unit length (float32)."""
    x = x.float()
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def distances(x, bank, k=OOD_NEIGHBOURS):
    """Each row's distance to its k-th nearest row of `bank` (the normalised training features)."""
    sims = normalised(x) @ bank.T
    kth = sims.topk(min(k, bank.shape[0]), dim=1).values[:, -1]
    return (2 - 2 * kth).clamp_min(0).sqrt()


def fit_ood(x, folds, coverage, k=OOD_NEIGHBOURS):
    """The detector of the training photos' centre-crop features `x` [photos, dim]: their normalised rows
    (the bank), and the threshold that `coverage` of the photos of held-out folds (`folds`: a fold per
    photo, by patient) stay within when scored against the other folds. None with fewer than two folds."""
    used = sorted(set(folds))
    if len(used) < 2:
        return None
    held = []
    for fold in used:
        out = torch.tensor([f == fold for f in folds])
        held.append(distances(x[out], normalised(x[~out]), k))
    held = torch.cat(held).sort().values
    threshold = float(held[min(len(held) - 1, math.ceil(coverage * len(held) - 1e-9) - 1)])
    return {'method': f'distance to the {k}-th nearest training photo, features L2-normalised',
            'k': k, 'bank': normalised(x), 'threshold': threshold,
            'coverage': coverage, 'photos': len(x), 'held_out_median': float(held.median())}


def ood_scores(features, ood):
    """The scores of centre-crop features [photos, dim] against a fitted detector: larger, less like training."""
    return distances(features, ood['bank'], ood['k'])


def prevalence_values(sensitivity, specificity, prevalence):
    """PPV and NPV at `prevalence` from a sensitivity and a specificity (Bayes' rule)."""
    p, se, sp = prevalence, sensitivity, specificity
    tp, fp, tn, fn = p * se, (1 - p) * (1 - sp), (1 - p) * sp, p * (1 - se)
    ppv = tp / (tp + fp) if tp + fp > 0 else float('nan')
    npv = tn / (tn + fn) if tn + fn > 0 else float('nan')
    return ppv, npv


def predictive_values(m, prevalence):
    """PPV and NPV at `prevalence` from the metrics `m` (metrics.metrics), each with an interval carried from
    the Wilson intervals of sensitivity and specificity: PPV and NPV both grow with each of them, so their
    lower ends come from the lower ends and their upper ends from the upper ends."""
    se, sp, se_ci, sp_ci = m['sensitivity'], m['specificity'], m['sensitivity_ci'], m['specificity_ci']
    ppv, npv = prevalence_values(se, sp, prevalence)
    low, high = prevalence_values(se_ci[0], sp_ci[0], prevalence), prevalence_values(se_ci[1], sp_ci[1], prevalence)
    return {'prevalence': prevalence, 'ppv': ppv, 'ppv_ci': [low[0], high[0]], 'npv': npv,
            'npv_ci': [low[1], high[1]]}


def post_test_probability(p, trained_prevalence, prevalence):
    """A calibrated probability of the screened class re-weighted from the prevalence it was trained at to
    another (the odds scale by the ratio of the two prevalences' odds)."""
    if p <= 0 or p >= 1 or not 0 < trained_prevalence < 1:
        return p
    odds = p / (1 - p) * (prevalence / (1 - prevalence)) / (trained_prevalence / (1 - trained_prevalence))
    return odds / (1 + odds)
