"""Bad input gets a clear one-line answer, a non-zero exit code where the tool cannot go on, and loses
nothing. Every bad file is built here, at test time, with Pillow or plain bytes."""
import io
import json
import os
import pickle
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import monkeypox as mp
import mpox.checkpoint
import mpox.features
import mpox.system
from conftest import MSLD, SCRIPT, TINY, make_dataset, one_line_error, run_script, script_env


def png_header(width, height):
    """A PNG that claims width x height pixels (a 'scan' past Pillow's decompression-bomb limit)."""
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff)
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(b'\0' * 100)) + chunk(b'IEND', b''))


# --- data folders ----------------------------------------------------------------------------------

def test_missing_data_folder(tmp_path, cli):
    one_line_error(cli('train', '--data', tmp_path / 'nope', *TINY), tmp_path / 'nope', 'does not exist', 'Monkey Pox')


def test_folder_without_class_folders(tmp_path, cli):
    (tmp_path / 'photo.jpg').write_bytes(b'')
    one_line_error(cli('train', '--data', tmp_path, *TINY), 'no class folders', 'Expected one folder per class')


def test_class_folder_without_images(tmp_path, cli):
    make_dataset(tmp_path, per_class=4)
    (tmp_path / 'Empty').mkdir()
    (tmp_path / 'Empty' / 'README.txt').write_text('notes')
    one_line_error(cli('train', '--data', tmp_path, *TINY), tmp_path / 'Empty', 'holds no images')


def test_only_one_class(tmp_path, cli):
    make_dataset(tmp_path, per_class=4, classes=('Monkey Pox',))
    one_line_error(cli('train', '--data', tmp_path, *TINY), 'only one class', 'at least two')


