"""Attacks through edge on its upstream connections, against a real edge process and a raw-socket
upstream that misbehaves on purpose (tests/support/raw_upstream.py). What is proved:

1. An upload that is abandoned (its answer came early) never leaves its upstream connection in
   the keep-alive pool: the next client's request (with the provider key) is never read by
   the upstream as the rest of someone else's body. A connection goes back to the pool only
   when the whole request body was written and the whole answer read.
2. A client that uploads slowly is cut after `server.body_timeout` seconds of silence (408
   JSON if no answer had started), its upstream connection is closed, and the pool it was
   pinning serves others at once.
3. An upstream response head is bounded (`upstream.max_header_bytes`, `upstream.max_headers`):
   a huge or endless one is a quick 502 `bad_upstream_response`, read no further, with edge's
   memory flat; a head under the limits still works.
4. A status that is not a final 200-599 answer (101, 102, 999, ...) is a 502
   `bad_upstream_response`, never a traceback, and its connection is not reused; 100 Continue
   and 103 Early Hints before a 200 still give the 200.
5. Any upstream transfer coding other than exactly `chunked` is a 502 `bad_upstream_response`,
   never a cut or mis-decoded relay, and its connection is not reused.
"""

from __future__ import annotations

import gzip
import json
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import httpx
import pytest

from edge.control.records import KeyRecord
from tests.support.edge_process import PROVIDER_KEY, EdgeProcess, auth, edge_env
from tests.support.procinfo import peak_rss, rss
from tests.support.raw_http import (
    RawResponse,
    chunked,
    complete_chunked,
    exchange,
    parse_response,
    request_head,
)
from tests.support.raw_upstream import Early, Raw, RawUpstream, Request
from tests.support.redis_server import RedisServer

MakeKey = Callable[..., tuple[str, KeyRecord]]
SpawnEdge = Callable[..., EdgeProcess]
MB = 1024 * 1024
BAD_RESPONSE = {"type": "upstream_error", "code": "bad_upstream_response"}


@pytest.fixture
def raw() -> Iterator[RawUpstream]:
    upstream = RawUpstream().start()
    yield upstream
    upstream.stop()


@pytest.fixture
def proc(spawn_edge: SpawnEdge, redis_server: RedisServer, raw: RawUpstream) -> EdgeProcess:
    """edge in front of the raw upstream, with the defaults."""
    return spawn_edge(edge_env(redis_server.url, raw.url))


@dataclass
class Answer:
    status: int
    body: bytes
    elapsed: float

    def json(self) -> dict[str, object]:
        return json.loads(self.body)  # type: ignore[no-any-return]


def ask(
    proc: EdgeProcess, key: str, path: str, body: bytes | None = None, timeout: float = 3.0,
    headers: dict[str, str] | None = None,
) -> Answer:  # fmt: skip
    """One request through edge on a fresh connection; a clear failure if none comes in time."""
    start = time.monotonic()
    try:
        resp = httpx.request(
            "POST" if body is not None else "GET",
            f"{proc.url}{path}",
            content=body,
            headers=auth(key, **(headers or {})),
            timeout=timeout,
        )
    except httpx.TimeoutException:
        pytest.fail(f"no answer to {path} within {timeout:g} s")
    except httpx.HTTPError as exc:
        pytest.fail(f"no usable answer to {path}: {exc!r}")
    return Answer(resp.status_code, resp.content, time.monotonic() - start)


def assert_bad_response(answer: Answer, limit: float = 2.0) -> None:
    """A quick 502 JSON upstream_error / bad_upstream_response."""
    assert answer.status == 502, (answer.status, answer.body[:300])
    error = answer.json()["error"]
    assert isinstance(error, dict)
    assert {k: error[k] for k in BAD_RESPONSE} == BAD_RESPONSE, error
    assert answer.elapsed < limit, f"the 502 took {answer.elapsed:.2f} s"


def echoed_on(raw: RawUpstream, answer: Answer, path: str) -> Request:
    """The upstream's record of the request an Echo answer is for."""
    assert answer.status == 200, (answer.status, answer.body[:300])
    echo = answer.json()
    [rec] = [r for r in raw.records if r.conn == echo["conn"] and r.seq == echo["seq"]]
    assert rec.path == path
    return rec


# 1. An abandoned upload never leaves its connection in the pool.


