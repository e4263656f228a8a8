#!/usr/bin/env python3
"""Speed benchmark (not a test: pytest does not collect it). Run: python tests/bench_speed.py

On the same real photos, each run as its own process and timed from start to exit, as a user waits:
  1. the original script's loop, re-expressed: fp32, model in train() mode, the frozen backbone run
     again on every photo in every epoch, RandomResizedCrop + flip, Adam on the head, batch 32;
  2. this tool's `train` with its defaults, same arch, epochs and batch size, cold feature cache;
  3. the same `train` again, warm cache.
It prints the seconds, the ratios 1/2 and 1/3, validation accuracy of 1 and 2 on the same
patient-grouped split, the backbone's extraction throughput next to a bf16 matrix-multiply peak
measured in this run, peak memory (RSS) of each process, and a cold `predict` against the time of
`python -c "import torch, torchvision"`. By default for --max-images 64 and for the full set.
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


def peak_rss_mb(cmd, env=None):
    """Seconds, peak RSS (MB) and stdout of a command, through os.wait4's per-child resource usage."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f'failed ({proc.returncode}): {" ".join(map(str, cmd))}\n{err[-3000:]}')
    return seconds, usage.ru_maxrss / 1024, out


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


def original_loop(args):
    """The original script's training loop, re-expressed faithfully, bugs included (model in train()
    mode, so BatchNorm statistics drift; the backbone recomputed in fp32 every epoch)."""
    import torch
    import torch.nn.functional as F
    import torchvision
    import torchvision.transforms as T
    sys.path.insert(0, str(REPO))
    import monkeypox as mp
    torch.manual_seed(args.seed)
    classes, photos = mp.read_photos(args.data)
    train, val = mp.grouped_split(photos, mp.VAL_FRACTION, args.seed)
    norm = T.Normalize(mp.MEAN, mp.STD)
    train_tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    eval_tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), norm])

    class Photos(torch.utils.data.Dataset):
        def __init__(self, items, tf):
            self.items, self.tf = items, tf

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.tf(mp.load_rgb(self.items[i].path)), self.items[i].label

    weights = None if args.weights == 'none' else args.weights
    model = torchvision.models.get_model(args.arch, weights=weights)
    for p in model.parameters():
        p.requires_grad = False
    name = mp.head_name(model)
    model.set_submodule(name, torch.nn.Linear(model.get_submodule(name).in_features, len(classes)))
    head = model.get_submodule(name)
    optimizer = torch.optim.Adam(head.parameters(), lr=args.lr)
    loader = torch.utils.data.DataLoader(Photos(train, train_tf), batch_size=args.batch_size, shuffle=True)
    model.train()  # the original's bug: a "frozen" backbone whose BatchNorm statistics keep moving
    for epoch in range(args.epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        x = torch.stack([eval_tf(mp.load_rgb(p.path)) for p in val])
        probs = model(x).softmax(1).tolist()
    m = mp.metrics([p.label for p in val], probs, classes, mp.positive_index(classes, 'auto'), 0.5)
    print(json.dumps({'accuracy': m['accuracy'], 'balanced_accuracy': m['balanced_accuracy'], 'n': m['n']}))


def matmul_peak():
    """bf16 (where fast, else fp32) matrix-multiply GFLOP/s on this machine, now."""
    import torch
    sys.path.insert(0, str(REPO))
    import monkeypox as mp
    dtype = torch.bfloat16 if mp.resolve_precision('auto', torch.device('cpu')) == 'bf16' else torch.float32
    n = 4096
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float('inf')
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9, str(dtype).split('.')[-1]


def gflop_per_image(arch):
    import torch
    import torchvision
    from torch.utils.flop_counter import FlopCounterMode
    model = torchvision.models.get_model(arch).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 224, 224))
    return counter.get_total_flops() / 1e9