def test_unreadable_images_are_skipped_named_and_listed_in_the_checkpoint(tmp_path, cli):
    data = make_dataset(tmp_path / 'd', per_class=8)
    good = (data / 'Others' / 'P0_1.jpg').read_bytes()
    bad = {'Others/empty.jpg': b'', 'Others/truncated.jpg': good[:len(good) // 3],
           'Monkey Pox/text.jpg': b'not a photo at all', 'Monkey Pox/phone.heic': b'\0\0\0\x18ftypheic' + b'\0' * 64}
    for rel, content in bad.items():
        (data / rel).write_bytes(content)
    (data / 'Others' / 'scan.png').write_bytes(png_header(30000, 30000))
    bad['Others/scan.png'] = None
    r = cli('train', '--data', data, '--out', tmp_path / 'chk', *TINY)
    assert r.returncode == 0, r.stderr
    for rel in bad:
        assert str(data / rel) in r.stderr, rel
    assert 'empty file' in r.stderr and 'HEIC' in r.stderr and 'decompression-bomb' in r.stderr
    ckpt = torch.load(tmp_path / 'chk' / 'monkeypox_model.pkl', weights_only=True)
    assert sorted(os.path.relpath(p, data) for p, _ in ckpt['split']['skipped']) == sorted(bad)
    assert not set(bad) & set(ckpt['split']['train'] + ckpt['split']['val'])


def test_many_unreadable_images_are_summarised(tmp_path, cli):
    data = make_dataset(tmp_path / 'd', per_class=8)
    for i in range(14):
        (data / 'Others' / f'broken{i}.jpg').write_bytes(b'\xff\xd8\xff' + bytes(i))
    r = cli('train', '--data', data, '--out', tmp_path / 'chk', *TINY)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count('warning: skipped /') == 10 and 'skipped 4 more unreadable files' in r.stderr
    assert '14 unreadable file(s) skipped in all' in r.stderr


def test_a_class_left_without_readable_photos_is_an_error(tmp_path, cli):
    data = make_dataset(tmp_path / 'd', per_class=6)
    for k, f in enumerate((data / 'Others').iterdir()):
        f.write_bytes(b'garbage %d' % k)  # each its own bytes: identical files would be one patient
    one_line_error(cli('train', '--data', data, '--out', tmp_path / 'chk', *TINY), "'Others'", 'no readable')


def test_hidden_and_non_image_files_are_ignored_silently(tmp_path, cli):
    data = make_dataset(tmp_path / 'd', per_class=6)
    (data / 'Others' / '.DS_Store').write_bytes(b'\0\0\0\1Bud1')
    (data / 'Others' / 'Thumbs.db').write_bytes(b'\xd0\xcf\x11\xe0')
    (data / 'Others' / 'README.md').write_text('about these photos')
    (data / 'Others' / '._P0_1.jpg').write_bytes(b'\0\5\x16\7')  # macOS resource fork
    hidden = data / '.ipynb_checkpoints'
    hidden.mkdir()
    Image.new('RGB', (8, 8)).save(hidden / 'x.jpg')
    r = cli('train', '--data', data, '--out', tmp_path / 'chk', *TINY, '--weight-decay', '1')  # no search to warn of
    assert r.returncode == 0, r.stderr
    assert 'warning' not in r.stderr
    ckpt = torch.load(tmp_path / 'chk' / 'monkeypox_model.pkl', weights_only=True)
    assert ckpt['classes'] == ['Monkey Pox', 'Others']
    assert len(ckpt['split']['train']) + len(ckpt['split']['val']) == 12


# --- image modes -----------------------------------------------------------------------------------


def test_a_dataset_of_odd_modes_trains(tmp_path, cli):
    data = make_dataset(tmp_path / 'd', per_class=6)
    for i, f in enumerate(sorted((data / 'Others').glob('*.jpg'))):
        img = Image.open(f)
        [lambda: img.convert('L').save(f.with_suffix('.png')),
         lambda: img.convert('CMYK').save(f),
         lambda: img.convert('RGBA').save(f.with_suffix('.png')),
         lambda: Image.fromarray((np.asarray(img.convert('L'), np.uint16) * 257)).save(f.with_suffix('.png')),
         lambda: img.convert('P').save(f.with_suffix('.gif')),
         lambda: img.resize((8, 8)).save(f)][i % 6]()
        if f.with_suffix('.png').exists() or f.with_suffix('.gif').exists():
            f.unlink()
    r = cli('train', '--data', data, '--out', tmp_path / 'chk', *TINY, '--weight-decay', '1')  # no search to warn of
    assert r.returncode == 0, r.stderr
    assert 'warning' not in r.stderr


# --- predict ---------------------------------------------------------------------------------------

def test_predict_on_nothing_usable_is_one_line_per_problem_and_exit_2(trained, tmp_path, cli):
    _, ckpt = trained
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'notes.jpg').write_text('not an image')
    r = cli('predict', tmp_path / 'missing.jpg', tmp_path / 'empty', tmp_path / 'notes.jpg', '--checkpoint', ckpt,
            '--no-plot')
    assert r.returncode == 2 and 'Traceback' not in r.stderr
    for name in ('missing.jpg', 'empty', 'notes.jpg'):
        assert sum(name in line for line in r.stderr.splitlines()) == 1, name
    assert 'nothing could be predicted' in r.stderr


def test_predict_goes_on_past_bad_files_and_reports_them(trained, tmp_path, cli):
    data, ckpt = trained
    (tmp_path / 'notes.jpg').write_text('not an image')
    good = data / 'Others' / 'P0_1.jpg'
    r = cli('predict', good, tmp_path / 'notes.jpg', tmp_path / 'missing.jpg', '--checkpoint', ckpt, '--json',
            '--no-plot')
    assert r.returncode == 0, r.stderr
    rows = [__import__('json').loads(line) for line in r.stdout.splitlines()]
    assert [row['path'] for row in rows if 'label' in row] == [str(good)]
    assert sorted(Path(row['path']).name for row in rows if 'error' in row) == ['missing.jpg', 'notes.jpg']


# --- checkpoints and class maps --------------------------------------------------------------------

