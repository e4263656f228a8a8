"""Knowing when not to answer, and what a positive means: the out-of-distribution detector (mpox.ood), its
warning wherever an answer is given, and PPV/NPV at a stated prevalence."""
import json

import pytest
import torch
from PIL import Image

import mpox.metrics
import mpox.ood
from conftest import TINY, make_dataset, one_line_error


def test_a_photo_far_from_every_training_photo_is_flagged_and_a_training_photo_is_not():
    g = torch.Generator().manual_seed(0)
    centres = torch.rand(6, 64, generator=g) * 4  # six patients' photos, ReLU-like features around six points
    x = (centres.repeat_interleave(5, 0) + 0.2 * torch.rand(30, 64, generator=g)).double()
    folds = [i // 5 % 3 for i in range(30)]  # by patient: a patient's photos in one fold
    ood = mpox.ood.fit_ood(x, folds, coverage=0.9)
    assert ood['photos'] == 30 and ood['threshold'] > 0 and ood['bank'].shape == (30, 64)
    far = torch.zeros(1, 64, dtype=torch.float64)
    far[0, :8] = 5  # a direction no training photo has
    scores = mpox.ood.ood_scores(torch.cat([x[:3], far]), ood)
    assert scores[:3].max() < 1e-3 < ood['threshold'] < scores[3]  # itself is its nearest training photo
    assert mpox.ood.fit_ood(x, [0] * 30, 0.9) is None  # one fold: nothing held out to set the threshold on


def test_the_threshold_lets_the_stated_share_of_held_out_photos_pass():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(200, 32, generator=g).double()
    folds = [i % 5 for i in range(200)]
    for coverage in (0.5, 0.8, 0.95):
        ood = mpox.ood.fit_ood(x, folds, coverage)
        held = torch.cat([mpox.ood.distances(x[[i for i in range(200) if folds[i] == k]],
                                             mpox.ood.normalised(x[[i for i in range(200) if folds[i] != k]]))
                          for k in range(5)])
        assert float((held <= ood['threshold']).double().mean()) == pytest.approx(coverage, abs=0.01)


def test_ppv_at_the_evaluated_photos_own_prevalence_is_their_precision():
    labels = [0] * 30 + [1] * 70
    probs = [[p, 1 - p] for p in [0.9] * 21 + [0.2] * 9 + [0.8] * 14 + [0.1] * 56]
    m = mpox.metrics.metrics(labels, probs, ['Monkey Pox', 'Others'], 0, 0.5)
    v = mpox.ood.predictive_values(m, prevalence=0.3)
    assert v['ppv'] == pytest.approx(m['precision']['Monkey Pox']) and v['npv'] == pytest.approx(m['precision']['Others'])
    assert v['ppv_ci'][0] < v['ppv'] < v['ppv_ci'][1] and v['npv_ci'][0] < v['npv'] < v['npv_ci'][1]
    rare = mpox.ood.predictive_values(m, prevalence=0.01)
    assert rare['ppv'] < 0.1 < v['ppv'] and rare['npv'] > v['npv']  # a rare disease: most positives are false


def test_the_post_test_probability_moves_the_odds_by_the_prevalences():
    assert mpox.ood.post_test_probability(0.7, 0.45, 0.45) == pytest.approx(0.7)
    low = mpox.ood.post_test_probability(0.7, 0.45, 0.01)
    assert low == pytest.approx(1 / (1 + 0.3 / 0.7 * 0.45 / 0.55 * 0.99 / 0.01))
    assert mpox.ood.post_test_probability(0.0, 0.45, 0.5) == 0.0


def far_photos(folder):
    folder.mkdir()
    Image.new('RGB', (96, 96), (20, 60, 220)).save(folder / 'flat-blue.jpg')
    Image.new('RGB', (96, 96), (250, 250, 250)).save(folder / 'white.jpg')
    return folder


def test_predict_warns_of_photos_unlike_the_training_photos(trained, tmp_path, cli):
    data, checkpoint = trained
    far = far_photos(tmp_path / 'far')
    ckpt = torch.load(checkpoint, weights_only=True)
    assert ckpt['ood']['k'] == mpox.ood.OOD_NEIGHBOURS and ckpt['ood']['coverage'] == 0.95
    train_photo = data / ckpt['split']['train'][0]
    r = cli('predict', far, train_photo, '--checkpoint', checkpoint, '--json', '--no-plot', '--prevalence', '0.05')
    assert r.returncode == 0, r.stderr
    rows = {row['path']: row for row in map(json.loads, r.stdout.splitlines())}
    assert all(rows[str(p)]['unlike_training'] for p in far.iterdir())
    assert rows[str(train_photo)]['unlike_training'] is False and rows[str(train_photo)]['ood_score'] < 1e-3
    assert all(0 <= row['post_test_probability'] <= 1 and row['prevalence'] == 0.05 for row in rows.values())
    text = cli('predict', far / 'white.jpg', '--checkpoint', checkpoint, '--no-plot').stdout
    assert 'warning: unlike the training photos' in text


def test_a_checkpoint_without_a_detector_answers_with_a_null_score_and_a_note(trained, tmp_path, cli):
    data, checkpoint = trained
    ckpt = torch.load(checkpoint, weights_only=True)
    del ckpt['ood']
    torch.save(ckpt, tmp_path / 'older.pkl')
    r = cli('predict', data / 'Others', '--checkpoint', tmp_path / 'older.pkl', '--json', '--no-plot')
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert rows and all(row['ood_score'] is None and row['unlike_training'] is None for row in rows)
    assert r.stderr.count('has no out-of-distribution detector') == 1


@pytest.mark.slow
def test_evaluate_counts_the_flagged_photos_measures_an_ood_folder_and_gives_ppv_npv(trained, tmp_path, cli):
    data, checkpoint = trained
    far = far_photos(tmp_path / 'far')
    r = cli('evaluate', '--data', data, '--checkpoint', checkpoint, '--json', '--no-plot', '--ood', far,
            '--prevalence', '0.1')
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m['ood']['n'] == m['n'] and 0 <= m['ood']['flagged'] <= m['n']
    assert m['ood']['ood_n'] == 2 and m['ood']['ood_flagged'] == 2 and m['ood']['ood_auroc'] == 1.0
    assert m['prevalence'] == 0.1 and 0 <= m['ppv_ci'][0] <= m['ppv'] <= m['ppv_ci'][1] <= 1
    text = cli('evaluate', '--data', data, '--checkpoint', checkpoint, '--no-plot', '--prevalence', '0.1').stdout
    assert 'at a prevalence of 0.1: PPV' in text and 'out of distribution:' in text


@pytest.mark.slow
def test_bad_out_of_distribution_and_prevalence_requests_are_one_line_errors(trained, tmp_path, cli):
    data, checkpoint = trained
    (tmp_path / 'empty').mkdir()
    for folder in (tmp_path / 'missing', tmp_path / 'empty'):
        one_line_error(cli('evaluate', '--data', data, '--checkpoint', checkpoint, '--ood', folder, '--no-plot'),
                       '--ood', folder)
    for bad in ('0', '1', '1.5', '-0.2'):
        r = cli('evaluate', '--data', data, '--checkpoint', checkpoint, '--prevalence', bad)
        assert r.returncode == 2 and '--prevalence' in r.stderr and 'Traceback' not in r.stderr
    plain = make_dataset(tmp_path / 'ab', per_class=6, classes=('apples', 'pears'))
    assert cli('train', '--data', plain, '--out', tmp_path / 'chk', *TINY).returncode == 0
    one_line_error(cli('predict', plain / 'pears', '--checkpoint', tmp_path / 'chk' / 'monkeypox_model.pkl',
                       '--prevalence', '0.1', '--no-plot'), '--prevalence', 'no screened class')
