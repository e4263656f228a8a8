"""Near-duplicates (mpox.duplicates, patients.join_near_duplicates): strong copies of real photos under random
names are found and kept with their original in every split and fold, look-alike photos of other patients
are not, label conflicts and copies across train/ val/ test/ are reported, and evaluate finds copies of the
photos a checkpoint was trained on."""
import csv
import json
import shutil
import sys

import pytest
from PIL import Image

import mpox.data
import mpox.duplicates
import mpox.files
import mpox.patients
from conftest import REPO, TINY

sys.path.insert(0, str(REPO / 'tools'))
from copies import write_copies  # noqa: E402

KNOWN_COPIES = {'P28', 'a25', 'P2', 'a13', 'a3', 'j3', '12', '4', '34', '82', '29'}  # joined on MSLD (docs/data.md)


def distinct_patients(msld, per_class):
    """The first photo of `per_class` MSLD patients of each class, none of them among the known copies."""
    chosen = []
    for folder in ('Monkey Pox', 'Others'):
        seen = {}
        for path in sorted((msld / folder).glob('*.jpg')):
            key = mpox.data.group_key(str(path))[1]
            if key not in KNOWN_COPIES:
                seen.setdefault(key, path)
        chosen += list(seen.values())[:per_class]
    return chosen


@pytest.fixture(scope='module')
def copied(tmp_path_factory, msld):
    """12 MSLD photos of different patients and two strong copies of each, under random names."""
    root = tmp_path_factory.mktemp('copies') / 'data'
    made = write_copies(distinct_patients(msld, 6), root, copies=2, seed=1)
    return root, dict(made)


def test_strong_copies_join_their_original_and_different_patients_stay_apart(copied):
    root, original_of = copied
    _, photos = mpox.data.read_photos(str(root))
    pairs = mpox.duplicates.near_duplicates(mpox.duplicates.signatures(photos))
    names = [str(p.path)[len(str(root)) + 1:] for p in photos]
    group_of = {}
    for k, group in enumerate(mpox.duplicates.joined_groups(len(photos), pairs)):
        group_of.update({names[i]: k for i in group})
    assert all(group_of.get(copy, -1) == group_of.get(original) for copy, original in original_of.items())
    originals = [n for n in names if n not in original_of]
    assert len({group_of.get(n, n) for n in originals}) == len(originals) == 12  # no two patients joined


def test_signatures_round_trip_through_a_checkpoint_and_find_the_same_copies(copied):
    root, original_of = copied
    _, photos = mpox.data.read_photos(str(root))
    sigs = mpox.duplicates.signatures(photos)
    names = [str(p.path)[len(str(root)) + 1:] for p in photos]
    originals = [i for i, n in enumerate(names) if n not in original_of]
    copies = [i for i, n in enumerate(names) if n in original_of]
    stored = [mpox.duplicates.from_stored(sigs[i].stored(pixels=False)) for i in originals]
    found = mpox.duplicates.near_duplicates([sigs[i] for i in copies], stored)
    matched = {names[copies[q]]: names[originals[r]] for q, r, _, _ in found}
    assert matched == original_of


def test_off_warns_and_joins_nothing(copied, capsys):
    root, _ = copied
    _, photos = mpox.data.read_photos(str(root))
    assert mpox.patients.join_near_duplicates(photos, str(root), 'off', '', str(root / 'x.csv')) == ([], None)
    assert '--near-duplicates off' in capsys.readouterr().err and all(p.copies is None for p in photos)


