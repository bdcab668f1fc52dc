"""The access log (`log.access`): one JSON line per /v1 request on the `edge.access` logger.

Written off the event loop: a line's bytes are handed to a `logs.LineWriter`, whose thread
writes what is waiting to standard output every 0.1 s, as one record of the `edge.access`
logger (a record and a write per line cost a request ten times as much: see LineWriter).
A line says who asked for what and
how it went, and nothing else: the key's public id (never the key, its hash or any header
value), its plan and owner, the client's address (the one a trusted proxy reports, else the
peer's), the method, the path without its query string, the model when edge read it, the
status sent, the outcome, the bytes each way, the duration, the upstream's time to first byte,
the tokens of a metered request and the upstream's `x-request-id` (to find the line in the
provider's logs).

The owner is not in the admission's reply: it is looked up by key id, in one pipelined call
for all the lines waiting for one, and remembered for OWNER_TTL seconds. A line waits for its
owner only in memory, never the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import orjson

from edge.keys import record_key
from edge.logs import LineWriter
from edge.proxy.exchange import AccessNote, Exchange
from edge.proxy.policy import TrustedProxies
from edge.redis.failures import FAILURES
from edge.redis.types import StoreClient

log = logging.getLogger("edge.access")
OWNER_TTL = 60.0
OWNERS_KEPT = 10_000
WAITING_MOST = 10_000  # lines waiting for an owner; beyond, they are written without one


def client_address(
    peer: str | None, headers: Iterable[tuple[bytes, bytes]], trusted: TrustedProxies
) -> str | None:
    """The client as edge believes it: the peer, or, when the peer is a trusted proxy, the
    last address in X-Forwarded-For that is not one of the trusted proxies."""
    if peer is None or not trusted.trusts(peer):
        return peer
    chain = [
        hop.strip().decode("ascii", "replace")
        for name, value in headers
        if name == b"x-forwarded-for"
        for hop in value.split(b",")
    ]
    for hop in reversed(chain):
        if hop and not trusted.trusts(hop):
            return hop
    return chain[0] if chain and chain[0] else peer


class AccessLog:
    """Takes lines from the request path; looks up owners; writes them from a thread."""

    def __init__(self, client: StoreClient) -> None:
        self.client = client
        self._owners: dict[str, tuple[str, float]] = {}
        self._waiting: list[tuple[dict[str, Any], str]] = []
        self._lookup: asyncio.Task[None] | None = None
        self._writer = LineWriter(log)

    def start(self) -> None:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.handlers[:] = [handler]
        log.propagate = False
        log.setLevel(logging.INFO)
        self._writer.start()

    async def close(self) -> None:
        """Write what is waiting (owners looked up if Redis answers in time), then stop."""
        if self._lookup is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._lookup), 2.0)
        for line, _ in self._waiting:
            self._write(line)
        self._waiting = []
        self._writer.stop()

    def forget(self, kid: str) -> None:
        """The key changed through this instance (its owner may have): look it up again."""
        self._owners.pop(kid, None)

    def add(self, line: dict[str, Any], kid: str | None) -> None:
        """One request's line; its `owner` filled in from `kid` before it is written."""
        if kid is None:
            line["owner"] = None
            self._write(line)
            return
        known = self._owners.get(kid)
        if known is not None and known[1] > time.monotonic():
            line["owner"] = known[0] or None
            self._write(line)
            return
        if len(self._waiting) >= WAITING_MOST:
            line["owner"] = None
            self._write(line)
            return
        self._waiting.append((line, kid))
        if self._lookup is None:
            self._lookup = asyncio.get_running_loop().create_task(self._look_up())

    async def _look_up(self) -> None:
        try:
            while self._waiting:
                waiting, self._waiting = self._waiting, []
                kids = sorted({kid for _, kid in waiting})
                owners: dict[str, str | None] = {}
                try:
                    pipe = self.client.pipeline(transaction=False)
                    for kid in kids:
                        pipe.hget(record_key(kid), "owner")
                    found = await pipe.execute()
                except FAILURES:
                    found = [None] * len(kids)  # written without: a log never waits on Redis
                else:
                    until = time.monotonic() + OWNER_TTL
                    if len(self._owners) > OWNERS_KEPT:
                        self._owners.clear()
                    for kid, owner in zip(kids, found, strict=True):
                        text = owner.decode() if isinstance(owner, bytes) else (owner or "")
                        self._owners[kid] = (text, until)
                for kid, owner in zip(kids, found, strict=True):
                    owners[kid] = (owner.decode() if isinstance(owner, bytes) else owner) or None
                for line, kid in waiting:
                    line["owner"] = owners.get(kid)
                    self._write(line)
        finally:
            self._lookup = None

    def _write(self, line: dict[str, Any]) -> None:
        self._writer.add(orjson.dumps(line))


def entry(ex: Exchange, note: AccessNote, trusted: TrustedProxies) -> dict[str, Any]:
    """The line of a finished exchange (its `owner` is the AccessLog's to fill in)."""
    scope = ex.scope
    took = time.perf_counter() - ex.start
    client = scope.get("client")
    headers = scope["headers"]
    raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
    length = note.request_bytes
    if length is None:
        sent = next((v for n, v in headers if n == b"content-length"), b"")
        length = int(sent) if sent.isdigit() else 0
    status = ex.status or None
    return {
        "time": timestamp(time.time() - took),
        "key": ex.kid,
        "plan": note.plan,
        "owner": None,
        "client": client_address(client[0] if client else None, headers, trusted),
        "method": ex.method,
        "path": raw_path.decode("ascii", "replace"),
        "model": note.model,
        "status": 499 if status is None and ex.client_gone else status,
        "outcome": ex.outcome,
        "request_bytes": length,
        "response_bytes": note.response_bytes,
        "duration_ms": round(took * 1000, 3),
        "upstream_ttfb_ms": round(note.ttfb * 1000, 3) if note.ttfb is not None else None,
        "input_tokens": note.tokens[0] if note.tokens else None,
        "output_tokens": note.tokens[1] if note.tokens else None,
        "request_id": ex.the_request_id().decode("ascii"),
        "upstream_request_id": note.upstream_id,
    }


def upstream_request_id(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The upstream's `x-request-id` (OpenAI's), for the access log: printable ASCII only."""
    for name, value in headers:
        if name.lower() == b"x-request-id" and len(value) <= 200:
            text = value.decode("ascii", "replace")
            return text if text.isprintable() else None
    return None


_second: list[Any] = [None, ""]  # the last whole second formatted, and its text


def timestamp(seconds: float) -> str:
    """Unix time as UTC ISO 8601 with milliseconds (the second's text formatted once)."""
    whole = int(seconds)
    if _second[0] != whole:
        _second[:] = [whole, datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S.")]
    return f"{_second[1]}{int((seconds - whole) * 1000):03d}Z"