def test_missing_truncated_and_corrupt_checkpoints(trained, tmp_path, cli):
    data, ckpt = trained
    photo = data / 'Others' / 'P0_1.jpg'
    one_line_error(cli('predict', photo, '--checkpoint', tmp_path / 'none.pkl'), 'none.pkl', 'does not exist')
    (tmp_path / 'half.pkl').write_bytes(ckpt.read_bytes()[:ckpt.stat().st_size // 2])
    one_line_error(cli('predict', photo, '--checkpoint', tmp_path / 'half.pkl'), 'half.pkl', 'truncated or corrupt')
    (tmp_path / 'noise.pkl').write_bytes(os.urandom(5000))
    one_line_error(cli('predict', photo, '--checkpoint', tmp_path / 'noise.pkl'), 'noise.pkl')
    (tmp_path / 'empty.pkl').write_bytes(b'')
    one_line_error(cli('evaluate', '--data', data, '--checkpoint', tmp_path / 'empty.pkl'), 'empty.pkl', 'empty')
    torch.save({'epoch': 3, 'note': 'not a model'}, tmp_path / 'other.pkl')
    one_line_error(cli('predict', photo, '--checkpoint', tmp_path / 'other.pkl'), 'other.pkl', 'not a monkeypox.py')


def test_a_bare_torchvision_state_dict_is_refused_with_how_to_use_it(trained, tmp_path, cli):
    data, _ = trained
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / 'resnet18.pth')
    one_line_error(cli('predict', data / 'Others' / 'P0_1.jpg', '--checkpoint', tmp_path / 'resnet18.pth'),
                   'bare resnet18 state_dict', 'class_dict.pk')


def test_a_bare_state_dict_with_its_class_map_beside_it_is_accepted(trained, tmp_path, cli):
    data, ckpt = trained
    state = torch.load(ckpt, weights_only=True)['model']
    torch.save(state, tmp_path / 'monkeypox_model.pkl')  # a bare state_dict, as torch.save(model.state_dict()) writes it
    with open(tmp_path / 'class_dict.pk', 'wb') as f:
        pickle.dump({0: 'Monkey Pox', 1: 'Others'}, f)
    r = cli('predict', data / 'Others' / 'P0_1.jpg', '--checkpoint', tmp_path / 'monkeypox_model.pkl', '--no-plot')
    assert r.returncode == 0, r.stderr
    assert 'bare state_dict' in r.stderr and 'resnet18' in r.stderr
    with open(tmp_path / 'class_dict.pk', 'wb') as f:
        pickle.dump({0: 'a', 1: 'b', 2: 'c'}, f)
    one_line_error(cli('predict', data / 'Others' / 'P0_1.jpg', '--checkpoint', tmp_path / 'monkeypox_model.pkl'),
                   '2 outputs', '3 classes')


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


def test_files_that_would_run_code_are_refused_and_nothing_runs(trained, tmp_path, cli):
    data, _ = trained
    marker = tmp_path / 'pwned'
    torch.save({'format': 'monkeypox.py checkpoint', 'model': Payload(marker)}, tmp_path / 'evil.pkl')
    line = one_line_error(cli('predict', data / 'Others' / 'P0_1.jpg', '--checkpoint', tmp_path / 'evil.pkl'),
                          'evil.pkl', 'refused')
    assert 'run code' in line
    with open(tmp_path / 'class_dict.pk', 'wb') as f:
        pickle.dump({0: Payload(marker)}, f)
    with pytest.raises(mpox.system.UserError, match='refused'):
        mpox.checkpoint.read_class_map(tmp_path / 'class_dict.pk')
    assert not marker.exists()


def test_weights_of_another_architecture_name_both(tmp_path, cli):
    data = make_dataset(tmp_path / 'd', per_class=4)
    torch.save(torchvision.models.mobilenet_v2().state_dict(), tmp_path / 'weights.pth')
    one_line_error(cli('train', '--data', data, '--arch', 'resnet18', '--weights', tmp_path / 'weights.pth',
                       '--out', tmp_path / 'chk'), 'weights.pth', 'resnet18', 'mobilenet_v2')


def test_a_checkpoint_whose_head_does_not_match_its_classes(trained, tmp_path, cli):
    data, ckpt = trained
    c = torch.load(ckpt, weights_only=True)
    c['classes'] = ['a', 'b', 'c']
    torch.save(c, tmp_path / 'edited.pkl')
    one_line_error(cli('predict', data / 'Others' / 'P0_1.jpg', '--checkpoint', tmp_path / 'edited.pkl'),
                   'edited.pkl', '3 class names')


# --- arguments and exit codes ----------------------------------------------------------------------

@pytest.mark.parametrize('args, words', [
    (('--epochs', '0'), ('--epochs', 'positive')), (('--epochs', '-3'), ('--epochs',)),
    (('--lr', '0'), ('--lr',)), (('--lr', '-1e-3'), ('--lr',)), (('--batch-size', '0'), ('--batch-size',)),
    (('--val-fraction', '1'), ('--val-fraction',)), (('--val-fraction', '-0.1'), ('--val-fraction',)),
    (('--weight-decay', '-1'), ('--weight-decay',)), (('--weight-decay', 'strong'), ('--weight-decay',)),
    (('--arch', 'resnet9000'), ('--arch', 'resnet9000')), (('--device', 'tpu'), ('--device', 'tpu')),
    (('--device', 'cuda'), ('no CUDA GPU',)),
])
def test_argument_errors_are_argparse_messages_with_exit_2(args, words, tmp_path, cli):
    if 'cuda' in args and torch.cuda.is_available():
        pytest.skip('this machine has a GPU')
    r = cli('train', '--data', tmp_path / 'never-read', *args)
    assert r.returncode == 2 and 'usage:' in r.stderr and 'Traceback' not in r.stderr
    for w in words:
        assert w in r.stderr.splitlines()[-1]


def test_debug_shows_the_traceback_for_bug_reports(tmp_path, cli):
    r = cli('train', '--data', tmp_path / 'nope', '--debug', *TINY)
    assert r.returncode == 2 and 'Traceback' in r.stderr
    r = cli('train', '--data', tmp_path / 'nope', *TINY, env={'MONKEYPOX_DEBUG': '1'})
    assert 'Traceback' in r.stderr


# --- runs stopped or failing halfway ---------------------------------------------------------------

def start(*args, **kwargs):
    """The script as a terminal starts it. SIGINT gets its default action back: a shell ignores it in the
    jobs it puts in the background (`bash .ci/run &`), Python then keeps ignoring it, and Ctrl-C tests would
    time a process deaf to Ctrl-C. PYTHONFAULTHANDLER: SIGABRT prints where every thread is (stop_within)."""
    return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=script_env({'PYTHONFAULTHANDLER': '1'}),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kwargs)


