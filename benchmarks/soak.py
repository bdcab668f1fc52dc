"""The long soak (T30 in docs/testplan.md): two edge instances under mixed traffic for minutes, with
memory, file descriptors, upstream connections and Redis clients sampled as it goes.

    .venv/bin/python benchmarks/soak.py [--minutes 10] [--every 30] [--rate 40]

Traffic: 70% SSE streams, 15% plain calls, 5% of a low-limit key (429s), 5% clients leaving
mid-stream (half with an RST), 5% invalid keys; Redis (AOF) restarted half-way. Everything
runs on loopback and is stopped by PID at the end. Prints the samples and whether RSS ended
within 10% of its post-warm-up value and fds and upstream connections came back to baseline.
The test suite runs the same engine for half a minute (tests/test_soak.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.fake_upstream import FakeUpstream  # noqa: E402
from tests.support.soak import soak  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--every", type=float, default=30, help="seconds between samples")
    parser.add_argument("--warmup", type=float, default=30, help="seconds before the baseline")
    parser.add_argument("--rate", type=float, default=40, help="requests a second, in all")
    args = parser.parse_args()
    upstream = FakeUpstream().start()
    try:
        with tempfile.TemporaryDirectory(prefix="edge-soak-") as tmp:
            result = soak(
                Path(tmp), upstream, args.minutes * 60, args.warmup, args.every, args.rate
            )
    finally:
        upstream.stop()
    print(result.summary())
    assert result.warm is not None and result.after is not None
    rss_ok = all(a <= w * 1.10 for w, a in zip(result.warm.rss, result.after.rss, strict=True))
    fds_ok = all(a <= w + 5 for w, a in zip(result.warm.fds, result.after.fds, strict=True))
    conns_ok = result.after.upstream_sockets <= result.warm.upstream_sockets + 10
    verdict = {"rss within 10%": rss_ok, "fds back": fds_ok, "upstream connections back": conns_ok}
    verdict["nothing in flight"] = result.inflight == 0
    for name, ok in verdict.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    return 0 if all(verdict.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
