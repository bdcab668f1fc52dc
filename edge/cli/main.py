"""The `edge` command: `serve`, `keys …` (`usage` too), `plans`, `pricing` and `audit`.

Key commands build the same validated request models as the admin API (`key_specs`) and call
the same store functions, audited with the actor `cli`. Errors go to stderr as one line with a
non-zero exit (2: bad usage, configuration or value; 1: the operation failed), never a
traceback. `--json` gives machine-readable output.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from edge.cli import output as out
from edge.cli.parser import (
    EXIT_FAILED,
    EXIT_USAGE,
    NEVER,
    PLAN,
    UNLIMITED,
    UNSET,
    build_parser,
)
from edge.control.records import plan_rows, pricing_rows
from edge.control.specs import AuditQuery, KeyUpdate, NewKey, Rotation, explain
from edge.control.store import KeyStore, StoreError
from edge.control.usage import MAX_DAY_ROWS, total
from edge.errors import RedisUnavailable
from edge.redis import clients as connection
from edge.redis.scripts import Scripts
from edge.setting_changes import Source
from edge.settings import ConfigError, Settings, load_settings

CLI_REDIS_TIMEOUT = 5.0
ACTOR = "cli"
Spec = TypeVar("Spec", bound=BaseModel)


class BadValue(Exception):
    """A flag's value failed validation; the message names the field."""


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "reload":
            return _reload(args)
        settings = load_settings(args.config)
        if args.command == "plans":
            return _plans(settings, args.json)
        if args.command == "pricing":
            return _pricing(settings, args.json)
        return asyncio.run(_with_store(settings, args))
    except ConfigError as exc:
        return out.fail(f"configuration error: {exc}", EXIT_USAGE)
    except KeyboardInterrupt:
        return 130


def _serve(args: argparse.Namespace) -> int:
    from edge.supervisor import serve

    flags = {"host": args.host, "port": args.port, "workers": args.workers}
    server = {name: value for name, value in flags.items() if value is not None}
    admin = {"port": args.admin_port} if args.admin_port is not None else {}
    source = Source(args.config, {"server": server, "admin": admin})
    settings = source.load()
    try:
        return serve(settings, demo_key=args.demo_key, source=source)
    except OSError as exc:  # the port is taken, the address is not ours, …
        return out.fail(f"cannot listen: {exc.strerror or exc}", EXIT_FAILED)


def _reload(args: argparse.Namespace) -> int:
    """`edge reload`: SIGHUP to the `edge serve` on this configuration's port (or `--pid`)."""
    from edge.reload import pid_file

    pid = args.pid
    if pid is None:
        port = args.port or load_settings(args.config).server.port
        path = pid_file(port)
        try:
            pid = int(path.read_text().strip())
        except (OSError, ValueError):
            return out.fail(
                f"no running edge serve found for port {port} ({path} is missing); "
                "give --port or --pid",
                EXIT_FAILED,
            )
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return out.fail(f"no process {pid}: is edge serve running?", EXIT_FAILED)
    except PermissionError:
        return out.fail(f"not allowed to signal process {pid}", EXIT_FAILED)
    print(f"sent SIGHUP to edge (pid {pid}); its log says whether the configuration was applied")
    return 0


def _pricing(settings: Settings, as_json: bool) -> int:
    prices = pricing_rows(settings)
    if as_json:
        out.print_json(prices)
        return 0
    print(f"credits per admitted request: {prices['request']}")
    if prices["models"]:
        print("credits per million tokens, by model (first match wins):")
        out.table(prices["models"], ["match", "input", "output", "cached_input"])
    else:
        print("no token prices: requests are all a key's balance pays for")
    return 0


def _plans(settings: Settings, as_json: bool) -> int:
    rows = plan_rows(settings)
    if as_json:
        out.print_json(rows)
    else:
        out.table(rows, ["plan", "rpm", "rpd", "tpm", "tpd", "shadow"])
    return 0


async def _with_store(settings: Settings, args: argparse.Namespace) -> int:
    if settings.embedded_redis:
        return out.fail(
            f"edge {args.command} needs a Redis server: set EDGE_REDIS_URL (e.g. "
            "redis://127.0.0.1:6379/0). The embedded Redis lives inside 'edge serve', which "
            "prints a demo key at start-up.",
            EXIT_USAGE,
        )
    redis_settings = settings.redis.model_copy(
        update={"timeout": max(settings.redis.timeout, CLI_REDIS_TIMEOUT)}
    )
    client = connection.connect(redis_settings)
    store = KeyStore(client, Scripts(), settings)
    try:
        if args.command == "audit":
            return await _audit(store, args)
        return await _key_action(store, args)
    except BadValue as exc:
        return out.fail(str(exc), EXIT_USAGE)
    except StoreError as exc:
        return out.fail(str(exc), EXIT_FAILED)
    except RedisUnavailable as exc:
        return out.fail(f"Redis unavailable ({exc.kind}): {exc.detail}", EXIT_FAILED)
    except OSError as exc:
        return out.fail(f"Redis unavailable: {exc}", EXIT_FAILED)
    finally:
        await client.aclose()


