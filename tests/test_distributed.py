"""torchrun: 2 CPU processes (gloo) give the results of one, each photo is processed once, and a killed
rank fails the run instead of hanging."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import SCRIPT, TINY, call_main, make_dataset, script_env

pytestmark = pytest.mark.slow  # each test launches torchrun and its processes
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
TWO_VIEWS = (*TINY, '--views', '2')  # the default's two views of each training photo


def torchrun(*args, timeout=600, **kwargs):
    return subprocess.run([*TORCHRUN, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          env=script_env({'OMP_NUM_THREADS': '1'}), timeout=timeout, **kwargs)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp('dist') / 'data', per_class=10)


@pytest.fixture(scope='module')
def runs(data, tmp_path_factory):
    """The head, then an epoch of fine-tuning, by one process and by two: (their output folders, two's stdout)."""
    root = tmp_path_factory.mktemp('runs')
    args = ('train', '--data', data, '--unfreeze', '1', '--epochs', '1', *TWO_VIEWS)
    one = call_main(*args, '--out', root / 'one')  # in this process: one process, without a second import
    two = torchrun(*args, '--out', root / 'two')
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    return root / 'one', root / 'two', two.stdout


def test_two_processes_train_the_same_head_and_fine_tune_alike(runs):
    one, two, stdout = runs
    assert stdout.count('head epoch') == 1 and stdout.count('finetune epoch   1/1') == 1  # only rank 0 speaks
    a = torch.load(one / 'monkeypox_model.pkl', weights_only=True)
    b = torch.load(two / 'monkeypox_model.pkl', weights_only=True)
    heads = [[{k: v for k, v in h.items() if k != 'seconds'} for h in c['history'] if h['stage'] == 'head'] for c in (a, b)]
    assert heads[0] == heads[1] and len(heads[0]) == 1  # the same head to the last bit: the same validation loss
    assert heads[0][0]['val_balanced_accuracy'] > 0.5  # it learned something to agree on
    tuned = [[h for h in c['history'] if h['stage'] == 'finetune'] for c in (a, b)]
    assert len(tuned[0]) == len(tuned[1]) == 1
    for x, y in zip(*tuned):  # bf16 where the CPU has it: the two split each batch in two,
        assert x['val_loss'] == pytest.approx(y['val_loss'], abs=5e-3)  # so their roundings differ a little
        assert x['val_balanced_accuracy'] == y['val_balanced_accuracy']
    for k in a['model']:
        assert torch.allclose(a['model'][k].float(), b['model'][k].float(), atol=2e-3), k
    # each rank wrote its own cache packs, and together they hold every feature once
    keys = [k for p in (two / 'cache').rglob('pack-*.pt') for k in torch.load(p, weights_only=True)['keys']]
    split = b['split']
    assert len(keys) == len(set(keys)) == len(split['train']) * 2 + len(split['val'])  # 2 views + the validation photos


def test_a_two_process_checkpoint_loads_in_one(data, runs):
    photo = data / 'Others' / 'P0_1.jpg'
    r = call_main('predict', photo, '--checkpoint', runs[1] / 'monkeypox_model.pkl', '--json', '--no-plot')
    assert r.returncode == 0 and json.loads(r.stdout)['path'] == str(photo)


def test_predict_on_a_folder_gives_each_photo_once_with_one_processs_answers(data, runs):
    one, _, _ = runs
    r = torchrun('predict', data, '--checkpoint', one / 'monkeypox_model.pkl', '--json')
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert sorted(row['path'] for row in rows) == sorted(str(p) for p in data.rglob('*.jpg'))
    alone = call_main('predict', data, '--checkpoint', one / 'monkeypox_model.pkl', '--json', '--no-plot')
    assert alone.returncode == 0, alone.stderr
    single = {row['path']: row for row in map(json.loads, alone.stdout.splitlines())}
    for row in rows:  # the same batches whatever the number of ranks: the same probabilities
        assert row['label'] == single[row['path']]['label']
        for c, p in row['probabilities'].items():
            assert p == pytest.approx(single[row['path']]['probabilities'][c], abs=1e-5)


def children(pid):
    """PIDs whose parent is `pid`."""
    out = []
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try:
            fields = stat.read_text().rsplit(')', 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def rank_of(pid):
    try:
        env = Path(f'/proc/{pid}/environ').read_bytes().split(b'\0')
    except OSError:
        return None
    return next((int(e.split(b'=')[1]) for e in env if e.startswith(b'RANK=')), None)


@pytest.mark.skipif(not Path('/proc').is_dir(), reason='finds the ranks through /proc')
def test_a_killed_rank_fails_the_run_with_a_message_instead_of_hanging(tmp_path):
    big = make_dataset(tmp_path / 'big', per_class=60)
    proc = subprocess.Popen([*TORCHRUN, str(SCRIPT), 'train', '--data', str(big), '--out', str(tmp_path / 'chk'),
                             '--arch', 'resnet50', '--weights', 'none', '--views', '8', '--no-plot'],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=script_env({'OMP_NUM_THREADS': '1'}))
    for line in proc.stdout:
        if line.startswith('model: resnet50'):
            break
    time.sleep(1)
    victims = [p for p in children(proc.pid) if rank_of(p) == 1]
    assert victims, 'rank 1 not found'
    t = time.time()
    os.kill(victims[0], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=180)
    assert time.time() - t < 120, 'the surviving rank hung'
    assert proc.returncode != 0
    # the surviving rank says in its own words why it stopped (not only torchrun's report of the dead one)
    print(stderr[-3000:])
    assert re.search(r'monkeypox\.py \(rank 0\): (error: lost contact with the other ranks|stopped)', stderr)
