"""Reading edge's /metrics in tests."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.waiting import wait_until

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(base_url: str) -> Samples:
    text = httpx.get(f"{base_url}/metrics", timeout=5).text
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def inflight_settles(base_url: str, timeout: float = 2.0) -> bool:
    """Whether edge_inflight_requests comes back to 0 within `timeout` seconds."""
    return wait_until(lambda: value(scrape(base_url), "edge_inflight_requests") == 0, timeout)
