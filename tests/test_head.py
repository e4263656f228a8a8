"""The head: an L2-penalised logistic regression on standardised features, fit to convergence, its penalty
chosen by grouped inner cross-validation, its probabilities calibrated; the same whatever --seed."""
import json

import numpy as np
import pytest
import torch
import torchvision

import monkeypox as mp
import mpox.data
import mpox.features
import mpox.head
import mpox.model
import mpox.training
from conftest import TINY, make_dataset, one_line_error


def full_gradient(x, y, weight, bias, lam, num_classes):
    """The gradient of mean cross-entropy + lam/2 |W|^2 over every standardised feature, at the fitted Linear:
    zero at the exact minimiser, which the fit in the rows' span must be."""
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    z, w = (x - mean) / std, weight.double() * std  # the Linear on raw features is W / std on standardised ones
    p = (x @ weight.double().T + bias.double()).softmax(1)
    residual = (p - torch.nn.functional.one_hot(y, num_classes).double()) / len(y)
    return torch.cat([(residual.T @ z + lam * w).flatten(), residual.sum(0)])


@pytest.mark.parametrize('rows, features, classes', [(60, 200, 2), (90, 300, 3), (400, 30, 2)])
def test_the_fit_in_the_rows_span_is_the_exact_minimiser_and_folds_back_into_a_linear(rows, features, classes):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(rows) % classes
    x = torch.randn(rows, features, generator=g, dtype=torch.float64).clamp_min(0) + y[:, None] * 0.2  # ReLU-like
    space = mpox.head.RowSpace(x)
    theta = mpox.head.newton_softmax(space.a, y, classes, 0.3)
    weight, bias = space.linear(theta)
    assert full_gradient(x, y, weight, bias, 0.3, classes).abs().max() < 1e-5
    # the folded standardisation scores as the fit did, to within float32 rounding
    fitted = (space.a @ theta @ mpox.head.helmert(classes).T).softmax(1)
    assert (fitted - (x.float() @ weight.T + bias).softmax(1)).abs().max() < 1e-6


def test_a_large_problem_is_solved_by_conjugate_gradients_to_the_same_minimiser():
    g = torch.Generator().manual_seed(1)
    y = torch.arange(1100) % 2
    x = torch.randn(1100, 1400, generator=g, dtype=torch.float64) + y[:, None] * 0.05
    space = mpox.head.RowSpace(x)
    assert space.a.shape[1] > 1024  # past the size for which newton_step forms the Hessian
    weight, bias = space.linear(mpox.head.newton_softmax(space.a, y, 2, 1.0))
    assert full_gradient(x, y, weight, bias, 1.0, 2).abs().max() < 1e-5


def test_temperature_scaling_recovers_the_temperature_that_made_the_labels():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(20000, 3, generator=g, dtype=torch.float64) * 3
    y = torch.multinomial((logits / 2.5).softmax(1), 1, generator=g)[:, 0]
    assert mpox.head.fit_temperature(logits, y) == pytest.approx(2.5, rel=0.05)


def test_the_inner_folds_keep_each_patient_together_and_take_no_seed(msld):
    _, photos = mpox.data.read_photos(str(msld))
    folds = mpox.head.inner_folds(photos)
    assert len(set(folds)) == mpox.head.HEAD_FOLDS and folds == mpox.head.inner_folds(photos)
    groups = mpox.data.patient_groups(photos)
    for g in set(groups):
        assert len({f for f, h in zip(folds, groups) if h == g}) == 1


@pytest.fixture(scope='module')
def fixed_folders(tmp_path_factory):
    """train/ val/ test/ folders of synthetic photos, and one saved random backbone to share between runs."""
    root = tmp_path_factory.mktemp('fixed')
    for part, n, seed in (('train', 16, 0), ('val', 6, 1), ('test', 6, 2)):
        make_dataset(root / 'd' / part, per_class=n, seed=seed)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), root / 'resnet18.pth')
    return root


