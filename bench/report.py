"""Human views of a results file: a console summary, the markdown table for
docs/benchmarks.md and a PNG plot (matplotlib, from the ``bench`` extra)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.waypoint import L7_PROXY
from bench.waypoint import SYSTEMS as WAYPOINT_SYSTEMS

SYSTEM_LABELS = {"none": "no mesh", "ambient": "ambient-lite", "envoy": "Envoy"}
WAYPOINT_LABELS = {"no_waypoint": "no waypoint", "waypoint": "our waypoint",
                   "envoy": "Envoy waypoint"}
PROXIES = {"ambient": ("ztunnel-node-1", "ztunnel-node-2"),
           "envoy": ("envoy-client", "envoy-server")}
ZTUNNELS = ("ztunnel-node-1", "ztunnel-node-2")
# The same colour for a system's role in every panel: baseline, ours, Envoy.
COLOURS = {"none": "C0", "no_waypoint": "C0", "ambient": "C1", "waypoint": "C1", "envoy": "C2"}
FIXED_RATE = re.compile(r"waypoint_(\d+)rps")
SATURATION = re.compile(r"waypoint_saturation_(\d+)conn")

Row = tuple[str, str, str, str, str]


def _row(label: str, values: dict[str, float | None], columns: tuple[str, ...],
         fmt: str) -> Row:
    """One table row: the columns' values and the ratio of the second to the third (ours
    to Envoy's, measured in the same run)."""
    cells = [fmt.format(value) if (value := values.get(c)) is not None else "-"
             for c in columns]
    ours, envoy = values.get(columns[1]), values.get(columns[2])
    ratio = f"{ours / envoy:.2f}x" if ours is not None and envoy else "-"
    return (label, cells[0], cells[1], cells[2], ratio)


def rows(document: dict[str, Any]) -> list[Row]:
    """(metric, no mesh, ambient-lite, Envoy, ambient/Envoy) from the medians."""
    summary = document["summary"]
    columns = ("none", "ambient", "envoy")
    out: list[Row] = []

    def add(label: str, scenario: str, key: str, fmt: str = "{:.1f}",
            systems: tuple[str, ...] = columns) -> None:
        if scenario in summary:
            out.append(_row(label, {s: summary[scenario][s].get(key) for s in systems},
                            columns, fmt))

    def add_cpu(label: str, scenario: str, field: str, fmt: str) -> None:
        if scenario not in summary:
            return
        for side, index in (("client", 0), ("server", 1)):
            values = {s: summary[scenario][s].get(f"proxies.{PROXIES[s][index]}.{field}")
                      for s in PROXIES}
            out.append(_row(f"{label} ({side} proxy)", values, columns, fmt))

    for streams in (1, 8):
        add(f"bulk TCP, {streams} stream(s): MB/s", f"bulk_{streams}", "mb_per_s", "{:.0f}")
        add_cpu(f"bulk {streams}: CPU s per GB", f"bulk_{streams}", "cpu_s_per_gb", "{:.2f}")
    for pct in ("p50", "p90", "p99"):
        add(f"1 KB HTTP at 1000 rps: {pct} ms", "latency_1000rps", f"{pct}_ms", "{:.3f}")
    for pct in ("p50", "p90", "p99"):
        add(f"added {pct} over no mesh, ms", "latency_1000rps", f"added_{pct}_ms", "{:.3f}",
            systems=("ambient", "envoy"))
    add_cpu("vCPU per 1000 rps", "latency_1000rps", "vcpu_per_1000_rps", "{:.3f}")
    add_cpu("RSS at 1000 rps, MB", "latency_1000rps", "rss_mb", "{:.1f}")
    add("new tunnelled connections/s (8 clients)", "churn", "per_second", "{:.0f}")
    add_cpu("KB per idle tunnel", "idle_tunnels", "kb_per_tunnel", "{:.1f}")
    return out


def numbered(names: Iterable[str], pattern: re.Pattern[str]) -> list[tuple[str, int]]:
    """(name, its number) of the result names ``pattern`` matches, by number: the waypoint
    scenario's saturation runs (connections) and its fixed-rate run (rps)."""
    found = [(name, int(match.group(1))) for name in names
             if (match := pattern.fullmatch(name))]
    return sorted(found, key=lambda pair: pair[1])