def read_some(sock: socket.socket, limit: float) -> bytes:
    """What arrives on `sock` until an answer is whole, it closes, or `limit` seconds pass."""
    deadline = time.monotonic() + limit
    received = b""
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not data:
            break
        received += data
        if b"\r\n\r\n" in received:
            answer = parse_response(received)
            length = answer.header("content-length")
            if complete_chunked(received) or (length and len(answer.body) >= int(length)):
                break
    return received


def assert_victim_served_alone(
    raw: RawUpstream, proc: EdgeProcess, victim: str, earlier: Iterable[Request]
) -> None:
    """The victim's request, sent after `earlier` ones, is answered promptly by the upstream as
    a request of its own, with the provider key, and its bytes were read nowhere else."""
    marker = uuid.uuid4().hex
    payload = json.dumps({"model": "gpt-4.1-mini", "input": marker}).encode()
    try:
        answer = ask(proc, victim, "/v1/responses", payload, headers={"x-victim": marker})
    except pytest.fail.Exception:
        swallowed = [r for r in earlier if marker.encode() in r.body]
        if swallowed:
            pytest.fail(
                f"the victim's request (provider key and all) was read by the upstream as the "
                f"body of an earlier request on connection {swallowed[0].conn}: "
                f"{bytes(swallowed[0].body[-300:])!r}"
            )
        raise
    assert answer.elapsed < 2, f"the victim waited {answer.elapsed:.2f} s"
    rec = echoed_on(raw, answer, "/v1/responses")
    assert rec.method == "POST"
    assert rec.header("authorization") == f"Bearer {PROVIDER_KEY}"
    assert rec.header("x-victim") == marker
    assert bytes(rec.body) == payload and rec.body_complete
    before = [r for r in raw.on(rec.conn) if r.seq < rec.seq]
    assert all(r.body_complete for r in before), (
        f"the victim's request went out on connection {rec.conn} after an unfinished body"
    )
    holders = [c.id for c in raw.connections.values() if marker.encode() in c.raw]
    assert holders == [rec.conn], f"the victim's bytes reached connections {holders}"
    assert not any(marker.encode() in r.body for r in raw.records if r is not rec)


def test_an_upload_cut_short_by_an_early_answer_does_not_poison_the_pool(
    spawn_edge: SpawnEdge, redis_server: RedisServer, raw: RawUpstream, make_key: MakeKey
) -> None:
    """The attacker announces 1000 body bytes and sends 100; the upstream answers at once. The
    attacker sends 10 more bytes only after that answer's head is out (which is what made
    edge stop uploading yet pool the connection), and reads its answer. The victim's request
    then arrives on a fresh connection as a request of its own."""
    raw.route("/v1/early", Early(delay=0.3))
    proc = spawn_edge(edge_env(redis_server.url, raw.url))
    attacker, _ = make_key("pro")
    victim, _ = make_key("pro")
    head = request_head(
        proc.port, attacker, "POST /v1/early HTTP/1.1",
        "Content-Type: application/octet-stream", "Content-Length: 1000",
    )  # fmt: skip
    with socket.create_connection(("127.0.0.1", proc.port), timeout=5) as sock:
        sock.sendall(head + b"A" * 100)
        assert raw.wait_for(lambda: raw.records and raw.records[0].head_sent_at is not None)
        [abandoned] = raw.records
        sock.sendall(b"B" * 10)
        read_some(sock, limit=2)  # the attacker's own answer: 200, or cut; not the point here
        time.sleep(0.1)  # the answer is whole: edge has decided about the connection by now
        assert not abandoned.body_complete
        assert_victim_served_alone(raw, proc, victim, [abandoned])
        assert len(raw.on(abandoned.conn)) == 1


