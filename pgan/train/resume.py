"""Where a run stands: the checkpoint it resumes from, the stages left to train, what each stage grows from,
and the restarts after a DataLoader worker failure (which continue the stage like a resume)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgan.checkpoint import (
    FINAL,
    checkpoint_classes,
    damaged_files,
    load_checkpoint,
    load_newest_usable,
    resume_candidates,
)
from pgan.data.labels import ClassLabels
from pgan.errors import UserError, first_line
from pgan.monitor import Monitor, warn
from pgan.schedule import Stage
from pgan.train.options import TrainOptions, check_same_architecture


@dataclass
class Plan:
    """The stages this invocation trains, and the checkpoint the first of them resumes from (None: it starts)."""

    stages: list[Stage]
    resume: dict[str, Any] | None
    new_run: bool  # no stage of the run has a checkpoint yet

    @property
    def continue_from(self) -> int:
        """The run's image count the logs continue from (later records of an interrupted attempt are dropped)."""
        return self.resume["total_nimg"] if self.resume is not None else self.stages[0].start_nimg


def plan_run(options: TrainOptions, run_dir: Path) -> Plan:
    """The selected stages that are not finished, and the newest usable checkpoint among them."""
    found = find_resume_point(options, run_dir)
    stages = list(options.selected)
    if found is not None:
        at, done = found["stage"], found["done"]
        stages = [st for st in stages if st.index > at or (st.index == at and not done)]
    resumes_first = found is not None and bool(stages) and found["stage"] == stages[0].index
    return Plan(stages, found if resumes_first else None, new_run=found is None)


def find_resume_point(options: TrainOptions, run_dir: Path) -> dict[str, Any] | None:
    """The newest usable checkpoint among the selected stages' directories (final.pt, then the snapshots
    newest first, stage by stage from the last); damaged ones are reported and set aside. None for a new
    run; an error, never a silent fresh start, when checkpoints exist but none is usable."""
    tried = []
    for st in reversed(options.selected):
        candidates = resume_candidates(run_dir / st.name)
        tried += candidates
        found = load_newest_usable(candidates)
        if found is not None:
            state, path = found
            check_same_architecture(options, state["config"], f"the run in {run_dir}")
            check_same_growth(options, state, run_dir)
            print(f"resuming from {path} ({state['total_nimg'] / 1000:.3f} kimg)", flush=True)
            changed = changed_settings(state["config"], options.config)
            if changed:
                print(f"settings changed since that checkpoint: {'; '.join(changed)}", flush=True)
            return state
    # Checkpoints set aside by an earlier attempt count too: repeating the command must not start afresh.
    tried += [path for st in options.selected for path in damaged_files(run_dir / st.name)]
    if tried:
        raise UserError(
            f"no usable checkpoint in {run_dir}: all {len(tried)} are damaged (set aside as *.damaged); "
            "start a new run in another directory"
        )
    stats = run_dir / "stats.jsonl"
    if stats.is_file() and stats.stat().st_size:  # an earlier attempt trained here, and its stage folders are gone
        print(
            f"no checkpoint in {run_dir}: training starts from the beginning of the selected stages, and the logs "
            "of the earlier attempt there are replaced",
            flush=True,
        )
    return None


# Settings that may differ between attempts without changing what the run computes (where it runs, and how).
RUNTIME_KEYS = frozenset({"device", "threads", "stage", "init_from", "log.progress_bar", "data.num_workers"})


def changed_settings(saved: dict[str, Any], ours: dict[str, Any], prefix: str = "") -> list[str]:
    """The settings of a checkpoint's config (`saved`) that this run's config (`ours`) changes, as
    'key: old -> new' (nested keys dotted), RUNTIME_KEYS aside: a resume takes them silently otherwise."""
    changed = []
    for key in sorted(set(saved) | set(ours)):
        name, old, new = f"{prefix}{key}", saved.get(key), ours.get(key)
        if name in RUNTIME_KEYS or old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            changed += changed_settings(old, new, f"{name}.")
        else:
            changed.append(f"{name}: {old!r} -> {new!r}")
    return changed


def check_same_growth(options: TrainOptions, state: dict[str, Any], run_dir: Path) -> None:
    """Refuse to resume a checkpoint whose run grew through other resolutions up to its stage than this
    schedule does (its layers are named by the resolutions it grew through: a first stage dropped or added
    would not load)."""
    theirs = [int(r) for r in state["config"]["schedule"]["resolutions"]]
    upto = theirs[: theirs.index(int(state["resolution"])) + 1]
    ours = [st.resolution for st in options.stages][: len(upto)]
    if ours != upto:
        raise UserError(
            f"the run in {run_dir} grew through {upto} px up to its newest checkpoint; schedule.resolutions="
            f"{[st.resolution for st in options.stages]} does not: resume it with its own schedule.resolutions"
        )


