"""Key lifecycle on Redis, the one code path behind the CLI and the admin API: create, show,
list, update, pause, resume, revoke, rotate, credits; each change audited.

Each write to a key is one Lua script on the key's own slot, so it is atomic and works on a
cluster. Records returned never contain the key or its hash; the plaintext key exists only in
the value `create` and `rotate` return, once. Inputs arrive as validated `key_specs` models.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import orjson

from edge.control import key_index
from edge.control.audit import Audit
from edge.control.owners import STALE_SECONDS, Owners, keys_key
from edge.control.records import KeyRecord, decode_record
from edge.control.specs import MAX_CREDITS, KeyUpdate, NewKey, Scopes, changed_fields
from edge.control.usage import UsageHistory
from edge.keys import KID_LEN, bucket_keys, key_hash, make_key, new_kid, record_key
from edge.redis.buckets import DAY_MS, bucket_used
from edge.redis.failures import redis_errors
from edge.redis.scripts import Scripts
from edge.redis.types import StoreClient
from edge.settings import Settings

KID = re.compile(rf"^[0-9A-Za-z]{{{KID_LEN}}}$")


class StoreError(Exception):
    """A key operation that cannot be done; the message is for the operator."""


class KeyNotFound(StoreError):
    pass


class Conflict(StoreError):
    """The key's state forbids the change (revoked, owner at the cap, no balance to top up)."""


class Page(NamedTuple):
    records: list[KeyRecord]
    next_cursor: str | None


def check_kid(kid: str) -> str:
    if not KID.match(kid):
        raise KeyNotFound(f"no key with id {kid!r}")
    return kid


