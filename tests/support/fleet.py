"""Several edge processes, one per configuration, started and stopped together.

A module that checks one behaviour per configuration starts them all at once (each start
waits for its /healthz in its own thread), so it waits for the slowest start rather than the
sum of them. An edge that failed to start fails only the tests that ask for it, with its log.

Also `clean_proxy_env`: the proxy variables (HTTP_PROXY & co.) removed from this process's
environment for a module, so that neither the edges it starts (EdgeProcess copies os.environ)
nor its own clients inherit the runner's proxies.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.edge_process import EdgeProcess

PROXY_VARIABLES = tuple(
    name
    for base in ("http_proxy", "https_proxy", "no_proxy", "all_proxy")
    for name in (base, base.upper())
)


@contextmanager
def clean_proxy_env() -> Iterator[None]:
    """No HTTP_PROXY, HTTPS_PROXY, NO_PROXY, ALL_PROXY (either case) in os.environ inside."""
    with pytest.MonkeyPatch.context() as mp:
        for name in PROXY_VARIABLES:
            mp.delenv(name, raising=False)
        yield


class Fleet:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, EdgeProcess] = {}
        self.failures: dict[str, str] = {}

    def start(
        self,
        envs: Mapping[str, Mapping[str, str]],
        args: Mapping[str, tuple[str, ...]] | None = None,
    ) -> Fleet:
        """Start one edge per name in `envs` (its environment), all at once."""
        args = args or {}

        def start_one(name: str) -> None:
            proc = EdgeProcess(self.log_dir, dict(envs[name]), name, args.get(name, ()))
            self.procs[name] = proc
            try:
                proc.start()
            except Exception as exc:  # reported by __getitem__, to the tests that need it
                self.failures[name] = str(exc)

        with ThreadPoolExecutor(max_workers=len(envs) or 1) as pool:
            list(pool.map(start_one, list(envs)))
        # An edge whose port another process took between free_port() and its bind exits
        # (address in use) after /healthz answered: from whoever has the port. Once more, on
        # a new port.
        lost = [n for n, p in self.procs.items() if n not in self.failures and not alive(p)]
        if lost:
            with ThreadPoolExecutor(max_workers=len(lost)) as pool:
                list(pool.map(start_one, lost))
        return self

    def __getitem__(self, name: str) -> EdgeProcess:
        if name in self.failures:
            pytest.fail(f"edge {name!r} did not start: {self.failures[name]}")
        proc = self.procs[name]
        if not alive(proc):
            pytest.fail(f"edge {name!r} exited:\n{proc.log()}")
        return proc

    def stop(self) -> None:
        """SIGTERM to every edge, all at once; each is killed if it outstays its grace."""
        procs = list(self.procs.values())
        with ThreadPoolExecutor(max_workers=len(procs) or 1) as pool:
            list(pool.map(lambda proc: proc.stop(), procs))


def alive(proc: EdgeProcess) -> bool:
    return proc.proc is not None and proc.proc.poll() is None


def log_lines(proc: EdgeProcess, *needles: str) -> list[str]:
    """The lines of `proc`'s log that contain every one of `needles`."""
    return [line for line in proc.log().splitlines() if all(n in line for n in needles)]
