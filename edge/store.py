"""Key lifecycle on Redis: create, show, list, pause, resume, revoke, rotate, set limits.

Each write is one Lua script on the key's own slot, so it is atomic and works on a cluster.
Records returned never contain the key or its hash; the plaintext key exists only in the value
`create_key` and `rotate_key` return, once.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from edge.keys import KID_LEN, RECORD_PATTERN, key_hash, kid_of, make_key, new_kid, record_key
from edge.redis_types import StoreClient
from edge.scripts import Scripts, redis_errors
from edge.settings import Settings

KID = re.compile(rf"^[0-9A-Za-z]{{{KID_LEN}}}$")
WHOLE = re.compile(r"^\d{1,12}$")
TEXT_LIMIT = 200
STATUSES = ("active", "paused", "revoked")
# Durations edge accepts for expiry and rotation grace: whole seconds up to 100 years, so the
# resulting Unix times stay 10-12 digit integers that admit.lua and `keys show` read alike.
MAX_SECONDS = 100 * 365 * 86_400


class StoreError(Exception):
    """A key operation that cannot be done; the message is for the operator."""


class KeyNotFound(StoreError):
    pass


class KeyRevoked(StoreError):
    pass


@dataclass(frozen=True)
class KeyRecord:
    id: str
    plan: str
    status: str
    name: str
    owner: str
    rpm: int | None
    rpd: int | None
    rpm_override: int | None
    rpd_override: int | None
    created: int | None
    expires: int | None
    last_used: int | None
    requests: int
    rotated: int | None
    previous_key_valid_until: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _int(value: str | None) -> int | None:
    return int(value) if value is not None and WHOLE.match(value) else None


def decode_record(kid: str, raw: dict[Any, Any], settings: Settings) -> KeyRecord:
    """A record as stored (bytes or str fields) as a `KeyRecord`, hash fields left out."""
    f = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in raw.items()
    }
    plan = settings.plans.get(f.get("plan", ""))
    rpm_o, rpd_o = _int(f.get("rpm")), _int(f.get("rpd"))
    return KeyRecord(
        id=kid,
        plan=f.get("plan", ""),
        status=f.get("status") or "active",
        name=f.get("name", ""),
        owner=f.get("owner", ""),
        rpm=rpm_o if rpm_o is not None else (plan.rpm if plan else None),
        rpd=rpd_o if rpd_o is not None else (plan.rpd if plan else None),
        rpm_override=rpm_o,
        rpd_override=rpd_o,
        created=_int(f.get("created")),
        expires=_expires(f.get("expires")),
        last_used=_int(f.get("last_used")),
        requests=_int(f.get("requests")) or 0,
        rotated=_int(f.get("rotated")),
        previous_key_valid_until=_int(f.get("prev_until")) if f.get("prev_hash") else None,
    )


def _expires(value: str | None) -> int | None:
    """As admit.lua reads it: empty = never; anything but a whole number = already expired (0)."""
    if not value:
        return None
    parsed = _int(value)
    return 0 if parsed is None else parsed


def check_seconds(label: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_SECONDS:
        raise StoreError(f"{label} must be whole seconds from {minimum} to {MAX_SECONDS}")
    return value


def check_kid(kid: str) -> str:
    if not KID.match(kid):
        raise KeyNotFound(f"no key with id {kid!r}")
    return kid


def _check_text(label: str, value: str) -> str:
    if len(value) > TEXT_LIMIT or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise StoreError(f"{label} must be at most {TEXT_LIMIT} printable characters")
    return value


def _check_limit(label: str, value: int | None) -> None:
    if value is not None and not 0 <= value < 10**12:
        raise StoreError(f"{label} must be a whole number from 0 to 999999999999")


class KeyStore:
    """Key operations against one Redis client; the CLI and the app share it."""

    def __init__(self, client: StoreClient, scripts: Scripts, settings: Settings) -> None:
        self.client = client
        self.scripts = scripts
        self.settings = settings

    async def create(
        self,
        plan: str,
        name: str = "",
        owner: str = "",
        rpm: int | None = None,
        rpd: int | None = None,
        expires_in: int | None = None,
    ) -> tuple[str, KeyRecord]:
        """A new key: (the plaintext key, shown this once; its record)."""
        if plan not in self.settings.plans:
            known = ", ".join(self.settings.plans)
            raise StoreError(f"unknown plan {plan!r}; configured plans: {known}")
        _check_limit("rpm", rpm)
        _check_limit("rpd", rpd)
        if expires_in is not None:
            check_seconds("expires_in", expires_in, 1)
        fields: list[str | int] = ["plan", plan]
        fields += ["name", _check_text("name", name)] if name else []
        fields += ["owner", _check_text("owner", owner)] if owner else []
        fields += ["rpm", rpm] if rpm is not None else []
        fields += ["rpd", rpd] if rpd is not None else []
        fields += ["expires_in", expires_in] if expires_in is not None else []
        for _ in range(3):  # a kid collision is a 1-in-10^21 event; retry rather than fail
            kid = new_kid()
            key = make_key(self.settings.keys.prefix, kid)
            created = await self.scripts.create(
                self.client, [record_key(kid)], [key_hash(key), *fields]
            )
            if created:
                return key, await self.get(kid)
        raise StoreError("could not allocate a key id")

    async def get(self, kid: str) -> KeyRecord:
        with redis_errors("reading a key"):
            raw = await self.client.hgetall(record_key(check_kid(kid)))
        if not raw:
            raise KeyNotFound(f"no key with id {kid!r}")
        return decode_record(kid, raw, self.settings)

    async def list(self, owner: str | None = None) -> list[KeyRecord]:
        """Every key (optionally one owner's), oldest first."""
        with redis_errors("listing keys"):
            names = [n async for n in self.client.scan_iter(match=RECORD_PATTERN, count=1000)]
        records = []
        for name in names:
            kid = kid_of(name)
            if kid is None:
                continue
            with redis_errors("reading a key"):
                raw = await self.client.hgetall(record_key(kid))
            if raw:
                record = decode_record(kid, raw, self.settings)
                if owner is None or record.owner == owner:
                    records.append(record)
        return sorted(records, key=lambda r: (r.created or 0, r.id))

    async def set_status(self, kid: str, status: str) -> KeyRecord:
        if status not in STATUSES:
            raise StoreError(f"status must be one of {', '.join(STATUSES)}")
        done = await self.scripts.status(self.client, [record_key(check_kid(kid))], [status])
        if done == 0:
            raise KeyNotFound(f"no key with id {kid!r}")
        if done == -1:
            raise KeyRevoked(f"key {kid} is revoked; revocation is final")
        return await self.get(kid)

    async def rotate(self, kid: str, grace_seconds: int = 0) -> tuple[str, KeyRecord]:
        """A new secret for the same kid; the old key stays valid for `grace_seconds`."""
        check_seconds("grace", grace_seconds, 0)
        key = make_key(self.settings.keys.prefix, check_kid(kid))
        done = await self.scripts.rotate(
            self.client, [record_key(kid)], [key_hash(key), grace_seconds]
        )
        if done == 0:
            raise KeyNotFound(f"no key with id {kid!r}")
        if done == -1:
            raise KeyRevoked(f"key {kid} is revoked; revocation is final")
        return key, await self.get(kid)

    async def set_limits(self, kid: str, rpm: int | None, rpd: int | None) -> KeyRecord:
        """Per-key overrides; -1 clears one (back to the plan's value), None leaves it."""
        pairs: list[str | int] = []
        for label, value in (("rpm", rpm), ("rpd", rpd)):
            if value is None:
                continue
            if value == -1:
                pairs += [label, ""]
            else:
                _check_limit(label, value)
                pairs += [label, value]
        if not pairs:
            raise StoreError("give --rpm and/or --rpd")
        done = await self.scripts.update(self.client, [record_key(check_kid(kid))], pairs)
        if done == 0:
            raise KeyNotFound(f"no key with id {kid!r}")
        return await self.get(kid)