def bench(data, args, env, label):
    work = Path(tempfile.mkdtemp(prefix='monkeypox-bench-'))
    try:
        common = ['--arch', args.arch, '--weights', args.weights, '--epochs', str(args.epochs),
                  '--batch-size', str(args.batch_size), '--seed', str(args.seed)]
        original = [sys.executable, __file__, '--original', '--data', str(data), '--lr', str(args.lr), *common]
        t1, rss1, out1 = peak_rss_mb(original, env)
        tool = [sys.executable, str(SCRIPT), 'train', '--data', str(data), '--lr', str(args.lr), '--out',
                str(work / 'chk'), '--no-plot', *common]
        t2, rss2, out2 = peak_rss_mb(tool, env)
        t3, rss3, out3 = peak_rss_mb(tool, env)
        assert 'all from cache' in out3, out3
        import torch
        ckpt = torch.load(work / 'chk' / 'monkeypox_model.pkl', weights_only=True, map_location='cpu')
        orig = json.loads(out1.strip().splitlines()[-1])
        rate = re.search(r'([\d.]+) crops/s', out2)
        photo = next(p for p in Path(data).rglob('*.jpg'))
        t_import, _, _ = peak_rss_mb([sys.executable, '-c', 'import torch, torchvision'], env)
        t_predict, _, _ = peak_rss_mb([sys.executable, str(SCRIPT), 'predict', str(photo), '--checkpoint',
                                       str(work / 'chk' / 'monkeypox_model.pkl'), '--no-plot'], env)
        return {'label': label, 'original_s': t1, 'cold_s': t2, 'warm_s': t3, 'original_rss': rss1,
                'cold_rss': rss2, 'warm_rss': rss3, 'original_val': orig, 'tool_val': ckpt['metrics'],
                'crops_per_s': float(rate.group(1)) if rate else float('nan'), 'import_s': t_import,
                'predict_s': t_predict, 'images': len(ckpt['split']['train']) + len(ckpt['split']['val'])}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--data', default=str(SHARED / 'data' / 'msld-v1'), help='photos in class folders')
    p.add_argument('--arch', default='resnet101')
    p.add_argument('--weights', default='none', help='none is fine for timing; IMAGENET1K_V1 for accuracy')
    p.add_argument('--epochs', type=int, default=10)
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--lr', type=float, default=0.001)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--max-images', type=int, nargs='*', default=[64, 0], help='dataset sizes (0: all)')
    p.add_argument('--original', action='store_true', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.original:
        return original_loop(args)
    env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
    if args.weights != 'none' and 'TORCH_HOME' not in os.environ:  # the offline ImageNet file in ../shared
        home = Path(tempfile.mkdtemp(prefix='torch-home-'))
        (home / 'hub' / 'checkpoints').mkdir(parents=True)
        for f in (SHARED / 'weights').glob('*.pth'):
            (home / 'hub' / 'checkpoints' / f.name).symlink_to(f)
        env['TORCH_HOME'] = str(home)
    peak, dtype = matmul_peak()
    gflop = gflop_per_image(args.arch)
    print(f'machine: {os.cpu_count()} cores; {dtype} matmul peak measured now: {peak:.0f} GFLOP/s; '
          f'{args.arch}: {gflop:.1f} GFLOP per 224x224 image')
    rows = []
    for n in args.max_images:
        with tempfile.TemporaryDirectory() as tmp:
            data = subset(args.data, n, Path(tmp) / 'data') if n else args.data
            rows.append(bench(data, args, env, f'{n} images' if n else 'all images'))
        r = rows[-1]
        print(f'\n{r["images"]} photos, {args.arch} weights={args.weights}, {args.epochs} epochs, batch {args.batch_size}:')
        print(f'  1 original loop (fp32, train mode, backbone every epoch) {r["original_s"]:7.1f} s   '
              f'peak RSS {r["original_rss"]:6.0f} MB   val acc {r["original_val"]["accuracy"]:.3f} '
              f'bal {r["original_val"]["balanced_accuracy"]:.3f}')
        print(f'  2 monkeypox.py train, cold cache                      {r["cold_s"]:7.1f} s   '
              f'peak RSS {r["cold_rss"]:6.0f} MB   val acc {r["tool_val"]["accuracy"]:.3f} '
              f'bal {r["tool_val"]["balanced_accuracy"]:.3f}')
        print(f'  3 monkeypox.py train, warm cache                      {r["warm_s"]:7.1f} s   '
              f'peak RSS {r["warm_rss"]:6.0f} MB')
        print(f'  ratio 1/2 (cold) {r["original_s"] / r["cold_s"]:.1f}x   ratio 1/3 (warm) '
              f'{r["original_s"] / r["warm_s"]:.1f}x')
        achieved = r['crops_per_s'] * gflop
        print(f'  extraction {r["crops_per_s"]:.1f} crops/s = {achieved:.0f} GFLOP/s = {achieved / peak:.0%} of the '
              f'{dtype} matmul peak ({1000 / r["crops_per_s"]:.1f} ms per crop, decoding included)')
        print(f'  cold predict of one photo {r["predict_s"]:.2f} s vs `import torch, torchvision` '
              f'{r["import_s"]:.2f} s: {r["predict_s"] / r["import_s"]:.2f}x')


if __name__ == '__main__':
    main()
