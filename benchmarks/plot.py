"""Plot the JSON results in benchmarks/results/ as PNGs next to them (needs the `plot` extra: matplotlib).

    .venv/bin/python benchmarks/plot.py [--results benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _bars(ax, labels, values, title, unit):
    bars = ax.bar(labels, values, color=["#4c72b0", "#dd8452", "#55a868", "#c44e52"][: len(labels)])
    ax.bar_label(bars, fmt="%.0f")
    ax.set_title(title)
    ax.set_ylabel(unit)


def plot_engine_latency(data: dict, out: Path) -> None:
    routes = data["routes"]
    names = list(routes)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    _bars(a, names, [routes[n]["mean_latency_ms"] for n in names], "Mean latency per route", "ms")
    _bars(b, names, [routes[n]["mean_visual_tokens"] for n in names], "Visual tokens per route", "merged tokens")
    fig.suptitle(f"engine_latency: {data['model']} on {data['device']}, image {data['image_size']}")
    fig.tight_layout()
    fig.savefig(out)


def plot_service_overhead(data: dict, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = ["in-process p50", "service p50", "in-process p99", "service p99"]
    values = [data["in_process"]["p50_ms"], data["grpc_ray_serve"]["p50_ms"],
              data["in_process"]["p99_ms"], data["grpc_ray_serve"]["p99_ms"]]
    _bars(ax, labels, values, f"Answer latency (p50 x{data['ratio_p50']:.2f}, p99 x{data['ratio_p99']:.2f})", "ms")
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(out)


def plot_cache(data: dict, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 4))
    _bars(ax, ["cold p50", "cached p50"], [data["cold"]["p50_ms"], data["warm"]["p50_ms"]],
          f"ZoomRegion with a question (x{data['speedup_p50']:.2f})", "ms")
    fig.tight_layout()
    fig.savefig(out)


PLOTS = {"engine_latency.json": plot_engine_latency, "service_overhead_direct.json": plot_service_overhead,
         "cache.json": plot_cache}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="benchmarks/results")
    results = Path(ap.parse_args().results)
    for name, plot in PLOTS.items():
        path = results / name
        if path.is_file():
            plot(json.loads(path.read_text()), path.with_suffix(".png"))
            print("wrote", path.with_suffix(".png"))


if __name__ == "__main__":
    main()
