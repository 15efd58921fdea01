"""Human views of a results file: a console summary, the markdown table for
docs/benchmarks.md and a PNG plot (matplotlib, from the ``bench`` extra)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

SYSTEM_LABELS = {"none": "no mesh", "ambient": "ambient-lite", "envoy": "Envoy"}
PROXIES = {"ambient": ("ztunnel-node-1", "ztunnel-node-2"),
           "envoy": ("envoy-client", "envoy-server")}


def rows(document: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(metric, no mesh, ambient-lite, Envoy, ambient/Envoy) from the medians."""
    summary = document["summary"]
    out: list[tuple[str, str, str, str, str]] = []

    def add(label: str, scenario: str, key: str, fmt: str = "{:.1f}",
            systems: tuple[str, ...] = ("none", "ambient", "envoy")) -> None:
        if scenario not in summary:
            return
        values = {s: summary[scenario][s].get(key) for s in systems}
        cells = [fmt.format(values[s]) if values.get(s) is not None else "-"
                 for s in ("none", "ambient", "envoy")]
        ambient, envoy = values.get("ambient"), values.get("envoy")
        ratio = f"{ambient / envoy:.2f}x" if ambient is not None and envoy else "-"
        out.append((label, *cells, ratio))  # type: ignore[arg-type]

    def add_cpu(label: str, scenario: str, field: str, fmt: str) -> None:
        if scenario not in summary:
            return
        for side, index in (("client", 0), ("server", 1)):
            values = {s: summary[scenario][s].get(f"proxies.{PROXIES[s][index]}.{field}")
                      for s in PROXIES}
            ratio = (f"{values['ambient'] / values['envoy']:.2f}x"
                     if values["ambient"] is not None and values["envoy"] else "-")
            out.append((f"{label} ({side} proxy)", "-",
                        fmt.format(values["ambient"]), fmt.format(values["envoy"]), ratio))

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


def markdown_table(document: dict[str, Any]) -> str:
    lines = ["| metric (median) | no mesh | ambient-lite | Envoy | ambient / Envoy |",
             "|---|---:|---:|---:|---:|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows(document)]
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


def plot(document: dict[str, Any], path: Path) -> None:
    """Three panels: bulk MB/s, latency percentiles, new connections/s; one bar per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = document["summary"]
    panels = [
        ("Bulk TCP MB/s (higher is better)",
         [(f"{n} stream{'s' if n > 1 else ''}", f"bulk_{n}", "mb_per_s") for n in (1, 8)]),
        ("1 KB HTTP at 1000 rps, ms (lower is better)",
         [(p, "latency_1000rps", f"{p}_ms") for p in ("p50", "p90", "p99")]),
        ("New tunnelled connections/s (higher is better)",
         [("8 clients", "churn", "per_second")]),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(15, 4.5))
    for axis, (title, groups) in zip(axes, panels, strict=True):
        width = 0.27
        for offset, system in enumerate(SYSTEM_LABELS):
            values = [summary.get(scenario, {}).get(system, {}).get(key, 0.0)
                      for _, scenario, key in groups]
            positions = [i + (offset - 1) * width for i in range(len(groups))]
            bars = axis.bar(positions, values, width, label=SYSTEM_LABELS[system])
            axis.bar_label(bars, fmt="%.3g", fontsize=7)
        axis.set_xticks(range(len(groups)), [label for label, _, _ in groups])
        axis.set_title(title, fontsize=10)
    axes[0].set_yscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=3)
    machine = document["machine"]
    envoy_version = machine["envoy"]
    figure.suptitle(
        f"ambient-lite vs Envoy {envoy_version} vs no mesh — {machine['cores']} cores, "
        f"{machine['cpu_model']}, {document['timestamp']}", fontsize=10)
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        print("usage: python -m bench.report RESULTS.json [PLOT.png]", file=sys.stderr)
        sys.exit(2)
    loaded = json.loads(Path(sys.argv[1]).read_text())
    print(markdown_table(loaded))
    if len(sys.argv) > 2:
        plot(loaded, Path(sys.argv[2]))
