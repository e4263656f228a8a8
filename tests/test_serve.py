"""serve: the JSON API answers as predict --json does, bad requests get one JSON line and the server goes on,
uploads stay in memory, the log names no request, and the page works in a real browser. One server for the
module, on the trained checkpoint, stopped with SIGTERM at the end."""
import base64
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO, SCRIPT, script_env
from mpox.onnxfile import OOD_PARITY

pytestmark = pytest.mark.slow
httpx = pytest.importorskip('httpx', reason='the serve tests send requests with httpx (pip install httpx; .ci/run does)')
LIMIT_MB = 1.5  # the server's --max-upload-mb: above python-multipart's 1 MiB in memory, so a part could spill


@pytest.fixture(scope='module')
def server(trained, tmp_path_factory):
    """`serve` on the trained checkpoint in a subprocess, with its own TMPDIR and its log in a file: (the base
    URL, the TMPDIR, the log file). Stopped by SIGTERM at the end: it exits 0 and leaves no process behind."""
    _, checkpoint = trained
    root = tmp_path_factory.mktemp('serve')
    (root / 'tmp').mkdir()
    log = root / 'log.txt'
    with open(log, 'w') as out:
        proc = subprocess.Popen([sys.executable, SCRIPT, 'serve', '--checkpoint', checkpoint, '--port', '0',
                                 '--max-upload-mb', str(LIMIT_MB)], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env=script_env({'TMPDIR': root / 'tmp'}))
    try:
        url = wait_for_url(proc, log)
        yield url, root / 'tmp', log
    finally:
        children = child_pids(proc.pid)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=20)
    assert code == 0, log.read_text()
    assert 'stopped' in log.read_text()
    assert not [pid for pid in children if Path(f'/proc/{pid}').exists()]


def wait_for_url(proc, log, seconds=60):
    deadline = time.time() + seconds
    while time.time() < deadline:
        found = re.search(r'serving (http://\S+)', log.read_text())
        if found and httpx.get(found.group(1) + 'healthz').status_code == 200:
            return found.group(1)
        assert proc.poll() is None, log.read_text()
        time.sleep(0.1)
    raise AssertionError(f'serve did not start in {seconds} s: {log.read_text()}')


def child_pids(pid):
    stats = [Path(p).read_text() for p in Path('/proc').glob('[0-9]*/stat') if Path(p).exists()]
    return [int(s.split()[0]) for s in stats if int(s.rsplit(')', 1)[1].split()[1]) == pid]


def photos(trained):
    data, _ = trained
    return [data / 'Monkey Pox' / 'P0_1.jpg', data / 'Monkey Pox' / 'P3_2.jpg', data / 'Others' / 'P1_1.jpg',
            data / 'Others' / 'P6_2.jpg']


def post(url, photo, **params):
    return httpx.post(url + 'api/predict', content=Path(photo).read_bytes(), params=params, timeout=30)


def post_file(url, photo, **params):
    files = {'file': (Path(photo).name, Path(photo).read_bytes(), 'image/jpeg')}
    return httpx.post(url + 'api/predict', files=files, params=params, timeout=30)


# --- the API answers as predict does -----------------------------------------------------------------

def test_the_api_answers_as_predict_json_does(trained, server, cli):
    url, _, _ = server
    shown = photos(trained)
    r = cli('predict', *shown, '--checkpoint', trained[1], '--json', '--no-plot', '--prevalence', '0.05')
    assert r.returncode == 0, r.stderr
    expected = [json.loads(line) for line in r.stdout.splitlines()]
    for photo, want in zip(shown, expected):
        for got, path in ((post(url, photo, prevalence=0.05).json(), None),
                          (post_file(url, photo, prevalence=0.05).json(), photo.name)):
            assert got['path'] == path and set(got) == set(want)
            assert got['label'] == want['label'] and got['unlike_training'] == want['unlike_training']
            for key in ('probability', 'post_test_probability'):
                assert got[key] == pytest.approx(want[key], abs=1e-5), key
            # a distance near 0, sqrt(2 - 2 cos), magnifies the rounding of a batch of 1 against predict's batch
            assert got['ood_score'] == pytest.approx(want['ood_score'], abs=OOD_PARITY)
            assert got['probabilities'] == pytest.approx(want['probabilities'], abs=1e-5)