def test_a_spooled_upload_cut_short_by_an_early_answer_does_not_poison_the_pool(
    spawn_edge: SpawnEdge, redis_server: RedisServer, raw: RawUpstream, make_key: MakeKey
) -> None:
    """Chunked bodies are spooled before they go up. One that never ends never reaches the
    upstream, and holds nothing; a large one (spooled to a file, then streamed up) to an
    upstream that answers at once and reads on is cut off the same way as above, and its
    connection must not carry the next client's request either."""
    raw.route("/v1/early", Early(delay=0.5, drain=True))
    proc = spawn_edge(edge_env(redis_server.url, raw.url))
    attacker, _ = make_key("pro")
    victim, _ = make_key("pro")
    head = request_head(
        proc.port, attacker, "POST /v1/early HTTP/1.1", "Transfer-Encoding: chunked"
    )
    with socket.create_connection(("127.0.0.1", proc.port), timeout=5) as endless:
        endless.sendall(head + b"400\r\n" + b"C" * 100)  # a chunk of 1024 bytes, never ended
        time.sleep(0.2)
        assert_victim_served_alone(raw, proc, victim, [])

        big = b"D" * (8 * MB)
        with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as sock:
            sock.sendall(head + chunked([big[i : i + MB] for i in range(0, len(big), MB)]))
            assert raw.wait_for(lambda: any(r.path == "/v1/early" for r in raw.records), 10)
            [cut] = [r for r in raw.records if r.path == "/v1/early"]
            assert cut.length == len(big)
            read_some(sock, limit=3)
            assert_victim_served_alone(raw, proc, victim, [cut])


# 2. Slow uploaders are cut after server.body_timeout and free the pool.

BODY_TIMEOUT = 1.0


class SlowUploader:
    """A client that sends a POST head with 10 of its 100 body bytes, then one more byte at each
    of `drips` (seconds after the start), reading whatever comes back in a thread and noting
    when edge closed the connection."""

    def __init__(self, port: int, key: str, drips: tuple[float, ...], limit: float) -> None:
        head = request_head(
            port, key, "POST /v1/files HTTP/1.1", "Content-Length: 100", "Connection: close"
        )
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.start = time.monotonic()
        self.sock.sendall(head + b"s" * 10)
        self.last_byte = self.start
        self.drips = drips
        self.limit = limit
        self.received = b""
        self.closed_at: float | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        drips = list(self.drips)
        deadline = self.start + self.limit
        while (now := time.monotonic()) < deadline and not self.stop.is_set():
            due = self.start + drips[0] if drips else deadline
            readable, _, _ = select.select([self.sock], [], [], max(0.0, min(due - now, 0.1)))
            try:
                if readable:
                    data = self.sock.recv(65536)
                    if not data:
                        break
                    self.received += data
                elif drips and time.monotonic() >= self.start + drips[0]:
                    drips.pop(0)
                    self.sock.sendall(b"s")
                    self.last_byte = time.monotonic()
            except OSError:  # reset by edge
                break
        else:
            return
        self.closed_at = time.monotonic()

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(1)
        self.sock.close()


def test_slow_uploads_are_cut_after_the_body_timeout_and_free_the_pool(
    spawn_edge: SpawnEdge, redis_server: RedisServer, raw: RawUpstream, make_key: MakeKey
) -> None:
    """Two admitted uploads stall (one drips a byte 0.5 s in, then every 3 s; one sends nothing
    more) while holding both upstream connections. Each is cut within about body_timeout + 1 s
    of its last byte with a 408, their upstream connections close, and a third client gets its
    200 at once. A client whose pieces come more often than body_timeout is never cut, however
    long its whole upload takes."""
    env = edge_env(
        redis_server.url, raw.url,
        EDGE_SERVER_BODY_TIMEOUT=str(BODY_TIMEOUT),
        EDGE_UPSTREAM_MAX_CONNECTIONS="2",
        EDGE_UPSTREAM_CONNECT_TIMEOUT="5",
    )  # fmt: skip
    proc = spawn_edge(env)
    keys = [make_key("pro")[0] for _ in range(4)]
    slow = [
        SlowUploader(proc.port, keys[0], drips=(0.5, 3.5, 6.5), limit=8),
        SlowUploader(proc.port, keys[1], drips=(), limit=8),
    ]
    try:
        assert raw.wait_for(lambda: len(raw.records) == 2), "the uploads did not reach upstream"
        innocent = ask(proc, keys[2], "/v1/models", timeout=8)
        assert innocent.status == 200, (innocent.status, innocent.body[:300])
        assert innocent.elapsed < BODY_TIMEOUT + 2, f"the innocent waited {innocent.elapsed:.2f} s"
        for client in slow:
            client.thread.join(BODY_TIMEOUT + 3)
            assert client.closed_at is not None, "a slow upload was never cut"
            quiet = client.closed_at - client.last_byte
            assert quiet < BODY_TIMEOUT + 1.5, f"cut {quiet:.2f} s after its last byte"
            answer = parse_response(client.received)
            assert answer.status == 408
            assert answer.header("content-type") == "application/json"
            assert json.loads(answer.body)["error"]["code"] == "request_timeout"
    finally:
        for client in slow:
            client.finish()
    uploads = [r for r in raw.records if r.path == "/v1/files"]
    assert len(uploads) == 2 and not any(r.body_complete for r in uploads)
    conns = [raw.connections[r.conn] for r in uploads]
    assert raw.wait_for(lambda: all(c.closed_at is not None for c in conns), 1), "upstream open"
    assert all(c.closed_by_peer for c in conns)

    # a steady but slow upload: a byte every 0.4 s, 3.2 s in all, is not cut
    head = request_head(
        proc.port, keys[3], "POST /v1/files HTTP/1.1", "Content-Length: 8", "Connection: close"
    )
    with socket.create_connection(("127.0.0.1", proc.port), timeout=5) as sock:
        sock.sendall(head)
        for _ in range(8):
            time.sleep(0.4)
            sock.sendall(b"t")
        steady = parse_response(read_some(sock, limit=3))
    assert steady.status == 200, steady.raw[:300]
    assert json.loads(steady.body)["body_length"] == 8


