"""``imgcls serve``: a model behind a small web page and a JSON API, for colleagues on the network.

* ``POST /predict``: images in the multipart field ``file`` (repeatable) -> one JSON entry per image, in
  order: its name, the top-k labels with probabilities (``?top_k=5``), the decision after the run's
  thresholds, or an ``error``.  The status is 200 when at least one image was predicted (the others carry
  their error); when none was, 415 if every file is not an image or in an unsupported format, else 422.
  A body over ``max_upload_mb`` is 413, and so are more than ``max_files`` files.
* ``GET /health`` (and the engine's batch-size histogram), ``GET /info``, ``GET /`` (the page, shipped in
  ``imgcls/web``), ``GET /docs`` (Swagger UI from the ``swagger-ui-py`` package's files, never a CDN).

Uploads stay in memory: the multipart body is parsed here with python-multipart as it arrives, counted
against the limit, and never spooled to a temporary file (Starlette's form parser would spool files above
1 MB).  Decoding runs in a thread pool off the event loop; a :class:`Batcher` gathers the decoded images of
concurrent requests for a few milliseconds into engine calls, one per CPU at once (``--engine-workers``), each
on one ONNX Runtime thread (``--engine-threads``).
"""

from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import uvicorn
from fastapi import FastAPI, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.requests import ClientDisconnect
from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header

from .data.decode import ImageError, load_uint8_bytes
from .errors import UserError
from .evaluation.thresholds import decide
from .prediction.engines import imgcls_version
from .prediction.predict import Predictor, load
from .system import available_cpus, default_workers

log = logging.getLogger("imgcls")

FIELD = "file"
WEB = Path(__file__).parent / "web"
# reasons of an image that is no image we can read at all (415); any other failure is 422
UNSUPPORTED_REASONS = ("not an image", "unsupported format")


