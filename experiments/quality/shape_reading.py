"""A second reading of the shapes' modes: a small CNN at 16 px beside pgan's 8x8 SVC.

    python experiments/quality/shape_reading.py CKPT [CKPT ...] [--num 2000] [--cnn /tmp/shapes-cnn16.pt]

pgan's shapes classifier (pgan.metrics.modes) is an RBF SVC on 8x8 thumbnails. On real shapes it is right
99.5 % of the time, but on a generator's rounded blobs it answers by area and colour, which an 8x8 thumbnail
keeps, not by corners, which it loses: so it can spread blobs over the four shapes. This script fits a CNN that
sees 16 px images (area-downsampled 64 px renders, max-pooled features: corners and arms count) on real shapes,
prints its held-out accuracy, and reads `--num` G_ema samples of each checkpoint (pgan-sample's latents of
`--seed`) with both classifiers: modes covered, KL to uniform, each shape's share, and how often the two agree
on the shape and on the colour. One JSON line per checkpoint on stdout. The CNN is fitted once (a few minutes
on 2 cores) and kept at `--cnn`.

It also reads how many samples are of one colour (`single_colour`): a real shape is one colour on a dark
background, while a generator can paint one blob in two (a blue blob with a green half). Each bright pixel
(brightest channel >= 160 of 255, at 64 px; the backgrounds are <= 45) takes the palette colour nearest in
direction (cosine), and a sample is of one colour when one of them holds >= 90 % of its bright pixels.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pgan.data.shapes import COLOUR_RGB, COLOURS, NUM_MODES, SHAPES, ShapesDataset
from pgan.load import load_generator
from pgan.metrics.modes import mode_coverage, train_shapes_classifier
from pgan.sample import generate, seeded_latents

CNN_RESOLUTION = 16  # px the CNN reads: the smallest size at which the renders keep their corners (README)
RENDER_RESOLUTION = 64  # renders area-downsampled to CNN_RESOLUTION, as the generator's samples are
TRAIN_SEED, TEST_SEED = 12_345, 999  # neither is a dataset seed a run uses by default (0)
BRIGHT = 160  # of 255: a pixel of the shape for the colour reading (backgrounds are <= 45, colours >= 225)
ONE_COLOUR = 0.9  # a sample is of one colour when one palette colour holds this share of its bright pixels


def small_cnn() -> nn.Sequential:
    """Four 3x3 convolutions and a global max pool: 16 logits, one per mode."""
    return nn.Sequential(
        nn.Conv2d(3, 48, 3, padding=1), nn.ReLU(), nn.Conv2d(48, 48, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(48, 96, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(96, 96, 3, padding=1), nn.ReLU(),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(96, NUM_MODES),
    )  # fmt: skip


def thumbnails(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, R, R] in [-1, 1] -> [N, 3, 16, 16] by box filtering."""
    return F.interpolate(images.float(), size=CNN_RESOLUTION, mode="area")


def rendered(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` real shapes rendered at 64 px, and their modes."""
    dataset = ShapesDataset(RENDER_RESOLUTION, size=count, seed=seed)
    images = torch.stack([dataset[i] for i in range(count)])
    return images, torch.tensor([dataset.mode_of(i) for i in range(count)])


def colour_purity(images: torch.Tensor) -> dict:
    """How many of `images` ([N, 3, R, R] in [-1, 1]) are of one colour, and their colours' mean purity (the
    share of a sample's bright pixels in its main colour), read at 64 px. Samples without a bright pixel count
    as not of one colour."""
    rgb = (F.interpolate(images.float(), size=RENDER_RESOLUTION, mode="area").clamp(-1, 1) + 1) * 127.5
    pixels = rgb.permute(0, 2, 3, 1).flatten(1, 2)  # [N, P, 3]
    palette = F.normalize(torch.tensor([COLOUR_RGB[c] for c in COLOURS], dtype=torch.float32), dim=1)
    nearest = (F.normalize(pixels, dim=2) @ palette.T).argmax(2)  # [N, P]
    bright = pixels.max(2).values >= BRIGHT
    counts = (F.one_hot(nearest, len(COLOURS)) * bright.unsqueeze(2)).sum(1)  # [N, colours]
    total = counts.sum(1)
    purity = counts.max(1).values / total.clamp(min=1)
    painted = total > 0
    return {
        "single_colour": (painted & (purity >= ONE_COLOUR)).double().mean().item(),
        "mean_purity": purity[painted].double().mean().item() if painted.any() else 0.0,
    }


def fitted_cnn(path: Path, count: int = 30_000, epochs: int = 12, batch: int = 128) -> nn.Sequential:
    """The CNN kept at `path`, or one fitted on `count` renders (one-cycle Adam) and saved there."""
    torch.manual_seed(0)
    cnn = small_cnn()
    if path.exists():
        cnn.load_state_dict(torch.load(path))
        return cnn.eval()
    images, modes = rendered(count, TRAIN_SEED)
    steps_per_epoch = -(-count // batch)
    opt = torch.optim.Adam(cnn.parameters(), 2e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * steps_per_epoch)
    for _ in range(epochs):
        for index in torch.randperm(count).split(batch):
            loss = F.cross_entropy(cnn(thumbnails(images[index])), modes[index])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    torch.save(cnn.state_dict(), path)
    return cnn.eval()


def reading(cnn: nn.Sequential, svc, images: torch.Tensor) -> dict:  # noqa: ANN001 (a pgan ModeClassifier)
    """Both classifiers' modes of `images`, and how often they agree."""
    with torch.no_grad():
        probs = torch.cat([F.softmax(cnn(part), 1) for part in thumbnails(images).split(512)])
    by_cnn, by_svc = probs.argmax(1), svc.predict(images)
    shares = torch.bincount(by_cnn // len(COLOURS), minlength=len(SHAPES)).double() / len(images)
    return {
        "cnn": mode_coverage(by_cnn, NUM_MODES),
        "svc_8px": mode_coverage(by_svc, NUM_MODES),
        "cnn_shape_share": dict(zip(SHAPES, shares.tolist(), strict=True)),
        "cnn_confidence": probs.max(1).values.mean().item(),
        "agree_shape": (by_cnn // len(COLOURS) == by_svc // len(COLOURS)).double().mean().item(),
        "agree_colour": (by_cnn % len(COLOURS) == by_svc % len(COLOURS)).double().mean().item(),
    } | colour_purity(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--num", type=int, default=2000, help="G_ema samples per checkpoint")
    parser.add_argument("--seed", type=int, default=0, help="pgan-sample's latent seed")
    parser.add_argument("--cnn", type=Path, default=Path("/tmp/shapes-cnn16.pt"), help="where the fitted CNN is kept")
    args = parser.parse_args()
    cnn, svc = fitted_cnn(args.cnn), train_shapes_classifier()
    real_images, real_modes = rendered(2000, TEST_SEED)
    with torch.no_grad():
        accuracy = (cnn(thumbnails(real_images)).argmax(1) == real_modes).double().mean().item()
    real = {"checkpoint": "real shapes (held out)", "cnn_accuracy": accuracy}
    print(json.dumps(real | reading(cnn, svc, real_images)))
    for path in args.checkpoints:
        G, alpha = load_generator(path)
        fakes = generate(G, seeded_latents(args.seed, args.num, G.latent_dim), alpha).clamp(-1, 1)
        where = {"checkpoint": str(path), "resolution": fakes.shape[-1]}
        print(json.dumps(where | reading(cnn, svc, fakes)), flush=True)


if __name__ == "__main__":
    main()
