"""Owners: the per-owner index of keys and the `keys.max_per_owner` cap.

Redis Cluster: an owner's index lives under a hash tag of its own, a digest of the owner name
(`edge:owner:{<h>}:live`, `edge:owner:{<h>}:keys`), so checking the cap and taking a place is
one script on one slot (`reserve.lua`): twenty concurrent creates for an owner one below the
cap make exactly one key. The key's record lives in the key's slot and is written after the
reservation. A crash in between leaves a reservation without a record; so does a revocation
whose index update failed. When an owner hits the cap, `reclaim` drops reservations whose key
is revoked, belongs to someone else now, or never got a record within STALE_SECONDS, and the
reservation is tried once more.
"""

from __future__ import annotations

import hashlib

from edge.control.records import text_fields
from edge.keys import record_key
from edge.redis.failures import redis_errors
from edge.redis.scripts import Script
from edge.redis.types import StoreClient

STALE_SECONDS = 60


def owner_tag(owner: str) -> str:
    """The owner's hash tag: a digest, so any owner text makes a valid, bounded key name."""
    return hashlib.sha256(owner.encode("utf-8")).hexdigest()[:24]


def live_key(owner: str) -> str:
    """kid → reservation time, for the owner's keys that are not revoked (the cap counts these)."""
    return f"edge:owner:{{{owner_tag(owner)}}}:live"


def keys_key(owner: str) -> str:
    """Sorted set of listing members for all the owner's keys (see key_index.member)."""
    return f"edge:owner:{{{owner_tag(owner)}}}:keys"


class Owners:
    def __init__(self, client: StoreClient, reserve: Script, cap: int) -> None:
        self.client = client
        self._reserve = reserve
        self.cap = cap

    async def reserve(self, owner: str, kid: str, member: str) -> bool:
        """Take a place for `kid` under `owner`'s cap; False when the owner is at the cap."""
        args = (kid, self.cap, member)
        keys = (live_key(owner), keys_key(owner))
        if await self._reserve(self.client, keys, args):
            return True
        if await self.reclaim(owner):
            return bool(await self._reserve(self.client, keys, args))
        return False

    async def release(self, owner: str, kid: str) -> None:
        """`kid` no longer counts against `owner`'s cap (it was revoked); still listed."""
        with redis_errors("updating the owner index"):
            await self.client.hdel(live_key(owner), kid)

    async def forget(self, owner: str, kid: str, member: str) -> None:
        """`kid` no longer belongs to `owner` at all (it moved to another owner)."""
        with redis_errors("updating the owner index"):
            await self.client.hdel(live_key(owner), kid)
            await self.client.zrem(keys_key(owner), member)

    async def reclaim(self, owner: str) -> int:
        """Drop reservations that no longer hold a place; how many were dropped."""
        with redis_errors("checking the owner index"):
            held = text_fields(await self.client.hgetall(live_key(owner)))
            now = int((await self.client.time())[0])
            stale = []
            for kid, reserved in held.items():
                record = text_fields(await self.client.hgetall(record_key(kid)))
                if not record:
                    young = reserved.isdigit() and now - int(reserved) < STALE_SECONDS
                    if not young:
                        stale.append(kid)
                elif record.get("status") == "revoked" or record.get("owner", "") != owner:
                    stale.append(kid)
            if stale:
                await self.client.hdel(live_key(owner), *stale)
        return len(stale)
