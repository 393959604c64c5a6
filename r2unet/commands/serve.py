"""``r2unet serve``: a trained model behind a web page and an HTTP API (the ``serve`` extra: FastAPI + uvicorn).

FastAPI because it is the well-kept standard for a small typed HTTP API: routing, JSON answers and an OpenAPI page
(``/docs``) come with it, and uvicorn runs it. The page is one HTML file with its own script: nothing is fetched
from a CDN, so it works on a machine without a network connection.

What a request can do is bounded before it costs anything:

- **Size.** A body is refused (413) by its ``Content-Length`` before it is read, and while it streams in as soon as it
  passes ``max_request_bytes``; each file is bounded by ``max_bytes`` and a batch by ``max_files``. The multipart
  body is parsed in memory as it arrives (python-multipart's streaming parser): at no point does the server hold
  more than the limit, and **nothing of an upload is ever written to disk**, so a killed server leaves nothing behind.
- **Who may ask.** The ``Host`` header must be a name of this server (a DNS-rebinding page reaches 127.0.0.1 under
  its own name), and a browser's cross-site POST (its ``Origin`` or ``Sec-Fetch-Site``) is refused unless its
  origin is allowed (``--allowed_origins``, which also answers it with CORS headers). Scripts such as curl send no
  ``Origin`` and are served.
- **Pixels.** An image over the pixel limit (``data.io.max_pixels``) is refused from its header (413).

Every request runs ``predict``'s code (the ``Segmenter``'s steps), in memory, so the mask the API returns is, byte
for byte, the file ``predict`` writes for the same image and flags. The model is loaded once; requests that arrive
together run as one batch (``Batcher``). Bad input is a 4xx, a failure of the server a 500, both JSON with a
``detail`` the page shows.
"""

import base64
import io
import logging
import math
import queue
import socket
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from PIL import Image

from ..data.imageio import DataError, InMemory
from ..engine.inference import OUTPUT_SUFFIXES, Segmenter, default_workers

PAGE = Path(__file__).with_name("serve_page.html")
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
_log = logging.getLogger("r2unet.serve")


class BadInput(ValueError):
    """A request the server refuses: ``status`` (400, 403, 413 or 415) and the reason."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Batcher:
    """Requests that arrive together run as one batch: each request's own thread decodes its image, a worker thread
    takes the images waiting (at most ``max_batch``) through one forward pass (``Segmenter.forward``), and each
    request's thread resizes and encodes its own answer, so decoding and encoding overlap the network as in
    ``predict``. Under load (a batch just ran) the worker waits up to ``wait_s`` for more; a request to an idle
    server runs at once. Each answer is the same bytes ``predict`` writes for that image, whatever it was batched
    with (the networks score each image on its own)."""

    def __init__(self, segmenter: Segmenter, tta: bool = False, max_batch: int | None = None,
                 wait_s: float = 0.005):
        self.segmenter, self.tta, self.wait_s = segmenter, tta, wait_s
        self.max_batch = max_batch or segmenter.batch_size
        self.queue: queue.Queue = queue.Queue()
        self.batches: list[int] = []  # sizes of the batches run, for tests and /health
        # as many requests decode or encode at once as predict has threads for it: more only fight the network
        self.workers = threading.Semaphore(default_workers())
        threading.Thread(target=self._serve, name="r2unet-batcher", daemon=True).start()

    def run(self, upload: InMemory, overlay: bool, probabilities: bool) -> dict[str, bytes]:
        """The upload's files; its DataError when it cannot be read."""
        with self.workers:
            size, image = self.segmenter.decode(upload)
        done: Future = Future()
        self.queue.put((image, done))
        logits = done.result()
        with self.workers, torch.inference_mode():
            return self.segmenter.render(upload, image, self.segmenter.finish(logits, size), overlay, probabilities)

    def _serve(self) -> None:
        idle_since = 0.0
        while True:
            batch = [self.queue.get()]
            # under load, wait a little for company; a request to an idle server runs at once
            deadline = time.monotonic() + (self.wait_s if time.monotonic() - idle_since < self.wait_s else 0.0)
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                                 if deadline > time.monotonic() else self.queue.get_nowait())
                except queue.Empty:
                    break
            self.batches.append(len(batch))
            try:
                with torch.inference_mode():
                    answers = self.segmenter.forward([image for image, _ in batch], self.tta)
            except Exception as exc:  # noqa: BLE001 - a failure of the model: each request of the batch hears it
                for _, done in batch:
                    done.set_exception(exc)
            else:
                for (_, done), logits in zip(batch, answers):
                    done.set_result(logits)
            idle_since = time.monotonic()


