"""Images as a person sees them, and the crops the backbone sees: decoding, the transforms, the views of a
photo and the loader that cuts them."""

import hashlib
import os
import re
import warnings

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, ImageOps, UnidentifiedImageError

from .system import first_line, warn


EVAL_VIEW = 'eval'


IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.jpe', '.jfif', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp',
                    '.ppm', '.pgm', '.heic', '.heif', '.avif')  # .heic and friends are reported, not silently ignored


def is_hidden(name):
    return name.startswith('.') or name in ('Thumbs.db', 'desktop.ini', '__MACOSX')


def is_image_file(path):
    name = os.path.basename(path)
    return not is_hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS)


def load_rgb(path, draft=None):
    """Open an image file as a person would see it: EXIF rotation applied, any mode made 8-bit RGB.
    `draft` (pixels) lets JPEG decode at a reduced scale no smaller than that, which is much faster
    for phone photos. Raises on anything unreadable; callers turn that into a per-file message."""
    with warnings.catch_warnings():
        warnings.simplefilter('error', Image.DecompressionBombWarning)  # refuse images past Pillow's limit
        with Image.open(path) as im:
            if draft and im.format == 'JPEG':
                im.draft('RGB', (draft, draft))
            im = ImageOps.exif_transpose(im)
            im.load()
            return to_rgb(im)


def to_rgb(im):
    """Any Pillow mode to RGB: 16-bit grey is scaled (not clipped to white), transparency goes on white."""
    if im.mode in ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I', 'F'):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith('I;16') or a.max(initial=0) > 255 else 255.0
        if im.mode == 'F' and a.max(initial=0) <= 1.0:
            top = 1.0
        im = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), 'L')
    if im.mode == 'P' and 'transparency' in im.info:
        im = im.convert('RGBA')
    if im.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La'):
        rgba = im.convert('RGBA')
        white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert('RGB')
    return im.convert('RGB')


def describe_image_error(path, e):
    """One line naming the file, what is wrong and the fix."""
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        size = re.search(r'\((\d+) pixels\)', str(e))
        size = f'{int(size.group(1)):,} pixels' if size else 'too many pixels'
        return (f'{path}: image too large ({size}, above Pillow\'s decompression-bomb limit of '
                f'{Image.MAX_IMAGE_PIXELS:,}); downscale it')
    if isinstance(e, UnidentifiedImageError) or (isinstance(e, OSError) and 'cannot identify' in str(e)):
        ext = os.path.splitext(path)[1].lower()
        if os.path.getsize(path) == 0:
            return f'{path}: empty file (0 bytes); copy the photo again'
        if ext in ('.heic', '.heif', '.avif'):
            return f'{path}: {ext[1:].upper()} is not readable here; convert it to JPEG or PNG'
        return f'{path}: not an image Pillow can read; remove it or convert it to JPEG or PNG'
    if isinstance(e, FileNotFoundError):
        return f'{path}: file disappeared while reading'
    reason = first_line(e)
    return f'{path}: unreadable image ({reason}); the file is damaged or truncated, copy it again'


def report_skipped(failures, listed_in='', most=10):
    """One warning per unreadable file, naming it; past `most`, a count."""
    for _, reason in failures[:most]:
        warn(f'skipped {reason}')
    if len(failures) > most:
        warn(f'skipped {len(failures) - most} more unreadable files')
    if failures and listed_in:
        warn(f'{len(failures)} unreadable file(s) skipped in all; they are listed in {listed_in}')


def preprocessing(cfg, ckpt=None):
    """Image size, resize, mean and std: a checkpoint's own (predict and evaluate), else the settings'."""
    p = (ckpt or {}).get('preprocess') or {}
    return {'image_size': p.get('image_size', cfg.image_size), 'resize': p.get('resize', cfg.resize),
            'mean': list(p.get('mean', cfg.mean)), 'std': list(p.get('std', cfg.std))}


def eval_transform(pre):
    return T.Compose([T.Resize(pre['resize']), T.CenterCrop(pre['image_size']), T.PILToTensor()])


def train_transform(pre, crop_scale):
    return T.Compose([T.RandomResizedCrop(pre['image_size'], scale=(crop_scale, 1.0)), T.RandomHorizontalFlip(),
                      T.PILToTensor()])


def normalize(x, pre):
    """uint8 crops (as the transforms leave them: 4x less to copy and collate than floats) to the normalised
    floats a backbone expects. The inference backbone folds this into its first convolution instead."""
    mean, std = (torch.tensor(pre[k], device=x.device).view(1, -1, 1, 1) for k in ('mean', 'std'))
    return (x.float() / 255 - mean) / std


def view_seed(sha, view):
    """Seed of one random view of one photo: fixed by the photo's bytes and the view's name, so a view is
    the same crop in every run, process and rank, and cached features stay valid across --seed."""
    return int(hashlib.sha256(f'{sha}:{view}'.encode()).hexdigest()[:15], 16)


class ViewDataset(torch.utils.data.Dataset):
    """Item i: photo i decoded once and cut into the views asked for ('eval', or a named random view), as
    uint8 tensors. Unreadable photos come back as an error line instead of raising, so one bad file skips
    one photo."""

    def __init__(self, photos, views, pre, crop_scale):
        self.photos, self.views, self.resize = photos, views, pre['resize']
        self.eval_tf, self.train_tf = eval_transform(pre), train_transform(pre, crop_scale)

    def __len__(self):
        return len(self.photos)

    def __getitem__(self, i):
        photo, views = self.photos[i], self.views[i]
        try:
            img = load_rgb(photo.path, draft=self.resize if views == [EVAL_VIEW] else 2 * self.resize)
        except Exception as e:  # any decoder failure on untrusted bytes means: skip this photo, say why
            return i, None, describe_image_error(photo.path, e)
        crops = []
        for view in views:
            if view == EVAL_VIEW:
                crops.append(self.eval_tf(img))
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(view_seed(photo.sha, view))
                    crops.append(self.train_tf(img))
        return i, torch.stack(crops), None


def photo_loader(photos, views, pre, cfg, device, workers=True, **batching):
    """The photos decoded and cut into their views, in decode_workers processes (none for a single batch)."""
    return torch.utils.data.DataLoader(ViewDataset(photos, views, pre, cfg.crop_scale), collate_fn=list, **batching,
                                       num_workers=decode_workers(cfg.workers, device) if workers else 0,
                                       pin_memory=device.type == 'cuda')


def backbone_input(x, device):
    return x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


MOST_DECODE_WORKERS = 4  # decoding processes 'auto' starts at most (docs/speed.md)
CORES_PER_CPU_WORKER = 8  # on a CPU, one decoding process per this many cores: the backbone needs the rest


def decode_workers(workers, device):
    """Decoding processes (--workers; -1: auto). With a GPU, one per spare core keeps it fed. On a CPU the
    backbone's threads already use every core and extra processes compete with them, so few or none."""
    if workers >= 0:
        return workers
    cores = os.cpu_count() or 1
    if device.type == 'cuda':
        return max(0, min(MOST_DECODE_WORKERS, cores - 1))
    return min(MOST_DECODE_WORKERS, cores // CORES_PER_CPU_WORKER)
