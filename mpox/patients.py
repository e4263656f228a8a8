"""Patients: which photos are of one person, as the user states it (--patients) or as file names suggest,
checked before any heavy work so that a split or a fold cannot be silently wrong."""
import collections
import csv
import os
import posixpath
import re
import time

from .data import group_key, patient_groups, patient_of, patients_by_class
from .duplicates import from_stored, joined_groups, load_signatures, near_duplicates, save_signatures, signatures
from .files import write_csv
from .system import UserError, first_line, is_main, say, warn

SHARE_OF_ONE_PATIENT = 1 / 3  # a class whose largest "patient" holds more than this share of its photos,
MOST_PHOTOS_OF_ONE_PATIENT = 5  # and more photos than this, was grouped by a rule that does not fit its names
FIX = ("say how photos group with --patients none (each photo its own patient), --patients 're:REGEX' (a "
       "patient per match in the file name) or --patients FILE.csv (columns path,patient)")


def describe(spec):
    """How the photos were grouped, in words."""
    if spec == 'auto':
        return 'file names (the stem without a trailing _<digits>, in each class folder)'
    if spec == 'none':
        return 'none (every photo its own patient)'
    return f'the pattern {spec[3:]!r} on file names' if spec.startswith('re:') else f'the table {spec}'


def assign_patients(photos, root, spec):
    """Set each photo's patient by `spec`: 'auto' (file names), 'none' (every photo its own), 're:REGEX'
    (re.search on the file name: group 1, or the whole match, in its class folder) or a CSV file (header
    path,patient; paths relative to `root`). A name the pattern does not match, or a photo the table does
    not list, is a one-line error naming it; so is a table row whose file is missing or repeated."""
    if spec == 'auto':
        for p in photos:
            p.patient = '/'.join(group_key(p.path))
    elif spec == 'none':
        for p in photos:
            p.patient = os.path.relpath(p.path, root)
    elif spec.startswith('re:'):
        pattern = compiled(spec)
        for p in photos:
            p.patient = os.path.basename(os.path.dirname(p.path)) + '/' + matched(pattern, p.path, spec)
    else:
        table = read_table(spec, root)
        for p in photos:
            relative = os.path.relpath(p.path, root).replace(os.sep, '/')
            if relative not in table:
                raise UserError(f'{p.path}: not listed in --patients {spec}; add a row "{relative},PATIENT"')
            p.patient = table[relative]
        straddling = patients_in_two_classes(photos)
        if straddling:
            warn(f'--patients {spec}: {len(straddling)} patient(s) have photos in two classes (e.g. {straddling[0]!r}); '
                 'each is kept whole, on one side of every split and in one fold')
    return photos


def compiled(spec):
    try:
        return re.compile(spec[3:])
    except re.error as e:
        raise UserError(f'--patients {spec}: not a regular expression ({e}); e.g. re:^(P\\d+)_') from e


def matched(pattern, path, spec):
    name = os.path.basename(path)
    m = pattern.search(name)
    key = (m.group(1) if pattern.groups else m.group(0)) if m else None
    if not key:
        raise UserError(f'{path}: --patients {spec} finds no patient in {name!r} (no match, or an empty group); '
                        'change the pattern or use a CSV file')
    return key


def read_table(spec, root):
    """The CSV file's {path relative to the data folder: patient}, every row checked."""
    try:
        with open(spec, newline='', encoding='utf-8-sig') as f:  # utf-8, with or without a BOM (spreadsheets)
            rows = list(csv.reader(f))
    except OSError as e:
        raise UserError(f'--patients {spec}: cannot read it ({e.strerror or e}); pass auto, none, re:REGEX or a '
                        'CSV file') from e
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f'--patients {spec}: not a UTF-8 CSV file ({first_line(e)}); save it as CSV UTF-8') from e
    if not rows or [c.strip() for c in rows[0]] != ['path', 'patient']:
        raise UserError(f'--patients {spec}: the first row must be the header "path,patient"')
    table = {}
    for n, row in enumerate(rows[1:], start=2):
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise UserError(f'--patients {spec}: row {n} must be "path,patient", both given')
        path, patient = posixpath.normpath(row[0].strip().replace('\\', '/')), row[1].strip()
        if posixpath.isabs(path) or path.startswith('../'):
            raise UserError(f'--patients {spec}: row {n} names {path}; paths are relative to the data folder')
        if path in table:
            raise UserError(f'--patients {spec}: {path} is listed twice (rows {n} and an earlier one)')
        if not os.path.isfile(os.path.join(root, path)):
            raise UserError(f'--patients {spec}: row {n} names {path}, which is not in {root}')
        table[path] = patient
    return table