def _number(value: bytes | str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _scopes_field(scopes: Scopes | None) -> str:
    """The record's `scopes` value; empty (deleted) when nothing is restricted."""
    return orjson.dumps(scopes.model_dump()).decode() if scopes and scopes.restricts() else ""


class KeyStore:
    """Key operations against one Redis client; the CLI and the admin API share it.

    `on_change` callbacks hear the kid of every key a call here changed, the moment Redis has
    the change: what this process remembers about a key (the fail-open table) must not
    outlive a change made through it."""

    def __init__(self, client: StoreClient, scripts: Scripts, settings: Settings) -> None:
        self.client = client
        self.scripts = scripts
        self.settings = settings
        self.owners = Owners(client, scripts.reserve, settings.keys.max_per_owner)
        self.audit = Audit(client, settings.admin.audit_max)
        self.usage = UsageHistory(client)
        self.on_change: list[Callable[[str], None]] = []

    def _changed(self, kid: str) -> None:
        for callback in self.on_change:
            callback(kid)

    @property
    def plans(self) -> dict[str, Any]:
        """Validation context for key_specs models."""
        return {"plans": list(self.settings.plans)}

    async def create(self, spec: NewKey, actor: str) -> tuple[str, KeyRecord]:
        """A new key: (the plaintext key, shown this once; its record)."""
        fields: list[str | int] = ["plan", spec.plan]
        for name in ("name", "owner", "rpm", "rpd", "tpm", "tpd", "credits", "expires_in"):
            value = getattr(spec, name)
            if value not in (None, ""):
                fields += [name, value]
        if spec.expires_at is not None:
            fields += ["expires", spec.expires_at]
        if scopes := _scopes_field(spec.scopes):
            fields += ["scopes", scopes]
        if spec.shadow is not None:
            fields += ["shadow", "1" if spec.shadow else "0"]
        for _ in range(3):  # a kid collision is a 1-in-10^21 event; retry rather than fail
            kid = new_kid()
            key = make_key(self.settings.keys.prefix, kid)
            with redis_errors("creating a key"):
                seconds, micros = await self.client.time()
            created = int(seconds)
            entry = key_index.member(created * 1_000_000 + int(micros), kid)
            if spec.owner and not await self.owners.reserve(spec.owner, kid, entry):
                raise Conflict(
                    f"owner {spec.owner!r} already has {self.owners.cap} keys that are not "
                    "revoked (keys.max_per_owner); revoke one first"
                )
            with redis_errors("creating a key"):
                await self.client.zadd(key_index.INDEX, {entry: 0})
            done = await self.scripts.create(
                self.client, [record_key(kid)], [key_hash(key), "created", created, *fields]
            )
            if done:
                record = await self.get(kid)
                await self.audit.record("create", kid, spec.owner, actor, changed_fields(spec))
                return key, record
        raise StoreError("could not allocate a key id")

    async def get(self, kid: str) -> KeyRecord:
        [record] = await self._records([check_kid(kid)])
        if record is None:
            raise KeyNotFound(f"no key with id {kid!r}")
        return record

    async def list_page(
        self,
        owner: str | None = None,
        status: str | None = None,
        cursor: str | None = None,
        limit: int = 100,
        newest_first: bool = True,
    ) -> Page:
        """One page of keys (optionally one owner's, one status), and the cursor after it."""
        await key_index.ensure(self.client)
        index = keys_key(owner) if owner else key_index.INDEX
        after = key_index.decode_cursor(cursor) if cursor else None
        records: list[KeyRecord] = []
        while True:
            batch = await key_index.page(self.client, index, after, limit, newest_first)
            found = await self._records([key_index.member_kid(entry) for entry in batch])
            dangling = []
            for entry, record in zip(batch, found, strict=True):
                if len(records) == limit:
                    return Page(records, key_index.encode_cursor(after or entry))
                after = entry
                if record is None:
                    dangling.append(entry)
                elif (status is None or record.status == status) and (
                    owner is None or record.owner == owner
                ):
                    records.append(record)
            await self._drop_dangling(index, dangling)
            if len(batch) < limit:
                return Page(records, None)

    async def _records(self, kids: list[str]) -> list[KeyRecord | None]:
        """The records of `kids` with their day usage, in one pipelined round trip (per node
        on a cluster); None for a kid without a record."""
        if not kids:
            return []
        with redis_errors("reading keys"):
            now = await self.client.time()
            pipe = self.client.pipeline(transaction=False)
            for kid in kids:
                pipe.hgetall(record_key(kid))
                pipe.hmget(bucket_keys(kid)[1], "tokens", "ts")
            replies = await pipe.execute()
        now_ms = int(now[0]) * 1000 + int(now[1]) // 1000
        out: list[KeyRecord | None] = []
        for i, kid in enumerate(kids):
            raw, bucket = replies[2 * i], replies[2 * i + 1]
            if not raw or (b"hash" not in raw and "hash" not in raw):
                out.append(None)
                continue
            record = decode_record(kid, raw, self.settings)
            used = bucket_used(
                record.rpd or 0, _number(bucket[0]), _number(bucket[1]), now_ms, DAY_MS
            )
            out.append(dataclasses.replace(record, day_used=used))
        return out

    async def _drop_dangling(self, index: str, entries: list[str]) -> None:
        """Index entries whose record never came (a create that failed half-way), once old."""
        old = [e for e in entries if key_index.member_seconds(e) < time.time() - STALE_SECONDS]
        if old:
            with redis_errors("cleaning the key index"):
                await self.client.zrem(index, *old)

    async def all_keys(self, owner: str | None = None) -> list[KeyRecord]:
        """Every key (optionally one owner's), oldest first."""
        records: list[KeyRecord] = []
        cursor = None
        while True:
            page = await self.list_page(owner, None, cursor, 1000, newest_first=False)
            records += page.records
            if page.next_cursor is None:
                return records
            cursor = page.next_cursor

    async def update(self, kid: str, change: KeyUpdate, actor: str) -> KeyRecord:
        """Apply the fields `change` sets; null clears (see KeyUpdate)."""
        before = await self.get(kid)
        changes = changed_fields(change)
        if not changes:
            raise StoreError("nothing to change")
        pairs: list[str | int] = []
        for name in ("name", "owner", "plan", "rpm", "rpd", "tpm", "tpd", "credits"):
            if name in changes:
                value = getattr(change, name)
                pairs += [name, "" if value is None else value]
        if "expires_at" in changes:
            pairs += ["expires", "" if change.expires_at is None else change.expires_at]
        if "scopes" in changes:
            pairs += ["scopes", _scopes_field(change.scopes)]
        if "shadow" in changes:
            pairs += ["shadow", "" if change.shadow is None else "1" if change.shadow else "0"]
        moving = "owner" in changes and change.owner != before.owner
        entry = await self._entry(kid, before.created or 0)
        reserve = moving and change.owner and before.status != "revoked"
        if reserve and not await self.owners.reserve(change.owner or "", kid, entry):
            raise Conflict(
                f"owner {change.owner!r} already has {self.owners.cap} keys that are not "
                "revoked (keys.max_per_owner)"
            )
        await self._write(kid, self.scripts.update, pairs)
        if moving:
            if before.owner:
                await self.owners.forget(before.owner, kid, entry)
            if change.owner:
                with redis_errors("updating the owner index"):
                    await self.client.zadd(keys_key(change.owner), {entry: 0})
        record = await self.get(kid)
        await self.audit.record("update", kid, record.owner, actor, changes)
        return record

    async def _entry(self, kid: str, created: int) -> str:
        """The key's listing member as indexed (its microseconds are not in the record)."""
        with redis_errors("reading the key index"):
            for candidate in await self.client.zrangebylex(
                key_index.INDEX, f"[{created:010d}", f"({created + 1:010d}"
            ):
                text = candidate.decode() if isinstance(candidate, bytes) else candidate
                if text.endswith(":" + kid):
                    return str(text)
        return key_index.member(created * 1_000_000, kid)

    async def set_status(self, kid: str, status: str, actor: str) -> KeyRecord:
        await self._write(kid, self.scripts.status, [status])
        record = await self.get(kid)
        if status == "revoked" and record.owner:
            await self.owners.release(record.owner, kid)
        action = {"active": "resume", "paused": "pause", "revoked": "revoke"}[status]
        await self.audit.record(action, kid, record.owner, actor, {"status": status})
        return record

    async def rotate(self, kid: str, grace_seconds: int, actor: str) -> tuple[str, KeyRecord]:
        """A new secret for the same kid; the old key stays valid for `grace_seconds`."""
        key = make_key(self.settings.keys.prefix, check_kid(kid))
        await self._write(kid, self.scripts.rotate, [key_hash(key), grace_seconds])
        record = await self.get(kid)
        changes = {"grace_seconds": grace_seconds}
        await self.audit.record("rotate", kid, record.owner, actor, changes)
        return key, record

    async def end_grace(self, kid: str, actor: str) -> KeyRecord:
        """The previous secret of a rotation stops working now (its grace ends)."""
        await self._write(kid, self.scripts.update, ["prev_hash", "", "prev_until", ""])
        record = await self.get(kid)
        await self.audit.record("end_grace", kid, record.owner, actor, {})
        return record

    async def add_credits(self, kid: str, delta: int, actor: str) -> KeyRecord:
        """Top up (or take from) the balance, atomically; it never goes below 0."""
        reply = await self.scripts.credits(self.client, [record_key(check_kid(kid))], [delta])
        status = int(reply[0])
        if status == 1:
            raise KeyNotFound(f"no key with id {kid!r}")
        if status == 2:
            raise Conflict(f"key {kid} is revoked; revocation is final")
        if status == 3:
            raise Conflict(
                f"key {kid} has unlimited credits; give it a balance first (update credits)"
            )
        if status == 4:
            raise Conflict(
                f"key {kid}: a balance holds at most {MAX_CREDITS:,} credits; this change would "
                "pass that, so nothing changed"
            )
        balance = int(reply[1])
        self._changed(kid)
        record = await self.get(kid)
        changes = {"delta": delta, "credits": balance}
        await self.audit.record("credits", kid, record.owner, actor, changes)
        return record

    async def _write(self, kid: str, script: Any, args: list[str | int]) -> None:
        """One of the record scripts that answer 1 done, 0 no such key, -1 revoked; on success
        the change is announced (`on_change`)."""
        done = await script(self.client, [record_key(check_kid(kid))], args)
        if done == 0:
            raise KeyNotFound(f"no key with id {kid!r}")
        if done == -1:
            raise Conflict(f"key {kid} is revoked; revocation is final")
        self._changed(kid)
