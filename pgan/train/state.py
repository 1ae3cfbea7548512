"""The training state of one stage: what a checkpoint holds, written and read back in this one file.

`TrainState.state_dict()` is the checkpoint (see pgan/checkpoint.py for the file format around it) and
`load_state_dict()` reads it back, side by side; `grow_from()` starts a stage from the previous stage's
final.pt. The networks, their optimizers, G_ema, the image counter, the partial log tick and the random
stream are the stage's own; the components with state (augmentation p, the plateau that may end the stage, the
non-finite guard, the collapse detector) are registered under their checkpoint keys in `__init__`: a new one is
one line there.
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from typing import Any, Protocol

import torch
from torch import nn

from pgan import dist
from pgan.augment import AugmentPipe
from pgan.checkpoint import get_rng_state, set_rng_state
from pgan.data.labels import ClassLabels
from pgan.errors import UserError
from pgan.networks import Discriminator, Generator, grow_from, networks_from
from pgan.schedule import PAPER_BETAS, Stage
from pgan.train.clock import TickSums
from pgan.train.guard import Guard
from pgan.train.options import TrainOptions
from pgan.train.plateau import Plateau
from pgan.train.watch import CollapseWatch


class Stateful(Protocol):
    """A component whose state a checkpoint carries."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any, new_stage: bool = False) -> None: ...


def build_models(
    model: dict[str, Any], resolution: int, device: torch.device, classes: ClassLabels | None = None
) -> tuple[Generator, Discriminator]:
    """Fresh G and D for one resolution (weights drawn from the global torch RNG), channels-last on `device`;
    class-conditional on `classes` when given."""
    G, D = networks_from(model, resolution, classes.num_classes if classes is not None else 0)
    if classes is not None:
        G.class_names = classes.names
    # channels_last is faster for these convolutions on CUDA and, measured, 2x at 256 px on CPU (oneDNN).
    return G.to(device, memory_format=torch.channels_last), D.to(device, memory_format=torch.channels_last)


def build_optimizers(
    G: nn.Module, D: nn.Module, lr: float, lazy_ratio: float = 1.0, betas: tuple[float, float] = PAPER_BETAS
) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """Adam (`betas`, by default the paper's beta1 0 and beta2 0.99; eps 1e-8) for G and D, fresh for every stage.
    D's runs at lr * c with betas ** c for lazy regularisation's c = `lazy_ratio` (`Loss.lazy_ratio`, StyleGAN2's
    correction for the penalty's extra updates). Fused: one kernel per step, and it can skip a step on a
    device-side flag (the non-finite guard) without a host sync."""
    opt_G = torch.optim.Adam(G.parameters(), lr=lr, betas=betas, eps=1e-8, fused=True)
    d_betas = tuple(beta**lazy_ratio for beta in betas)
    opt_D = torch.optim.Adam(D.parameters(), lr=lr * lazy_ratio, betas=d_betas, eps=1e-8, fused=True)
    return opt_G, opt_D


