"""The `edge` command: `serve`, `keys …` and `plans`.

Errors go to stderr as one line with a non-zero exit (2: bad usage or configuration, 1: the
operation failed), never a traceback. `--json` gives machine-readable output.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn

import orjson

from edge import connection
from edge.scripts import RedisUnavailable, Scripts
from edge.settings import ConfigError, Settings, load_settings
from edge.store import KeyRecord, KeyStore, StoreError

EXIT_FAILED, EXIT_USAGE = 1, 2
CLI_REDIS_TIMEOUT = 5.0


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one `edge: …` line like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"edge: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    common.add_argument("--config", help="config file (default: $EDGE_CONFIG or config/edge.toml)")
    common.add_argument("--json", action="store_true", help="machine-readable output")

    parser = Parser(prog="edge", description="API-key edge proxy for OpenAI-compatible APIs")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    serve = sub.add_parser("serve", parents=[common], help="run the proxy")
    serve.add_argument("--host", help="address to listen on (default from config: 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default from config: 8080)")
    serve.add_argument(
        "--demo-key",
        action="store_true",
        help="embedded Redis with a real upstream: create a demo key and print it",
    )

    sub.add_parser("plans", parents=[common], help="list the configured plans")

    keys = sub.add_parser("keys", help="manage API keys (needs EDGE_REDIS_URL)")
    ksub = keys.add_subparsers(dest="action", required=True, parser_class=Parser)
    create = ksub.add_parser("create", parents=[common], help="create a key; prints it once")
    create.add_argument("--plan", required=True)
    create.add_argument("--name", default="")
    create.add_argument("--owner", default="")
    create.add_argument("--rpm", type=int, help="override the plan's requests per minute")
    create.add_argument("--rpd", type=int, help="override the plan's requests per day")
    create.add_argument("--expires-in", type=int, metavar="SECONDS", help="expire after this long")
    listing = ksub.add_parser(
        "list", parents=[common], help="list keys (never the keys themselves)"
    )
    listing.add_argument("--owner")
    for action in ("show", "pause", "resume", "revoke"):
        ksub.add_parser(action, parents=[common], help=f"{action} a key").add_argument("id")
    rotate = ksub.add_parser("rotate", parents=[common], help="new secret, same id; prints it once")
    rotate.add_argument("id")
    rotate.add_argument(
        "--grace",
        type=int,
        default=0,
        metavar="SECONDS",
        help="keep the old key valid this long (default 0: it dies now)",
    )
    limits = ksub.add_parser("set-limits", parents=[common], help="per-key rpm/rpd overrides")
    limits.add_argument("id")
    limits.add_argument("--rpm", type=_limit, help="requests per minute, or 'plan' to clear")
    limits.add_argument("--rpd", type=_limit, help="requests per day, or 'plan' to clear")
    return parser


def _limit(text: str) -> int:
    if text == "plan":
        return -1
    if not text.isdigit():
        raise argparse.ArgumentTypeError("a whole number >= 0, or 'plan'")
    return int(text)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        settings = load_settings(args.config)
        if args.command == "plans":
            return _plans(settings, args.json)
        return asyncio.run(_keys(settings, args))
    except ConfigError as exc:
        return _fail(f"configuration error: {exc}", EXIT_USAGE)
    except KeyboardInterrupt:
        return 130


def _serve(args: argparse.Namespace) -> int:
    from edge.server import serve

    flags = {"host": args.host, "port": args.port}
    server = {name: value for name, value in flags.items() if value is not None}
    settings = load_settings(args.config, overrides={"server": server})
    return serve(settings, demo_key=args.demo_key)


def _plans(settings: Settings, as_json: bool) -> int:
    rows = [{"plan": n, "rpm": p.rpm, "rpd": p.rpd} for n, p in settings.plans.items()]
    if as_json:
        _print_json(rows)
    else:
        _table(rows, ["plan", "rpm", "rpd"])
    return 0


async def _keys(settings: Settings, args: argparse.Namespace) -> int:
    if settings.embedded_redis:
        return _fail(
            "edge keys needs a Redis server: set EDGE_REDIS_URL (e.g. redis://127.0.0.1:6379/0). "
            "The embedded Redis lives inside 'edge serve', which prints a demo key at start-up.",
            EXIT_USAGE,
        )
    redis_settings = settings.redis.model_copy(
        update={"timeout": max(settings.redis.timeout, CLI_REDIS_TIMEOUT)}
    )
    client = connection.connect(redis_settings)
    store = KeyStore(client, Scripts(), settings)
    try:
        return await _run_key_action(store, args)
    except StoreError as exc:
        return _fail(str(exc), EXIT_FAILED)
    except RedisUnavailable as exc:
        return _fail(f"Redis unavailable ({exc.kind}): {exc.detail}", EXIT_FAILED)
    except OSError as exc:
        return _fail(f"Redis unavailable: {exc}", EXIT_FAILED)
    finally:
        await client.aclose()


async def _run_key_action(store: KeyStore, args: argparse.Namespace) -> int:
    action: str = args.action
    if action == "create":
        key, record = await store.create(
            args.plan, args.name, args.owner, args.rpm, args.rpd, args.expires_in
        )
        return _show_with_key(key, record, args.json)
    if action == "rotate":
        key, record = await store.rotate(args.id, args.grace)
        return _show_with_key(key, record, args.json)
    if action == "list":
        records = await store.list(args.owner)
        if args.json:
            _print_json([r.to_dict() for r in records])
        else:
            _table(
                [_human(r) for r in records],
                ["id", "name", "owner", "plan", "status", "rpm", "rpd", "requests", "last_used"],
            )
        return 0
    simple: dict[str, Callable[[], Awaitable[KeyRecord]]] = {
        "show": lambda: store.get(args.id),
        "pause": lambda: store.set_status(args.id, "paused"),
        "resume": lambda: store.set_status(args.id, "active"),
        "revoke": lambda: store.set_status(args.id, "revoked"),
        "set-limits": lambda: store.set_limits(args.id, args.rpm, args.rpd),
    }
    record = await simple[action]()
    if args.json:
        _print_json(record.to_dict())
    else:
        _details(_human(record))
    return 0


def _show_with_key(key: str, record: KeyRecord, as_json: bool) -> int:
    if as_json:
        _print_json({"key": key, **record.to_dict()})
        return 0
    _details(_human(record))
    print(f"\nkey: {key}\nThis is the only time the key is shown. Store it now.")
    return 0


def _human(record: KeyRecord) -> dict[str, Any]:
    row = record.to_dict()
    for name in ("created", "expires", "last_used", "rotated", "previous_key_valid_until"):
        if row[name] is not None:
            row[name] = _timestamp(row[name])
    return row


def _timestamp(seconds: int) -> str:
    """Unix seconds as UTC ISO 8601; a time past year 9999 (a hand-edited record) as a number."""
    try:
        return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, ValueError, OSError):
        return str(seconds)


def _print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


def _details(row: dict[str, Any]) -> None:
    width = max(len(k) for k in row)
    for name, value in row.items():
        print(f"{name.ljust(width)}  {'' if value is None else value}")


def _table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _fail(message: str, code: int) -> int:
    print(f"edge: {message}", file=sys.stderr)
    return code