def test_concurrent_requests_get_the_answers_of_single_ones(trained, server):
    url, _, _ = server
    shown = photos(trained) * 2
    alone = [post(url, p).json()['probabilities'] for p in shown]
    together = [None] * len(shown)

    def send(k):
        together[k] = post(url, shown[k]).json()['probabilities']
    threads = [threading.Thread(target=send, args=(k,)) for k in range(len(shown))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


def test_map_is_the_grad_cam_overlay_of_the_crop_as_a_png(trained, server):
    url, _, _ = server
    r = post_file(url, photos(trained)[0], map=1)
    assert r.status_code == 200, r.text
    png = Image.open(io.BytesIO(base64.b64decode(r.json()['map_png'])))
    assert png.format == 'PNG' and png.size == (160, 160)  # the trained fixture's IMAGE_SIZE
    assert 'map_png' not in post(url, photos(trained)[0]).json()


def test_model_card_says_classes_threshold_and_validation_without_a_path_of_this_machine(trained, server):
    url, tmp, _ = server
    r = httpx.get(url + 'api/model')
    card = r.json()
    assert card['classes'] == ['Monkey Pox', 'Others'] and card['positive_class'] == 'Monkey Pox'
    assert 0 < card['threshold'] < 1 and card['architecture'] == 'resnet18' and card['grad_cam']
    assert {'sensitivity', 'specificity'} <= set(card['validation']) and card['calibration']['temperature'] > 0
    assert card['training_data']['photos'] == 24 and card['ood']['threshold'] > 0
    for path in (trained[0], trained[1], REPO, tmp.parent, Path.home()):
        assert str(path) not in r.text


def test_healthz_says_ok(server):
    url, _, _ = server
    assert httpx.get(url + 'healthz').json() == {'status': 'ok'}


# --- bad requests ------------------------------------------------------------------------------------

def png_claiming(width, height):
    """A PNG of a few dozen bytes whose header claims width x height pixels."""
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)) +
            chunk(b'IDAT', zlib.compress(b'\0' * 64)) + chunk(b'IEND', b''))


def chunked(data, size=65536):
    for start in range(0, len(data), size):
        yield data[start:start + size]


OVER_LIMIT = bytes(int(2 * 2**20))
BAD_REQUESTS = {  # name: (method, path, body or the name of one made from a photo, status, a word of the error)
    'not an image': ('POST', 'api/predict', b'hello, not a photo', 415, 'JPEG or PNG'),
    'empty body': ('POST', 'api/predict', b'', 400, 'empty'),
    'truncated JPEG': ('POST', 'api/predict', 'truncated', 400, 'truncated'),
    'HEIC': ('POST', 'api/predict', b'\0\0\0\x18ftypheic\0\0\0\0mif1heic' + bytes(64), 415, 'convert it to JPEG'),
    'decompression bomb': ('POST', 'api/predict', png_claiming(20000, 20000), 413, 'too large'),
    'over the limit': ('POST', 'api/predict', OVER_LIMIT, 413, 'limit'),
    'over the limit, chunked': ('POST', 'api/predict', 'chunked', 413, 'limit'),
    'prevalence out of range': ('POST', 'api/predict?prevalence=2', 'photo', 400, 'prevalence'),
    'multipart without a file': ('POST', 'api/predict', 'form', 400, '"file"'),
    'multipart without a boundary': ('POST', 'api/predict', 'no boundary', 400, 'multipart'),
    'wrong method': ('GET', 'api/predict', None, 405, 'POST'),
    'wrong path': ('GET', 'api/nothing', None, 404, '/api/predict'),
}


