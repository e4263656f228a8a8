#!/usr/bin/env python3
"""Copies of photos as public datasets make them, for measuring the near-duplicate search. Run:
python tools/copies.py SRC DEST [--copies 2] [--seed 0]
python tools/copies.py SRC DEST --check OUT    # after `monkeypox.py cv --data DEST --out OUT`

DEST gets SRC's class folders with each photo (same name) and COPIES strong copies of it under random
names: any of the eight orientations (quarter turns, mirror images), a crop keeping 50-95% of the area at a
random position and aspect, downscaling to 60-100%, brightness, contrast and saturation changes, a mild
blur on half of them, and JPEG (quality 60-95) or PNG encoding. copies.csv lists each copy and its original.
docs/data.md gives the command that measures cv on them.
"""
import argparse
import csv
import io
import random
from pathlib import Path

from PIL import Image, ImageEnhance, ImageFilter


def strong_copy(img, rng):
    """A copy of `img` (RGB) and the file suffix its encoding needs."""
    k = rng.randrange(8)
    if k & 4:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = img.rotate(90 * (k & 3), expand=True)
    w, h = img.size
    area, aspect = rng.uniform(0.5, 0.95) * w * h, rng.uniform(0.75, 1.33)
    cw = min(w, round((area * aspect) ** 0.5))
    ch = min(h, round(area / cw))
    x, y = rng.randrange(w - cw + 1), rng.randrange(h - ch + 1)
    img = img.crop((x, y, x + cw, y + ch))
    scale = rng.uniform(0.6, 1.0)
    img = img.resize((max(16, round(cw * scale)), max(16, round(ch * scale))), Image.Resampling.BICUBIC)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast):
        img = enhance(img).enhance(rng.uniform(0.7, 1.3))
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.6, 1.4))
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    buffer = io.BytesIO()
    jpeg = rng.random() < 0.7
    img.save(buffer, 'JPEG' if jpeg else 'PNG', **({'quality': rng.randrange(60, 96)} if jpeg else {}))
    return buffer.getvalue(), '.jpg' if jpeg else '.png'


def write_copies(photos, dest, copies, seed):
    """Each of `photos` (paths, in class folders) into dest/CLASS/ with `copies` copies under random names;
    returns [(copy, original)] as paths relative to dest."""
    rng, made = random.Random(seed), []
    for path in photos:
        path = Path(path)
        folder = Path(dest, path.parent.name)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / path.name).write_bytes(path.read_bytes())
        with Image.open(path) as im:
            original = im.convert('RGB')
        for _ in range(copies):
            data, suffix = strong_copy(original, rng)
            name = f'{rng.getrandbits(40):010x}{suffix}'
            (folder / name).write_bytes(data)
            made.append((f'{folder.name}/{name}', f'{folder.name}/{path.name}'))
    return made


def check(dest, out):
    """What `cv --data DEST --out OUT` did with the copies: the share of copies in their original's fold
    (OUT/folds.csv), and how many file-name patients of the originals stayed apart, not joined to another
    by the pairs in OUT/near_duplicates.csv (directly or through copies)."""
    with open(Path(dest, 'copies.csv'), newline='') as f:
        original_of = dict(list(csv.reader(f))[1:])
    with open(Path(out, 'folds.csv'), newline='') as f:
        rows = list(csv.DictReader(f))
    fold, patient = {r['path']: r['fold'] for r in rows}, {r['path']: r['patient'] for r in rows}
    kept = sum(fold[c] == fold[o] for c, o in original_of.items())
    print(f'copies in their original\'s fold: {kept} of {len(original_of)} ({kept / len(original_of):.1%})')
    parent = {}

    def find(k):
        while parent.setdefault(k, k) != k:
            k = parent[k]
        return k
    with open(Path(out, 'near_duplicates.csv'), newline='') as f:
        for r in csv.DictReader(f):
            parent[find(r['patient_a'])] = find(r['patient_b'])
    originals = {patient[p] for p in patient if p not in original_of}
    apart = sum(len({k for k in originals if find(k) == find(p)}) == 1 for p in originals)
    print(f'file-name patients of the originals kept apart: {apart} of {len(originals)}')


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('src', help='class folders of photos')
    ap.add_argument('dest', help='folder to create')
    ap.add_argument('--copies', type=int, default=2, help='copies of each photo')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--check', metavar='OUT', help='instead: what `cv --data DEST --out OUT` did with the copies')
    args = ap.parse_args()
    if args.check:
        return check(args.dest, args.check)
    photos = sorted(p for p in Path(args.src).glob('*/*') if p.is_file())
    made = write_copies(photos, args.dest, args.copies, args.seed)
    with open(Path(args.dest, 'copies.csv'), 'w', newline='') as f:
        csv.writer(f).writerows([('copy', 'original'), *made])
    print(f'{args.dest}: {len(photos)} photos and {len(made)} copies (copies.csv)')


if __name__ == '__main__':
    main()
