"""`make bench`'s harness, run end to end in its quick mode (no timing is asserted: the numbers
of a shared machine mean nothing to a test; that it runs, measures every configuration and
writes its three files does)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.bench import SINGLE_STREAM_ROUNDS
from tests.support.edge_process import REPO

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


def test_quick_bench_runs_end_to_end_and_writes_its_files(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.bench",
            "--quick",
            "--connections",
            "1",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    [json_file] = tmp_path.glob("*.json")
    results = json.loads(json_file.read_text())
    assert json_file.with_suffix(".md").read_text() in done.stdout
    png = json_file.with_suffix(".png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000

    names = {
        "direct", "nginx", "edge-1w", "edge-1w-metered", "edge-1w-access", "edge-1w-routed",
        "edge-1w-traced", "edge-2w",
    }  # fmt: skip
    load = {(r["target"], r["connections"]): r for r in results["load"]}
    assert set(load) == {(n, 1) for n in names}  # 32 and 128 too in a real run
    for (name, _), row in load.items():
        assert row["rps"] > 0 and row["p50_ms"] > 0 and row["errors"] == 0, row
        if name != "direct":
            assert row["cpu_us_per_req"] > 0 and row["rss_mb"] > 0
            assert "added_p50_ms" in row and "vs_nginx" in row
    for name in ("edge-1w", "edge-2w", "edge-1w-routed", "edge-1w-traced"):
        # exactly one Redis command (the admission EVALSHA) for every admitted request
        assert load[(name, 1)]["redis_cmds_per_req"] == 1.0
    # a metered key: the admission, and its settlement after the answer (a late one may miss
    # the count)
    assert 1.9 <= load[("edge-1w-metered", 1)]["redis_cmds_per_req"] <= 2.0
    # the access log looks a key's owner up once a minute, never per request
    assert 1.0 <= load[("edge-1w-access", 1)]["redis_cmds_per_req"] <= 1.01

    streams = {(r["target"], r["streams"]): r for r in results["streams"]}
    assert set(streams) == {(n, s) for n in ("direct", "nginx", "edge-1w") for s in (1, 50)}
    for (_, count), row in streams.items():
        assert row["failed_streams"] == 0
        rounds = SINGLE_STREAM_ROUNDS if count == 1 else 1  # one stream: a few in a row
        assert row["events"] == rounds * count * results["streams_meta"]["chunks"]
    assert {t["what"] for t in results["targets"]} >= {"edge added TTFB, 1 stream"}
    assert any("LiteLLM" in note for note in results["notes"])
