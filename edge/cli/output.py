"""How the `edge` command prints: JSON, aligned tables, field lists, one-line errors."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import Any

import orjson

from edge.control.records import KeyRecord

TIMES = (
    "created", "expires", "last_used", "rotated", "previous_key_valid_until",
    "previous_key_last_used", "time",
)  # fmt: skip
LIST_COLUMNS = [
    "id", "name", "owner", "plan", "status", "rpm", "rpd", "tpm", "tpd", "credits", "requests",
    "tokens", "last_used",
]  # fmt: skip


def print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


def human(row: dict[str, Any]) -> dict[str, Any]:
    """A record or audit entry with times as UTC ISO 8601 and nested values as JSON."""
    out = dict(row)
    for name in TIMES:
        if out.get(name) is not None:
            out[name] = timestamp(out[name])
    for name, value in out.items():
        if isinstance(value, dict | list):
            out[name] = orjson.dumps(value).decode()
    return out


def timestamp(seconds: float) -> str:
    """Unix seconds as UTC ISO 8601; a time past year 9999 (a hand-edited record) as a number."""
    try:
        return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, ValueError, OSError):
        return str(seconds)


def details(row: dict[str, Any]) -> None:
    width = max(len(k) for k in row)
    for name, value in row.items():
        print(f"{name.ljust(width)}  {'' if value is None else value}")


def table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def record(rec: KeyRecord, as_json: bool) -> None:
    if as_json:
        print_json(rec.to_dict())
    else:
        details(human(rec.to_dict()))


def record_with_key(key: str, rec: KeyRecord, as_json: bool) -> None:
    if as_json:
        print_json({"key": key, **rec.to_dict()})
        return
    details(human(rec.to_dict()))
    print(f"\nkey: {key}\nThis is the only time the key is shown. Store it now.")


def fail(message: str, code: int) -> int:
    print(f"edge: {message}", file=sys.stderr)
    return code


USAGE_COLUMNS = [
    "start", "requests", "rate_limited", "rejected", "input_tokens", "output_tokens", "credits",
]  # fmt: skip


def usage(rows: list[dict[str, Any]], totals: dict[str, Any], hours: bool) -> None:
    """Usage rows as a table, people's numbers (50,000), a total line at the end."""
    cut = 16 if hours else 10  # 2026-12-04T13:00 or 2026-12-04
    shown = [
        {"start": r["start"][:cut].replace("T", " "), **{c: f"{r[c]:,}" for c in USAGE_COLUMNS[1:]}}
        for r in rows
    ]
    shown.append({"start": "total", **{c: f"{totals[c]:,}" for c in USAGE_COLUMNS[1:]}})
    table(shown, USAGE_COLUMNS)
