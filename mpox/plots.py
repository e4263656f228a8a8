"""The pictures: predictions, the head's curves, calibration, confusion matrix, ROC curve, contact sheet."""

import math
import os
import sys

import numpy as np

from .files import atomic_write
from .gradcam import MAP_OPACITY, grad_cam
from .images import load_rgb
from .metrics import roc_auc, roc_curve
from .precision import explained_qparams
from .system import say


def new_figure(figsize, rows=1, cols=1, window=False):
    """A matplotlib figure and its axes grid: through pyplot only for a window; a file needs no GUI
    backend, and pyplot's import is slow."""
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
        photo = load_rgb(r['path'], draft=loaded.pre['resize'])  # decoded as predict scored it
        ax.imshow(photo)
        unlike = '\nwarning: unlike the training photos' if r.get('unlike_training') else ''
        ax.set_title(f'{r["label"]} ({r["probability"]:.0%})\n{os.path.basename(r["path"])}{unlike}', fontsize=10,
                     color='darkred' if unlike else 'black')
        if cfg.explain:
            crop, heat = explain(photo, loaded.classes.index(r['label']))
            ax = axes.flat[k * per + 1]
            ax.imshow(crop)
            ax.imshow(heat, cmap='jet', alpha=MAP_OPACITY, extent=(-0.5, crop.shape[1] - 0.5, crop.shape[0] - 0.5, -0.5))
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


def plot_pairs(photos, pairs, classes, path, most=24):
    """near_duplicates.png: the near-duplicate pairs found, side by side (label conflicts first), each with
    its keypoint matches and correlation; photos as stored, not as the model sees them."""
    pairs = sorted(pairs, key=lambda q: (photos[q[0]].label == photos[q[1]].label, q[3]))[:most]
    cols = 4  # pairs a row
    fig, axes = new_figure((2 * 2 * cols, 2.5 * max(1, math.ceil(len(pairs) / cols))),
                           max(1, math.ceil(len(pairs) / cols)), 2 * cols)
    for ax in axes.flat:
        ax.axis('off')
    for k, (a, b, matches, corr) in enumerate(pairs):
        conflict = photos[a].label != photos[b].label
        for ax, i in zip(axes.flat[2 * k:2 * k + 2], (a, b)):
            ax.imshow(load_rgb(photos[i].path, draft=256))
            ax.set_title(f'{os.path.basename(photos[i].path)}\n{classes[photos[i].label]}', fontsize=7,
                         color='red' if conflict else 'black')
        axes.flat[2 * k].text(0, -0.02, f'{matches} matches, r={corr:.2f}', fontsize=6,
                              transform=axes.flat[2 * k].transAxes, va='top')
    fig.tight_layout()
    return save_figure(fig, path)