def patients_in_two_classes(photos):
    """The patients with photos in more than one class."""
    classes = {}
    for p in photos:
        classes.setdefault(p.patient, set()).add(p.label)
    return sorted(k for k, labels in classes.items() if len(labels) > 1)


def check_grouping(photos, classes, spec, least, need, copies_only=False):
    """Before any heavy work: a class whose largest patient holds an implausible share of its photos (more
    than SHARE_OF_ONE_PATIENT and more than MOST_PHOTOS_OF_ONE_PATIENT), or with fewer than `least` patients
    (what `need` needs: the split, the folds), is an error under 'auto' (the guess from file names was
    wrong) and a warning for a grouping the user stated. `copies_only`: the check again once near-duplicates
    joined patients, of the classes whose largest patient holds copies."""
    for label, patients in enumerate(patients_by_class(photos)):
        count = sum(len(idx) for _, idx in patients)
        largest = max(patients, key=lambda group: len(group[1]))[1]
        key, size = photos[largest[0]].patient, len(largest)
        copies = any(photos[i].copies is not None for i in largest)
        if copies_only and not copies:
            continue
        joined = len({photos[i].patient for i in largest})
        how = describe(spec) + (f' and the near-duplicate copies that joined {joined} patients (near_duplicates.csv)'
                                if copies else '')
        if size > SHARE_OF_ONE_PATIENT * count and size > MOST_PHOTOS_OF_ONE_PATIENT:
            problem = f'class {classes[label]!r}: {size} of its {count} photos are one patient ({key!r}) by {how}'
            fix = FIX + ('; or --near-duplicates off' if copies else '')
        elif len(patients) < least:
            problem = (f'class {classes[label]!r} has {len(patients)} patient(s) by {how} (the largest, '
                       f'{key!r}, has {size} photos), and {need} needs {least}')
            fix = f'add photos of more patients, or {FIX}'
            fix += '; or pass --weight-decay NUMBER (e.g. 1)' if need == '--weight-decay auto' else ''
        else:
            continue
        if spec == 'auto':
            raise UserError(f'{problem}; {fix}')
        warn(problem)


def join_near_duplicates(photos, root, search, cache, csv_path, part_of=None):
    """Find near-duplicate copies among `photos` (mpox.duplicates) and mark each group of them (Photo.copies)
    so that every split and fold keeps it together, with its patients (data.patient_groups). `search`: 'on'
    or 'off' (--near-duplicates); `cache`: the feature cache folder ('': none). What was found is reported
    (report_copies) and the pairs go to `csv_path`. Returns the pairs and the signatures (None when off)."""
    if search == 'off':
        warn('--near-duplicates off: copies of a photo under other names are not looked for, and may land on both '
             'sides of a split, which flatters its results')
        return [], None
    t0, stored = time.time(), load_signatures(cache)
    known = len(stored)
    sigs = signatures(photos, stored)
    if len(stored) > known and is_main():
        save_signatures(cache, stored)
    pairs = near_duplicates(sigs)
    before = len(set(patient_groups(photos)))
    for k, group in enumerate(joined_groups(len(photos), pairs)):
        for i in group:
            photos[i].copies = k
    groups = collections.Counter(patient_groups(photos))
    say(f'near-duplicates: {len(pairs)} pairs of copies among {len(photos)} photos ({time.time() - t0:.1f}s); '
        f'{before - len(groups)} patient(s) joined to another, the largest patient now {max(groups.values())} photos '
        f'({csv_path})')
    report_copies(photos, pairs, root, csv_path, part_of)
    return pairs, sigs


