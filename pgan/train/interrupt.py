"""Stopping cleanly on a signal: SIGINT (Ctrl-C), SIGTERM (kill, a scheduler's preemption) and SIGUSR1 (SLURM's
warning before the time limit, `--signal=USR1@120`, as submitit asks for it) set a flag; the loop finishes the
step in progress, writes a checkpoint and raises `Interrupted`, and the CLI exits with 128 + the signal number
(130 for SIGINT, 143 for SIGTERM, 138 for SIGUSR1), the shell's convention. A handler that was installed
before pgan's (submitit's, which requeues the job) is then given the signal too: `pass_on`.

A second Ctrl-C while the first is being handled raises KeyboardInterrupt at once (for a user who really
wants out; the previous checkpoint is still there). DataLoader workers ignore these signals
(`ignore_stop_signals` is their init function): a terminal's Ctrl-C and SLURM's SIGTERM reach the whole
process group, and a worker dying of one mid-batch would crash the step the trainer is trying to finish.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class Interrupted(Exception):
    """Training stopped on a signal after writing `checkpoint`."""

    def __init__(self, signum: int, checkpoint: Path | None) -> None:
        self.signum = signum
        self.checkpoint = checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        """128 + the signal number: 130 for SIGINT, 143 for SIGTERM, 138 for SIGUSR1."""
        return 128 + self.signum


class StopFlag:
    """Context manager installing the stop-signal handlers (main thread only); `signum` is the first signal
    received, or None."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    @property
    def requested(self) -> bool:
        """Whether a stop signal arrived."""
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: out now
        if self.signum is None:
            self.signum = signum
            # os.write, not print: the signal may have interrupted a write to stderr (a progress bar), and
            # re-entering its buffered writer raises RuntimeError.
            message = (
                f"\nreceived {signal.Signals(signum).name}: finishing the current step and writing a checkpoint "
                "(Ctrl-C again to quit at once)\n"
            )
            os.write(2, message.encode())


def pass_on(signum: int) -> None:
    """Deliver `signum` to the handler that is installed now (after StopFlag restored the previous one), when
    that is a Python function other than Ctrl-C's default: on SLURM, submitit's handler, which requeues the
    job (the requeued job resumes from the checkpoint just written)."""
    handler = signal.getsignal(signum)
    if callable(handler) and handler is not signal.default_int_handler:
        signal.raise_signal(signum)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: leave the stop signals to the main process, which shuts the workers down."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
