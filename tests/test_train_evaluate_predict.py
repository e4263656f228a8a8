"""The foundation: data split, frozen backbone, best checkpoint, evaluate and predict, on real files."""
import csv
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import monkeypox as mp
import mpox.checkpoint
import mpox.data
import mpox.head
import mpox.images
import mpox.model
import mpox.training
from conftest import SCRIPT, TINY, make_dataset, script_env


def photos_of(root):
    return mpox.data.read_photos(str(root))[1]


# --- data ------------------------------------------------------------------------------------------

def test_group_key_drops_the_photo_number_but_keeps_the_class():
    assert mpox.data.group_key('d/Monkey Pox/P13_1.jpg') == mpox.data.group_key('d/Monkey Pox/P13_2.jpg') == ('Monkey Pox', 'P13')
    assert mpox.data.group_key('d/Others/11.jpg') == mpox.data.group_key('d/Others/11_1.jpg')
    assert mpox.data.group_key('d/Others/58_!.jpg') == ('Others', '58_!')
    assert mpox.data.group_key('d/Others/P13_1.jpg') != mpox.data.group_key('d/Monkey Pox/P13_1.jpg')


def test_split_keeps_each_patient_and_each_duplicate_on_one_side(msld):
    photos = photos_of(msld)
    train, val = mpox.data.grouped_split(photos, 0.2, seed=0)
    assert len(train) + len(val) == len(photos) == 228
    assert {mpox.data.group_key(p.path) for p in train}.isdisjoint({mpox.data.group_key(p.path) for p in val})
    side = {os.path.relpath(p.path, msld): 'val' for p in val}
    # Others/34_1.jpg and Others/82_1.jpg are the same bytes under two names
    assert side.get('Others/34_1.jpg', 'train') == side.get('Others/82_1.jpg', 'train')


def test_split_is_stratified_by_class_and_fixed_by_the_seed(msld):
    photos = photos_of(msld)
    train, val = mpox.data.grouped_split(photos, 0.2, seed=0)
    for label, n in ((0, 102), (1, 126)):
        held = sum(p.label == label for p in val)
        assert abs(held - 0.2 * n) <= 5  # within the largest patient (5 photos)
    assert [p.path for p in mpox.data.grouped_split(photos, 0.2, seed=0)[1]] == [p.path for p in val]
    assert [p.path for p in mpox.data.grouped_split(photos, 0.2, seed=1)[1]] != [p.path for p in val]


def test_train_and_val_folders_are_used_as_given(tmp_path, cli):
    make_dataset(tmp_path / 'd' / 'train', per_class=8)
    make_dataset(tmp_path / 'd' / 'val', per_class=4, seed=1)
    r = cli('train', '--data', tmp_path / 'd', '--out', tmp_path / 'chk', *TINY)
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(tmp_path / 'chk' / 'monkeypox_model.pkl', weights_only=True)
    assert ckpt['split']['how'] == 'folders'
    assert len(ckpt['split']['train']) == 16 and len(ckpt['split']['val']) == 8
    assert all(p.startswith('val' + os.sep) for p in ckpt['split']['val'])


def test_images_of_any_mode_become_rgb(tmp_path):
    Image.new('L', (20, 10), 128).save(tmp_path / 'grey.png')
    Image.new('RGBA', (20, 10), (255, 0, 0, 0)).save(tmp_path / 'clear.png')  # transparent: shows as white
    Image.new('P', (20, 10), 3).save(tmp_path / 'palette.png')
    for name in ('grey.png', 'clear.png', 'palette.png'):
        img = mpox.images.load_rgb(tmp_path / name)
        assert img.mode == 'RGB' and img.size == (20, 10)
    assert mpox.images.load_rgb(tmp_path / 'clear.png').getpixel((0, 0)) == (255, 255, 255)


# --- model -----------------------------------------------------------------------------------------

@pytest.mark.parametrize('arch', ['resnet101', 'resnet50', 'resnet18', 'mobilenet_v2'])
def test_architectures_get_a_new_head_with_one_output_per_class(arch):
    model = mpox.model.build_model(arch, 3)
    head, _ = mpox.model.freeze(model)
    assert isinstance(head, torch.nn.Linear) and head.out_features == 3
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [f'{mpox.model.head_name(model)}.weight',
                                                                           f'{mpox.model.head_name(model)}.bias']
    with torch.inference_mode():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 3)


