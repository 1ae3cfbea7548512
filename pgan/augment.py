"""Differentiable augmentation of D's inputs (DiffAugment's operations, ADA's per-image probability and adaptive p).

Every image D sees, real or generated, in the D step and in the G step, goes through the same pipeline: for
each operation of the policy (in the order given), each image is augmented with probability `p`, independently
of the other images and operations (ADA's scheme; DiffAugment applies every operation to every image, which is
p = 1 here). "Identically" means the same pipeline and the same p for reals and fakes: each image draws its own
random transform, as in DiffAugment and ADA, not a transform shared by a real and a fake image.

The operations, on NCHW images in [-1, 1], with DiffAugment's magnitudes:
  color        brightness + U[-0.5, 0.5), then saturation x U[0, 2) around the pixel's channel mean (a no-op on
               one-channel images), then contrast x U[0.5, 1.5) around the image mean; each with its own chance
               p. Not clamped (neither paper clamps): the values may leave [-1, 1], for reals and fakes alike.
  translation  an integer shift of up to 1/8 of the side (rounded, at least 1 px) along each axis, the same
               distribution as DiffAugment's; pixels shifted in are 0 (mid-grey), as DiffAugment's zero padding.
  cutout       a square of 1/2 of the side (rounded, at least 1 px) centred anywhere in the image, partly outside
               at the borders, set to 0 (mid-grey: DiffAugment multiplies by a 0/1 mask).
At the smallest resolution pgan trains (4 px) that is a shift of up to 1 px and a 2 px square: nothing is skipped.

Everything is differentiable w.r.t. the images (index gathers, masks and arithmetic: no grid_sample, whose
backward has no double backward, which R1 through the augmentation needs) and runs on the images' device.

Random numbers: every operation draws one [N, k] uniform tensor with `pgan.dist.draw_for_rank`, from
`generator` (None: the device's global stream, the one the trainer's latents come from), so under torchrun the
ranks together use exactly the numbers one process would, and a checkpoint's RNG state resumes them exactly.
With p a Python number <= 0 (or an empty policy) nothing is drawn and the images are returned as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor

from pgan import dist
from pgan.errors import UserError

TRANSLATION_RATIO = 0.125  # the largest shift, as a fraction of the side (DiffAugment)
CUTOUT_RATIO = 0.5  # the square's side, as a fraction of the image's side (DiffAugment)

Probability = float | Tensor  # a Python number, or a 0-dim tensor on the images' device (the adaptive p)


def _pixels(side: int, ratio: float) -> int:
    """`ratio` of `side` rounded half up as DiffAugment does, at least one pixel."""
    return max(1, int(side * ratio + 0.5))


def _off(p: Probability) -> bool:
    """A Python p that augments nothing (tensors are never inspected: that would be a host sync)."""
    return isinstance(p, (int, float)) and p <= 0


def _uniform(images: Tensor, columns: int, generator: torch.Generator | None) -> Tensor:
    """[N, columns] numbers in [0, 1) for the N images: this rank's rows of one draw for the global batch."""
    return dist.draw_for_rank(partial(torch.rand, generator=generator), images.shape[0], columns, device=images.device)


def _index(u: Tensor, count: int) -> Tensor:
    """Uniform integers in [0, count) from uniform numbers in [0, 1) (clamped: u * count can round up to count)."""
    return (u * count).floor().long().clamp(0, count - 1)


def translate(images: Tensor, dx: Tensor, dy: Tensor) -> Tensor:
    """Each image shifted by its own whole number of pixels, `dx` [N] to the right and `dy` [N] down; the pixels
    shifted in are 0. Differentiable w.r.t. `images` (two gathers and a mask)."""
    n, c, h, w = images.shape
    rows = torch.arange(h, device=images.device) - dy.view(n, 1)  # the source row of every output row
    cols = torch.arange(w, device=images.device) - dx.view(n, 1)
    inside = ((rows >= 0) & (rows < h))[:, None, :, None] & ((cols >= 0) & (cols < w))[:, None, None, :]
    out = images.gather(2, rows.clamp(0, h - 1)[:, None, :, None].expand(n, c, h, w))
    out = out.gather(3, cols.clamp(0, w - 1)[:, None, None, :].expand(n, c, h, w))
    return out * inside.to(out.dtype)