def stop_within(proc, seconds):
    """(stdout, stderr) of `proc` once it exits; if that takes over `seconds`, the test fails with the
    Python stacks of the stuck process, which say what it was waiting on."""
    try:
        return proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        stdout, stderr = proc.communicate(timeout=60)
        raise AssertionError(f'still running {seconds} s after the signal; its stacks:\n{stderr[-6000:]}\n'
                             f'its output:\n{stdout[-2000:]}') from None


def wait_for_line(proc, text, timeout=300):
    end = time.time() + timeout
    seen = []
    while time.time() < end:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if text in line:
            return seen
    raise AssertionError(f'{text!r} never came: {"".join(seen)} {proc.stderr.read()}')


def no_temporary_files(folder):
    return [p for p in Path(folder).rglob('*') if p.name.endswith('.tmp')] == []


def earlier_run(tmp_path, cli, per_class):
    """Photos, and an output folder holding a checkpoint from an earlier run: (data, out, its bytes)."""
    data, out = make_dataset(tmp_path / 'd', per_class=per_class), tmp_path / 'chk'
    assert cli('train', '--data', data, '--out', out, *TINY).returncode == 0
    return data, out, (out / 'monkeypox_model.pkl').read_bytes()


@pytest.mark.slow
def test_ctrl_c_during_extraction_keeps_the_earlier_checkpoint_and_only_complete_cache_entries(tmp_path, cli):
    _, out, before = earlier_run(tmp_path, cli, per_class=6)
    data = make_dataset(tmp_path / 'big', per_class=40)  # 640 resnet50 crops: still extracting when stopped
    proc = start('train', '--data', data, '--out', out, '--arch', 'resnet50', '--weights', 'none', '--views', '8',
                 '--extract-batch-size', '4', '--no-plot', '--precision', 'fp32')  # no int8 calibration first
    wait_for_line(proc, 'model: resnet50')
    time.sleep(1.5)  # into the extraction
    proc.send_signal(signal.SIGINT)
    stdout, stderr = stop_within(proc, 10)  # it stops within the batch it is in (1.5-2 s measured)
    assert proc.returncode == 130, stderr
    assert 'interrupted during feature extraction' in stdout and 'Traceback' not in stderr
    assert (out / 'monkeypox_model.pkl').read_bytes() == before
    mpox.checkpoint.load_checkpoint(str(out / 'monkeypox_model.pkl'), mp.parse_args(['evaluate']))
    assert no_temporary_files(out)
    for pack in (out / 'cache').rglob('pack-*.pt'):
        data_ = torch.load(pack, weights_only=True)
        assert data_['digest'] == mpox.features.FeatureCache.digest(data_['keys'], data_['features'])


