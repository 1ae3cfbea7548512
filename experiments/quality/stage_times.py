"""Where a run's wall time went, stage by stage, from its TensorBoard events.

    python experiments/quality/stage_times.py RUN_DIR

For each resolution: the seconds from the previous stage's last tick to this stage's first (the previous
stage's end-of-stage work, growing the networks and this stage's first tick of training), the seconds its
ticks span, and the collapse watch's evaluations within it (`Diversity/eval_s`). One markdown table on stdout.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


@dataclass(frozen=True)
class StageTime:
    """The wall-clock seconds of one stage of a run."""

    resolution: int
    lead_in_s: float  # previous stage's last tick -> this stage's first tick
    ticks_s: float  # this stage's first tick -> its last
    evaluations_s: float  # the collapse watch's evaluations logged at this stage's steps


def stage_times(run_dir: Path) -> list[StageTime]:
    """The run's stages in order of resolution, timed from the wall times of its `Progress/resolution` scalars."""
    if not run_dir.is_dir():
        raise SystemExit(f"{run_dir}: not a directory (give a pgan-train run directory)")
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    if "Progress/resolution" not in tags:
        raise SystemExit(f"{run_dir}: no Progress/resolution scalars in its TensorBoard events (not a pgan-train run?)")
    ticks = events.Scalars("Progress/resolution")
    walls: dict[int, list[float]] = defaultdict(list)
    for tick in ticks:
        walls[int(tick.value)].append(tick.wall_time)
    evaluations: dict[int, float] = defaultdict(float)
    if "Diversity/eval_s" in tags:
        steps = sorted((t.step, int(t.value)) for t in ticks)
        for e in events.Scalars("Diversity/eval_s"):
            # the stage of the latest tick at or before the evaluation's step (evaluations before the first
            # tick belong to the first stage)
            resolution = next((r for s, r in reversed(steps) if s <= e.step), steps[0][1])
            evaluations[resolution] += e.value
    rows, previous_end = [], ticks[0].wall_time
    for resolution in sorted(walls):
        first, last = min(walls[resolution]), max(walls[resolution])
        rows.append(StageTime(resolution, first - previous_end, last - first, evaluations[resolution]))
        previous_end = last
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    rows = stage_times(parser.parse_args().run_dir)
    print("| px | lead-in s | ticks s | evaluations s |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r.resolution} | {r.lead_in_s:.1f} | {r.ticks_s:.1f} | {r.evaluations_s:.1f} |")
    total = sum(r.lead_in_s + r.ticks_s for r in rows)
    print(f"| all | | {total:.1f} (first tick to last) | {sum(r.evaluations_s for r in rows):.1f} |")


if __name__ == "__main__":
    main()
