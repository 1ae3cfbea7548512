"""The tables of experiments/quality/README.md from the result.json files run.py wrote.

    python experiments/quality/report.py DIR      # DIR as given to run.py --out

One markdown table per suite folder under DIR (mean ± standard deviation over the seeds of each arm).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def mean_sd(values: list[float], digits: int) -> str:
    """'m ± s' over the seeds (just 'm' for one run)."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def suite_table(rows: list[dict]) -> list[str]:
    """One line per arm: modes, KL, the other metrics present, train time, the trainer's final verdicts."""
    by_arm: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_arm[row["arm"]].append(row)
    extra = [k for k in ("swd", "precision", "recall", "coverage") if any(k in r["eval"] for r in rows)]
    head = ["arm", "seeds", "modes covered", "KL to uniform", *extra, "train min", "final verdicts"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, runs in by_arm.items():
        ev = [r["eval"] for r in runs]
        cells = [
            arm,
            " ".join(str(r["seed"]) for r in runs),
            mean_sd([e["modes_covered"] for e in ev], 1),
            mean_sd([e["kl_to_uniform"] for e in ev], 3),
            *(mean_sd([e[k] * (1e3 if k == "swd" else 1) for e in ev if k in e], 2) for k in extra),
            mean_sd([r["train_s"] / 60 for r in runs], 1),
            ", ".join(str(r["watch"]["verdict"]) for r in runs),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    for suite_dir in sorted(p for p in args.out.iterdir() if p.is_dir()):
        rows = [json.loads(f.read_text()) for f in sorted(suite_dir.glob("*/result.json"))]
        floor = [r for r in rows if r["arm"] == "real"]
        rows = [r for r in rows if "eval" in r]
        if rows:
            print(f"\n### {suite_dir.name}\n")
            print("\n".join(suite_table(rows)))
        for real in floor:  # the real data read the same way: the best a generator can score
            n, modes, kl = real["num_samples"], real["modes_covered"], real["kl_to_uniform"]
            print(f"| real data ({n} images) | – | {modes} | {kl:.3f} |")


if __name__ == "__main__":
    main()