def waypoint_rows(document: dict[str, Any]) -> list[Row]:
    """(metric, no waypoint, our waypoint, Envoy waypoint, ours/Envoy) from the medians."""
    summary = document["summary"]
    out: list[Row] = []

    def add(label: str, scenario: str, key: str, fmt: str,
            systems: tuple[str, ...] = WAYPOINT_SYSTEMS) -> None:
        if scenario in summary:
            out.append(_row(label, {s: summary[scenario][s].get(key) for s in systems},
                            WAYPOINT_SYSTEMS, fmt))

    def add_l7(label: str, scenario: str, field: str, fmt: str) -> None:
        if scenario in summary:
            values = {s: summary[scenario][s].get(f"proxies.{L7_PROXY[s]}.{field}")
                      for s in L7_PROXY}
            out.append(_row(label, values, WAYPOINT_SYSTEMS, fmt))

    def add_ztunnels(label: str, scenario: str, field: str, fmt: str) -> None:
        if scenario in summary:
            values = {s: sum(summary[scenario][s][f"proxies.{z}.{field}"] for z in ZTUNNELS)
                      for s in WAYPOINT_SYSTEMS}
            out.append(_row(label, values, WAYPOINT_SYSTEMS, fmt))

    for name, connections in numbered(summary, SATURATION):
        add(f"HTTP rps at saturation, {connections} connections", name, "rps", "{:.0f}")
        for pct in ("p50", "p99"):
            add(f"{connections} conn.: {pct} ms", name, f"{pct}_ms", "{:.2f}")
        add_l7(f"{connections} conn.: L7 proxy vCPU", name, "vcpu", "{:.2f}")
        add_l7(f"{connections} conn.: L7 proxy vCPU per 1000 rps", name,
               "vcpu_per_1000_rps", "{:.3f}")
        runs = document["results"][name]
        out.append(_row(f"{connections} conn.: tunnels opened to the server pod, "
                        f"all {len(runs[WAYPOINT_SYSTEMS[0]])} runs",
                        {s: sum(run["upstream_tunnels_opened"] for run in runs[s])
                         for s in WAYPOINT_SYSTEMS}, WAYPOINT_SYSTEMS, "{:.0f}"))
    for name, rate in numbered(summary, FIXED_RATE):
        for pct in ("p50", "p90", "p99"):
            add(f"1 KB HTTP at {rate} rps: {pct} ms", name, f"{pct}_ms", "{:.3f}")
        for pct in ("p50", "p90", "p99"):
            add(f"added {pct} over no waypoint, ms", name, f"added_{pct}_ms", "{:.3f}",
                systems=tuple(L7_PROXY))
        add_l7(f"L7 proxy vCPU per 1000 rps (at {rate} rps)", name, "vcpu_per_1000_rps",
               "{:.3f}")
        add_l7(f"L7 proxy RSS at {rate} rps, MB", name, "rss_mb", "{:.1f}")
        add_ztunnels(f"both ztunnels: vCPU per 1000 rps (at {rate} rps)", name,
                     "vcpu_per_1000_rps", "{:.3f}")
    idle = document["results"].get("waypoint_idle_rss_mb")
    if idle:
        out.append(_row("L7 proxy RSS idle (ready, before load), MB",
                        {s: idle.get(L7_PROXY[s]) for s in L7_PROXY}, WAYPOINT_SYSTEMS,
                        "{:.1f}"))
    return out


def markdown_table(document: dict[str, Any]) -> str:
    """The main table (no mesh / ambient-lite / Envoy) and, when the waypoint scenario ran,
    its own table: its columns are the L7 proxies, over ztunnels in every column."""
    tables = []
    if main := rows(document):
        tables.append(_table(("no mesh", "ambient-lite", "Envoy", "ambient / Envoy"), main))
    if waypoint := waypoint_rows(document):
        tables.append(_table(("no waypoint (ztunnels only)", "our waypoint",
                              "Envoy waypoint", "ours / Envoy"), waypoint))
    return "\n\n".join(tables)


