"""Files written whole or not at all, content hashes, and loading torch files without running their code."""

import contextlib
import csv
import functools
import hashlib
import io
import json
import os
import pickle
import tempfile
from pathlib import Path

import torch

from .system import UserError, first_line


def load_memo(cache):
    """sha256 of photos and weights files from an earlier run, by path, size and mtime (see sha256_file)."""
    if not cache:
        return {}
    try:
        with open(os.path.join(cache, 'hashes.json')) as f:
            return json.load(f)
    except (OSError, ValueError, TypeError):
        return {}


def save_memo(cache, memo):
    if cache:
        with contextlib.suppress(UserError):
            atomic_write(os.path.join(cache, 'hashes.json'), lambda f: f.write(json.dumps(memo).encode()))


def safe_torch_load(path, what='checkpoint'):
    """torch.load that never executes code from the file, with one-line errors for what goes wrong."""
    if not os.path.exists(path):
        raise UserError(f'{what} {path} does not exist' + (
            '; train one with `python monkeypox.py train` or pass --checkpoint FILE' if what == 'checkpoint' else ''))
    if os.path.isdir(path):
        raise UserError(f'{what} {path} is a folder; pass the file inside it')
    if os.path.getsize(path) == 0:
        raise UserError(f'{what} {path} is empty (0 bytes); copy it again or retrain')
    try:
        try:
            return torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        except RuntimeError as e:
            if 'mmap' not in str(e) and 'zip' not in str(e):
                raise
            return torch.load(path, map_location='cpu', weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        raise UserError(f'{what} {path} holds Python objects beyond tensors and plain data, and is refused '
                        'unloaded (loading it could run code). Use a file written by this tool or by '
                        'torch.save(model.state_dict())') from e
    except Exception as e:
        first = first_line(e)
        raise UserError(f'{what} {path} is truncated or corrupt ({first}); copy it again or retrain') from e


def sha256_file(path, memo=None):
    """sha256 of a file's bytes; `memo` (dict) skips re-reading files whose size and mtime are unchanged."""
    st = os.stat(path)
    stamp, key = [st.st_size, st.st_mtime_ns], os.path.abspath(path)
    if memo is not None and memo.get(key, [None])[:2] == stamp:
        return memo[key][2]
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    if memo is not None:
        memo[key] = stamp + [h.hexdigest()]
    return h.hexdigest()


@functools.cache
def umask():
    """The process's umask: from /proc where Linux shows it, else by setting it and putting it back at once."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open('/proc/self/status') as f:
            return int(next(line for line in f if line.startswith('Umask:')).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path, write):
    """Call write(file) on a temporary file beside `path`, then rename it over `path`: readers see
    the old file or the new one, never half of one, and a failed or interrupted write leaves no trace."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    except OSError as e:
        raise UserError(f'cannot write {path}: {e.strerror or e}; choose a writable folder (--out)') from e
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; give the file what open() would have
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f'cannot write {path}: {e.strerror or e}; the previous file, if any, is unchanged. '
                        'Free some disk space or choose another folder (--out)') from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_csv(path, header, rows):
    """A CSV file of the `header` row and the `rows`, written whole or not at all (atomic_write)."""
    text = io.StringIO()
    csv.writer(text).writerows([header, *rows])
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def torch_save(obj, path):
    """torch.save through atomic_write. Serialised in memory first: torch's zip writer reports a full
    disk as an obscure RuntimeError, a plain file write reports it as the OSError it is."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))
