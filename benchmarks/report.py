"""A benchmark run written down: JSON (everything), a Markdown table, a PNG chart."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import orjson


def write_json(path: Path, results: dict[str, Any]) -> None:
    path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2) + b"\n")


def _num(value: float | None, fmt: str, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    text = format(value, fmt)
    return f"+{text}" if signed and value >= 0 else text


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    out = [
        f"Run {meta['date']} on `{meta['host']}` ({meta['cpus']} CPUs), edge {meta['edge']} "
        f"({meta['commit']}); wrk -t1, {meta['seconds']} s runs, medians of "
        f"{meta['reps']} alternating repetitions. Versions: "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + ".",
        "",
        "| conns | configuration | req/s | p50 ms | p99 ms | added p50 | added p99 | x nginx "
        "| proxy CPU µs/req | Redis cmds/req | RSS MB | errors |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["load"]:
        out.append(
            f"| {row['connections']} | {row['label']} | {row['rps']:,.0f} | "
            f"{row['p50_ms']:.3f} | {row['p99_ms']:.3f} | "
            f"{_num(row.get('added_p50_ms'), '.3f', True)} | "
            f"{_num(row.get('added_p99_ms'), '.3f', True)} | "
            f"{_num(row.get('vs_nginx'), '.3f')} | {_num(row.get('cpu_us_per_req'), '.0f')} | "
            f"{_num(row.get('redis_cmds_per_req'), '.3f')} | {_num(row.get('rss_mb'), '.0f')} | "
            f"{row['errors']} |"
        )
    if results["streams"]:
        s = results["streams_meta"]
        out += [
            "",
            f"SSE: {s['chunks']} chunks {s['gap_ms']} ms apart per stream; a chunk's delay is "
            "its arrival minus the upstream's write stamp; added = minus the direct run's.",
            "",
            "| streams | configuration | chunk delay p50 ms | p99 ms | added p50 | added p99 "
            "| TTFB p50 ms | added TTFB | TTFB max ms | failed |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in results["streams"]:
            out.append(
                f"| {row['streams']} | {row['label']} | {row['chunk_p50_ms']:.3f} | "
                f"{row['chunk_p99_ms']:.3f} | {_num(row.get('added_chunk_p50_ms'), '.3f', True)} "
                f"| {_num(row.get('added_chunk_p99_ms'), '.3f', True)} | "
                f"{row['ttfb_p50_ms']:.3f} | {_num(row.get('added_ttfb_p50_ms'), '.3f', True)} | "
                f"{row['ttfb_max_ms']:.3f} | {row['failed_streams']} |"
            )
    if results["targets"]:
        out += ["", "| target | goal | measured | |", "|---|---:|---:|---|"]
        for t in results["targets"]:
            verdict = "met" if t["met"] else "**missed**"
            out.append(f"| {t['what']} | {t['goal']} | {t['measured']} | {verdict} |")
    if results["notes"]:
        out += ["", *(f"- {note}" for note in results["notes"])]
    return "\n".join(out) + "\n"


def chart(path: Path, results: dict[str, Any]) -> None:
    """Two panels: req/s and added p50 latency, per configuration and connection count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["load"]
    conns = sorted({r["connections"] for r in rows})
    labels = list(dict.fromkeys(r["label"] for r in rows))
    by = {(r["label"], r["connections"]): r for r in rows}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        xs = [c + (i - (len(labels) - 1) / 2) * width for c in range(len(conns))]
        rps = [by[(label, c)]["rps"] if (label, c) in by else 0 for c in conns]
        added = [max(by[(label, c)].get("added_p50_ms") or 0, 0.001) for c in conns]
        bars = left.bar(xs, rps, width, label=label)
        left.bar_label(bars, labels=[f"{v / 1000:.1f}k" for v in rps], fontsize=7)
        if label != labels[0]:  # the direct row adds nothing by definition
            bars = right.bar(xs, added, width, label=label, color=bars.patches[0].get_facecolor())
            right.bar_label(bars, labels=[f"{v:.2f}" for v in added], fontsize=7)
    for ax, title, unit in (
        (left, "throughput", "requests / s"),
        (right, "latency added over calling the upstream directly (p50)", "ms"),
    ):
        ax.set_xticks(range(len(conns)), [f"{c} conn" for c in conns])
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.grid(axis="y", alpha=0.3)
    left.set_yscale("log")
    right.set_yscale("log")
    handles, names = left.get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=len(names), fontsize=9)
    meta = results["meta"]
    fig.suptitle(f"edge benchmark, {meta['date']}, {meta['host']} ({meta['cpus']} CPUs)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
