"""One trainer per run directory, and nothing left behind by a run that never started.

`RunDirLock` is a file `<run>/trainer.lock` created atomically (O_CREAT | O_EXCL) by the trainer that owns the
directory, holding its host, pid, process start time and the time it took the directory. A second trainer
pointed at the same directory (a job resubmitted while the old one runs, a second terminal) ends at once with
one line naming the holder. A holder that died on this host (its pid gone, or reused by another process) is
taken over with a warning. A holder on another host (a shared file system) cannot be checked from here: the
directory stays refused until that job ends, or until the user deletes the lock file after making sure it
has. Under torchrun rank 0 alone holds it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

from pgan.errors import UserError
from pgan.monitor import warn

LOCK_NAME = "trainer.lock"
# What Hydra writes into a run directory before pgan-train's own code runs (its job log and saved config).
HYDRA_ONLY = {".hydra", "train.log"}
SCAN_CACHE = "data-scan.json"  # a folder dataset's scan, kept for the next stage and the next attempt
# A run directory holding no more than this has not begun: the trainer writes the scan while it checks the data
# of every stage, before it trains (a data error at a later stage found it there).
NOT_BEGUN = HYDRA_ONLY | {SCAN_CACHE}


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of stat; the command name may contain spaces


def _alive(holder: dict) -> bool:
    """Whether the holder (on this host) still runs: its pid exists and, where known, started when it said."""
    pid = int(holder.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    started = holder.get("start_time")
    return started is None or _start_time(pid) in (None, started)


def _describe(holder: dict, path: Path) -> str:
    since = holder.get("since", "an unknown time")
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {since} (lock file {path})"


def read_holder(run_dir: Path) -> dict | None:
    """The lock's holder as written, or None when the directory has no lock (an unreadable lock: pid -1)."""
    path = Path(run_dir) / LOCK_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"pid": -1, "host": socket.gethostname()}  # a lock cut short by a crash while writing it


def check_free(run_dir: Path) -> None:
    """A UserError naming the holder when another live trainer holds `run_dir` (the lock is not taken)."""
    holder = read_holder(run_dir)
    if holder is None or holder.get("pid") == os.getpid():
        return
    in_use = f"run directory {run_dir} is in use by pgan-train {_describe(holder, Path(run_dir) / LOCK_NAME)}"
    if holder.get("host") != socket.gethostname():
        raise UserError(
            f"{in_use}; another host holds it, so pgan cannot tell whether it still runs: delete the lock file "
            "once that job has ended"
        )
    if _alive(holder):
        raise UserError(f"{in_use}: wait for it to end, stop it, or train in another directory")


class RunDirLock:
    """The run directory's lock, held for the life of a `with` block (see the module docstring)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.held = self.created = False

    def __enter__(self) -> RunDirLock:
        self.created = not self.path.parent.exists()  # then an error before the run began leaves nothing
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):  # a second try after taking over a dead holder's lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                check_free(self.path.parent)  # a live holder: a UserError naming it
                holder = read_holder(self.path.parent) or {}
                warn(
                    f"taking over run directory {self.path.parent}: its trainer {_describe(holder, self.path)} is gone"
                )
                self.path.unlink(missing_ok=True)
                continue
            me = {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "start_time": _start_time(os.getpid()),
                "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            }
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me) + "\n")
            self.held = True
            return self
        check_free(self.path.parent)  # another trainer took it over between our two tries
        raise UserError(f"cannot take the lock {self.path}")

    def __exit__(self, *exc: object) -> None:
        holder = read_holder(self.path.parent) if self.held else None
        if holder is not None and holder.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
            if self.created and not any(self.path.parent.iterdir()):
                self.path.parent.rmdir()
        self.held = False


def not_begun(run_dir: Path) -> bool:
    """Whether `run_dir` holds nothing but what Hydra and the data check write before training starts."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return False
    return {p.name for p in run_dir.iterdir()} <= NOT_BEGUN


def discard_unstarted(run_dir: Path) -> None:
    """Remove a run directory that has not begun (`not_begun`: a user error stopped the run before it trained)."""
    if not_begun(run_dir):
        shutil.rmtree(run_dir, ignore_errors=True)


def hydra_record(run_dir: Path) -> dict[str, bytes]:
    """The files of an existing run directory's .hydra/ (its saved config and overrides), to put back if the
    command about to run is refused: Hydra rewrites them before the trainer can check the overrides."""
    folder = Path(run_dir) / ".hydra"
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} if folder.is_dir() else {}


def checkpoint_stamp(run_dir: Path) -> dict[str, tuple[int, int]]:
    """Every checkpoint file of a run directory with its size and mtime: a change means an attempt trained."""
    run_dir, stamps = Path(run_dir), {}
    for path in sorted(run_dir.glob("stage-*/*.pt")):
        try:
            stat = path.stat()
        except OSError:  # removed meanwhile (an old snapshot pruned): it is no checkpoint any more
            continue
        stamps[str(path.relative_to(run_dir))] = (stat.st_size, stat.st_mtime_ns)
    return stamps


def restore_hydra_record(run_dir: Path, record: dict[str, bytes]) -> None:
    """Put an existing run's .hydra/ files back as `hydra_record` found them (a refused resume changes nothing)."""
    for name, content in record.items():
        (Path(run_dir) / ".hydra" / name).write_bytes(content)
