"""The `edge` command's arguments: every subcommand, flag and help text, nothing else."""

from __future__ import annotations

import argparse
from datetime import datetime
from typing import NoReturn

EXIT_FAILED, EXIT_USAGE = 1, 2
NEVER, UNLIMITED, PLAN = "never", "unlimited", "plan"


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one `edge: …` line like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"edge: {message} (see '{self.prog} --help')\n")


def limit(text: str) -> int | str:
    """A whole number >= 0, or 'plan' (clear the override)."""
    if text == PLAN:
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError("a whole number >= 0, or 'plan'")
    return int(text)


def when(text: str) -> int | str:
    """Unix seconds, an ISO 8601 time (`2027-01-01T00:00:00Z`), or 'never'."""
    if text == NEVER or text.isdigit():
        return text if text == NEVER else int(text)
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError("unix seconds, an ISO 8601 time, or 'never'") from None
    if parsed.tzinfo is None:
        raise argparse.ArgumentTypeError("give a time zone, e.g. 2027-01-01T00:00:00Z")
    return int(parsed.timestamp())


def balance(text: str) -> int | str:
    """A whole number of credits >= 0, or 'unlimited'."""
    if text == UNLIMITED:
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError("a whole number >= 0, or 'unlimited'")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    common.add_argument("--config", help="config file (default: $EDGE_CONFIG or config/edge.toml)")
    common.add_argument("--json", action="store_true", help="machine-readable output")

    parser = Parser(prog="edge", description="API-key edge proxy for OpenAI-compatible APIs")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    serve = sub.add_parser("serve", parents=[common], help="run the proxy")
    serve.add_argument("--host", help="address to listen on (default from config: 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default from config: 8080)")
    serve.add_argument("--workers", type=int, help="worker processes on the port (default 1)")
    serve.add_argument(
        "--admin-port", type=int, help="serve /admin, the dashboard and /metrics on this port"
    )
    serve.add_argument(
        "--demo-key",
        action="store_true",
        help="embedded Redis with a real upstream: create a demo key and print it",
    )
    reload = sub.add_parser(
        "reload", parents=[common], help="reload the running edge's configuration (SIGHUP)"
    )
    reload.add_argument("--pid", type=int, help="the edge serve process (default: its pid file)")
    reload.add_argument("--port", type=int, help="the port edge serve listens on (default: config)")
    sub.add_parser("plans", parents=[common], help="list the configured plans")
    sub.add_parser("pricing", parents=[common], help="the configured prices")
    audit = sub.add_parser("audit", parents=[common], help="the admin changes, newest first")
    audit.add_argument("--limit", type=int, default=50, help="entries to show (default 50)")

    keys = sub.add_parser("keys", help="manage API keys (needs EDGE_REDIS_URL)")
    ksub = keys.add_subparsers(dest="action", required=True, parser_class=Parser)
    _key_commands(ksub, common)
    return parser


UNSET = object()  # a flag that was not given (None is a value: --plan-shadow)


def _key_commands(ksub: argparse._SubParsersAction[Parser], common: Parser) -> None:
    create = ksub.add_parser("create", parents=[common], help="create a key; prints it once")
    create.add_argument("--plan", required=True)
    create.add_argument("--name", default="")
    create.add_argument("--owner", default="")
    create.add_argument("--rpm", type=int, help="override the plan's requests per minute")
    create.add_argument("--rpd", type=int, help="override the plan's requests per day")
    create.add_argument("--tpm", type=int, help="override the plan's LLM tokens per minute")
    create.add_argument("--tpd", type=int, help="override the plan's LLM tokens per day")
    create.add_argument("--expires-in", type=int, metavar="SECONDS", help="expire after this long")
    create.add_argument("--expires-at", type=when, metavar="TIME", help="expire at this time")
    create.add_argument("--credits", type=int, help="a balance, spent as [pricing] says")
    _scope_flags(create)
    _shadow_flags(create)

    listing = ksub.add_parser("list", parents=[common], help="list keys (never the keys)")
    listing.add_argument("--owner")
    listing.add_argument("--status", choices=("active", "paused", "revoked"))
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
    limits = ksub.add_parser(
        "set-limits", parents=[common], help="per-key rpm/rpd/tpm/tpd overrides"
    )
    limits.add_argument("id")
    limits.add_argument("--rpm", type=limit, help="requests per minute, or 'plan' to clear")
    limits.add_argument("--rpd", type=limit, help="requests per day, or 'plan' to clear")
    limits.add_argument("--tpm", type=limit, help="LLM tokens per minute, or 'plan' to clear")
    limits.add_argument("--tpd", type=limit, help="LLM tokens per day, or 'plan' to clear")

    update = ksub.add_parser("update", parents=[common], help="change a key's fields")
    update.add_argument("id")
    update.add_argument("--name")
    update.add_argument("--owner")
    update.add_argument("--plan")
    update.add_argument("--expires-at", type=when, metavar="TIME", help="a time, or 'never'")
    update.add_argument("--credits", type=balance, help="set the balance, or 'unlimited'")
    _scope_flags(update)
    update.add_argument("--no-scopes", action="store_true", help="lift every scope")
    _shadow_flags(update)

    usage = ksub.add_parser("usage", parents=[common], help="a key's usage, by UTC day or hour")
    usage.add_argument("id")
    usage.add_argument("--days", type=int, default=30, help="days up to today (default 30)")
    usage.add_argument("--hours", action="store_true", help="by hour, the last 48 hours")
    credits = ksub.add_parser("credits", parents=[common], help="top up (or take) credits")
    credits.add_argument("id")
    credits.add_argument("--add", type=int, required=True, metavar="N", help="may be negative")


def _scope_flags(command: Parser) -> None:
    command.add_argument(
        "--scope-route",
        action="append",
        metavar="ROUTE",
        help="allow only this route under /v1 (repeatable), e.g. chat/completions",
    )
    command.add_argument(
        "--scope-model",
        action="append",
        metavar="GLOB",
        help="allow only models matching this glob (repeatable), e.g. 'gpt-4o*'",
    )


def _shadow_flags(command: Parser) -> None:
    """`--shadow` / `--no-shadow` / `--plan-shadow`: the key's limits observed only, enforced,
    or as its plan says."""
    group = command.add_mutually_exclusive_group()
    for flag, value, text in (
        ("--shadow", True, "observe the key's limits, never enforce them"),
        ("--no-shadow", False, "enforce the key's limits even if its plan is in shadow"),
        ("--plan-shadow", None, "as the plan says (clears --shadow / --no-shadow)"),
    ):
        group.add_argument(flag, dest="shadow", action="store_const", const=value, help=text)
    command.set_defaults(shadow=UNSET)
