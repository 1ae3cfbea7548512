"""The collapse watch: evaluates G_ema's sample diversity during training and runs the collapse detector.

At every `diversity.every_kimg` the trainer calls `CollapseWatch.evaluate`: a fixed latent batch through
G_ema (and optionally the raw G), the diversity metrics against real images of the stage's resolution faded
by the same alpha as the images D sees, one detector update, and the logging (TensorBoard `Diversity/*` and
`Collapse/*`, a `collapse.jsonl` line, a console line and a TensorBoard text entry when the state changes).
What to *do* about a collapse (warn, stop, roll back) is the training loop's business.

Nothing here touches the training RNG (the latents, the pairing and the real subset have their own
seeded generators), so evaluating never changes the training trajectory and resumes stay bit-identical.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset
from tqdm import tqdm

from pgan.errors import UserError
from pgan.metrics.collapse import STATES, DetectorState, in_grace_window, severity, thresholds_from_config, update
from pgan.metrics.diversity import (
    RandomEmbedding,
    RealReference,
    diversity_metrics,
    real_reference,
    sample_dataset,
)
from pgan.metrics.modes import ModeClassifier, mode_classifier_for, mode_coverage
from pgan.monitor import Monitor, warn
from pgan.networks import Generator, g_architecture_of, generate_chunks
from pgan.schedule import Stage, alpha_at
from pgan.train.step import fade_reals

ON_COLLAPSE = ("warn", "stop", "rollback")
# The metrics logged to TensorBoard as Diversity/<name>.
LOGGED = ("msssim_fake", "msssim_real", "excess_pair", "excess_pair_se", "vendi_ratio", "std_ratio", "vendi_fake")


@dataclass
class Evaluation:
    """The outcome of one evaluation."""

    metrics: dict[str, float]
    previous: str  # the detector state before it
    state: str  # and after it
    in_grace: bool

    @property
    def changed(self) -> bool:
        """Whether the state moved."""
        return self.state != self.previous

    @property
    def entered_collapse(self) -> bool:
        """Whether this evaluation moved the state to collapsed."""
        return self.changed and self.state == "collapsed"


def check_diversity_config(cfg: DictConfig) -> None:
    """Validate `cfg.diversity` before any work, one line naming the key."""
    d = cfg.diversity
    if d.on_collapse not in ON_COLLAPSE:
        raise UserError(f"diversity.on_collapse must be one of {', '.join(ON_COLLAPSE)}, got {d.on_collapse!r}")
    for key in ("num_samples", "num_real"):
        if int(d[key]) < 4:
            raise UserError(f"diversity.{key} must be >= 4 (pairs of samples are compared), got {d[key]}")
    for key in ("patience", "recover_patience", "max_rollbacks"):
        if int(d[key]) < (0 if key == "max_rollbacks" else 1):
            raise UserError(f"diversity.{key} is {d[key]}: too small")
    if float(d.every_kimg) <= 0:
        raise UserError(f"diversity.every_kimg must be > 0, got {d.every_kimg}")
    if not 0 < float(d.rollback_lr_scale) <= 1:
        raise UserError(f"diversity.rollback_lr_scale must be in (0, 1], got {d.rollback_lr_scale}")
    thresholds_from_config(cfg)


@torch.no_grad()
def evaluation_samples(
    G: Generator, z: torch.Tensor, alpha: float, autocast: contextlib.AbstractContextManager, chunk: int | None = None
) -> torch.Tensor:
    """G's images for latents `z` in eval mode, float32 on G's device, `chunk` images a pass (default: sized for
    the device, `pgan.networks.eval_chunk`); G's train/eval mode is restored (what the collapse watch and the metrics
    evaluate). A class-conditional G generates sample i in class i mod num_classes (pgan.networks.cycle_labels)."""
    was_training = G.training
    G.eval()
    with autocast:
        images = torch.cat([part.float() for part in generate_chunks(G, z, alpha, chunk)])
    G.train(was_training)
    return images


class CollapseWatch:
    """Diversity evaluation + detector state for one training run (see the module docstring)."""

    def __init__(
        self, cfg: DictConfig, device: torch.device, autocast: contextlib.AbstractContextManager, monitor: Monitor
    ) -> None:
        d = cfg.diversity  # checked by pgan.train.options (check_diversity_config)
        self.cfg = d
        self.device = device
        self.autocast = autocast
        self.monitor = monitor
        self.thresholds = thresholds_from_config(cfg)
        self.g_architecture = g_architecture_of(cfg.model)  # how its reals are faded
        self.embedding = RandomEmbedding().to(device)
        # The fixed latent batch, the same for the whole run, drawn from its own generator.
        gen = torch.Generator().manual_seed(int(cfg.seed) + 7919)
        self.z = torch.randn(int(d.num_samples), int(cfg.model.latent_dim), generator=gen).to(device)
        self.seed = int(cfg.seed)
        self.detector = DetectorState()
        self.rollbacks = 0
        self.lr_scale = 1.0
        self._reals: torch.Tensor | None = None  # uint8 real images of the current stage, on the CPU
        self._reals_resolution = 0
        self._refs: dict[tuple[int, float], RealReference] = {}
        self.classifier: ModeClassifier | None = None

    # --- state carried in checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain values for the checkpoint."""
        return {"detector": self.detector.to_dict(), "rollbacks": self.rollbacks, "lr_scale": self.lr_scale}

    def load_state_dict(self, state: dict | None, new_stage: bool = False) -> None:
        """Restore what `state_dict` saved; a new stage keeps the state and rollback count, not the lr scale."""
        if not state:
            return
        self.detector = DetectorState.from_dict(state["detector"])
        self.rollbacks = int(state["rollbacks"])
        self.lr_scale = 1.0 if new_stage else float(state["lr_scale"])

    def roll_back(self, ok_state: dict | None, lr_scale: float) -> None:
        """After restoring a checkpoint taken while ok: its detector state, one more rollback, lower lr."""
        rollbacks, scale = self.rollbacks + 1, self.lr_scale * lr_scale
        self.load_state_dict(ok_state)
        self.detector = DetectorState(self.detector.level, [], [], self.detector.evaluations)
        self.rollbacks, self.lr_scale = rollbacks, scale

    def announce_rollback(self, from_step: int, stage: Stage, nimg: int) -> None:
        """Console line, TensorBoard text and a collapse.jsonl record of a rollback (logged at the restored step)."""
        step = stage.start_nimg + nimg
        message = (
            f"collapse detector: rolled back from {from_step / 1000:.3f} kimg to {step / 1000:.3f} kimg "
            f"(rollback {self.rollbacks} of at most {self.cfg.max_rollbacks}), learning rates x{self.lr_scale:g}"
        )
        warn(message)
        self.monitor.text("Collapse/events", "warning: " + message, step)
        self.monitor.scalars({"Collapse/rollbacks": self.rollbacks, "Collapse/lr_scale": self.lr_scale}, step, None)
        self.monitor.record(
            "collapse",
            {
                "step": step,
                "kimg": step / 1000,
                "event": "rollback",
                "from_kimg": from_step / 1000,
                "rollbacks": self.rollbacks,
                "lr_scale": self.lr_scale,
                "state": self.state,
            },
        )

    def stop_message(self, stage: Stage, step: int, ok_checkpoint: Path) -> str:
        """Why the run stopped, for the one line the CLI prints."""
        why = "diversity.on_collapse=stop"
        if self.cfg.on_collapse == "rollback":
            why = (
                f"{self.rollbacks} rollback(s), diversity.max_rollbacks={self.cfg.max_rollbacks}"
                if ok_checkpoint.is_file()
                else f"no checkpoint of stage {stage.resolution} px was written while the detector said ok"
            )
        return (
            f"mode collapse detected at {step / 1000:.3f} kimg (stage {stage.resolution} px); stopped ({why}). "
            f"Samples: the run's samples/ folder; details: collapse.jsonl"
        )

    @property
    def state(self) -> str:
        """The detector's current state."""
        return self.detector.state

    @property
    def verdict(self) -> str:
        """What the detector can say (pgan.metrics.collapse.VERDICTS): pending / in grace until it has judged."""
        return self.detector.verdict(int(self.cfg.patience))

    def stage_summary(self, stage: Stage, metrics: dict[str, float]) -> str:
        """The console line at a stage's end: the verdict, with the last evaluation's own reading beside it."""
        m = metrics
        reading = STATES[severity(m, self.thresholds)]
        return (
            f"collapse detector after stage {stage.resolution} px: {self.verdict} (last evaluation reads {reading}: "
            f"excess_pair {m['excess_pair']:.3f} ± {m['excess_pair_se']:.3f}, vendi_ratio {m['vendi_ratio']:.3f}, "
            f"std_ratio {m['std_ratio']:.3f}"
            + (f", {m['modes_covered']:.0f} modes" if "modes_covered" in m else "")
            + ")"
        )

    # --- real images ------------------------------------------------------------------------------------
    def begin_stage(self, stage: Stage, dataset: Dataset) -> None:
        """Load the real images for this stage's resolution (the same seeded subset every time)."""
        if self._reals_resolution == stage.resolution:
            return
        self.classifier = None
        if self.cfg.mode_coverage:
            try:
                self.classifier = mode_classifier_for(dataset)
            except UserError:
                pass  # a dataset without known modes: nothing to count
        images = sample_dataset(dataset, int(self.cfg.num_real), seed=self.seed + 104729)
        # uint8 on the CPU: 512 images at 256 px are 100 MB, and the data was 8-bit to begin with.
        self._reals = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        self._reals_resolution = stage.resolution
        self._refs = {}

    def reference(self, alpha: float) -> RealReference:
        """The real reference at the current resolution, faded by `alpha` like the images D sees."""
        key = (self._reals_resolution, round(alpha, 4))
        if key not in self._refs:
            reals = self._reals.to(self.device).float() / 127.5 - 1
            ref = real_reference(fade_reals(reals, alpha, self.g_architecture), self.embedding, seed=self.seed)
            if alpha < 1:
                self._refs = {k: v for k, v in self._refs.items() if k[1] == 1.0}  # keep only the stable one
            self._refs[key] = ref
        return self._refs[key]

    # --- one evaluation ---------------------------------------------------------------------------------
    def samples(self, G: Generator, alpha: float) -> torch.Tensor:
        """G's images for the fixed latent batch (see `evaluation_samples`)."""
        return evaluation_samples(G, self.z, alpha, self.autocast)

    def evaluate(self, G_ema: Generator, G: Generator | None, stage: Stage, nimg: int) -> Evaluation:
        """Evaluate, update the detector, and log; `nimg` counts the images seen in this stage."""
        start = time.perf_counter()
        alpha = alpha_at(stage, nimg)
        ref = self.reference(alpha)
        fakes = self.samples(G_ema, alpha)
        metrics = diversity_metrics(fakes, ref, self.embedding, seed=self.seed)
        if self.classifier is not None:
            # Ground truth where the dataset's modes are known: how many of them G_ema's samples hit.
            coverage = mode_coverage(self.classifier.predict(fakes.cpu()), self.classifier.num_modes)
            metrics |= {"modes_covered": coverage["modes_covered"], "mode_kl": coverage["kl_to_uniform"]}
        grace = in_grace_window(
            nimg, round(stage.fade_kimg * 1000), float(self.cfg.grace_kimg), float(self.cfg.grace_fade_fraction)
        )
        previous = self.detector.state
        self.detector = update(
            self.detector,
            metrics,
            self.thresholds,
            patience=int(self.cfg.patience),
            recover_patience=int(self.cfg.recover_patience),
            in_grace=grace,
        )
        result = Evaluation(metrics, previous, self.detector.state, grace)
        step = stage.start_nimg + nimg
        scalars = {f"Diversity/{k}": metrics[k] for k in LOGGED + ("modes_covered", "mode_kl") if k in metrics}
        if G is not None and self.cfg.raw_G:
            raw = diversity_metrics(self.samples(G, alpha), ref, self.embedding, seed=self.seed)
            scalars |= {f"Diversity/raw_G/{k}": raw[k] for k in LOGGED}
        reading = STATES[severity(metrics, self.thresholds)]  # this evaluation alone, judged or not
        scalars |= {
            "Collapse/state": self.detector.level,
            "Collapse/judged": float(self.verdict in STATES),  # 0 while the verdict is pending / in grace
            "Collapse/reading": STATES.index(reading),
            "Collapse/grace": float(grace),
            "Collapse/rollbacks": self.rollbacks,
            "Diversity/eval_s": time.perf_counter() - start,
        }
        self.monitor.scalars(scalars, step, jsonl=None)
        self.monitor.record(
            "collapse",
            {
                "step": step,
                "kimg": step / 1000,
                "stage": stage.index,
                "resolution": stage.resolution,
                "alpha": alpha,
                "state": result.state,
                "verdict": self.verdict,
                "reading": reading,
                "previous": previous,
                "in_grace": grace,
                **metrics,
            },
        )
        if result.changed:
            self._announce(result, stage, step, alpha)
        return result

    def _announce(self, result: Evaluation, stage: Stage, step: int, alpha: float) -> None:
        """A console line and a TensorBoard text entry for a state change."""
        m = result.metrics
        message = (
            f"collapse detector: {result.previous} -> {result.state} at {step / 1000:.3f} kimg "
            f"(stage {stage.resolution} px, alpha {alpha:.2f}): excess_pair {m['excess_pair']:.3f} "
            f"± {m['excess_pair_se']:.3f}, msssim fake/real {m['msssim_fake']:.3f}/{m['msssim_real']:.3f}, "
            f"vendi_ratio {m['vendi_ratio']:.3f}, std_ratio {m['std_ratio']:.3f}"
        )
        prefix = "warning: " if STATES.index(result.state) > STATES.index(result.previous) else ""
        tqdm.write(prefix + message, file=sys.stderr)
        self.monitor.text("Collapse/events", prefix + message, step)
