"""Creating keys for tests through edge's own KeyStore, from sync or async code alike."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from edge.control.records import KeyRecord
from edge.control.specs import NewKey
from edge.control.store import KeyStore
from edge.keys import KID_LEN, SECRET_LEN
from edge.redis import clients as connection
from edge.redis.scripts import Scripts
from edge.settings import RedisSettings, load_settings
from tests.support.edge_process import CONFIG


def _in_thread(coro_factory: Any) -> Any:
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = asyncio.run(coro_factory())
        except BaseException as exc:  # re-raised in the caller's thread
            result["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    if "error" in result:
        raise result["error"]
    return result["value"]


def store_call(redis_url: str, action: Any) -> Any:
    """Run `await action(store)` against a KeyStore on `redis_url`, from any context."""

    async def go() -> Any:
        settings = load_settings(CONFIG, {})
        client = connection.connect(RedisSettings(url=redis_url, timeout=5))
        try:
            return await action(KeyStore(client, Scripts(), settings))
        finally:
            await client.aclose()

    return _in_thread(go)


def new_key(redis_url: str, plan: str = "free", **kw: Any) -> tuple[str, KeyRecord]:
    """(plaintext key, record) of a fresh key."""
    spec = NewKey.model_validate({"plan": plan, **kw})
    return store_call(redis_url, lambda store: store.create(spec, "test"))  # type: ignore[no-any-return]


def secret_part(key: str, prefix: str = "gw_sk_") -> str:
    """The secret segment of a key: what must never appear anywhere but the create answer."""
    start = len(prefix) + KID_LEN
    return key[start : start + SECRET_LEN]