def sigterm_when(text, timeout=300):
    """SIGTERM to this process once main(), running in it, has printed `text` (cli collects its stdout)."""
    end = time.time() + timeout
    while time.time() < end:
        out = sys.stdout
        if isinstance(out, io.StringIO) and text in out.getvalue():
            if signal.getsignal(signal.SIGTERM) is mpox.system.stop_on_sigterm:  # main's handler, not the default's exit
                os.kill(os.getpid(), signal.SIGTERM)
            return
        time.sleep(0.01)


@pytest.mark.slow
def test_sigterm_during_fine_tuning_saves_the_best_and_resume_finishes_like_an_uninterrupted_run(tmp_path, cli):
    data = make_dataset(tmp_path / 'd', per_class=10)
    args = ('--data', data, '--unfreeze', '1', '--epochs', '4', '--backbone-lr', '0.001', *TINY)
    full = cli('train', *args, '--out', tmp_path / 'full')
    assert full.returncode == 0, full.stderr
    # kill's SIGTERM, sent to this process while main() runs in it (Ctrl-C above is sent to a real script)
    watcher = threading.Thread(target=sigterm_when, args=('finetune epoch   2/4',), daemon=True)  # 2 to spare
    watcher.start()
    cut = cli('train', *args, '--out', tmp_path / 'cut')
    watcher.join()
    assert cut.returncode == 130, cut.stderr
    assert 'interrupted' in cut.stdout and 'resume with --resume' in cut.stdout
    assert no_temporary_files(tmp_path / 'cut')
    mpox.checkpoint.load_checkpoint(str(tmp_path / 'cut' / 'monkeypox_model.pkl'), mp.parse_args(['evaluate']))
    resumed = cli('train', *args, '--out', tmp_path / 'cut', '--resume')
    assert resumed.returncode == 0, resumed.stderr
    assert 'resuming from finetune epoch' in resumed.stdout
    a = torch.load(tmp_path / 'full' / 'monkeypox_model.pkl', weights_only=True)
    b = torch.load(tmp_path / 'cut' / 'monkeypox_model.pkl', weights_only=True)
    assert (a['stage'], a['epoch']) == (b['stage'], b['epoch'])
    assert json.dumps(a['metrics']) == json.dumps(b['metrics'])  # NaN (a class never called) equal to NaN
    for k in a['model']:
        assert torch.allclose(a['model'][k].float(), b['model'][k].float(), atol=1e-5), k
    assert [r['train_loss'] for r in a['history']] == pytest.approx([r['train_loss'] for r in b['history']],
                                                                     abs=1e-5)


def test_resume_without_an_interrupted_run_says_so(tmp_path, cli):
    data = make_dataset(tmp_path / 'd', per_class=4)
    one_line_error(cli('train', '--data', data, '--out', tmp_path / 'chk', '--resume', *TINY), 'resume.pt',
                   'drop --resume')


def limit_file_size(nbytes):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return apply


@pytest.mark.slow
def test_a_disk_that_fills_while_saving_keeps_the_previous_checkpoint(tmp_path, cli):
    data, out, before = earlier_run(tmp_path, cli, per_class=6)
    r = run_script('train', '--data', data, '--out', out, '--seed', '1', *TINY,
                   preexec_fn=limit_file_size(2_000_000))  # the resnet18 checkpoint is ~45 MB
    line = one_line_error(r, out / 'monkeypox_model.pkl', 'cannot write', 'unchanged')
    assert 'File too large' in line or 'disk' in line
    assert (out / 'monkeypox_model.pkl').read_bytes() == before
    assert no_temporary_files(out)


