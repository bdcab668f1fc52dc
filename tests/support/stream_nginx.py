"""nginx in front of one edge the way a streaming deployment is often (mis)configured: no
response buffering, and a short `proxy_read_timeout`, so a stream that stays silent longer than
that is cut by nginx. The SSE keep-alive tests (tests/test_sse_keepalive_e2e.py) use it."""

from __future__ import annotations

from pathlib import Path

from tests.support.nginx import HEAD, Nginx

STREAM_PROXY = """
http {{
  access_log off;
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://127.0.0.1:{backend};
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_read_timeout {read_timeout};
    }}
  }}
}}
"""


class StreamNginx(Nginx):
    """nginx `proxy_pass` to one loopback port, `proxy_buffering off`, `proxy_read_timeout`
    as given (nginx syntax: "2s")."""

    def __init__(self, directory: Path, backend: int, read_timeout: str = "2s") -> None:
        super().__init__(directory, [backend])
        self.read_timeout = read_timeout

    def config(self) -> str:
        return HEAD.format(dir=self.dir) + STREAM_PROXY.format(
            port=self.port, backend=self.backends[0], read_timeout=self.read_timeout
        )