def _table(headers: tuple[str, str, str, str], body: list[Row]) -> str:
    lines = ["| metric (median) | " + " | ".join(headers) + " |", "|---|---:|---:|---:|---:|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def print_summary(document: dict[str, Any]) -> None:
    print(markdown_table(document))
    if "controlplane" in document["results"]:
        print(json.dumps(document["results"]["controlplane"], indent=1))
    for name, profile in document["results"].get("profile", {}).items():
        print(f"{name}: {profile.get('samples', 0)} samples, top own time")
        for entry in profile.get("self", [])[:10]:
            print(f"  {entry['percent']:5.1f}%  {entry['function']}")


def can_plot() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


Panel = tuple[str, list[tuple[str, str, str]], dict[str, str]]


def plot_panels(summary: dict[str, Any]) -> list[Panel]:
    """(title, [(group label, result name, key)], system labels) for each panel with data."""
    panels: list[Panel] = [
        ("Bulk TCP MB/s (higher is better, log)",
         [(f"{n} stream{'s' if n > 1 else ''}", f"bulk_{n}", "mb_per_s") for n in (1, 8)],
         SYSTEM_LABELS),
        ("1 KB HTTP at 1000 rps, ms (lower is better)",
         [(p, "latency_1000rps", f"{p}_ms") for p in ("p50", "p90", "p99")], SYSTEM_LABELS),
        ("New tunnelled connections/s (higher is better)",
         [("8 clients", "churn", "per_second")], SYSTEM_LABELS),
        ("HTTP through an L7 proxy: rps at saturation\n(higher is better)",
         [(f"{n} connections", name, "rps") for name, n in numbered(summary, SATURATION)],
         WAYPOINT_LABELS),
    ]
    for name, rate in numbered(summary, FIXED_RATE):
        panels.append((f"L7 proxy at {rate} rps: added ms over\nno waypoint (lower is better)",
                       [(p, name, f"added_{p}_ms") for p in ("p50", "p90", "p99")],
                       {s: WAYPOINT_LABELS[s] for s in L7_PROXY}))
    return [panel for panel in panels if any(scenario in summary for _, scenario, _ in panel[1])]


def plot(document: dict[str, Any], path: Path) -> None:
    """One panel per measured scenario (bulk MB/s, latency percentiles, new connections/s,
    the waypoint's rps and added latency); one bar per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = document["summary"]
    panels = plot_panels(summary)
    if not panels:
        return
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.5),
                                squeeze=False)
    for axis, (title, groups, labels) in zip(axes[0], panels, strict=True):
        width = 0.8 / len(labels)
        for offset, (system, label) in enumerate(labels.items()):
            values = [summary.get(scenario, {}).get(system, {}).get(key, 0.0)
                      for _, scenario, key in groups]
            positions = [i + (offset - (len(labels) - 1) / 2) * width
                         for i in range(len(groups))]
            bars = axis.bar(positions, values, width, label=label, color=COLOURS[system])
            axis.bar_label(bars, fmt="%.3g", fontsize=7)
        axis.set_xticks(range(len(groups)), [label for label, _, _ in groups])
        axis.set_title(title, fontsize=10)
        axis.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, -0.3), ncol=3)
        if title.startswith("Bulk"):
            axis.set_yscale("log")
    machine = document["machine"]
    envoy_version = machine["envoy"]
    figure.suptitle(
        f"ambient-lite vs Envoy {envoy_version} vs no mesh — {machine['cores']} cores, "
        f"{machine['cpu_model']}, {document['timestamp']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.report",
        description="The markdown tables (and optionally the plot) of a results file.")
    parser.add_argument("results", type=Path, help="a bench/results/<timestamp>.json file")
    parser.add_argument("plot", type=Path, nargs="?", help="where to write the PNG plot")
    args = parser.parse_args(argv)
    try:
        loaded = json.loads(args.results.read_text())
        table = markdown_table(loaded)
    except (OSError, ValueError, KeyError) as exc:
        parser.error(f"{args.results}: not a readable results file ({type(exc).__name__}: {exc})")
    print(table)
    if args.plot is not None:
        plot(loaded, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