def test_backbone_is_bit_identical_after_training_batchnorm_statistics_included(trained):
    _, checkpoint = trained
    saved = torch.load(checkpoint, weights_only=True)['model']
    fresh = mpox.model.build_model('resnet18', 2, seed=0).state_dict()  # --weights none: same seed, same init
    backbone = [k for k in fresh if not k.startswith('fc.')]
    assert any('running_mean' in k for k in backbone)
    for k in backbone:
        assert torch.equal(saved[k], fresh[k]), k
    assert not torch.equal(saved['fc.weight'], fresh['fc.weight'])


def test_run_keeps_a_copy_of_the_best_epoch_not_a_reference_to_live_weights(tmp_path):
    model = mpox.model.build_model('resnet18', 2)
    mpox.model.freeze(model)
    cfg = mp.parse_args(['train', '--out', str(tmp_path)])
    meta = {'fingerprint': 'x', 'classes': ['a', 'b'], 'config': {}}
    run = mpox.training.Run(cfg, model, None, None, ['a', 'b'], 0, meta=meta, checkpoint=cfg.checkpoint)
    opt = torch.optim.Adam(model.fc.parameters())
    weights = []
    for epoch, score in enumerate([0.6, 0.9, 0.7], 1):
        with torch.no_grad():
            model.fc.weight.add_(1.0)  # training changes the live tensors in place
        weights.append(model.fc.weight.clone())
        m = {'balanced_accuracy': score, 'loss': 1 - score, 'accuracy': score}
        run.end_epoch('finetune', epoch, 3, {'loss': 0.0, 'accuracy': 0.0}, {'metrics': m, 'threshold': 0.5,
                                                                             'operating': m}, opt, 0.0)
    run.finish()
    saved = torch.load(tmp_path / 'monkeypox_model.pkl', weights_only=True)
    assert saved['epoch'] == 2
    assert torch.equal(saved['model']['fc.weight'], weights[1])


# --- checkpoint ------------------------------------------------------------------------------------

def test_checkpoint_is_self_describing_and_loads_with_weights_only(trained):
    _, checkpoint = trained
    ckpt = torch.load(checkpoint, weights_only=True, map_location='cpu')
    for key in ('model', 'arch', 'classes', 'preprocess', 'positive_class', 'weights', 'config', 'epoch',
                'metrics', 'split', 'versions', 'threshold'):
        assert key in ckpt, key
    assert ckpt['classes'] == ['Monkey Pox', 'Others'] and ckpt['positive_class'] == 'Monkey Pox'
    assert ckpt['preprocess'] == {'image_size': 224, 'resize': 256, 'mean': list(mp.MEAN), 'std': list(mp.STD)}
    assert ckpt['model']['fc.weight'].shape == (2, 512)
    assert set(ckpt['split']['train']).isdisjoint(ckpt['split']['val'])
    assert ckpt['versions']['torch'] == str(torch.__version__)
    assert ckpt['metrics']['balanced_accuracy'] == ckpt['history'][0]['val_balanced_accuracy']
    assert ckpt['stage'] == 'head' and ckpt['head']['auto'] and ckpt['head']['weight_decay'] in mpox.head.HEAD_GRID
    assert ckpt['head']['search']['choice'] == ckpt['head']['weight_decay'] and ckpt['head']['temperature'] > 0


def test_class_map_is_written_and_read_back_as_plain_data(trained):
    _, checkpoint = trained
    path = checkpoint.parent / 'class_dict.pk'
    assert mpox.checkpoint.read_class_map(path) == {0: 'Monkey Pox', 1: 'Others'}
    with open(path, 'rb') as f:
        assert pickle.load(f) == {0: 'Monkey Pox', 1: 'Others'}


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
                     ("IMAGE_SIZE = 224 ", "IMAGE_SIZE = 112 "), ("RESIZE = 256 ", "RESIZE = 128 ")):
        assert old in text
        text = text.replace(old, new)
    script.write_text(text)
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
