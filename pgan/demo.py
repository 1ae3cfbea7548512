"""The `pgan-demo` Gradio app: a checkpoint's generator behind a seed, a count and a truncation slider.

The grid for (seed, n, psi) is the one `pgan-sample ckpt=... seed=S n=N psi=PSI out=grid.png` writes, pixel
for pixel: the same latents (`seeded_latents`), the same layout (`make_grid`, about sqrt(n) per row, 2 px
white padding) and the same float -> uint8 rounding. Image i of a seed is the same whatever n is.

Truncation in the app: psi = 0 means "off" (pgan-sample's psi=null). Any psi > 0 draws the latents from a
normal truncated to +-psi, so smaller is more typical and less varied; psi = 1 is already strong truncation,
not "off" (a third of the components of a standard normal lie beyond +-1).

Gradio is an optional extra (`pip install 'pgan[demo]'`) and is imported only by `build_demo`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torchvision.utils import make_grid

from pgan.errors import UserError
from pgan.networks import Generator
from pgan.sample import class_choice_labels, generate, seeded_latents

if TYPE_CHECKING:
    import gradio

MAX_SEED = 2**31 - 1  # the seed slider's range; any non-negative int works with seeded_latents
PSI_MAX = 3.0  # beyond ~3 truncation hardly changes a standard normal
EVERY_CLASS = "(every class in turn)"  # the class selector's first choice: image i in class i mod num_classes
EXAMPLES = ((0, 16, 0.0), (1, 4, 0.0), (7, 9, 0.7), (42, 1, 0.0))  # (seed, n, psi) rows under the app


def psi_from_slider(psi: float | None) -> float | None:
    """The app's truncation slider value as seeded_latents' psi: 0 (or None) is no truncation."""
    return None if psi is None or float(psi) == 0 else float(psi)


def grid_for(
    G: Generator, alpha: float, seed: int, n: int, psi: float | None = None, class_choice: str | int | None = None
) -> Image.Image:
    """The RGB grid of the first `n` images of `seed` (psi: truncation, None or 0 for none; class_choice: a
    conditional G's class, by name or index, None or EVERY_CLASS for every class in turn), as pgan-sample
    writes it for the same seed, n, psi and class."""
    z = seeded_latents(int(seed), int(n), G.latent_dim, psi_from_slider(psi))
    labels = class_choice_labels(G, None if class_choice == EVERY_CLASS else class_choice, len(z))
    images = (generate(G, z, alpha, labels=labels) + 1) / 2
    grid = make_grid(images, nrow=math.ceil(math.sqrt(n)), padding=2, pad_value=1.0)
    # save_image's conversion (round to nearest); torchvision's to_pil_image truncates instead, which would
    # make the app's pixels differ by one level from pgan-sample's PNG.
    pixels = grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()
    return Image.fromarray(pixels, mode="RGB")


def _import_gradio():
    try:
        import gradio
    except ImportError as exc:
        raise UserError("pgan-demo needs gradio: pip install 'pgan[demo]'") from exc
    return gradio


def build_demo(
    G: Generator, alpha: float = 1.0, *, title: str = "pgan", device: str | None = None, max_images: int = 64
) -> gradio.Blocks:
    """The Gradio app over `G` (already on its device; `device` is only shown): seed, number of images and
    truncation in, the grid out; its generate event is the API endpoint `/generate` (seed, n, psi), and for a
    class-conditional G (seed, n, psi, class), class a name from a selector (EVERY_CLASS: each in turn)."""
    gr = _import_gradio()
    if max_images < 1:
        raise UserError(f"max_images must be >= 1, got {max_images}")
    resolution = int(getattr(G, "resolution", 0)) or "?"

    def generate_grid(seed: float, n: float, psi: float, class_choice: str | None = None) -> Image.Image:
        """The grid of the first n images of a seed (psi 0: no truncation), of one class or of each in turn."""
        try:
            return grid_for(G, alpha, int(seed), int(n), psi, class_choice)
        except (ValueError, UserError) as exc:  # n < 1, a class not in the list (any psi > 0 truncates)
            raise gr.Error(str(exc)) from exc

    # analytics_enabled=False: no version check or telemetry thread (the app must run without a network).
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            f"## {title}\n{resolution} px, alpha {alpha:.2f}, on {device or 'cpu'}. Image *i* of a seed is "
            "`pgan-sample`'s image *i* for that seed; truncation psi 0 means off."
        )
        with gr.Row():
            with gr.Column(scale=1):
                seed = gr.Slider(0, MAX_SEED, value=0, step=1, precision=0, label="seed")
                n = gr.Slider(1, max_images, value=min(16, max_images), step=1, precision=0, label="images")
                psi = gr.Slider(
                    0.0,
                    PSI_MAX,
                    value=0.0,
                    step=0.05,
                    label="truncation psi",
                    info="0: off; otherwise latents from N(0, 1) truncated to +-psi (smaller: more typical)",
                )
                inputs = [seed, n, psi]
                if G.num_classes:
                    classes = gr.Dropdown([EVERY_CLASS, *G.class_names], value=EVERY_CLASS, label="class")
                    inputs.append(classes)
                button = gr.Button("Generate", variant="primary")
            with gr.Column(scale=2):
                # PNG, not gradio's default WebP: lossless, so the pixels are exactly pgan-sample's.
                grid = gr.Image(label="grid", type="pil", format="png", image_mode="RGB", interactive=False)
        gr.Examples(
            [[s, min(k, max_images), p] + ([EVERY_CLASS] if G.num_classes else []) for s, k, p in EXAMPLES],
            inputs=inputs,
            outputs=grid,
            fn=generate_grid,
            run_on_click=True,
            cache_examples=False,
        )
        # One event for the button, releasing a slider and the page load; concurrency_limit (default 1)
        # keeps requests to the one model in sequence.
        gr.on(
            [
                button.click,
                seed.release,
                n.release,
                psi.release,
                demo.load,
                *([classes.change] if G.num_classes else []),
            ],
            generate_grid,
            inputs=inputs,
            outputs=grid,
            api_name="generate",
        )
    return demo
