#!/usr/bin/env python3
"""The CUDA check (not a test: pytest does not collect it). Run on a machine with an NVIDIA GPU:

    python tools/gpu_check.py [--shared DIR] [--out DIR]

It runs the tool as a user would, on the real MSLD photos with torchvision's ImageNet MobileNetV2
file (from DIR/data/msld-v1 and DIR/weights, laid out as ../shared is): train frozen and with
--unfreeze, evaluate, cv, predict --explain, a 1-GPU torchrun (NCCL), and the extraction throughput
of ResNet101 (random weights) next to the GPU's bf16 matrix-multiply peak measured in the same run.
Then the large-set benchmark (tools/bench_speed.py --photos 2000) and the speed of decoding large JPEGs with
Pillow, torchvision on the CPU and nvJPEG on the GPU. Each step prints one line (ok/FAILED, seconds, what
it measured); a JSON summary and every step's output go to --out. Without CUDA it says so and exits 0.
About 5 minutes on one H200.
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


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--shared', default=os.environ.get('MONKEYPOX_SHARED') or str(REPO.parent / 'shared'),
                   help='folder with data/msld-v1 and weights/mobilenet_v2-b0353104.pth')
    p.add_argument('--out', default=os.environ.get('OUT') or 'gpu-check', help='logs and summary')
    args = p.parse_args()
    import torch
    if not torch.cuda.is_available():
        print('gpu_check: no CUDA GPU here; nothing to check')
        return 0
    shared, out = Path(args.shared).resolve(), Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    msld, weights = shared / 'data' / 'msld-v1', shared / 'weights' / 'mobilenet_v2-b0353104.pth'
    if not msld.is_dir() or not weights.is_file():
        sys.exit(f'gpu_check: {msld} and {weights} are needed (--shared DIR)')
    work = Path(tempfile.mkdtemp(prefix='gpu-check-'))
    home = work / 'torch_home'
    (home / 'hub' / 'checkpoints').mkdir(parents=True)
    shutil.copy(weights, home / 'hub' / 'checkpoints' / weights.name)
    env = {**os.environ, 'TORCH_HOME': str(home), 'PYTHONUNBUFFERED': '1'}
    summary = {'device': torch.cuda.get_device_name(0), 'torch': str(torch.__version__),
               'cuda': torch.version.cuda, 'cores': os.cpu_count(), 'steps': []}
    print(f'gpu_check: {summary["device"]}, torch {summary["torch"]} (CUDA {summary["cuda"]}), '
          f'{summary["cores"]} CPU cores', flush=True)
    summary['bf16_matmul_tflops'] = matmul_peak(torch)
    print(f'bf16 matmul peak measured now: {summary["bf16_matmul_tflops"]:.0f} TFLOP/s', flush=True)

    def step(name, cmd, measure=None):
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work)
        seconds = time.perf_counter() - t0
        with open(out / 'gpu_check.log', 'a') as log:
            log.write(f'=== {name}\n$ {" ".join(map(str, cmd))}\n{r.stdout}\n--- stderr ---\n{r.stderr}\n')
        row = {'step': name, 'ok': r.returncode == 0, 'rc': r.returncode, 'seconds': round(seconds, 1)}
        if r.returncode == 0 and measure:
            try:
                row.update(measure(r.stdout))
            except Exception as e:  # a step that ran but printed something unexpected
                row.update(ok=False, error=f'{type(e).__name__}: {e}')
        elif r.returncode:
            row['error'] = (r.stderr.strip().splitlines() or ['?'])[-1][:300]
        summary['steps'].append(row)
        extra = ', '.join(f'{k} {v}' for k, v in row.items() if k not in ('step', 'ok', 'rc', 'seconds'))
        print(f'{"ok    " if row["ok"] else "FAILED"} {name:<22} {seconds:6.1f} s  {extra}', flush=True)
        return r

    mp = [sys.executable, str(SCRIPT)]
    real = ['--data', str(msld), '--arch', 'mobilenet_v2', '--weights', 'IMAGENET1K_V1']
    ckpt = work / 'frozen' / 'monkeypox_model.pkl'
    step('train-frozen', mp + ['train', *real, '--out', work / 'frozen'], lambda s: {
        'device_line': re.search(r'model: .*', s).group(0)[:120],
        'val_balanced': float(re.search(r'val balanced accuracy ([\d.]+)', s).group(1))})
    step('evaluate', mp + ['evaluate', '--data', msld, '--checkpoint', ckpt, '--json'],
         lambda s: {k: round(v, 3) for k, v in json.loads(s).items() if k in ('balanced_accuracy', 'auc')})
    photos = sorted((msld / 'Monkey Pox').glob('*.jpg'))[:2]
    step('predict-explain', mp + ['predict', *photos, '--checkpoint', ckpt, '--explain', '--plot',
                                  out / 'explain.png'], lambda s: {'lines': s.count('\t') // 2})
    step('train-unfreeze', mp + ['train', *real, '--unfreeze', '3', '--epochs', '5', '--out',
                                 work / 'tuned', '--no-plot'],
         lambda s: {'val_balanced': float(re.search(r'val balanced accuracy ([\d.]+)', s).group(1))})
    step('cv', mp + ['cv', *real, '--out', work / 'cv', '--json', '--no-plot'],
         lambda s: {'balanced_mean': round(json.loads(s)['mean']['balanced_accuracy'], 3)})
    step('torchrun-nccl', [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1',
                           SCRIPT, 'train', *real, '--out', work / 'dist', '--no-plot'],
         lambda s: {'val_balanced': float(re.search(r'val balanced accuracy ([\d.]+)', s).group(1))})
    step('throughput-resnet101', mp + ['train', '--data', msld, '--arch', 'resnet101', '--weights', 'none',
                                       '--views', '8', '--out', work / 'r101', '--no-plot', '--no-cache'],
         lambda s: {'crops_per_s': float(re.search(r'([\d.]+) crops/s', s).group(1))})
    step('bench-2000-photos', [sys.executable, REPO / 'tools' / 'bench_speed.py', '--photos', '2000'],
         lambda s: {'lines': [line.strip() for line in s.splitlines() if 'crops/s' in line]})
    summary['decode_ms_per_photo'] = decode_speeds(torch)
    print(f'decoding 400-800 px JPEGs, ms a photo: {summary["decode_ms_per_photo"]}', flush=True)
    if ckpt.exists():  # a checkpoint written on the GPU, for loading on a CPU elsewhere
        shutil.copy(ckpt, out / 'gpu_checkpoint.pkl')
    (out / 'gpu_check.json').write_text(json.dumps(summary, indent=1))
    failed = [s['step'] for s in summary['steps'] if not s['ok']]
    print(f'gpu_check: {len(summary["steps"]) - len(failed)}/{len(summary["steps"])} steps ok'
          + (f'; failed: {", ".join(failed)} (logs in {out})' if failed else ''))
    shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


def decode_speeds(torch, n=200):
    """ms a photo to decode n synthetic 400-800 px JPEGs: Pillow with the draft the tool uses (one core),
    torchvision.io.decode_jpeg on one core, and decode_jpeg on the GPU (nvJPEG) in batches of 32."""
    import torchvision.io as io
    sys.path.insert(0, str(REPO))
    import mpox.images
    from bench_speed import synthetic_photos
    folder = Path(tempfile.mkdtemp(prefix='decode-'))
    files = sorted(str(p) for p in synthetic_photos(n, folder).rglob('*.jpg'))
    data = [io.read_file(f) for f in files]
    torch.set_num_threads(1)
    times = {}
    for name, fn in (('pillow_draft_512', lambda: [mpox.images.load_rgb(f, draft=512) for f in files]),
                     ('decode_jpeg_cpu', lambda: [io.decode_jpeg(d) for d in data]),
                     ('decode_jpeg_cuda', lambda: [io.decode_jpeg(data[i:i + 32], device='cuda')
                                                   for i in range(0, len(data), 32)])):
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times[name] = round((time.perf_counter() - t) / len(files) * 1e3, 3)
    shutil.rmtree(folder, ignore_errors=True)
    return times


def matmul_peak(torch, n=8192):
    a, b = (torch.randn(n, n, device='cuda', dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * 10 / (time.perf_counter() - t) / 1e12


if __name__ == '__main__':
    sys.exit(main())
