"""`replicate serve`'s app: the routes, what they share (`State`: the models, the batcher, the
flags) and the metrics, in front of which `gate.Gate` stands.

    python -c "from replicate.serving import app; help(app.create_app)"

FastAPI (on Starlette) for the OpenAPI schema it writes from the routes (/openapi.json, /docs).
The models are loaded once (`engine.model_set.ModelSet`: `predict`'s engine), uploads are checked
and decoded in a bounded thread pool (`uploads`), and photos from concurrent requests are run
together (`batching.Batcher`). Every refusal is an `uploads.Refusal`, answered as one line of JSON.
"""

from __future__ import annotations

import asyncio
import signal
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from .. import runtime
from ..config import ServeOptions as Options
from ..engine.model_set import ModelSet
from . import answers, uploads
from .batching import Batcher, Expired, QueueFull
from .gate import Gate, log_line
from .uploads import Refusal


class State:
    """What the routes share: the models (swapped whole by a reload), the batcher, the flags."""

    def __init__(self, options: Options):
        self.options = options
        self.models: ModelSet | None = None
        self.ready = self.draining = False
        self.in_flight = 0
        threads = runtime.workers(options.workers)  # 0: decode on the event loop itself
        self.decoding = ThreadPoolExecutor(threads, "decode") if threads else None
        self.metrics = Metrics()
        self.batcher = Batcher(
            lambda models, batch: models.infer([photo["arrays"] for photo in batch]),
            max_batch=options.max_batch,
            max_wait=options.max_wait_ms / 1000,
            max_queue=options.max_queue,
            timeout=options.timeout,
            on_batch=self.metrics.batch.observe,
        )

    async def tag(self, data: bytes, models: ModelSet) -> tuple[dict, dict]:
        """(the photo's facts, its probabilities per model) for one upload already admitted."""
        args = (data, models.geometries, self.options.max_pixels)
        if self.decoding is None:
            photo = uploads.prepare(*args)
        else:
            loop = asyncio.get_running_loop()
            photo = await loop.run_in_executor(self.decoding, uploads.prepare, *args)
        try:
            probs = await self.batcher.submit(photo, models)
        except Expired as e:
            raise Refusal(504, f"dropped before it was run: {e}") from None
        return {k: v for k, v in photo.items() if k != "arrays"}, probs

    def admit(self, n: int) -> None:
        try:
            self.batcher.admit(n)
        except QueueFull as e:
            raise Refusal(429, str(e), {"Retry-After": "1"}) from None
        self.metrics.queue.set(self.batcher.admitted)

    def release(self, n: int) -> None:
        self.batcher.release(n)
        self.metrics.queue.set(self.batcher.admitted)

    def load(self) -> ModelSet:
        """The models loaded and warmed up (a ReplicateError when one fails)."""
        models = ModelSet(list(self.options.models))
        models.warm_up()
        return models


