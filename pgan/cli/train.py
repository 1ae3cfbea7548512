"""`pgan-train`: compose the Hydra config and run (or resume) the progressive training in the run directory.

Resuming: `pgan-train hydra.run.dir=DIR` on an existing run directory re-applies the overrides the run was
started with (Hydra saved them in DIR/.hydra/overrides.yaml) before the ones given now, so the resumed run
has the same config; the trainer then continues from the newest checkpoint and refuses an architecture change.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from pgan.cli import CONFIG_DIR, EXIT_USER_ERROR, exit_on_bad_overrides, exit_with_user_error
from pgan.errors import UserError
from pgan.schedule import PER_RESOLUTION, PLATEAU_PER_RESOLUTION

EXIT_COLLAPSE = 3  # the collapse detector stopped the run (diversity.on_collapse=stop, or rollbacks ran out)
EXIT_NONFINITE = 4  # non-finite losses/gradients persisted after guard.max_rollbacks rollbacks
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C); SIGTERM 143, SIGUSR1 138: 128 + the signal number, the shell's convention


def _override_key(override: str) -> str:
    """'+data.path=x' -> 'data.path' (the key an override sets, without its +/++/~ prefix)."""
    return override.split("=", 1)[0].lstrip("+~")


# The schedule's per-resolution settings ({resolution: value} maps).
_RESOLUTION_MAPS = tuple(f"schedule.{k}" for k in PER_RESOLUTION) + tuple(
    f"schedule.plateau.{k}" for k in PLATEAU_PER_RESOLUTION
)


def replace_resolution_maps(args: list[str]) -> list[str]:
    """`schedule.lr={8: 0.002, 256: 0.001}` replaces the preset's lr instead of merging into it.

    Hydra merges a map given on the command line into the preset's map, and refuses a resolution the preset's
    map does not name ("no such key"), so `schedule.stable_kimg={8: 2}` would fail on a preset without 8 px.
    A per-resolution map on the command line is the whole schedule of that setting: it becomes
    `schedule.lr=null ++schedule.lr={...}` (a map merged into null is that map; `~schedule.lr` would fail where
    the preset's value is null). To merge into the preset's map instead: `'++schedule.lr={256: 0.001}'`."""
    out = []
    for arg in args:
        key, _, value = arg.partition("=")
        if key in _RESOLUTION_MAPS and value.lstrip().startswith("{"):
            out += [f"{key}=null", f"++{arg}"]
        else:
            out.append(arg)
    return out


def unread_plateau_note(cfg: DictConfig, overrides: list[str]) -> str | None:
    """A note when the command sets schedule.plateau.* but the run advances at fixed lengths, where nothing reads
    them (a user who forgot schedule.advance=plateau); not an error: a sweep over advance=fixed,plateau with
    one set of plateau settings is a fair comparison."""
    if str(cfg.schedule.get("advance", "fixed")) != "fixed":
        return None
    keys = sorted({_override_key(o) for o in overrides if _override_key(o).startswith("schedule.plateau.")})
    if not keys:
        return None
    return (
        f"note: {', '.join(keys)} {'is' if len(keys) == 1 else 'are'} read only with schedule.advance=plateau; "
        "this run's stages end at their fixed lengths (schedule.advance=fixed)"
    )


def _run_dir_arg(args: list[str]) -> str | None:
    """The run directory `hydra.run.dir=` names among `args`, if any (the last one, as Hydra takes it)."""
    return next((a.split("=", 1)[1] for a in reversed(args) if _override_key(a) == "hydra.run.dir"), None)


def with_saved_overrides(args: list[str]) -> list[str]:
    """Prepend the overrides saved in an existing run directory named by `hydra.run.dir=` (current ones win)."""
    run_dir = _run_dir_arg(args)
    saved_file = Path(run_dir) / ".hydra" / "overrides.yaml" if run_dir else None
    if saved_file is None or not saved_file.is_file():
        return args
    saved = yaml.safe_load(saved_file.read_text()) or []
    given = {_override_key(a) for a in args}
    kept = [o for o in saved if _override_key(o) not in given]
    if kept:
        print(f"resuming {run_dir} with its saved overrides: {' '.join(kept)}", flush=True)
    return kept + args


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    # Imported here so that `--help` stays fast.
    from pgan import dist
    from pgan.train.guard import GuardGaveUp
    from pgan.train.interrupt import Interrupted, pass_on
    from pgan.train.loop import CollapseStop, train
    from pgan.train.rundir import discard_unstarted

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        join_slurm_tasks(cfg)
        note = unread_plateau_note(cfg, list(HydraConfig.get().overrides.task))
        if note and dist.current().is_main:
            print(note, flush=True)
        train(cfg, run_dir)
    except UserError as exc:
        # A user error before the run began (a bad setting, a missing dataset): nothing is left behind, not
        # even the .hydra/ and train.log Hydra wrote before the trainer ran.
        if dist.current().is_main:
            discard_unstarted(run_dir)
        exit_with_user_error(exc)
    except CollapseStop as exc:
        print(
            f"error: {exc} Continue anyway with: pgan-train hydra.run.dir={run_dir} diversity.on_collapse=warn",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(EXIT_COLLAPSE)
    except GuardGaveUp as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(EXIT_NONFINITE)
    except Interrupted as exc:
        where = f"checkpoint written: {exc.checkpoint}" if exc.checkpoint else "no new checkpoint (see the warning)"
        print(
            f"{exc} after the current step; {where}; resume with: pgan-train hydra.run.dir={run_dir}",
            file=sys.stderr,
            flush=True,
        )
        pass_on(exc.signum)  # e.g. submitit's requeue, now that the checkpoint is on disk
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; the last checkpoint is kept, resume with: pgan-train hydra.run.dir={run_dir}",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(EXIT_INTERRUPTED)


def _quiet_unless_main() -> None:
    """Ranks other than 0 print nothing on stdout (rank 0 speaks for the run); errors still go to stderr."""
    from pgan import dist

    if not dist.current().is_main:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process


def join_slurm_tasks(cfg: DictConfig) -> None:
    """Inside a SLURM job of several tasks started without torchrun (hydra/launcher=slurm: submitit runs one
    task per GPU): join the process group from SLURM's variables. The run directory is already the same for
    every task (Hydra resolved it when the job was submitted)."""
    from pgan import dist

    if dist.current().distributed or not dist.export_slurm_env():
        return
    import torch

    dist.init_from_env(use_cuda=str(cfg.device) != "cpu" and torch.cuda.is_available())
    _quiet_unless_main()


def join_ranks(args: list[str]) -> list[str]:
    """Under torchrun: join the process group (gloo for device=cpu, else NCCL when CUDA is there) and agree on
    one run directory, rank 0's (Hydra would resolve `${now:...}` in every process, a second apart). Returns
    the arguments to compose with; the ranks other than 0 print nothing on stdout. A no-op for one process."""
    from pgan import dist

    ranks = dist.ranks_from_env()
    if not ranks.distributed:
        return args
    import torch

    device = next((a.split("=", 1)[1] for a in args if _override_key(a) == "device"), "auto")
    dist.init_from_env(use_cuda=device != "cpu" and torch.cuda.is_available())
    if _run_dir_arg(args) is None:
        # conf/train.yaml's hydra.run.dir pattern, resolved once, on rank 0.
        args = [*args, f"hydra.run.dir={dist.broadcast_object(time.strftime('runs/%Y-%m-%d_%H-%M-%S'))}"]
    if not ranks.is_main:
        args = [*args, "hydra.output_subdir=null"]  # rank 0 writes the run's .hydra/ alone
    _quiet_unless_main()
    return args


def refuse_held_run_dir(args: list[str]) -> None:
    """A UserError naming the holder when another live trainer holds the run directory `hydra.run.dir=` names:
    checked before Hydra writes its .hydra/ and train.log there (the trainer then takes the lock itself)."""
    from pgan import dist
    from pgan.train.rundir import check_free

    run_dir = _run_dir_arg(args)
    if run_dir is not None and dist.current().is_main:  # under torchrun rank 0 alone holds the lock
        check_free(Path(run_dir))


def run_hydra_keeping_a_refused_runs_record(run_dir: str | None) -> None:
    """_hydra_main(); where it refuses the command (a user error, exit 2) on an existing run directory, that run's
    .hydra/ is put back as it was, so the next plain resume reapplies the run's own overrides, not the refused.
    Not when the attempt wrote a checkpoint before its error: the run has then trained with the new overrides."""
    from pgan import dist
    from pgan.train.rundir import checkpoint_stamp, hydra_record, restore_hydra_record

    record = hydra_record(Path(run_dir)) if run_dir is not None and dist.current().is_main else {}
    stamp = checkpoint_stamp(Path(run_dir)) if record else {}
    try:
        _hydra_main()
    except SystemExit as exc:
        if exc.code == EXIT_USER_ERROR and record and checkpoint_stamp(Path(run_dir)) == stamp:
            restore_hydra_record(Path(run_dir), record)
        raise


def main() -> None:
    """Console entry point of `pgan-train` (also under `torchrun --nproc_per_node=N -m pgan.train`)."""
    from pgan import dist

    args = replace_resolution_maps(sys.argv[1:])
    exit_on_bad_overrides("train", args)
    try:
        args = join_ranks(args)
        refuse_held_run_dir(args)
        sys.argv = [sys.argv[0], *with_saved_overrides(args)]
        run_hydra_keeping_a_refused_runs_record(_run_dir_arg(args))
        # Every rank done with its collectives before any leaves the group: a rank that tore gloo down while
        # the other was still in its last all-reduce aborted once ("terminate called without an active
        # exception"). Not on an error's way out, where the other ranks may never get here.
        dist.barrier()
    except UserError as exc:
        exit_with_user_error(exc)
    finally:
        dist.shutdown()


if __name__ == "__main__":
    main()