# 3. Upstream response heads are bounded.

HUGE_HEAD = 20 * MB


def huge_head() -> Iterator[bytes]:
    """A 200 whose one header is 20 MiB long, streamed 64 KiB at a time."""
    yield b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Huge: "
    piece = b"h" * 65_536
    for _ in range(HUGE_HEAD // len(piece)):
        yield piece
    yield b"\r\nContent-Length: 2\r\n\r\n{}"


def get(port: int, key: str, path: str, limit: float = 5.0) -> tuple[RawResponse, float]:
    """A GET written on a raw socket (edge may relay heads larger than httpx reads)."""
    start = time.monotonic()
    head = request_head(port, key, f"GET {path} HTTP/1.1", "Connection: close")
    data, _ = exchange(port, head, limit)
    return parse_response(data), time.monotonic() - start


def test_huge_or_crowded_upstream_heads_are_a_502_read_no_further(
    proc: EdgeProcess, raw: RawUpstream, make_key: MakeKey
) -> None:
    """A head under the limits (about 59 KB, 95 fields) is relayed. A 20 MiB header is a quick
    502, with edge's memory flat (its peak, not just its RSS after) and the upstream cut off
    long before it sent it all; 1000 small header fields are a 502 too; edge keeps serving."""
    fits = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
        + b"X-Big: " + b"b" * 58_000 + b"\r\n"
        + b"".join(b"X-Small-%d: v\r\n" % i for i in range(92))
        + b"\r\n{}"
    )  # fmt: skip
    crowded = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
        + b"".join(b"X-Field-%d: v\r\n" % i for i in range(1000))
        + b"\r\n{}"
    )
    raw.route("/v1/fits", Raw(fits))
    raw.route("/v1/huge", Raw(huge_head, close=True, sndbuf=65_536))
    raw.route("/v1/crowded", Raw(crowded))
    key, _ = make_key("pro")

    answer, _ = get(proc.port, key, "/v1/fits")
    assert answer.status == 200, answer.raw[:300]
    assert answer.header("x-big") == "b" * 58_000
    assert answer.header("x-small-91") == "v"
    assert answer.body == b"{}"

    before = rss(proc.pid)
    answer, took = get(proc.port, key, "/v1/huge", limit=10)
    grown = peak_rss(proc.pid) - before  # at least how much higher it peaked meanwhile
    relayed = f"{answer.status}, {len(answer.raw) / MB:.1f} MB relayed, +{grown / MB:.0f} MB"
    assert answer.status == 502, relayed
    assert_bad_response(Answer(answer.status, answer.body, took))
    assert grown < 10 * MB, f"edge's memory peaked {grown / MB:.1f} MB higher reading a head"
    [huge] = [r for r in raw.records if r.path == "/v1/huge"]
    assert huge.done.wait(5), "the upstream is still sending the huge head"
    assert huge.send_error is not None, "edge read the whole 20 MiB head"
    assert huge.sent < 4 * MB, f"edge let {huge.sent / MB:.1f} MB of the head in"

    answer, took = get(proc.port, key, "/v1/crowded")
    assert_bad_response(Answer(answer.status, answer.body, took))
    answer, _ = get(proc.port, key, "/v1/models")
    assert answer.status == 200
    assert "Traceback" not in proc.log()


