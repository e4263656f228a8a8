"""`serve`: one model behind a web page and a JSON API (docs/serve.md). The model is loaded once; each uploaded
photo is read into memory, decoded and cropped as predict decodes and crops a file, scored by the same function
and answered with predict --json's object, and never written to disk. FastAPI, uvicorn and python-multipart are
imported only here, inside the functions that serve, so the other commands do not pay for them. The page is the
static files in static/."""

import base64
import io
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image, UnidentifiedImageError

from .gradcam import MAP_OPACITY, grad_cam
from .images import backbone_input, describe_image_error, eval_transform, load_rgb
from .metrics import json_ready, operating_threshold
from .pipeline import answer, scoring_function
from .precision import explained_qparams
from .system import NOT_A_DIAGNOSIS, UserError, first_line, say, warn


STATIC = Path(__file__).parent / 'static'
LOOPBACK = ('127.0.0.1', 'localhost', '::1')
HEIF_BRANDS = (b'heic', b'heix', b'hevc', b'hevx', b'heim', b'heis', b'mif1', b'msf1')  # 'ftyp' brands of HEIC/HEIF
VALIDATION = ('n', 'threshold', 'accuracy', 'balanced_accuracy', 'sensitivity', 'sensitivity_ci', 'specificity',
              'specificity_ci', 'auc', 'log_loss', 'brier', 'ece')  # the checkpoint's validation metrics shown


class Refused(Exception):
    """A request refused: answered with its 4xx status and {"error": one line}; the server goes on."""

    def __init__(self, status, line):
        super().__init__(line)
        self.status = status


# --- scoring ----------------------------------------------------------------------------------------

class Scorer:
    """The loaded model and the function that scores it, built once as predict builds it (scoring_function).
    One photo at a time goes through it, under a lock: torch uses every core for one photo, Grad-CAM hooks
    the shared model, and load_rgb's warning filter is the process's."""

    def __init__(self, loaded, cfg):
        self.loaded, self.threshold, self.lock = loaded, operating_threshold(cfg, loaded), threading.Lock()
        self.crop = eval_transform(loaded.pre)
        self.device, self.precision, self.fn = scoring_function(loaded, cfg)
        self.explain = None if loaded.session is not None else grad_cam(loaded.model, loaded.pre,
                                                                        explained_qparams(cfg, loaded))

    def answer(self, data, name, prevalence, with_map):
        """predict --json's object for one photo's bytes (`name`: the upload's file name, or None) and, with
        `with_map`, `map_png`: the Grad-CAM map of the answer over the crop the model saw. Raises Refused."""
        with self.lock:
            image = decode(data, self.loaded.pre['resize'])
            with torch.inference_mode():
                row = self.fn(backbone_input(self.crop(image)[None], self.device)).cpu()[0].tolist()
            probs, score = (row[:-1], row[-1]) if self.loaded.ood is not None else (row, None)
            found = answer(name, probs, score, self.loaded, self.threshold, prevalence)
            if with_map:
                crop, heat = self.explain(image, self.loaded.classes.index(found['label']))
                found['map_png'] = overlay_png(crop, heat)
        return found


def decode(data, resize):
    """A photo's bytes decoded as predict decodes a file (load_rgb, a JPEG drafted at the resize), or Refused with
    one line: 415 for what Pillow cannot read (a HEIC photo named), 413 for a decompression bomb, else 400."""
    try:
        return load_rgb(io.BytesIO(data), draft=resize)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Refused(413, describe_image_error('photo', e)) from e
    except UnidentifiedImageError as e:
        if data[4:8] == b'ftyp' and data[8:12] in HEIF_BRANDS:
            raise Refused(415, 'a HEIC/HEIF photo, which is not readable here: convert it to JPEG or PNG') from e
        raise Refused(415, 'not an image Pillow can read: send a JPEG or PNG photo') from e
    except Exception as e:  # any other decoder failure on untrusted bytes refuses this photo only
        raise Refused(400, f'unreadable image ({first_line(e)}): damaged or truncated; send the photo again') from e


def overlay_png(crop, heat):
    """The crop the model saw with the Grad-CAM map over it in matplotlib's jet, as predict --explain draws it:
    a PNG, base64."""
    from matplotlib import colormaps  # only once a map is asked for
    blend = (1 - MAP_OPACITY) * crop + MAP_OPACITY * 255 * colormaps['jet'](heat)[..., :3]
    png = io.BytesIO()
    Image.fromarray(blend.round().astype(np.uint8)).save(png, format='PNG')
    return base64.b64encode(png.getvalue()).decode('ascii')


# --- what the server says of the model ---------------------------------------------------------------

