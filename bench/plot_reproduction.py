"""Plots of the CPU-scale Table 2 reproduction: score per domain per model (mean ± std).

    python bench/plot_reproduction.py docs/reproduction/full.json [--out docs/reproduction]

Writes ``<profile>-table2.png`` (student, specialists, data mixture, both merge orders) and
``<profile>-merge-methods.png`` (math + science merged six ways, with both specialists).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DOMAINS = ("math", "code", "science")
TABLE2_ROWS = (
    "student",
    "math specialist",
    "code specialist",
    "science specialist",
    "data mixture (same compute)",
    "merge (math & code) & science",
    "merge (math & science) & code",
)


def _bars(ax: Any, summary: dict[str, Any], rows: list[str], domains: tuple[str, ...], title: str) -> None:
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        means = [summary[row][d]["mean"] if d in summary[row] else 0.0 for d in domains]
        stds = [summary[row][d]["std"] if d in summary[row] else 0.0 for d in domains]
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(domains))]
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=row)
    ax.set_xticks(range(len(domains)), domains)
    ax.set_ylabel("pass@1 (mean ± std over seeds)")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))


def plot(results: Path, out_dir: Path) -> list[Path]:
    """Draw both figures from one results JSON; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = json.loads(results.read_text())
    summary: dict[str, Any] = report["summary"]
    profile = report["meta"]["profile"]
    n = report["meta"]["settings"]
    seeds = f"SFT seeds {n['sft_seeds']}, eval seeds {n['eval_seeds']}"
    written: list[Path] = []
    out_dir.mkdir(parents=True, exist_ok=True)

    rows = [r for r in TABLE2_ROWS if r in summary]
    fig, ax = plt.subplots(figsize=(10, 4))
    _bars(ax, summary, rows, DOMAINS, f"Table 2 at CPU scale ({profile}; {seeds})")
    fig.tight_layout()
    path = out_dir / f"{profile}-table2.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    methods = sorted(r for r in summary if r.startswith("math + science: "))
    if methods:
        rows = [r for r in ("math specialist", "science specialist") if r in summary] + methods
        fig, ax = plt.subplots(figsize=(10, 4))
        _bars(ax, summary, rows, DOMAINS, f"Merge methods on math + science ({profile}; {seeds})")
        fig.tight_layout()
        path = out_dir / f"{profile}-merge-methods.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="default: the results file's folder")
    args = ap.parse_args(argv)
    for path in plot(args.results, args.out or args.results.parent):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
