"""edge/transport/upstream.py in process, on a fake transport (as uvicorn tests its own
protocols): when a connection may go back to the pool, and which answers are refused as bad
responses.

The end-to-end versions of these attacks (through real sockets and a misbehaving upstream) are
in tests/test_security_upstream_e2e.py; here each rule is pinned down byte for byte.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from edge.transport.upstream import pool as pool_module
from edge.transport.upstream.connection import Connection
from edge.transport.upstream.errors import BadResponse, ConnectFailed, Disconnected, PoolFull
from edge.transport.upstream.pool import UpstreamPool
from edge.transport.upstream.response import HIGH_WATER, Response
from tests.support.fake_transport import FakeTransport

HEAD = b"POST /v1/x HTTP/1.1\r\nHost: up\r\nContent-Length: 10\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def connected(**limits: int) -> tuple[UpstreamPool, Connection, FakeTransport]:
    pool = UpstreamPool("http://up.test/v1", 4, 1.0, 5.0, **limits)
    conn = Connection(pool)
    transport = FakeTransport(conn)
    conn.connection_made(transport)
    pool._open = 1  # as _acquire counts the connection it opens
    return pool, conn, transport


def stalled_upload() -> tuple[AsyncIterator[bytes], asyncio.Event]:
    """A 10-byte body that sends 4 bytes, then the rest once the event is set."""
    more = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"0123"
        await more.wait()
        yield b"456789"

    return body(), more


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_a_whole_exchange_returns_the_connection_to_the_pool() -> None:
    pool, conn, transport = await connected()
    task = asyncio.ensure_future(conn.exchange(HEAD, b"0123456789", False, 5.0))
    await settle()
    conn.data_received(OK)
    resp = await task
    assert await resp.read() == b"ok" and resp.done
    assert pool._idle == [conn] and not transport.closed
    await pool.close()


async def test_an_answer_before_the_whole_upload_never_returns_the_connection() -> None:
    """The upstream answers after 4 of 10 body bytes; the client's next piece comes later. The
    rest of the body is not sent, so the connection must close: reused, the next request
    would be read as the rest of this body."""
    pool, conn, transport = await connected()
    body, more = stalled_upload()
    task = asyncio.ensure_future(conn.exchange(HEAD, body, False, 5.0))
    await settle()
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")  # head only
    more.set()
    resp = await task
    assert transport.written == HEAD + b"0123"  # the rest never went
    conn.data_received(b"ok")
    assert await resp.read() == b"ok" and resp.done
    await settle()
    assert transport.closed and pool._idle == []


async def test_an_answer_completed_during_the_upload_closes_the_connection() -> None:
    pool, conn, transport = await connected()
    body, more = stalled_upload()
    task = asyncio.ensure_future(conn.exchange(HEAD, body, False, 5.0))
    await settle()
    conn.data_received(OK)
    more.set()
    resp = await task
    assert resp.done and await resp.read() == b"ok"
    await settle()
    assert transport.closed and pool._idle == []


async def exchange_with(answer: list[bytes], **limits: int) -> tuple[Response | None, Any]:
    """Run one GET whose answer arrives in `answer`'s pieces: (response or None, error)."""
    pool, conn, transport = await connected(**limits)
    task = asyncio.ensure_future(conn.exchange(b"GET / HTTP/1.1\r\n\r\n", None, False, 5.0))
    await settle()
    for piece in answer:
        if transport.closed:
            break
        conn.data_received(piece)
    try:
        resp = await asyncio.wait_for(task, 1)
    except BadResponse as exc:
        await settle()
        assert transport.closed and pool._idle == []
        return None, exc
    return resp, None


@pytest.mark.parametrize(
    "status", [b"101 Switching Protocols", b"102 Processing", b"999 Weird", b"099 Low"]
)
async def test_statuses_edge_cannot_relay_are_bad_responses(status: bytes) -> None:
    resp, error = await exchange_with([b"HTTP/1.1 " + status + b"\r\nUpgrade: x\r\n\r\n" + OK])
    assert resp is None and isinstance(error, BadResponse)


