"""The Redis client surfaces edge relies on, as Protocols, so its boundary is typed without
depending on one client library: redis-py (standalone, cluster, fakeredis) and edge's own
pipelined client (`hot.py`) both satisfy them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol

Arg = str | bytes | int | float
"""One argument of a Redis command, as both clients encode it."""


class PreparedCall(Protocol):
    """An EVALSHA with its SHA and last arguments fixed: called with the keys and the rest;
    `now` gives the reply's future at once (None if the connection is not up)."""

    def __call__(self, keys: Sequence[str], args: Sequence[Arg]) -> Awaitable[Any]: ...

    def now(self, keys: Sequence[str], args: Sequence[Arg]) -> asyncio.Future[Any] | None: ...


PrepareEvalsha = Callable[[str, Sequence[Arg]], PreparedCall]
"""A client's way of preparing one (only edge's pipelined client has it)."""


class ScriptClient(Protocol):
    """What the request path needs: run a script by SHA or source, and answer a PING."""

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Arg) -> Any: ...

    async def eval(self, script: str, numkeys: int, *keys_and_args: Arg) -> Any: ...

    async def ping(self) -> Any: ...

    async def aclose(self) -> None: ...


class StoreClient(ScriptClient, Protocol):
    """What key management needs besides scripts: read a record, walk the key space."""

    async def hgetall(self, name: str) -> dict[Any, Any]: ...

    def scan_iter(
        self, match: str | None = None, count: int | None = None
    ) -> AsyncIterator[Any]: ...

    async def script_load(self, script: str) -> Any: ...

    def pipeline(self, transaction: bool = True) -> Any: ...

    # and the plain commands key management uses (hdel, zadd, xadd, time, …): redis-py's
    # signatures, typed as Any here rather than restated
    def __getattr__(self, name: str) -> Any: ...
