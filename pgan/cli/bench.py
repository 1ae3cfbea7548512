"""`pgan-bench`: throughput, FLOPs, MFU, memory and loader speed of the training iteration.

One JSON object per resolution x alpha on stdout (the fields are a public interface: see
`pgan.bench.BenchResult`), a table on stderr; with `project=<schedule preset>`, one more object
{"projection": ...}: that schedule's wall-clock at the measured rates (`pgan.bench.project_schedule`).
Exit 2 with one line `error: ...` on bad settings.
"""

from __future__ import annotations

import json
import sys

import hydra
from omegaconf import DictConfig

from pgan.cli import CONFIG_DIR, exit_on_bad_overrides, exit_with_user_error
from pgan.errors import UserError


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="bench")
def _hydra_main(cfg: DictConfig) -> None:
    from pgan.bench import check_bench_config, check_project, project_schedule, run_bench, to_json_lines, to_table

    try:
        if cfg.project is not None:
            check_project(str(cfg.project), check_bench_config(cfg))  # before the measurements
        results = run_bench(cfg)
        projection = project_schedule(results, str(cfg.project)) if cfg.project is not None else None
    except UserError as exc:
        exit_with_user_error(exc)
    for line in to_json_lines(results):
        print(line, flush=True)
    print(to_table(results), file=sys.stderr, flush=True)
    if projection is not None:
        print(json.dumps({"projection": projection}), flush=True)
        print(projection_line(projection), file=sys.stderr)


def projection_line(projection: dict) -> str:
    """The projection for the person reading the table: the total, and what it leaves out and why."""
    line = f"projected schedule={projection['schedule']}: {projection['total_h']} h"
    if not projection["missing"]:
        return line
    measured = [stage["resolution"] for stage in projection["stages"]]
    line += f" for the {measured} px stages only;" if measured else ","
    line += f" not measured: {projection['missing']} px"
    if projection["missing_fade"]:
        line += f" ({projection['missing_fade']} px at alpha 1 only: a fade-in needs an alpha < 1 in alphas)"
    return line


def main() -> None:
    """Console entry point of `pgan-bench`."""
    exit_on_bad_overrides("bench", sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