@pytest.mark.parametrize('case', BAD_REQUESTS)
def test_a_bad_request_gets_one_json_error_line_and_the_server_goes_on(trained, server, case):
    url, _, _ = server
    method, path, body, status, word = BAD_REQUESTS[case]
    photo = photos(trained)[0].read_bytes()
    made_here = {'truncated': photo[:len(photo) // 2], 'chunked': chunked(OVER_LIMIT), 'photo': photo}
    kw = {'content': made_here.get(body, body)}
    if body == 'form':
        kw = {'files': {'photo': ('a.jpg', photo, 'image/jpeg')}}
    if body == 'no boundary':
        kw = {'content': photo, 'headers': {'Content-Type': 'multipart/form-data'}}
    r = httpx.request(method, url + path, timeout=30, **kw)
    assert r.status_code == status, r.text
    error = r.json()['error']
    assert word in error and '\n' not in error and 'Traceback' not in error
    assert post(url, photos(trained)[0]).status_code == 200


# --- privacy: memory and the log ----------------------------------------------------------------------

def test_uploads_are_never_written_to_disk(server, tmp_path):
    url, tmp, _ = server
    before = sorted(tmp.rglob('*'))
    noise = Image.frombytes('RGB', (640, 640), os.urandom(640 * 640 * 3))
    noise.save(tmp_path / 'noise.png')  # about 1.2 MB: python-multipart would spill it to a temporary file
    assert 2**20 < (tmp_path / 'noise.png').stat().st_size < LIMIT_MB * 2**20
    assert post_file(url, tmp_path / 'noise.png').status_code == 200
    assert sorted(tmp.rglob('*')) == before


def test_the_log_has_one_line_per_request_without_its_path_or_file_name(trained, server):
    url, _, log = server
    post_file(url, photos(trained)[1])
    httpx.get(url + 'api/nothing')
    lines = log.read_text().splitlines()
    served = lines[lines.index(next(line for line in lines if line.startswith('serving'))) + 1:]
    assert served and all(re.fullmatch(r'\d{3} [\d,]+ bytes \d+ ms', line) for line in served), served
    assert '200 ' in served[-2] and '404 ' in served[-1]


# --- the page, in a browser ----------------------------------------------------------------------------

def chromium():
    """Playwright's sync API and the system's chromium, or a skip (a failure when MONKEYPOX_REQUIRE_BROWSER=1)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    browser = shutil.which('chromium') or shutil.which('chromium-browser')
    if sync_playwright and browser:
        return sync_playwright, browser
    missing = 'chromium (apt-get install chromium)' if sync_playwright else 'playwright (pip install playwright)'
    if os.environ.get('MONKEYPOX_REQUIRE_BROWSER') == '1':
        pytest.fail(f'the browser test needs {missing}: MONKEYPOX_REQUIRE_BROWSER=1 requires it')
    pytest.skip(f'the browser test needs {missing}')


def test_the_page_shows_the_answer_the_map_and_not_a_diagnosis_in_a_browser(trained, server):
    url, _, _ = server
    sync_playwright, browser = chromium()
    with sync_playwright() as p:
        chrome = p.chromium.launch(executable_path=browser, headless=True,
                                   args=['--no-sandbox', '--disable-gpu', '--disable-background-networking'])
        try:
            page = chrome.new_page(viewport={'width': 390, 'height': 844})  # a phone's width
            page.goto(url)
            page.wait_for_function("document.getElementById('model').textContent.includes('resnet18')")
            page.set_input_files('#choose', str(photos(trained)[0]))
            page.wait_for_function("document.getElementById('map').naturalWidth > 0", timeout=20000)
            assert page.inner_text('#label') in ('Monkey Pox', 'Others')
            assert re.fullmatch(r'\d+\.\d%', page.inner_text('#probability'))
            assert page.locator('#map').is_visible() and page.locator('#map').bounding_box()['width'] > 0
            assert page.get_by_text('not a diagnosis').is_visible()
        finally:
            chrome.close()
