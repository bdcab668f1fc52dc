"""What the data plane and edge's server protocol tell each other about one request: the
edge-owned interface between them. It imports nothing of uvicorn, so the proxy does not either.

The protocol puts a `ClientLink` in each request's scope (under `CLIENT`). Through it the
proxy learns that its client left the moment it happens (`gone`, `on_gone`: no watcher task
or timer per request), writes its answers itself through the cycle (`ResponseCycle`: a whole
answer in one write, a streamed one piece by piece from the upstream connection's callback,
with `on_writable` for backpressure), and ends a connection whose body it will not read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from edge.errors import Headers

CLIENT = "edge.client"  # scope key: the request's ClientLink


class ResponseCycle(Protocol):
    """One request's server side, as the proxy writes to it (`transport/cycle.py`)."""

    more_body: bool  # the request body is still arriving
    response_complete: bool  # the answer is whole
    chunked_encoding: bool | None  # the answer is sent chunked (edge frames each piece)

    def take_body(self) -> bytes | None:
        """The whole request body if it has all arrived (and was not taken yet), else None."""

    def answer(self, status: int, headers: Headers, body: bytes) -> bool:
        """A whole answer in one write; False (nothing written) where ASGI must be used."""

    def start_stream(self, status: int, headers: Headers, hold: bool) -> bool:
        """Start an answer whose body follows through `pipe_body`; False as `answer`."""

    def pipe_body(self, body: bytes, more: bool) -> bool:
        """One piece of a started answer; whether the client can take more now."""


class ServerConnection(Protocol):
    """The connection a request arrived on (`transport/protocol.py`)."""

    def end_after_answer(self, cycle: ResponseCycle) -> None:
        """The answer to `cycle` ends the connection; read no more of its request."""


class ClientLink:
    """One request's news of its client: `gone` once the connection is lost before the response
    completed; `on_gone`, if the handler set it, is called at that moment; `on_writable` when
    a client that could take no more drained its backlog."""

    __slots__ = ("connection", "cycle", "gone", "on_gone", "on_writable")

    def __init__(self, cycle: ResponseCycle, connection: ServerConnection) -> None:
        self.cycle = cycle
        self.connection = connection
        self.gone = False
        self.on_gone: Callable[[], None] | None = None
        self.on_writable: Callable[[], None] | None = None

    def whole_body(self) -> bytes | None:
        """The request body if all of it has arrived: what the first `receive()` would hand
        over, without the message and the wait. Else None, and the caller uses `receive()`."""
        return self.cycle.take_body()

    def end_after_answer(self) -> None:
        """The answer about to be given ends the connection, though the client may still be
        sending its body: edge reads no more of it, and closes gracefully after the answer
        (see `EdgeHttpToolsProtocol.end_after_answer`)."""
        self.connection.end_after_answer(self.cycle)
