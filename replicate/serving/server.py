"""`replicate serve`: tag a listing's photos the moment they are uploaded, over HTTP.

    replicate serve exports/tagger --port 8000
    curl --data-binary @photo.jpg http://127.0.0.1:8000/v1/photos

One process: a FastAPI app on uvicorn. FastAPI (on Starlette) for the OpenAPI schema it writes
from the routes (/openapi.json, /docs); serving frameworks with worker processes (BentoML,
LitServe, Ray Serve) were left out because processes fought ONNX Runtime for the cores when
`predict` tried them for decoding. The models are loaded once (`tagger.Tagger`: `predict`'s
engine), uploads are checked and decoded in a bounded thread pool, and photos from concurrent
requests are run together (`batching.Batcher`). Routes:

- POST /v1/photos: one photo (the raw body, or one multipart file) -> its tags;
- POST /v1/listings/{listing_id}: a listing's photos (multipart) -> each photo's tags (or its own
  error) and the listing's, by the listing rule;
- GET /v1/models; GET /healthz (alive); GET /readyz (models loaded and warmed up, not draining);
  GET /metrics (Prometheus).

Every refusal is a JSON body {"error": "..."} with a 4xx (413 too big, 415 not an image, 422 does
not decode or too many pixels, 429 queue full with Retry-After, 401 no token), 504 for a photo
that waited past --timeout, 503 while draining. SIGTERM drains (not ready, new requests 503, the
ones in hand finish, exit 0 within --grace seconds); SIGHUP reloads the models from their folders.
"""

from __future__ import annotations

import asyncio
import datetime
import hmac
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException

from . import runtime
from .batching import Batcher, Expired, QueueFull
from .config import ServeOptions as Options
from .errors import ReplicateError
from .tagger import Refused, Tagger

LOCAL = ("127.0.0.1", "localhost", "::1")
OPEN_ROUTES = ("/healthz",)  # liveness answers without a token
ROUTES = (
    "/v1/photos",
    "/v1/listings/{listing_id}",
    "/v1/models",
    "/healthz",
    "/readyz",
    "/metrics",
)


def log_line(message: str) -> None:
    print(
        f"{datetime.datetime.now().isoformat(timespec='milliseconds')} {message}",
        file=sys.stderr,
        flush=True,
    )


