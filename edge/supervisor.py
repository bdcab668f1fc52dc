"""`edge serve --workers N`: N worker processes serving the same ports.

The supervisor binds the sockets (one set per worker, SO_REUSEPORT: see
`server.worker_listeners`), makes the metrics directory (prometheus-client's
multiprocess mode, see metrics/registry.py) and starts the workers, each a full edge (its own Redis
clients, upstream pool and event loop) running the same drain on SIGTERM. It replaces a worker
that dies; on SIGTERM or SIGINT it passes SIGTERM on, waits for every worker to drain (up to
`drain_delay + drain_timeout` and a margin), then removes the metrics directory and exits 0.

A worker never outlives the supervisor: SIGHUP (a closed terminal, or an operator expecting a
reload, which edge does not do yet) is ignored by supervisor and workers alike, with a log
line, instead of killing the supervisor and leaving its workers serving the port; and each
worker asks the kernel for SIGTERM the moment its parent dies (`PR_SET_PDEATHSIG`), so even a
SIGKILLed supervisor takes its workers with it (they drain as on any SIGTERM).

Why not uvicorn's own `--workers`: its workers run uvicorn's plain server, which has no drain
and re-raises SIGTERM on the way out (exit -15), and it knows nothing of the metrics directory.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from multiprocessing.process import BaseProcess
from types import FrameType

from edge import logs
from edge.metrics.registry import MULTIPROC_ENV
from edge.server import listeners, run_server, worker_listeners
from edge.settings import Settings

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


def serve(settings: Settings, demo_key: bool = False) -> int:
    """`edge serve`: one process on the listeners, or a supervisor of `server.workers`."""
    logs.configure(settings.log.level)
    if settings.server.workers > 1:
        sets = worker_listeners(settings, settings.server.workers)
        return Supervisor(settings, sets).run()
    sockets = listeners(settings)
    try:
        return run_server(settings, sockets, demo_key=demo_key)
    finally:
        for sock in sockets:
            sock.close()


def worker_main(settings: Settings, sockets: list[socket.socket], index: int, parent: int) -> None:
    """One worker: a full edge on its own sockets (runs in a spawned process)."""
    logs.configure(settings.log.level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides, and sends SIGTERM
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    die_with_parent(parent)
    raise SystemExit(run_server(settings, sockets, banner=index == 0))


class Supervisor:
    def __init__(self, settings: Settings, sockets: list[list[socket.socket]]) -> None:
        self.settings = settings
        self.sockets = sockets  # per worker; a replacement takes over its predecessor's
        self.stopping = threading.Event()
        self.workers: list[BaseProcess] = []
        self._context = multiprocessing.get_context("spawn")

    def run(self) -> int:
        metrics_dir = tempfile.mkdtemp(prefix="edge-metrics-")
        os.environ[MULTIPROC_ENV] = metrics_dir  # inherited by the workers at spawn
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_hangup)
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

    def _on_hangup(self, sig: int, frame: FrameType | None) -> None:
        log.warning("SIGHUP ignored: edge does not reload its configuration yet; restart it")

    def _start(self, index: int) -> BaseProcess:
        worker = self._context.Process(
            target=worker_main,
            args=(self.settings, self.sockets[index], index, os.getpid()),
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
