"""The audit log: one entry per admin change, from the API or the CLI.

Kept in Redis as a capped stream (`XADD edge:audit MAXLEN ~ admin.audit_max`; the entry id is
Redis time) and written as one structured log line (`edge.audit`, JSON). An entry names the
action, the key id, the owner, the actor (`admin-api <address>` or `cli`) and the changed
fields: never a key, a hash or a token (`changes` come from the validated request models,
which hold none).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import orjson

from edge.control.records import text_fields
from edge.redis.failures import redis_errors
from edge.redis.types import StoreClient

AUDIT_KEY = "edge:audit"
ENTRY_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
SCAN_STEP = 500  # entries read at a time when looking for one key's
log = logging.getLogger("edge.control.audit")


class Audit:
    def __init__(self, client: StoreClient, maxlen: int) -> None:
        self.client = client
        self.maxlen = maxlen

    async def record(
        self, action: str, kid: str, owner: str, actor: str, changes: dict[str, Any]
    ) -> None:
        fields = {
            "action": action,
            "key": kid,
            "owner": owner,
            "actor": actor,
            "changes": orjson.dumps(changes).decode(),
        }
        with redis_errors("writing the audit log"):
            entry_id = await self.client.xadd(
                AUDIT_KEY, fields, maxlen=self.maxlen, approximate=True
            )
        text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        line = {"id": text, "action": action, "key": kid, "owner": owner, "actor": actor}
        log.info("%s", orjson.dumps({**line, "changes": changes}).decode())

    async def page(
        self, cursor: str | None, limit: int, key: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Entries newest first, from just before `cursor` (an entry id); and the next cursor.
        With `key`, only that key's: the stream is read back SCAN_STEP entries at a time until
        `limit` are found (it holds at most `admin.audit_max`)."""
        if cursor is not None and not ENTRY_ID.match(cursor):
            raise ValueError("not a cursor edge returned")
        high = f"({cursor}" if cursor else "+"
        step = limit if key is None else max(limit, SCAN_STEP)
        entries: list[dict[str, Any]] = []
        while True:
            with redis_errors("reading the audit log"):
                raw = await self.client.xrevrange(AUDIT_KEY, high, "-", count=step)
            for entry_id, fields in raw:
                entry = _entry(entry_id, fields)
                if key is None or entry["key"] == key:
                    entries.append(entry)
                    if len(entries) == limit:
                        return entries, entry["id"]
            if len(raw) < step:
                return entries, None
            high = f"({_entry(*raw[-1])['id']}"


def _entry(entry_id: Any, raw: dict[Any, Any]) -> dict[str, Any]:
    text_id = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    fields = text_fields(raw)
    try:
        changes = orjson.loads(fields.get("changes", "{}"))
    except orjson.JSONDecodeError:
        changes = {}
    return {
        "id": text_id,
        "time": int(text_id.split("-", 1)[0]) / 1000,
        "action": fields.get("action", ""),
        "key": fields.get("key", ""),
        "owner": fields.get("owner", ""),
        "actor": fields.get("actor", ""),
        "changes": changes,
    }
