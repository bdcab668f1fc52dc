"""edge/transport/protocol.py in process, on a fake transport, as uvicorn tests its own protocols:
bytes in, bytes out, no socket. Each limit and race of the server protocol, pinned down."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from edge.transport.link import CLIENT
from edge.transport.protocol import Limits, protocol_class
from tests.support.fake_transport import FakeTransport

Scope = dict[str, Any]


class App:
    """An ASGI app that reads the whole body and answers 200 with it; it keeps each scope."""

    def __init__(self) -> None:
        self.scopes: list[Scope] = []
        self.before_answer: Any = None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if self.before_answer is not None:
            self.before_answer(scope)
        headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def connect(app: App, **limits: Any) -> tuple[Any, FakeTransport]:
    config = Config(app=app, interface="asgi3", lifespan="off", log_config=None)
    config.load()
    kind = protocol_class(Limits(**{**DEFAULTS, **limits}))
    protocol = kind(config, ServerState(), {}, asyncio.get_running_loop())
    transport = FakeTransport()
    transport.protocol = protocol
    protocol.connection_made(transport)
    return protocol, transport


DEFAULTS: dict[str, Any] = {
    "max_header_bytes": 1024,
    "max_headers": 20,
    "header_timeout": 5.0,
    "max_connections": 0,
    "body_timeout": 5.0,
}


async def settle(turns: int = 10) -> None:
    for _ in range(turns):
        await asyncio.sleep(0)


def statuses(data: bytes) -> list[int]:
    """The status of every answer written, in order (the bodies here never look like one)."""
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]


async def test_a_head_over_the_budget_is_refused_even_when_it_arrives_in_pieces() -> None:
    protocol, transport = await connect(App())
    head = b"GET /v1/x HTTP/1.1\r\nHost: h\r\nX-Pad: " + b"p" * 1500 + b"\r\n\r\n"
    for i in range(0, len(head), 100):
        if transport.closed:
            break
        protocol.data_received(head[i : i + 100])
    await settle()
    assert statuses(transport.written) == [431] and transport.closed
    assert i < 1300, "read on long after the budget"


async def test_a_head_under_the_budget_in_pieces_is_served() -> None:
    app = App()
    protocol, transport = await connect(app)
    head = b"GET /v1/x HTTP/1.1\r\nHost: h\r\nX-Pad: " + b"p" * 800 + b"\r\n\r\n"
    for i in range(0, len(head), 7):
        protocol.data_received(head[i : i + 7])
    await settle()
    assert statuses(transport.written) == [200]


async def test_a_request_pipelined_after_a_keepalive_answer_is_served_in_order() -> None:
    app = App()
    protocol, transport = await connect(app)
    one = b"POST /v1/a HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\none"
    two = b"POST /v1/b HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\ntwo"
    protocol.data_received(one + two)
    await settle(30)
    assert statuses(transport.written) == [200, 200]
    assert transport.written.index(b"one") < transport.written.index(b"two")
    assert [s["path"] for s in app.scopes] == ["/v1/a", "/v1/b"]


async def test_a_pipelined_head_over_the_budget_waits_for_the_answer_before_it() -> None:
    app = App()
    protocol, transport = await connect(app)
    small = b"GET /v1/a HTTP/1.1\r\nHost: h\r\n\r\n"
    big = b"GET /v1/b HTTP/1.1\r\nHost: h\r\nX-Pad: " + b"p" * 1500 + b"\r\n\r\n"
    protocol.data_received(small + big)
    await settle(30)
    assert statuses(transport.written) == [200, 431] and transport.closed
    assert [s["path"] for s in app.scopes] == ["/v1/a"]


async def test_trailers_never_reach_the_scopes_headers() -> None:
    app = App()
    protocol, transport = await connect(app)
    protocol.data_received(
        b"POST /v1/a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\nAuthorization: Bearer x\r\nX-Real-IP: 6.6.6.6\r\n\r\n"
    )
    await settle(30)
    assert statuses(transport.written) == [200]
    names = {name for name, _ in app.scopes[0]["headers"]}
    assert names == {b"host", b"transfer-encoding"}


@pytest.mark.parametrize("fields", [30, 1])
async def test_trailers_over_the_limits_are_refused(fields: int) -> None:
    protocol, transport = await connect(App())
    size = 20 if fields > 1 else 2000
    trailers = b"".join(b"X-T%d: %s\r\n" % (i, b"t" * size) for i in range(fields))
    protocol.data_received(
        b"POST /v1/a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n"
        + trailers
        + b"\r\n"
    )
    await settle(30)
    assert statuses(transport.written) == [431] and transport.closed


async def test_a_stalled_body_gets_408_after_the_body_timeout() -> None:
    protocol, transport = await connect(App(), body_timeout=0.05)
    protocol.data_received(b"POST /v1/a HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nab")
    await asyncio.sleep(0.03)
    protocol.data_received(b"cd")  # a piece in time: the deadline moves on
    await asyncio.sleep(0.03)
    assert not transport.closed
    await asyncio.sleep(0.1)
    assert statuses(transport.written) == [408] and transport.closed


async def test_an_answer_that_ends_the_connection_lingers_instead_of_resetting() -> None:
    """The app refuses before reading the body (as the proxy refuses a stranger): the answer
    goes out, then a half-close; what the client still sends is dropped unparsed."""
    app = App()

    async def refusing(scope: Scope, receive: Any, send: Any) -> None:
        scope[CLIENT].end_after_answer()
        await send({"type": "http.response.start", "status": 401, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    protocol, transport = await connect(app)
    protocol.app = refusing
    protocol.data_received(b"POST /v1/a HTTP/1.1\r\nHost: h\r\nContent-Length: 100000\r\n\r\nxx")
    await settle(30)
    assert statuses(transport.written) == [401]
    assert b"connection: close" in transport.written.lower()
    assert transport.eof and not transport.closed  # half-closed, still reading
    before = len(transport.written)
    protocol.data_received(b"GET /v1/b HTTP/1.1\r\nHost: h\r\n\r\n")  # dropped, never parsed
    await settle(30)
    assert len(transport.written) == before and len(app.scopes) == 0


@pytest.mark.parametrize("path", ["edge", "asgi"])
async def test_a_finished_request_is_freed_at_once_not_left_to_the_garbage_collector(
    path: str,
) -> None:
    """scope → link → cycle → scope once made every request cyclic garbage: 8 objects a
    request, and a full collection (19-36 ms, the loop stopped) once a second under load.
    Answered through edge's own write path or through ASGI messages, a request's cycle is
    freed by reference counting as soon as the next one replaces it."""
    import gc
    import weakref

    cycles: list[weakref.ref[Any]] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        link = scope[CLIENT]
        cycles.append(weakref.ref(link.cycle))
        headers = [(b"content-type", b"text/plain"), (b"content-length", b"2")]
        if path == "edge":
            link.whole_body()
            assert link.cycle.answer(200, headers, b"ok")
            return
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    protocol, transport = await connect(App())
    protocol.app = app
    protocol.access_log = False  # as edge runs uvicorn (its own write path needs it)
    gc.disable()
    try:
        for _ in range(5):
            protocol.data_received(b"POST /v1/x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi")
            await settle()
        assert statuses(transport.written) == [200] * 5
        assert [ref() is None for ref in cycles[:4]] == [True] * 4
    finally:
        gc.enable()
