"""The Lua scripts in `edge/redis/lua/`, loaded from package data and called by SHA.

Each script is read once and loaded into Redis at start-up (`SCRIPT LOAD`, on every primary of
a cluster). A call sends `EVALSHA`; when Redis answers `NOSCRIPT` (its script cache was flushed,
or a failover promoted a replica that never saw the script) the same call is sent once as
`EVAL` with the source, which both runs it and caches it again. A `NOSCRIPT` answer means the
script did not run, so this retry can never charge twice. It is the only retried answer.

Errors are translated into `RedisUnavailable` by `failures.py`, as every Redis call of edge's is.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

from redis import exceptions as rex

from edge.redis.failures import translate
from edge.redis.types import Arg, PrepareEvalsha, ScriptClient, StoreClient

NoscriptHook = Callable[[], None]


INCLUDE = re.compile(r"^--#include (\w+)$", re.MULTILINE)


def read_source(name: str) -> str:
    """A script's source as Redis runs it: its file, with each `--#include <part>` line
    replaced by `lua/include/<part>.lua` (code several scripts share; Redis has no modules)."""
    lua = resources.files("edge.redis").joinpath("lua")
    source = lua.joinpath(f"{name}.lua").read_text(encoding="utf-8")
    return INCLUDE.sub(
        lambda m: lua.joinpath("include", f"{m[1]}.lua").read_text(encoding="utf-8").rstrip(),
        source,
    )


class Script:
    """One Lua script: its source, its SHA1, and a call that survives `NOSCRIPT`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.source = read_source(name)
        self.sha = hashlib.sha1(self.source.encode("utf-8")).hexdigest()

    async def __call__(
        self,
        client: ScriptClient,
        keys: Sequence[str],
        args: Sequence[Arg],
        on_noscript: NoscriptHook | None = None,
    ) -> Any:
        """One call (key management's); the request path binds its script once (`bind`)."""
        return await BoundScript(self, client, (), on_noscript)(keys, args)

    def bind(
        self, client: ScriptClient, tail: Sequence[Arg], on_noscript: NoscriptHook | None = None
    ) -> BoundScript:
        """This script on one client, with arguments that end every call (`tail`) fixed."""
        return BoundScript(self, client, tail, on_noscript)


class BoundScript:
    """A script bound to a client and a fixed argument tail: `await bound(keys, args)` runs it
    with `args + tail`, errors translated as `Script` does.

    A client that can prepare an EVALSHA (the request path's own, `hot.PipelinedRedis`) packs
    its fixed part once and sends each call without the generic call chain: admission is the
    one Redis call every request makes (the measured saving is in docs/performance.md)."""

    def __init__(
        self,
        script: Script,
        client: ScriptClient,
        tail: Sequence[Arg],
        on_noscript: NoscriptHook | None,
    ) -> None:
        self.script = script
        self.client = client
        self.tail = tuple(tail)
        self.on_noscript = on_noscript
        self.what = f"{script.name}.lua"
        prepare: PrepareEvalsha | None = getattr(client, "prepare_evalsha", None)
        self._fast = prepare(script.sha, self.tail) if prepare is not None else None

    def now(self, keys: Sequence[str], args: Sequence[Arg]) -> asyncio.Future[Any] | None:
        """The call's reply future, sent at once without a coroutine, on the request path's
        own client while it is connected; None otherwise (then await the call). The reply is
        raw: the caller translates errors (a NOSCRIPT included) itself, or calls again."""
        fast = self._fast
        return fast.now(keys, args) if fast is not None else None

    async def __call__(self, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        try:
            try:
                fast = self._fast
                if fast is None:
                    return await self.client.evalsha(
                        self.script.sha, len(keys), *keys, *args, *self.tail
                    )
                return await fast(keys, args)
            except rex.NoScriptError:
                if self.on_noscript is not None:
                    self.on_noscript()
                return await self.client.eval(
                    self.script.source, len(keys), *keys, *args, *self.tail
                )
        except (rex.RedisError, OSError) as exc:
            raise translate(exc, self.what) from None


SCRIPT_NAMES = (
    "admit",
    "create",
    "credits",
    "refund",
    "reserve",
    "rotate",
    "settle",
    "status",
    "update",
)


class Scripts:
    """All of edge's scripts, by name."""

    def __init__(self) -> None:
        self.admit = Script("admit")
        self.create = Script("create")
        self.credits = Script("credits")
        self.refund = Script("refund")
        self.reserve = Script("reserve")
        self.rotate = Script("rotate")
        self.settle = Script("settle")
        self.status = Script("status")
        self.update = Script("update")

    def all(self) -> list[Script]:
        return [getattr(self, name) for name in SCRIPT_NAMES]

    async def load(self, client: StoreClient) -> None:
        """SCRIPT LOAD every script (on every primary of a cluster)."""
        for script in self.all():
            sha = await client.script_load(script.source)
            if isinstance(sha, bytes):
                sha = sha.decode()
            if sha != script.sha:
                raise RuntimeError(
                    f"Redis hashed {script.name}.lua to {sha}, expected {script.sha}"
                )
