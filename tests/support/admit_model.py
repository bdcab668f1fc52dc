"""A pure-Python reference of admit.lua, written from its header comment, for the model-based
property test: given a key's record, its two buckets, Redis time and the request, what the
script must answer and leave behind."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

MINUTE, DAY, EPS = 60_000, 86_400_000, 1e-9
WHOLE = re.compile(r"^\d{1,12}$")


SIGNED = re.compile(r"^-?\d+$")


def whole(value: str | None) -> int | None:
    return int(value) if value is not None and WHOLE.match(value) else None


def signed(value: str | None) -> int | None:
    """A balance as admit.lua reads it: a whole number of at most 13 characters, maybe < 0."""
    return int(value) if value is not None and len(value) <= 13 and SIGNED.match(value) else None


def number(value: str | None) -> float | None:
    try:
        parsed = float(value) if value is not None else None
    except ValueError:
        return None
    return None if parsed is None or parsed != parsed else parsed


@dataclass
class Outcome:
    reply: list[Any]
    buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # written: tokens, ts
    record: dict[str, str] = field(default_factory=dict)  # written fields


def level(
    bucket: dict[str, str], cap: int, window: int, now: int, debt: bool = False
) -> tuple[float, float]:
    tokens, ts = number(bucket.get("tokens")), number(bucket.get("ts"))
    if tokens is None or ts is None:
        return float(cap), float(now)
    floor = -cap * 1000.0 if debt else 0.0
    tokens = min(max(tokens, floor), float(cap))
    ts = min(ts, now + window)
    if now > ts:
        if cap > 0:
            tokens = min(cap, tokens + (now - ts) * cap / window)
        ts = now
    return tokens, ts


def until(tokens: float, ts: float, cap: int, window: int, target: float, now: int) -> int:
    if tokens >= target - EPS:
        return 0
    if cap <= 0:
        return window
    return math.ceil((ts - now) + (target - tokens) * window / cap)


def _route_ok(routes: list[str], route: str) -> bool:
    return any(route == r or route.startswith(r + "/") for r in routes)


def glob_matches(pattern: str, value: str) -> bool:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, re.DOTALL) is not None


def _strings(value: Any) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def decide(
    rec: dict[str, str],
    buckets: dict[str, dict[str, str]],
    now_ms: int,
    presented: str,
    route: str,
    model: str,
    plans: dict[str, tuple[int, int, int, int, int]],
    price: int = 1,
) -> Outcome:
    """`buckets`: the key's bucket hashes by suffix (m, d, tm, td); `plans`: name → (rpm, rpd,
    tpm, tpd, shadow), -1 for no token limit; `price`: credits per admitted request."""
    if "hash" not in rec:
        return Outcome([1])
    now_s = now_ms // 1000
    if rec["hash"] != presented:
        grace = whole(rec.get("prev_until"))
        if not (rec.get("prev_hash") == presented and grace is not None and now_s < grace):
            return Outcome([1])
    plan = rec.get("plan", "")
    status = rec.get("status")
    if status == "revoked":
        return Outcome([2, plan])
    if rec.get("expires"):
        expires = whole(rec["expires"])
        if expires is None or now_s >= expires:
            return Outcome([3, plan])
    if status not in (None, "", "active"):
        return Outcome([4, plan])
    if plan not in plans:
        return Outcome([7, plan])
    plan_rpm, plan_rpd, plan_tpm, plan_tpd, plan_shadow = plans[plan]
    shadow = {"1": True, "true": True, "0": False, "false": False}.get(
        rec.get("shadow", ""), bool(plan_shadow)
    )
    limited = bool(rec.get("credits"))
    credits = 0
    if limited:
        credits = signed(rec["credits"]) or 0
    balance = 4 if limited else 0
    expiry = whole(rec.get("expires")) or 0

    def short(code: int, scoped: int, what: int = 0) -> Outcome:
        return Outcome([code, plan, what, 0, 0, 0, 0, 0, 0, credits, scoped + balance, expiry])

    scoped = 0
    if rec.get("scopes"):
        try:
            scopes = json.loads(rec["scopes"])
        except ValueError:
            scopes = None
        if scopes == []:  # cjson decodes [] and {} alike
            scopes = {}
        if not isinstance(scopes, dict):
            return short(8, 2)
        routes, models = _strings(scopes.get("routes")), _strings(scopes.get("models"))
        scoped = (1 if models else 0) + (2 if routes else 0)
        if routes and not _route_ok(routes, route):
            return short(8, scoped, 1)
        if models:
            if model == "":
                return short(10, scoped)
            if model != "~":
                if not model.startswith("=") or len(model[1:].encode()) > 256:
                    return short(11, scoped)
                if not any(glob_matches(g, model[1:]) for g in models):
                    return short(8, scoped, 2)
    if limited and credits <= 0:
        return short(9, scoped)

    def limit(name: str, plan_value: int) -> int:
        value = whole(rec.get(name))
        return plan_value if value is None else value

    rpm, rpd = limit("rpm", plan_rpm), limit("rpd", plan_rpd)
    tpm, tpd = limit("tpm", plan_tpm), limit("tpd", plan_tpd)
    mt, mts = level(buckets.get("m", {}), rpm, MINUTE, now_ms)
    dt, dts = level(buckets.get("d", {}), rpd, DAY, now_ms)
    tmt = tdt = 0.0
    tm_full = td_full = 0
    tmts = tdts = float(now_ms)
    if tpm >= 0:
        tmt, tmts = level(buckets.get("tm", {}), tpm, MINUTE, now_ms, debt=True)
        tm_full = until(tmt, tmts, tpm, MINUTE, tpm, now_ms)
    if tpd >= 0:
        tdt, tdts = level(buckets.get("td", {}), tpd, DAY, now_ms, debt=True)
        td_full = until(tdt, tdts, tpd, DAY, tpd, now_ms)
    tokens = [tpm, tpd, math.floor(tmt + EPS), tm_full, math.floor(tdt + EPS), td_full]
    if tpm < 0 and tpd < 0:
        tokens = []  # a key without token limits: the reply ends at its 12th entry
    flags = scoped + balance
    requests_state = [
        math.floor(mt + EPS), until(mt, mts, rpm, MINUTE, rpm, now_ms),
        math.floor(dt + EPS), until(dt, dts, rpd, DAY, rpd, now_ms),
    ]  # fmt: skip

    def admitted(reply: list[Any], charged: dict[str, tuple[float, float]]) -> Outcome:
        written = {"last_used": str(now_s)}
        requests = whole(rec.get("requests"))
        written["requests"] = str(requests + 1 if requests is not None else 1)
        if limited and price > 0:
            reply[9] = credits - price
            written["credits"] = str(credits - price)
        return Outcome(reply, charged, written)

    def limited_or_shadowed(reply: list[Any]) -> Outcome:
        if not shadow:
            return Outcome(reply)
        reply[0] = {5: 14, 6: 15, 12: 16, 13: 17}[reply[0]]
        return admitted(reply, {})  # no bucket charged

    if mt < 1 - EPS or dt < 1 - EPS:
        code, retry = 5, 0
        if dt < 1 - EPS:
            code, retry = 6, until(dt, dts, rpd, DAY, 1, now_ms)
        if mt < 1 - EPS:
            retry = max(retry, until(mt, mts, rpm, MINUTE, 1, now_ms))
        return limited_or_shadowed([code, plan, rpm, rpd, *requests_state, retry, credits, flags,
                                    expiry, *tokens])  # fmt: skip
    if (tpm >= 0 and tmt <= EPS) or (tpd >= 0 and tdt <= EPS):
        code, retry = 12, 0
        if tpd >= 0 and tdt <= EPS:
            code, retry = 13, until(tdt, tdts, tpd, DAY, EPS * 2, now_ms) + 1
        if tpm >= 0 and tmt <= EPS:
            retry = max(retry, until(tmt, tmts, tpm, MINUTE, EPS * 2, now_ms) + 1)
        return limited_or_shadowed([code, plan, rpm, rpd, *requests_state, retry, credits, flags,
                                    expiry, *tokens])  # fmt: skip
    mt, dt = max(mt - 1, 0.0), max(dt - 1, 0.0)
    m_full = until(mt, mts, rpm, MINUTE, rpm, now_ms)
    d_full = until(dt, dts, rpd, DAY, rpd, now_ms)
    return admitted(
        [0, plan, rpm, rpd, math.floor(mt + EPS), m_full, math.floor(dt + EPS), d_full, 0,
         credits, flags, expiry, *tokens],
        {"m": (mt, mts), "d": (dt, dts)},
    )  # fmt: skip


ASCII_WHOLE = re.compile(r"[0-9]+")
ASCII_SIGNED = re.compile(r"-?[0-9]+")


def settle_record(record: dict[str, str], used: int, cost: int) -> tuple[list[int], dict[str, str]]:
    """settle.lua's reply and the record fields it writes, from its header: the token count
    (added to when it is a whole number of at most 15 digits, else replaced), and for a key
    with a balance the cost carried in millionths of a credit (garbage read as 0)."""
    if "hash" not in record:
        return [1, 0, 0], {}
    total = record.get("tokens")
    fine = total is not None and len(total) <= 15 and ASCII_WHOLE.fullmatch(total)
    writes = {"tokens": str(int(total) + used if fine and total else used)}
    credits = record.get("credits")
    if not credits or cost <= 0:
        return [1, 0, 0], writes
    balance = int(credits) if len(credits) <= 13 and ASCII_SIGNED.fullmatch(credits) else 0
    carried = record.get("credit_micros")
    micros = int(carried) if carried and len(carried) <= 6 and ASCII_WHOLE.fullmatch(carried) else 0
    charged, micros = divmod(micros + cost, 1_000_000)
    writes |= {"credits": str(balance - charged), "credit_micros": str(micros)}
    return [1, charged, balance - charged], writes
