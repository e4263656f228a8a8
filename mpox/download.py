"""The public MSLD photos: fetched, checked, extracted and laid out by patient."""

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from tqdm import tqdm

from .data import DATASET_URL, grouped_split, read_photos
from .files import write_csv
from .images import is_image_file
from .patients import assign_patients, check_grouping, join_near_duplicates
from .system import UserError, first_line


ARCHIVE_BYTES, ARCHIVE_MD5 = 1_476_879, '09bd765cb91e6658ff27f83fa869c65c'


DATASET_CITATION = ('Ali, S. N., Ahmed, M. T., Paul, J., Jahan, T., Sani, S. M. S., Noor, N., Hasan, T. (2022). '
                    'Monkeypox Skin Lesion Detection Using Deep Learning Models: A Feasibility Study. '
                    'arXiv:2207.03342')


def fetch(url, path, fix):
    """Download url (http, https, file, or a local path) to path, with a progress bar and a timeout."""
    import urllib.error
    import urllib.request
    if os.path.exists(url):
        url = Path(url).resolve().as_uri()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(path, 'wb') as f:
            total = int(response.headers.get('Content-Length') or 0) or None
            with tqdm(total=total, unit='B', unit_scale=True, desc='download', disable=None, leave=False) as bar:
                for chunk in iter(lambda: response.read(1 << 16), b''):
                    f.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, 'reason', None) or first_line(e)
        raise UserError(f'cannot download {url}: {reason}. Check the network, or {fix}') from e


def safe_member(name):
    """An archive member's path as parts, refusing any that would land outside the destination."""
    name = name.replace('\\', '/')
    parts = [p for p in name.split('/') if p not in ('', '.')]
    if name.startswith('/') or re.match(r'^[A-Za-z]:', name) or '..' in parts:
        raise UserError(f'archive member {name!r} would be written outside the destination; refusing the archive')
    return parts


def extract_rar(archive, out):
    """Images of a RAR archive as out/<class folder>/<file>, every member name checked first."""
    try:
        from unrar.cffi import rarfile
    except ImportError as e:
        raise UserError('`download` reads RAR archives with unrar2-cffi: pip install -r requirements.txt') from e
    try:
        rar = rarfile.RarFile(str(archive))
        members = [(info, safe_member(info.filename)) for info in rar.infolist()]
        for info, parts in members:
            if info.is_dir() or not is_image_file(parts[-1]) or len(parts) < 2:
                continue
            target = Path(out, parts[-2], parts[-1])
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(rar.read(info))
    except UserError:
        raise
    except Exception as e:
        raise UserError(f'{archive}: cannot read the RAR archive ({first_line(e)})') from e


def layout_dataset(src, out, cfg, cache=''):
    """train/ val/ test/ by patient and class (test: TEST_FRACTION, val: VAL_FRACTION of all photos), near-duplicate
    copies kept together (their signatures kept in the feature cache folder `cache`, for the training that
    follows), a copy of one test photo as test/test.jpg (TEST_IMAGE), SPLIT.csv and the dataset's license and
    citation."""
    classes, photos = read_photos(str(src))
    assign_patients(photos, str(src), cfg.patients)
    check_grouping(photos, classes, cfg.patients, 3, 'the train/ val/ test/ split')
    out.mkdir(parents=True, exist_ok=True)
    if join_near_duplicates(photos, str(src), cfg.near_duplicates, cache, str(out / 'near_duplicates.csv'))[0]:
        check_grouping(photos, classes, cfg.patients, 3, 'the train/ val/ test/ split', copies_only=True)
    rest, test = grouped_split(photos, cfg.test_fraction, cfg.seed)
    train, val = grouped_split(rest, cfg.val_fraction / (1 - cfg.test_fraction), cfg.seed)
    rows = []
    for name, part in (('train', train), ('val', val), ('test', test)):
        for p in part:
            rel = Path(name, classes[p.label], os.path.basename(p.path))
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p.path, out / rel)
            rows.append({'path': rel.as_posix(), 'class': classes[p.label], 'split': name,
                         'patient': p.patient, 'sha256': p.sha})
    shutil.copyfile(test[0].path, out / 'test' / 'test.jpg')
    write_csv(out / 'SPLIT.csv', list(rows[0]), [list(r.values()) for r in rows])
    (out / 'LICENSE.txt').write_text(
        'Monkeypox Skin Lesion Dataset (MSLD), original images.\n'
        f'Source: {DATASET_URL}\nLicense: CC BY-NC 4.0 (non-commercial use, with attribution).\n'
        f'Cite: {DATASET_CITATION}\n'
        'The photos were collected by the authors from news portals, websites and case reports.\n'
        f'test/test.jpg is a copy of test/{classes[test[0].label]}/{os.path.basename(test[0].path)}.\n')


def download_dataset(dest, url, cfg, force, fix, cache=''):
    """Fetch the authors' archive from `url`, verify it, and lay it out in `dest` (layout_dataset, with cfg's
    fractions and seed). Everything happens in a temporary folder beside `dest`, renamed into place at the
    end: an interrupted or failed download leaves `dest` as it was. `fix`: what to do when offline; `cache`:
    the feature cache folder that keeps the photos' near-duplicate signatures ('': none)."""
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not force:
        raise UserError(f'{dest} exists and is not empty; pass --force to replace it, or choose --dest')
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f'.{dest.name}-download-', dir=dest.parent))
    try:
        archive = work / 'archive.rar'
        fetch(url, archive, fix)
        size, md5 = archive.stat().st_size, hashlib.md5(archive.read_bytes()).hexdigest()
        if (size, md5) != (ARCHIVE_BYTES, ARCHIVE_MD5):
            raise UserError(f'{url}: got {size:,} bytes with md5 {md5}, expected {ARCHIVE_BYTES:,} bytes with '
                            f'md5 {ARCHIVE_MD5}; the download is damaged or not the MSLD archive. Nothing was written '
                            f'to {dest}')
        extract_rar(archive, work / 'all')
        layout_dataset(work / 'all', work / 'out', cfg, cache)
        if dest.exists():
            os.replace(dest, work / 'replaced')
        os.replace(work / 'out', dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest
