"""The demo's HTTP layer: the standard library's ThreadingHTTPServer, a fixed set of routes, JSON in and out.

Static files are a fixed name → package-resource table (no path from a request ever reaches the file system).
POST bodies must be JSON objects of bounded size; requests are rate-limited by a token bucket; every refusal is a
4xx (or 503 when the model is busy) with ``{"error": message}``. Bound to 127.0.0.1 by default, and then only
requests whose Host header names a loopback address are answered (a guard against DNS rebinding).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

from jemlab.serve.actions import build_actions
from jemlab.serve.app import DemoApp, Limits, RequestError
from jemlab.typicality import reference_from_test_set

log = logging.getLogger(__name__)

# Route → (package resource, content type). The only files the server ever sends.
STATIC_FILES: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


class TokenBucket:
    """Allow `rate` events per second on average and `burst` at once; thread-safe."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens = float(burst)
        self.last = clock()
        self.lock = threading.Lock()

    def take(self) -> bool:
        with self.lock:
            now = self.clock()
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now
            if self.tokens < 1:
                return False
            self.tokens -= 1
            return True


def _static(name: str) -> bytes:
    return resources.files("jemlab.serve").joinpath("static", name).read_bytes()


class DemoServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that carries the app, its rate limiter and the static files (read once)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: DemoApp) -> None:
        self.app = app
        self.bucket = TokenBucket(app.limits.requests_per_second, app.limits.burst)
        self.files = {route: (_static(name), kind) for route, (name, kind) in STATIC_FILES.items()}
        self.loopback_only = address[0] in ("127.0.0.1", "localhost", "::1")
        super().__init__(address, DemoHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


class DemoHandler(BaseHTTPRequestHandler):
    server: DemoServer
    server_version = "jemlab-serve"
    protocol_version = "HTTP/1.1"

    # --- plumbing --------------------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header(
            "Content-Security-Policy",
            "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'",
        )
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: Any) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _host_ok(self) -> bool:
        if not self.server.loopback_only:
            return True
        host = (self.headers.get("Host") or "").strip().lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return name in LOOPBACK_HOSTS

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)

    # --- methods ---------------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if not self._host_ok():
            return self._error(HTTPStatus.FORBIDDEN, "this server answers only requests to a loopback host name")
        if path in self.server.files:
            body, kind = self.server.files[path]
            return self._send(HTTPStatus.OK, body, kind)
        if path == "/api/info":
            return self._json(HTTPStatus.OK, self.server.app.info())
        if path == "/favicon.ico":
            return self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
        return self._error(HTTPStatus.NOT_FOUND, f"no such page: {path[:100]}")

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_POST(self) -> None:
        routes = {"/api/predict": self.server.app.predict, "/api/refine": self.server.app.refine}
        routes["/api/chains"] = self.server.app.chains
        path = self.path.split("?", 1)[0]
        try:
            if not self._host_ok():
                self.close_connection = True  # the body stays unread: the connection cannot be reused
                raise RequestError(HTTPStatus.FORBIDDEN, "this server answers only requests to a loopback host name")
            body = self._read_body()  # always drained first, so that a refusal leaves the connection usable
            if path not in routes:
                raise RequestError(HTTPStatus.NOT_FOUND, f"no such endpoint: {path[:100]}")
            if not self.server.bucket.take():
                raise RequestError(HTTPStatus.TOO_MANY_REQUESTS, "too many requests; slow down")
            result = routes[path](body)
        except RequestError as err:
            return self._error(err.status, err.message)
        except Exception:  # a bug, not the client's fault: log it, say little
            log.exception("request to %s failed", path)
            return self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error (see the server log)")
        self._json(HTTPStatus.OK, result)

    def _read_body(self) -> dict[str, Any]:
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            self.close_connection = True
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "a POST needs a Content-Length header")
        try:
            length = int(length_text)
        except ValueError:
            self.close_connection = True
            raise RequestError(HTTPStatus.BAD_REQUEST, "Content-Length must be an integer") from None
        if length < 0 or length > self.server.app.limits.max_body_bytes:
            self.close_connection = True  # the body is not read: the connection cannot be reused
            limit = self.server.app.limits.max_body_bytes
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body over {limit} bytes")
        raw = self.rfile.read(length)
        content_type = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if content_type != "application/json":
            raise RequestError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send JSON with Content-Type: application/json")
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"body is not valid JSON ({err})") from None
        if not isinstance(body, dict):
            raise RequestError(HTTPStatus.BAD_REQUEST, "body must be a JSON object")
        return body


# --- building the app from a checkpoint ------------------------------------------------------------------------


def create_app(
    checkpoint: str | Path,
    *,
    data_dir: str | None = None,
    reference_size: int = 1000,
    device: str = "cpu",
    limits: Limits | None = None,
    ood_quantile: float = 0.05,
) -> DemoApp:
    """Load a checkpoint, build its actions and score the reference set: everything a server needs.

    Args:
        checkpoint: checkpoint file or run directory (read once, here).
        data_dir: where the run's dataset lives, if not where its config says.
        reference_size: test images scored for the OOD verdict (0: none).
        device: "cpu", "cuda[:N]" or "auto".
        limits: request bounds.
        ood_quantile: see ``DemoApp``.
    """
    from jemlab.run import load_run

    run = load_run(checkpoint, device=device)
    actions = build_actions(run)
    started = time.perf_counter()
    reference, note = reference_from_test_set(run.config, actions.predict, reference_size, data_dir)
    if reference is not None:
        log.info("scored %s in %.1f s", reference.source, time.perf_counter() - started)
    return DemoApp(
        actions,
        reference,
        limits=limits,
        ood_quantile=ood_quantile,
        reference_note=note,
        checkpoint=f"{run.path.parent.parent.name}/{run.path.name}",
        dataset=run.config.data.dataset,
    )


def make_server(app: DemoApp, host: str = "127.0.0.1", port: int = 8000) -> DemoServer:
    """Bind a server for the app (port 0 picks a free port; see ``server.url``); call ``serve_forever`` on it."""
    return DemoServer((host, port), app)