def _spec(model: type[Spec], store: KeyStore, fields: dict[str, Any], flag: str = "") -> Spec:
    """`fields` as `model`, validated as the admin API validates them; `flag` ("--") names
    the field as the flag it came from."""
    try:
        return model.model_validate(fields, context=store.plans)
    except ValidationError as exc:
        raise BadValue(flag + explain(exc)[0]) from None


def _scopes(args: argparse.Namespace) -> dict[str, list[str]] | None:
    if not (args.scope_route or args.scope_model):
        return None
    return {"routes": args.scope_route or [], "models": args.scope_model or []}


async def _key_action(store: KeyStore, args: argparse.Namespace) -> int:
    action: str = args.action
    if action == "create":
        fields = {
            name: getattr(args, name)
            for name in (
                "plan",
                "name",
                "owner",
                "rpm",
                "rpd",
                "tpm",
                "tpd",
                "expires_in",
                "credits",
            )
        }
        fields |= {"expires_at": args.expires_at, "scopes": _scopes(args)}
        fields["shadow"] = None if args.shadow is UNSET else args.shadow
        spec = _spec(NewKey, store, {k: v for k, v in fields.items() if v is not None})
        key, record = await store.create(spec, ACTOR)
        out.record_with_key(key, record, args.json)
    elif action == "rotate":
        grace = _spec(Rotation, store, {"grace_seconds": args.grace}).grace_seconds
        key, record = await store.rotate(args.id, grace, ACTOR)
        out.record_with_key(key, record, args.json)
    elif action == "usage":
        await _usage(store, args)
    elif action == "list":
        records = await store.all_keys(args.owner)
        records = [r for r in records if args.status in (None, r.status)]
        if args.json:
            out.print_json([r.to_dict() for r in records])
        else:
            out.table([out.human(r.to_dict()) for r in records], out.LIST_COLUMNS)
    else:
        out.record(await _change(store, args), args.json)
    return 0


async def _change(store: KeyStore, args: argparse.Namespace) -> Any:
    action: str = args.action
    if action == "show":
        return await store.get(args.id)
    if action in ("pause", "resume", "revoke"):
        status = {"pause": "paused", "resume": "active", "revoke": "revoked"}[action]
        return await store.set_status(args.id, status, ACTOR)
    if action == "set-limits":
        windows = ("rpm", "rpd", "tpm", "tpd")
        limits = {n: getattr(args, n) for n in windows if getattr(args, n) is not None}
        if not limits:
            raise BadValue("give at least one of --rpm, --rpd, --tpm, --tpd")
        fields = {n: (None if v == PLAN else v) for n, v in limits.items()}
        return await store.update(args.id, _spec(KeyUpdate, store, fields), ACTOR)
    if action == "credits":
        return await store.add_credits(args.id, args.add, ACTOR)
    return await store.update(args.id, _spec(KeyUpdate, store, _update_fields(args)), ACTOR)


def _update_fields(args: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {
        n: getattr(args, n) for n in ("name", "owner", "plan") if getattr(args, n) is not None
    }
    if args.expires_at is not None:
        fields["expires_at"] = None if args.expires_at == NEVER else args.expires_at
    if args.credits is not None:
        fields["credits"] = None if args.credits == UNLIMITED else args.credits
    if args.no_scopes:
        fields["scopes"] = None
    elif scopes := _scopes(args):
        fields["scopes"] = scopes
    if args.shadow is not UNSET:
        fields["shadow"] = args.shadow
    if not fields:
        raise BadValue("nothing to change: give at least one of the update flags")
    return fields


async def _usage(store: KeyStore, args: argparse.Namespace) -> None:
    """`edge keys usage <id>`: the last --days days (or 48 hours) as the admin API gives them."""
    if not 1 <= args.days <= MAX_DAY_ROWS:
        raise BadValue(f"--days: must be 1 to {MAX_DAY_ROWS}")
    record = await store.get(args.id)
    granularity = "hour" if args.hours else "day"
    if args.hours:
        rows = await store.usage.last_hours(record.id)
    else:
        today = await store.usage.today()
        first = today - timedelta(days=args.days - 1)
        [rows] = await store.usage.of_keys([record.id], first, today, "day")
    totals = total(rows)
    if args.json:
        out.print_json(
            {"key": record.id, "granularity": granularity, "data": rows, "totals": totals}
        )
        return
    out.usage(rows, totals, args.hours)
    if record.previous_key_valid_until is not None:
        used = record.previous_key_last_used
        print(
            f"\nprevious secret: valid until {out.timestamp(record.previous_key_valid_until)}, "
            f"{record.previous_key_requests:,} requests since the rotation, last used "
            f"{out.timestamp(used) if used is not None else 'never'}"
        )


async def _audit(store: KeyStore, args: argparse.Namespace) -> int:
    query = _spec(AuditQuery, store, {"limit": args.limit}, flag="--")
    entries, _ = await store.audit.page(None, query.limit)
    if args.json:
        out.print_json(entries)
    else:
        columns = ["time", "action", "key", "owner", "actor", "changes"]
        out.table([out.human(e) for e in entries], columns)
    return 0


__all__ = ["EXIT_FAILED", "EXIT_USAGE", "main"]
