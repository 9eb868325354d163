"""`replicate serve`: tag a listing's photos the moment they are uploaded, over HTTP.

    replicate serve exports/tagger --port 8000
    curl --data-binary @photo.jpg http://127.0.0.1:8000/v1/photos

One process: a FastAPI app (`app`) on uvicorn, behind an ASGI gate (`gate`: token, limits,
draining, metrics). Serving frameworks with worker processes (BentoML, LitServe, Ray Serve) were
left out because processes fought ONNX Runtime for the cores when `predict` tried them for
decoding. The models are loaded once (`engine.model_set.ModelSet`: `predict`'s engine). Routes:

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

import signal
import time
from pathlib import Path

import uvicorn

from ..config import ServeOptions as Options
from ..errors import ReplicateError
from .app import State, create_app
from .gate import log_line

LOCAL = ("127.0.0.1", "localhost", "::1")


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
    state.models = state.load()  # a model that does not load: one error: line, before listening
    for warning in state.models.warnings:
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
