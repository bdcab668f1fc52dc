"""`edge serve --workers N`: N worker processes serving the same ports.

The supervisor binds the sockets (one set per worker, SO_REUSEPORT: see
`server.worker_listeners`), makes the metrics directory (prometheus-client's
multiprocess mode, see metrics/registry.py) and starts the workers, each a full edge (its own Redis
clients, upstream pool and event loop) running the same drain on SIGTERM. It replaces a worker
that dies; on SIGTERM or SIGINT it passes SIGTERM on, waits for every worker to drain (up to
`drain_delay + drain_timeout` and a margin), then removes the metrics directory and exits 0.

SIGHUP reloads the configuration (edge/reload.py): the supervisor reads it again (so a worker
it starts later starts with it) and passes the signal on, SIGHUP to worker 0 (which audits the
reload) and SIGUSR1 to the others; a worker asked through `POST /admin/reload` sends the
supervisor SIGUSR1, which reloads every worker. A worker never outlives the supervisor: each
asks the kernel for SIGTERM the moment its parent dies (`PR_SET_PDEATHSIG`), so even a
SIGKILLed supervisor takes its workers with it (they drain as on any SIGTERM).

Why not uvicorn's own `--workers`: its workers run uvicorn's plain server, which has no drain
and re-raises SIGTERM on the way out (exit -15), and it knows nothing of the metrics directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from edge import logs
from edge.app import Signals
from edge.metrics.registry import MULTIPROC_ENV
from edge.reload import pid_file
from edge.server import listeners, run_server, worker_listeners
from edge.setting_changes import Source, fixed_changes
from edge.settings import ConfigError, Settings

log = logging.getLogger("edge.supervisor")
STARTUP_FAILURE = 3  # uvicorn's exit code when the app could not start
POLL = 0.5


PR_SET_PDEATHSIG = 1  # prctl(2)


def die_with_parent(parent: int) -> None:
    """SIGTERM this process when its parent dies (Linux; elsewhere nothing happens)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != parent:  # it died before we asked
        os.kill(os.getpid(), signal.SIGTERM)


def serve(settings: Settings, demo_key: bool = False, source: Source | None = None) -> int:
    """`edge serve`: one process on the listeners, or a supervisor of `server.workers`; its
    pid in `pid_file(port)` meanwhile, for `edge reload`."""
    logs.configure(settings.log.level)
    for sig in (signal.SIGHUP, signal.SIGUSR1):  # until the server's handlers are in place
        signal.signal(sig, signal.SIG_IGN)
    source = source or Source()
    demo_admin = settings.embedded_redis and settings.demo_upstream and not settings.admin.token
    if demo_admin:  # the first run shows the operator's half too: a token for this run only
        overrides = {section: dict(values) for section, values in (source.overrides or {}).items()}
        overrides.setdefault("admin", {})["token"] = secrets.token_urlsafe(32)
        source = Source(source.path, overrides)
        settings = source.load()
    pid_path = pid_file(settings.server.port)
    if settings.server.workers > 1:
        sets = worker_listeners(settings, settings.server.workers)
        with _pid_written(pid_path):
            return Supervisor(settings, sets, source).run()
    sockets = listeners(settings)
    try:
        with _pid_written(pid_path):
            return run_server(
                settings, sockets, demo_key=demo_key, source=source, signals=Signals(),
                show_admin_token=demo_admin,
            )  # fmt: skip
    finally:
        for sock in sockets:
            sock.close()


@contextlib.contextmanager
def _pid_written(path: Path) -> Iterator[None]:
    try:
        path.write_text(f"{os.getpid()}\n")
    except OSError as exc:  # a read-only /tmp: edge reload needs --pid then
        log.warning("could not write %s: %s", path, exc.strerror)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if path.read_text().strip() == str(os.getpid()):
                path.unlink()


def worker_main(
    settings: Settings, sockets: list[socket.socket], index: int, parent: int, source: Source
) -> None:
    """One worker: a full edge on its own sockets (runs in a spawned process)."""
    logs.configure(settings.log.level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides, and sends SIGTERM
    for sig in (signal.SIGHUP, signal.SIGUSR1):  # until the server's handlers are in place
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent(parent)
    signals = Signals(audit=index == 0, supervisor=parent)
    code = run_server(settings, sockets, banner=index == 0, source=source, signals=signals)
    raise SystemExit(code)


class Supervisor:
    def __init__(
        self, settings: Settings, sockets: list[list[socket.socket]], source: Source
    ) -> None:
        self.settings = settings
        self.source = source
        self.sockets = sockets  # per worker; a replacement takes over its predecessor's
        self.stopping = threading.Event()
        self.workers: list[BaseProcess] = []
        self._context = multiprocessing.get_context("spawn")

    def run(self) -> int:
        metrics_dir = tempfile.mkdtemp(prefix="edge-metrics-")
        os.environ[MULTIPROC_ENV] = metrics_dir  # inherited by the workers at spawn
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_reload)
        signal.signal(signal.SIGUSR1, self._on_reload)
        try:
            self.workers = [self._start(i) for i in range(self.settings.server.workers)]
            log.info("supervisor %d: %d workers", os.getpid(), len(self.workers))
            failed = self._watch()
            self._stop_all()
            return 1 if failed else 0
        finally:
            for socks in self.sockets:
                for sock in socks:
                    sock.close()
            os.environ.pop(MULTIPROC_ENV, None)
            shutil.rmtree(metrics_dir, ignore_errors=True)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self.stopping.set()

    def _on_reload(self, sig: int, frame: FrameType | None) -> None:
        """Read the configuration again for the workers started from now on, and have the
        running ones reload theirs (each validates and logs on its own)."""
        try:
            settings = self.source.load()
            if not fixed_changes(self.settings, settings):
                self.settings = settings
        except ConfigError:
            pass  # the workers refuse it too, and say why
        for index, worker in enumerate(self.workers):
            if worker.is_alive() and worker.pid is not None:
                audited = sig == signal.SIGHUP and index == 0
                os.kill(worker.pid, signal.SIGHUP if audited else signal.SIGUSR1)

    def _start(self, index: int) -> BaseProcess:
        worker = self._context.Process(
            target=worker_main,
            args=(self.settings, self.sockets[index], index, os.getpid(), self.source),
            name=f"edge-{index}",
        )
        worker.start()
        return worker

    def _watch(self) -> bool:
        """Replace workers that die until told to stop; True if one could not even start."""
        while not self.stopping.wait(POLL):
            for index, worker in enumerate(self.workers):
                if worker.is_alive():
                    continue
                if worker.exitcode == STARTUP_FAILURE:
                    log.error("worker %s could not start; stopping", worker.pid)
                    return True
                log.warning("worker %s exited (%s); starting another", worker.pid, worker.exitcode)
                self._forget_metrics(worker.pid)
                self.workers[index] = self._start(index)
        return False

    def _stop_all(self) -> None:
        s = self.settings.server
        for worker in self.workers:
            if worker.is_alive() and worker.pid is not None:
                os.kill(worker.pid, signal.SIGTERM)
        deadline = time.monotonic() + s.drain_delay + s.drain_timeout + 10  # one, for all
        for worker in self.workers:
            worker.join(max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                log.error("worker %s did not stop in time; killing it", worker.pid)
                worker.kill()
                worker.join(5)

    @staticmethod
    def _forget_metrics(pid: int | None) -> None:
        directory = os.environ.get(MULTIPROC_ENV)
        if pid is not None and directory:
            from prometheus_client.multiprocess import mark_process_dead

            mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
