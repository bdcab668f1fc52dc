"""Loaded by an edge process started with this directory on PYTHONPATH (benchmarks/gc_pauses.py):
times every garbage collection through `gc.callbacks` and writes what it saw to
$EDGE_GC_PROBE_OUT on SIGUSR2, which the benchmark sends before it reads the file (SIGWINCH
starts over). With EDGE_GC_PROBE_SAVEALL set it also names, by type, the objects it found in
reference cycles: what a request leaves for the collector instead of freeing it."""

import collections
import gc
import json
import os
import signal
import time

_started: list[float] = [0.0]
_pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
_collected: list[int] = [0]


def _on_gc(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
    else:
        _pauses[info["generation"]].append(time.perf_counter() - _started[0])
        _collected[0] += info["collected"]


def _dump(*_: object) -> None:
    seen = {
        "pauses": _pauses,
        "collected": _collected[0],
        "tracked": len(gc.get_objects()),
        "frozen": gc.get_freeze_count(),
    }
    if gc.get_debug() & gc.DEBUG_SAVEALL:  # what the collector found in cycles, by type
        gc.collect()
        kinds = collections.Counter(_name(obj) for obj in gc.garbage)
        seen["garbage"] = kinds.most_common(40)
        gc.garbage.clear()
    with open(os.environ["EDGE_GC_PROBE_OUT"], "w") as out:
        json.dump(seen, out)


def _name(obj: object) -> str:
    kind = type(obj)
    if kind is dict or kind is tuple or kind is list:
        return kind.__name__ + f"({len(obj)})"  # type: ignore[arg-type]
    if hasattr(obj, "__qualname__"):
        return f"{kind.__name__} {obj.__qualname__}"
    return f"{kind.__module__}.{kind.__qualname__}"


def _reset(*_: object) -> None:
    for pauses in _pauses.values():
        pauses.clear()
    _collected[0] = 0
    gc.garbage.clear()


if os.environ.get("EDGE_GC_PROBE_OUT"):
    gc.callbacks.append(_on_gc)
    signal.signal(signal.SIGUSR2, _dump)
    signal.signal(signal.SIGWINCH, _reset)
    if os.environ.get("EDGE_GC_PROBE_SAVEALL"):  # keep collected cycles to name their types
        gc.set_debug(gc.DEBUG_SAVEALL)
