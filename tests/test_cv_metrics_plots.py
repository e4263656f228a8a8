"""Screening-grade evaluation: grouped folds, metrics, the operating point, pictures."""
import hashlib
import json
import math

import numpy as np
import pytest
from PIL import Image, ImageDraw

import monkeypox as mp
import mpox.checkpoint
import mpox.data
import mpox.devices
import mpox.gradcam
import mpox.images
import mpox.pipeline
import mpox.precision
from conftest import TINY, draw_photo, make_dataset


# --- grouped folds ---------------------------------------------------------------------------------


# --- metrics ---------------------------------------------------------------------------------------


# --- operating point -------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_training_threshold_is_stored_and_used_by_predict_and_evaluate(tmp_path, cli):
    data = make_dataset(tmp_path / 'd', per_class=10)
    out = tmp_path / 'chk'
    assert cli('train', '--data', data, '--out', out, '--target-sensitivity', '1.0',
               *TINY).returncode == 0
    ckpt = __import__('torch').load(out / 'monkeypox_model.pkl', weights_only=True)
    m = json.loads(cli('evaluate', '--data', data, '--checkpoint', out / 'monkeypox_model.pkl', '--json',
                       '--no-plot').stdout)
    assert m['threshold'] == ckpt['threshold'] and m['sensitivity'] == 1.0
    # the checkpoint's validation metrics are those of its own threshold: evaluate on the same photos agrees
    assert ckpt['metrics']['threshold'] == ckpt['threshold']
    for key in ('sensitivity', 'specificity', 'balanced_accuracy'):
        assert m[key] == pytest.approx(ckpt['metrics'][key]), key
    r = cli('evaluate', '--data', data, '--checkpoint', out / 'monkeypox_model.pkl', '--no-plot')
    assert f'P(Monkey Pox) >= {ckpt["threshold"]:.2f}' in r.stdout


# --- pictures --------------------------------------------------------------------------------------

def assert_picture(path, size):
    img = Image.open(path)
    img.verify()  # a valid PNG
    img = Image.open(path)
    assert img.format == 'PNG' and img.size == size, (path, img.size)
    assert np.asarray(img.convert('L'), dtype=float).std() > 5, f'{path} looks blank'


@pytest.mark.slow
def test_train_writes_curves_and_summary_and_evaluate_writes_confusion_roc_and_sheet(tmp_path, cli):
    data = make_dataset(tmp_path / 'd', per_class=10)
    out = tmp_path / 'chk'
    assert cli('train', '--data', data, '--out', out, *TINY[:-1]).returncode == 0
    assert_picture(out / 'curves.png', (500, 400))  # the head's weight decay: its inner-cv curve
    assert len((out / 'summary.csv').read_text().splitlines()) == 2  # a header and the head
    assert cli('train', '--data', data, '--out', out, '--unfreeze', '1', '--epochs', '2', *TINY[:-1]).returncode == 0
    assert_picture(out / 'curves.png', (1500, 400))  # and fine-tuning's epochs
    r = cli('evaluate', '--data', data, '--checkpoint', out / 'monkeypox_model.pkl', '--sheet', '--out', tmp_path / 'e')
    assert r.returncode == 0, r.stderr
    for name, size in (('confusion.png', (550, 450)), ('roc.png', (500, 500))):
        assert str(tmp_path / 'e' / name) in r.stdout
        assert_picture(tmp_path / 'e' / name, size)
    sheet = Image.open(tmp_path / 'e' / 'sheet.png')
    assert sheet.width == 1320
    assert_picture(tmp_path / 'e' / 'sheet.png', sheet.size)


def test_no_plot_writes_no_pictures(tmp_path, cli):
    data = make_dataset(tmp_path / 'd', per_class=6)
    out = tmp_path / 'chk'
    assert cli('train', '--data', data, '--out', out, *TINY).returncode == 0
    r = cli('evaluate', '--data', data, '--checkpoint', out / 'monkeypox_model.pkl', '--no-plot')
    assert r.returncode == 0, r.stderr
    assert not list(out.glob('*.png'))