class Service:
    """One model (or ensemble) for the server's life, what a request may send it (``max_bytes`` per file,
    ``max_request_bytes`` per request, ``max_files`` per batch), and what a request asks of it:
    ``segment(data, name)``, run in batches with the requests that arrive with it (``Batcher``)."""

    def __init__(self, segmenter: Segmenter, tta: bool = False, max_bytes: int = 50 * 2**20,
                 max_request_bytes: int | None = None, max_files: int = 16, max_batch: int | None = None,
                 batch_wait_s: float = 0.005):
        self.segmenter, self.tta, self.max_bytes = segmenter, tta, max_bytes
        self.max_request_bytes = max_request_bytes or 2 * max_bytes
        self.max_files = max_files
        self.batcher = Batcher(segmenter, tta, max_batch, batch_wait_s)

    def info(self) -> dict:
        cfg, task = self.segmenter.cfg, self.segmenter.task
        return {"status": "ok", "model_type": cfg.model_type, "models": len(self.segmenter.members),
                "num_classes": task.classes, "classes": list(task.class_names), "task": task.description,
                "input_size": self.segmenter.image_size, "threshold": self.segmenter.threshold,
                "postprocessing": self.segmenter.post.describe(),
                "runs": [m.runs for m in self.segmenter.members],
                "tta": self.tta, "device": str(self.segmenter.device), "max_bytes": self.max_bytes,
                "max_request_bytes": self.max_request_bytes, "max_files": self.max_files,
                "max_batch": self.batcher.max_batch}

    def segment(self, data: bytes | bytearray, name: str, overlay: bool = False, probabilities: bool = False,
                area: bool = True) -> dict:
        """The mask PNG (and the overlay JPEG) of one uploaded image, as ``predict`` writes them, and its area
        (``area``; a PNG answer needs none); ``probabilities``: a summary of the probability map too (binary
        models)."""
        if not data:
            raise BadInput(400, f"{name}: empty file")
        if len(data) > self.max_bytes:
            raise BadInput(413, f"{name}: {_mib(len(data))} is over the limit of {_mib(self.max_bytes)} per file "
                                "(r2unet serve --max_mb)")
        _check_format(data, name)
        task = self.segmenter.task
        probabilities = probabilities and task.probability_maps
        try:
            files = self.batcher.run(InMemory(name, data), overlay, probabilities)
        except DataError as exc:
            message = str(exc).split("\n  ")[-1]
            raise BadInput(413 if "too large" in message else 400, message) from None
        mask = files[OUTPUT_SUFFIXES[0]]
        result = {"file": name, "mask_png": mask, **(task.area(_pixels(mask)) if area else {})}
        if overlay:
            result["overlay_jpg"] = files[OUTPUT_SUFFIXES[2]]
        if probabilities:
            probs = _pixels(files[OUTPUT_SUFFIXES[1]]).astype(np.float64) / 255  # predict --save_probs, 8-bit
            result["probability"] = task.summary(probs, self.segmenter.threshold)
        return result


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _pixels(png: bytes) -> np.ndarray:
    """The values of a PNG the server made (a mask, a probability map)."""
    with Image.open(io.BytesIO(png)) as img:
        return np.asarray(img)


