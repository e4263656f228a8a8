"""Metrics and their reports: decisions at a threshold, sensitivity and specificity with Wilson intervals,
ROC AUC, calibration."""

import math

import numpy as np

from .system import say


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
        say(f'{pc}: called when P({pc}) >= {m["threshold"]:.2f}')
        say(f'  sensitivity {number(m["sensitivity"])}{interval(m["sensitivity_ci"])}   '
            f'specificity {number(m["specificity"])}{interval(m["specificity_ci"])}   ROC AUC {number(m["auc"])}')
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
    if 'ppv' in m:
        print_predictive_values([m], m['positive_class'])
    if m.get('ood'):
        print_ood(m['ood'])


def interval(c):
    return '' if c is None or math.isnan(c[0]) else f' (95% CI {c[0]:.2f}-{c[1]:.2f})'


def print_predictive_values(rows, positive_name):
    """PPV and NPV at each prevalence of `rows` (ood.predictive_values), each with the range the ends of the
    95% intervals of sensitivity and specificity give (a range, not itself a 95% interval)."""
    def span(c):
        return '' if c is None or math.isnan(c[0]) else f' (from the 95% intervals: {c[0]:.2f}-{c[1]:.2f})'
    for r in rows:
        say(f'  at a prevalence of {r["prevalence"]:.3g}: PPV {number(r["ppv"])}{span(r["ppv_ci"])} (a photo called '
            f'{positive_name} is one), NPV {number(r["npv"])}{span(r["npv_ci"])} (a photo called otherwise is not)')


def print_ood(r):
    """evaluate's out-of-distribution lines (pipeline.ood_report)."""
    say(f'out of distribution: {r["flagged"]} of {r["n"]} evaluated photos flagged as unlike the training photos '
        f'(threshold {r["threshold"]:.3f}, set to pass {r["coverage"]:.0%} of held-out training photos)')
    if 'ood_folder' in r:
        say(f'  {r["ood_folder"]}: {r["ood_flagged"]} of {r["ood_n"]} photos flagged; ROC AUC against the evaluated '
            f'photos {number(r["ood_auroc"])}')


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
        print_predictive_values(result['predictive_values'], pooled['positive_class'])