# --- Grad-CAM ----------------------------------------------------------------------------------------

def disc_photo(rng, red_disc, size=256, margin=40):
    """Skin with three brown spots in both classes; the positive class alone has a red disc (radius
    26-34 px, 4-7% of the 224 px crop) at a random place. Returns the photo and the disc (x, y, r) in
    the coordinates of the centre crop the model sees, or None."""
    img, _ = draw_photo(rng, (150, 100, 70), size=size, radius=(10, 20), margin=margin, noise=8)
    if not red_disc:
        return img, None
    r = int(rng.integers(26, 34))
    x, y = (int(v) for v in rng.integers(r + margin, size - r - margin, 2))
    ImageDraw.Draw(img).ellipse([x - r, y - r, x + r, y + r], fill=(200, 30, 40))
    offset = (size - mp.IMAGE_SIZE) // 2  # Resize(256) keeps a 256 px photo; CenterCrop(224) cuts this
    return img, (x - offset, y - offset, r)


@pytest.mark.slow
def test_grad_cam_puts_its_maximum_inside_the_red_disc_that_decides_the_class(tmp_path, torch_home, cli):
    rng = np.random.default_rng(0)
    for split, n in (('train', 24), ('val', 6)):
        for name, red in (('Monkey Pox', True), ('Others', False)):
            (tmp_path / 'd' / split / name).mkdir(parents=True)
            for i in range(n):
                disc_photo(rng, red)[0].save(tmp_path / 'd' / split / name / f'P{i}_1.jpg', quality=92)
    int8 = ['--precision', 'int8'] if mpox.devices.int8_engine() else []  # explained through its int8 network, emulated
    r = cli('train', '--data', tmp_path / 'd', '--arch', 'mobilenet_v2', '--weights', 'IMAGENET1K_V1', '--views', '1',
            '--out', tmp_path / 'chk', '--no-plot', '--no-cache', *int8, env={'TORCH_HOME': str(torch_home)})
    assert r.returncode == 0, r.stderr
    cfg = mp.parse_args(['predict', 'x', '--device', 'cpu'])  # the checkpoint's precision
    loaded = mpox.checkpoint.load_checkpoint(str(tmp_path / 'chk' / 'monkeypox_model.pkl'), cfg)
    photos = []
    for i in range(20):
        img, disc = disc_photo(rng, True)
        img.save(tmp_path / f'test{i}.jpg', quality=92)
        photos.append((str(tmp_path / f'test{i}.jpg'), disc))
    probs, _, failures = mpox.pipeline.checkpoint_probabilities(loaded, [mpox.data.Photo(path, 0, '') for path, _ in photos], cfg, 'test')
    assert not failures
    hits, misses, explain = 0, [], mpox.gradcam.grad_cam(loaded.model, loaded.pre, mpox.precision.explained_qparams(cfg, loaded))
    for i, (path, (x, y, radius)) in enumerate(photos):
        predicted = int(np.argmax(probs[i]))  # the class predict --explain shows
        crop, heat = explain(mpox.images.load_rgb(path, draft=loaded.pre['resize']), predicted)
        assert crop.shape[:2] == heat.shape == (224, 224) and heat.min() == 0 and heat.max() == pytest.approx(1)
        iy, ix = np.unravel_index(heat.argmax(), heat.shape)
        if math.hypot(ix - x, iy - y) <= radius:
            hits += 1
        else:
            misses.append((i, int(math.hypot(ix - x, iy - y)), radius))
    print(f'Grad-CAM maximum inside the disc on {hits}/20 photos; misses (photo, distance, radius): {misses}')
    assert hits >= 16  # 80%


