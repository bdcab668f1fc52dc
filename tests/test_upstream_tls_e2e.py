"""Upstreams behind a company's TLS: `upstream.ca_file`, `cert_file` and `key_file`
(EDGE_UPSTREAM_CA_FILE, _CERT_FILE, _KEY_FILE; per `[[upstreams]]` entry too), against real
TLS upstreams on loopback (tests/support/tls_upstream.py) with certificates from a private CA
(tests/support/tls.py):

- the private CA in `ca_file` is trusted: 200; without it (the system's store) the upstream's
  certificate is not trusted: 502 `upstream_error`, CERTIFICATE_VERIFY_FAILED in edge's log;
- an address the certificate does not list (127.0.0.2): 502, the log says the name did not
  match;
- an upstream that requires a client certificate: 502 without one, 200 with cert_file and
  key_file (the upstream saw the client certificate);
- per-upstream files in `[[upstreams]]`: each entry with its own CA and client certificate;
- files that cannot be used stop edge at start-up with one line naming the setting.

Every failure happens once per edge process (edge throttles its upstream error lines to one a
second per kind), so each configuration has its own edge, all started together.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from edge.control.records import KeyRecord
from tests.support.edge_process import (
    CONFIG,
    PROVIDER_KEY,
    REPO,
    EdgeProcess,
    auth,
    edge_env,
    inherited_env,
)
from tests.support.fleet import Fleet, clean_proxy_env, log_lines
from tests.support.keys import new_key, secret_part
from tests.support.named_upstream import edge_config, edge_env_for, write_config
from tests.support.ports import free_port
from tests.support.redis_server import RedisServer
from tests.support.tls import Certs, make_certs
from tests.support.tls_upstream import TlsUpstream
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

MISMATCH = re.compile(r"IP address mismatch|Hostname mismatch|host ?name.*(mismatch|match)", re.I)


def chat(model: str = "gpt-4o") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("upstream-certs"))


@pytest.fixture(scope="module")
def tls(certs: Certs) -> Iterator[TlsUpstream]:
    """TLS with the private CA's server certificate, on 127.0.0.1 and 127.0.0.2."""
    server = TlsUpstream("tls", certs, hosts=("127.0.0.1", "127.0.0.2")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mtls(certs: Certs) -> Iterator[TlsUpstream]:
    """TLS, and a client certificate signed by the private CA required."""
    server = TlsUpstream("mtls", certs, require_client_cert=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def key(redis_server: RedisServer) -> tuple[str, KeyRecord]:
    return new_key(redis_server.url, "pro")


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisServer,
    certs: Certs,
    tls: TlsUpstream,
    mtls: TlsUpstream,
) -> Iterator[Fleet]:
    directory = tmp_path_factory.mktemp("upstream-tls")
    ca = str(certs.ca_cert)
    client_files = {
        "EDGE_UPSTREAM_CERT_FILE": str(certs.client_cert),
        "EDGE_UPSTREAM_KEY_FILE": str(certs.client_key),
    }
    entries = edge_config(
        [
            {"name": "private", "url": tls.url, "ca_file": ca, "models": ["private-*"]},
            {
                "name": "foreign",  # the same server, another CA: its own trust, not shared
                "url": tls.url,
                "ca_file": str(certs.other_ca_cert),
                "models": ["foreign-*"],
            },
            {
                "name": "mutual",
                "url": mtls.url,
                "ca_file": ca,
                "cert_file": str(certs.client_cert),
                "key_file": str(certs.client_key),
                "models": ["mutual-*"],
            },
        ]
    )
    config = write_config(directory / "entries.toml", entries)
    url = redis_server.url
    envs = {
        "ca": edge_env(url, tls.url, EDGE_UPSTREAM_CA_FILE=ca),
        "system-store": edge_env(url, tls.url),
        "mismatch": edge_env(url, tls.url_for("127.0.0.2"), EDGE_UPSTREAM_CA_FILE=ca),
        "mtls-no-cert": edge_env(url, mtls.url, EDGE_UPSTREAM_CA_FILE=ca),
        "mtls-cert": edge_env(url, mtls.url, EDGE_UPSTREAM_CA_FILE=ca, **client_files),
        "entries": edge_env_for(url, config, EDGE_LOG_LEVEL="debug"),
    }
    with clean_proxy_env():
        fleet = Fleet(directory).start(envs)
        yield fleet
        fleet.stop()


def post_chat(proc: EdgeProcess, key: str, model: str = "gpt-4o") -> httpx.Response:
    with httpx.Client(base_url=proc.url, timeout=15, trust_env=False) as client:
        return client.post("/v1/chat/completions", headers=auth(key), json=chat(model))


def assert_upstream_error(resp: httpx.Response) -> None:
    assert resp.status_code == 502, resp.text
    assert resp.json()["error"]["type"] == "upstream_error", resp.text


def assert_clean(proc: EdgeProcess, key: str) -> None:
    log = proc.log()
    assert "Traceback" not in log, log
    assert key not in log and secret_part(key) not in log


def test_private_ca_from_the_environment_is_trusted(
    fleet: Fleet, tls: TlsUpstream, key: tuple[str, KeyRecord]
) -> None:
    """EDGE_UPSTREAM_CA_FILE = the private CA: 200 from the TLS upstream, which got the
    provider's key and never the client's."""
    proc = fleet["ca"]
    before = len(tls.records)
    resp = post_chat(proc, key[0])
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == "from tls"
    assert resp.headers["x-upstream-name"] == "tls"
    [seen] = tls.records[before:]
    assert seen.path == "/v1/chat/completions"
    assert seen.header("authorization") == f"Bearer {PROVIDER_KEY}"
    assert all(key[0] not in value for _, value in seen.raw_headers)
    assert_clean(proc, key[0])


def test_a_certificate_the_system_store_does_not_trust_is_a_502(
    fleet: Fleet, tls: TlsUpstream, key: tuple[str, KeyRecord]
) -> None:
    """No ca_file: the system's store, which does not know the private CA: 502, the upstream
    never got the request, and edge's log line says CERTIFICATE_VERIFY_FAILED."""
    proc = fleet["system-store"]
    before = len(tls.records)
    assert_upstream_error(post_chat(proc, key[0]))
    assert len(tls.records) == before
    assert wait_until(lambda: log_lines(proc, "CERTIFICATE_VERIFY_FAILED"), 3), proc.log()
    assert_clean(proc, key[0])


def test_an_address_the_certificate_does_not_list_is_a_502(
    fleet: Fleet, tls: TlsUpstream, key: tuple[str, KeyRecord]
) -> None:
    """https://127.0.0.2:<port>/v1, the certificate says 127.0.0.1 and localhost only: the
    CA is trusted but the name does not match: 502, and the log says so."""
    proc = fleet["mismatch"]
    before = len(tls.records)
    assert_upstream_error(post_chat(proc, key[0]))
    assert len(tls.records) == before
    assert wait_until(lambda: MISMATCH.search(proc.log()), 3), proc.log()
    assert_clean(proc, key[0])


def test_mutual_tls_needs_the_client_certificate(
    fleet: Fleet, mtls: TlsUpstream, key: tuple[str, KeyRecord]
) -> None:
    """The upstream requires a client certificate: without EDGE_UPSTREAM_CERT_FILE/KEY_FILE a
    502 (the upstream never saw a request); with them a 200, and the upstream saw edge's
    client certificate."""
    before = len(mtls.records)
    assert_upstream_error(post_chat(fleet["mtls-no-cert"], key[0]))
    assert len(mtls.records) == before
    assert_clean(fleet["mtls-no-cert"], key[0])

    resp = post_chat(fleet["mtls-cert"], key[0])
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-upstream-name"] == "mtls"
    assert len(mtls.records) == before + 1
    assert mtls.peers[-1] == "edge-test-client"
    assert_clean(fleet["mtls-cert"], key[0])


def test_each_upstream_entry_has_its_own_ca_and_client_certificate(
    fleet: Fleet, tls: TlsUpstream, mtls: TlsUpstream, key: tuple[str, KeyRecord]
) -> None:
    """`[[upstreams]]` entries with their own ca_file (and cert_file/key_file): `private`
    trusts the private CA (200), `mutual` presents the client certificate (200), `foreign`,
    the same server as `private` but with an unrelated CA, does not trust it (502,
    CERTIFICATE_VERIFY_FAILED)."""
    proc = fleet["entries"]
    tls_before, mtls_before = len(tls.records), len(mtls.records)
    private = post_chat(proc, key[0], "private-1")
    assert private.status_code == 200, private.text
    assert private.headers["x-upstream-name"] == "tls"
    mutual = post_chat(proc, key[0], "mutual-1")
    assert mutual.status_code == 200, mutual.text
    assert mutual.headers["x-upstream-name"] == "mtls"
    assert mtls.peers[-1] == "edge-test-client"
    assert_upstream_error(post_chat(proc, key[0], "foreign-1"))
    assert [s.json()["model"] for s in tls.records[tls_before:]] == ["private-1"]
    assert [s.json()["model"] for s in mtls.records[mtls_before:]] == ["mutual-1"]
    assert wait_until(lambda: log_lines(proc, "CERTIFICATE_VERIFY_FAILED"), 3), proc.log()
    assert_clean(proc, key[0])


# Files that cannot be used: one line at start-up, never a traceback, never a late 502.


def serve(env: dict[str, str]) -> subprocess.Popen[str]:
    full = inherited_env()
    full.update({"EDGE_CONFIG": str(CONFIG), "EDGE_SERVER_DRAIN_DELAY": "0", **env})
    return subprocess.Popen(
        [sys.executable, "-m", "edge", "serve", "--port", str(free_port())],
        env=full,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=10)
        return -999, out, err  # it started serving: the bad file went unnoticed
    return proc.returncode, out, err


def test_unusable_tls_files_stop_edge_at_start(
    redis_server: RedisServer, tls: TlsUpstream, certs: Certs, tmp_path: Path
) -> None:
    """A missing file, a directory, a file that is not PEM, a client certificate without its
    key, a client certificate that is not PEM, and an `[[upstreams]]` entry's missing ca_file:
    edge exits non-zero with one line on stderr naming the setting, and no traceback."""
    garbage = tmp_path / "not-pem.pem"
    garbage.write_text("this is not a certificate\n")
    missing = tmp_path / "missing-ca.pem"
    entry = edge_config(
        [{"name": "private", "url": tls.url, "ca_file": str(missing), "models": ["p-*"]}]
    )
    config = write_config(tmp_path / "entry.toml", entry)
    base = {"EDGE_REDIS_URL": redis_server.url, "EDGE_UPSTREAM_URL": tls.url}
    cert, client_key = str(certs.client_cert), str(certs.client_key)
    cases: dict[str, tuple[dict[str, str], tuple[str, ...]]] = {
        "missing-ca": (
            {**base, "EDGE_UPSTREAM_CA_FILE": str(missing)},
            ("upstream.ca_file", "EDGE_UPSTREAM_CA_FILE"),
        ),
        "directory-ca": (
            {**base, "EDGE_UPSTREAM_CA_FILE": str(tmp_path)},
            ("ca_file",),
        ),
        "not-pem-ca": (
            {**base, "EDGE_UPSTREAM_CA_FILE": str(garbage)},
            ("ca_file",),
        ),
        "cert-without-key": (
            {**base, "EDGE_UPSTREAM_CERT_FILE": cert},
            ("cert_file|key_file",),
        ),
        "not-pem-cert": (
            {**base, "EDGE_UPSTREAM_CERT_FILE": str(garbage), "EDGE_UPSTREAM_KEY_FILE": client_key},
            ("cert_file",),
        ),
        "entry-missing-ca": (
            {"EDGE_REDIS_URL": redis_server.url, "EDGE_CONFIG": str(config)},
            ("ca_file",),
        ),
    }
    with clean_proxy_env():
        started = {label: serve(env) for label, (env, _) in cases.items()}
        with ThreadPoolExecutor(max_workers=len(started)) as pool:
            done = dict(zip(started, pool.map(finish, started.values()), strict=True))
    for label, (code, out, err) in done.items():
        needles = cases[label][1]
        assert code not in (0, -999), (label, code, out, err)
        assert "Traceback" not in out + err, (label, err)
        line = err.strip()
        assert len(line.splitlines()) == 1, (label, err)
        for needle in needles:
            assert re.search(needle, line), (label, needle, line)


def test_a_new_upstream_connection_resumes_an_earlier_tls_session(certs: Certs) -> None:
    """In process, on memory BIOs (no socket): once a connection's session is remembered, the
    next connection to the same host resumes it (OpenSSL 3.0: about 200 µs of client CPU
    instead of 500); a host it was not remembered for gets a full handshake."""
    import contextlib
    import ssl

    from edge.tls_files import client_context

    client = client_context(str(certs.ca_cert))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(str(certs.server_cert), str(certs.server_key))

    def connect(host: str) -> ssl.SSLObject:
        c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
        tls = client.wrap_bio(c_in, c_out, server_hostname=host)  # as uvloop calls it
        peer = server.wrap_bio(s_in, s_out, server_side=True)
        for _ in range(10):  # the handshake, then a byte of data (and the session ticket)
            for side in (tls, peer):
                with contextlib.suppress(ssl.SSLWantReadError):
                    side.do_handshake()
            s_in.write(c_out.read())
            c_in.write(s_out.read())
        peer.write(b"x")
        c_in.write(s_out.read())
        assert tls.read(1) == b"x"
        return tls

    first = connect("localhost")
    assert not first.session_reused
    client.remember("localhost", first)  # what the pool does on a connection's first answer
    assert connect("localhost").session_reused
    assert not connect("127.0.0.1").session_reused
