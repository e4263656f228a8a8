"""`download` against a loopback HTTP server serving the authors' archive, and fine-tuning."""
import csv
import functools
import hashlib
import http.server
import socket
import threading
import zlib
from pathlib import Path

import pytest
import torch

import mpox.download
import mpox.model
import mpox.system
from conftest import ARCHIVE, SHARED, TINY, make_dataset, need_shared, one_line_error


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    """http://127.0.0.1:PORT/ serving the real archive, a corrupted copy and a truncated copy."""
    need_shared(ARCHIVE)
    root = tmp_path_factory.mktemp('www')
    good = ARCHIVE.read_bytes()
    (root / 'msld.rar').write_bytes(good)
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    (root / 'corrupted.rar').write_bytes(bytes(bad))
    (root / 'truncated.rar').write_bytes(good[:len(good) // 3])

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    handler = functools.partial(Quiet, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}'
    httpd.shutdown()


def md5s(files):
    return sorted(hashlib.md5(Path(f).read_bytes()).hexdigest() for f in files)


@pytest.mark.slow
def test_download_verifies_extracts_and_splits_by_patient(server, tmp_path, cli):
    dest = tmp_path / 'monkeypoxdata'
    r = cli('download', '--url', f'{server}/msld.rar', '--dest', dest)
    assert r.returncode == 0, r.stderr
    photos = [p for split in ('train', 'val', 'test') for p in (dest / split).glob('*/*.jpg')]
    assert len(photos) == 228
    assert md5s(photos) == md5s((SHARED / 'data' / 'msld-v1').rglob('*.jpg'))  # exactly the authors' photos
    rows = list(csv.DictReader(open(dest / 'SPLIT.csv')))
    assert len(rows) == 228
    side = {}
    for row in rows:
        assert side.setdefault(row['patient'], row['split']) == row['split'], row  # one patient, one side
    with open(dest / 'near_duplicates.csv') as f:  # MSLD's copies across patients (docs/data.md): one side too
        pairs = [(row['patient_a'], row['patient_b']) for row in csv.DictReader(f)]
    assert ('Monkey Pox/P28', 'Monkey Pox/a25') in pairs and all(side[a] == side[b] for a, b in pairs)
    counts = {s: sum(r['split'] == s for r in rows) for s in ('train', 'val', 'test')}
    assert counts['train'] > counts['val'] > 30 and counts['test'] > 30
    assert (dest / 'test' / 'test.jpg').read_bytes() in {p.read_bytes() for p in (dest / 'test').glob('*/*.jpg')}
    license_ = (dest / 'LICENSE.txt').read_text()
    assert 'CC BY-NC' in license_ and 'arXiv:2207.03342' in license_
    assert [p.name for p in tmp_path.iterdir()] == ['monkeypoxdata']  # no temporary folder left


@pytest.mark.parametrize('name', ['corrupted.rar', 'truncated.rar'])
def test_a_damaged_download_is_refused_and_writes_nothing(server, tmp_path, cli, name):
    dest = tmp_path / 'monkeypoxdata'
    r = cli('download', '--url', f'{server}/{name}', '--dest', dest)
    assert r.returncode == 2 and 'Traceback' not in r.stderr
    assert 'md5' in r.stderr and 'Nothing was written' in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_no_network_is_a_clear_error(tmp_path, cli):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    r = cli('download', '--url', f'http://127.0.0.1:{port}/msld.rar', '--dest', tmp_path / 'd')
    assert r.returncode == 2 and 'cannot download' in r.stderr and 'Traceback' not in r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_non_empty_destination_needs_force(server, tmp_path, cli):
    dest = tmp_path / 'monkeypoxdata'
    dest.mkdir()
    (dest / 'mine.txt').write_text('keep me')
    r = cli('download', '--url', f'{server}/msld.rar', '--dest', dest)
    assert r.returncode == 2 and '--force' in r.stderr
    assert (dest / 'mine.txt').read_text() == 'keep me'
    r = cli('download', '--url', f'{server}/msld.rar', '--dest', dest, '--force')
    assert r.returncode == 0, r.stderr
    assert not (dest / 'mine.txt').exists() and (dest / 'SPLIT.csv').exists()


def crafted_archive(path, new_name):
    """The real archive with its first member renamed (same length) and the header CRC fixed: RAR 4
    file header = CRC16 (low half of CRC32 of the rest), type 0x74, flags, size, ..., name."""
    data = bytearray(ARCHIVE.read_bytes())
    start = 7 + 13  # after the marker block and the main archive header
    assert data[start + 2] == 0x74
    size = int.from_bytes(data[start + 5:start + 7], 'little')
    name_size = int.from_bytes(data[start + 26:start + 28], 'little')
    old = bytes(data[start + 32:start + 32 + name_size])
    assert old.endswith(b'a1.jpg') and len(new_name) == len(old)
    data[start + 32:start + 32 + name_size] = new_name
    crc = zlib.crc32(bytes(data[start + 2:start + size])) & 0xFFFF
    data[start:start + 2] = crc.to_bytes(2, 'little')
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize('kind', ['parent', 'absolute'])
def test_an_archive_member_that_would_escape_the_destination_is_refused(tmp_path, kind):
    need_shared(ARCHIVE)
    length = len(b'Original Images\\Original Images\\Monkey Pox\\a1.jpg')
    name = (b'..\\' * 8 if kind == 'parent' else b'\\tmp\\')
    name = name + b'x' * (length - len(name) - 8) + b'evil.jpg'
    archive = crafted_archive(tmp_path / 'evil.rar', name)
    out = tmp_path / 'a' / 'b' / 'out'
    with pytest.raises(mpox.system.UserError, match='outside the destination'):
        mpox.download.extract_rar(archive, out)
    assert not any(p.name.endswith('evil.jpg') for p in Path('/tmp').glob('*evil.jpg'))
    assert not any(tmp_path.rglob('*evil.jpg'))


@pytest.mark.slow
def test_on_a_fresh_machine_the_default_run_downloads_the_photos_trains_and_predicts(tmp_path, cli):
    need_shared(ARCHIVE)
    r = cli('--archive-url', ARCHIVE, *TINY[:-1], cwd=tmp_path)  # plots drawn: prediction.png
    assert r.returncode == 0, r.stderr
    assert 'CC BY-NC' in r.stdout and 'arXiv:2207.03342' in r.stdout  # license and citation, before fetching
    assert r.stdout.index('CC BY-NC') < r.stdout.index('train/ and val/ folders')
    assert './monkeypoxdata/test/test.jpg\t' in r.stdout  # the TEST_IMAGE that download put there
    assert (tmp_path / 'chk' / 'monkeypox_model.pkl').exists() and (tmp_path / 'chk' / 'prediction.png').exists()
    assert len(list((tmp_path / 'monkeypoxdata').rglob('*.jpg'))) == 229  # 228 photos and test/test.jpg


def test_photos_are_never_downloaded_into_a_folder_named_for_ones_own_or_with_no_download(tmp_path, cli):
    archive = tmp_path / 'never-read.rar'  # were anything fetched, it would fail on this
    r = cli('train', '--data', tmp_path / 'mine', '--archive-url', archive, *TINY, cwd=tmp_path)
    assert r.returncode == 2 and 'mine does not exist' in r.stderr and 'never-read' not in r.stderr
    r = cli('train', '--no-download', '--archive-url', archive, *TINY, cwd=tmp_path)
    assert r.returncode == 2 and 'monkeypoxdata does not exist' in r.stderr and 'never-read' not in r.stderr
    (tmp_path / 'monkeypoxdata').mkdir()  # empty: the default folder is filled, but only when asked
    r = cli('cv', '--no-download', '--archive-url', archive, *TINY, cwd=tmp_path)
    assert r.returncode == 2 and 'no class folders' in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ['monkeypoxdata']


def test_offline_the_default_run_names_both_fixes_and_leaves_nothing_behind(tmp_path, cli):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(('127.0.0.1', 0))
        url = f'http://127.0.0.1:{s.getsockname()[1]}/msld.rar'
    line = one_line_error(cli('--archive-url', url, *TINY, cwd=tmp_path), 'cannot download', '--archive-url PATH',
                          'download --url PATH', '--data DIR')
    assert url in line
    assert list(tmp_path.iterdir()) == []


# --- fine-tuning -----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize('arch, unfreeze, trainable', [
    ('resnet18', 1, ('layer4.', 'fc.')),
    ('mobilenet_v2', 2, ('features.17.', 'features.18.', 'classifier.')),
])
def test_fine_tuning_changes_only_the_unfrozen_stages_and_the_head(tmp_path, cli, arch, unfreeze, trainable):
    data = make_dataset(tmp_path / 'd' / 'train', per_class=10)  # no val/: the last epoch is the model
    r = cli('train', '--data', data.parent, '--arch', arch, '--weights', 'none', '--views', '1', '--unfreeze', unfreeze,
            '--epochs', '2', '--backbone-lr', '0.01', '--out', tmp_path / 'chk', '--no-plot', '--set', 'IMAGE_SIZE=96',
            '--set', 'RESIZE=110')
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(tmp_path / 'chk' / 'monkeypox_model.pkl', weights_only=True)
    assert (ckpt['stage'], ckpt['epoch']) == ('finetune', 2)
    fresh = mpox.model.build_model(arch, 2, seed=0).state_dict()
    changed = {k for k in fresh if not torch.equal(fresh[k], ckpt['model'][k])}
    for k in changed:
        assert k.startswith(trainable), f'{k} changed but is frozen'
        assert 'running_' not in k and 'num_batches' not in k  # BatchNorm statistics never move
    for prefix in trainable:  # every unfrozen stage moved, and the head
        assert any(k.startswith(prefix) for k in changed), prefix


@pytest.mark.slow
def test_short_real_photo_fine_tuning_beats_the_frozen_heads_validation_loss(msld, msld_trained, torch_home, tmp_path,
                                                                             cli):
    r = cli('train', '--data', msld, '--arch', 'mobilenet_v2', '--weights', 'IMAGENET1K_V1', '--unfreeze', '3',
            '--epochs', '1', '--out', tmp_path / 'chk', '--cache', msld_trained[0] / 'cache', '--no-plot',
            env={'TORCH_HOME': str(torch_home)})  # the frozen head's features from the default run's cache
    assert r.returncode == 0, r.stderr
    history = torch.load(tmp_path / 'chk' / 'monkeypox_model.pkl', weights_only=True)['history']
    frozen = min(h['val_loss'] for h in history if h['stage'] == 'head')
    tuned = min(h['val_loss'] for h in history if h['stage'] == 'finetune')
    print(f'validation loss: frozen head {frozen:.3f}, fine-tuned {tuned:.3f}')
    assert tuned < frozen
