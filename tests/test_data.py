"""Photos, their patients, and the splits and folds that keep a patient on one side: mpox.data."""

import collections
import os

import mpox.data


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


def test_grouped_folds_keep_patients_together_and_cover_every_photo_once(msld):
    _, photos = mpox.data.read_photos(str(msld))
    folds = mpox.data.grouped_folds(photos, 5, seed=0)
    assert len(folds) == len(photos) and set(folds) == set(range(5))  # each photo in exactly one test fold
    fold_of_group = {}
    for p, f in zip(photos, folds):
        assert fold_of_group.setdefault(mpox.data.group_key(p.path), f) == f, p.path
    by_sha = collections.defaultdict(set)
    for p, f in zip(photos, folds):
        by_sha[p.sha].add(f)
    assert all(len(fs) == 1 for fs in by_sha.values())  # byte-identical duplicates share a fold
    for label in (0, 1):
        n = sum(p.label == label for p in photos)
        for k in range(5):
            in_fold = sum(p.label == label and f == k for p, f in zip(photos, folds))
            assert abs(in_fold - n / 5) <= 1, (label, k, in_fold)


def test_grouped_folds_are_fixed_by_the_seed(msld):
    _, photos = mpox.data.read_photos(str(msld))
    assert mpox.data.grouped_folds(photos, 5, 0) == mpox.data.grouped_folds(photos, 5, 0)
    assert mpox.data.grouped_folds(photos, 5, 0) != mpox.data.grouped_folds(photos, 5, 1)


def photos_of(root):
    return mpox.data.read_photos(str(root))[1]


def test_a_patient_in_two_classes_stays_whole_and_every_class_keeps_training_photos():
    for seed in range(40):
        # class 1 has two patients, one of them shared with class 0: wherever class 0 sends it, class 1 trains
        photos = [mpox.data.Photo(f'/d/a/{i}.jpg', 0, f'{i:064x}', patient=f'p{i % 4}') for i in range(8)] + \
            [mpox.data.Photo(f'/d/b/{i}.jpg', 1, f'{i + 8:064x}', patient=p) for i, p in enumerate(['p0', 'p0', 'q'])]
        train, val = mpox.data.grouped_split(photos, 0.5, seed)
        assert {p.label for p in train} == {0, 1}, seed
        sides = {}
        for side, part in (('train', train), ('val', val)):
            for p in part:
                sides.setdefault(p.patient, set()).add(side)
        assert all(len(s) == 1 for s in sides.values()), seed  # each patient on one side, across classes
        folds = mpox.data.grouped_folds(photos, 2, seed)
        assert len({f for p, f in zip(photos, folds) if p.patient == 'p0'}) == 1
