"""The ASGI middleware in front of `replicate serve`'s app: the token, the body-size limit,
draining, the in-flight count, the metrics and one log line per request.

    python -c "from replicate.serving import gate; help(gate.Gate)"

The token is checked here, in one place, and not as a FastAPI dependency: the gate answers before
the app reads a byte of the body (an unauthenticated 20 MB upload costs nothing), and it covers
every route, /metrics and /readyz included, where a dependency would have to be added to each.
"""

from __future__ import annotations

import datetime
import hmac
import sys
import time

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

OPEN_ROUTES = ("/healthz",)  # liveness answers without a token


def log_line(message: str) -> None:
    """One line of the server's log on stderr, with its time: the gate's per request, and the
    app's and server's (ready, reloaded, draining)."""
    print(
        f"{datetime.datetime.now().isoformat(timespec='milliseconds')} {message}",
        file=sys.stderr,
        flush=True,
    )


class Gate:
    """The middleware (see the module docstring), around the app and its `state` (app.State):
    a body that grows past --max-bytes as it arrives (chunked, or a Content-Length that lied)
    stops with a 413.

    Plain ASGI rather than Starlette's BaseHTTPMiddleware: that runs the app in a task group, where
    an error raised while the body is read (the 413) reaches the client as a 500."""

    def __init__(self, app, state):
        self.app, self.state, self.options = app, state, state.options

    def __getattr__(self, name):  # the FastAPI app's attributes (routes, openapi)
        return getattr(self.app, name)

    def refusal(self, path: str, headers) -> tuple[int, str] | None:
        options, state = self.options, self.state
        if options.token and path not in OPEN_ROUTES:
            # the scheme is case-insensitive (RFC 9110); the token is compared in constant time
            scheme, _, given = headers.get("authorization", "").partition(" ")
            right = hmac.compare_digest(given.strip().encode(), options.token.encode())
            if scheme.lower() != "bearer" or not right:
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
