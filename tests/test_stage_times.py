"""experiments/quality/stage_times.py: a run's stage times, read back from TensorBoard events with known wall times."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import experiment_script
from torch.utils.tensorboard import SummaryWriter

stage_times = experiment_script("quality/stage_times.py")


def test_stage_times_split_the_wall_time_at_each_stages_first_and_last_tick(tmp_path: Path) -> None:
    with SummaryWriter(tmp_path) as writer:
        # 8 px: ticks at 100, 110, 130 s; 16 px: 150, 190 s; 32 px: 260 s (one tick)
        for step, resolution, wall in ((128, 8, 100.0), (256, 8, 110.0), (384, 8, 130.0), (512, 16, 150.0),
                                       (640, 16, 190.0), (768, 32, 260.0)):  # fmt: skip
            writer.add_scalar("Progress/resolution", resolution, step, walltime=wall)
        for step, seconds in ((256, 1.5), (384, 2.0), (600, 4.0), (768, 8.0)):
            writer.add_scalar("Diversity/eval_s", seconds, step, walltime=0.0)
    rows = stage_times.stage_times(tmp_path)
    assert [(r.resolution, r.lead_in_s, r.ticks_s, r.evaluations_s) for r in rows] == [
        (8, 0.0, 30.0, 3.5),
        (16, 20.0, 40.0, 4.0),
        (32, 70.0, 0.0, 8.0),
    ]


def test_a_directory_without_ticks_is_one_clear_error(tmp_path: Path) -> None:
    with SummaryWriter(tmp_path) as writer:
        writer.add_scalar("Loss/D", 1.0, 1)
    with pytest.raises(SystemExit) as error:
        stage_times.stage_times(tmp_path)
    assert "Progress/resolution" in str(error.value)
    with pytest.raises(SystemExit, match="not a directory"):
        stage_times.stage_times(tmp_path / "missing")
