"""T30 (docs/testplan.md) `test_soak_memory_fds_connections`, bounded for the suite: two instances
under mixed traffic (streams, plain calls, clients leaving mid-stream with FIN or RST, invalid keys,
429s, a Redis restart half-way). Memory, file descriptors and upstream connections stay flat and
nothing is left in flight. Generous bounds here; `benchmarks/soak.py` runs it for minutes and prints
the trend."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.fake_upstream import FakeUpstream
from tests.support.soak import soak

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


def test_soak_memory_fds_connections(tmp_path: Path, upstream: FakeUpstream) -> None:
    result = soak(tmp_path, upstream, seconds=22, warmup=6, every=4, rate=40)
    print(result.summary())
    assert result.warm is not None and result.after is not None
    for warm, after in zip(result.warm.rss, result.after.rss, strict=True):
        assert after < warm * 1.10 + 4 * 1024 * 1024, result.summary()
    for warm, after in zip(result.warm.fds, result.after.fds, strict=True):
        assert after <= warm + 5, result.summary()
    # A pool keeps idle connections 30 s, so their number follows the load's peaks (10 to 22
    # seen, before and after a change, on an idle machine): the baseline is the first half's
    # highest count, not one sample. A leak (a connection neither in use nor idle) grows with
    # every request that leaks it: hundreds of requests here.
    baseline = max(s.upstream_sockets for s in result.samples if s.at <= 6 + (22 - 6) / 2)
    assert result.after.upstream_sockets <= baseline + 10, result.summary()
    assert result.inflight == 0, result.summary()
    assert result.statuses.get(200, 0) > 500, result.summary()
    assert result.statuses.get(401, 0) > 0 and result.statuses.get(429, 0) > 0
    assert set(result.statuses) <= {0, 200, 401, 429, 503}, result.summary()