@pytest.mark.slow
def test_two_seeds_train_the_same_head_on_fixed_folders(fixed_folders, cli):
    root = fixed_folders
    rows = []
    for seed in ('0', '1'):
        out = root / f'seed{seed}'
        r = cli('train', '--data', root / 'd', '--arch', 'resnet18', '--weights', root / 'resnet18.pth', '--seed', seed,
                '--out', out, '--no-plot', '--set', 'IMAGE_SIZE=112', '--set', 'RESIZE=128')
        assert r.returncode == 0, r.stderr
        r = cli('predict', root / 'd' / 'val', root / 'd' / 'test', '--checkpoint', out / 'monkeypox_model.pkl',
                '--json', '--no-plot')
        rows.append({row['path']: row for row in map(json.loads, r.stdout.splitlines())})
    assert len(rows[0]) == 24 and rows[0].keys() == rows[1].keys()
    agree = np.mean([rows[0][k]['label'] == rows[1][k]['label'] for k in rows[0]])
    gap = max(abs(rows[0][k]['probabilities'][c] - rows[1][k]['probabilities'][c]) for k in rows[0]
              for c in rows[0][k]['probabilities'])
    assert agree >= 0.98 and gap <= 0.05, (agree, gap)


@pytest.mark.slow
def test_a_warm_run_reads_the_weight_decay_search_back(fixed_folders, cli):
    out = fixed_folders / 'warm'
    args = ('train', '--data', fixed_folders / 'd', '--arch', 'resnet18', '--weights', fixed_folders / 'resnet18.pth',
            '--out', out, '--no-plot', '--set', 'IMAGE_SIZE=112', '--set', 'RESIZE=128')
    assert cli(*args).returncode == 0
    saved = list((out / 'cache').rglob('head-search-*.json'))
    assert len(saved) == 1
    search = json.loads(saved[0].read_text())
    search['choice'] = search['grid'][0]  # edit what was kept: a warm run must read it rather than search again
    saved[0].write_text(json.dumps(search))
    again = cli(*args)
    assert again.returncode == 0, again.stderr
    assert torch.load(out / 'monkeypox_model.pkl', weights_only=True)['head']['weight_decay'] == search['grid'][0]


@pytest.mark.slow
def test_val_fraction_0_trains_every_photo_and_evaluate_points_to_all_or_cv(tmp_path, cli):
    data = make_dataset(tmp_path / 'd', per_class=10)
    r = cli('train', '--data', data, '--val-fraction', '0', '--out', tmp_path / 'chk', *TINY)
    assert r.returncode == 0, r.stderr
    assert 'claim it from `python monkeypox.py cv`' in r.stderr
    ckpt = torch.load(tmp_path / 'chk' / 'monkeypox_model.pkl', weights_only=True)
    assert len(ckpt['split']['train']) == 20 and ckpt['split']['val'] == [] and ckpt['threshold'] == 0.5
    one_line_error(cli('evaluate', '--data', data, '--checkpoint', tmp_path / 'chk' / 'monkeypox_model.pkl'),
                   '--val-fraction 0', '--all', 'cv')
    r = cli('evaluate', '--data', data, '--checkpoint', tmp_path / 'chk' / 'monkeypox_model.pkl', '--all', '--json',
            '--no-plot')
    assert r.returncode == 0 and json.loads(r.stdout)['n'] == 20


@pytest.mark.slow
def test_val_fraction_0_takes_the_threshold_from_the_inner_folds_out_of_fold_probabilities(tmp_path, cli):
    data = make_dataset(tmp_path / 'd', per_class=12)
    r = cli('train', '--data', data, '--val-fraction', '0', '--target-sensitivity', '0.9', '--out', tmp_path / 'chk',
            *TINY)
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(tmp_path / 'chk' / 'monkeypox_model.pkl', weights_only=True)
    search = json.loads(next((tmp_path / 'chk' / 'cache').rglob('head-search-*.json')).read_text())
    oof = (torch.tensor(search['oof_logits']) / ckpt['head']['temperature']).softmax(2).mean(1)
    labels = [p.startswith('Monkey Pox') for p in ckpt['split']['train']]
    assert ckpt['threshold'] == pytest.approx(mpox.training.select_threshold(labels, oof[:, 0].tolist(), 0.9, 0.5))
    assert ckpt['threshold'] != 0.5


