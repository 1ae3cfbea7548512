"""`pgan-report run=DIR`: the run's D/G losses and real/fake scores over kimg as `report.png` (stage boundaries and
fade-ins marked) and a markdown summary `report.md` (stages, time per stage, final values, collapse events),
from the run's stats.jsonl, collapse.jsonl and config.yaml. Prints the two paths, then one JSON line.
Exit 2 with one line `error: ...` for a directory that is not a run."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from pgan.cli import CONFIG_DIR, exit_on_bad_overrides, exit_with_user_error
from pgan.errors import UserError


def report(cfg: DictConfig) -> dict[str, Any]:
    """Write the report cfg asks for; returns what write_report returns."""
    from pgan.report import write_report

    if OmegaConf.is_missing(cfg, "run") or cfg.run is None:
        raise UserError("run= is required, e.g. pgan-report run=runs/my-run")
    if cfg.out is not None and not str(cfg.out).strip():
        raise UserError("out= is empty: leave it out (the run directory) or name a directory")
    out = None if cfg.out is None else Path(str(cfg.out)).expanduser()
    return write_report(Path(str(cfg.run)).expanduser(), out)


def _finite(value: Any) -> Any:
    """NaN/inf as null: the last line must be JSON that any parser reads."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="report")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        result = report(cfg)
    except UserError as exc:
        exit_with_user_error(exc)
    if result["unreadable_lines"]:
        from pgan.report import unreadable_note

        print(f"warning: run={cfg.run}: {unreadable_note(result['unreadable_lines'])}", file=sys.stderr)
    print(result["png"])
    print(result["markdown"])
    print(json.dumps(_finite(result)), flush=True)


def main() -> None:
    """Console entry point of `pgan-report`."""
    exit_on_bad_overrides("report", sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
