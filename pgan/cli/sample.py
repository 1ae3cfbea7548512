"""`pgan-sample`: a grid, single PNGs or a latent walk (PNG strip or GIF) from a checkpoint's generator;
`pgan-sample timelapse run=DIR out=FILE.gif|FILE.mp4`: the run's fixed-latent sample grids as one captioned
GIF or MP4 (H.264, needs `pip install 'pgan[video]'`).
Prints the path(s) written; exit 2 with one line `error: ...` on a bad checkpoint, path or setting."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pgan.cli import CONFIG_DIR, exit_on_bad_overrides, exit_with_user_error
from pgan.errors import UserError, check_int, check_number


def sample(cfg: DictConfig) -> list[Path]:
    """Write what cfg asks for; returns the files written."""
    import torch
    from omegaconf import OmegaConf
    from torchvision.utils import make_grid, save_image

    from pgan.export import load_generator
    from pgan.runtime import resolve_device
    from pgan.sample import class_choice_labels, generate, seeded_latents, slerp

    for key in ("ckpt", "out"):
        if OmegaConf.is_missing(cfg, key):
            raise UserError(f"{key}= is required, e.g. pgan-sample ckpt=runs/x/stage-0256/final.pt out=grid.png")
    if cfg.which not in (None, "G_ema", "G"):
        raise UserError(f"which must be G_ema or G (or null), got {cfg.which!r}")
    n, steps = check_int("n", cfg.n, low=1), check_int("steps", cfg.steps, low=2)
    seed = check_int("seed", cfg.seed)
    if cfg.nrow is not None:
        check_int("nrow", cfg.nrow, low=1)
    if cfg.to_seed is not None:
        check_int("to_seed", cfg.to_seed)
    check_int("frame_ms", cfg.frame_ms, low=1)
    psi = cfg.psi
    if psi is not None:
        check_number("psi", psi, low=0.0, strict=True, meaning="or null for no truncation", error=UserError)
    out = Path(str(cfg.out)).expanduser()
    walk = cfg.to_seed is not None
    if out.suffix.lower() not in ((".png", ".gif") if walk else (".png", "")):
        allowed = "FILE.png (a strip) or FILE.gif" if walk else "FILE.png (a grid) or DIR/ (one PNG per image)"
        raise UserError(f"out={cfg.out}: expected {allowed}")
    G, alpha = load_generator(str(Path(str(cfg.ckpt)).expanduser()), None if cfg.which is None else str(cfg.which))
    G = G.to(resolve_device(cfg.device))
    if walk:
        start = seeded_latents(seed, 1, G.latent_dim, psi)[0]
        end = seeded_latents(int(cfg.to_seed), 1, G.latent_dim, psi)[0]
        z = slerp(start, end, torch.linspace(0, 1, steps))
    else:
        z = seeded_latents(seed, n, G.latent_dim, psi)
    labels = class_choice_labels(G, cfg.get("class"), len(z))  # None: image i in class i mod num_classes
    images = (generate(G, z, alpha, labels=labels) + 1) / 2  # [0, 1] for save_image / PIL
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if walk and out.suffix.lower() == ".gif":
            from torchvision.transforms.v2.functional import to_pil_image

            frames = [to_pil_image(img.clamp(0, 1)) for img in images]
            frames = frames + frames[-2:0:-1]  # there and back: a seamless loop
            frames[0].save(out, save_all=True, append_images=frames[1:], duration=int(cfg.frame_ms), loop=0)
            return [out]
        if walk or out.suffix:
            nrow = len(images) if walk else int(cfg.nrow or math.ceil(math.sqrt(n)))
            save_image(make_grid(images, nrow=nrow, padding=2, pad_value=1.0), out)
            return [out]
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for i, img in enumerate(images):
            path = out / f"seed{seed}-{i:04d}.png"
            save_image(img, path)
            written.append(path)
        return written
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc}") from exc


def timelapse(cfg: DictConfig) -> list[Path]:
    """The GIF or MP4 of a run's sample grids over the whole multi-stage run."""
    from omegaconf import OmegaConf

    from pgan.report import run_stages
    from pgan.sample import run_frames, save_timelapse, timelapse_images

    if cfg.run is None or OmegaConf.is_missing(cfg, "out"):
        raise UserError("run= and out= are required, e.g. pgan-sample timelapse run=runs/my-run out=progress.gif")
    run_dir, out = Path(str(cfg.run)).expanduser(), Path(str(cfg.out)).expanduser()
    if out.suffix.lower() not in (".gif", ".mp4"):
        raise UserError(f"out={cfg.out}: the time-lapse is written as FILE.gif or FILE.mp4")
    check_int("frame_ms", cfg.frame_ms, low=1)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"run={cfg.run}: not a pgan run directory (no config.yaml)")
    stages = run_stages(run_dir)  # as trained: where schedule.advance=plateau ended stages early
    frames = run_frames(run_dir, stages)
    if not frames:
        raise UserError(f"run={cfg.run}: no sample grids in {run_dir / 'samples'}")
    images = timelapse_images(frames)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_timelapse(images, out, int(cfg.frame_ms))
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc}") from exc
    return [out]


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sample")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        if cfg.mode not in ("sample", "timelapse"):
            raise UserError(f"mode must be sample or timelapse, got {cfg.mode!r}")
        written = timelapse(cfg) if cfg.mode == "timelapse" else sample(cfg)
    except UserError as exc:
        exit_with_user_error(exc)
    for path in written:
        print(path, flush=True)


def overrides_of(args: list[str]) -> list[str]:
    """The command line as Hydra overrides: the subcommand `timelapse`, wherever it stands, is mode=timelapse."""
    if "timelapse" not in args:
        return list(args)
    return ["mode=timelapse", *(a for a in args if a != "timelapse")]


def main() -> None:
    """Console entry point of `pgan-sample` (`pgan-sample timelapse ...` is `pgan-sample mode=timelapse ...`)."""
    sys.argv = [sys.argv[0], *overrides_of(sys.argv[1:])]
    exit_on_bad_overrides("sample", sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
