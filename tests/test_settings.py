"""One source of settings: the constants at the top are the defaults, every flag a command accepts is
honoured, and main() leaves its process as it found it."""
import json
import random
import signal

import numpy as np
import pytest
import torch

import monkeypox as mp
import mpox.images
import mpox.system
import mpox.training
from conftest import TINY, call_main, make_dataset


class LoaderSpy(torch.utils.data.DataLoader):
    """torch's DataLoader, unchanged, that remembers how each one was made (workers, batch sizes)."""
    made = []

    def __init__(self, dataset, **kw):
        super().__init__(dataset, **kw)
        sizes = [len(b) for b in kw['batch_sampler']] if kw.get('batch_sampler') else [kw.get('batch_size')]
        LoaderSpy.made.append({'workers': self.num_workers, 'sizes': sizes, 'views': dataset.views[0]})


@pytest.fixture
def loaders(monkeypatch):
    LoaderSpy.made = []
    monkeypatch.setattr(torch.utils.data, 'DataLoader', LoaderSpy)
    return LoaderSpy.made


def test_every_setting_is_in_cfg_with_the_constant_as_its_default():
    for command in (['train'], ['predict', 'x.jpg'], ['evaluate'], ['cv'], ['download']):
        cfg = mp.parse_args(command)
        for name in mp.SETTINGS:
            assert hasattr(cfg, mp.setting(name)), (command, name)
    cfg = mp.parse_args(['train'])
    assert (cfg.epochs, cfg.lr, cfg.views, cfg.image_size, cfg.mean) == (mp.EPOCHS, mp.LR, mp.VIEWS, mp.IMAGE_SIZE,
                                                                          mp.MEAN)


def test_workers_accepts_minus_one_its_constants_auto():
    assert mp.WORKERS == -1 and mp.parse_args(['train']).workers == -1
    assert mp.parse_args(['predict', 'x.jpg', '--workers', '-1']).workers == -1
    assert mpox.images.decode_workers(-1, torch.device('cpu')) >= 0 and mpox.images.decode_workers(3, torch.device('cpu')) == 3
    r = call_main('train', '--workers', '-2')
    assert r.returncode == 2 and '--workers' in r.stderr


def test_set_writes_the_runs_settings_and_leaves_the_constants_alone():
    cfg = mp.parse_args(['train', '--set', 'IMAGE_SIZE=160', '--set', 'MEAN=(0.5, 0.5, 0.5)'])
    assert cfg.image_size == 160 and cfg.mean == (0.5, 0.5, 0.5)
    assert mp.IMAGE_SIZE == 224 and mp.MEAN == (0.485, 0.456, 0.406)
    assert mpox.images.preprocessing(cfg)['image_size'] == 160


@pytest.mark.parametrize('command', ['predict', 'evaluate'])
def test_predict_and_evaluate_honour_workers_and_extract_batch_size(trained, cli, loaders, command):
    data, checkpoint = trained
    where = [data / 'Others'] if command == 'predict' else ['--data', data, '--all']
    r = cli(command, *where, '--checkpoint', checkpoint, '--workers', '1', '--extract-batch-size', '3', '--no-plot')
    assert r.returncode == 0, r.stderr
    assert loaders and all(made['workers'] == 1 for made in loaders)
    assert max(max(made['sizes']) for made in loaders) == 3


@pytest.mark.slow
def test_fine_tuning_validation_honours_workers_and_extract_batch_size(tmp_path, cli, loaders):
    data = make_dataset(tmp_path / 'd', per_class=8)
    r = cli('train', '--data', data, '--unfreeze', '1', '--epochs', '1', '--out',
            tmp_path / 'chk', '--workers', '1', '--extract-batch-size', '2', '--no-cache', *TINY)
    assert r.returncode == 0, r.stderr
    validation = [made for made in loaders if made['views'] == ['eval']]
    assert len(validation) >= 2  # the features' pass and fine-tuning's validation pass
    assert all(made['workers'] == 1 and max(made['sizes']) == 2 for made in validation)


def test_target_sensitivity_without_positive_validation_photos_falls_back_to_the_threshold_flag(tmp_path, cli):
    make_dataset(tmp_path / 'd' / 'train', per_class=6)
    make_dataset(tmp_path / 'd' / 'val', per_class=3, seed=1)
    for f in (tmp_path / 'd' / 'val' / 'Monkey Pox').iterdir():
        f.unlink()
    (tmp_path / 'd' / 'val' / 'Monkey Pox').rmdir()
    r = cli('train', '--data', tmp_path / 'd', '--threshold', '0.3', '--target-sensitivity', '0.9',
            '--out', tmp_path / 'chk', *TINY)
    assert r.returncode == 0, r.stderr
    assert torch.load(tmp_path / 'chk' / 'monkeypox_model.pkl', weights_only=True)['threshold'] == 0.3
    assert mpox.training.select_threshold([False, False], [0.2, 0.9], 0.9, fallback=0.3) == 0.3


def test_the_default_run_hands_predict_the_settings_it_was_given(tmp_path, cli, monkeypatch, loaders):
    make_dataset(tmp_path / 'monkeypoxdata', per_class=6)
    given, predict = [], mp.predict
    monkeypatch.setattr(mp, 'predict', lambda cfg: given.append(cfg) or predict(cfg))  # the real predict, recorded
    r = cli(*TINY, '--precision', 'fp32', '--device', 'cpu', '--workers', '0', '--extract-batch-size', '3',
            '--compile', 'never', '--set', 'STD=(0.25, 0.25, 0.25)', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert 'predicting the held-out validation photo' in r.stdout
    assert sum('\t' in line for line in r.stdout.splitlines()) == 1
    (shown,) = given
    assert shown.command == 'predict' and shown.checkpoint.endswith('monkeypox_model.pkl') and len(shown.paths) == 1
    assert (shown.precision, shown.device, shown.workers, shown.extract_batch_size, shown.compile) == \
        ('fp32', 'cpu', 0, 3, 'never')
    assert (shown.image_size, shown.resize, shown.std, shown.no_plot) == (96, 110, (0.25, 0.25, 0.25), True)
    assert loaders[-1]['views'] == ['eval'] and loaders[-1]['workers'] == 0  # predict's own pass


def test_main_leaves_its_process_as_it_found_it(tmp_path, synthetic):
    handler = signal.getsignal(signal.SIGTERM)
    torch.manual_seed(123)
    random.seed(4)
    np.random.seed(5)
    states = torch.random.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    r = call_main('train', '--data', synthetic, '--out', tmp_path / 'chk', *TINY)
    assert r.returncode == 0, r.stderr
    r = call_main('evaluate', '--data', synthetic, '--checkpoint', tmp_path / 'chk' / 'monkeypox_model.pkl',
                  '--json', '--no-plot')
    assert json.loads(r.stdout)['n'] > 0
    assert signal.getsignal(signal.SIGTERM) is handler
    assert not mpox.system.muted() and not mpox.system.TO_STDERR.get()
    assert (mpox.system.rank(), mpox.system.world()) == (0, 1) and not torch.distributed.is_initialized()
    assert torch.equal(torch.random.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