def report_copies(photos, pairs, root, csv_path, part_of):
    """Warn of the pairs in two classes (label conflicts) and, with train/ val/ test/ folders (`part_of`: a
    photo's folder), of training photos copied into another folder; write every pair to `csv_path`."""
    notes = [pair_note(photos[a], photos[b], part_of) for a, b, *_ in pairs]
    conflicts = [(a, b) for (a, b, *_), note in zip(pairs, notes) if 'label conflict' in note]
    if conflicts:
        a, b = conflicts[0]
        warn(f'{len(conflicts)} near-duplicate pair(s) are in two classes (label conflicts, e.g. {photos[a].path} and '
             f'{photos[b].path}): each pair is kept in one fold and on one side of every split; check their labels')
    leaks = {i for (a, b, *_), note in zip(pairs, notes) if 'copy of a training photo' in note
             for i in (a, b) if part_of[photos[i].path] != 'train'}
    if leaks:
        held = sum(part != 'train' for part in part_of.values())
        warn(f'leakage: {len(leaks)} of the {held} photos in val/ and test/ copy a training photo (pairs in '
             f'{csv_path}): results on them flatter the model; move or remove the copies')
    if is_main():
        write_pairs(csv_path, photos, pairs, notes, root)


def training_copies(stored, photos, root, out, checkpoint):
    """evaluate's check: the photos that copy one the checkpoint was trained on (`stored`: its training
    photos' signatures), said in one line and listed in OUT/copies_of_training.csv. Returns their count
    (None when the checkpoint keeps no signatures)."""
    if not stored:
        say(f'note: {checkpoint} keeps no signatures of its training photos, so copies of them among these photos '
            'are not looked for')
        return None
    pairs = near_duplicates(signatures(photos), [from_stored(d) for d in stored])
    copied = sorted({q for q, *_ in pairs})
    csv_path = os.path.join(out, 'copies_of_training.csv')
    if copied:
        warn(f'{len(copied)} of the {len(photos)} photos evaluated copy a photo the model was trained on (pairs in '
             f'{csv_path}): the metrics below count them as unseen, which flatters them')
    else:
        say(f'near-duplicates: none of the {len(photos)} photos evaluated copies a photo the model was trained on')
    if is_main():
        rows = [[os.path.relpath(photos[q].path, root), stored[r]['path'], m] for q, r, m, _ in pairs]
        write_csv(csv_path, ['path', 'training_photo', 'matches'], rows)
    return len(copied)


def pair_note(a, b, part_of):
    """What a near-duplicate pair means: a label conflict, a copy of a training photo in val/ or test/, or
    (empty) copies that now share a patient."""
    notes = ['label conflict'] if a.label != b.label else []
    parts = {part_of[a.path], part_of[b.path]} if part_of else set()
    if 'train' in parts and len(parts) == 2:
        notes.append(f'copy of a training photo in {(parts - {"train"}).pop()}/')
    return '; '.join(notes)


def write_pairs(path, photos, pairs, notes, root):
    """near_duplicates.csv: each pair's paths (relative to --data) and patients, the keypoint matches and
    the correlation that confirmed it, and what it means."""
    rows = [[os.path.relpath(photos[a].path, root), patient_of(photos[a]), os.path.relpath(photos[b].path, root),
             patient_of(photos[b]), matches, f'{corr:.3f}', note] for (a, b, matches, corr), note in zip(pairs, notes)]
    write_csv(path, ['path_a', 'patient_a', 'path_b', 'patient_b', 'matches', 'correlation', 'note'], rows)


def grouping(photos, spec):
    """What a checkpoint and cv --json record of the grouping used: the spec, the groups the splits use, the
    largest, and how many patients were joined to another by byte-identical photos or near-duplicates."""
    groups = collections.Counter(patient_groups(photos))
    return {'patients': spec, 'groups': len(groups), 'largest': max(groups.values(), default=0),
            'joined': len({p.patient for p in photos}) - len(groups)}


def write_folds(path, photos, fold_of, root, classes):
    """folds.csv: path (relative to --data), class, patient, fold (1-based; empty: trains every fold)."""
    rows = [[os.path.relpath(p.path, root), classes[p.label], p.patient,
             '' if fold_of.get(p.path) is None else fold_of[p.path] + 1] for p in photos]
    write_csv(path, ['path', 'class', 'patient', 'fold'], rows)
