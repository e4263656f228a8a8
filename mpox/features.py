"""Features: each photo through the frozen backbone once per view, cached on disk."""

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import torch
import torchvision

from .devices import resolve_device
from .files import atomic_write, torch_save
from .images import EVAL_VIEW, backbone_input, eval_transform, photo_loader, preprocessing, train_transform
from .inference import run_batches
from .int8 import calibration_photos
from .model import pretrained_model
from .precision import inference_model, resolve_precision
from .system import UserError, environment, first_line, gather, rank, say, warn, world


FLUSH_SECONDS = 30  # a long extraction writes what it has computed at least this often


@dataclasses.dataclass
class Features:
    photos: list         # Photos, in row order
    x: torch.Tensor      # [photos, views, dim] backbone features
    y: torch.Tensor      # [photos] class indices

    def subset(self, idx):
        return Features([self.photos[i] for i in idx], self.x[idx], self.y[idx])


class Extractor:
    """Runs photos through the frozen backbone, once per (photo, view), reading and filling the cache.
    The model is built only when something is missing from the cache: a warm run never builds it."""

    def __init__(self, cfg, classes, spec, precision=None, calibration=(), model=None):
        self.cfg, self.classes, self.spec = cfg, classes, spec
        self.device = resolve_device(cfg.device)
        self.precision = precision or resolve_precision(cfg.precision, self.device, None if cfg.unfreeze else cfg.arch)
        self.dtype = torch.bfloat16 if self.precision == 'bf16' else torch.float32  # of the stored features
        self.pre = preprocessing(cfg)
        self.about = {'arch': cfg.arch, 'weights': spec.name, 'weights_id': spec.ident,
                      'precision': self.precision, 'device': self.device.type, 'torch': str(torch.__version__),
                      'torchvision': torchvision.__version__, 'eval_transform': repr(eval_transform(self.pre)),
                      'train_transform': repr(train_transform(self.pre, cfg.crop_scale)),
                      'inference': 'uint8 crops, normalisation folded; bf16 autocast, fp32 with batchnorm folded'}
        # int8 features depend on the photos that calibrated them: their hashes are part of the key
        self.calibration = []
        if self.precision == 'int8':
            self.calibration = calibration_photos(calibration, cfg.calibration_photos)
            if not self.calibration:
                raise UserError('--precision int8 needs training photos to calibrate on, and there are none')
            self.about['int8'] = {'engine': 'x86', 'calibration': [p.sha for p in self.calibration]}
        key = hashlib.sha256(json.dumps(self.about, sort_keys=True).encode()).hexdigest()[:16]
        self.cache, self._model, self._backbone = FeatureCache(cfg.cache or None, key, self.about), model, None
        self.qparams = self.cache.read_json('int8.json') if self.precision == 'int8' else None
        self.backbone_calls = 0  # batches that went through the backbone (the tests count them)
        self.crops, self.seconds, self.backbone_seconds = 0, 0.0, 0.0  # crops computed, wall time, time in the backbone
        self.setup_seconds = 0.0  # building the model and its inference form, once

    def model(self):
        """The pretrained model with a new head, frozen; built on first use."""
        if self._model is None:
            self._model = pretrained_model(self.cfg, self.spec, len(self.classes))
        return self._model

    def built_model(self):
        """The pretrained model if it was built (or given), else None: another extractor may share it."""
        return self._model

    def inference_backbone(self):
        """The backbone as extraction runs it, built once, whatever the number of passes (training views, then
        validation). In int8 it is calibrated here, unless the cache holds the calibration of these photos."""
        if self._backbone is None:
            self._backbone, _ = inference_model(self.model(), self.device, self.precision, self.pre, self.qparams,
                                                self.calibrate)
            if self.precision == 'int8' and self.qparams is None:
                self.qparams = self._backbone.qparams
                self.cache.write_json('int8.json', self.qparams)
        return self._backbone

    def calibrate(self, backbone):
        """int8: the calibration photos' evaluation crops through the observed backbone, every one on every rank."""
        t0 = time.perf_counter()
        views = [[EVAL_VIEW]] * len(self.calibration)
        for batch in photo_loader(self.calibration, views, self.pre, self.cfg, self.device,
                                  batch_size=max(1, self.cfg.extract_batch_size), workers=False):
            crops = [x for _, x, err in batch if err is None]
            if crops:
                backbone(backbone_input(torch.cat(crops), self.device))
        say(f'int8: activation ranges calibrated on the crops of {len(self.calibration)} photos '
            f'({time.perf_counter() - t0:.1f}s)')

    def int8_calibration(self):
        """What a checkpoint carries so that predict and evaluate compute training's int8 features."""
        if self.precision != 'int8':
            return None
        if self.qparams is None:  # every feature came from a cache whose calibration file was removed
            self.inference_backbone()
        return {'engine': 'x86', 'qparams': self.qparams, 'photos': [p.path for p in self.calibration]}

    def features(self, photos, views):
        """Features of the given views of each readable photo, and [path, reason] for each photo that could
        not be read (left out)."""
        keys = [[f'{p.sha}:{v}' for v in views] for p in photos]
        missing = {i: [v for v, k in zip(views, ks) if k not in self.cache.rows] for i, ks in enumerate(keys)}
        missing = {i: vs for i, vs in missing.items() if vs}
        if world() > 1:  # caches can differ between machines: compute whatever any rank lacks, and take any
            parts = gather((missing, self.qparams))  # rank's int8 ranges, so that all ranks calibrate or none does
            self.qparams = next((q for _, q in parts if q is not None), None)
            union = {}
            for part, _ in parts:
                for i, vs in part.items():
                    union.setdefault(i, set()).update(vs)
            missing = {i: [v for v in views if v in union[i]] for i in union}
        todo = sorted(missing)
        failures = self._extract([photos[i] for i in todo], [missing[i] for i in todo]) if todo else []
        bad = {path for path, _ in failures}
        keep = [i for i, p in enumerate(photos) if p.path not in bad]
        rows = [torch.stack([self.cache.rows[k] for k in keys[i]]) for i in keep]
        x = torch.stack(rows) if rows else torch.zeros(0, len(views), 0, dtype=self.dtype)
        return Features([photos[i] for i in keep], x, torch.tensor([photos[i].label for i in keep])), failures

    def _extract(self, photos, views):
        """Run this rank's share of the photos through the backbone, write its own cache packs (as it goes,
        and what it has on Ctrl-C), and share the results with the other ranks."""
        failures, pending, own, last_flush = [], ([], []), ([], []), time.time()
        most, backbone = max(map(len, views)), None

        def fn(x):  # timed apart from decoding, so that the time around the backbone can be told (benchmark)
            start = time.perf_counter()
            out = backbone(x).to(self.dtype).cpu()
            self.backbone_seconds += time.perf_counter() - start
            return out
        start = t0 = time.perf_counter()
        try:
            self.inference_backbone()  # int8 calibrates here: a Ctrl-C then stops the extraction as any other
            t0 = time.perf_counter()
            self.setup_seconds += t0 - start
            backbone = compiled(self._backbone, sum(map(len, views)),
                                max(1, self.cfg.extract_batch_size // most) * most, self)
            for done, f, bad in run_batches(fn, photos, views, self.cfg, self.device, self.pre,
                                            f'extract {self.cfg.arch} features'):
                failures += [[photos[i].path, reason] for i, reason in bad]
                if f is None:
                    continue
                keys = [f'{photos[i].sha}:{v}' for i in done for v in views[i]]
                self.backbone_calls += 1
                self.crops += len(f)
                for keep in (pending, own):
                    keep[0].extend(keys)
                    keep[1].append(f)
                if time.time() - last_flush > FLUSH_SECONDS:  # long extractions save as they go
                    self.cache.put(pending[0], torch.cat(pending[1]))
                    pending, last_flush = ([], []), time.time()
        except KeyboardInterrupt:
            say(f'interrupted during feature extraction: {len(own[0])} features kept' +
                (f' in the cache {self.cache.dir}; run the same command again to continue' if self.cache.dir
                 else ' in memory only (--no-cache): nothing saved') + '; no checkpoint was written by this run')
            raise
        finally:
            if pending[0]:  # also on Ctrl-C: what was computed is kept, as complete packs (each rank its own)
                self.cache.put(pending[0], torch.cat(pending[1]))
            if world() == 1:
                self.cache.compact()
            self.seconds += time.perf_counter() - t0
        if world() > 1:  # every rank gets every feature; each wrote only its own packs
            failures = []
            for r, (keys, feats, fails) in enumerate(gather((own[0], torch.cat(own[1]) if own[1] else None,
                                                             failures))):
                failures += fails
                if r != rank() and feats is not None:
                    self.cache.rows.update(zip(keys, feats))
        return failures


COMPILE_MIN_CROPS = {'cold': 4000, 'warm': 600}  # crops from which torch.compile repays itself (docs/speed.md)


def compiled(backbone, crops, batch, extractor):
    """The backbone through torch.compile when --compile says so: 'auto' compiles on CPUs for extractions long
    enough to repay the compile (COMPILE_MIN_CROPS, with a cold or a warm compile cache); not on GPUs, where
    extraction waits on decoding. PyTorch's compile caches go beside the features (unless
    TORCHINDUCTOR_CACHE_DIR names a place), set for the compiled calls only. The batch is fixed (the last one
    padded) so that one graph serves; any failure falls back to eager."""
    cfg, device = extractor.cfg, extractor.device
    key = hashlib.sha256(json.dumps([cfg.arch, extractor.precision, device.type, batch, str(torch.__version__),
                                     backbone.folded]).encode()).hexdigest()[:16]
    # a marker beside the compile caches says whether this graph was compiled there before (the warm threshold)
    folder = os.environ.get('TORCHINDUCTOR_CACHE_DIR') or (os.path.join(cfg.cache, 'compile') if cfg.cache else '')
    folder = Path(folder).resolve() if folder else None
    warm = bool(folder and (folder / f'compiled-{key}').exists())
    pays = compile_pays(crops, warm, device, extractor.precision)
    if not (cfg.compile == 'always' or cfg.compile == 'auto' and pays):
        return backbone
    say(f'compiling the backbone for {crops} crops (torch.compile, {"warm" if warm else "cold"} compile cache)')
    fast = torch.compile(backbone, dynamic=False)
    marker = folder / f'compiled-{key}' if folder and not warm else None  # written once the graph has run

    def fn(x):
        nonlocal fast, marker
        if fast is not None:
            try:
                pad = x.new_zeros((batch - len(x),) + x.shape[1:]) if len(x) < batch else None
                with environment(TORCHINDUCTOR_CACHE_DIR=str(folder) if folder else None):
                    out = fast(x if pad is None else torch.cat([x, pad]).contiguous(memory_format=torch.channels_last))
                if marker:
                    marker.parent.mkdir(parents=True, exist_ok=True)
                    marker.touch()
                    marker = None
                return out[:len(x)]
            except Exception as e:  # no compiler on this machine, an unsupported operator: eager is still right
                warn(f'torch.compile failed ({first_line(e)[:150]}); extracting without it')
                fast = None
        return backbone(x)
    return fn


def compile_pays(crops, warm, device, precision):
    """Whether compiling the backbone saves time overall. Not an int8 backbone: its quantized kernels are
    already the fast path (inductor does not take them over)."""
    return device.type == 'cpu' and precision != 'int8' and crops >= COMPILE_MIN_CROPS['warm' if warm else 'cold']


MOST_PACKS = 8  # cache packs kept apart before they are merged into one, so a warm start reads few files


class FeatureCache:
    """Backbone features keyed by '<photo sha256>:<view>', for one model key (arch, weights, transforms,
    precision, device type and torch version hashed together). Stored in packs, each written whole
    (temporary file, then rename) with a digest of its contents: an interrupted write never appears,
    and a damaged pack is detected, reported, deleted and recomputed, never trusted."""

    def __init__(self, root, key, about):
        self.dir, self.rows, self.about = Path(root) / key if root else None, {}, about
        if self.dir and self.dir.is_dir():
            for pack in sorted(self.dir.glob('pack-*.pt')):
                self._read(pack)

    def _read(self, pack):
        try:
            data = torch.load(pack, map_location='cpu', weights_only=True)
            keys, feats = data['keys'], data['features']
            if data['digest'] != self.digest(keys, feats):
                raise ValueError('digest mismatch')
        except Exception as e:
            warn(f'feature cache {pack} is damaged ({first_line(e)});'
                 ' deleted, its features will be recomputed')
            with contextlib.suppress(OSError):
                pack.unlink()
            return
        for k, row in zip(keys, feats):
            self.rows[k] = row

    @staticmethod
    def digest(keys, feats):
        h = hashlib.sha256('\n'.join(keys).encode())
        h.update(str((tuple(feats.shape), str(feats.dtype))).encode())
        h.update(feats.contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def put(self, keys, feats):
        """Keep the rows, and write them as one new pack (its path is returned; None in memory only)."""
        feats = feats.contiguous()
        for k, row in zip(keys, feats):
            self.rows[k] = row
        if self.dir is None or not keys:
            return
        if not (self.dir / 'about.json').exists():
            atomic_write(self.dir / 'about.json', lambda f: f.write(json.dumps(self.about, indent=1).encode()))
        path = self.dir / f'pack-{time.strftime("%Y%m%d-%H%M%S")}-{os.getpid()}-{os.urandom(4).hex()}.pt'
        torch_save({'keys': list(keys), 'features': feats, 'digest': self.digest(keys, feats)}, path)
        return path

    def read_json(self, name):
        """A small file beside the packs (int8.json: the calibration the features were computed with), or None."""
        try:
            return json.loads((self.dir / name).read_text()) if self.dir else None
        except (OSError, ValueError):
            return None

    def write_json(self, name, obj):
        if self.dir:
            atomic_write(self.dir / name, lambda f: f.write(json.dumps(obj).encode()))

    def compact(self, most=MOST_PACKS):
        """Merge the packs into one once there are more than `most`, so a warm start reads few files."""
        if self.dir is None:
            return
        packs = sorted(self.dir.glob('pack-*.pt'))
        if len(packs) <= most:
            return
        keys = sorted(self.rows)
        merged = self.put(keys, torch.stack([self.rows[k] for k in keys]))
        for p in packs:
            if p != merged:
                with contextlib.suppress(OSError):
                    p.unlink()
