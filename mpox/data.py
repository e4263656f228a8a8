"""Photos in class folders, their patients, and the splits and folds that keep a patient on one side."""

import dataclasses
import os
import random
import re
from pathlib import Path

import torchvision

from .files import sha256_file
from .images import IMAGE_EXTENSIONS, is_hidden, is_image_file, load_rgb
from .system import UserError, say


DATASET_URL = 'https://github.com/ShamsNafisaAli/Monkeypox-Skin-Lesion-Dataset'


@dataclasses.dataclass
class Photo:
    path: str    # file on disk
    label: int   # index into the class list
    sha: str     # sha256 of the bytes: the photo's identity in the feature cache and the split
    patient: str = ''  # who the photo is of (patients.assign_patients); '' : by its file name (group_key)
    copies: int = None  # its group of near-duplicate copies (patients.join_near_duplicates); None: none found


@dataclasses.dataclass
class Split:
    root: str                 # the --data folder
    classes: list             # class names in index order
    train: list               # Photos
    val: list                 # Photos (may be empty)
    how: str                  # 'folders' (DIR/train + DIR/val) or 'grouped' (split here by patient)
    skipped: list = dataclasses.field(default_factory=list)  # [path, reason] of unreadable images
    grouping: dict = None     # how photos were grouped into patients (patients.grouping)


LAYOUT_HELP = ('Expected one folder per class, e.g. monkeypoxdata/Monkey Pox/*.jpg and monkeypoxdata/Others/*.jpg '
               '(or train/ and val/ folders each laid out so). Get the public Monkeypox Skin Lesion Dataset with '
               f'`python monkeypox.py download` ({DATASET_URL}, CC BY-NC).')


def read_dataset(root, memo=None, classes=None, parts=('train', 'val')):
    """(classes, photos by part) of --data, the one place that knows its two layouts: the DIR/train,
    DIR/val and DIR/test folders (those of `parts` that exist) when DIR/train exists, else DIR's class
    folders (part 'all'). With `classes` (a model's), every class folder must be one of them."""
    found = {}
    for part in parts if os.path.isdir(os.path.join(root, 'train')) else ['']:
        folder = os.path.join(root, part) if part else root
        if not part or os.path.isdir(folder):
            classes, found[part or 'all'] = read_photos(folder, classes, memo)
    if len(classes or []) < 2:
        raise UserError(f'{root} has only one class folder ({classes[0]!r}); a classifier needs at least two. '
                        f'{LAYOUT_HELP}')
    return classes, found


def split_photos(root, classes, parts, cfg):
    """Training and validation photos: the train/ and val/ folders as given, or the class folders split
    here by patient (--val-fraction, --seed)."""
    if 'all' not in parts:
        return Split(root, classes, parts['train'], parts.get('val', []), 'folders')
    return Split(root, classes, *grouped_split(parts['all'], cfg.val_fraction, cfg.seed), 'grouped')


def evaluation_photos(loaded, cfg):
    """Which photos `evaluate` scores, and a sentence saying so."""
    data, split = cfg.data, loaded.ckpt.get('split', {})
    _, parts = read_dataset(data, classes=loaded.classes, parts=('test', 'val'))
    if 'all' not in parts:
        part = next((p for p in ('test', 'val') if p in parts), None)
        if part is None:
            raise UserError(f'{data} has train/ but no val/ or test/ folder to evaluate on; pass --data FOLDER')
        return parts[part], f'{os.path.join(data, part)} ({part} folder, never used for training)'
    photos = parts['all']
    rel = {os.path.relpath(p.path, data): p for p in photos}
    trained = set(split.get('train', [])) | set(split.get('val', []))
    if split.get('how') == 'grouped' and trained and trained <= set(rel) and not cfg.all:
        if not split['val']:
            raise UserError(f'{cfg.checkpoint} was trained on every photo of {data} (--val-fraction 0): none is left '
                            'to evaluate on. Pass --all (its training photos: an optimistic score), or run `cv`')
        val = [rel[r] for r in split['val']]
        return val, (f'{data}: the {len(val)} validation photos of the checkpoint\'s split (seed {split["seed"]}); '
                     '--all for every photo')
    note = ' (--all: includes the photos the model was trained on)' if cfg.all and trained & set(rel) else ''
    return photos, f'{data}: all {len(photos)} photos{note}'