def test_weight_decay_auto_needs_two_patients_of_each_class(tmp_path, cli):
    make_dataset(tmp_path / 'd' / 'train', per_class=2)  # one patient per class
    one_line_error(cli('train', '--data', tmp_path / 'd', '--out', tmp_path / 'chk', *TINY),
                   "class 'Monkey Pox' has 1 patient(s)", "'Monkey Pox/P0', has 2 photos", '--weight-decay NUMBER')
    r = cli('train', '--data', tmp_path / 'd', '--out', tmp_path / 'chk', '--weight-decay', '1', *TINY)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_evaluate_and_cv_report_honest_probabilities_and_draw_the_reliability_diagram(trained, tmp_path, cli):
    data, checkpoint = trained
    r = cli('evaluate', '--data', data, '--checkpoint', checkpoint, '--json', '--out', tmp_path / 'e')
    m = json.loads(r.stdout)
    for key in ('log_loss', 'brier', 'ece'):
        assert isinstance(m[key], float) and m[key] >= 0, key
    assert (tmp_path / 'e' / 'calibration.png').exists()
    r = cli('cv', '--data', data, '--folds', '3', '--out', tmp_path / 'cv', '--json', *TINY[:-1])
    report = json.loads(r.stdout)
    assert all(isinstance(report['pooled'][k], float) for k in ('log_loss', 'brier', 'ece'))
    assert {'log_loss', 'brier', 'ece'} <= set(report['mean']) and 'ece' in report['pooled']['untempered']
    assert (tmp_path / 'cv' / 'cv' / 'calibration.png').exists()


def test_the_weight_decay_with_the_lowest_mean_out_of_fold_log_loss_is_chosen():
    loss = [0.60, 0.45, 0.40, 0.42, 0.50]  # with standard errors of 0.05, one-SE would take 0.45 or 0.42
    assert mpox.head.choose_weight_decay(loss) == 2


def search_on(x, y, grid=mpox.head.HEAD_GRID):
    """The weight-decay search on given features (one view a photo, two photos a patient): its result and the
    warnings fit_head printed."""
    photos = [mpox.data.Photo(f'/data/{"ab"[int(c)]}/P{i // 2}_{i % 2 + 1}.jpg', int(c), f'{i:064x}') for i, c in enumerate(y)]
    features = mpox.features.Features(photos, x[:, None].float(), y)
    cfg = mp.parse_args(['train', '--no-plot'])
    run = mpox.training.Run(cfg, mpox.model.new_head(x.shape[1], 2, 0), features, features.subset([]), ['a', 'b'], 0)
    return mpox.head.search_weight_decay(run, grid), run


def test_the_search_puts_the_penalty_where_a_synthetic_problem_calls_for_it(capsys):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(120) % 2
    signal = torch.randn(120, 40, generator=g, dtype=torch.float64)
    signal[:, 0] += 1.5 * (2 * y - 1)  # one informative feature among 40: too little penalty overfits the noise
    search, _ = search_on(signal, y)
    assert search['grid'][0] < search['choice'] < search['grid'][-1], search
    assert search['choice'] == search['grid'][int(np.argmin(search['loss']))] and search['rule'] == mpox.head.HEAD_RULE
    separable, _ = search_on(signal + 6 * (2 * y[:, None] - 1), y)  # every feature separates the classes
    assert separable['choice'] == separable['grid'][0]  # the weakest penalty: log loss falls as the margin grows


def test_a_weight_decay_chosen_at_an_end_of_the_grid_warns(tmp_path, cli, monkeypatch):
    data = make_dataset(tmp_path / 'd', per_class=10)
    monkeypatch.setattr(mpox.training, 'HEAD_GRID', (1e-3, 1e-2))  # two values: whichever is chosen is an end
    r = cli('train', '--data', data, '--out', tmp_path / 'chk2', *TINY)
    search = torch.load(tmp_path / 'chk2' / 'monkeypox_model.pkl', weights_only=True)['head']['search']
    edge = mpox.head.on_grid_edge(search)
    assert r.returncode == 0 and edge in ('lowest', 'highest'), r.stderr
    assert f'warning: weight decay {search["choice"]:g} is the {edge} of the 2 tried (0.001 to 0.01)' in r.stderr


def test_the_head_fits_any_number_of_classes():
    g = torch.Generator().manual_seed(1)
    classes = 33
    y = torch.arange(classes * 3) % classes
    x = torch.randn(len(y), 20, generator=g, dtype=torch.float64) + torch.nn.functional.one_hot(y, 40)[:, :20] * 3
    space = mpox.head.RowSpace(x)
    theta = mpox.head.newton_softmax(space.a, y, classes, 0.1)
    weight, bias = space.linear(theta)
    assert weight.shape == (classes, 20) and mpox.head.helmert(classes).shape == (classes, classes - 1)
    assert full_gradient(x, y, weight, bias, 0.1, classes).abs().max() < 1e-6