@pytest.mark.parametrize("early", [b"100 Continue", b"103 Early Hints"])
async def test_100_and_103_precede_the_answer(early: bytes) -> None:
    resp, _ = await exchange_with([b"HTTP/1.1 " + early + b"\r\nLink: </a>\r\n\r\n" + OK])
    assert resp is not None and resp.status == 200 and await resp.read() == b"ok"


@pytest.mark.parametrize("coding", [b"chunked, gzip", b"gzip, chunked", b"gzip", b"identity"])
async def test_transfer_codings_other_than_chunked_are_bad_responses(coding: bytes) -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + coding + b"\r\n\r\n"
    resp, error = await exchange_with([head + b"2\r\nok\r\n0\r\n\r\n"])
    assert resp is None and isinstance(error, BadResponse)


async def test_chunked_in_any_case_is_relayed() -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n"
    resp, _ = await exchange_with([head + b"2\r\nok\r\n0\r\n\r\n"])
    assert resp is not None and await resp.read() == b"ok"


async def test_a_response_head_over_the_byte_budget_is_cut_early() -> None:
    """A giant header, arriving in pieces: refused once the head passes the budget, before
    the rest arrives (the pieces after that are never fed)."""
    pieces = [b"HTTP/1.1 200 OK\r\nX-Big: "] + [b"a" * 4096] * 64
    resp, error = await exchange_with(pieces, max_head_bytes=16 * 1024)
    assert resp is None and "head" in str(error)


async def test_a_head_over_the_budget_in_one_read_is_refused_too() -> None:
    head = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 20_000 + b"\r\nContent-Length: 2\r\n\r\nok"
    resp, error = await exchange_with([head], max_head_bytes=16 * 1024)
    assert resp is None and isinstance(error, BadResponse)