def read_photos(root, classes=None, memo=None):
    """Photos of an ImageFolder-style folder; with `classes`, its class names must be among them."""
    found, samples = scan_folder(root)
    if classes is None:
        classes = found
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise UserError(f'{os.path.join(root, unknown[0])}: class {unknown[0]!r} is not one of the model\'s '
                        f'classes {classes}; rename the folder or remove it')
    photos = []
    for path, label in samples:
        try:
            sha = sha256_file(path, memo)
        except OSError as e:
            raise UserError(f'{path}: cannot read ({e.strerror or e}); check its permissions') from e
        photos.append(Photo(path, classes.index(found[label]), sha))
    return classes, photos


def scan_folder(root):
    """(classes, [(path, label)]) of an ImageFolder-style folder, with one clear error per bad layout."""
    if not os.path.isdir(root):
        what = 'is not a folder' if os.path.exists(root) else 'does not exist'
        raise UserError(f'data folder {root} {what}. {LAYOUT_HELP}')
    try:
        folder = PhotoFolder(root)
    except OSError as e:
        raise UserError(f'cannot read {e.filename or root}: {e.strerror or e}; check its permissions') from e
    present = {label for _, label in folder.samples}
    empty = [c for k, c in enumerate(folder.classes) if k not in present]
    if empty:
        raise UserError(f'class folder {os.path.join(root, empty[0])} holds no images '
                        f'({", ".join(IMAGE_EXTENSIONS[:6])}, ...). Add photos or remove the folder.')
    return folder.classes, folder.samples


class PhotoFolder(torchvision.datasets.ImageFolder):
    """torchvision's ImageFolder that skips hidden folders (.git, .ipynb_checkpoints, __MACOSX) and
    hidden or non-image files (.DS_Store, README), and keeps empty class folders for a clear error."""

    def __init__(self, root):
        super().__init__(root, loader=load_rgb, is_valid_file=is_image_file, allow_empty=True)

    def find_classes(self, directory):
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not is_hidden(e.name))
        if not classes:
            raise UserError(f'{directory} has no class folders. {LAYOUT_HELP}')
        return classes, {c: i for i, c in enumerate(classes)}


def collect_images(paths):
    """Image files named on the command line or found (recursively) in named folders, and [path, problem]
    for each path that gave none."""
    files, problems = [], []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(d, f) for d, dirs, fs in os.walk(p) for f in fs if is_image_file(f)
                           and not any(is_hidden(part) for part in Path(os.path.relpath(d, p)).parts))
            if not found:
                problems.append([p, f'{p}: folder holds no images ({", ".join(IMAGE_EXTENSIONS[:5])}, ...)'])
            files += found
        elif os.path.isfile(p):
            files.append(p)
        else:
            problems.append([p, f'{p}: no such file or folder'])
    return files, problems


def drop_unreadable(split, failures):
    """Remove photos that could not be decoded; a class left without training photos is an error."""
    bad = {path for path, _ in failures}
    if not bad:
        return split
    for path, reason in failures:
        if [path, reason] not in split.skipped:
            split.skipped.append([path, reason])
    split.train = [p for p in split.train if p.path not in bad]
    split.val = [p for p in split.val if p.path not in bad]
    for label, name in enumerate(split.classes):
        if not any(p.label == label for p in split.train):
            raise UserError(f'class {name!r} has no readable training photos left '
                            f'({len(bad)} unreadable files skipped); add readable photos to it')
    return split


def print_split(split, note=''):
    how = {'folders': 'train/ and val/ folders', 'grouped': 'split by patient'}[split.how]
    say(f'data: {split.root} ({how}{note}): {len(split.train)} training, {len(split.val)} validation photos')
    width = max(len(c) for c in split.classes)
    say(f'  {"class":<{width}}  train (patients)    val (patients)')
    for k, c in enumerate(split.classes):
        counts = [f'{sum(p.label == k for p in part):5d} ({len({p.patient for p in part if p.label == k}):4d})'
                  for part in (split.train, split.val)]
        say(f'  {c:<{width}}  {counts[0]}        {counts[1]}')


