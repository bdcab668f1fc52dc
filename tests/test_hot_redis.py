"""edge/redis/hot.py, the hot-path Redis client, against real redis-servers: replies reach the right
caller, deadlines hold when Redis stops answering, and it recovers by itself."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import hiredis
import pytest
from redis import exceptions as rex

from edge.redis.hot import BATCH, PipelinedRedis, pack
from tests.support.redis_server import RedisServer


def test_pack_is_a_resp_array_of_bulk_strings() -> None:
    assert pack(("SET", b"k", 12)) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n12\r\n"
    assert pack(("ECHO", "é")) == b"*2\r\n$4\r\nECHO\r\n$2\r\n\xc3\xa9\r\n"


async def test_concurrent_callers_get_their_own_replies(redis_server: RedisServer) -> None:
    client = PipelinedRedis(redis_server.url, 2.0)
    try:
        replies = await asyncio.gather(*(client.execute("ECHO", f"m{i}") for i in range(500)))
        assert replies == [f"m{i}".encode() for i in range(500)]
    finally:
        await client.aclose()


async def test_idle_commands_go_out_at_once_and_a_burst_in_batches(
    redis_server: RedisServer,
) -> None:
    """Nothing in flight: the command is written before send_packed returns (no loop turn of
    latency). Many in one loop turn: the first alone, the rest coalesced `BATCH` to a write
    (Redis starts on the first while the rest are still being made), the last ones at the
    end of the turn."""
    client = PipelinedRedis(redis_server.url, 2.0)
    try:
        assert await client.execute("PING") == b"PONG"  # connected
        pipe = client._pipe
        assert pipe is not None and pipe.transport is not None
        writes: list[bytes] = []
        real_write = pipe.transport.write

        def counting_write(data: bytes) -> None:
            writes.append(data)
            real_write(data)

        pipe.transport.write = counting_write  # type: ignore[method-assign]
        reply = client.send_packed(pack(("ECHO", "now")))
        assert writes == [pack(("ECHO", "now"))]  # already on its way
        assert await reply == b"now"
        writes.clear()
        replies = [client.send_packed(pack(("ECHO", f"b{i}"))) for i in range(1 + 2 * BATCH + 1)]
        first = [pack(("ECHO", "b0"))]
        batches = [
            b"".join(pack(("ECHO", f"b{i}")) for i in range(start, start + BATCH))
            for start in (1, 1 + BATCH)
        ]
        assert writes == first + batches  # the last one waits for the end of this turn
        expected = [f"b{i}".encode() for i in range(len(replies))]
        assert await asyncio.gather(*replies) == expected
        assert writes == [*first, *batches, pack(("ECHO", f"b{len(replies) - 1}"))]
    finally:
        await client.aclose()


async def test_cancelled_callers_do_not_shift_replies(redis_server: RedisServer) -> None:
    """A caller that gives up leaves its reply to be consumed, not handed to the next one."""
    client = PipelinedRedis(redis_server.url, 2.0)
    try:
        for _ in range(20):
            slow = asyncio.ensure_future(client.execute("EVAL", "return ARGV[1]", 0, "cancelled"))
            await asyncio.sleep(0)
            slow.cancel()
            assert await client.execute("ECHO", "mine") == b"mine"
    finally:
        await client.aclose()


async def test_errors_are_redis_py_exceptions(redis_server: RedisServer) -> None:
    client = PipelinedRedis(redis_server.url, 2.0)
    try:
        with pytest.raises(rex.NoScriptError):
            await client.evalsha("0" * 40, 0)
        with pytest.raises(rex.ResponseError):
            await client.execute("NOSUCHCOMMAND")
        assert await client.eval("return {1, 'a'}", 0) == [1, b"a"]
    finally:
        await client.aclose()


async def test_deadline_when_redis_stops_answering_then_recovery(redis_factory) -> None:
    server: RedisServer = redis_factory()
    client = PipelinedRedis(server.url, 0.2)
    try:
        assert await client.execute("PING") == b"PONG"
        server.pause()  # SIGSTOP: the socket stays open, nothing answers
        try:
            start = time.perf_counter()
            results = await asyncio.gather(
                *(client.execute("PING") for _ in range(20)), return_exceptions=True
            )
            elapsed = time.perf_counter() - start
            assert all(isinstance(r, rex.TimeoutError) for r in results), results
            assert elapsed < 0.5
            start = time.perf_counter()
            with pytest.raises(rex.TimeoutError):
                await client.execute("PING")  # a new connection: connects, then no reply
            assert time.perf_counter() - start < 0.5
        finally:
            server.resume()
        assert await client.execute("PING") == b"PONG"
    finally:
        await client.aclose()


async def test_connection_refused_then_back(redis_factory) -> None:
    server: RedisServer = redis_factory()
    client = PipelinedRedis(server.url, 0.5)
    try:
        assert await client.execute("PING") == b"PONG"
        server.kill()
        for _ in range(3):
            start = time.perf_counter()
            with pytest.raises(rex.ConnectionError):
                await client.execute("PING")
            assert time.perf_counter() - start < 0.2
        server.restart()
        assert await client.execute("PING") == b"PONG"
    finally:
        await client.aclose()


async def test_password_and_database_from_the_url(redis_factory) -> None:
    server: RedisServer = redis_factory("--requirepass", "s3cret")
    good = PipelinedRedis(f"redis://:s3cret@127.0.0.1:{server.port}/3", 1.0)
    bad = PipelinedRedis(f"redis://:wrong@127.0.0.1:{server.port}/0", 1.0)
    try:
        await good.execute("SET", "where", "db3")
        assert await good.execute("GET", "where") == b"db3"
        admin = server.client()
        assert admin.execute_command("SELECT", 3) and admin.get("where") == b"db3"
        admin.close()
        with pytest.raises(rex.RedisError):
            await bad.execute("PING")
    finally:
        await good.aclose()
        await bad.aclose()


async def test_unix_socket(redis_factory, tmp_path: Path) -> None:
    path = tmp_path / "redis.sock"
    redis_factory("--unixsocket", str(path), "--unixsocketperm", "700")
    client = PipelinedRedis(f"unix://{path}?db=0", 1.0)
    try:
        assert await client.execute("PING") == b"PONG"
    finally:
        await client.aclose()


class SlowRedis:
    """A loopback server that answers every RESP command `+OK` (PING: `+PONG`) after `delay`
    seconds: each step alone is within the deadline, together they are not."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.server: asyncio.base_events.Server | None = None

    async def __aenter__(self) -> int:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            parser = hiredis.Reader()
            try:
                while data := await reader.read(4096):
                    parser.feed(data)
                    while (command := parser.gets()) is not False:
                        await asyncio.sleep(self.delay)
                        writer.write(b"+PONG\r\n" if command[0] == b"PING" else b"+OK\r\n")
            except ConnectionError:
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def test_one_deadline_covers_connect_handshake_and_reply() -> None:
    """redis.timeout bounds the whole call: AUTH 0.15 s then the reply 0.15 s is a timeout at
    0.2 s, not a success at 0.3 s (each step alone would fit)."""
    async with SlowRedis(0.15) as port:
        client = PipelinedRedis(f"redis://:pw@127.0.0.1:{port}/0", 0.2)
        try:
            start = time.perf_counter()
            with pytest.raises(rex.TimeoutError):
                await client.ping()
            assert time.perf_counter() - start < 0.28
        finally:
            await client.aclose()
        relaxed = PipelinedRedis(f"redis://:pw@127.0.0.1:{port}/0", 1.0)
        try:
            assert await relaxed.ping() == b"PONG"  # the same path works within its deadline
        finally:
            await relaxed.aclose()
