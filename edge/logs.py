"""Logging set-up, and a throttle so an outage logs a line a second, not a line a request.

No log line anywhere in edge carries an API key, its secret, the provider key, the admin token
or a request's query string: the call sites log a key's public id (kid) at most.
"""

from __future__ import annotations

import logging
import sys
import time

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _DropUvicornNoise(logging.Filter):
    """uvicorn reports a response we end on purpose (an upstream stream cut mid-way: the client
    must see an incomplete body) as an ASGI error; edge has already logged that event itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "ASGI callable returned without completing response."


def configure(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        log = logging.getLogger(name)
        log.handlers[:] = []
        log.propagate = True
    logging.getLogger("uvicorn.error").addFilter(_DropUvicornNoise())
    # aiohttp (the demo upstream) and redis log nothing useful at debug, and could echo URLs.
    for name in ("aiohttp", "redis", "asyncio"):
        logging.getLogger(name).setLevel(max(logging.INFO, root.level))


class Throttle:
    """Lets one event per `period` seconds through per key, and counts the rest."""

    def __init__(self, period: float = 1.0) -> None:
        self.period = period
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def allow(self, key: str) -> tuple[bool, int]:
        """(log it now?, how many were suppressed since the last one logged)."""
        now = time.monotonic()
        if now < self._next.get(key, 0.0):
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False, 0
        self._next[key] = now + self.period
        return True, self._suppressed.pop(key, 0)
