"""`GET /v1/models` with several upstreams: one list, the union of theirs.

Each upstream is asked at once (with its own provider key); an id counts only if that
upstream's `models` globs serve it (so a provider's whole catalogue does not leak through an
upstream configured for three models), the first upstream in the configuration wins a
duplicate, and a key with model scopes sees only the ids its scopes allow. An upstream that
fails is left out and logged; when all fail, the client gets a 502.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import orjson

from edge import errors
from edge.keys import record_key
from edge.proxy.exchange import Exchange
from edge.proxy.metering import glob_regex
from edge.proxy.policy import RawHeaders
from edge.proxy.routing import Target
from edge.redis.failures import FAILURES
from edge.transport.upstream.errors import UpstreamError, describe

log = logging.getLogger("edge.proxy.models")
MAX_LIST_BYTES = 8 * 1024 * 1024  # one upstream's model list, at most


class NoList(Exception):
    """No upstream gave a usable list."""


async def fetch_list(target: Target, headers: RawHeaders) -> list[dict[str, Any]] | None:
    """The model objects `target` lists that it serves; None when it cannot say (logged)."""
    path = target.base_path + b"/models"
    try:
        resp = await target.pool.request("GET", path, headers + target.provider, None, None)
    except UpstreamError as exc:
        target.breaker.failed()
        log.warning("model list from upstream %s: %s", target.name, describe(exc))
        return None
    try:
        parts, size = [], 0
        while True:
            chunk = await resp.read()
            size += len(chunk)
            if size > MAX_LIST_BYTES:
                raise ValueError(f"over {MAX_LIST_BYTES} bytes")
            parts.append(chunk)
            if resp.done:
                break
        if resp.status != 200:
            raise ValueError(f"status {resp.status}")
        data = orjson.loads(b"".join(parts)).get("data")
        if not isinstance(data, list):
            raise ValueError("no data list")
    except (UpstreamError, ValueError, AttributeError) as exc:  # orjson's error is a ValueError
        log.warning("model list from upstream %s unusable: %s", target.name, exc)
        return None
    finally:
        resp.close()
    return [
        item
        for item in data
        if isinstance(item, dict) and isinstance(item.get("id"), str) and target.serves(item["id"])
    ]


async def union(
    targets: Sequence[Target], headers: RawHeaders, scopes: Sequence[str] | None
) -> bytes:
    """The OpenAI list object of every upstream's models (see the module's docstring);
    `scopes`: the key's model globs, None when it has none. Raises NoList."""
    lists = await asyncio.gather(*(fetch_list(t, headers) for t in targets))
    if all(items is None for items in lists):
        raise NoList
    allowed = [glob_regex(glob) for glob in scopes] if scopes is not None else None
    seen: set[str] = set()
    data = []
    for items in lists:
        for item in items or ():
            model = item["id"]
            if model in seen:
                continue
            if allowed is not None and not any(p.fullmatch(model) for p in allowed):
                continue
            seen.add(model)
            data.append(item)
    return orjson.dumps({"object": "list", "data": data})


async def answer_models(
    ex: Exchange, redis: Any, targets: Sequence[Target], headers: RawHeaders
) -> None:
    """Answer `GET /v1/models` with the union (a scoped key's scopes read from its record)."""
    d = ex.decision
    scopes = None
    if d is not None and d.model_scoped and ex.kid is not None:
        try:
            scopes = scope_models(await redis.hget(record_key(ex.kid), "scopes"))
        except FAILURES:
            await ex.fail(errors.RedisUnavailable("connection", "reading scopes"), "unavailable")
            return
    try:
        body = await union(targets, headers, scopes)
    except NoList:
        log.warning("GET /v1/models: no upstream gave its list")
        await ex.fail(errors.UpstreamUnreachable(), "upstream_error")
        return
    await ex.answer_json(body)


def scope_models(raw: bytes | str | None) -> list[str] | None:
    """A record's `scopes` field as admit.lua reads its model globs: absent, empty or without
    models → None (no restriction); unreadable → [] (nothing allowed)."""
    if not raw:
        return None
    try:
        scopes = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return []
    if scopes == [] or scopes == {}:
        return None
    if not isinstance(scopes, dict):
        return []
    models = scopes.get("models")
    if not isinstance(models, list) or not models:
        return None
    return [m for m in models if isinstance(m, str)]
