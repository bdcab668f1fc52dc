"""The start-up banner: how to call this instance, and in embedded mode a demo key.

In embedded mode (no EDGE_REDIS_URL) nothing outside this process can create keys, so with the
demo upstream a demo key is created at start-up and printed once with a ready-to-paste curl
line. With a real upstream that happens only when asked (`--demo-key`): a key printed to a
console or a log collector would spend the operator's provider account.
"""

from __future__ import annotations

import logging
import sys

from edge.control.specs import NewKey
from edge.runtime import Runtime

log = logging.getLogger("edge")
DEMO_BODY = '{"model": "edge-demo", "messages": [{"role": "user", "content": "Hello"}]}'


async def announce(rt: Runtime, demo_key: bool = False) -> None:
    """Say how to call this instance; in embedded mode, create and show a demo key when the
    demo upstream is in use or `demo_key` asks for one."""
    s = rt.settings
    base = f"http://{_display_host(s.server.host)}:{s.server.port}"
    admin = f"http://{_display_host(s.admin.host)}:{s.admin.port}" if s.admin.port else base
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
    if s.admin.port:
        lines.append(f"  admin API, dashboard and /metrics on {admin}")
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