def cut_out(images: Tensor, top: Tensor, left: Tensor, height: int, width: int) -> Tensor:
    """Each image with the `height` x `width` rectangle at (`top`, `left`) [N] set to 0 (the part of it that lies
    inside the image; a rectangle wholly outside cuts nothing)."""
    n, _, h, w = images.shape
    rows = torch.arange(h, device=images.device)
    cols = torch.arange(w, device=images.device)
    in_rows = (rows >= top.view(n, 1)) & (rows < top.view(n, 1) + height)
    in_cols = (cols >= left.view(n, 1)) & (cols < left.view(n, 1) + width)
    keep = ~(in_rows[:, None, :, None] & in_cols[:, None, None, :])
    return images * keep.to(images.dtype)


def translation(images: Tensor, p: Probability, generator: torch.Generator | None = None) -> Tensor:
    """With probability p per image, a random integer shift of up to 1/8 of the side along each axis (uniform
    over -s..s, as DiffAugment's), mid-grey shifted in."""
    if _off(p):
        return images
    _, _, h, w = images.shape
    u = _uniform(images, 3, generator)
    applied = u[:, 0] < p
    sh, sw = _pixels(h, TRANSLATION_RATIO), _pixels(w, TRANSLATION_RATIO)
    dy = torch.where(applied, _index(u[:, 1], 2 * sh + 1) - sh, 0)
    dx = torch.where(applied, _index(u[:, 2], 2 * sw + 1) - sw, 0)
    return translate(images, dx, dy)


def cutout(images: Tensor, p: Probability, generator: torch.Generator | None = None) -> Tensor:
    """With probability p per image, a mid-grey square of 1/2 of the side centred at a random pixel (DiffAugment's
    placement: it may reach past the border)."""
    if _off(p):
        return images
    _, _, h, w = images.shape
    u = _uniform(images, 3, generator)
    applied = u[:, 0] < p
    sh, sw = _pixels(h, CUTOUT_RATIO), _pixels(w, CUTOUT_RATIO)
    # DiffAugment's centre range: 0..side for an even square, 0..side-1 for an odd one.
    top = _index(u[:, 1], h + 1 - sh % 2) - sh // 2
    left = _index(u[:, 2], w + 1 - sw % 2) - sw // 2
    return cut_out(images, torch.where(applied, top, h), left, sh, sw)  # top = h: below the image, nothing cut


def color(images: Tensor, p: Probability, generator: torch.Generator | None = None) -> Tensor:
    """Brightness, saturation and contrast (DiffAugment's `color`), each with probability p per image."""
    if _off(p):
        return images
    u = _uniform(images, 6, generator)
    applied = (u[:, :3] < p).view(-1, 3, 1, 1, 1)  # decided in float32 for bf16 fakes and float32 reals alike
    amount = u[:, 3:].to(images.dtype).reshape(-1, 3, 1, 1, 1)
    # torch.where, not a neutral amount: an image left out comes back bit for bit ((x - m) * 1 + m need not be x).
    out = torch.where(applied[:, 0], images + (amount[:, 0] - 0.5), images)
    if images.shape[1] > 1:  # saturation around each pixel's grey level; a grey image has none
        mean = out.mean(dim=1, keepdim=True)
        out = torch.where(applied[:, 1], (out - mean) * (amount[:, 1] * 2) + mean, out)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return torch.where(applied[:, 2], (out - mean) * (amount[:, 2] + 0.5) + mean, out)


OPERATIONS: dict[str, Callable[[Tensor, Probability, torch.Generator | None], Tensor]] = {
    "color": color,
    "translation": translation,
    "cutout": cutout,
}