# 4. Statuses that are not a final 200-599 answer.

ODD_STATUSES = {
    "101": b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    "102-then-nothing": b"HTTP/1.1 102 Processing\r\n\r\n",
    "102-then-200": b"HTTP/1.1 102 Processing\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
    "999": b"HTTP/1.1 999 Weird\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
    "600": b"HTTP/1.1 600 Weird\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
}
INTERIM_THEN_200 = {
    "/v1/continue": b"HTTP/1.1 100 Continue\r\n\r\n",
    "/v1/hints": b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
}
OK_BODY = b'{"ok": true}'
FINAL_200 = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
    len(OK_BODY),
    OK_BODY,
)


def assert_not_reused(raw: RawUpstream, proc: EdgeProcess, key: str, bad_path: str) -> None:
    """After a bad answer, the next requests work, on another upstream connection than the bad
    answer's; 100 Continue and 103 Early Hints before a 200 give the 200."""
    [bad] = [r for r in raw.records if r.path == bad_path]
    for path, interim in INTERIM_THEN_200.items():
        raw.route(path, Raw(interim + FINAL_200))
        answer = ask(proc, key, path)
        assert (answer.status, answer.body) == (200, OK_BODY), (path, answer)
        [rec] = [r for r in raw.records if r.path == path]
        assert rec.conn != bad.conn, f"{path} went out on the connection that answered badly"
    echoed_on(raw, ask(proc, key, "/v1/models"), "/v1/models")


@pytest.mark.parametrize("case", list(ODD_STATUSES))
def test_statuses_outside_the_final_range_are_a_502_and_drop_the_connection(
    proc: EdgeProcess, raw: RawUpstream, make_key: MakeKey, case: str
) -> None:
    raw.route("/v1/odd", Raw(ODD_STATUSES[case]))
    key, _ = make_key("pro")
    assert_bad_response(ask(proc, key, "/v1/odd"))
    assert_not_reused(raw, proc, key, "/v1/odd")
    assert "Traceback" not in proc.log()


# 5. Transfer codings other than plain chunked.

GZIPPED = gzip.compress(b'{"object": "list", "data": []}')
CODINGS = {
    "chunked, gzip": (b"Transfer-Encoding: chunked, gzip\r\n", GZIPPED, True),  # to the close
    "gzip, chunked": (b"Transfer-Encoding: gzip, chunked\r\n", chunked([GZIPPED]), False),
    "gzip": (b"Transfer-Encoding: gzip\r\n", GZIPPED, True),
    "gzip + chunked lines": (
        b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
        chunked([GZIPPED]),
        False,
    ),
}

SPELLINGS = ("CHUNKED", "Chunked")  # plain chunked, in other cases: relayed as ever


@pytest.mark.parametrize("coding", list(CODINGS))
def test_transfer_codings_other_than_chunked_are_a_502_and_drop_the_connection(
    proc: EdgeProcess, raw: RawUpstream, make_key: MakeKey, coding: str
) -> None:
    """Never relayed (cut, or with a coding the client cannot know to undo); `chunked` in any
    case still relays whole."""
    header, body, close = CODINGS[coding]
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + header + b"\r\n" + body
    raw.route("/v1/coded", Raw(answer, close=close))
    for spelling in SPELLINGS:
        plain = f"HTTP/1.1 200 OK\r\nTransfer-Encoding: {spelling}\r\n\r\n".encode()
        raw.route(f"/v1/{spelling}", Raw(plain + chunked([b'{"ok":', b" true}"])))
    key, _ = make_key("pro")
    assert_bad_response(ask(proc, key, "/v1/coded"))
    assert_not_reused(raw, proc, key, "/v1/coded")
    for spelling in SPELLINGS:
        relayed, _ = get(proc.port, key, f"/v1/{spelling}")
        assert (relayed.status, relayed.body) == (200, OK_BODY)
        assert complete_chunked(relayed.raw)
    assert "Traceback" not in proc.log()
