"""A lean, pipelined RESP2 client for the request hot path (EVALSHA / EVAL / PING only).

Why not redis-py here: profiling edge under load (py-spy, 32 connections) put redis-py's async
command path at ~26% of the process's CPU: every send wraps the write in `asyncio.wait_for`
(a new Task per command when a socket timeout is set), every call takes the pool's lock and
runs observability hooks. This client keeps one connection per process, pipelines every
caller's command on it (Redis is single-threaded; one connection is not a bottleneck), matches
replies to callers in order with hiredis's parser, and coalesces the writes of one event-loop
turn, `BATCH` commands to a `send()` (a command sent while nothing is in flight goes out at
once).

It is built from redis-py's own parse of the URL (`redis_urls.parse_redis_url`), so host,
port, socket path, user, password, database, client name and every TLS option mean exactly
what they mean to redis-py and the CLI.

Failure behaviour is the hot path's contract: no retries ever; each call has one deadline,
`timeout` after it was made, that covers connecting (TCP, TLS, AUTH) and the reply together;
on a deadline miss the connection is dropped and every caller waiting on it fails at once (they
would all miss their deadlines anyway), and the next call reconnects. Errors are redis-py's
exception classes, so callers translate them in one place (`failures.py`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Sequence
from typing import Any

import hiredis
from redis import exceptions as rex

from edge.redis.types import Arg
from edge.redis_urls import parse_redis_url, tls_context


def pack(args: tuple[Arg, ...]) -> bytes:
    """One command as a RESP array of bulk strings."""
    return b"*%d\r\n" % len(args) + pack_args(args)


def pack_args(args: Sequence[Arg]) -> bytes:
    """Arguments as RESP bulk strings, without the array header: a command's parts can be
    packed apart (a fixed tail once at start-up) and joined under one header."""
    out = []
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


# Commands per write at most. Without a cap, under load every admission of a loop turn went
# out in one write at the turn's end: Redis then ran the whole batch (~20 µs each) while edge,
# whose next work was those replies, waited, and then edge worked while Redis waited; with
# small batches Redis starts on the first ones while edge parses the rest. Measured (wrk, 32
# connections, one worker, 2 cores): no cap 11,000 req/s with edge busy 79 % of the time; a
# cap of 16: 12,300-12,600; 8: 12,700-13,500; 4: 13,300-13,800 (edge busy 97 %); 2: 12,800;
# 1: 12,600 (a write per command costs more CPU than it saves). Same CPU per request.
BATCH = 4


class _Pipe(asyncio.Protocol):
    """One connection: commands go out in order, replies come back in the same order.

    Deadlines are kept by one watchdog timer per connection rather than a timer per call: it
    fires at the earliest pending deadline and, if that reply is still missing, fails the
    connection; otherwise it re-arms. Under load that is one timer per `timeout` period
    instead of one per request.
    """

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.pending: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._out: list[bytes] = []
        self._flush_due = False  # a flush is scheduled for the end of this loop turn
        self._loop = self.loop = asyncio.get_running_loop()
        self._watchdog: asyncio.TimerHandle | None = None
        self._armed_at = float("inf")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if not self.pending:
                self.fail(rex.ConnectionError("reply without a request"))
                return
            fut, _ = self.pending.popleft()
            if fut.done():  # its caller gave up (cancelled); the reply is just consumed
                continue
            if isinstance(reply, hiredis.ReplyError):
                fut.set_exception(_reply_error(reply))
            else:
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail_pending(rex.ConnectionError(f"Redis closed the connection: {exc or 'EOF'}"))

    def send(self, packed: bytes, deadline: float) -> asyncio.Future[Any]:
        """Queue one command; its reply must arrive by `deadline` (loop time)."""
        fut = self._loop.create_future()
        if self.closed:
            fut.set_exception(rex.ConnectionError("connection to Redis is closed"))
            return fut
        idle = not self.pending
        self.pending.append((fut, deadline))
        if deadline < self._armed_at:
            self._arm(deadline)
        if idle and not self._out and self.transport is not None:
            # Nothing in flight, nothing queued: no command to coalesce with, so write now
            # rather than one loop turn later (at low load that turn is latency).
            self.transport.write(packed)
            return fut
        out = self._out
        out.append(packed)
        if len(out) >= BATCH:
            self._flush()
        elif not self._flush_due:
            self._flush_due = True
            self._loop.call_soon(self._end_of_turn)
        return fut

    def _arm(self, at: float) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._armed_at = at
        self._watchdog = self._loop.call_at(at, self._check_deadlines)

    def _check_deadlines(self) -> None:
        self._watchdog, self._armed_at = None, float("inf")
        waiting = [deadline for fut, deadline in self.pending if not fut.done()]
        if not waiting or self.closed:
            return
        earliest = min(waiting)
        if earliest <= self._loop.time():
            self.fail(rex.TimeoutError("no reply from Redis in time"))
        else:
            self._arm(earliest)

    def _end_of_turn(self) -> None:
        self._flush_due = False
        if self._out:
            self._flush()

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
            self._watchdog, self._armed_at = None, float("inf")
        while self.pending:
            fut, _ = self.pending.popleft()
            if not fut.done():
                fut.set_exception(exc)


class PreparedEvalsha:
    """One script's EVALSHA with its fixed part packed (see `PipelinedRedis.prepare_evalsha`):
    `await prepared(keys, args)`, or `prepared.now(keys, args)` for the reply's future without
    a coroutine (None when the connection is not up: then use the awaitable form)."""

    __slots__ = ("client", "fixed", "head", "tail")

    def __init__(self, client: PipelinedRedis, sha: str, tail: Sequence[Arg]) -> None:
        self.client = client
        self.head = pack_args(("EVALSHA", sha))
        self.tail = pack_args(tail)
        self.fixed = 3 + len(tail)  # EVALSHA, sha, numkeys, and the tail

    def _pack(self, keys: Sequence[str], args: Sequence[Arg]) -> bytes:
        count = self.fixed + len(keys) + len(args)
        body = pack_args((len(keys), *keys, *args))
        return b"*%d\r\n%s%s%s" % (count, self.head, body, self.tail)

    def __call__(self, keys: Sequence[str], args: Sequence[Arg]) -> Awaitable[Any]:
        return self.client.send_packed(self._pack(keys, args))

    def now(self, keys: Sequence[str], args: Sequence[Arg]) -> asyncio.Future[Any] | None:
        pipe = self.client._pipe
        if pipe is None or pipe.closed:
            return None
        return pipe.send(self._pack(keys, args), pipe.loop.time() + self.client.timeout)


class PipelinedRedis:
    """`await client.evalsha(sha, numkeys, *keys_and_args)` over one pipelined connection."""

    def __init__(self, url: str, timeout: float) -> None:
        params = parse_redis_url(url)
        self.timeout = timeout
        self._path: str | None = params.get("path")
        self._host: str = params.get("host", "localhost")
        self._port: int = params.get("port", 6379)
        self._ssl = tls_context(params) if url.startswith("rediss://") else None
        self._handshake: list[tuple[Arg, ...]] = []
        if params.get("password"):
            user, password = params.get("username"), params["password"]
            self._handshake.append(("AUTH", user, password) if user else ("AUTH", password))
        if params.get("db"):
            self._handshake.append(("SELECT", params["db"]))
        if params.get("client_name"):
            self._handshake.append(("CLIENT", "SETNAME", params["client_name"]))
        self._pipe: _Pipe | None = None
        self._connecting: asyncio.Task[_Pipe] | None = None

    async def execute(self, *args: Arg) -> Any:
        return await self.send_packed(pack(args))

    def send_packed(self, packed: bytes) -> Awaitable[Any]:
        """One command packed by the caller (`pack`). On a live connection this is the reply's
        future itself: no coroutine between the caller and the reply."""
        pipe = self._pipe
        if pipe is None or pipe.closed:
            return self._send_connecting(packed)
        return pipe.send(packed, pipe.loop.time() + self.timeout)

    async def _send_connecting(self, packed: bytes) -> Any:
        # (asyncio.get_running_loop() costs a getpid() syscall: only on this rare path)
        deadline = asyncio.get_running_loop().time() + self.timeout
        pipe = await self._connection(deadline)
        return await pipe.send(packed, deadline)

    def prepare_evalsha(self, sha: str, tail: Sequence[Arg]) -> PreparedEvalsha:
        """An EVALSHA of `sha` whose last arguments are always `tail`, packed once: each call
        packs only its keys and arguments (`scripts.BoundScript` uses it on the request path)."""
        return PreparedEvalsha(self, sha, tail)

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Arg) -> Any:
        return await self.execute("EVALSHA", sha, numkeys, *keys_and_args)

    async def eval(self, script: str, numkeys: int, *keys_and_args: Arg) -> Any:
        return await self.execute("EVAL", script, numkeys, *keys_and_args)

    async def ping(self) -> Any:
        return await self.execute("PING")

    async def _connection(self, deadline: float) -> _Pipe:
        """The live connection, opening it once for all concurrent callers; each caller waits
        no longer than its own deadline."""
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.create_task(self._connect(deadline))
            # Callers that gave up must not leave its failure unretrieved.
            self._connecting.add_done_callback(lambda t: t.cancelled() or t.exception())
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(self._connecting)
        except TimeoutError:
            raise rex.TimeoutError("could not connect to Redis in time") from None

    async def _connect(self, deadline: float) -> _Pipe:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(deadline):
                if self._path:
                    _, pipe = await loop.create_unix_connection(_Pipe, self._path)
                else:
                    _, pipe = await loop.create_connection(
                        _Pipe, self._host, self._port, ssl=self._ssl
                    )
                try:
                    for command in self._handshake:
                        await pipe.send(pack(command), deadline)
                except BaseException:
                    pipe.fail(rex.ConnectionError("Redis handshake failed"))
                    raise
        except TimeoutError:
            raise rex.TimeoutError("could not connect to Redis in time") from None
        except OSError as exc:  # refused, unreachable, TLS verification (ssl.SSLError)
            raise rex.ConnectionError(f"could not connect to Redis: {exc}") from None
        self._pipe = pipe
        return pipe

    async def aclose(self) -> None:
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        if self._pipe is not None and not self._pipe.closed:
            self._pipe.fail(rex.ConnectionError("client closed"))
        self._pipe = None