def grows_from(options: TrainOptions, run_dir: Path, stage: Stage) -> tuple[dict[str, Any], Path] | None:
    """The checkpoint (and its path) a stage starting afresh grows from: `init_from` for the run's first
    selected stage, else the previous stage's final.pt of this run; None for the schedule's first stage."""
    if options.init_from is not None and stage.index == options.selected[0].index:
        init = load_checkpoint(options.init_from)
        check_same_architecture(options, init["config"], f"init_from={options.init_from}", upto=init["resolution"])
        if init["resolution"] * 2 != stage.resolution:
            raise UserError(
                f"init_from={options.init_from} is a {init['resolution']} px checkpoint; stage {stage.resolution} "
                f"grows from a {stage.resolution // 2} px one"
            )
        return init, options.init_from
    if stage.index == 0:
        return None  # the first stage starts from scratch
    prev = run_dir / options.stages[stage.index - 1].name / FINAL
    if not prev.is_file():
        raise UserError(f"stage {stage.resolution} needs the previous stage's checkpoint {prev} (or init_from=...)")
    return load_checkpoint(prev), prev


def placed(options: TrainOptions, stage: Stage, resume: dict[str, Any] | None, init: dict[str, Any] | None) -> Stage:
    """`stage` where it starts on the run's image axis (`start_nimg`: the logs' x axis, the gamma decay's clock).

    Under schedule.advance=plateau a stage's length is decided while it trains, so it starts where the checkpoint
    it resumes (its own) or grows from (the previous stage's final.pt, or init_from) says the run stood. Under
    fixed, where the schedule puts it."""
    if options.advance == "fixed":
        return stage
    if resume is not None:
        start = int(resume["total_nimg"]) - int(resume["nimg"])
    elif init is not None:
        start = int(init["total_nimg"])
    else:
        return stage  # the run's first stage, from scratch: 0
    return dataclasses.replace(stage, start_nimg=start)


def check_same_classes(state: dict[str, Any], classes: ClassLabels | None, what: str) -> None:
    """Refuse a conditional checkpoint whose classes are not the data's (a class folder added or renamed)."""
    theirs, ours = checkpoint_classes(state), (classes.names if classes is not None else ())
    if theirs != ours:
        added, gone = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
        changes = [f"{label}: {', '.join(names[:3])}" for label, names in (("new", added), ("gone", gone)) if names]
        raise UserError(
            f"{what} was trained on {len(theirs)} classes, the data has {len(ours)} "
            f"({' '.join(changes) or 'in another order'})"
        )


def loader_failure(exc: Exception) -> bool:
    """Whether `exc` is a DataLoader worker that died, was killed or timed out: torch's RuntimeErrors, or the
    inter-process connection to a worker broken mid-batch (the training loop has no other connections)."""
    if isinstance(exc, (ConnectionError, EOFError)):
        return True
    return "DataLoader worker" in str(exc) or "DataLoader timed out" in str(exc)


def surviving_loader_failures(
    run_stage: Callable[[dict | None], Path], resume: dict | None, max_restarts: int, stage_dir: Path, monitor: Monitor
) -> Path:
    """`run_stage(resume)`, and after a DataLoader worker crashed or hung, `run_stage(newest snapshot)` again,
    at most `max_restarts` times, so the stage continues like a resume: the same result as if nothing had
    happened.

    A worker's death reaches the main process in more than one way and at any moment: as the RuntimeError
    torch's SIGCHLD handler raises wherever the main process is (mid-step included, or a little later, even
    during the recovery below), or as a ConnectionResetError/EOFError when the worker dies while handing over
    a batch. So the recovery itself runs inside the `try`: a late signal for the same death counts as one
    more failure instead of escaping.
    """
    failures: list[str] = []
    while True:
        try:
            if failures:
                found = load_newest_usable(resume_candidates(stage_dir))
                if found is None:
                    # (worded so that loader_failure does not take it for another worker failure)
                    raise RuntimeError(f"no usable checkpoint in {stage_dir} to continue the stage from")
                resume, path = found
                warn(
                    f"{failures[-1]}; resuming from {path} ({len(failures)} of at most "
                    f"loader.max_restarts={max_restarts} in this stage)"
                )
                monitor.restart(purge_step=resume["total_nimg"] + 1)
            return run_stage(resume)
        except (RuntimeError, ConnectionError, EOFError) as exc:
            if not loader_failure(exc) or len(failures) == max_restarts:
                raise
            first = first_line(exc) or type(exc).__name__
            lost = f"DataLoader worker lost ({type(exc).__name__}: {first})"
            failures.append(first if "DataLoader" in first else lost)
