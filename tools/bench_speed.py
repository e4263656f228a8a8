#!/usr/bin/env python3
"""Speed benchmark (a tool, not a test). Run: python tools/bench_speed.py [--photos N]

Every run is its own process, timed from start to exit, as a user waits. Two benchmarks:

Without --photos, on the real MSLD photos (by default 64 of them, then all 228):
  1. a plain training loop, as such scripts are written: fp32, model in train() mode, the frozen backbone run
     again on every photo in every epoch, RandomResizedCrop + flip, Adam on the head, batch 32;
  2. this tool's `train` with its defaults, same arch, cold feature cache;
  3. the same `train` again, warm cache.
It prints the seconds, the ratios 1/2 and 1/3, validation accuracy of 1 and 2 on the same
patient-grouped split, extraction throughput with the time a crop spends outside the backbone
(decoding, cropping, collating, caching), peak memory, and a cold `predict` against
`python -c "import torch, torchvision"`.

With --photos N: N realistic synthetic photos (400-800 px JPEGs made here), `train` with a cold
feature cache twice: first with a cold compile cache, then with a warm one (a fresh feature cache
each time), and with N/4 photos for the memory. It prints crops/s, the share of a crop's time spent
decoding and preparing it against the backbone, the efficiency against the fp32 and bf16
matrix-multiply peaks measured in this run (best of several trials), and peak RSS at N/4 and N photos.

Both print the CPU's flags. --isa avx2 holds oneDNN, ATen and fbgemm to AVX2 (ONEDNN_MAX_CPU_ISA,
ATEN_CPU_CAPABILITY, FBGEMM_ENABLE_INSTRUCTIONS), which is how a CPU without bf16, VNNI or AMX runs. The tool
extracts a CNN's features in int8 on x86 CPUs (--precision auto); its GFLOP/s are those of the fp32 network
it stands for (7.8 GFLOP a ResNet101 crop), set against both matmul peaks.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'monkeypox.py'
SHARED = Path(os.environ.get('MONKEYPOX_SHARED') or REPO.parent / 'shared')


def run_rss(cmd, env):
    """Seconds, peak RSS (MB) and stdout of a command, through os.wait4's per-child resource usage."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status):
        sys.exit(f'failed: {" ".join(map(str, cmd))}\n{err[-3000:]}')
    return seconds, usage.ru_maxrss / 1024, out


def cpu_flags():
    try:
        flags = set(re.search(r'^flags\s*:(.*)$', Path('/proc/cpuinfo').read_text(), re.M).group(1).split())
    except (OSError, AttributeError):
        return 'unknown (no /proc/cpuinfo)'
    return ' '.join(f for f in ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16') if f in flags) or 'none of avx2/avx512/amx'


def matmul_peaks(trials=5):
    """Best-of-`trials` GFLOP/s of a 4096^2 fp32 and bf16 matrix product on this machine, now."""
    import torch
    peaks = {}
    for dtype in (torch.float32, torch.bfloat16):
        n = 1024
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        t = time.perf_counter()
        a @ b
        best = time.perf_counter() - t
        if best < 0.05:  # fast at this type: a size that measures its peak (without bf16 units, a bf16 product
            n = 4096     # is emulated and slow: the one product at 1024 is its measure)
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            a @ b
            best = min(timed(lambda: a @ b) for _ in range(trials))
        peaks[str(dtype).split('.')[-1]] = 2 * n ** 3 / best / 1e9
    return peaks


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def gflop_per_image(arch):
    import torch
    import torchvision
    from torch.utils.flop_counter import FlopCounterMode
    model = torchvision.models.get_model(arch).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 224, 224))
    return counter.get_total_flops() / 1e9


def extraction(out):
    """(crops/s, backbone ms a crop, all else ms a crop) from train's features line."""
    found = re.findall(r'([\d.]+) crops/s \(backbone ([\d.]+) ms a crop, all else ([\d.]+)[;)]', out)
    return tuple(map(float, found[-1])) if found else (float('nan'),) * 3  # the last: the arithmetic kept


def features_precision(out):
    """The arithmetic train kept (the last features line), and its fidelity checks, from its output."""
    return re.findall(r'in (\w+), \d+ crops computed', out)[-1], re.findall(r'^precision: .*$', out, re.M)


