"""Running edge under uvicorn (uvloop + httptools), and the start-up banner.

In embedded mode (no EDGE_REDIS_URL) nothing outside this process can create keys, so with the
demo upstream the server creates a demo key at start-up and prints it once with a
ready-to-paste curl line. With a real upstream it does so only when asked (`--demo-key`): a key
printed to a console or a log collector would spend the operator's provider account.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import cast

import uvicorn

from edge import logs
from edge.app import create_app
from edge.http_protocol import Limits, protocol_class
from edge.key_specs import NewKey
from edge.runtime import Runtime
from edge.settings import Settings

log = logging.getLogger("edge")
DEMO_BODY = '{"model": "edge-demo", "messages": [{"role": "user", "content": "Hello"}]}'


async def announce(rt: Runtime, demo_key: bool = False) -> None:
    """Say how to call this instance; in embedded mode, create and show a demo key when the
    demo upstream is in use or `demo_key` asks for one."""
    s = rt.settings
    base = f"http://{_display_host(s.server.host)}:{s.server.port}"
    if s.embedded_redis:
        log.warning(
            "EMBEDDED REDIS: in-process and not persistent; one instance only. "
            "Set EDGE_REDIS_URL=redis://… to share limits between instances and keep keys."
        )
        if s.demo_upstream or demo_key:
            plan = next(iter(s.plans))
            spec = NewKey(plan=plan, name="demo")
            key, _ = await rt.store.create(spec, actor="demo")
            rt.demo_key = key
        else:
            log.warning(
                "No demo key was created: with a real upstream a printed key would spend your "
                "provider account. Run 'edge serve --demo-key' to create one and print it, or "
                "use a Redis server (EDGE_REDIS_URL) and 'edge keys create'."
            )
    lines = [
        "",
        "=" * 78,
        f"  edge is listening on {base}   (OpenAI base_url: {base}/v1)",
    ]
    if s.demo_upstream:
        lines.append("  DEMO UPSTREAM: no EDGE_UPSTREAM_URL set; answers are canned, not a model.")
    if rt.demo_key:
        lines += [
            f"  Demo key (plan {next(iter(s.plans))}, shown once): {rt.demo_key}",
            "  Try it:",
            f"    curl {base}/v1/chat/completions \\",
            f"      -H 'Authorization: Bearer {rt.demo_key}' \\",
            "      -H 'Content-Type: application/json' \\",
            f"      -d '{DEMO_BODY}'",
        ]
    lines += ["=" * 78, ""]
    print("\n".join(lines), file=sys.stdout, flush=True)


def _display_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def uvicorn_config(settings: Settings, demo_key: bool = False) -> uvicorn.Config:
    s = settings.server
    return uvicorn.Config(
        create_app(settings, on_ready=functools.partial(announce, demo_key=demo_key)),
        host=s.host,
        port=s.port,
        loop="uvloop",
        http=protocol_class(Limits.of(s)),
        ws="none",  # edge proxies HTTP only; an Upgrade request is served as plain HTTP
        lifespan="on",
        access_log=False,
        server_header=False,
        proxy_headers=False,  # X-Forwarded-* are not trusted from arbitrary clients
        log_config=None,
        # uvicorn annotates these as int but uses them as delays (call_later, wait_for):
        # the configured seconds are honoured exactly, never rounded.
        timeout_keep_alive=cast(int, s.keepalive_timeout),
        timeout_graceful_shutdown=cast(int, s.drain_timeout),
    )


def serve(settings: Settings, demo_key: bool = False) -> int:
    logs.configure(settings.log.level)
    server = uvicorn.Server(uvicorn_config(settings, demo_key))
    server.run()
    return 0 if server.started else 1