def parse_policy(policy: str | Sequence[str] | None) -> tuple[str, ...]:
    """The operations of a policy: a comma-separated string ("color,translation,cutout") or a list; ValueError
    for an unknown or repeated name."""
    if policy is None:
        return ()
    parts = str(policy).split(",") if isinstance(policy, str) else [str(name) for name in policy]
    names = tuple(name.strip() for name in parts if name.strip())
    for name in names:
        if name not in OPERATIONS:
            raise ValueError(f"unknown augmentation {name!r}; choose from {', '.join(OPERATIONS)}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"{repeated[0]!r} is named twice")
    return names


def augment(
    images: Tensor, policy: str | Sequence[str], p: Probability, generator: torch.Generator | None = None
) -> Tensor:
    """`images` through each operation of `policy` in turn, each applied to each image with probability `p`.
    The same memory format comes back (channels_last in, channels_last out)."""
    names = parse_policy(policy)
    if not names or _off(p):
        return images
    out = images
    for name in names:
        out = OPERATIONS[name](out, p, generator)
    if images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)  # the gathers return NCHW
    return out


def adjust_p(p: Tensor, rt: Tensor, target: float, num_images: int, adjust_kimg: float) -> Tensor:
    """ADA's update: p + sign(rt - target) * num_images / (adjust_kimg * 1000), clamped to [0, 1], where rt is
    E[sign(D(augmented reals))] over the `num_images` images since the last update. p can thus go 0 -> 1 in
    `adjust_kimg` thousand images; rt above the target (D too sure of the reals: overfitting) raises it."""
    step = num_images / (float(adjust_kimg) * 1000.0)
    return (torch.as_tensor(p) + torch.sign(torch.as_tensor(rt) - target) * step).clamp(0.0, 1.0)


