"""The start-up banner: how to call this instance, and the demo key if there is one
(`runtime.create_demo_key`), printed once with a ready-to-paste curl line. Printing creates
nothing."""

from __future__ import annotations

import logging
import sys

from edge.runtime import Runtime

log = logging.getLogger("edge")
DEMO_BODY = '{"model": "edge-demo", "messages": [{"role": "user", "content": "Hello"}]}'


def announce(rt: Runtime, show_admin_token: bool = False) -> None:
    """Say how to call this instance (and warn about the embedded Redis). `show_admin_token`:
    the admin token was made for this demo run (embedded Redis, demo upstream), so printing
    it gives away nothing that outlives the process."""
    s = rt.settings
    base = f"http://{_display_host(s.server.host)}:{s.server.port}"
    admin = f"http://{_display_host(s.admin.host)}:{s.admin.port}" if s.admin.port else base
    if s.embedded_redis:
        log.warning(
            "EMBEDDED REDIS: in-process and not persistent; one instance only. "
            "Set EDGE_REDIS_URL=redis://… to share limits between instances and keep keys."
        )
        if rt.demo_key is None:
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
    token = s.admin.token.get_secret_value()
    if token:
        shown = f"   admin token (this run only): {token}" if show_admin_token else ""
        lines.append(f"  Dashboard: {admin}/admin/{shown}")
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
