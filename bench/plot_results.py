"""PNG plots of recorded benchmark rows (``bench/results/<device>.jsonl``), for docs/benchmarks.md.

    python bench/plot_results.py [--results bench/results/NVIDIA_H200.jsonl] [--out docs/img]

Writes ``h200-weight-variants.png``: batch-1 time per token, decode and prefill throughput of the
Llama-3-8B shape for each weight variant (bf16, fp8, w4a16), the latest genserve row of each
metric, with the roofline where one was recorded; and ``h200-load-test.png``: TTFT and time per
output token p50/p99 against the request rate, over HTTP and direct, from the latest
``bench/load_test.py`` run's ``load_*`` rows. Needs matplotlib (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PANELS = (("tpot_b1_ms", "batch-1 time per token (ms)", True),
          ("decode_tok_s_128x32x2048", "decode 128 x 32 -> 2048 (tok/s)", False),
          ("prefill_tok_s_32x4096", "prefill 32 x 4096 (tok/s)", False))
VARIANTS = (("bf16", ""), ("fp8", "_fp8"), ("w4a16", "_w4a16"))


def latest(rows: list[dict], metric: str, engine: str) -> dict | None:
    """The last row recorded for ``metric`` by ``engine`` (rows are appended in time order)."""
    found = [r for r in rows if r["metric"] == metric and r["engine"] == engine]
    return found[-1] if found else None


def load_results(rows: list[dict]) -> tuple[dict, str]:
    """``{engine: {rate: {stat: value}}}`` of the last commit that recorded ``load_*`` rows, and it."""
    load = [r for r in rows if r["metric"].startswith("load_")]
    if not load:
        return {}, ""
    commit = load[-1].get("commit", "?")
    out: dict = {}
    for r in load:
        m = re.fullmatch(r"load_(.+)_rate([0-9.]+)", r["metric"])
        if m and r.get("commit") == commit:
            out.setdefault(r["engine"], {}).setdefault(float(m.group(2)), {})[m.group(1)] = r["value"]
    return out, commit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", default=os.path.join(ROOT, "bench", "results", "NVIDIA_H200.jsonl"))
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "img"))
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(args.results) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(13, 3.8))
    for ax, (metric, label, lower_better) in zip(axes, PANELS):
        names, values, commits, roofs = [], [], [], []
        for name, suffix in VARIANTS:
            row = latest(rows, metric + suffix, "genserve")
            if row is None:
                continue
            roof = latest(rows, metric + suffix, "roofline")
            names.append(name)
            values.append(row["value"])
            commits.append(row.get("commit", "?"))
            roofs.append(roof["value"] if roof else None)
        bars = ax.bar(names, values, color=["#4c72b0", "#dd8452", "#55a868"][: len(names)])
        for bar, value, commit in zip(bars, values, commits):
            ax.annotate(f"{value:,.2f}" if lower_better else f"{value:,.0f}", (bar.get_x() + bar.get_width() / 2,
                        bar.get_height()), ha="center", va="bottom", fontsize=8)
            ax.annotate(commit, (bar.get_x() + bar.get_width() / 2, 0), ha="center", va="bottom", fontsize=7,
                        color="white")
        for i, roof in enumerate(roofs):
            if roof is not None:
                ax.hlines(roof, i - 0.4, i + 0.4, colors="black", linestyles="dashed")
        ax.set_ylim(0, max(values + [r for r in roofs if r is not None]) * 1.15)
        ax.set_title(label + (" (dashed: roofline)" if any(r is not None for r in roofs) else ""), fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("genserve on one H200, Llama-3-8B shape, random weights (bench/gpu_llama8b.py)", fontsize=10)
    fig.tight_layout()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "h200-weight-variants.png")
    fig.savefig(path, dpi=110)
    print(path)

    results, commit = load_results(rows)
    if results:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from load_test import plot

        path = os.path.join(args.out, "h200-load-test.png")
        plot(results, path, f"genserve on one H200, Llama-3-8B shape, Poisson arrivals, streaming "
                            f"(bench/load_test.py, {commit})")
        print(path)


if __name__ == "__main__":
    main()