def model_card(scorer, cfg):
    """GET /api/model: what the model is, what it was trained and validated on, and how it answers; never a path
    of this machine (a weights file and the training folder are named by their last component)."""
    loaded, ckpt = scorer.loaded, scorer.loaded.ckpt
    metrics, head, ood = ckpt.get('metrics') or {}, ckpt.get('head') or {}, loaded.ood
    return json_ready({
        'classes': loaded.classes, 'threshold': scorer.threshold,
        'positive_class': loaded.classes[loaded.positive] if loaded.positive is not None else None,
        'architecture': ckpt['arch'], 'file': 'onnx' if loaded.session is not None else 'checkpoint',
        'weights': weights_card(ckpt.get('weights')), 'stage': ckpt.get('stage'), 'precision': scorer.precision,
        'preprocess': loaded.pre, 'training_data': training_data(ckpt.get('split')),
        'validation': {k: metrics.get(k) for k in VALIDATION} if metrics else None,
        'calibration': {'temperature': float(head['temperature'])} if 'temperature' in head else None,
        'ood': {k: ood.get(k) for k in ('threshold', 'coverage', 'photos', 'method')} if ood else None,
        'trained_prevalence': ckpt.get('trained_prevalence'), 'grad_cam': scorer.explain is not None,
        'versions': {'trained_with': ckpt.get('versions'),
                     'serving_with': {'torch': str(torch.__version__), 'torchvision': torchvision.__version__}},
        'max_upload_mb': cfg.max_upload_mb, 'not_a_diagnosis': NOT_A_DIAGNOSIS})


def weights_card(weights):
    """The backbone's starting weights: torchvision's name, or a file's name and sha256, or none."""
    if not weights:
        return None
    source = os.path.basename(weights['source']) if weights['kind'] == 'file' else weights['source']
    return {'source': source, 'kind': weights['kind'], 'id': weights['id']}


def training_data(split):
    """The training photos: their folder's name, counts, and their license as the checkpoint recorded it from
    the LICENSE.txt beside them (which `download` writes)."""
    if not split:
        return None
    root = split.get('root', '')
    return {'folder': os.path.basename(os.path.normpath(root)) if root else None, 'split': split.get('how'),
            'photos': len(split.get('train', [])), 'validation_photos': len(split.get('val', [])),
            'license': split.get('license')}


# --- requests ------------------------------------------------------------------------------------------

async def read_upload(request, limit):
    """(the photo's bytes, the upload's file name or None): the body as it is, or its multipart/form-data field
    `file`, held in memory and refused (413) past `limit` bytes."""
    body = await read_body(request, limit)
    content_type = request.headers.get('content-type', '')
    data, name = (multipart_file(body, content_type, limit) if content_type.lower().startswith('multipart/form-data')
                  else (body, None))
    if not data:
        raise Refused(400, 'empty upload: send the photo as the body, or as the multipart field "file"')
    return data, name


async def read_body(request, limit):
    """The body, refused past `limit` bytes by its Content-Length before any of it is read, and by counting
    as it streams in, so that a chunked upload cannot pass the limit either."""
    too_large = Refused(413, f'upload larger than the limit of {limit / 2**20:g} MB (--max-upload-mb); send a '
                             'smaller photo')
    declared = request.headers.get('content-length', '')
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b''.join(chunks)


def multipart_file(body, content_type, limit):
    """The field `file` of a multipart/form-data body, parsed from memory, and its file name (the last part of
    it: it is only ever echoed back). python-multipart keeps a part in memory up to MAX_MEMORY_FILE_SIZE and
    spills the rest to a temporary file, so that size is set above the whole body's limit."""
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import FormParser, parse_options_header
    files, boundary = [], parse_options_header(content_type)[1].get(b'boundary')
    if not boundary:
        raise Refused(400, 'malformed multipart/form-data: its Content-Type names no boundary')
    parser = FormParser('multipart/form-data', None, files.append, boundary=boundary,
                        config={'MAX_MEMORY_FILE_SIZE': limit + 1})
    try:
        parser.write(body)
        parser.finalize()
    except FormParserError as e:
        raise Refused(400, f'malformed multipart/form-data body ({first_line(e)})') from e
    upload = next((f for f in files if f.field_name == b'file'), None)
    if upload is None:
        raise Refused(400, 'multipart/form-data without a "file" field: send the photo as the field "file"')
    name = os.path.basename(upload.file_name.decode('utf-8', 'replace')) if upload.file_name else None
    return upload.file_object.getvalue(), name


