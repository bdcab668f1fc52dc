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
    if results.get("capacity"):
        c = results["capacity_meta"]
        out += [
            "",
            f"Stream capacity: N concurrent streams of {c['chunks']} chunks {c['gap_ms']} ms "
            f"apart, started over {c['ramp_ms']} ms (the burst: as named); compiled load "
            "(benchmarks/go/ssebench); added = minus the direct run of the same N.",
            "",
            "| run | configuration | added chunk p50 ms | added p99 | added p99.9 "
            "| TTFB p50 ms | TTFB p99 ms | worst rep's TTFB p99 | proxy CPU µs/chunk | RSS MB "
            "| failed |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in results["capacity"]:
            out.append(
                f"| {row['run']} | {row['label']} | "
                f"{_num(row.get('added_delay_p50_ms'), '.3f', True)} | "
                f"{_num(row.get('added_delay_p99_ms'), '.3f', True)} | "
                f"{_num(row.get('added_delay_p999_ms'), '.3f', True)} | "
                f"{row['ttfb_p50_ms']:.3f} | {row['ttfb_p99_ms']:.3f} | "
                f"{_num(row.get('ttfb_p99_ms_worst'), '.3f')} | "
                f"{_num(row.get('cpu_us_per_chunk'), '.1f')} | {_num(row.get('rss_mb'), '.0f')} "
                f"| {row['failed_streams']} |"
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


def capacity_chart(path: Path, results: dict[str, Any]) -> None:
    """Added chunk delay p99 (and p99.9) against concurrent streams, per proxy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["capacity"] if r["target"] != "direct" and r["run"].isdigit()]
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for label in dict.fromkeys(r["label"] for r in rows):
        mine = sorted((r for r in rows if r["label"] == label), key=lambda r: r["streams"])
        xs = [r["streams"] for r in mine]
        line = ax.plot(xs, [r["added_delay_p99_ms"] for r in mine], marker="o", label=label)
        ax.plot(
            xs, [r["added_delay_p999_ms"] for r in mine], linestyle=":",
            color=line[0].get_color(),
        )  # fmt: skip
    ax.set_xlabel("concurrent streams (100 chunks, 20 ms apart)")
    ax.set_ylabel("added chunk delay, ms (solid p99, dotted p99.9)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    meta = results["meta"]
    ax.set_title(f"stream capacity, {meta['date']}, {meta['host']} ({meta['cpus']} CPUs)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
