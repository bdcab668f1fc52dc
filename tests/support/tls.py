"""Redis over TLS for tests: a private CA made with the `openssl` command-line tool, and a
redis-server that listens on a TLS port only.

The certificates follow what Python's and OpenSSL's strict verification ask for (critical
basicConstraints, keyUsage, subject and authority key ids), with EC P-256 keys so generating
them takes a few tens of milliseconds.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest
import redis

from tests.support.redis_server import RedisServer

OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no

[dn]
CN = edge-test

[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash

[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always

[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""

EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


@dataclass(frozen=True)
class Certs:
    """Paths of the generated PEM files."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path  # an unrelated CA: signed nothing here


def openssl_binary() -> str:
    """The `openssl` tool; `make test` installs it when missing."""
    binary = shutil.which("openssl")
    if binary is None:
        pytest.fail("openssl is not installed: make test installs it (scripts/ensure-packages.sh)")
    return binary


def make_certs(directory: Path) -> Certs:
    """A private CA, a server cert for 127.0.0.1/localhost and a client cert it signed, and a
    second unrelated CA, all written into `directory`."""
    openssl = openssl_binary()
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "openssl.cnf"
    config.write_text(OPENSSL_CONFIG)

    def run(*args: str | Path) -> None:
        done = subprocess.run(
            [openssl, *map(str, args)], capture_output=True, text=True, timeout=30
        )
        if done.returncode != 0:
            raise RuntimeError(f"openssl {args[0]} failed:\n{done.stderr}")

    def ca(name: str) -> tuple[Path, Path]:
        cert, key = directory / f"{name}.crt", directory / f"{name}.key"
        run(
            *("req", "-x509", *EC_KEY, "-config", config, "-extensions", "ca"),
            *("-subj", f"/CN=edge-test-{name}", "-keyout", key, "-out", cert, "-days", "2"),
        )
        return cert, key

    def issue(name: str, ca_cert: Path, ca_key: Path) -> tuple[Path, Path]:
        cert, key, csr = (directory / f"{name}.{ext}" for ext in ("crt", "key", "csr"))
        run(
            *("req", "-new", *EC_KEY, "-config", config, "-subj", f"/CN=edge-test-{name}"),
            *("-keyout", key, "-out", csr),
        )
        run(
            *("x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key),
            *("-set_serial", str(secrets.randbits(63) | 1), "-days", "2"),
            *("-extfile", config, "-extensions", name, "-out", cert),
        )
        return cert, key

    ca_cert, ca_key = ca("ca")
    server_cert, server_key = issue("server", ca_cert, ca_key)
    client_cert, client_key = issue("client", ca_cert, ca_key)
    other_ca_cert, _ = ca("other-ca")
    return Certs(ca_cert, ca_key, server_cert, server_key, client_cert, client_key, other_ca_cert)


def rediss_url(port: int, **options: str | Path) -> str:
    """`rediss://127.0.0.1:<port>/0?<options>` (redis-py's URL query options, e.g.
    `ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile`, `ssl_cert_reqs`)."""
    query = urlencode({k: str(v) for k, v in options.items()}, quote_via=quote, safe="/")
    return f"rediss://127.0.0.1:{port}/0" + (f"?{query}" if query else "")


class TlsRedisServer(RedisServer):
    """A redis-server with TLS only (`--port 0 --tls-port <free>`), certificates from
    `certs`; `auth_clients=True` requires a client certificate signed by the same CA."""

    def __init__(self, directory: Path, certs: Certs, auth_clients: bool = False) -> None:
        super().__init__(directory)
        self.certs = certs
        self.auth_clients = auth_clients

    @property
    def url(self) -> str:
        """The URL a client needs: the private CA, plus the client cert and key under mTLS."""
        options: dict[str, str | Path] = {"ssl_ca_certs": self.certs.ca_cert}
        if self.auth_clients:
            options["ssl_certfile"] = self.certs.client_cert
            options["ssl_keyfile"] = self.certs.client_key
        return rediss_url(self.port, **options)

    def listen_args(self) -> list[str]:
        return [
            *("--port", "0", "--tls-port", str(self.port)),
            *("--tls-cert-file", str(self.certs.server_cert)),
            *("--tls-key-file", str(self.certs.server_key)),
            *("--tls-ca-cert-file", str(self.certs.ca_cert)),
            *("--tls-auth-clients", "yes" if self.auth_clients else "no"),
        ]

    def start(self) -> TlsRedisServer:
        try:
            super().start()
        except Exception as exc:
            log = "\n".join(p.read_text(errors="replace") for p in self.dir.glob("redis-*.log"))
            self.stop()
            raise RuntimeError(f"TLS redis-server did not start: {exc}\n{log}") from exc
        return self

    def client(self) -> redis.Redis:
        """A redis-py client over TLS, verifying the server against the private CA."""
        return redis.Redis.from_url(self.url, socket_timeout=5)
