#!/usr/bin/env python3
"""Serving benchmark (a tool, not a test). Run: python tools/bench_serve.py [--checkpoint FILE] [--screenshot PNG]

Starts `python monkeypox.py serve` in a subprocess on a MobileNetV2 trained on the MSLD photos (trained here, into
a temporary folder, unless --checkpoint names one) and measures, one after the other so that nothing else competes
for the cores:
  1. --requests (200) MSLD photos sent by --clients (8) concurrent clients (threads, one httpx client each), the
     raw bytes as the body: p50 and p95 latency and throughput; then the same photos from a single client, and
     20 requests with ?map=1 (the Grad-CAM map), one at a time;
  2. the server's memory (VmRSS) after start and after those requests;
  3. the same photos through `predict --json` in one process (wall time, start-up included), and through predict's
     scoring loop in this process (checkpoint_probabilities: batches of --extract-batch-size);
  4. whether batching requests that arrive together would pay: the model's time per crop in a batch of 1 and of
     --clients crops.
It prints measured figures and their ratios, and whether the server's answers are predict's. With --screenshot PNG it
also writes the page at 1000 px width, showing the answer and the map for one photo (docs/serve.png).
"""
import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'monkeypox.py'
SHARED = Path(os.environ.get('MONKEYPOX_SHARED') or REPO.parent / 'shared')
MSLD = SHARED / 'data' / 'msld-v1'
WEIGHTS = SHARED / 'weights' / 'mobilenet_v2-b0353104.pth'
ARCHIVE = SHARED / 'data' / 'msld-v1-original-images.rar'


def train(out):
    """A MobileNetV2 trained with the defaults, in fp32 (what --precision auto settles on), on the MSLD photos as
    `download` lays them out from the authors' archive (its LICENSE.txt is what the model card names)."""
    data = Path(out) / 'data'
    for cmd in ([SCRIPT, 'download', '--url', ARCHIVE, '--dest', data],
                [SCRIPT, 'train', '--data', data, '--arch', 'mobilenet_v2', '--weights', WEIGHTS, '--precision', 'fp32',
                 '--out', out, '--no-plot']):
        print('running: python', ' '.join(map(str, cmd)), flush=True)
        subprocess.run([sys.executable, *map(str, cmd)], check=True, stdout=subprocess.DEVNULL)
    return Path(out) / 'monkeypox_model.pkl'


