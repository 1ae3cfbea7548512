"""`pgan-eval`: metrics of generated images (a folder, or samples of a checkpoint) against real images (a
folder, or a dataset config), printed as one JSON object on the last line of stdout.

Exit code 0 whatever the verdict; 2 with one line `error: ...` when an input is unusable.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from pgan.cli import CONFIG_DIR, exit_on_bad_overrides, exit_with_user_error
from pgan.errors import UserError, check_int
from pgan.metrics.quality import QUALITY_METRICS, check_metric_names

METRICS = ("diversity", *QUALITY_METRICS)


def _folder(path: str, key: str) -> Path:
    """`path` as an existing folder, or a user error naming `key=`."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(f"{key}={path}: no such folder")
    return folder


def _first_image_side(folder: Path) -> int:
    """The smaller side in pixels of the first image of `folder` (sorted order)."""
    from pgan.data.folder import find_images

    files = find_images(folder)
    if not files:
        raise UserError(f"fake={folder}: no images found")
    try:
        with Image.open(files[0]) as image:
            return min(image.size)
    except OSError as exc:
        raise UserError(f"cannot read image {files[0]}: {exc}") from exc


def check_eval_config(cfg: DictConfig) -> None:
    """One-line errors for settings that are not whole numbers in range (they were tracebacks, or ran)."""
    check_int("num_fake", cfg.num_fake, low=1)
    check_int("num_real", cfg.num_real, low=1)
    check_int("seed", cfg.seed)
    check_int("pr_k", cfg.pr_k, low=1)
    check_int("coverage_k", cfg.coverage_k, low=1)
    if cfg.resolution is not None:
        _check_resolution(cfg.resolution)


def _check_resolution(resolution: object) -> None:
    check_int("resolution", resolution)
    if resolution < 4:
        raise UserError(f"resolution {resolution} px is too small for the diversity metrics (at least 4 px)")


def evaluate(cfg: DictConfig) -> dict:
    """Compute the requested metrics; the dict printed as JSON."""
    from pgan.data import FolderDataset, make_dataset
    from pgan.export import load_generator
    from pgan.metrics.collapse import STATES, severity, thresholds_from_config
    from pgan.metrics.diversity import RandomEmbedding, diversity_metrics, real_reference, sample_dataset
    from pgan.networks import cycle_labels
    from pgan.runtime import apply_thread_budget, resolve_device
    from pgan.sample import generate, seeded_latents

    names = check_metric_names(cfg.metrics, METRICS)
    if not names:
        raise UserError(f"metrics=[] asks for nothing (available: {', '.join(METRICS)})")
    if (cfg.fake is None) == (cfg.ckpt is None):
        raise UserError("give exactly one of fake=FOLDER or ckpt=CHECKPOINT")
    check_eval_config(cfg)
    device = resolve_device(cfg.device)
    apply_thread_budget(cfg.get("threads", "auto"))
    thresholds = thresholds_from_config(cfg)
    channels = int(cfg.data.get("channels", 3))
    if cfg.ckpt is not None:
        G, alpha = load_generator(str(cfg.ckpt))  # a checkpoint's G_ema, an export directory or a Hub repo id
        G = G.to(device)
        channels = G.image_channels
        resolution = int(cfg.resolution or G.resolution)
        _check_resolution(resolution)
        # The latents of pgan-sample: image i of seed s here is image i of `pgan-sample seed=s`.
        # A conditional G: image i in class i mod num_classes (cycle_labels), every class equally often.
        fakes = generate(G, seeded_latents(int(cfg.seed), int(cfg.num_fake), G.latent_dim), alpha).clamp(-1, 1)
        labels = cycle_labels(len(fakes), G.num_classes)
        if fakes.shape[-1] != resolution:
            fakes = torch.nn.functional.interpolate(fakes, size=(resolution, resolution), mode="area")
    else:
        labels = None
        folder = _folder(cfg.fake, "fake")
        resolution = int(cfg.resolution or _first_image_side(folder))
        _check_resolution(resolution)
        fakes = sample_dataset(
            FolderDataset(folder, resolution, channels, key="the fake= folder"), int(cfg.num_fake), int(cfg.seed)
        )
    if cfg.real is not None:
        real_data = FolderDataset(_folder(cfg.real, "real"), resolution, channels, key="the real= folder")
    else:
        real_data = make_dataset({**OmegaConf.to_container(cfg.data), "channels": channels}, resolution)
    reals = sample_dataset(real_data, int(cfg.num_real), int(cfg.seed) + 1)
    if len(fakes) < 4 or len(reals) < 4:
        raise UserError(f"need at least 4 fake and 4 real images, got {len(fakes)} and {len(reals)}")
    result: dict = {}
    if "diversity" in names:
        embedding = RandomEmbedding().to(device)
        ref = real_reference(reals.to(device), embedding, seed=int(cfg.seed))
        result |= diversity_metrics(fakes.to(device), ref, embedding, seed=int(cfg.seed))
        # A one-shot verdict: the detector's level for this one evaluation (no patience, no history).
        result["state"] = STATES[severity(result, thresholds)]
    quality = [n for n in names if n in QUALITY_METRICS]
    if quality:
        # class_accuracy when the classes G was conditioned on are the real data's modes (shapes, digits, ...).
        mode_labels = labels if labels is not None and _classes_are_modes(G, real_data) else None
        result |= quality_metrics(cfg, quality, reals.to(device), fakes.to(device), real_data, device, mode_labels)
    return result


def _classes_are_modes(G, real_data) -> bool:
    """Whether a conditional G's classes are the known modes of `real_data`, in the same order."""
    from pgan.data.labels import class_labels

    if not hasattr(real_data, "num_modes") or not hasattr(real_data, "class_labels"):
        return False
    names = class_labels(real_data).names
    return len(names) == real_data.num_modes and tuple(G.class_names) == names


def quality_metrics(
    cfg: DictConfig,
    names: list[str],
    reals: torch.Tensor,
    fakes: torch.Tensor,
    real_data,
    device: torch.device,
    labels: torch.Tensor | None = None,
) -> dict:
    """The `pgan.metrics.quality` metrics `names` of `fakes` against `reals` (`labels`: see QualityEvaluator)."""
    from pgan.metrics.modes import mode_classifier_for
    from pgan.metrics.quality import QualityEvaluator, features_for, nearest_k

    features = features_for(names, cfg.features, cfg.inception_weights, device)
    smallest = nearest_k(names, cfg.pr_k, cfg.coverage_k)
    if smallest and min(len(reals), len(fakes)) <= smallest:
        raise UserError(f"pr / coverage with k={smallest} need more than {smallest} fake and real images")
    modes = None
    if "modes" in names:
        if cfg.real is not None:
            raise UserError("modes needs a dataset with known modes (data=shapes, digits or stacked_digits), not real=")
        modes = mode_classifier_for(real_data)
        if modes.channels is not None and fakes.shape[1] != modes.channels:
            raise UserError(f"modes: the {modes.source} classifier expects {modes.channels}-channel images")
    evaluator = QualityEvaluator(
        names,
        reals,
        features=features,
        modes=modes,
        seed=int(cfg.seed),
        pr_k=int(cfg.pr_k),
        coverage_k=int(cfg.coverage_k),
    )
    return evaluator(fakes, labels)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        result = evaluate(cfg)
    except UserError as exc:
        exit_with_user_error(exc)
    print(json.dumps(result), flush=True)


def main() -> None:
    """Console entry point of `pgan-eval`."""
    exit_on_bad_overrides("eval", sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
