"""edge/metrics/batch.py: batched metric updates expose exactly what direct ones would."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from edge.metrics.batch import Level, Observations, Tally, supports_batches
from edge.metrics.registry import ADMISSION_BUCKETS, Metrics
from edge.settings import Plan

values = st.lists(
    st.one_of(
        st.floats(min_value=0, max_value=5, allow_nan=False),
        st.sampled_from([0.0, *ADMISSION_BUCKETS, 2.0]),  # exactly on a bound: le is inclusive
    ),
    max_size=60,
)


def _pair(name: str) -> tuple[CollectorRegistry, Histogram, CollectorRegistry, Histogram]:
    direct_reg, batched_reg = CollectorRegistry(), CollectorRegistry()
    direct = Histogram(name, "h", ["plan"], buckets=ADMISSION_BUCKETS, registry=direct_reg)
    batched = Histogram(name, "h", ["plan"], buckets=ADMISSION_BUCKETS, registry=batched_reg)
    return direct_reg, direct, batched_reg, batched


def _samples(registry: CollectorRegistry) -> list[str]:
    """Exposition lines without the `_created` timestamps (they differ by construction), sums
    rounded (a batch adds the same floats in another order)."""
    lines = []
    for line in generate_latest(registry).decode().splitlines():
        if "_created" in line:
            continue
        if "_sum{" in line:
            name, value = line.rsplit(" ", 1)
            line = f"{name} {float(value):.9g}"
        lines.append(line)
    return lines


@settings(max_examples=150, deadline=None)
@given(first=values, second=values, replay=st.booleans())
def test_a_batched_histogram_exposes_what_direct_observations_would(
    first: list[float], second: list[float], replay: bool
) -> None:
    direct_reg, direct, batched_reg, batched = _pair("h_seconds")
    child = direct.labels("pro")
    batch = Observations(batched.labels("pro"))
    assert supports_batches(batched.labels("pro"))
    if replay:  # the fallback for a prometheus-client without per-bucket storage
        batch.batched = False
    for values_ in (first, second):  # two flushes: batches add up
        for value in values_:
            child.observe(value)
            batch.observe(value)
        batch.flush()
        assert _samples(batched_reg) == _samples(direct_reg)


def test_counters_and_levels_reach_prometheus_on_flush_only() -> None:
    reg = CollectorRegistry()
    counter = Counter("c", "c", registry=reg)
    gauge = Gauge("g", "g", registry=reg)
    tally, level = Tally(counter), Level(gauge)
    for _ in range(5):
        tally.inc()
        level.inc()
    level.dec()
    assert reg.get_sample_value("c_total") == 0 and reg.get_sample_value("g") == 0
    tally.flush()
    level.flush()
    assert reg.get_sample_value("c_total") == 5 and reg.get_sample_value("g") == 4
    tally.flush()  # nothing new: nothing added
    for _ in range(4):
        level.dec()
    level.flush()
    assert reg.get_sample_value("c_total") == 5 and reg.get_sample_value("g") == 0


def test_an_exposition_includes_every_update_made_before_it() -> None:
    metrics = Metrics({"pro": Plan(rpm=10, rpd=100)})
    metrics.active.inc()
    metrics.count("pro", "allowed")
    metrics.upstream_status("pro", "default", 201)
    metrics.admitted.observe(0.0003)
    metrics.ttfb_by_plan["pro"].observe(0.02)
    text = metrics.exposition().decode()
    assert 'edge_requests_total{outcome="allowed",plan="pro"} 1.0' in text
    assert 'edge_upstream_responses_total{plan="pro",status="2xx",upstream="default"} 1.0' in text
    assert "edge_inflight_requests 1.0" in text
    assert 'edge_admission_seconds_bucket{le="0.0005"} 1.0' in text
    assert 'edge_admission_seconds_bucket{le="0.00025"} 0.0' in text
    assert 'edge_upstream_ttfb_seconds_count{plan="pro"} 1.0' in text
    metrics.active.dec()
    assert "edge_inflight_requests 0.0" in metrics.exposition().decode()
