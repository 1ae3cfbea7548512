"""The non-finite guard: a step whose loss or gradients are not finite is skipped, without a host sync.

Each step's check is a device-side flag (`nonfinite`: 1.0 when the loss or the total gradient norm is inf or
NaN) handed to the fused Adam kernel as `found_inf`, which then leaves the parameters, the moments and the
step counter untouched - the mechanism torch's GradScaler uses, with no `.item()` per step. The guard sums
the flags on the device and keeps the length of the current run of bad steps; the loop reads them at log
ticks (where it syncs anyway) and, after `guard.max_bad_steps` bad steps in a row, rolls back to the stage's
newest snapshot from before the bad steps began, with lower learning rates, at most `guard.max_rollbacks`
times.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from pgan.errors import UserError


def nonfinite(loss: Tensor, params: list[nn.Parameter]) -> Tensor:
    """1.0 (a float tensor on the loss's device) when `loss` or any gradient of `params` is inf/NaN, else 0.0."""
    grads = [p.grad for p in params if p.grad is not None]
    total = loss.detach().float().sum()
    if grads:
        # One fused norm over all gradients: inf or NaN anywhere makes it non-finite.
        total = total + torch.nn.utils.get_total_norm(grads, foreach=True).float()
    return (~torch.isfinite(total)).float()


def guarded_step(opt: torch.optim.Optimizer, flag: Tensor) -> None:
    """`opt.step()`, skipped on the device when `flag` is 1 (fused Adam reads the flag as `found_inf`)."""
    opt.found_inf = flag  # the attribute GradScaler sets for optimizers that support it (fused Adam/AdamW)
    try:
        opt.step()
    finally:
        del opt.found_inf


class GuardGaveUp(Exception):
    """Non-finite steps persisted after `guard.max_rollbacks` rollbacks; the message says what to try."""


class Guard:
    """Device-side counters of skipped steps, plus the rollbacks and learning-rate scale they caused."""

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        self.max_bad_steps = int(cfg.max_bad_steps)
        self.max_rollbacks = int(cfg.max_rollbacks)
        self.lr_factor = float(cfg.rollback_lr_scale)
        self.device = device
        self._run = torch.zeros((), device=device)  # the current run of consecutive bad steps
        self._longest = torch.zeros((), device=device)  # the longest run since the last reading
        self.total_bad_steps = 0  # added up by the loop at its ticks
        self.rollbacks = 0
        self.lr_scale = 1.0

    def record(self, flag: Tensor) -> None:
        """Count one step: `flag` is 1.0 if it was skipped (no host sync)."""
        self._run = (self._run + flag) * flag
        self._longest = torch.maximum(self._longest, self._run)

    def read(self) -> int:
        """The longest run of consecutive bad steps since the last reading (one host sync); a run still going
        on carries over to the next reading, so a run spanning a tick is seen whole."""
        longest = int(self._longest)
        self._longest = self._run.clone()
        return longest

    def roll_back(self) -> None:
        """Count a rollback and lower the learning rates; GuardGaveUp once `max_rollbacks` are used up."""
        if self.rollbacks >= self.max_rollbacks:
            raise GuardGaveUp(
                f"{self.max_bad_steps} non-finite steps in a row again after {self.rollbacks} rollback(s) "
                f"(guard.max_rollbacks={self.max_rollbacks}); the checkpoints are kept. Try a lower "
                "schedule.lr, precision=fp32, or a larger loss.gp_weight / loss.r1_gamma"
            )
        self.rollbacks += 1
        self.lr_scale *= self.lr_factor

    def rewind(self, state: dict | None) -> None:
        """After a rollback to a checkpoint holding `state` (its `state_dict()`): no run of bad steps in
        progress, and the run's skipped-step total as it was there (the abandoned branch's are not counted,
        like its curves); rollbacks and the learning-rate scale are kept."""
        self.total_bad_steps = int((state or {}).get("total_bad_steps", self.total_bad_steps))
        self._run = torch.zeros((), device=self.device)
        self._longest = torch.zeros((), device=self.device)

    def state_dict(self) -> dict:
        """Plain values for the checkpoint (a host sync: checkpoints are rare)."""
        return {
            "total_bad_steps": self.total_bad_steps,
            "rollbacks": self.rollbacks,
            "lr_scale": self.lr_scale,
            "run": float(self._run),
            "longest": float(self._longest),
        }

    def load_state_dict(self, state: dict | None, new_stage: bool = False) -> None:
        """Restore `state_dict()`; a new stage starts with no rollbacks and the stage's own learning rate."""
        state = state or {}
        self.total_bad_steps = int(state.get("total_bad_steps", 0))
        self.rollbacks = 0 if new_stage else int(state.get("rollbacks", 0))
        self.lr_scale = 1.0 if new_stage else float(state.get("lr_scale", 1.0))
        for name in ("run", "longest"):
            value = 0.0 if new_stage else float(state.get(name, 0.0))
            setattr(self, f"_{name}", torch.tensor(value, device=self.device))


def check_guard_config(cfg: DictConfig) -> None:
    """One-line errors for impossible guard settings."""
    g = cfg.guard
    if int(g.max_bad_steps) < 1:
        raise UserError(f"guard.max_bad_steps must be >= 1, got {g.max_bad_steps}")
    if int(g.max_rollbacks) < 0:
        raise UserError(f"guard.max_rollbacks must be >= 0, got {g.max_rollbacks}")
    if not 0 < float(g.rollback_lr_scale) <= 1:
        raise UserError(f"guard.rollback_lr_scale must be in (0, 1], got {g.rollback_lr_scale}")
    inject = g.get("inject_nonfinite")
    if inject is not None and (int(inject.steps) < 1 or int(inject.times) < 1):
        raise UserError("guard.inject_nonfinite needs steps >= 1 and times >= 1")