def read_only(folder):
    """Make `folder` refuse new files, for root too (chattr +i); returns the undo."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    if shutil.which('chattr') is None or subprocess.run(['chattr', '+i', folder]).returncode:
        pytest.skip('cannot make a folder read-only for root on this file system')
    return lambda: subprocess.run(['chattr', '-i', folder], check=True)


@pytest.mark.skipif(os.name != 'posix', reason='POSIX permissions')
def test_a_read_only_output_folder_is_a_clear_error_and_loses_nothing(tmp_path, cli):
    data, out, before = earlier_run(tmp_path, cli, per_class=6)
    undo = read_only(out)
    try:
        r = cli('train', '--data', data, '--out', out, '--no-cache', *TINY)
    finally:
        undo()
    one_line_error(r, out, 'cannot write')
    assert (out / 'monkeypox_model.pkl').read_bytes() == before
    assert no_temporary_files(out)


# --- fuzz ------------------------------------------------------------------------------------------

def mutants(photo, count, seed=0):
    """Seeded corruptions of one photo: bit flips, truncations at random offsets, header damage."""
    rng = random.Random(seed)
    original = photo.read_bytes()
    out = []
    for i in range(count):
        b = bytearray(original)
        kind = i % 3
        if kind == 0:
            for _ in range(rng.randint(1, 20)):
                pos = rng.randrange(len(b))
                b[pos] ^= 1 << rng.randrange(8)
        elif kind == 1:
            b = b[:rng.randrange(len(b))]
        else:
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(min(len(b), 600))] = rng.randrange(256)
        out.append(bytes(b))
    return out


@pytest.mark.slow
def test_fuzzed_photos_never_crash_predict_or_training_and_every_failure_names_its_file(tmp_path, trained, cli):
    data, ckpt = trained
    real = MSLD / 'Monkey Pox' / 'P13_1.jpg'
    photo = real if real.exists() else data / 'Others' / 'P0_1.jpg'
    fuzz = tmp_path / 'fuzz'
    fuzz.mkdir()
    names = []
    for i, content in enumerate(mutants(photo, 300)):
        (fuzz / f'm{i:03d}.jpg').write_bytes(content)
        names.append(f'm{i:03d}.jpg')
    r = cli('predict', fuzz, '--checkpoint', ckpt, '--json', '--no-plot')
    assert r.returncode in (0, 2) and 'Traceback' not in r.stderr, r.stderr[-2000:]
    rows = [__import__('json').loads(line) for line in r.stdout.splitlines()]
    assert sorted(Path(row['path']).name for row in rows) == names  # each file: a prediction or an error
    failed = [row for row in rows if 'error' in row]
    assert failed, 'no mutant failed: the fuzzing is too gentle to test anything'
    for row in failed:
        assert row['error'].startswith(row['path'])
    # the same mutants inside a training set: skipped by name, training goes on
    train_dir = make_dataset(tmp_path / 'train', per_class=8)
    for i in range(0, 300, 3):
        (train_dir / ('Monkey Pox' if i % 2 else 'Others') / f'm{i:03d}.jpg').write_bytes((fuzz / names[i]).read_bytes())
    planted = sorted(f'm{i:03d}.jpg' for i in range(0, 300, 3))
    unreadable = {Path(row['path']).name for row in failed} & set(planted)
    # the mutants are copies of one photo in both classes, which the near-duplicate search would rightly join
    r = cli('train', '--data', train_dir, '--out', tmp_path / 'chk', '--near-duplicates', 'off', *TINY)
    assert r.returncode == 0 and 'Traceback' not in r.stderr, r.stderr[-2000:]
    skipped = torch.load(tmp_path / 'chk' / 'monkeypox_model.pkl', weights_only=True)['split']['skipped']
    assert unreadable, 'none of the planted mutants is unreadable: the training half tests nothing'
    assert {Path(p).name for p, _ in skipped} == unreadable  # exactly the mutants predict could not read
    assert all(reason.startswith(p) for p, reason in skipped)
