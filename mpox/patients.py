"""Patients: which photos are of one person, as the user states it (--patients) or as file names suggest,
checked before any heavy work so that a split or a fold cannot be silently wrong."""
import collections
import csv
import io
import os
import posixpath
import re

from .data import group_key, patient_groups, patients_by_class
from .files import atomic_write
from .system import UserError, first_line, warn

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


def check_grouping(photos, classes, spec, least, need):
    """Before any heavy work: a class whose largest patient holds an implausible share of its photos (more
    than SHARE_OF_ONE_PATIENT and more than MOST_PHOTOS_OF_ONE_PATIENT), or with fewer than `least` patients
    (what `need` needs: the split, the folds), is an error under 'auto' (the guess from file names was
    wrong) and a warning for a grouping the user stated."""
    for label, patients in enumerate(patients_by_class(photos)):
        count = sum(len(idx) for _, idx in patients)
        largest = max(patients, key=lambda group: len(group[1]))[1]
        key, size = photos[largest[0]].patient, len(largest)
        if size > SHARE_OF_ONE_PATIENT * count and size > MOST_PHOTOS_OF_ONE_PATIENT:
            problem, fix = (f'class {classes[label]!r}: {size} of its {count} photos are one patient ({key!r}) by '
                            f'{describe(spec)}'), FIX
        elif len(patients) < least:
            problem = (f'class {classes[label]!r} has {len(patients)} patient(s) by {describe(spec)} (the largest, '
                       f'{key!r}, has {size} photos), and {need} needs {least}')
            fix = f'add photos of more patients, or {FIX}'
            fix += '; or pass --weight-decay NUMBER (e.g. 1)' if need == '--weight-decay auto' else ''
        else:
            continue
        if spec == 'auto':
            raise UserError(f'{problem}; {fix}')
        warn(problem)


def grouping(photos, spec):
    """What a checkpoint and cv --json record of the grouping used: the spec, the groups the splits use, the
    largest, and how many patients were joined to another by byte-identical photos."""
    groups = collections.Counter(patient_groups(photos))
    return {'patients': spec, 'groups': len(groups), 'largest': max(groups.values(), default=0),
            'joined': len({p.patient for p in photos}) - len(groups)}


def write_folds(path, photos, fold_of, root, classes):
    """folds.csv: path (relative to --data), class, patient, fold (1-based; empty: trains every fold)."""
    text = io.StringIO()
    w = csv.writer(text)
    w.writerow(['path', 'class', 'patient', 'fold'])
    for p in photos:
        fold = fold_of.get(p.path)
        w.writerow([os.path.relpath(p.path, root), classes[p.label], p.patient, '' if fold is None else fold + 1])
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))