class _Error(Exception):
    """A refusal: its status, one-line message and headers."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class State:
    """What the routes share: the models (swapped whole by a reload), the batcher, the flags."""

    def __init__(self, options: Options):
        self.options = options
        self.tagger: Tagger | None = None
        self.ready = self.draining = False
        self.in_flight = 0
        self.decoding = ThreadPoolExecutor(runtime.workers(options.workers), "decode")
        self.metrics = _Metrics()
        self.batcher = Batcher(
            lambda tagger, batch: tagger.infer(batch),
            max_batch=options.max_batch,
            max_wait=options.max_wait_ms / 1000,
            max_queue=options.max_queue,
            timeout=options.timeout,
            on_batch=self.metrics.batch.observe,
        )

    async def tag(self, data: bytes, tagger: Tagger) -> tuple[dict, dict]:
        """(the photo's facts, its probabilities per model) for one upload already admitted."""
        loop = asyncio.get_running_loop()
        try:
            photo = await loop.run_in_executor(self.decoding, tagger.prepare, data)
        except Refused as e:
            raise _Error(e.status, str(e)) from None
        try:
            probs = await self.batcher.submit(photo, tagger)
        except Expired as e:
            raise _Error(504, f"dropped before it was run: {e}") from None
        return {k: v for k, v in photo.items() if k != "arrays"}, probs

    def admit(self, n: int) -> None:
        try:
            self.batcher.admit(n)
        except QueueFull as e:
            raise _Error(429, str(e), {"Retry-After": "1"}) from None
        self.metrics.queue.set(self.batcher.admitted)

    def release(self, n: int) -> None:
        self.batcher.release(n)
        self.metrics.queue.set(self.batcher.admitted)

    def load(self) -> Tagger:
        """The models loaded and warmed up (a ReplicateError when one fails)."""
        tagger = Tagger(list(self.options.models), self.options.max_pixels)
        tagger.warm_up()
        return tagger


class _Metrics:
    """Prometheus metrics in a registry of this server's own (prometheus-client)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def create_app(options: Options, state: State | None = None):
    """The ASGI app; `state` is created here unless given (the server keeps one to drain it)."""
    state = state or State(options)

    @asynccontextmanager
    async def lifespan(app):
        state.batcher.start()
        loop = asyncio.get_running_loop()
        if state.tagger is None:  # `serve` loads them before it listens, so errors are one line
            state.tagger = await loop.run_in_executor(None, state.load)
        state.ready = True
        try:
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload()))
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (tests)
            pass
        names = ", ".join(m.name for m in state.tagger.models)
        log_line(
            f"ready: {len(state.tagger.models)} model(s) ({names}) on "
            f"{len(state.tagger.groups)} body pass(es), http://{options.host}:{options.port}"
        )
        yield
        await state.batcher.stop()
        state.decoding.shutdown(wait=False)

    async def reload():
        """SIGHUP: the models again from their folders; the old ones answer what is in hand."""
        try:
            new = await asyncio.get_running_loop().run_in_executor(None, state.load)
        except Exception as e:  # a model that does not load: keep serving the ones loaded
            log_line(f"error: reload failed, still serving the models loaded before: {e}")
            return
        state.tagger = new
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

    @app.exception_handler(_Error)
    async def refused(request, e: _Error):
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
                raise _Error(
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
            raise _Error(422, "the body is empty: send a photo")
        tagger = state.tagger
        state.admit(1)
        try:
            photo, probs = await state.tag(data, tagger)
        finally:
            state.release(1)
        request.state.photos = 1
        return JSONResponse({**photo, "models": tagger.answer(probs)})

    @app.post("/v1/listings/{listing_id}", summary="Tag a listing's photos (multipart)")
    async def tag_listing(listing_id: str, request: Request):
        """Each photo as /v1/photos gives it, or its own `error`; and the listing's tags by the
        listing rule, as `predict`'s tags_listings table has them."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise _Error(422, "send the listing's photos as multipart/form-data files")
        form = await request.form(max_files=options.max_photos + 1, max_fields=10)
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            raise _Error(422, "the listing has no photos: send them as multipart files")
        if len(files) > options.max_photos:
            raise _Error(413, f"a listing takes at most --max-photos {options.max_photos} photos")
        datas = [await f.read() for f in files]
        tagger = state.tagger
        state.admit(len(datas))
        try:
            done = await asyncio.gather(
                *(state.tag(d, tagger) for d in datas), return_exceptions=True
            )
        finally:
            state.release(len(datas))
        for result in done:
            if not isinstance(result, _Error) and isinstance(result, BaseException):
                raise result
        names = [f.filename or f"photo-{i}" for i, f in enumerate(files)]
        table = tagger.table([None if isinstance(r, _Error) else r[1] for r in done], names)
        out = []
        for result, name in zip(done, names):
            if isinstance(result, _Error):
                out.append({"name": name, "error": result.message, "status": result.status})
            else:
                out.append({"name": name, **result[0], "models": tagger.answer(result[1])})
        request.state.photos = len(datas)
        listing = tagger.listing(table, listing_id)
        return JSONResponse({"listing_id": listing_id, "photos": out, "listing": listing})

    @app.get("/v1/models", summary="The models: classes, thresholds, checksums, shared bodies")
    async def models() -> dict:
        if state.tagger is None:
            raise _Error(503, "the models are still loading")
        return {"models": state.tagger.describe()}

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

    return _Gate(app, state)


class _Gate:
    """The ASGI middleware in front of the app: the token, the Content-Length limit, draining, the
    in-flight count, the metrics and the one log line per request; and a body that grows past
    --max-bytes as it arrives (chunked, or a Content-Length that lied) stops with a 413.

    Plain ASGI rather than Starlette's BaseHTTPMiddleware: that runs the app in a task group, where
    an error raised while the body is read (the 413) reaches the client as a 500."""

    def __init__(self, app, state: State):
        self.app, self.state, self.options = app, state, state.options

    def __getattr__(self, name):  # the FastAPI app's attributes (routes, openapi)
        return getattr(self.app, name)

    def refusal(self, path: str, headers) -> tuple[int, str] | None:
        options, state = self.options, self.state
        if options.token and path not in OPEN_ROUTES:
            given = headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, f"Bearer {options.token}".encode()):
                return 401, "send Authorization: Bearer <token> (the server's --token-file)"
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > options.max_bytes:  # answered before reading it
            return 413, f"the body is {int(length):,} bytes, over --max-bytes {options.max_bytes:,}"
        if path.startswith("/v1/") and state.draining:
            return 503, "the server is draining (shutting down): retry on another"
        if path.startswith("/v1/") and not state.ready:
            return 503, "the models are still loading"
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, path, state = time.perf_counter(), scope["path"], self.state
        scope.setdefault("state", {})["photos"] = 0
        status = 500
        seen = 0

        async def sent(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.options.max_bytes:
                raise HTTPException(413, f"the body is over --max-bytes {self.options.max_bytes:,}")
            return message

        refused = self.refusal(path, Headers(scope=scope))
        if refused:
            await JSONResponse({"error": refused[1]}, status_code=refused[0])(scope, receive, sent)
        else:
            counts = path.startswith("/v1/")
            state.in_flight += counts
            try:
                await self.app(scope, counted, sent)
            finally:
                state.in_flight -= counts
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        seconds = time.perf_counter() - start
        state.metrics.requests.labels(route, str(status)).inc()
        state.metrics.latency.labels(route).observe(seconds)
        log_line(
            f"{scope['method']} {path} {status} photos={scope['state'].get('photos', 0)} "
            f"{seconds * 1000:.1f}ms"
        )


def read_token(path: Path) -> str:
    """The bearer token in --token-file (its first line, stripped)."""
    try:
        token = Path(path).read_text().strip().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ReplicateError(f"--token-file {path}: cannot read it ({e})") from None
    if not token or len(token[0]) < 16:
        raise ReplicateError(
            f"--token-file {path}: put a token of at least 16 characters on its first line, "
            "e.g. `python -c 'import secrets; print(secrets.token_urlsafe())' > token`"
        )
    return token[0]


def serve(options: Options, no_auth: bool = False) -> None:
    """Run the server until SIGTERM (drain) or SIGINT; returns when it has stopped. Refuses to
    start on an address other than this machine's without a token, unless `no_auth`."""
    if options.host not in LOCAL and not options.token and not no_auth:
        raise ReplicateError(
            f"--host {options.host} without --token-file would let anyone who reaches this port "
            "use the server: give --token-file FILE, or --no-auth if that is meant"
        )
    state = State(options)
    state.tagger = state.load()  # a model that does not load: one error: line, before listening
    for warning in state.tagger.warnings:
        log_line(f"warning: {warning}")
    config = uvicorn.Config(
        create_app(options, state), host=options.host, port=options.port, log_level="warning",
        access_log=False, timeout_graceful_shutdown=max(1, int(options.grace)),
    )  # fmt: skip
    _Server(config, state, options.grace).run()


class _Server(uvicorn.Server):
    """uvicorn's server, with SIGTERM draining instead of stopping at once: readiness turns 503,
    new requests get 503, and the server stops once the requests in hand are answered (or after
    `grace` seconds)."""

    def __init__(self, config, state: State, grace: float):
        super().__init__(config)
        self.state, self.grace, self.drain_until = state, grace, None

    def handle_exit(self, sig, frame) -> None:
        if sig == signal.SIGTERM and self.drain_until is None:
            self.state.draining = True
            self.drain_until = time.monotonic() + self.grace
            log_line(
                f"draining: {self.state.in_flight} request(s) in hand, at most {self.grace:g}s"
            )
            return  # not re-raised after the shutdown either: a drained server exits 0
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_until is not None and (
            self.state.in_flight == 0 or time.monotonic() > self.drain_until
        ):
            self.should_exit = True
        return await super().on_tick(counter)
