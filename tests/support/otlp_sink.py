"""An OTLP/HTTP endpoint that takes every export and answers 200, in a thread: for runs where
what was exported does not matter (the benchmark's tracing row, sampling tests); the
receiver that decodes spans is otlp_receiver.py."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Sink(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # http.server calls it by this name
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def otlp_sink() -> tuple[str, ThreadingHTTPServer]:
    """The endpoint's base URL (`tracing.otlp_endpoint`), and its server to `shutdown()`."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=server.serve_forever, name="otlp-sink", daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}", server