@dataclass(frozen=True)
class Limits:
    """What one server accepts and how it batches; the CLI's serve options (None there: these defaults)."""

    max_upload_mb: float = 20.0     # one request's whole body
    max_files: int = 32             # images in one request
    batch_size: int = 8             # images per engine call at most
    batch_wait_ms: float = 5.0      # how long the first image of a batch waits for company
    engine_threads: int = 1         # ONNX Runtime threads of one engine call
    engine_workers: int | None = None  # engine calls at once (None: see Limits.workers)

    def __post_init__(self):
        rules = (("--max-upload-mb", self.max_upload_mb > 0, "above 0"), ("--max-files", self.max_files >= 1, "at least 1"),
                 ("--batch-size", self.batch_size >= 1, "at least 1"),
                 ("--batch-wait-ms", self.batch_wait_ms >= 0, "at least 0"),
                 ("--engine-threads", self.engine_threads >= 1, "at least 1"),
                 ("--engine-workers", self.engine_workers is None or self.engine_workers >= 1, "at least 1"))
        for flag, ok, rule in rules:
            if not ok:
                raise UserError(f"{flag} must be {rule}, not {getattr(self, flag[2:].replace('-', '_'))}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def workers(self, predictor: Predictor) -> int:
        """Engine calls at once: by default, as many as the engine's threads fit in the CPUs (1 on torch,
        which spreads one call over every CPU itself)."""
        if self.engine_workers is not None:
            return self.engine_workers
        threads = getattr(predictor.engine, "threads", None)  # OnnxEngine's intra-op threads
        return max(1, available_cpus() // threads) if threads else 1


class RequestError(Exception):
    """A request refused as a whole: an HTTP status and what to do about it."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


# --------------------------------------------------------------------------- batching


class Batcher:
    """Gathers single images from concurrent requests into engine batches.

    The first image of a batch waits at most ``wait_s`` for others (up to ``batch_size``); images that
    arrive while every engine worker is busy form the next batch.  Up to ``workers`` engine calls run at
    once, each in a thread of its own, so the event loop keeps accepting uploads meanwhile.  On CPUs,
    calls side by side with one ONNX Runtime thread each spend less CPU per image than one call spread
    over every core, which leaves more of the cores to decoding (docs/decisions.md).
    """

    def __init__(self, predictor: Predictor, batch_size: int, wait_s: float, workers: int = 1):
        self.predictor, self.batch_size, self.wait_s, self.workers = predictor, batch_size, wait_s, workers
        self.sizes: Counter[int] = Counter()  # batch size -> engine calls
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._slots: asyncio.Semaphore | None = None
        self._calls: set[asyncio.Task] = set()
        self._engine = ThreadPoolExecutor(workers, thread_name_prefix="imgcls-engine")

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._slots = asyncio.Semaphore(self.workers)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        for task in (self._task, *self._calls):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (self._task, *self._calls) if t is not None), return_exceptions=True)
        self._engine.shutdown(wait=True)

    async def probabilities(self, image: np.ndarray) -> np.ndarray:
        """uint8 (3, S, S) -> probabilities (K,), computed in some batch."""
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((image, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()  # a batch forms only once an engine worker is free to take it
            items = [await self._queue.get()]
            deadline = loop.time() + self.wait_s
            while len(items) < self.batch_size:
                try:
                    items.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self._queue.get(), left))
                except TimeoutError:
                    break
            call = loop.create_task(self._call(items))
            self._calls.add(call)
            call.add_done_callback(self._calls.discard)

    async def _call(self, items: list) -> None:
        try:
            batch = np.stack([image for image, _ in items])
            probs = await asyncio.get_running_loop().run_in_executor(self._engine, self.predictor.predict_proba, batch)
        except Exception as exc:  # noqa: BLE001 - each waiting request answers it (500), the batcher goes on
            log.exception("engine call failed")
            for _, future in items:
                if not future.done():
                    future.set_exception(exc)
            return
        finally:
            self._slots.release()
        self.sizes[len(items)] += 1
        for row, (_, future) in zip(probs, items):
            if not future.done():  # its request may have gone (client disconnected)
                future.set_result(row)

    def stats(self) -> dict:
        calls = sum(self.sizes.values())
        images = sum(size * n for size, n in self.sizes.items())
        return {"engine_calls": calls, "images": images, "mean_batch": round(images / calls, 3) if calls else 0.0,
                "batch_sizes": {str(size): self.sizes[size] for size in sorted(self.sizes)}}


# --------------------------------------------------------------------------- reading uploads


class _Uploads:
    """python-multipart callbacks that keep the parts of field ``file`` in memory, as (name, bytes)."""

    def __init__(self, max_files: int):
        self.max_files = max_files
        self.files: list[tuple[str, bytearray]] = []
        self._headers: dict[bytes, bytes] = {}
        self._field, self._value = b"", b""
        self._current: bytearray | None = None

    def callbacks(self) -> dict:
        return {"on_part_begin": self._begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._data}

    def _begin(self) -> None:
        self._headers, self._current = {}, None

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field, self._value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if options.get(b"name", b"").decode("utf-8", "replace") != FIELD:
            return  # other fields are ignored (they still count against the size limit)
        if len(self.files) >= self.max_files:
            raise RequestError(413, f"too many files: at most {self.max_files} images per request"
                                    " (send the rest in another request, or start the server with --max-files)")
        name = options.get(b"filename", b"").decode("utf-8", "replace") or f"{FIELD}{len(self.files) + 1}"
        self._current = bytearray()
        self.files.append((name, self._current))

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._current is not None:
            self._current += data[start:end]


def _too_large(limits: Limits) -> RequestError:
    return RequestError(413, f"upload too large: at most {limits.max_upload_mb:g} MB per request (send fewer or"
                             " smaller images, or start the server with --max-upload-mb)")


async def read_uploads(request: Request, limits: Limits) -> list[tuple[str, bytes]]:
    """The request's images as (name, bytes), in order; a :class:`RequestError` for a request refused whole."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limits.max_upload_bytes:
        raise _too_large(limits)  # before a byte of the body is read
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or not params.get(b"boundary"):
        raise RequestError(415, f"send images as multipart/form-data in the field {FIELD!r}"
                                f" (curl -F {FIELD}=@photo.jpg)")
    uploads = _Uploads(limits.max_files)
    parser = MultipartParser(params[b"boundary"], uploads.callbacks())
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limits.max_upload_bytes:  # Content-Length may be missing (chunked) or lie
                raise _too_large(limits)
            parser.write(chunk)
        parser.finalize()
    except FormParserError as err:
        raise RequestError(400, f"malformed multipart body ({err})") from None
    except ClientDisconnect:  # nobody is left to answer: no traceback in the log
        raise RequestError(400, "the client went away during the upload") from None
    if not uploads.files:
        raise RequestError(422, f"no images: send them in the multipart field {FIELD!r}")
    return [(name, bytes(data)) for name, data in uploads.files]


# --------------------------------------------------------------------------- the app


def _status(results: list[dict]) -> int:
    if any(r["error"] is None for r in results):
        return 200
    return 415 if all(r["error"].startswith(UNSUPPORTED_REASONS) for r in results) else 422


def _docs_page(title: str) -> HTMLResponse:
    if importlib.util.find_spec("swagger_ui") is None:
        return HTMLResponse(f"<!doctype html><title>{title}</title><p>The interactive API page needs the"
                            " swagger-ui-py package (<code>pip install 'imgcls[serve]'</code>). The API description"
                            " is at <a href=\"openapi.json\">/openapi.json</a>.</p>")
    return get_swagger_ui_html(openapi_url="openapi.json", title=title,
                               swagger_js_url="docs-assets/swagger-ui-bundle.js",
                               swagger_css_url="docs-assets/swagger-ui.css",
                               swagger_favicon_url="docs-assets/favicon-32x32.png")


_UPLOAD_SCHEMA = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": [FIELD],
    "properties": {FIELD: {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}}


def create_app(predictor: Predictor, limits: Limits | None = None) -> FastAPI:
    """The ASGI app serving ``predictor`` (its thresholds make the decisions)."""
    limits = limits or Limits()
    batcher = Batcher(predictor, limits.batch_size, limits.batch_wait_ms / 1000, limits.workers(predictor))
    decoders = ThreadPoolExecutor(default_workers(), thread_name_prefix="imgcls-decode")
    counts = Counter()

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            await batcher.stop()
            decoders.shutdown(wait=False, cancel_futures=True)

    title = f"imgcls serve: {predictor.model_name or 'model'}"
    app = FastAPI(title=title, version=imgcls_version(), docs_url=None, redoc_url=None, lifespan=lifespan,
                  description="Classify images with an imgcls model. The page is at /.")
    app.state.batcher = batcher
    app.mount("/static", StaticFiles(directory=WEB), name="static")
    swagger = importlib.util.find_spec("swagger_ui")
    if swagger is not None:
        app.mount("/docs-assets", StaticFiles(directory=Path(swagger.submodule_search_locations[0]) / "static"),
                  name="docs-assets")

    @app.exception_handler(RequestError)
    async def _refused(request: Request, exc: RequestError):
        counts["refused"] += 1
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    async def one(name: str, data: bytes, top_k: int) -> dict:
        entry = {"name": name, "label": None, "prob": None, "top_k": [], "decision": None, "error": None}
        try:
            image = await asyncio.get_running_loop().run_in_executor(
                decoders, load_uint8_bytes, data, predictor.preprocess, name)
        except ImageError as err:
            entry["error"] = err.reason
            return entry
        probs = await batcher.probabilities(image)
        ranked = np.argsort(-probs, kind="stable")[:top_k]
        entry["top_k"] = [{"label": predictor.labels[i], "prob": float(probs[i])} for i in ranked]
        entry["label"], entry["prob"] = entry["top_k"][0]["label"], entry["top_k"][0]["prob"]
        entry["decision"] = decide(entry["label"], entry["prob"], predictor.thresholds)
        return entry

    @app.post("/predict", openapi_extra=_UPLOAD_SCHEMA, summary="classify uploaded images",
              responses={413: {"description": "body over the size limit, or too many files"},
                         415: {"description": "no image could be read: none is an image in a supported format"},
                         422: {"description": "no image could be read (corrupt, truncated, too large), or none sent"}})
    async def predict(request: Request, top_k: int = Query(5, ge=1, description="labels per image")):
        """Images in the multipart field `file` (repeatable) -> one entry per image, in order.

        An image that cannot be read gets an `error` and the others are still answered (status 200);
        only when no image could be read is the status 415 (not images) or 422 (corrupt, truncated...)."""
        uploads = await read_uploads(request, limits)
        k = min(top_k, len(predictor.labels))
        results = await asyncio.gather(*(one(name, data, k) for name, data in uploads))
        counts["requests"] += 1
        counts["images"] += len(results)
        counts["errors"] += sum(r["error"] is not None for r in results)
        return JSONResponse({"results": results}, status_code=_status(results))

    @app.get("/health", summary="liveness and counters (the engine's batch sizes)")
    async def health():
        return {"status": "ok", "requests": counts["requests"], "images": counts["images"],
                "image_errors": counts["errors"], "refused": counts["refused"], "engine": batcher.stats()}

    @app.get("/info", summary="the model, its preprocessing and the server's limits")
    async def info():
        return {"model": predictor.model_name, "labels": predictor.labels,
                "preprocess": predictor.preprocess.to_dict(), "thresholds": predictor.thresholds,
                "engine": predictor.backend, "imgcls_version": imgcls_version(),
                "limits": {**asdict(limits), "engine_workers": batcher.workers,
                           "max_upload_bytes": limits.max_upload_bytes, "field": FIELD}}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(WEB / "index.html", media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return _docs_page(title)

    return app


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None,
          backend: str = "auto", precision: str = "auto") -> None:
    """Load ``model`` (a run directory or model file) and serve it until Ctrl-C.  ``precision``: which of a
    run's ONNX files runs, as for predict (:func:`imgcls.prediction.predict.load`)."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port must lie between 0 and 65535, not {port}")
    limits = limits or Limits()
    predictor = load(model, backend=backend, precision=precision, threads=limits.engine_threads)
    app = create_app(predictor, limits)
    if not _is_loopback(host):
        log.warning("serving on %s: anyone who can reach this machine can use the model (there is no login)", host)
    log.info("model %s (%d classes, %s); open http://%s:%d/ in a browser", predictor.model_name or model,
             len(predictor.labels), predictor.backend, host if ":" not in host else f"[{host}]", port)
    uvicorn.run(app, host=host, port=port, log_level=logging.getLevelName(log.getEffectiveLevel()).lower(),
                timeout_graceful_shutdown=5)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
