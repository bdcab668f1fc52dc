"""The listing index: every key in creation order, for cursor pages that stay stable.

`edge:keys` is a sorted set whose members are `<created µs:016d>:<kid>` (all scored 0, so
Redis orders them by text: by creation time in Redis microseconds). A page is one ZRANGEBYLEX
from just past the cursor, which is the last member the previous page examined: keys created
or revoked while a client pages neither repeat nor skip others, and the set is one key, so
this holds on a Redis Cluster as well (SCAN's cursors are per node and may repeat). Each owner
has the same kind of set (`owners.keys_key`) for listing by owner.

The index entry is written before the record, so a failure in between leaves an entry without
a record (skipped when listing, and removed once old) rather than a key no listing shows.
Records from before the index are added once, by `ensure`, marked by `edge:keys:indexed:v2`.
"""

from __future__ import annotations

import base64
import binascii
import re

from edge.control.records import text_fields
from edge.keys import RECORD_PATTERN, kid_of
from edge.redis.failures import redis_errors
from edge.redis.types import StoreClient

INDEX = "edge:keys"
INDEXED = "edge:keys:indexed:v2"
MEMBER = re.compile(r"^\d{16}:[0-9A-Za-z]{12}$")


def member(created_us: int, kid: str) -> str:
    """The listing member of `kid`, created at `created_us` (Redis time, microseconds)."""
    return f"{created_us:016d}:{kid}"


def member_seconds(value: str) -> int:
    """The creation time of a member, in whole seconds."""
    return int(value[:16]) // 1_000_000


def member_kid(value: str | bytes) -> str:
    text = value.decode() if isinstance(value, bytes) else value
    return text.split(":", 1)[1]


def encode_cursor(last: str) -> str:
    return base64.urlsafe_b64encode(last.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The member a cursor stands for; ValueError for anything edge did not hand out."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ValueError("not a cursor edge returned") from None
    if not MEMBER.match(text):
        raise ValueError("not a cursor edge returned")
    return text


async def page(
    client: StoreClient, index: str, after: str | None, count: int, newest_first: bool
) -> list[str]:
    """Up to `count` members of `index` past `after`, in listing order."""
    with redis_errors("listing keys"):
        if newest_first:
            high = f"({after}" if after else "+"
            raw = await client.zrevrangebylex(index, high, "-", start=0, num=count)
        else:
            low = f"({after}" if after else "-"
            raw = await client.zrangebylex(index, low, "+", start=0, num=count)
    return [m.decode() if isinstance(m, bytes) else m for m in raw]


async def ensure(client: StoreClient) -> None:
    """Index the records written before the index existed (once per Redis); records already
    indexed (by `store.create`) are left as they are."""
    with redis_errors("indexing keys"):
        if await client.exists(INDEXED):
            return
        from edge.control.owners import keys_key, live_key  # owners imports this module's users

        indexed = {member_kid(m) for m in await client.zrange(INDEX, 0, -1)}
        async for name in client.scan_iter(match=RECORD_PATTERN, count=1000):
            kid = kid_of(name)
            if not kid or kid in indexed:
                continue
            fields = text_fields(await client.hgetall(name))
            if "hash" not in fields:
                continue
            created = int(fields["created"]) if fields.get("created", "").isdigit() else 0
            entry = member(created * 1_000_000, kid)
            await client.zadd(INDEX, {entry: 0})
            owner = fields.get("owner", "")
            if owner:
                await client.zadd(keys_key(owner), {entry: 0})
                if fields.get("status") != "revoked":
                    await client.hsetnx(live_key(owner), kid, created)
        await client.set(INDEXED, "1")