def _check_format(data: bytes, name: str) -> None:
    """415 for bytes that are no image format PIL can identify (a text file, a PDF), from the header only."""
    try:
        with Image.open(io.BytesIO(data)):
            pass
    except Image.DecompressionBombError:
        return  # an image, and too large: the pixel limit names it
    except Exception:  # noqa: BLE001 - whatever PIL cannot identify is not an image
        raise BadInput(415, f"{name}: not an image file (cannot identify its format; JPEG, PNG, BMP or TIFF "
                            "expected)") from None


# ------------------------------------------------------------------------------------------------ request bodies
class _Parts:
    """The parts of a multipart body as it streams in, kept in memory, each bounded as it grows."""

    def __init__(self, service: Service):
        self.limits = service
        self.parts: list[tuple[str, str, bytearray]] = []
        self._field, self._value, self._headers = b"", b"", {}

    def callbacks(self) -> dict:
        def header_field(data, start, end):
            self._field += data[start:end]

        def header_value(data, start, end):
            self._value += data[start:end]

        def header_end():
            self._headers[self._field.decode("latin-1").lower()] = self._value.decode("latin-1")
            self._field, self._value = b"", b""

        def headers_finished():
            from python_multipart.multipart import parse_options_header

            _, options = parse_options_header(self._headers.get("content-disposition", ""))
            field = options.get(b"name", b"").decode("utf-8", "replace")
            filename = options.get(b"filename", b"upload").decode("utf-8", "replace") or "upload"
            if len(self.parts) >= self.limits.max_files:
                raise BadInput(413, f"more than {self.limits.max_files} files in one request (r2unet serve "
                                    "--max_files)")
            self.parts.append((field, filename[:200], bytearray()))
            self._headers = {}

        def data(chunk, start, end):
            field, filename, body = self.parts[-1]
            if len(body) + end - start > self.limits.max_bytes:
                raise BadInput(413, f"{filename}: over the limit of {_mib(self.limits.max_bytes)} per file "
                                    "(r2unet serve --max_mb)")
            body += chunk[start:end]

        return {"on_header_field": header_field, "on_header_value": header_value, "on_header_end": header_end,
                "on_headers_finished": headers_finished, "on_part_data": data}


async def read_parts(request, service: Service) -> list[tuple[str, str, bytearray]]:
    """(field, file name, bytes) of each part of a multipart request, read within the limits: the declared
    ``Content-Length`` first, then every chunk as it arrives; nothing touches the disk, nothing is copied."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    kind, options = parse_options_header(request.headers.get("content-type", ""))
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise BadInput(415, "send the image as multipart/form-data (curl -F file=@photo.jpg URL)")
    limit = service.max_request_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BadInput(413, f"the request's {_mib(int(declared))} are over the limit of {_mib(limit)} "
                            "(r2unet serve --max_request_mb); nothing was read")
    parts = _Parts(service)
    parser = MultipartParser(options[b"boundary"], parts.callbacks())
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise BadInput(413, f"the request is over the limit of {_mib(limit)} (r2unet serve --max_request_mb); "
                                "reading stopped there")
        parser.write(chunk)
    parser.finalize()
    return parts.parts


# ---------------------------------------------------------------------------------------------- who may ask
def _host_name(value: str) -> str:
    """The name in a Host header or an origin's authority, without the port and brackets, lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def default_hosts(bind: str) -> set[str]:
    """The Host names a server bound to ``bind`` answers to: the loopback names, the bound address, and, when it
    serves the network, this machine's names and addresses."""
    hosts = set(LOOPBACK) | {_host_name(bind)}
    if bind not in LOOPBACK:
        for name in {socket.gethostname(), socket.getfqdn()}:
            hosts.add(name.lower())
            try:
                hosts.update(socket.gethostbyname_ex(name)[2])
            except OSError:
                pass
    return hosts