def group_key(path):
    """Patient of a photo: its class folder and file stem without a trailing _<digits> (P13_1, P13_2 -> P13)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.basename(os.path.dirname(path)), re.sub(r'_\d+$', '', stem)


def patient_groups(photos):
    """Group id per photo: same group key, byte-identical files of one class, or near-duplicate copies (a
    photo under two names, or cropped and turned, is still one photo and must not straddle a split)."""
    first, links = {}, []
    for i, p in enumerate(photos):
        keys = [('patient', patient_of(p)), ('bytes', p.label, p.sha)]
        links += [(i, first.setdefault(key, i)) for key in keys + ([('copies', p.copies)] if p.copies is not None else [])]
    return connected(len(photos), links)


def patient_of(photo):
    return photo.patient or '/'.join(group_key(photo.path))


def connected(n, links):
    """Group id (its smallest member's root) of each of 0..n-1, joined by the pairs `links` (union-find)."""
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in links:
        parent[find(a)] = find(b)
    return [find(i) for i in range(n)]


def patients_by_class(photos, groups=None):
    """For each class in index order, its patients as (group id, photo indices) (in order of first photo). A
    patient with photos in two classes is in both lists, under one group id. `groups`: patient_groups(photos),
    when the caller has it."""
    groups, by_class = groups or patient_groups(photos), {}
    for i, p in enumerate(photos):
        by_class.setdefault(p.label, {}).setdefault(groups[i], []).append(i)
    return [list(by_class[label].items()) for label in sorted(by_class)]


def grouped_folds(photos, folds, seed):
    """Stratified folds that keep each patient's photos together: per class, patients (largest first,
    ties in seeded random order) go to the fold holding fewest photos of that class."""
    rng, fold_of, placed = random.Random(seed), [0] * len(photos), {}
    for order in patients_by_class(photos):
        rng.shuffle(order)
        order.sort(key=lambda group: len(group[1]), reverse=True)  # stable: equal sizes keep the shuffled order
        load = [0] * folds
        for group, idx in order:  # a patient met in an earlier class keeps that class's fold
            f = placed.setdefault(group, min(range(folds), key=lambda k: (load[k], k)))
            load[f] += len(idx)
            for i in idx:
                fold_of[i] = f
    return fold_of


def grouped_split(photos, val_fraction, seed):
    """(train, val): per class, whole patients in seeded random order go to validation until it holds
    val_fraction of that class's photos."""
    rng, in_val, placed = random.Random(seed), [False] * len(photos), {}
    groups = patient_groups(photos)
    by_class = patients_by_class(photos, groups)
    for order in by_class:
        rng.shuffle(order)
        target, taken = round(val_fraction * sum(len(idx) for _, idx in order)), 0
        for k, (group, idx) in enumerate(order):  # a patient met in an earlier class keeps that class's side
            held = placed.setdefault(group, k < len(order) - 1 and taken < target)  # the last stays in train
            taken += len(idx) if held else 0
            for i in idx:
                in_val[i] = held
    for order in by_class:  # a class whose patients all went to validation with other classes' photos
        if all(in_val[i] for _, idx in order for i in idx):
            group = min(order, key=lambda g: len(g[1]))[0]  # its smallest patient trains, in every class
            for i, g in enumerate(groups):
                in_val[i] = in_val[i] and g != group
    return ([p for p, v in zip(photos, in_val) if not v], [p for p, v in zip(photos, in_val) if v])


def dataset_license(root):
    """The license line of the LICENSE.txt in the data folder (`download` writes one), or None."""
    try:
        with open(os.path.join(root, 'LICENSE.txt'), encoding='utf-8') as f:
            return next((line.split(':', 1)[1].strip() for line in f if line.startswith('License:')), None)
    except (OSError, UnicodeDecodeError):
        return None


def positive_index(classes, positive):
    """Index of the class screened for: --positive-class, else the class named like mpox/monkeypox."""
    if positive and positive != 'auto':
        if positive not in classes:
            raise UserError(f'--positive-class {positive!r} is not one of the classes {classes}')
        return classes.index(positive)
    for i, c in enumerate(classes):
        if re.sub(r'[\s_-]+', '', c.lower()) in ('monkeypox', 'mpox', 'monkeypoxvirus'):
            return i
    return None
