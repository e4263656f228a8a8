#!/usr/bin/env python3
"""Photos that are not skin, for measuring the out-of-distribution warning. Run:
python tools/ood_photos.py DEST [--seed 0]

Writes JPEGs into DEST made from what this machine has: the sample photos and data that ship with matplotlib
(a product photo, a logo, terrain and bathymetry maps, an MRI slice, stock charts), and synthetic pictures
(noise, flat colours, gradients, checkerboards, shapes, screenshots of text). None of them shows skin.
"""
import argparse
import gzip
import io
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib import cbook
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

TEXT = ('Out-of-distribution detection flags inputs unlike the training data. A photo classifier trained on '
        'skin lesions has never seen a spreadsheet, a street or a page of text.')


def figure_image(draw, size=(4, 3)):
    """A matplotlib figure rendered to an RGB image."""
    fig = Figure(figsize=size, dpi=100)
    draw(fig.add_subplot())
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png')
    return Image.open(buffer).convert('RGB')


def sample_pictures():
    """Pictures made from matplotlib's own sample data."""
    folder = Path(matplotlib.get_data_path()) / 'sample_data'
    yield 'product', Image.open(folder / 'Minduka_Present_Blue_Pack.png').convert('RGB')
    yield 'logo', Image.open(folder / 'logo2.png').convert('RGB')
    dem = cbook.get_sample_data('jacksboro_fault_dem.npz')['elevation']
    topo = cbook.get_sample_data('topobathy.npz')['topo']
    with gzip.open(folder / 's1045.ima.gz') as f:
        mri = np.frombuffer(f.read(), np.uint16).reshape(256, 256)
    for name, array in (('terrain', dem), ('bathymetry', topo), ('mri', mri)):
        for cmap in ('viridis', 'gist_earth', 'gray'):
            yield f'{name}-{cmap}', figure_image(lambda ax, a=array, c=cmap: (ax.imshow(a, cmap=c), ax.axis('off')))
    prices = cbook.get_sample_data('goog.npz')['price_data']
    for kind in ('line', 'bars'):
        def chart(ax, kind=kind):
            close = prices['adj_close'][-120:]
            (ax.plot if kind == 'line' else ax.bar)(np.arange(len(close)), close)
            ax.set_title('GOOG adjusted close')
        yield f'chart-{kind}', figure_image(chart)


def synthetic_pictures(rng):
    """Noise, flat colours, gradients, checkerboards, shapes and text, 24 of each kind but text (12)."""
    for i in range(6):
        yield f'noise-{i}', Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))
        yield f'flat-{i}', Image.new('RGB', (400, 300), tuple(int(v) for v in rng.integers(0, 256, 3)))
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = np.linspace(0, 1, 400)[None, :, None]
        yield f'gradient-{i}', Image.fromarray((a * (1 - t) + b * t).repeat(300, 0).astype(np.uint8))
        cell = int(rng.integers(10, 60))
        board = ((np.arange(300)[:, None] // cell + np.arange(400)[None] // cell) % 2).astype(np.uint8) * 255
        yield f'checkerboard-{i}', Image.fromarray(board).convert('RGB')
        img = Image.new('RGB', (400, 300), tuple(int(v) for v in rng.integers(0, 256, 3)))
        d = ImageDraw.Draw(img)
        for _ in range(8):
            x, y = (int(v) for v in rng.integers(0, 400, 2))
            r = int(rng.integers(10, 80))
            box = [x - r, y - r, x + r, y + r]
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=fill)
        yield f'shapes-{i}', img
    for i in range(12):
        img = Image.new('RGB', (400, 300), 'white' if i % 2 == 0 else (30, 30, 30))
        d = ImageDraw.Draw(img)
        words = TEXT.split()
        line, y = '', 10
        for w in words[i:] + words[:i]:
            if len(line) + len(w) > 48:
                d.text((10, y), line, fill='black' if i % 2 == 0 else 'white')
                line, y = '', y + 16
            line += w + ' '
        d.text((10, y), line, fill='black' if i % 2 == 0 else 'white')
        yield f'text-{i}', img


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('dest')
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args(argv)
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    count = 0
    for name, img in [*sample_pictures(), *synthetic_pictures(np.random.default_rng(args.seed))]:
        img.convert('RGB').save(dest / f'{name}.jpg', quality=90)
        count += 1
    print(f'{dest}: {count} pictures that are not skin (JPEG)')


if __name__ == '__main__':
    main()
