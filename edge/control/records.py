"""A key record as operators see it: decoded from the Redis hash exactly as admit.lua reads it,
and never holding the key or its hash. Pure, no I/O."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import orjson

from edge.settings import Settings

WHOLE = re.compile(r"^\d{1,12}$")
BALANCE = re.compile(r"^-?\d{1,12}$")
COUNT = re.compile(r"^\d{1,15}$")


@dataclass(frozen=True)
class KeyRecord:
    id: str
    plan: str
    status: str
    name: str
    owner: str
    rpm: int | None  # effective: the override, else the plan's
    rpd: int | None
    rpm_override: int | None
    rpd_override: int | None
    tpm: int | None  # LLM tokens per minute / day: effective (None: no token limit)
    tpd: int | None
    tpm_override: int | None
    tpd_override: int | None
    created: int | None
    expires: int | None
    last_used: int | None
    requests: int
    tokens: int  # LLM tokens used, as settled
    credits: int | None  # None: unlimited; below zero after usage in flight ran past it
    shadow: bool  # effective: limits observed, not enforced (the key's say, else the plan's)
    shadow_override: bool | None  # None: the plan's
    scopes: dict[str, Any] | None  # {"routes": [...], "models": [...]}; None: no restriction
    rotated: int | None
    previous_key_valid_until: int | None
    previous_key_requests: int  # answers to the previous secret since the last rotation
    previous_key_last_used: int | None
    day_used: int = 0  # requests the day bucket holds back now: "today" against rpd

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _int(value: str | None) -> int | None:
    return int(value) if value is not None and WHOLE.match(value) else None


def text_fields(raw: dict[Any, Any]) -> dict[str, str]:
    """A hash as Redis returned it (bytes or str) with str names and values."""
    return {
        (k.decode() if isinstance(k, bytes) else k): (
            v.decode("utf-8", "replace") if isinstance(v, bytes) else v
        )
        for k, v in raw.items()
    }


def decode_record(kid: str, raw: dict[Any, Any], settings: Settings) -> KeyRecord:
    """A record as stored as a `KeyRecord`, hash fields left out."""
    f = text_fields(raw)
    plan = settings.plans.get(f.get("plan", ""))
    rpm_o, rpd_o = _int(f.get("rpm")), _int(f.get("rpd"))
    tpm_o, tpd_o = _int(f.get("tpm")), _int(f.get("tpd"))
    shadow_o = SHADOW_VALUES.get(f.get("shadow", ""))
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
        tpm=tpm_o if tpm_o is not None else (plan.tpm if plan else None),
        tpd=tpd_o if tpd_o is not None else (plan.tpd if plan else None),
        tpm_override=tpm_o,
        tpd_override=tpd_o,
        created=_int(f.get("created")),
        expires=_or_none_left(f.get("expires")),
        last_used=_int(f.get("last_used")),
        requests=_int(f.get("requests")) or 0,
        tokens=_count(f.get("tokens")),
        credits=_balance(f.get("credits")),
        shadow=shadow_o if shadow_o is not None else bool(plan and plan.shadow),
        shadow_override=shadow_o,
        scopes=_scopes(f.get("scopes")),
        rotated=_int(f.get("rotated")),
        previous_key_valid_until=_int(f.get("prev_until")) if f.get("prev_hash") else None,
        previous_key_requests=_int(f.get("previous_key_requests")) or 0,
        previous_key_last_used=_int(f.get("previous_key_last_used")),
    )


SHADOW_VALUES = {"1": True, "true": True, "0": False, "false": False}  # as admit.lua reads them


def _or_none_left(value: str | None) -> int | None:
    """`expires` as admit.lua reads it: absent or empty = None (never expires); anything but a
    whole number = 0 (already expired)."""
    if not value:
        return None
    parsed = _int(value)
    return 0 if parsed is None else parsed


def _balance(value: str | None) -> int | None:
    """`credits` as admit.lua reads it: absent or empty = None (unlimited); a whole number,
    maybe below zero, = the balance; anything else = 0 (none left)."""
    if not value:
        return None
    return int(value) if BALANCE.match(value) else 0


def _count(value: str | None) -> int:
    return int(value) if value is not None and COUNT.match(value) else 0


def plan_rows(settings: Settings) -> list[dict[str, Any]]:
    """The plan table as the CLI and the admin API show it (tpm, tpd: None = no limit)."""
    return [
        {"plan": name, "rpm": p.rpm, "rpd": p.rpd, "tpm": p.tpm, "tpd": p.tpd, "shadow": p.shadow}
        for name, p in settings.plans.items()
    ]


def pricing_rows(settings: Settings) -> dict[str, Any]:
    """The price list as the CLI and the admin API show it: credits per admitted request, and
    per million tokens by model glob, first match wins."""
    return {
        "request": settings.pricing.request,
        "models": [price.model_dump() for price in settings.pricing.models],
    }


def _scopes(value: str | None) -> dict[str, Any] | None:
    """As admit.lua reads it: absent or empty = no restriction; unreadable = nothing allowed."""
    if not value:
        return None
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError:
        data = None
    if data == []:  # Lua cannot tell an empty array from {}: no restriction either way
        data = {}
    if not isinstance(data, dict):
        return {"routes": [], "models": [], "error": "unreadable: nothing is allowed"}
    scopes = {name: _strings(data.get(name)) for name in ("routes", "models")}
    return scopes if scopes["routes"] or scopes["models"] else None


def _strings(value: Any) -> list[str]:
    return [item for item in value if isinstance(item, str)] if isinstance(value, list) else []
