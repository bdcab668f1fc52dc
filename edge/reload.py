"""Reloading without a restart: SIGHUP, `edge reload` and `POST /admin/reload`.

The configuration file and the environment are read again (the command line's flags still
apply) and validated whole. Plans, pricing, metering, the upstreams and routing are swapped
at once: a request takes the configuration current when it starts and keeps it to its end, an
upstream whose settings did not change keeps its warm pool and its breaker, and a replaced
pool closes only as its last request finishes, so a reload never cuts a stream. A file that
does not validate, or that changes what only a restart can (ports, workers, Redis, the admin
token...), is refused whole, with one log line, and the running configuration stays.

With `--workers`, the supervisor passes a SIGHUP on to every worker; the admin endpoint
reloads the worker that answered it and asks the supervisor (SIGUSR1) to reload the others.
One audit entry per reload: the worker that was asked (or worker 0, for a signal) writes it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import tempfile
from pathlib import Path

from edge.errors import EdgeError
from edge.proxy.handler import Proxy
from edge.runtime import Runtime, build_live, retire_replaced
from edge.setting_changes import Source, fixed_changes, live_changes
from edge.settings import ConfigError

log = logging.getLogger("edge.reload")


def pid_file(port: int) -> Path:
    """Where `edge serve` on `port` writes its process id, for `edge reload`."""
    return Path(tempfile.gettempdir()) / f"edge-{port}.pid"


class Reloader:
    """Reloads one process's configuration from `source`. `supervisor`: the pid of the
    supervisor to tell when this process was asked directly (None: no siblings)."""

    def __init__(
        self, source: Source, rt: Runtime, proxy: Proxy, supervisor: int | None = None
    ) -> None:
        self.source = source
        self.rt = rt
        self.proxy = proxy
        self.supervisor = supervisor
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None  # a signal's reload, referenced till done

    async def reload(self, actor: str, audit: bool = True, siblings: bool = False) -> list[str]:
        """Apply the configuration as it now reads; the LIVE sections it changed. Raises
        ConfigError (logged) when it is refused. `siblings`: tell the other workers too."""
        async with self._lock:
            try:
                changed = self._apply()
            except ConfigError as exc:
                log.error("reload refused: %s; the running configuration stays", exc)
                raise
        if changed:
            log.info("reloaded (%s): %s changed", actor, ", ".join(changed))
        else:
            log.info("reloaded (%s): nothing changed", actor)
        if audit:
            try:
                await self.rt.store.audit.record("reload", "", "", actor, {"changed": changed})
            except EdgeError as exc:  # applied all the same: only its audit entry is missing
                log.warning("reload not audited: %s", exc.message)
        if siblings and self.supervisor is not None:
            os.kill(self.supervisor, signal.SIGUSR1)
        return changed

    def _apply(self) -> list[str]:
        rt = self.rt
        old = rt.settings
        try:
            new = self.source.load()
        except ConfigError:
            raise
        except Exception as exc:  # a reload never takes a running edge down
            raise ConfigError(f"could not read the configuration: {exc}") from None
        fixed = fixed_changes(old, new)
        if new.demo_upstream != old.demo_upstream:
            fixed.append("upstream.url (the demo upstream is chosen at start-up)")
        if fixed:
            raise ConfigError(
                "these settings change only with a restart: " + ", ".join(sorted(fixed))
            )
        changed = live_changes(old, new)
        if not changed:
            return []
        before = rt.live
        live = build_live(new, rt.hot, rt.scripts, rt.metrics, rt.pools, before)
        rt.metrics.set_plans(new.plans)
        rt.settings = rt.store.settings = new
        rt.live = live
        self.proxy.swap(live)  # from here on, new requests use `live`
        retire_replaced(before, live)
        return changed

    def on_signal(self, actor: str, audit: bool) -> None:
        """A signal's reload, run as a task (refusals are logged by `reload`)."""

        async def run() -> None:
            try:
                await self.reload(actor, audit=audit)
            except ConfigError:
                pass
            except Exception:
                log.exception("reload failed")

        self._task = asyncio.get_running_loop().create_task(run())