class RequestGuard:
    """ASGI middleware: a request whose Host is none of ``hosts`` (None: any), or a browser's cross-site request
    that changes something (POST) from an origin not in ``origins`` ("*": any), is refused with a JSON 403 before
    the application sees it."""

    SAFE = frozenset({"GET", "HEAD", "OPTIONS"})

    def __init__(self, app, hosts: set[str] | None, origins: set[str]):
        self.app, self.hosts, self.origins = app, hosts, origins

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            problem = self.problem(scope)
            if problem:
                from starlette.responses import JSONResponse

                await JSONResponse({"detail": problem}, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def problem(self, scope) -> str | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if self.hosts is not None and _host_name(host) not in self.hosts:
            return (f"host name {host[:100]!r} is not one this server answers to (serve --allowed_hosts NAME adds "
                    "it); a web page that renamed this server to reach it is refused")
        if scope.get("method", "GET") in self.SAFE or "*" in self.origins:
            return None
        origin = headers.get("origin")
        cross = headers.get("sec-fetch-site") == "cross-site"
        if origin is not None:
            own = origin.lower().split("://", 1)[-1].rstrip("/") == host.lower()
            cross = cross or not own
        if cross and (origin or "").rstrip("/") not in self.origins:
            return (f"a cross-site request from {(origin or 'another site')[:100]} is refused (serve "
                    "--allowed_origins ORIGIN allows a page elsewhere to use this server)")
        return None


# ----------------------------------------------------------------------------------------------- the application
UPLOAD_SCHEMA = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {"file": {"type": "string", "format": "binary", "description": "the image"}}}}}}}
BATCH_SCHEMA = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["files"],
    "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}}


def create_app(service: Service, hosts: set[str] | None = None, origins: set[str] | None = None):
    """The FastAPI application: the page at ``/``, ``POST /predict``, ``POST /predict/batch``, ``GET /health``,
    behind ``RequestGuard`` (``hosts`` None: the loopback names; ``origins``: cross-site origins allowed)."""
    from fastapi import FastAPI, Query, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    app = FastAPI(title="r2unet", description="Segment images with a trained R2U-Net family model. POST an image "
                  "to /predict: the mask PNG at the image's size (as `r2unet predict` writes it).")
    origins = set(origins or ())

    @app.exception_handler(BadInput)
    async def refused(request, exc: BadInput):
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(Exception)
    async def failed(request, exc: Exception):
        _log.exception("request %s %s failed", request.method, request.url.path)
        return JSONResponse({"detail": f"the server failed on this request ({type(exc).__name__}: "
                                       f"{str(exc)[:300]}); its log has the details"}, status_code=500)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return PAGE.read_text()

    @app.get("/health")
    def health() -> dict:
        """The model served: its name, classes, input size, threshold, device and the request limits."""
        return service.info()

    @app.post("/predict", responses={200: {"content": {"image/png": {}}}}, openapi_extra=UPLOAD_SCHEMA)
    async def predict(request: Request, format: Annotated[str, Query(pattern="^(png|json)$")] = "png",
                      images: Annotated[bool, Query(description="json: the mask PNG and overlay JPEG too "
                                                                "(base64)")] = False):
        """The mask PNG at the image's original size; ``format=json``: its area and size and a summary of the
        probabilities (``images=true``: the mask and the overlay too, as base64 - what the page shows)."""
        parts = await read_parts(request, service)
        files = [p for p in parts if p[0] == "file"] or parts
        if len(files) != 1:
            raise BadInput(400, "send one image in the field 'file' (several: POST /predict/batch with 'files')")
        _, name, data = files[0]
        result = await run_in_threadpool(service.segment, data, name, format == "json" and images,
                                         format == "json", format == "json")
        if format == "png":
            return Response(result["mask_png"], media_type="image/png")
        return JSONResponse(_json(result, images))

    @app.post("/predict/batch", openapi_extra=BATCH_SCHEMA)
    async def predict_batch(request: Request) -> list[dict]:
        """Several images in one request: per file its area and mask PNG (base64), or its error."""
        answers = []
        for _, name, data in await read_parts(request, service):
            try:
                answers.append(_json(await run_in_threadpool(service.segment, data, name), images=True))
            except BadInput as exc:
                answers.append({"file": name, "error": str(exc), "status": exc.status})
        return answers

    guarded = RequestGuard(app, default_hosts("127.0.0.1") if hosts is None else hosts, origins)
    if not origins:
        return guarded
    from starlette.middleware.cors import CORSMiddleware  # allowed origins may also read the answers

    return CORSMiddleware(guarded, allow_origins=["*"] if "*" in origins else sorted(origins),
                          allow_methods=["GET", "POST"])


