"""Patients you can state and check (mpox.patients): --patients auto / none / re: / a CSV file, a grouping
that cannot be silently wrong, a patient kept whole across classes, and cv's folds written down."""
import csv
import json

import numpy as np
import pytest

import mpox.data
import mpox.patients
from conftest import TINY, draw_photo, make_dataset, one_line_error


def numbered(root, per_class=12):
    """Class folders whose photos are numbered per class (Rash_1.jpg, Rash_2.jpg, ...), as public datasets
    often name them: the file-name rule makes each class one 'patient'."""
    rng = np.random.default_rng(0)
    for name, prefix, colour in (('Monkey Pox', 'Mpox', (200, 30, 40)), ('Others', 'Rash', (40, 140, 160))):
        (root / name).mkdir(parents=True)
        for i in range(1, per_class + 1):
            draw_photo(rng, colour)[0].save(root / name / f'{prefix}_{i}.jpg')
    return root


@pytest.mark.parametrize('command', ['train', 'cv'])
def test_a_class_that_the_file_names_make_one_patient_stops_before_any_extraction(tmp_path, cli, command):
    data = numbered(tmp_path / 'd')
    r = cli(command, '--data', data, '--out', tmp_path / 'chk', *TINY)
    one_line_error(r, "class 'Monkey Pox'", '12 of its 12 photos', "'Monkey Pox/Mpox'", '--patients none',
                   "--patients 're:REGEX'", '--patients FILE.csv')
    assert 'features:' not in r.stdout and not (tmp_path / 'chk' / 'cache').exists()


@pytest.mark.slow
def test_stated_groupings_are_used_and_the_split_table_counts_patients(tmp_path, cli):
    data = numbered(tmp_path / 'd')
    r = cli('train', '--data', data, '--out', tmp_path / 'none', '--patients', 'none', *TINY)
    assert r.returncode == 0, r.stderr
    assert 'Monkey Pox     10 (  10)            2 (   2)' in r.stdout  # photos (patients) per class and side
    ckpt = __import__('torch').load(tmp_path / 'none' / 'monkeypox_model.pkl', weights_only=True)
    assert ckpt['split']['grouping'] == {'patients': 'none', 'groups': 24, 'largest': 1, 'joined': 0}
    # every third photo of a class one patient: Mpox_1, _4, _7, _10 are patient 1
    photos = mpox.data.read_photos(str(data))[1]
    mpox.patients.assign_patients(photos, str(data), r're:_(\d+)\.')
    assert photos[0].patient == 'Monkey Pox/1' and len({p.patient for p in photos}) == 24
    table = tmp_path / 'patients.csv'
    with open(table, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['path', 'patient'])
        for p in photos:
            number = int(p.path.rsplit('_', 1)[1].split('.')[0])
            w.writerow([p.path[len(str(data)) + 1:], f'person{number % 4}'])  # shared across the two classes
    r = cli('train', '--data', data, '--out', tmp_path / 'csv', '--patients', table, *TINY)
    assert r.returncode == 0, r.stderr
    assert 'patient(s) have photos in two classes' in r.stderr and 'kept whole' in r.stderr
    split = __import__('torch').load(tmp_path / 'csv' / 'monkeypox_model.pkl', weights_only=True)['split']
    person = lambda rel: f'person{int(rel.rsplit("_", 1)[1].split(".")[0]) % 4}'  # noqa: E731
    assert not {person(r) for r in split['train']} & {person(r) for r in split['val']}  # whole, across classes


def test_bad_groupings_are_one_line_errors_naming_the_file(tmp_path, cli):
    data = numbered(tmp_path / 'd', per_class=6)
    base = ('train', '--data', data, '--out', tmp_path / 'chk', *TINY)
    one_line_error(cli(*base, '--patients', r're:^Mpox_(\d+)'), 'Rash_1.jpg', 'finds no patient')
    one_line_error(cli(*base, '--patients', 're:[('), 'not a regular expression')
    one_line_error(cli(*base, '--patients', tmp_path / 'missing.csv'), 'missing.csv', 'cannot read it')
    rows = [['path', 'patient']] + [[f'Monkey Pox/Mpox_{i}.jpg', f'a{i}'] for i in range(1, 7)] + \
        [[f'Others/Rash_{i}.jpg', f'b{i}'] for i in range(1, 7)]
    for name, edit, words in (('unlisted', lambda r: r[:-1], ['Rash_6.jpg', 'not listed']),
                              ('twice', lambda r: r + [r[1]], ['Mpox_1.jpg', 'listed twice']),
                              ('absent', lambda r: r + [['Others/Rash_9.jpg', 'b9']], ['Rash_9.jpg', 'not in']),
                              ('header', lambda r: [['file', 'who']] + r[1:], ['header "path,patient"'])):
        table = tmp_path / f'{name}.csv'
        with open(table, 'w', newline='') as f:
            csv.writer(f).writerows(edit(rows))
        one_line_error(cli(*base, '--patients', table), *words)


@pytest.mark.slow
def test_cv_writes_its_folds_and_the_grouping_it_used(tmp_path, cli):
    data = make_dataset(tmp_path / 'd', per_class=10)
    r = cli('cv', '--data', data, '--folds', '3', '--out', tmp_path / 'cv', '--json', *TINY)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result['grouping'] == {'patients': 'auto', 'groups': 10, 'largest': 2, 'joined': 0}
    with open(tmp_path / 'cv' / 'folds.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 20 and {r['fold'] for r in rows} == {'1', '2', '3'}
    by_patient = {}
    for row in rows:
        by_patient.setdefault(row['patient'], set()).add(row['fold'])
    assert len(by_patient) == 10 and all(len(folds) == 1 for folds in by_patient.values())  # a patient, one fold
    assert sorted(sum(int(r['fold']) == k for r in rows) for k in (1, 2, 3)) == sorted(f['test'] for f in result['folds'])
