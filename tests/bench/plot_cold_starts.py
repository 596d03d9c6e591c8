"""Plots the cold-start distributions from `make bench`'s JSON (target/bench/results.json).

Usage: python3 tests/bench/plot_cold_starts.py RESULTS.json OUT.png
One panel per runtime image: first-execution times with a warm pool, without one, and the raw
Docker start (create + start + healthy), each sample a dot, p50 marked.
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(results_path, out_path):
    with open(results_path) as f:
        pools = json.load(f).get("pools") or {}
    if not pools:
        sys.exit("no pool results in " + results_path)
    names = list(pools)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4), squeeze=False)
    series = [("pool", "with pool", "tab:green"), ("no_pool", "no pool", "tab:orange"),
              ("raw_docker", "raw Docker", "tab:gray")]
    for ax, name in zip(axes[0], names):
        result = pools[name]
        for i, (key, label, color) in enumerate(series):
            samples = result[key]["samples_ms"]
            ax.scatter([i + 1 + (j - len(samples) / 2) * 0.02 for j in range(len(samples))],
                       samples, s=12, color=color, alpha=0.7)
            p50 = result[key]["p50_ms"]
            ax.hlines(p50, i + 0.7, i + 1.3, color=color, linewidth=2)
            ax.annotate(f"p50 {p50:.1f} ms", (i + 1, p50), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=8)
        ax.set_yscale("log")
        ax.set_xticks([1, 2, 3], [label for _, label, _ in series])
        ax.set_title(f"{name} ({result['image']})", fontsize=10)
        ax.set_ylabel("first execution, ms (log)")
        ax.grid(True, which="both", axis="y", alpha=0.3)
    fig.suptitle("Hearth cold starts: first execution of a new function through the executor")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
