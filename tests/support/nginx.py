"""A real nginx (Debian's package) on loopback, started and stopped by PID.

`Nginx` load-balances over backends with a keep-alive upstream pool, as docs/deployment.md's
section recommends (the load-balancer tests; the benchmark's C reference proxy). `StaticNginx`
answers every request with one fixed body (the benchmark's upstream: fast enough that it is
never what is being measured).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

from tests.support.ports import wait_port
from tests.support.process import LocalServer

HEAD = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
"""

PROXY = """
http {{
  access_log off;
  keepalive_requests 1000000;
  upstream edge {{
{servers}
    keepalive 64;
    keepalive_requests 1000000;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://edge;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_read_timeout 600s;
    }}
  }}
}}
"""

STATIC = """
http {{
  access_log off;
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{port};
    location / {{ default_type {content_type}; return 200 '{body}'; }}
  }}
}}
"""


def nginx_binary() -> str:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        raise RuntimeError("nginx is not installed (run scripts/ensure-packages.sh)")
    return binary


class Nginx(LocalServer):
    """nginx `proxy_pass` over `backends` (loopback ports); with `ca_cert`, to https backends
    (certificates for localhost, verified against `ca_cert`; nginx reuses TLS sessions)."""

    def __init__(self, directory: Path, backends: list[int], ca_cert: Path | None = None) -> None:
        super().__init__()
        self.dir = directory
        self.backends = backends
        self.ca_cert = ca_cert

    def config(self) -> str:
        servers = "\n".join(f"    server 127.0.0.1:{p};" for p in self.backends)
        conf = HEAD.format(dir=self.dir) + PROXY.format(servers=servers, port=self.port)
        if self.ca_cert is None:
            return conf
        tls = (
            f"proxy_pass https://edge; proxy_ssl_trusted_certificate {self.ca_cert}; "
            "proxy_ssl_verify on; proxy_ssl_name localhost; proxy_ssl_server_name on;"
        )
        return conf.replace("proxy_pass http://edge;", tls)

    def start(self) -> Nginx:
        binary = nginx_binary()
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "nginx.conf"
        conf.write_text(self.config())
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf), "-p", str(self.dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)
        return self

    def stop(self) -> None:
        self.halt(signal.SIGQUIT, 10)  # nginx's graceful stop


class StaticNginx(Nginx):
    """nginx answering every request 200 with `body` (no single quotes in it)."""

    def __init__(self, directory: Path, body: str, content_type: str = "application/json") -> None:
        super().__init__(directory, [])
        assert "'" not in body
        self.body = body
        self.content_type = content_type

    def config(self) -> str:
        return HEAD.format(dir=self.dir) + STATIC.format(
            port=self.port, body=self.body, content_type=self.content_type
        )
