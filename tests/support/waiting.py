"""Polling with a deadline: the one way tests wait for something to become true."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(predicate: Callable[[], object], timeout: float = 5.0, every: float = 0.02) -> bool:
    """Poll `predicate` until it is truthy or `timeout` seconds pass; its last verdict."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return bool(predicate())