class AugmentPipe:
    """The trainer's augmentation: the policy, p, and with `adaptive` ADA's controller, which every `interval`
    D steps moves p by `adjust_p` from the sign of D's outputs on the augmented reals, averaged over the steps
    and the ranks. All on the device: no host sync but where the trainer logs or checkpoints."""

    def __init__(
        self,
        policy: str | Sequence[str] = "",
        p: float = 0.0,
        adaptive: bool = False,
        target: float = 0.6,
        adjust_kimg: float = 500.0,
        interval: int = 4,
        device: torch.device | str = "cpu",
    ) -> None:
        self.policy = parse_policy(policy)
        self.initial_p = float(p)  # the fixed p, or where the adaptive p starts
        self.adaptive = bool(adaptive)
        self.target = float(target)
        self.adjust_kimg = float(adjust_kimg)
        self.interval = int(interval)
        self.device = torch.device(device)
        self.reset()

    @classmethod
    def from_config(cls, cfg: Any, device: torch.device | str = "cpu") -> AugmentPipe:
        """The pipe `cfg.augment` describes (checked: one-line UserErrors)."""
        return cls(**check_augment_config(cfg), device=device)

    def reset(self) -> None:
        """p at its configured start, nothing accumulated."""
        self.p = torch.tensor(self.initial_p, device=self.device)
        self._signs = torch.zeros((), device=self.device)  # sum of the steps' mean sign(D(reals))
        self._count = torch.zeros((), device=self.device)  # steps summed (finite ones)
        self._steps = 0  # D steps since the last adjustment
        self._nimg = 0  # images (global batches) since the last adjustment

    @property
    def enabled(self) -> bool:
        """Whether D's inputs are augmented at all (a policy, and p > 0 or adaptive)."""
        return bool(self.policy) and (self.adaptive or self.initial_p > 0)

    def __call__(self, images: Tensor) -> Tensor:
        """Augment one batch (reals or fakes) with the current p, from the device's global random stream."""
        return augment(images, self.policy, self.p)

    def observe(self, real_sign: Tensor, num_images: int) -> None:
        """Account one D step: `real_sign` is the mean of sign(D(augmented reals)) over this rank's images,
        `num_images` the global batch. Every `interval` steps p is adjusted (adaptive only). A non-finite value
        (a step the guard skips) is left out."""
        if not self.adaptive:
            return
        finite = torch.isfinite(real_sign)
        self._signs = self._signs + torch.where(finite, real_sign.float(), 0.0)
        self._count = self._count + finite.float()
        self._steps += 1
        self._nimg += int(num_images)
        if self._steps >= self.interval:
            # The ranks' sums averaged (one small all-reduce, no host sync), so every rank moves p the same way.
            totals = dist.mean_across_ranks({"signs": self._signs, "count": self._count})
            rt = totals["signs"] / totals["count"].clamp(min=1.0)
            new_p = adjust_p(self.p, rt, self.target, self._nimg, self.adjust_kimg).to(self.p.dtype)
            self.p = torch.where(totals["count"] > 0, new_p, self.p)
            self._signs, self._count = torch.zeros_like(self._signs), torch.zeros_like(self._count)
            self._steps, self._nimg = 0, 0

    def state_dict(self) -> dict[str, Any] | None:
        """The adaptive state for a checkpoint (a host sync: checkpoints are rare); None for a fixed p, whose
        source of truth is the config."""
        if not self.adaptive:
            return None
        return {
            "p": self.p.detach().cpu().clone(),
            "signs": self._signs.detach().cpu().clone(),
            "count": self._count.detach().cpu().clone(),
            "steps": self._steps,
            "nimg": self._nimg,
        }

    def load_state_dict(self, state: dict[str, Any] | None, new_stage: bool = False) -> None:
        """Continue from `state_dict()`; None (or a fixed p) starts afresh at the configured p. A new stage
        carries p on too (`new_stage` changes nothing), as ADA's p runs on through a whole training run: the
        amount of augmentation D needs reflects the dataset's size, not the resolution."""
        self.reset()
        if not self.adaptive or state is None:
            return
        self.p = state["p"].to(self.device, torch.float32).reshape(())
        self._signs = state["signs"].to(self.device, torch.float32).reshape(())
        self._count = state["count"].to(self.device, torch.float32).reshape(())
        self._steps, self._nimg = int(state["steps"]), int(state["nimg"])


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_augment_config(cfg: Any) -> dict[str, Any]:
    """`cfg.augment` checked (one-line UserErrors naming the key) and returned as AugmentPipe's arguments; an
    absent node means no augmentation."""
    a = cfg.get("augment") if hasattr(cfg, "get") else None
    if a is None:
        return {}
    try:
        policy = parse_policy(a.policy)
    except ValueError as exc:
        raise UserError(f"augment.policy: {exc}") from exc
    if not _number(a.p) or not 0 <= a.p <= 1:
        raise UserError(f"augment.p must be a probability in [0, 1], got {a.p!r}")
    if not isinstance(a.adaptive, bool):
        raise UserError(f"augment.adaptive must be true or false, got {a.adaptive!r}")
    if not _number(a.target) or not 0 < a.target < 1:
        raise UserError(f"augment.target must be in (0, 1) (ADA uses 0.6), got {a.target!r}")
    if not _number(a.adjust_kimg) or not a.adjust_kimg > 0:
        raise UserError(f"augment.adjust_kimg must be > 0 (ADA uses 500), got {a.adjust_kimg!r}")
    if not isinstance(a.interval, int) or isinstance(a.interval, bool) or a.interval < 1:
        raise UserError(f"augment.interval must be an integer >= 1 (ADA uses 4), got {a.interval!r}")
    if not policy and (a.adaptive or a.p > 0):
        what = "augment.adaptive=true" if a.adaptive else f"augment.p={a.p}"
        raise UserError(
            f"{what} but augment.policy is empty: name the operations, e.g. augment.policy=[color,translation,cutout]"
        )
    return {
        "policy": policy,
        "p": float(a.p),
        "adaptive": a.adaptive,
        "target": float(a.target),
        "adjust_kimg": float(a.adjust_kimg),
        "interval": int(a.interval),
    }