class Metrics:
    """Prometheus metrics in a registry of this server's own (prometheus-client)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "replicate_requests", "HTTP requests", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "replicate_request_seconds", "Request latency", ["route"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )  # fmt: skip
        self.batch = Histogram(
            "replicate_batch_photos", "Photos per model batch", registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        )  # fmt: skip
        self.queue = Gauge(
            "replicate_queue_photos", "Photos in hand: decoding, waiting or running",
            registry=self.registry,
        )  # fmt: skip

    def text(self) -> bytes:
        return generate_latest(self.registry)


def create_app(options: Options, state: State | None = None):
    """The ASGI app; `state` is created here unless given (the server keeps one to drain it)."""
    state = state or State(options)

    @asynccontextmanager
    async def lifespan(app):
        state.batcher.start()
        loop = asyncio.get_running_loop()
        if state.models is None:  # `serve` loads them before it listens, so errors are one line
            state.models = await loop.run_in_executor(None, state.load)
        state.ready = True
        try:
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload()))
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (tests)
            pass
        names = ", ".join(m.name for m in state.models.models)
        files = ", ".join(dict.fromkeys(str(m.path) for m in state.models.models))
        log_line(
            f"ready: {len(state.models.models)} model(s) ({names}) from {files}, on "
            f"{len(state.models.groups)} body pass(es), http://{options.host}:{options.port}"
        )
        yield
        await state.batcher.stop()
        if state.decoding is not None:
            state.decoding.shutdown(wait=False)

    async def reload():
        """SIGHUP: the models again from their folders; the old ones answer what is in hand."""
        try:
            new = await asyncio.get_running_loop().run_in_executor(None, state.load)
        except Exception as e:  # a model that does not load: keep serving the ones loaded
            log_line(f"error: reload failed, still serving the models loaded before: {e}")
            return
        state.models = new
        log_line(
            "reloaded: " + ", ".join(f"{m['name']} {m['sha256'][:12]}" for m in new.describe())
        )

    app = FastAPI(
        title="replicate",
        summary="Tags real-estate listing photos with replicate's trained models.",
        lifespan=lifespan,
    )

    def error(status: int, message: str, headers: dict | None = None):
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(Refusal)
    async def refused(request, e: Refusal):
        return error(e.status, e.message, e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return error(e.status_code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error(422, f"{where}: {first.get('msg', 'invalid request')}")

    async def read_photo(request: Request) -> bytes:
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form(max_files=2, max_fields=10)
            files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
            if len(files) != 1:
                raise Refusal(
                    422, f"send one photo: the raw body, or one multipart file (got {len(files)})"
                )
            return await files[0].read()
        return await request.body()

    @app.post("/v1/photos", summary="Tag one photo (the raw body, or one multipart file)")
    async def tag_photo(request: Request):
        """For each model: its class, probabilities and, for a search filter, has_<attribute>
        with the threshold used; and the photo's SHA-256, format, width and height (upright)."""
        data = await read_photo(request)
        if not data:
            raise Refusal(422, "the body is empty: send a photo")
        models = state.models
        state.admit(1)
        try:
            photo, probs = await state.tag(data, models)
        finally:
            state.release(1)
        request.state.photos = 1
        return JSONResponse({**photo, "models": answers.photo(models, probs)})

    @app.post("/v1/listings/{listing_id}", summary="Tag a listing's photos (multipart)")
    async def tag_listing(listing_id: str, request: Request):
        """Each photo as /v1/photos gives it, or its own `error`; and the listing's tags by the
        listing rule, as `predict`'s tags_listings table has them."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise Refusal(422, "send the listing's photos as multipart/form-data files")
        too_many = Refusal(413, f"a listing takes at most --max-photos {options.max_photos} photos")
        try:  # Starlette stops reading at max_files (its 400): the same refusal however many
            form = await request.form(max_files=options.max_photos, max_fields=10)
        except HTTPException as e:
            raise too_many if "Too many files" in str(e.detail) else e from None
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            raise Refusal(422, "the listing has no photos: send them as multipart files")
        datas = [await f.read() for f in files]
        models = state.models
        state.admit(len(datas))
        try:
            done = await asyncio.gather(
                *(state.tag(d, models) for d in datas), return_exceptions=True
            )
        finally:
            state.release(len(datas))
        for result in done:
            if not isinstance(result, Refusal) and isinstance(result, BaseException):
                raise result
        names = [f.filename or f"photo-{i}" for i, f in enumerate(files)]
        refused = [r.message if isinstance(r, Refusal) else "" for r in done]
        probs = [None if isinstance(r, Refusal) else r[1] for r in done]
        table = models.table(probs, names, refused)
        out = []
        for result, name in zip(done, names):
            if isinstance(result, Refusal):
                out.append({"name": name, "error": result.message, "status": result.status})
            else:
                out.append({"name": name, **result[0], "models": answers.photo(models, result[1])})
        request.state.photos = len(datas)
        listing = answers.listing(models, table, listing_id)
        return JSONResponse({"listing_id": listing_id, "photos": out, "listing": listing})

    @app.get("/v1/models", summary="The models: classes, thresholds, checksums, shared bodies")
    async def models() -> dict:
        if state.models is None:
            raise Refusal(503, "the models are still loading")
        return {"models": state.models.describe()}

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz() -> dict:
        return {"status": "alive"}

    @app.get("/readyz", summary="Readiness: every model loaded and warmed up, not draining")
    async def readyz():
        if state.draining:
            return error(503, "draining")
        if not state.ready:
            return error(503, "loading the models")
        return {"status": "ready"}

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.text(), media_type="text/plain; version=0.0.4")

    return Gate(app, state)
