"""A lean, pipelined RESP2 client for the request hot path (EVALSHA / EVAL only).

Why not redis-py here: profiling edge under load (py-spy, 32 connections) put redis-py's async
command path at ~26% of the process's CPU: every send wraps the write in `asyncio.wait_for`
(a new Task per command when a socket timeout is set), every call takes the pool's lock and
runs observability hooks. This client keeps one connection per process, pipelines every
caller's command on it (Redis is single-threaded; one connection is not a bottleneck), matches
replies to callers in order with hiredis's parser, and coalesces the writes of one event-loop
turn into one `send()`.

Failure behaviour is the hot path's contract: no retries ever; each call has a deadline; on a
deadline miss the connection is dropped and every caller waiting on it fails at once (they
would all miss their deadlines anyway), and the next call reconnects. Errors are redis-py's
exception classes, so callers translate them in one place (`scripts.py`).

redis-py keeps everything off the hot path (admin, health checks, Redis Cluster, embedded).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Any

import hiredis
from redis import exceptions as rex
from redis.asyncio.connection import SSLConnection, parse_url

Arg = str | bytes | int | float


def pack(args: tuple[Arg, ...]) -> bytes:
    """One command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            raw = arg
        elif isinstance(arg, str):
            raw = arg.encode()
        elif isinstance(arg, int):
            raw = b"%d" % arg
        else:
            raw = repr(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


def _reply_error(err: hiredis.ReplyError) -> rex.RedisError:
    text = str(err)
    if text.startswith("NOSCRIPT"):
        return rex.NoScriptError(text)
    if text.startswith(("NOAUTH", "WRONGPASS")):
        return rex.AuthenticationError(text)
    return rex.ResponseError(text)


class _Pipe(asyncio.Protocol):
    """One connection: commands go out in order, replies come back in the same order.

    Deadlines are kept by one watchdog timer per connection rather than a timer per call: it
    fires at the oldest pending call's deadline and, if that reply is still missing, fails the
    connection; otherwise it re-arms for the new oldest. Under load that is one timer per
    `timeout` period instead of one per request.
    """

    def __init__(self, timeout: float) -> None:
        self.reader = hiredis.Reader()
        self.pending: deque[asyncio.Future[Any]] = deque()
        self.deadlines: deque[float] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.timeout = timeout
        self._out: list[bytes] = []
        self._loop = asyncio.get_running_loop()
        self._watchdog: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if not self.pending:
                self.fail(rex.ConnectionError("reply without a request"))
                return
            fut = self.pending.popleft()
            self.deadlines.popleft()
            if fut.done():  # its caller gave up (cancelled); the reply is just consumed
                continue
            if isinstance(reply, hiredis.ReplyError):
                fut.set_exception(_reply_error(reply))
            else:
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail_pending(rex.ConnectionError(f"Redis closed the connection: {exc or 'EOF'}"))

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        fut = self._loop.create_future()
        if self.closed:
            fut.set_exception(rex.ConnectionError("connection to Redis is closed"))
            return fut
        self.pending.append(fut)
        self.deadlines.append(self._loop.time() + self.timeout)
        if self._watchdog is None:
            self._watchdog = self._loop.call_at(self.deadlines[0], self._check_deadline)
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out.append(packed)
        return fut

    def _check_deadline(self) -> None:
        self._watchdog = None
        if not self.deadlines or self.closed:
            return
        if self.deadlines[0] <= self._loop.time():
            self.fail(rex.TimeoutError(f"no reply from Redis within {self.timeout}s"))
        else:
            self._watchdog = self._loop.call_at(self.deadlines[0], self._check_deadline)

    def _flush(self) -> None:
        data, self._out = b"".join(self._out), []
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def fail(self, exc: rex.RedisError) -> None:
        """Drop the connection and fail everyone waiting on it."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        self._fail_pending(exc)

    def _fail_pending(self, exc: rex.RedisError) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self.deadlines.clear()
        while self.pending:
            fut = self.pending.popleft()
            if not fut.done():
                fut.set_exception(exc)


class RespClient:
    """`await client.evalsha(sha, numkeys, *keys_and_args)` over one pipelined connection."""

    def __init__(self, url: str, timeout: float) -> None:
        params = parse_url(url)
        self.timeout = timeout
        self._path: str | None = params.get("path")
        self._host: str = params.get("host", "127.0.0.1")
        self._port: int = params.get("port", 6379)
        tls = params.get("connection_class") is SSLConnection
        self._ssl = ssl.create_default_context() if tls else None
        self._handshake: list[tuple[Arg, ...]] = []
        if params.get("password"):
            user, password = params.get("username"), params["password"]
            self._handshake.append(("AUTH", user, password) if user else ("AUTH", password))
        if params.get("db"):
            self._handshake.append(("SELECT", params["db"]))
        self._pipe: _Pipe | None = None
        self._connecting: asyncio.Task[_Pipe] | None = None

    async def execute(self, *args: Arg) -> Any:
        pipe = self._pipe
        if pipe is None or pipe.closed:
            pipe = await self._connection()
        return await pipe.send(pack(args))

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Arg) -> Any:
        return await self.execute("EVALSHA", sha, numkeys, *keys_and_args)

    async def eval(self, script: str, numkeys: int, *keys_and_args: Arg) -> Any:
        return await self.execute("EVAL", script, numkeys, *keys_and_args)

    async def _connection(self) -> _Pipe:
        """The live connection, opening it once for all concurrent callers."""
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.create_task(self._connect())
        return await asyncio.shield(self._connecting)

    async def _connect(self) -> _Pipe:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                if self._path:
                    _, pipe = await loop.create_unix_connection(self._protocol, self._path)
                else:
                    _, pipe = await loop.create_connection(
                        self._protocol, self._host, self._port, ssl=self._ssl
                    )
                try:
                    for command in self._handshake:
                        await pipe.send(pack(command))
                except BaseException:
                    pipe.fail(rex.ConnectionError("Redis handshake failed"))
                    raise
        except TimeoutError:
            raise rex.TimeoutError(f"could not connect to Redis within {self.timeout}s") from None
        except OSError as exc:
            raise rex.ConnectionError(f"could not connect to Redis: {exc}") from None
        self._pipe = pipe
        return pipe

    def _protocol(self) -> _Pipe:
        return _Pipe(self.timeout)

    async def aclose(self) -> None:
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        if self._pipe is not None and not self._pipe.closed:
            self._pipe.fail(rex.ConnectionError("client closed"))
        self._pipe = None