def _json(result: dict, images: bool) -> dict:
    out = {k: v for k, v in result.items() if not k.endswith(("_png", "_jpg"))}
    if images:
        out.update({k: base64.b64encode(v).decode() for k, v in result.items() if k.endswith(("_png", "_jpg"))})
    return out


def _names(values: str | None) -> set[str]:
    return {v.strip() for v in (values or "").split(",") if v.strip()}


def serve(checkpoints, host: str = "127.0.0.1", port: int = 8000, device: str = "auto", tta: bool = False,
          max_mb: float = 50, log=print, max_request_mb: float | None = None, max_files: int = 16,
          allowed_hosts: str | None = None, allowed_origins: str | None = None,
          max_batch: int | None = None, batch_wait_ms: float = 5, **segmenter_options) -> None:
    """``r2unet serve``: load the model (or the models of an ensemble), then serve until Ctrl-C.
    ``allowed_hosts``, ``allowed_origins``: comma lists added to the Host names this server answers to and the
    origins whose pages may use it ("*": any); ``max_batch``, ``batch_wait_ms``: requests that arrive within that
    many milliseconds of each other run as one batch of at most that many images."""
    for flag, value in (("--max_mb", max_mb), ("--max_request_mb", max_request_mb)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{flag}: must be a positive number of MiB, got {value:g}")
    if max_request_mb is not None and max_request_mb < max_mb:
        raise ValueError(f"--max_request_mb {max_request_mb:g} is below --max_mb {max_mb:g}: no file could be sent")
    if max_files < 1:
        raise ValueError(f"--max_files: must be >= 1, got {max_files}")
    if not 0 <= batch_wait_ms < 10_000:
        raise ValueError(f"--batch_wait_ms: must be between 0 and 10000, got {batch_wait_ms:g}")
    if not 0 <= port <= 65535:
        raise ValueError(f"--port: must be between 0 and 65535, got {port}")
    try:
        import uvicorn
    except ImportError:
        raise ValueError("serve needs FastAPI and uvicorn: pip install 'r2unet[serve]'") from None
    service = Service(Segmenter(checkpoints, device=device, log=log, **segmenter_options), tta=tta,
                      max_bytes=int(max_mb * 2**20),
                      max_request_bytes=int(max_request_mb * 2**20) if max_request_mb else None,
                      max_files=max_files, max_batch=max_batch, batch_wait_s=batch_wait_ms / 1000)
    extra_hosts = _names(allowed_hosts)
    hosts = None if "*" in extra_hosts else default_hosts(host) | {_host_name(h) for h in extra_hosts}
    log(f"serving {service.info()['model_type']} on http://{host}:{port}/ (the page; API: POST /predict, docs: "
        f"/docs)" + ("; only this machine can reach it: --host 0.0.0.0 serves the network (put it behind a proxy "
                     "with TLS and authentication first)" if host in LOOPBACK else "")
        + ("; answering to host names " + ", ".join(sorted(hosts)) + " (--allowed_hosts adds others)"
           if hosts is not None and host not in LOOPBACK else ""))
    uvicorn.run(create_app(service, hosts, _names(allowed_origins)), host=host, port=port, log_level="warning")
