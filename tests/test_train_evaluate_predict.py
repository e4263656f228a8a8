"""The foundation: data split, frozen backbone, best checkpoint, evaluate and predict, on real files."""
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import monkeypox as mp
from conftest import REPO, SCRIPT, TINY, make_dataset, script_env


# --- data ------------------------------------------------------------------------------------------


def test_train_and_val_folders_are_used_as_given(tmp_path, cli):
    make_dataset(tmp_path / 'd' / 'train', per_class=8)
    make_dataset(tmp_path / 'd' / 'val', per_class=4, seed=1)
    r = cli('train', '--data', tmp_path / 'd', '--out', tmp_path / 'chk', *TINY)
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(tmp_path / 'chk' / 'monkeypox_model.pkl', weights_only=True)
    assert ckpt['split']['how'] == 'folders'
    assert len(ckpt['split']['train']) == 16 and len(ckpt['split']['val']) == 8
    assert all(p.startswith('val' + os.sep) for p in ckpt['split']['val'])


# --- model -----------------------------------------------------------------------------------------


# --- checkpoint ------------------------------------------------------------------------------------


# --- evaluate and predict --------------------------------------------------------------------------

def test_evaluate_uses_the_checkpoints_validation_photos_and_says_so(trained, cli):
    data, checkpoint = trained
    ckpt = torch.load(checkpoint, weights_only=True)
    r = cli('evaluate', '--data', data, '--checkpoint', checkpoint, '--json', '--no-plot')
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    for key in ('accuracy', 'balanced_accuracy', 'sensitivity', 'specificity', 'auc', 'confusion_matrix',
                'classes', 'n', 'sensitivity_ci', 'specificity_ci', 'threshold'):
        assert key in m, key
    assert m['n'] == len(ckpt['split']['val']) and 'validation photos' in m['images']
    assert m['balanced_accuracy'] == pytest.approx(ckpt['metrics']['balanced_accuracy'], abs=1e-6)
    assert sum(map(sum, m['confusion_matrix'])) == m['n']
    every = json.loads(cli('evaluate', '--data', data, '--checkpoint', checkpoint, '--json', '--all',
                           '--no-plot').stdout)
    assert every['n'] == 32 and 'trained on' in every['images']


def test_evaluate_scores_any_other_folder_whole_and_prints_screening_metrics(trained, tmp_path, cli):
    _, checkpoint = trained
    other = make_dataset(tmp_path / 'other', per_class=5, seed=7)
    r = cli('evaluate', '--data', other, '--checkpoint', checkpoint, '--out', tmp_path / 'plots')
    assert r.returncode == 0, r.stderr
    assert 'all 10 photos' in r.stdout and 'sensitivity' in r.stdout and 'specificity' in r.stdout
    assert '95% CI' in r.stdout and 'not a diagnosis' in r.stdout


def test_predict_prints_one_line_per_photo_and_json_lines(trained, cli):
    data, checkpoint = trained
    one = data / 'Monkey Pox' / 'P0_1.jpg'
    r = cli('predict', one, data / 'Others', '--checkpoint', checkpoint, '--no-plot')
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if '\t' in line]
    assert len(lines) == 17 and lines[0].split('\t')[0] == str(one)
    r = cli('predict', one, '--checkpoint', checkpoint, '--json', '--no-plot')
    row = json.loads(r.stdout.strip())
    assert set(row) >= {'path', 'label', 'probability', 'probabilities'}
    assert row['label'] in ('Monkey Pox', 'Others')
    assert sum(row['probabilities'].values()) == pytest.approx(1, abs=1e-5)
    assert row['probability'] == pytest.approx(row['probabilities'][row['label']])


def test_prediction_plot_shows_the_photo_as_a_person_sees_it(trained, tmp_path, cli):
    data, checkpoint = trained
    photo = data / 'Others' / 'P1_1.jpg'
    plot = tmp_path / 'plot.png'
    r = cli('predict', photo, '--checkpoint', checkpoint, '--plot', plot)
    assert r.returncode == 0, r.stderr
    assert str(plot) in r.stdout
    pixels = np.asarray(Image.open(plot).convert('RGB')).reshape(-1, 3).astype(int)
    skin = np.median(np.asarray(Image.open(photo)).reshape(-1, 3), axis=0)
    # the photo's skin tone fills much of the picture; a normalised tensor would be false colours
    assert (np.abs(pixels - skin).max(axis=1) < 25).mean() > 0.2