def start_server(checkpoint, log):
    """`serve` on any free port: (the process, its base URL), once /healthz answers."""
    proc = subprocess.Popen([sys.executable, str(SCRIPT), 'serve', '--checkpoint', str(checkpoint), '--port', '0'],
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    for _ in range(600):
        found = re.search(r'serving (http://\S+)', Path(log.name).read_text())
        if found and httpx.get(found.group(1) + 'healthz').status_code == 200:
            return proc, found.group(1)
        if proc.poll() is not None:
            sys.exit(f'serve failed:\n{Path(log.name).read_text()}')
        time.sleep(0.1)
    sys.exit('serve did not start in 60 s')


def rss_mb(pid):
    status = Path(f'/proc/{pid}/status').read_text()
    return int(re.search(r'VmRSS:\s+(\d+) kB', status).group(1)) / 1024


def send_all(url, photos, clients, **params):
    """Every photo sent once, by `clients` threads taking turns: (seconds in all, latencies in s, answers)."""
    latencies, answers = [None] * len(photos), [None] * len(photos)

    def client(k):
        with httpx.Client(timeout=120) as http:
            for i in range(k, len(photos), clients):
                t0 = time.perf_counter()
                r = http.post(url + 'api/predict', content=photos[i].read_bytes(), params=params)
                latencies[i] = time.perf_counter() - t0
                r.raise_for_status()
                answers[i] = r.json()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, latencies, answers


def latency_line(what, seconds, latencies):
    ms = sorted(1e3 * s for s in latencies)
    p95 = ms[min(len(ms) - 1, round(0.95 * len(ms)) - 1)]
    print(f'{what}: {len(ms)} requests in {seconds:.2f} s, {len(ms) / seconds:.1f} photos/s; latency p50 '
          f'{statistics.median(ms):.0f} ms, p95 {p95:.0f} ms')
    return len(ms) / seconds


def bench_server(checkpoint, photos, clients):
    """Steps 1 and 2: (photos/s with `clients` clients, the answers)."""
    with tempfile.NamedTemporaryFile('w', suffix='.log') as log:
        proc, url = start_server(checkpoint, log)
        print(f'server RSS after start: {rss_mb(proc.pid):.0f} MB')
        send_all(url, photos[:2], 1)  # the first requests pay for lazy set-up in the server
        seconds, latencies, answers = send_all(url, photos, clients)
        rate = latency_line(f'serve, {clients} concurrent clients', seconds, latencies)
        latency_line('serve, 1 client', *send_all(url, photos, 1)[:2])
        latency_line('serve with ?map=1 (Grad-CAM), 1 client', *send_all(url, photos[:20], 1, map=1)[:2])
        print(f'server RSS after {2 * len(photos) + 22} requests: {rss_mb(proc.pid):.0f} MB')
        proc.send_signal(signal.SIGTERM)
        print(f'server stopped by SIGTERM: exit code {proc.wait(timeout=30)}')
    return rate, answers


def bench_predict(checkpoint, photos, served, rate):
    """Step 3: predict --json over the same photos in one process, its answers set against the server's."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, str(SCRIPT), 'predict', *map(str, photos), '--checkpoint', str(checkpoint),
                          '--json', '--no-plot'], check=True, capture_output=True, text=True, cwd=REPO).stdout
    seconds = time.perf_counter() - t0
    print(f'predict --json, one process: {len(photos)} photos in {seconds:.2f} s with start-up, '
          f'{len(photos) / seconds:.1f} photos/s; serve with 8 clients does {rate / (len(photos) / seconds):.2f}x that')
    rows = [json.loads(line) for line in out.splitlines()]
    same = sum(r['label'] == s['label'] for r, s in zip(rows, served))
    gap = max(abs(r['probability'] - s['probabilities'][r['label']]) for r, s in zip(rows, served))
    print(f'answers: the same label for {same} of {len(rows)} photos; probabilities within {gap:.1e}')


def bench_in_process(checkpoint, photos, clients, rate):
    """Steps 3 (predict's loop, in this process) and 4 (a batch of `clients` crops against one at a time)."""
    sys.path.insert(0, str(REPO))
    import torch
    import monkeypox as mp
    from mpox.data import Photo
    from mpox.images import backbone_input, eval_transform, load_rgb
    from mpox.inference import classifier
    from mpox.pipeline import checkpoint_probabilities, load_model
    cfg = mp.parse_args(['predict', *map(str, photos), '--checkpoint', str(checkpoint), '--no-plot'])
    loaded = load_model(checkpoint, cfg)
    checkpoint_probabilities(loaded, [Photo(str(p), -1, '') for p in photos[:16]], cfg, 'warm-up')
    t0 = time.perf_counter()
    checkpoint_probabilities(loaded, [Photo(str(p), -1, '') for p in photos], cfg, 'bench')
    seconds = time.perf_counter() - t0
    print(f'predict\'s scoring loop in one process (batches of {cfg.extract_batch_size}): {len(photos) / seconds:.1f} '
          f'photos/s; serve with {clients} clients does {rate / (len(photos) / seconds):.2f}x that')
    fn = classifier(loaded.model, torch.device('cpu'), 'fp32', loaded.pre, ood=loaded.ood)
    crops = backbone_input(torch.stack([eval_transform(loaded.pre)(load_rgb(p, draft=loaded.pre['resize']))
                                        for p in photos[:clients]]), torch.device('cpu'))
    with torch.inference_mode():
        one = min(timed(lambda: [fn(crops[k:k + 1]) for k in range(clients)]) for _ in range(5)) / clients
        batch = min(timed(lambda: fn(crops)) for _ in range(5)) / clients
    print(f'the model alone: {1e3 * one:.1f} ms a crop one at a time, {1e3 * batch:.1f} ms a crop in a batch of '
          f'{clients}: batching requests that arrive together would cut the model\'s time by {1 - batch / one:.0%}')


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def screenshot(checkpoint, png):
    """The page at 1000 px width with the answer and the Grad-CAM map for the first Monkey Pox photo the checkpoint
    held out for validation, at a prevalence of 5%, as a PNG."""
    import torch
    from playwright.sync_api import sync_playwright
    split = torch.load(checkpoint, weights_only=True)['split']
    shown = Path(split['root'], next(p for p in split['val'] if 'Monkey Pox' in Path(p).parts))
    with tempfile.NamedTemporaryFile('w', suffix='.log') as log, sync_playwright() as p:
        proc, url = start_server(checkpoint, log)
        browser = p.chromium.launch(executable_path='/usr/bin/chromium', headless=True,
                                    args=['--no-sandbox', '--disable-gpu', '--disable-background-networking'])
        page = browser.new_page(viewport={'width': 1000, 'height': 800})
        page.goto(url)
        page.wait_for_function("document.getElementById('model').textContent.includes('mobilenet')")
        page.fill('#prevalence', '5')
        page.dispatch_event('#prevalence', 'change')
        page.set_input_files('#choose', str(shown))
        page.wait_for_function("document.getElementById('map').naturalWidth > 0", timeout=60000)
        page.screenshot(path=str(png), full_page=True)
        browser.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    print(f'screenshot: {png} ({Path(png).stat().st_size / 1e3:.0f} kB), {shown.name}')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--checkpoint', help='a checkpoint to serve (default: train a MobileNetV2 on MSLD)')
    parser.add_argument('--requests', type=int, default=200)
    parser.add_argument('--clients', type=int, default=8)
    parser.add_argument('--screenshot', metavar='PNG', help='also write the page with one answer to PNG')
    args = parser.parse_args()
    flags = sorted(set(re.findall(r'\b(avx2|avx512_bf16|amx_bf16)\b', Path('/proc/cpuinfo').read_text())))
    print(f'{os.cpu_count()} cores, CPU flags: {" ".join(flags) or "none of avx2, avx512_bf16, amx_bf16"}; load '
          f'average before the run {os.getloadavg()[0]:.2f} (anything else running skews the figures)')
    every = sorted((MSLD / 'Monkey Pox').glob('*.jpg')) + sorted((MSLD / 'Others').glob('*.jpg'))
    photos = [every[i % len(every)] for i in range(args.requests)]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else train(Path(tmp) / 'chk')
        rate, answers = bench_server(checkpoint, photos, args.clients)
        bench_predict(checkpoint, photos, answers, rate)
        bench_in_process(checkpoint, photos, args.clients, rate)
        if args.screenshot:
            screenshot(checkpoint, args.screenshot)


if __name__ == '__main__':
    main()
