"""The Lua scripts in `edge/lua/`, loaded from package data and called by SHA.

Each script is read once and loaded into Redis at start-up (`SCRIPT LOAD`, on every primary of
a cluster). A call sends `EVALSHA`; when Redis answers `NOSCRIPT` (its script cache was flushed,
or a failover promoted a replica that never saw the script) the same call is sent once as
`EVAL` with the source, which both runs it and caches it again. A `NOSCRIPT` answer means the
script did not run, so this retry can never charge twice. It is the only retried answer.

Redis exceptions are translated here, once, into `RedisUnavailable` with a `kind` for metrics.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from typing import Any

from redis import exceptions as rex

from edge.errors import ServiceUnavailable
from edge.hot_redis import PipelinedRedis, pack_args
from edge.redis_types import Arg, ScriptClient, StoreClient

NoscriptHook = Callable[[], None]


class RedisUnavailable(ServiceUnavailable):
    """Redis did not answer usefully; `kind` is timeout, connection, noscript or other."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__()
        self.kind = kind
        self.detail = detail


def error_kind(exc: BaseException) -> str:
    if isinstance(exc, rex.TimeoutError | TimeoutError):
        return "timeout"
    if isinstance(exc, rex.ConnectionError | ConnectionError | OSError):
        return "connection"
    if isinstance(exc, rex.NoScriptError):
        return "noscript"
    return "other"


def read_source(name: str) -> str:
    return resources.files("edge").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


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

    On the request path's own client (`PipelinedRedis`) the EVALSHA is packed here, its fixed
    part once, and sent without the generic call chain: admission is the one Redis call every
    request makes (the measured saving is in the README's Performance section)."""

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
        self._hot = client if isinstance(client, PipelinedRedis) else None
        self._head = pack_args(("EVALSHA", script.sha))
        self._packed_tail = pack_args(self.tail)
        self._fixed = 3 + len(self.tail)  # EVALSHA, sha, numkeys, and the tail

    async def __call__(self, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        try:
            try:
                hot = self._hot
                if hot is None:
                    return await self.client.evalsha(
                        self.script.sha, len(keys), *keys, *args, *self.tail
                    )
                count = self._fixed + len(keys) + len(args)
                body = pack_args((len(keys), *keys, *args))
                return await hot.send_packed(
                    b"*%d\r\n%s%s%s" % (count, self._head, body, self._packed_tail)
                )
            except rex.NoScriptError:
                if self.on_noscript is not None:
                    self.on_noscript()
                return await self.client.eval(
                    self.script.source, len(keys), *keys, *args, *self.tail
                )
        except (rex.RedisError, OSError) as exc:
            raise translate(exc, self.what) from None


@contextlib.contextmanager
def redis_errors(what: str) -> Iterator[None]:
    """Translate whatever redis-py or the socket raises inside into `RedisUnavailable`."""
    try:
        yield
    except (rex.RedisError, OSError) as exc:
        raise translate(exc, what) from None


def translate(exc: rex.RedisError | OSError, what: str) -> RedisUnavailable:
    if isinstance(exc, rex.ResponseError):
        return RedisUnavailable("other", f"{what}: {exc}")
    return RedisUnavailable(error_kind(exc), f"{what}: {type(exc).__name__}: {exc}")


SCRIPT_NAMES = ("admit", "create", "credits", "refund", "reserve", "rotate", "status", "update")


class Scripts:
    """All of edge's scripts, by name."""

    def __init__(self) -> None:
        self.admit = Script("admit")
        self.create = Script("create")
        self.credits = Script("credits")
        self.refund = Script("refund")
        self.reserve = Script("reserve")
        self.rotate = Script("rotate")
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