class RequestLog:
    """ASGI middleware: one line per request, its status, the bytes it sent and the milliseconds it took; never
    the client's address, the path or a file name (a photo of a person's skin is health data)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope['type'] != 'http':
            return await self.app(scope, receive, send)
        t0, size, status = time.perf_counter(), 0, 500  # 500: the app raised before it answered

        async def counted():
            nonlocal size
            message = await receive()
            size += len(message.get('body', b''))
            return message

        async def noted(message):
            nonlocal status
            if message['type'] == 'http.response.start':
                status = message['status']
            await send(message)
        try:
            await self.app(scope, counted, noted)
        finally:
            say(f'{status} {size:,} bytes {(time.perf_counter() - t0) * 1e3:.0f} ms')


NOT_FOUND = 'no such page: the API is /api/predict, /api/model and /healthz (see /docs)'


def web_app(scorer, cfg):
    """The FastAPI application: the page, POST /api/predict, GET /api/model, GET /healthz, and OpenAPI at /docs;
    every error is {"error": one line} with its status."""
    from fastapi import FastAPI, Query, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from pydantic import BaseModel
    from starlette.exceptions import HTTPException

    class Answer(BaseModel):  # one line of predict --json, and the map
        path: str | None
        label: str
        probability: float
        probabilities: dict[str, float]
        ood_score: float | None
        unlike_training: bool | None
        prevalence: float | None = None
        post_test_probability: float | None = None
        map_png: str | None = None

    app = FastAPI(title='monkeypox.py', description=NOT_A_DIAGNOSIS)
    limit, card = int(cfg.max_upload_mb * 2**20), model_card(scorer, cfg)
    upload = {'requestBody': {'required': True, 'content': {
        'image/*': {'schema': {'type': 'string', 'format': 'binary'}},
        'multipart/form-data': {'schema': {'type': 'object', 'properties': {
            'file': {'type': 'string', 'format': 'binary'}}, 'required': ['file']}}}}}

    @app.post('/api/predict', response_model=Answer, response_model_exclude_unset=True, openapi_extra=upload)
    async def predict(request: Request,
                      prevalence: float | None = Query(None, gt=0, lt=1, description='for the post-test probability'),
                      map: bool = Query(False, description='add map_png, the Grad-CAM map (base64 PNG)')):
        """A photo's class and probabilities, as one line of `predict --json`: the raw image bytes as the body,
        or the multipart/form-data field `file`."""
        prevalence = prevalence or cfg.prevalence or None
        if prevalence and scorer.loaded.positive is None:
            raise Refused(400, 'prevalence: this model has no screened class to give a post-test probability for')
        if map and scorer.explain is None:
            raise Refused(400, 'map: Grad-CAM needs the PyTorch checkpoint, and this server scores an ONNX file')
        data, name = await read_upload(request, limit)
        return await run_in_threadpool(scorer.answer, data, name, prevalence, map)

    @app.get('/api/model')
    def model():
        """The model card: classes, threshold, architecture, weights, training data, validation metrics."""
        return card

    @app.get('/healthz')
    def healthz():
        return {'status': 'ok'}

    @app.get('/', include_in_schema=False)
    def page():
        return FileResponse(STATIC / 'index.html')

    app.mount('/static', StaticFiles(directory=STATIC), name='static')

    @app.exception_handler(Refused)
    async def refused(request, e):
        return JSONResponse({'error': str(e)}, e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e):
        allowed = (e.headers or {}).get('Allow')
        line = {404: NOT_FOUND, 405: f'method not allowed: this path takes {allowed}'}.get(e.status_code, str(e.detail))
        return JSONResponse({'error': line}, e.status_code, e.headers)

    @app.exception_handler(Exception)
    async def bug(request, e):  # a bug, not the request's fault: still one JSON line, and the server goes on
        say(f'error: {type(e).__name__}: {first_line(e)}')
        return JSONResponse({'error': f'internal error ({type(e).__name__}); the server goes on serving'}, 500)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e):
        first = e.errors()[0]
        return JSONResponse({'error': f'{first["loc"][-1]}: {first["msg"]}'}, 400)
    return app


# --- the server ----------------------------------------------------------------------------------------------

def listen(host, port):
    """A socket listening on host:port (0: any free port), opened before the model loads so that a port in use is
    said at once. Any host but the loopback gets a warning: the page has no authentication."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen()  # from here on a connection waits for the server instead of being refused
    except OSError as e:
        raise UserError(f'cannot serve on {host} port {port} ({e.strerror or first_line(e)}); choose another --port '
                        '(0: any free one) or --host') from e
    if host not in LOOPBACK:
        warn(f'--host {host}: the page and the API have no authentication: anyone who can reach this machine on port '
             f'{sock.getsockname()[1]} can send photos to the model')
    return sock


def serve_forever(scorer, cfg, sock):
    """The page and the API on the listening socket until Ctrl-C or SIGTERM, on which uvicorn stops taking
    connections and finishes the requests in flight (for at most 10 s). Requests are logged by RequestLog."""
    try:
        import uvicorn
        app = web_app(scorer, cfg)
    except ImportError as e:
        raise UserError(f'serve needs fastapi, uvicorn and python-multipart ({e.name} is missing): '
                        'pip install -r requirements.txt') from e
    config = uvicorn.Config(RequestLog(app), access_log=False, log_level='warning', lifespan='off',
                            timeout_graceful_shutdown=10)
    host, port = sock.getsockname()[:2]
    say(f'serving http://{f"[{host}]" if ":" in host else host}:{port}/ (API: /api/predict, /api/model; '
        'OpenAPI: /docs); Ctrl-C stops')
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn raises the signal that stopped it again, once it has shut down
        pass
    say('stopped')