class TrainState:
    """G, D, G_ema, their optimizers, the counters and every stateful component of one stage."""

    def __init__(
        self,
        options: TrainOptions,
        stage: Stage,
        device: torch.device,
        classes: ClassLabels | None,
        guard: Guard,
        watch: CollapseWatch | None,
        resume: dict[str, Any] | None = None,
        init: dict[str, Any] | None = None,
    ) -> None:
        """The stage's state resumed from its own checkpoint `resume`, or grown from `init` (the previous
        stage's), or from scratch."""
        if resume is None and init is not None:
            # Continue the random stream where the previous stage ended (before the new layers draw their
            # weights), so that a stage started from final.pt - after a kill, or as a separate job - is
            # identical to the same stage in one uninterrupted run.
            set_rng_state(init["rng"])
        self.options, self.stage, self.device, self.classes = options, stage, device, classes
        self.G, self.D = build_models(options.model, stage.resolution, device, classes)
        self.G_ema = copy.deepcopy(self.G).requires_grad_(False)
        self.opt_G, self.opt_D = build_optimizers(self.G, self.D, stage.lr, options.loss.lazy_ratio, options.betas)
        # D's input augmentation; off (the default), the step draws no random number more than without it.
        self.augment = AugmentPipe(**options.augment, device=device)
        self.nimg = 0  # images shown in this stage
        self.tick = TickSums()  # the partial log tick
        # Stateful components under their checkpoint keys. A rollback restores `rewound` ones with the
        # weights; the `watches` keep their own account of rollbacks across it (pgan.train.recovery).
        self.rewound: dict[str, Stateful] = {"augment": self.augment}
        # schedule.advance=plateau: the metric's history and the decision that ends the stable phase.
        self.plateau = Plateau(stage, options.plateau[stage.resolution]) if options.advance == "plateau" else None
        if self.plateau is not None:
            self.rewound["plateau"] = self.plateau
        self.watches: dict[str, Stateful | None] = {"guard": guard, "collapse": watch}
        if resume is not None:
            self.load_state_dict(resume)
        else:
            self.grow_from(init)

    @property
    def total_nimg(self) -> int:
        """Images shown over the whole run (the x axis of every log)."""
        return self.stage.start_nimg + self.nimg

    @property
    def end_nimg(self) -> int:
        """Images of the stage when it ends: the schedule's, or fewer where a plateau ended its stable phase."""
        if self.plateau is not None and self.plateau.ended_at is not None:
            return self.plateau.ended_at
        return self.stage.num_images

    # --- the checkpoint, written and read side by side --------------------------------------------------
    def state_dict(self, done: bool = False) -> dict[str, Any]:
        """The checkpoint's contents (pgan.checkpoint.save_checkpoint adds its format and version)."""
        return {
            "stage": self.stage.index,
            "resolution": self.stage.resolution,
            "nimg": self.nimg,
            "total_nimg": self.total_nimg,
            "done": done,  # True for a stage's final.pt
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
            "G_ema": self.G_ema.state_dict(),
            "opt_G": self.opt_G.state_dict(),
            "opt_D": self.opt_D.state_dict(),
            "rng": get_rng_state(),
            "tick": self.tick.state_dict(),
            **{key: c.state_dict() if c is not None else None for key, c in {**self.rewound, **self.watches}.items()},
            # A conditional run's class names in label order (empty: unconditional): the data's classes, which
            # the config alone does not name.
            "classes": list(self.classes.names) if self.classes is not None else [],
            "config": self.options.config,
            "stage_info": asdict(self.stage),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from one of this stage's checkpoints: everything `state_dict` wrote."""
        self.load_training(state)
        for key, component in self.watches.items():
            if component is not None:
                component.load_state_dict(state.get(key))

    def load_training(self, state: dict[str, Any]) -> None:
        """The part of a checkpoint a rollback restores: weights, optimizers, counters, RNG, partial tick and
        the components that go back with the weights."""
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        self.G_ema.load_state_dict(state["G_ema"])
        self.opt_G.load_state_dict(state["opt_G"])
        self.opt_D.load_state_dict(state["opt_D"])
        self.nimg = int(state["nimg"])
        set_rng_state(state["rng"])
        for key, component in self.rewound.items():
            component.load_state_dict(state.get(key))
        self.tick.load_state_dict(state["tick"], self.device)

    def grow_from(self, previous: dict[str, Any] | None) -> None:
        """Start the stage from the previous stage's checkpoint (None: from scratch): the shared layers
        continue, the new block keeps its fresh weights (or starts as the smaller model's function:
        model.grow_init), the components start a new stage."""
        if previous is not None:
            try:
                grow_init = self.options.model.get("grow_init", "fresh")
                smooth = bool(self.options.model.get("grow_smooth", False))
                grow_from(self.G, previous["G"], grow_init, smooth)
                grow_from(self.D, previous["D"], grow_init)
                # New layers of G_ema start equal to G's fresh ones; shared layers continue the old average.
                self.G_ema.load_state_dict(self.G.state_dict())
                grow_from(self.G_ema, previous["G_ema"], grow_init, smooth)
            except ValueError as exc:
                raise UserError(
                    f"cannot grow stage {self.stage.resolution} from the previous checkpoint: {exc}"
                ) from exc
        for key, component in {**self.rewound, **self.watches}.items():
            if component is not None:  # from scratch: each starts afresh (None)
                component.load_state_dict(previous.get(key) if previous is not None else None, new_stage=True)
        # The same starting weights on every rank (they are already: a safety net, once per stage).
        dist.broadcast_modules(self.G, self.D, self.G_ema)

    def set_lr_scale(self, scale: float) -> None:
        """Both optimizers at the stage's learning rate times `scale` (what rollbacks did to it)."""
        for opt, ratio in ((self.opt_G, 1.0), (self.opt_D, self.options.loss.lazy_ratio)):
            for group in opt.param_groups:
                group["lr"] = self.stage.lr * scale * ratio
