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

from edge.transport.upstream.connection import Connection
from edge.transport.upstream.errors import BadResponse, PoolFull
from edge.transport.upstream.pool import UpstreamPool
from edge.transport.upstream.response import Response

HEAD = b"POST /v1/x HTTP/1.1\r\nHost: up\r\nContent-Length: 10\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class FakeTransport(asyncio.Transport):
    """What the connection wrote, and whether it closed; closing reports the loss as a real
    transport does, on the next loop turn."""

    def __init__(self, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self.protocol = protocol
        self.written = b""
        self.closed = False
        self.reading = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


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
