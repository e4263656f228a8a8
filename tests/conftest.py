"""Shared fixtures: synthetic photos made at test time, the real MSLD photos and ImageNet weights from
../shared when they are there, and two ways to run the tool: `cli` calls main() in this process (most
tests), `run_script` runs `python monkeypox.py` as a user does (signals, exit codes of the real script)."""
import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'monkeypox.py'
SHARED = Path(os.environ.get('MONKEYPOX_SHARED') or REPO.parent / 'shared')
MSLD = SHARED / 'data' / 'msld-v1'
ARCHIVE = SHARED / 'data' / 'msld-v1-original-images.rar'
MOBILENET_FILE = SHARED / 'weights' / 'mobilenet_v2-b0353104.pth'
REQUIRE_SHARED = os.environ.get('MONKEYPOX_REQUIRE_SHARED') == '1'  # .ci/run sets it: real-data tests must run
TINY = ('--arch', 'resnet18', '--weights', 'none', '--views', '1', '--set', 'IMAGE_SIZE=96', '--set', 'RESIZE=110',
        '--no-plot')  # a quick, randomly initialised model on a fifth of the pixels (TINY[:-1] draws plots)

sys.path.insert(0, str(REPO))
import monkeypox as mp  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: 2 s or more on 2 cores (real photos, fine-tuning, cross-validation, '
                                       'subprocesses, torchrun); the fast subset is -m "not slow"')


# --- photos ----------------------------------------------------------------------------------------

def draw_photo(rng, spot_colour, size=96, spots=3, radius=(6, 12), margin=0, noise=6):
    """A skin-toned square with a few coloured round spots, and the spots' (x, y, r)."""
    skin = np.array([224, 180, 150]) + rng.integers(-20, 20, 3)
    a = np.clip(skin + rng.normal(0, noise, (size, size, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(a, 'RGB')
    d = ImageDraw.Draw(img)
    discs = []
    for _ in range(spots):
        r = int(rng.integers(*radius))
        x, y = (int(v) for v in rng.integers(r + margin, size - r - margin, 2))
        d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in spot_colour))
        discs.append((x, y, r))
    return img, discs


def make_dataset(root, per_class=12, classes=('Monkey Pox', 'Others'), seed=0, size=96):
    """Class folders of synthetic photos, named like MSLD (P<patient>_<n>.jpg, two photos per patient).
    Class 0 has red spots, class 1 blue-green ones: learnable even by a randomly initialised backbone."""
    rng = np.random.default_rng(seed)
    colours = [(200, 30, 40), (40, 140, 160), (230, 200, 40), (120, 60, 160)]
    root = Path(root)
    for k, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img, _ = draw_photo(rng, colours[k], size=size)
            img.save(folder / f'P{i // 2}_{i % 2 + 1}.jpg', quality=90)
    return root


@pytest.fixture
def synthetic(tmp_path):
    return make_dataset(tmp_path / 'data')


# --- running the tool ------------------------------------------------------------------------------

class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def call_main(*args):
    """main(ARGS) in this process, as the command line would run it: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = mp.main([str(a) for a in args])
        except SystemExit as e:  # argparse's usage errors
            code = e.code
    return Result(code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli(monkeypatch):
    """Run the tool in this process: cli(*args, cwd=..., env={...}) -> Result. No display: plots go to files."""
    def run(*args, cwd=None, env=None):
        with monkeypatch.context() as m:
            m.delenv('DISPLAY', raising=False)
            m.delenv('WAYLAND_DISPLAY', raising=False)
            for k, v in (env or {}).items():
                m.setenv(k, str(v))
            if cwd:
                m.chdir(cwd)
            return call_main(*args)
    return run


def script_env(env=None):
    full = {**os.environ, 'PYTHONUNBUFFERED': '1', **(env or {})}
    full.pop('DISPLAY', None)
    full.pop('WAYLAND_DISPLAY', None)
    return full


def run_script(*args, cwd=None, env=None, timeout=600, **kwargs):
    """Run `python monkeypox.py ARGS` in a subprocess, as a user would."""
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd or REPO, env=script_env(env),
                          capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture(scope='session')
def trained(tmp_path_factory):
    """A resnet18 (random weights) trained on synthetic photos, shared by the tests that only read it."""
    root = tmp_path_factory.mktemp('trained')
    data = make_dataset(root / 'data', per_class=16)
    r = call_main('train', '--data', data, '--arch', 'resnet18', '--weights', 'none', '--views', '2',
                  '--set', 'IMAGE_SIZE=160', '--set', 'RESIZE=176', '--out', root / 'chk')
    assert r.returncode == 0, r.stderr
    return data, root / 'chk' / 'monkeypox_model.pkl'


@pytest.fixture(scope='session')
def msld_trained(msld, torch_home, tmp_path_factory):
    """MobileNetV2 with its ImageNet weights trained with the defaults on the 228 MSLD photos, in the fp32 that
    --precision auto settles on for it (shared by the tests that read it): (its output folder, train's stdout)."""
    out = tmp_path_factory.mktemp('msld') / 'chk'
    saved = os.environ.get('TORCH_HOME')
    os.environ['TORCH_HOME'] = str(torch_home)
    try:
        r = call_main('train', '--data', msld, '--arch', 'mobilenet_v2', '--weights', 'IMAGENET1K_V1', '--out', out,
                      '--no-plot', '--precision', 'fp32')  # what auto settles on for it (its int8 is unfaithful)
    finally:
        os.environ.pop('TORCH_HOME') if saved is None else os.environ.update(TORCH_HOME=saved)
    assert r.returncode == 0, r.stderr
    return out, r.stdout


def one_line_error(r, *words):
    """The answer to bad input: exit code 2 and one 'error:' line naming what it must, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert 'Traceback' not in r.stderr, r.stderr
    error = [line for line in r.stderr.splitlines() if 'error:' in line]
    assert len(error) == 1, r.stderr
    for w in words:
        assert str(w) in error[0], (w, error[0])
    return error[0]


# --- the real photos and weights from ../shared ------------------------------------------------------

def need_shared(path):
    if not Path(path).exists():
        if REQUIRE_SHARED:
            pytest.fail(f'{path} is required (MONKEYPOX_REQUIRE_SHARED=1) but missing')
        pytest.skip(f'{path} not here: the real-data tests need ../shared (data and weights)')
    return Path(path)


@pytest.fixture(scope='session')
def msld():
    return need_shared(MSLD)


@pytest.fixture(scope='session')
def torch_home(tmp_path_factory):
    """A TORCH_HOME whose hub cache holds torchvision's ImageNet MobileNetV2 file, so that
    `--weights IMAGENET1K_V1` loads it through torchvision's own mechanism, offline."""
    need_shared(MOBILENET_FILE)
    home = tmp_path_factory.mktemp('torch_home')
    (home / 'hub' / 'checkpoints').mkdir(parents=True)
    os.symlink(MOBILENET_FILE, home / 'hub' / 'checkpoints' / MOBILENET_FILE.name)
    return home


# --- backbones with realistic numbers ----------------------------------------------------------------

PRE = {'image_size': 224, 'resize': 256, 'mean': list(mp.MEAN), 'std': list(mp.STD)}


def with_batchnorm_statistics(model, seed=0):
    """ImageNet-like BatchNorm statistics (a fresh model's are 0 and 1, which any folding gets right)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()
