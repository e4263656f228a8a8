"""Metrics: decisions, sensitivity and specificity with their intervals, ROC AUC, calibration: mpox.metrics."""

import math

import pytest

import mpox.metrics
import mpox.training


def test_metrics_of_a_perfect_classifier():
    m = mpox.metrics.metrics([0, 0, 1, 1, 1], two_class([0.9, 0.6, 0.4, 0.2, 0.1]), CLASSES, 0, 0.5)
    assert m['accuracy'] == m['balanced_accuracy'] == m['sensitivity'] == m['specificity'] == m['auc'] == 1.0
    assert m['confusion_matrix'] == [[2, 0], [0, 3]]
    assert m['n'] == 5 and m['precision'] == {'Monkey Pox': 1.0, 'Others': 1.0}


def test_metrics_of_a_classifier_that_calls_everything_negative():
    m = mpox.metrics.metrics([0, 0, 1, 1, 1, 1], two_class([0.3, 0.2, 0.1, 0.1, 0.2, 0.3]), CLASSES, 0, 0.5)
    assert m['confusion_matrix'] == [[0, 2], [0, 4]]
    assert m['sensitivity'] == 0.0 and m['specificity'] == 1.0
    assert m['accuracy'] == pytest.approx(4 / 6) and m['balanced_accuracy'] == pytest.approx(0.5)
    assert math.isnan(m['precision']['Monkey Pox'])  # never predicted: precision undefined, not 0
    assert m['auc'] == pytest.approx(0.75)  # 2 positives x 4 negatives: 5 wins, 2 ties, 1 loss -> 6/8


def test_roc_auc_counts_ties_as_half():
    assert mpox.metrics.roc_auc([True, False], [0.5, 0.5]) == 0.5
    assert mpox.metrics.roc_auc([True, True, False, False], [0.8, 0.4, 0.4, 0.1]) == pytest.approx((1 + 1 + 0.5 + 1) / 4)
    assert math.isnan(mpox.metrics.roc_auc([True, True], [0.1, 0.2]))


def test_roc_curve_steps_once_per_distinct_score_ties_together():
    fpr, tpr, thr = mpox.metrics.roc_curve([1, 0, 1, 0, 1], [0.9, 0.8, 0.8, 0.3, 0.1])
    assert thr == [float('inf'), 0.9, 0.8, 0.3, 0.1]
    assert fpr == [0, 0, 0.5, 1, 1]
    assert tpr == pytest.approx([0, 1 / 3, 2 / 3, 2 / 3, 1])


def test_metrics_of_decisions_made_elsewhere_count_those_decisions():
    # cv pools folds decided at different thresholds: the decisions given are counted, not re-decided
    m = mpox.metrics.metrics([0, 0, 1, 1], two_class([0.9, 0.4, 0.6, 0.1]), ['pos', 'neg'], 0, None, preds=[0, 0, 0, 1])
    assert m['confusion_matrix'] == [[2, 0], [1, 1]]
    assert m['sensitivity'] == 1.0 and m['specificity'] == 0.5 and m['auc'] == 0.75  # 3 of 4 pairs ordered


def test_wilson_intervals_match_known_values():
    assert mpox.metrics.wilson(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)
    assert mpox.metrics.wilson(10, 10) == pytest.approx([0.7225, 1.0], abs=1e-4)
    assert mpox.metrics.wilson(5, 10) == pytest.approx([0.2366, 0.7634], abs=1e-4)
    assert mpox.metrics.wilson(81, 263) == pytest.approx([0.2553, 0.3662], abs=1e-4)
    assert all(math.isnan(v) for v in mpox.metrics.wilson(0, 0))


def test_metrics_with_a_third_class_and_no_positive_class():
    m = mpox.metrics.metrics([0, 1, 2, 2], [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.1, 0.7], [0.5, 0.3, 0.2]],
                   ['a', 'b', 'c'], None, 0.5)
    assert m['confusion_matrix'] == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    assert m['balanced_accuracy'] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m['sensitivity'] is None and m['auc'] is None


def test_target_sensitivity_picks_the_highest_threshold_that_reaches_it_and_decisions_flip_there():
    y = [True, True, True, True, True, False, False, False]
    p = [0.95, 0.80, 0.60, 0.40, 0.30, 0.70, 0.35, 0.10]
    assert mpox.training.select_threshold(y, p, 0.6, 0.5) == 0.60  # 3 of 5 positives at or above 0.60
    assert mpox.training.select_threshold(y, p, 0.61, 0.5) == 0.40  # 4 of 5 needed
    assert mpox.training.select_threshold(y, p, 1.0, 0.5) == 0.30
    t = mpox.training.select_threshold(y, p, 0.8, 0.5)
    probs = two_class(p)
    assert mpox.metrics.decide(two_class([t]), 0, t) == [0]  # at the threshold: positive
    assert mpox.metrics.decide(two_class([t - 1e-6]), 0, t) == [1]  # just below: negative
    m = mpox.metrics.metrics([0 if v else 1 for v in y], probs, CLASSES, 0, t)
    assert m['sensitivity'] == pytest.approx(0.8) and m['specificity'] == pytest.approx(2 / 3)


def test_log_loss_brier_and_ece_match_hand_computed_values():
    y = [True, False, True, True]
    p = [0.9, 0.2, 0.65, 0.3]
    c = mpox.metrics.calibration(y, p)
    assert c['log_loss'] == pytest.approx(-(math.log(0.9) + math.log(0.8) + math.log(0.65) + math.log(0.3)) / 4)
    assert c['brier'] == pytest.approx((0.01 + 0.04 + 0.1225 + 0.49) / 4)
    # bins of width 0.1: [0.9] alone, [0.2] alone, [0.65] alone, [0.3] alone: |share - p| each, weighted 1/4
    assert c['ece'] == pytest.approx((0.1 + 0.2 + 0.35 + 0.7) / 4)
    assert mpox.metrics.calibration([True, False], [0.55, 0.58])['ece'] == pytest.approx(abs(0.5 - 0.565))  # one bin


CLASSES = ['Monkey Pox', 'Others']


def two_class(p_pos):
    return [[p, 1 - p] for p in p_pos]