@pytest.mark.slow
def test_the_default_run_follows_the_constants_at_the_top(tmp_path):
    data = make_dataset(tmp_path / 'monkeypoxdata', per_class=8)
    script = tmp_path / 'monkeypox.py'
    text = SCRIPT.read_text()
    for old, new in (("EPOCHS = 15 ", "EPOCHS = 2 "), ("UNFREEZE = 0 ", "UNFREEZE = 1 "),
                     ("ARCH = 'resnet101'", "ARCH = 'resnet18'"), ("WEIGHTS = 'auto'", "WEIGHTS = 'none'"),
                     ("VIEWS = 2 ", "VIEWS = 1 "), ("WEIGHT_DECAY = 'auto'", "WEIGHT_DECAY = 0.3"),
                     ("IMAGE_SIZE = 224 ", "IMAGE_SIZE = 96 "), ("RESIZE = 256 ", "RESIZE = 110 ")):
        assert old in text
        text = text.replace(old, new)
    script.write_text(text)
    (tmp_path / 'mpox').symlink_to(REPO / 'mpox')  # the edited script beside its package, as in a clone
    r = subprocess.run([sys.executable, '-X', 'importtime', str(script)], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600, env=script_env())
    assert r.returncode == 0, r.stderr
    imported = {line.rsplit('|', 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith('import time:')}
    assert 'torchvision' in imported and not imported & {'onnx', 'onnxruntime', 'onnxscript'}  # export's alone
    rows = list(csv.DictReader(open(tmp_path / 'chk' / 'summary.csv')))
    assert [r['stage'] for r in rows] == ['head', 'finetune', 'finetune']  # the head, then EPOCHS of fine-tuning
    config = json.load(open(tmp_path / 'chk' / 'config.json'))
    assert config['epochs'] == 2 and config['arch'] == 'resnet18' and config['lr'] == mp.LR
    assert torch.load(tmp_path / 'chk' / 'monkeypox_model.pkl', weights_only=True)['head']['weight_decay'] == 0.3
    assert 'predicting the held-out validation photo' in r.stdout
    assert (tmp_path / 'chk' / 'prediction.png').exists() and (tmp_path / 'chk' / 'class_dict.pk').exists()
    assert data.exists()


def test_weights_that_cannot_be_downloaded_name_the_file_and_the_fix(tmp_path, synthetic, cli):
    r = cli('train', '--data', synthetic, '--arch', 'resnet18', '--weights', 'DEFAULT', '--out', tmp_path / 'o',
            env={'TORCH_HOME': tmp_path / 'empty_home'})
    assert r.returncode == 2, r.stderr
    assert 'resnet18-f37072fd.pth' in r.stderr and str(tmp_path / 'empty_home') in r.stderr
    assert '--weights' in r.stderr and 'Traceback' not in r.stderr


def test_settings_without_flags_are_set_with_set_and_predict_follows_the_checkpoints_preprocessing(tmp_path, cli):
    data = make_dataset(tmp_path / 'd', per_class=6)
    r = cli('train', '--data', data, '--out', tmp_path / 'chk', *TINY,
            '--set', 'IMAGE_SIZE=160', '--set', 'RESIZE=176')
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(tmp_path / 'chk' / 'monkeypox_model.pkl', weights_only=True)
    assert ckpt['preprocess']['image_size'] == 160 and ckpt['preprocess']['resize'] == 176
    assert mp.IMAGE_SIZE == 224  # --set wrote the run's settings, not the module's constants
    r = cli('evaluate', '--data', data, '--checkpoint', tmp_path / 'chk' / 'monkeypox_model.pkl', '--json',
            '--no-plot')
    # evaluate reads the photos at the checkpoint's 160 px, so it reproduces the validation metrics
    assert json.loads(r.stdout)['balanced_accuracy'] == pytest.approx(ckpt['metrics']['balanced_accuracy'])
    assert mp.parse_args(['train', '--set', 'EPOCHS=3']).epochs == 3  # a setting with a flag: by its name too
    r = cli('train', '--data', data, '--set', 'EPOCH=3')
    assert r.returncode == 2 and '--set EPOCH=3: expected NAME=VALUE with NAME one of the settings' in r.stderr


# --- real photos -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_real_photos_train_with_the_defaults_and_beat_chance_on_held_out_patients(msld, msld_trained, tmp_path, cli):
    out, stdout = msld_trained
    assert stdout.count('head epoch') == 1 and 'chosen by 5 inner folds by patient' in stdout
    m = json.loads(cli('evaluate', '--data', msld, '--checkpoint', out / 'monkeypox_model.pkl', '--json',
                       '--no-plot').stdout)
    print('real-data validation:', {k: m[k] for k in ('n', 'accuracy', 'balanced_accuracy', 'sensitivity',
                                                      'specificity', 'auc')})
    assert m['n'] == 46
    assert m['balanced_accuracy'] >= 0.65
    ckpt = torch.load(out / 'monkeypox_model.pkl', weights_only=True)
    assert ckpt['weights']['source'] == 'MobileNet_V2_Weights.IMAGENET1K_V1'
    held_out = msld / ckpt['split']['val'][0]
    r = cli('predict', held_out, '--checkpoint', out / 'monkeypox_model.pkl', '--json', '--no-plot')
    row = json.loads(r.stdout)
    assert row['path'] == str(held_out) and row['label'] in ('Monkey Pox', 'Others')
    # a checkpoint holds everything: it scores the same from another folder, without the cache
    moved = tmp_path / 'elsewhere' / 'model.pkl'
    moved.parent.mkdir()
    shutil.copy(out / 'monkeypox_model.pkl', moved)
    again = json.loads(cli('predict', held_out, '--checkpoint', moved, '--json', '--no-plot').stdout)
    assert again['probabilities'] == row['probabilities']