async def test_too_many_response_header_fields() -> None:
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(30))
    resp, error = await exchange_with(
        [b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: 2\r\n\r\nok"], max_head_fields=20
    )
    assert resp is None and isinstance(error, BadResponse)
    fine, _ = await exchange_with(
        [b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: 2\r\n\r\nok"], max_head_fields=40
    )
    assert fine is not None and fine.status == 200


async def test_endless_informational_answers_count_against_the_head_budget() -> None:
    pieces = [b"HTTP/1.1 100 Continue\r\n\r\n"] * 2000
    resp, error = await exchange_with(pieces, max_head_bytes=16 * 1024)
    assert resp is None and isinstance(error, BadResponse)


async def test_a_full_pool_is_its_own_error_and_hands_the_slot_on() -> None:
    """Every connection busy for connect_timeout: PoolFull (edge's limit, answered 503), not a
    timeout of the upstream's; the slot goes to the next waiter once the exchange is whole."""
    pool = UpstreamPool("http://up.test/v1", 1, 0.05, 5.0)
    conn = Connection(pool)
    transport = FakeTransport(conn)
    conn.connection_made(transport)
    pool._open = 1
    busy = asyncio.ensure_future(conn.exchange(b"GET / HTTP/1.1\r\n\r\n", None, False, 5.0))
    await settle()
    with pytest.raises(PoolFull) as caught:
        await pool._acquire()
    assert caught.value.never_sent and not caught.value.timeout
    waiting = asyncio.ensure_future(pool._acquire())
    await settle()
    conn.data_received(OK)
    resp = await busy
    assert await resp.read() == b"ok"
    assert await asyncio.wait_for(waiting, 1) is conn  # handed over, not reopened
    await pool.close()


class FakePool(UpstreamPool):
    """A pool whose connections are fake transports: `opened` lists them; `refuse` makes the
    next connects fail as a refused connection would."""

    def __init__(
        self, limit: int = 2, connect_timeout: float = 0.2, read_timeout: float = 5.0,
        min_connections: int = 0,
    ):  # fmt: skip
        super().__init__(
            "http://up.test/v1", limit, connect_timeout, read_timeout,
            min_connections=min_connections,
        )  # fmt: skip
        self.opened: list[tuple[Connection, FakeTransport]] = []
        self.refuse = 0

    async def _connect(self) -> Connection:
        await asyncio.sleep(0)
        if self.refuse:
            self.refuse -= 1
            raise ConnectFailed("refused")
        conn = Connection(self)
        transport = FakeTransport(conn)
        conn.connection_made(transport)
        self.opened.append((conn, transport))
        return conn


GET = b"GET /v1/models HTTP/1.1\r\nHost: up.test\r\n\r\n"


async def answer_on(pool: FakePool, index: int, data: bytes = OK) -> None:
    """Wait for connection `index` to be written to, then answer on it."""
    for _ in range(100):
        if len(pool.opened) > index and pool.opened[index][1].written:
            pool.opened[index][0].data_received(data)
            return
        await asyncio.sleep(0)
    raise AssertionError(f"no request on connection {index}")


async def test_failed_connects_give_their_slots_back() -> None:
    pool = FakePool(limit=1)
    pool.refuse = 3
    for _ in range(3):
        with pytest.raises(ConnectFailed) as caught:
            await pool.request("GET", b"/v1/models", [], None, None)
        assert caught.value.never_sent
    assert pool._open == 0
    task = asyncio.ensure_future(pool.request("GET", b"/v1/models", [], None, None))
    await answer_on(pool, 0)
    assert (await task).status == 200 and pool._open == 1
    await pool.close()


async def test_a_waiter_that_times_out_as_a_connection_arrives_passes_it_on() -> None:
    """The slot or connection handed to a waiter that is giving up is not lost: the next
    waiter gets it, and the open count stays right."""
    pool = FakePool(limit=1, connect_timeout=0.05)
    first = asyncio.ensure_future(pool.request("GET", b"/a", [], None, None))
    await answer_on(pool, 0, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")  # body pending
    resp = await first
    late = asyncio.ensure_future(pool._acquire())
    await asyncio.sleep(0.01)
    nxt = asyncio.ensure_future(pool._acquire())
    await asyncio.sleep(0.01)
    pool.opened[0][0].data_received(b"ok")  # the connection is handed to `late`, and ...
    late.cancel()  # ... `late` gives up before it could run: it must pass it on
    assert await resp.read() == b"ok"
    conn = await asyncio.wait_for(nxt, 1)
    assert conn is pool.opened[0][0] and pool._open == 1
    pool.release(conn)
    await pool.close()


async def test_an_idempotent_request_is_retried_once_on_a_closed_keepalive_connection() -> None:
    pool = FakePool(limit=2)
    first = asyncio.ensure_future(pool.request("GET", b"/a", [], None, None))
    await answer_on(pool, 0)
    assert await (await first).read() == b"ok"
    stale, _ = pool.opened[0]
    retried = asyncio.ensure_future(pool.request("GET", b"/b", [], None, None))
    await asyncio.sleep(0)
    stale.connection_lost(None)  # the upstream had closed it: no byte of an answer came
    await answer_on(pool, 1)
    assert (await retried).status == 200
    assert [t.written.count(b"GET") for _, t in pool.opened] == [2, 1]
    await pool.close()


async def test_a_post_is_never_sent_twice() -> None:
    pool = FakePool(limit=2)
    first = asyncio.ensure_future(pool.request("GET", b"/a", [], None, None))
    await answer_on(pool, 0)
    await (await first).read()
    post = asyncio.ensure_future(pool.request("POST", b"/b", [], b"{}", 2))
    await asyncio.sleep(0)
    pool.opened[0][0].connection_lost(None)
    with pytest.raises(Disconnected):
        await post
    assert len(pool.opened) == 1
    await pool.close()


async def test_the_read_deadline_is_silence_not_length_and_pausing_does_not_count() -> None:
    pool, conn, transport = await connected()
    task = asyncio.ensure_future(conn.exchange(GET, None, False, 0.1))
    await settle()
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    resp = await task
    for _ in range(4):  # a piece every 60 ms: never 100 ms of silence
        await asyncio.sleep(0.06)
        conn.data_received(b"1\r\nx\r\n")
    resp.pipe(lambda data, more: False)  # a client that takes nothing more: reading pauses
    conn.data_received(b"1\r\ny\r\n")
    assert resp.paused and not transport.reading
    await asyncio.sleep(0.25)  # edge holds it back: the upstream is not silent by its fault
    assert not resp.done and not transport.closed
    resp.resume()
    assert transport.reading
    await asyncio.sleep(0.25)  # now it is silent: cut
    assert transport.closed
    await pool.close()


async def test_reading_pauses_at_high_water_and_resumes_when_read() -> None:
    pool, conn, transport = await connected()
    task = asyncio.ensure_future(conn.exchange(GET, None, False, 5.0))
    await settle()
    size = HIGH_WATER + 10
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (size + 5))
    resp = await task
    conn.data_received(b"a" * size)
    assert resp.paused and not transport.reading
    assert len(await resp.read()) == size
    assert not resp.paused and transport.reading
    conn.data_received(b"bbbbb")
    assert await resp.read() == b"bbbbb" and resp.done
    await pool.close()


async def test_min_connections_are_opened_ahead_of_demand_and_used() -> None:
    pool = FakePool(limit=4, min_connections=3)
    task = pool.warm()
    assert task is not None
    await task
    assert (len(pool.opened), pool.open_count, len(pool._idle)) == (3, 3, 3)
    assert pool.warm() is None  # enough open: nothing to do
    request = asyncio.ensure_future(pool.request("GET", b"/v1/models", [], None, None))
    await answer_on(pool, 2)  # the warmest of the three, not a new connection
    assert (await request).status == 200
    assert len(pool.opened) == 3
    await pool.close()


async def test_a_warm_connection_that_closes_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    """A closed one (the upstream dropped it, or the sweep retired it) is opened again, one
    warm-up gap later, never in a tight loop."""
    monkeypatch.setattr(pool_module, "WARM_GAP", 0.05)
    pool = FakePool(limit=4, min_connections=2)
    await asyncio.wait_for(pool.warm(), 1)  # type: ignore[arg-type]
    pool.opened[0][1].close()
    await settle()
    assert pool.open_count == 1 and len(pool.opened) == 2  # not yet: within the gap
    await asyncio.sleep(0.1)
    assert pool.open_count == 2 and len(pool.opened) == 3
    await pool.close()


async def test_warming_backs_off_after_a_failed_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_module, "WARM_BACKOFF", (0.05, 0.1))
    monkeypatch.setattr(pool_module, "WARM_GAP", 0.0)
    pool = FakePool(limit=4, min_connections=2)
    pool.refuse = 2
    await asyncio.wait_for(pool.warm(), 1)  # type: ignore[arg-type]
    assert pool.open_count == 0 and pool.opened == []  # both slots given back
    task = pool.warm()  # waits out the back-off first
    assert task is not None
    await settle()
    assert pool.opened == []
    await asyncio.wait_for(task, 1)
    assert pool.open_count == 2 and len(pool.opened) == 2
    await pool.close()


async def test_warming_tries_again_by_itself_after_a_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An upstream down at start-up: nothing else would ask for a warm-up (no connection
    closes, no sweep runs), so the pool asks again itself once the back-off is over."""
    monkeypatch.setattr(pool_module, "WARM_BACKOFF", (0.05, 0.1))
    monkeypatch.setattr(pool_module, "WARM_GAP", 0.0)
    pool = FakePool(limit=4, min_connections=2)
    pool.refuse = 2
    await asyncio.wait_for(pool.warm(), 1)  # type: ignore[arg-type]
    assert pool.opened == []
    for _ in range(50):
        await asyncio.sleep(0.01)
        if len(pool.opened) == 2:
            break
    assert pool.open_count == 2 and len(pool.opened) == 2
    await pool.close()


async def test_a_closed_or_retired_pool_warms_nothing() -> None:
    pool = FakePool(limit=4, min_connections=2)
    pool.retire()
    assert pool.warm() is None
    closed = FakePool(limit=4, min_connections=2)
    task = closed.warm()
    await closed.close()  # cancels the warm-up under way
    assert task is not None
    await asyncio.sleep(0)
    assert task.cancelled()
    assert closed.warm() is None


async def test_min_connections_never_exceed_the_pool_limit() -> None:
    pool = FakePool(limit=2, min_connections=5)
    await asyncio.wait_for(pool.warm(), 1)  # type: ignore[arg-type]
    assert pool.open_count == 2 and len(pool.opened) == 2
    await pool.close()