@pytest.mark.slow
def test_cv_keeps_copies_in_their_originals_fold_and_reports_a_label_conflict(copied, tmp_path, cli):
    root, original_of = copied
    data = tmp_path / 'd'
    shutil.copytree(root, data)
    copy, original = next(iter(original_of.items()))
    other = 'Others' if copy.startswith('Monkey Pox') else 'Monkey Pox'
    (data / copy).rename(data / other / (data / copy).name)  # the same photo under the other class
    r = cli('cv', '--data', data, '--folds', '3', '--out', tmp_path / 'cv', '--json', *TINY)
    assert r.returncode == 0, r.stderr
    assert 'label conflict' in r.stderr and (data / other / (data / copy).name).name in r.stderr
    with open(tmp_path / 'cv' / 'folds.csv') as f:
        fold = {row['path']: row['fold'] for row in csv.DictReader(f)}
    moved = {copy: f'{other}/{copy.split("/")[1]}'}
    assert all(fold[moved.get(c, c)] == fold[o] for c, o in original_of.items())
    grouping = json.loads(r.stdout)['grouping']
    assert grouping['groups'] == 12 and grouping['joined'] == 24 and grouping['largest'] == 3  # 36 names
    with open(tmp_path / 'cv' / 'near_duplicates.csv') as f:
        rows = list(csv.DictReader(f))
    assert sum(row['note'] == 'label conflict' for row in rows) >= 1 and len(rows) >= 24


def test_copies_across_train_val_and_test_are_leakage_and_evaluate_counts_copies_of_training_photos(copied, tmp_path,
                                                                                                  cli):
    root, original_of = copied
    data = tmp_path / 'd'
    originals = sorted(set(original_of.values()))
    for k, name in enumerate(originals):  # train: 4 photos a class; val and test: one each, plus copies
        part = 'train' if k % 6 < 4 else 'val' if k % 6 == 4 else 'test'
        (data / part / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / name, data / part / name)
    leaked = [c for c, o in original_of.items() if originals.index(o) % 6 == 0][:2]  # copies of training photos
    (data / 'val' / leaked[0]).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(root / leaked[0], data / 'val' / leaked[0])
    (data / 'test' / leaked[1]).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(root / leaked[1], data / 'test' / leaked[1])
    r = cli('train', '--data', data, '--out', tmp_path / 'chk', '--weight-decay', '1', *TINY)
    assert r.returncode == 0, r.stderr
    assert 'leakage: 2 of the 6 photos in val/ and test/ copy a training photo' in r.stderr
    with open(tmp_path / 'chk' / 'near_duplicates.csv') as f:
        notes = sorted(row['note'] for row in csv.DictReader(f) if row['note'])
    assert notes == ['copy of a training photo in test/', 'copy of a training photo in val/']
    r = cli('evaluate', '--data', data, '--checkpoint', tmp_path / 'chk' / 'monkeypox_model.pkl', '--json', *TINY[-1:])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)['copies_of_training'] == 1  # test/: the copy, not the test photos
    assert '1 of the 3 photos evaluated copy a photo the model was trained on' in r.stderr


def test_odd_photos_and_a_damaged_cache_leave_the_search_standing(tmp_path):
    folder = tmp_path / 'Others'
    folder.mkdir()
    Image.new('RGB', (1, 500), (200, 120, 100)).save(folder / 'thin.png')  # too thin for ORB's pyramid
    Image.new('RGBA', (64, 48), (200, 0, 0, 128)).save(folder / 'rgba.png')
    Image.new('L', (10, 10), 90).save(folder / 'tiny.png')
    (folder / 'broken.jpg').write_bytes(b'not a photo at all')
    photos = [mpox.data.Photo(str(p), 0, mpox.files.sha256_file(p)) for p in sorted(folder.iterdir())]
    sigs = mpox.duplicates.signatures(photos)
    assert [s is None for s in sigs] == [True, False, False, False]  # broken, rgba, thin, tiny
    assert mpox.duplicates.near_duplicates(sigs) == []
    cache = {p.sha: s for p, s in zip(photos, sigs)}
    mpox.duplicates.save_signatures(str(tmp_path), cache)
    again = mpox.duplicates.load_signatures(str(tmp_path))
    assert set(again) == {p.sha for p, s in zip(photos, sigs) if s is not None}  # the unreadable one is tried again
    assert all((again[p.sha].points == s.points).all() for p, s in zip(photos, sigs) if s is not None)  # as computed
    (tmp_path / mpox.duplicates.CACHE_NAME).write_bytes(b'damaged')
    assert mpox.duplicates.load_signatures(str(tmp_path)) == {}
