"""Per-stage summary of a run's stats.jsonl: python experiments/default_run/summarize.py runs/<run>"""

import json
import statistics
import sys
from pathlib import Path


def main(run_dir: str) -> None:
    """Print a markdown table: median img/s, peak RSS and the last tick's losses and scores per stage."""
    rows = [json.loads(line) for line in (Path(run_dir) / "stats.jsonl").read_text().splitlines()]
    print("| resolution | ticks | median img/s | peak RSS MB | Loss/D | Loss/G | Loss/gp | Scores/real | Scores/fake |")
    print("|---|---|---|---|---|---|---|---|---|")
    for res in sorted({r["Progress/resolution"] for r in rows}):
        stage = [r for r in rows if r["Progress/resolution"] == res]
        last = stage[-1]
        print(
            f"| {res} | {len(stage)} | {statistics.median(r['Speed/img_per_s'] for r in stage):.1f} "
            f"| {max(r['Resources/peak_rss_mb'] for r in stage):.0f} | {last['Loss/D']:.1f} | {last['Loss/G']:.1f} "
            f"| {last['Loss/gp']:.2f} | {last['Scores/real']:.1f} | {last['Scores/fake']:.1f} |"
        )


if __name__ == "__main__":
    main(sys.argv[1])