def subset(data, max_images, dest, seed=0):
    """A class-stratified subset of `data` as symlinks (whole patients are not needed for timing)."""
    import random
    classes = sorted(d.name for d in Path(data).iterdir() if d.is_dir() and not d.name.startswith('.'))
    files = {c: sorted(p for p in (Path(data) / c).iterdir() if p.is_file()) for c in classes}
    total = sum(map(len, files.values()))
    rng = random.Random(seed)
    for c in classes:
        take = max(2, round(max_images * len(files[c]) / total))
        (dest / c).mkdir(parents=True)
        for p in rng.sample(files[c], min(take, len(files[c]))):
            (dest / c / p.name).symlink_to(p.resolve())
    return dest


def synthetic_photos(n, dest, seed=0):
    """n photos like phone pictures of skin: 400-800 px JPEGs, blotchy skin, lesions of two kinds."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter
    rng = np.random.default_rng(seed)
    for i in range(n):
        cls = ('Monkey Pox', 'Others')[i % 2]
        (dest / cls).mkdir(parents=True, exist_ok=True)
        w, h = (int(v) for v in rng.integers(400, 801, 2))
        skin = np.array([200, 150, 120]) + rng.integers(-40, 40, 3)
        blotches = np.kron(rng.normal(0, 12, (h // 8 + 1, w // 8 + 1, 3)), np.ones((8, 8, 1)))[:h, :w]
        a = np.clip(skin + blotches + rng.normal(0, 5, (h, w, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(a).filter(ImageFilter.GaussianBlur(1.5))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(3, 12))):
            r = int(rng.integers(5, 30))
            x, y = int(rng.integers(r, w - r)), int(rng.integers(r, h - r))
            colour = (180, 60, 60) if cls == 'Monkey Pox' else (150, 90, 70)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c + rng.integers(-20, 20)) for c in colour))
        img.save(dest / cls / f'P{i // 3}_{i % 3}.jpg', quality=int(rng.integers(80, 95)))
    return dest


def plain_loop(args):
    """A plain transfer-learning loop as such scripts are written, its faults included (model in train()
    mode, so BatchNorm statistics drift; the backbone recomputed in fp32 every epoch)."""
    import torch
    import torch.nn.functional as F
    import torchvision
    import torchvision.transforms as T
    sys.path.insert(0, str(REPO))
    import monkeypox as mp
    import mpox.data
    import mpox.images
    import mpox.metrics
    import mpox.model
    torch.manual_seed(args.seed)
    classes, photos = mpox.data.read_photos(args.data)
    train, val = mpox.data.grouped_split(photos, mp.VAL_FRACTION, args.seed)
    norm = T.Normalize(mp.MEAN, mp.STD)
    train_tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    eval_tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), norm])

    class Photos(torch.utils.data.Dataset):
        def __init__(self, items, tf):
            self.items, self.tf = items, tf

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.tf(mpox.images.load_rgb(self.items[i].path)), self.items[i].label

    model = torchvision.models.get_model(args.arch, weights=None if args.weights == 'none' else args.weights)
    for p in model.parameters():
        p.requires_grad = False
    name = mpox.model.head_name(model)
    model.set_submodule(name, torch.nn.Linear(model.get_submodule(name).in_features, len(classes)))
    optimizer = torch.optim.Adam(model.get_submodule(name).parameters(), lr=args.lr)
    loader = torch.utils.data.DataLoader(Photos(train, train_tf), batch_size=args.batch_size, shuffle=True)
    model.train()  # the loop's fault: a "frozen" backbone whose BatchNorm statistics keep moving
    for epoch in range(args.epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        probs = model(torch.stack([eval_tf(mpox.images.load_rgb(p.path)) for p in val])).softmax(1).tolist()
    m = mpox.metrics.metrics([p.label for p in val], probs, classes, mpox.data.positive_index(classes, 'auto'), 0.5)
    print(json.dumps({'accuracy': m['accuracy'], 'balanced_accuracy': m['balanced_accuracy'], 'n': m['n']}))


def compare(data, args, env):
    """The plain loop against train, cold and warm, on `data`."""
    work = Path(tempfile.mkdtemp(prefix='monkeypox-bench-'))
    try:
        common = ['--arch', args.arch, '--weights', args.weights, '--seed', str(args.seed)]
        t1, rss1, out1 = run_rss([sys.executable, __file__, '--plain', '--data', data, '--lr', args.lr, '--epochs',
                                  args.epochs, '--batch-size', args.batch_size, *common], env)
        tool = [sys.executable, SCRIPT, 'train', '--data', data, '--out', work / 'chk', '--no-plot', *common,
                '--precision', args.precision]
        t2, rss2, out2 = run_rss(tool, env)
        t3, rss3, out3 = run_rss(tool, env)
        assert 'all from cache' in out3, out3
        import torch
        ckpt = torch.load(work / 'chk' / 'monkeypox_model.pkl', weights_only=True, map_location='cpu')
        photo = next(p for p in Path(data).rglob('*.jpg'))
        t_import, _, _ = run_rss([sys.executable, '-c', 'import torch, torchvision'], env)
        t_predict, _, _ = run_rss([sys.executable, SCRIPT, 'predict', photo, '--checkpoint', work / 'chk' /
                                   'monkeypox_model.pkl', '--no-plot'], env)
        return {'plain_s': t1, 'cold_s': t2, 'warm_s': t3, 'rss': (rss1, rss2, rss3),
                'plain_val': json.loads(out1.strip().splitlines()[-1]), 'tool_val': ckpt['metrics'],
                'extraction': extraction(out2), 'import_s': t_import, 'predict_s': t_predict,
                'precision': ckpt['precision'], 'images': len(ckpt['split']['train']) + len(ckpt['split']['val']),
                'checks': features_precision(out2)[1]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def large(args, env, peaks, gflop):
    """train on args.photos synthetic photos: extraction throughput, its split, efficiency, memory."""
    work = Path(tempfile.mkdtemp(prefix='monkeypox-bench-large-'))
    try:
        data = synthetic_photos(args.photos, work / 'photos')
        quarter = subset(data, args.photos // 4, work / 'quarter')
        env = {**env, 'TORCHINDUCTOR_CACHE_DIR': str(work / 'compile')}  # cold on the first run, warm after
        common = ['--arch', args.arch, '--weights', args.weights, '--no-plot', '--val-fraction', '0.2', '--precision',
                  args.precision]
        rows = []
        for label, photos in (('cold compile cache', data), ('warm compile cache', data), ('N/4 photos', quarter)):
            if label.startswith('warm') and not rows[0][-1]:
                continue  # nothing compiled: a second run would time the same thing again
            if label.startswith('N/4') and args.photos < 40:
                continue  # a handful of photos says nothing of how memory grows
            out = work / f'out{len(rows)}'
            seconds, rss, text = run_rss([sys.executable, SCRIPT, 'train', '--data', photos, '--out', out,
                                          '--cache', out / 'cache', *common], env)
            if not rows:  # the N/4 run in the same arithmetic, for its memory to compare (auto goes by crops)
                precision, checks = features_precision(text)
                common[-1] = precision
            crops = int(re.search(r'(\d+) crops computed', text).group(1))
            rate, backbone, rest = extraction(text)
            rows.append((label, seconds, rss, crops, rate, backbone, rest, 'compiling' in text))
        print(f'\n{args.photos} synthetic photos (400-800 px JPEGs), {args.arch}, `train` from a cold feature cache:')
        for line in checks:
            print(f'  {line}')
        for label, seconds, rss, crops, rate, backbone, rest, compiled in rows:
            share = rest / (backbone + rest)
            print(f'  {label:<20} {crops:5d} crops, {seconds:6.1f} s in all, {rate:6.1f} crops/s '
                  f'({"compiled" if compiled else "eager"}); a crop: backbone {backbone:.1f} ms, decoding and the rest '
                  f'{rest:.1f} ms ({share:.0%}); {rate * gflop:.0f} GFLOP/s = {rate * gflop / peaks["float32"]:.0%} '
                  f'of the fp32 peak, {rate * gflop / peaks["bfloat16"]:.0%} of the bf16 peak; peak RSS {rss:.0f} MB')
        print(f'  crops/s are over the whole extraction, decoding and compiling included (precision {precision})'
              + ('' if rows[0][-1] else '; nothing compiled (COMPILE: not in int8, and in fp32/bf16 from 4,000 crops), '
                                          'so no warm-cache run')
              + ('; too few photos to compare memory at N/4' if args.photos < 40 else ''))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--data', default=str(SHARED / 'data' / 'msld-v1'), help='photos in class folders')
    p.add_argument('--arch', default='resnet101')
    p.add_argument('--weights', default='none', help='none is fine for timing; IMAGENET1K_V1 for accuracy')
    p.add_argument('--epochs', type=int, default=10, help="the plain loop's")
    p.add_argument('--batch-size', type=int, default=32, help="the plain loop's")
    p.add_argument('--lr', type=float, default=0.001, help="the plain loop's")
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--max-images', type=int, nargs='*', default=[64, 0], help='dataset sizes (0: all)')
    p.add_argument('--photos', type=int, default=0, help='instead: the large-set benchmark on N synthetic photos')
    p.add_argument('--trials', type=int, default=5, help='best of how many matmuls measures each peak')
    p.add_argument('--isa', choices=('native', 'avx2'), default='native', help='avx2: run as a CPU without bf16')
    p.add_argument('--precision', choices=('auto', 'fp32', 'bf16', 'int8'), default='auto',
                   help="train's: auto keeps a faster arithmetic only where the fitted head cannot tell it from fp32")
    p.add_argument('--plain', action='store_true', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.plain:
        return plain_loop(args)
    env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
    if args.isa == 'avx2':
        held = {'ONEDNN_MAX_CPU_ISA': 'AVX2', 'ATEN_CPU_CAPABILITY': 'avx2', 'FBGEMM_ENABLE_INSTRUCTIONS': 'AVX2'}
        env.update(held)
        os.environ.update(held)  # the peaks below too
    if args.weights != 'none' and 'TORCH_HOME' not in os.environ:  # the offline ImageNet file in ../shared
        home = Path(tempfile.mkdtemp(prefix='torch-home-'))
        (home / 'hub' / 'checkpoints').mkdir(parents=True)
        for f in (SHARED / 'weights').glob('*.pth'):
            (home / 'hub' / 'checkpoints' / f.name).symlink_to(f)
        env['TORCH_HOME'] = str(home)
    peaks, gflop = matmul_peaks(args.trials), gflop_per_image(args.arch)
    print(f'machine: {os.cpu_count()} cores, CPU flags: {cpu_flags()}' + (' (held to AVX2)' if args.isa == 'avx2' else '')
          + f'; matmul peaks measured now: fp32 {peaks["float32"]:.0f}, bf16 {peaks["bfloat16"]:.0f} GFLOP/s; '
          f'{args.arch}: {gflop:.3g} GFLOP per 224x224 crop')
    if args.photos:
        return large(args, env, peaks, gflop)
    for n in args.max_images:
        with tempfile.TemporaryDirectory() as tmp:
            r = compare(subset(args.data, n, Path(tmp) / 'data') if n else args.data, args, env)
        rate, backbone, rest = r['extraction']
        for line in r['checks']:
            print(f'  {line}')
        print(f'\n{r["images"]} photos, {args.arch} weights={args.weights}, train in {r["precision"]}; the plain loop '
              f'{args.epochs} epochs, batch {args.batch_size}:')
        print(f'  1 plain loop (fp32, train mode, backbone every epoch) {r["plain_s"]:7.1f} s   peak RSS '
              f'{r["rss"][0]:6.0f} MB   val acc {r["plain_val"]["accuracy"]:.3f} bal '
              f'{r["plain_val"]["balanced_accuracy"]:.3f}')
        print(f'  2 monkeypox.py train, cold cache                      {r["cold_s"]:7.1f} s   peak RSS {r["rss"][1]:6.0f} '
              f'MB   val acc {r["tool_val"]["accuracy"]:.3f} bal {r["tool_val"]["balanced_accuracy"]:.3f}')
        print(f'  3 monkeypox.py train, warm cache                      {r["warm_s"]:7.1f} s   peak RSS {r["rss"][2]:6.0f} MB')
        print(f'  ratio 1/2 (cold) {r["plain_s"] / r["cold_s"]:.1f}x   ratio 1/3 (warm) {r["plain_s"] / r["warm_s"]:.1f}x')
        bf16 = f', {rate * gflop / peaks["bfloat16"]:.0%} of the bf16' if peaks['bfloat16'] > peaks['float32'] else ''
        print(f'  extraction in {r["precision"]} {rate:.1f} crops/s = {rate * gflop:.0f} GFLOP/s = '
              f'{rate * gflop / peaks["float32"]:.0%} of the fp32 matmul peak{bf16}; a crop: backbone {backbone:.1f} '
              f'ms, all else (decoding, cropping, collating, caching) {rest:.1f} ms')
        print(f'  cold predict of one photo {r["predict_s"]:.2f} s vs `import torch, torchvision` {r["import_s"]:.2f} s: '
              f'{r["predict_s"] / r["import_s"]:.2f}x')


if __name__ == '__main__':
    main()
