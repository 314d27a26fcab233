"""The broker's dashboard: one self-updating page and ``/api/status`` over HTTP.

Served by the standard library in a thread of the broker process. The thread never
touches scheduling state: it asks the poll loop for a snapshot (the loop builds it
between messages) and serves that JSON. Other users of a login node can reach
localhost too, so every request must carry the token (``?token=`` or an
``Authorization: Bearer`` header); the link the broker prints carries it.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

logger = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("dashboard.html")
#: Seconds a request waits for the poll loop to produce a fresh snapshot.
SNAPSHOT_WAIT = 2.0


def parse_dashboard_address(text: str) -> tuple[str, int]:
    """``":8787"`` -> ("127.0.0.1", 8787): localhost unless a host is named."""
    host, _, port = text.rpartition(":")
    if not port.isdigit():
        raise ValueError(f"dashboard address {text!r} is not like :8787 or host:8787")
    return host or "127.0.0.1", int(port)


class Dashboard:
    def __init__(self, address: str) -> None:
        host, port = parse_dashboard_address(address)
        self.token = secrets.token_urlsafe(18)
        self._want = threading.Event()
        self._fresh = threading.Condition()
        self._snapshot = b"{}"
        self._generation = 0
        handler = _make_handler(self)
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError:
            if port == 0:
                raise
            logger.warning("port %d is in use; the dashboard takes a free port", port)
            self.httpd = ThreadingHTTPServer((host, 0), handler)
        self.httpd.daemon_threads = True
        self.host, self.port = (
            str(self.httpd.server_address[0]),
            int(self.httpd.server_address[1]),
        )
        self.link = f"http://{self.host}:{self.port}/status?token={self.token}"
        # A short poll interval: shutdown() waits for the serving loop to look up.
        self._thread = threading.Thread(
            target=self.httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="dashboard",
            daemon=True,
        )
        self._thread.start()

    # --- the poll loop's side ---------------------------------------------------------

    def wanted(self) -> bool:
        return self._want.is_set()

    def publish(self, status: dict[str, Any]) -> None:
        data = json.dumps(status, default=str).encode()
        with self._fresh:
            self._snapshot = data
            self._generation += 1
            self._want.clear()
            self._fresh.notify_all()

    # --- the HTTP side ----------------------------------------------------------------

    def snapshot(self) -> bytes:
        with self._fresh:
            generation = self._generation
            self._want.set()
            self._fresh.wait_for(lambda: self._generation != generation, SNAPSHOT_WAIT)
            return self._snapshot

    def authorised(self, path: str, headers: Any) -> bool:
        query = parse_qs(urlsplit(path).query)
        given = (query.get("token") or [""])[0]
        auth = headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            given = auth[len("Bearer ") :]
        return hmac.compare_digest(given.encode(), self.token.encode())

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _make_handler(dash: Dashboard) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "zdist-dashboard"

        def do_GET(self) -> None:
            route = urlsplit(self.path).path
            if not dash.authorised(self.path, self.headers):
                self._reply(
                    403, b"forbidden: this dashboard needs its token\n", "text/plain"
                )
            elif route in ("/", "/status"):
                self._reply(200, PAGE.read_bytes(), "text/html; charset=utf-8")
            elif route == "/api/status":
                self._reply(200, dash.snapshot(), "application/json")
            else:
                self._reply(404, b"not found\n", "text/plain")

        def _reply(self, code: int, body: bytes, kind: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("dashboard: %s", format % args)

    return Handler
