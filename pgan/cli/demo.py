"""`pgan-demo ckpt=PATH`: serve a Gradio app (seed, number of images, truncation -> the grid) over the generator
of a checkpoint or a pgan-export directory on http://127.0.0.1:7860/ until interrupted. Prints
`pgan-demo: serving ... on URL` (one line, flushed) once it listens; exit 2 with one line `error: ...` on a bad
checkpoint or setting, before gradio starts."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pgan.cli import CONFIG_DIR, exit_on_bad_overrides, exit_with_user_error
from pgan.errors import UserError, check_int


def _free_port(host: str) -> int:
    """A port the OS says is free on `host` (gradio itself cannot take port 0: it would print :0 as the URL)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def serve(cfg: DictConfig) -> None:
    """Load the generator, build the app and serve it (blocks until Ctrl+C)."""
    from omegaconf import OmegaConf

    from pgan.export import load_generator
    from pgan.runtime import resolve_device

    if OmegaConf.is_missing(cfg, "ckpt"):
        raise UserError("ckpt= is required, e.g. pgan-demo ckpt=runs/x/stage-0256/final.pt")
    if cfg.which not in (None, "G_ema", "G"):
        raise UserError(f"which must be G_ema or G (or null), got {cfg.which!r}")
    max_images = check_int("max_images", cfg.max_images, low=1)
    port = 0 if cfg.port is None else cfg.port
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise UserError(f"port must be an integer in 0..65535 (0 or null: any free port), got {cfg.port!r}")
    host = str(cfg.host)
    ckpt = Path(str(cfg.ckpt)).expanduser()
    G, alpha = load_generator(str(ckpt), None if cfg.which is None else str(cfg.which))
    device = resolve_device(cfg.device)
    G = G.to(device)

    # Offline by default: gradio's launch-time telemetry reads only the environment variable, not
    # Blocks(analytics_enabled=False). setdefault: a user may still opt in.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from pgan.demo import build_demo

    title = str(cfg.title) if cfg.title is not None else f"pgan: {ckpt}"
    demo = build_demo(G, alpha, title=title, device=str(device), max_images=max_images)
    try:
        port = port or _free_port(host)
        _, url, _ = demo.launch(
            server_name=host, server_port=port, share=False, quiet=True, prevent_thread_lock=True, ssr_mode=False
        )
    except OSError as exc:  # gradio says "Cannot find empty port" for a bad host too
        raise UserError(
            f"cannot serve on {host}:{port}: the port is in use or {host} is not an address of this machine "
            "(port=0 picks a free port)"
        ) from exc
    print(f"pgan-demo: serving {ckpt} on {url} (Ctrl+C to stop)", flush=True)
    demo.block_thread()  # until Ctrl+C / SIGTERM; closes the server


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="demo")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        serve(cfg)
    except UserError as exc:
        exit_with_user_error(exc)


def main() -> None:
    """Console entry point of `pgan-demo`."""
    exit_on_bad_overrides("demo", sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