@pytest.mark.slow
def test_predict_explain_draws_the_photo_beside_its_grad_cam_for_resnets_too(tmp_path, cli):
    data = make_dataset(tmp_path / 'd', per_class=6)
    out = tmp_path / 'chk'
    assert cli('train', '--data', data, '--out', out, *TINY).returncode == 0
    photos = sorted((data / 'Monkey Pox').glob('*.jpg'))[:2]
    r = cli('predict', *photos, '--checkpoint', out / 'monkeypox_model.pkl', '--explain', '--plot',
            tmp_path / 'p.png')
    assert r.returncode == 0, r.stderr
    plain = cli('predict', *photos, '--checkpoint', out / 'monkeypox_model.pkl', '--plot', tmp_path / 'q.png')
    assert plain.returncode == 0, plain.stderr
    explained, without = Image.open(tmp_path / 'p.png'), Image.open(tmp_path / 'q.png')
    assert explained.width == 2 * without.width  # a heat-map panel beside every photo
    assert_picture(tmp_path / 'p.png', explained.size)


# --- cross-validation ------------------------------------------------------------------------------

@pytest.mark.slow
def test_cv_reports_folds_mean_std_and_pooled_metrics_with_the_keys_of_evaluate(tmp_path, cli):
    data = make_dataset(tmp_path / 'd', per_class=15)
    r = cli('cv', '--data', data, '--folds', '3', '--arch', 'resnet18', '--weights', 'none',
            '--views', '1', '--out', tmp_path / 'chk', '--json')
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert len(report['folds']) == 3 and sum(f['test'] for f in report['folds']) == 30
    evaluate_keys = {'accuracy', 'balanced_accuracy', 'sensitivity', 'specificity', 'auc', 'confusion_matrix',
                     'classes', 'n'}
    for part in report['folds'] + [report['mean'], report['std']]:
        assert evaluate_keys <= set(part)
    accs = [f['accuracy'] for f in report['folds']]
    assert report['mean']['accuracy'] == pytest.approx(np.mean(accs))
    assert report['std']['accuracy'] == pytest.approx(np.std(accs, ddof=1))
    pooled = report['pooled']
    assert pooled['n'] == 30 and len(pooled['sensitivity_ci']) == 2
    assert sum(map(sum, pooled['confusion_matrix'])) == 30
    assert [v['prevalence'] for v in report['predictive_values']] == [0.01, 0.1, 0.5]  # PPV/NPV where mpox is rare
    assert report['predictive_values'][0]['ppv'] <= report['predictive_values'][2]['ppv']
    assert_picture(tmp_path / 'chk' / 'cv' / 'confusion.png', (550, 450))
    assert_picture(tmp_path / 'chk' / 'cv' / 'roc.png', (500, 500))


@pytest.mark.slow
def test_cv_on_real_photos_beats_chance_by_a_margin(msld, msld_trained, torch_home, tmp_path, cli):
    cache = msld_trained[0] / 'cache'  # train's features: cv computes only what train did not
    r = cli('cv', '--data', msld, '--folds', '5', '--arch', 'mobilenet_v2', '--weights', 'IMAGENET1K_V1',
            '--out', tmp_path / 'chk', '--cache', cache, '--json', '--no-plot', '--precision', 'fp32',
            env={'TORCH_HOME': str(torch_home)})
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    print('real-data 5-fold cv mean:', {k: round(report['mean'][k], 3) for k in
                                        ('accuracy', 'balanced_accuracy', 'sensitivity', 'specificity', 'auc')})
    held = set(report['calibration_only'])
    if report['precision'] == 'int8':  # the patients of the first photos by content hash calibrate: never scored
        by_hash = sorted((hashlib.sha256(p.read_bytes()).hexdigest(), str(p)) for p in msld.rglob('*.jpg'))
        assert {path for _, path in by_hash[:mp.CALIBRATION_PHOTOS]} <= held and len(held) < 228 // 4
    else:
        assert not held
    assert report['pooled']['n'] == 228 - len(held)
    assert report['mean']['balanced_accuracy'] >= 0.65
