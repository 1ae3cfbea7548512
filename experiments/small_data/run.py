"""Small data: 1,000 images at 128 px, with and without augmentation, conditional and unconditional.

    python experiments/small_data/run.py --out DIR [--recipe default|2026-11] [--device cpu|cuda] [--parallel 2]
        [--kimg 1.0] [--seeds 0 1 2] [--only NAMES]
    python experiments/small_data/report.py DIR --plot FILE.png --per-class    # README.md's tables and plot

Every arm is a `pgan-train` run to 128 px of the small model, with one of two recipes:
- default: pgan's defaults (the `quick` schedule 8 -> 128 px, its last stage dropped; `loss=rpgan`; the small
  model's 16-channel floor), as chosen in experiments/quality;
- 2026-11: the recipe of the first table in README.md (32 -> 64 -> 128 px, `--kimg` scales its stages, WGAN-GP,
  lr 0.001 / 0.002, the small model with an 8-channel floor).
It runs on one of two 1,000-image sets:
- shapes: the first 1,000 items of the procedural shapes (16 known modes, which are also its classes);
- photos: a folder the script builds from scikit-learn's two bundled photographs (china.jpg, flower.jpg):
  500 random square crops of each, in the class sub-folders china/ and flower/.
Arms: {no augmentation, adaptive augmentation} x seeds, and conditional (model.conditional=true) x seeds,
on shapes; unconditional and conditional on photos. Runs go in parallel (--parallel) as subprocesses.

After each run: `pgan-eval` of its final G_ema (random-feature FID, SWD, precision / recall, coverage, and on
shapes the 16 modes, with class accuracy for the conditional runs) against 1,000 real images, and for the
photos a classifier (logistic regression on 8x8 colour thumbnails of the real crops) reads the class of the
conditional samples back. Everything lands in DIR/summary.json; the collapse detector's verdicts over time
are in each run's collapse.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

SIZE = 1000  # images per dataset
RESOLUTION = 128
CROPS = ("china", "flower")
AUGMENT = [
    "augment.policy=[color,translation,cutout]",
    "augment.adaptive=true",
    "augment.p=0.0",
    # ADA's 500 kimg for p to go 0 -> 1 suits runs of thousands of kimg; these runs are tens of kimg.
    "augment.adjust_kimg=5",
]


def recipe(name: str, kimg: float) -> list[str]:
    """The pgan-train overrides of a recipe (module docstring). For `2026-11`, `kimg` scales every stage (1.0:
    4 + (2 + 4) + (2 + 12) kimg, most of it at 128 px, so D sees each of the 1,000 images a dozen times at the
    resolution where small datasets collapse); the default recipe's stages are the quick schedule's."""
    if name == "default":
        return ["schedule.resolutions=[8,16,32,64,128]"]
    k = lambda v: round(v * kimg, 3)  # noqa: E731
    return [
        "loss=wgan_gp",
        "model.fmap_min=8",
        "schedule.resolutions=[32,64,128]",
        f"schedule.fade_kimg={{64: {k(2)}, 128: {k(2)}}}",
        f"schedule.stable_kimg={{32: {k(4)}, 64: {k(4)}, 128: {k(12)}}}",
        "schedule.batch_size=16",
        "schedule.lr={32: 0.001, 64: 0.002, 128: 0.002}",
        "schedule.ema_kimg=0.1",
    ]


def build_photos(root: Path, seed: int = 0) -> Path:
    """SIZE / 2 random square crops (96 to 320 px, resized to 128) of each bundled photo, in class folders."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    if (root / CROPS[-1]).is_dir() and len(list((root / CROPS[-1]).glob("*.png"))) == SIZE // 2:
        return root
    rng = np.random.default_rng(seed)
    photos = load_sample_images()
    for name, path, pixels in zip(CROPS, photos.filenames, photos.images, strict=True):
        assert Path(path).stem == name
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        height, width = pixels.shape[:2]
        for i in range(SIZE // 2):
            side = int(rng.integers(96, 321))
            top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
            crop = Image.fromarray(pixels[top : top + side, left : left + side])
            crop.resize((RESOLUTION, RESOLUTION), Image.Resampling.LANCZOS).save(folder / f"{i:04d}.png")
    return root


def arms(seeds: list[int], photos: Path) -> dict[str, list[str]]:
    """Run name -> the pgan-train overrides that differ between arms."""
    shapes = ["data=shapes", f"data.size={SIZE}"]
    folder = ["data=folder", f"data.path={photos}", "data.num_workers=2"]
    runs = {}
    for seed in seeds:
        runs[f"shapes-plain-s{seed}"] = [*shapes, f"seed={seed}"]
        runs[f"shapes-augment-s{seed}"] = [*shapes, *AUGMENT, f"seed={seed}"]
        runs[f"shapes-conditional-s{seed}"] = [*shapes, "model.conditional=true", f"seed={seed}"]
        runs[f"photos-plain-s{seed}"] = [*folder, f"seed={seed}"]
        runs[f"photos-conditional-s{seed}"] = [*folder, "model.conditional=true", f"seed={seed}"]
    return runs


def python_module(module: str, *args: str, log: Path) -> float:
    """Run `python -m module args` with its output in `log`; returns the wall time in s (raises on failure)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        result = subprocess.run(
            [sys.executable, "-m", module, *args], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    if result.returncode:
        raise RuntimeError(f"{module} failed ({result.returncode}): see {log}")
    return time.perf_counter() - start


def train_and_evaluate(name: str, overrides: list[str], out: Path, device: str, steps: list[str]) -> dict:
    """One arm: pgan-train with the recipe's `steps`, then pgan-eval of its last final.pt; its summary row."""
    run_dir = out / "runs" / name
    common = [
        *steps,
        f"device={device}",
        "log.progress_bar=false",
        "log.image_every_kimg=2.0",
        "checkpoint.every_kimg=4.0",
        "diversity.every_kimg=1.0",
    ]
    run_dir.mkdir(parents=True, exist_ok=True)
    seconds = python_module(
        "pgan.cli.train", *overrides, *common, f"hydra.run.dir={run_dir}", log=run_dir / "train.log"
    )
    final = run_dir / f"stage-{RESOLUTION:04d}" / "final.pt"
    data = [o for o in overrides if o.startswith("data")]
    shapes = "data=shapes" in overrides
    metrics = "[fid,swd,pr,coverage,modes]" if shapes else "[fid,swd,pr,coverage]"
    eval_args = [f"ckpt={final}", f"metrics={metrics}", "features=random", f"num_fake={SIZE}", f"num_real={SIZE}"]
    python_module("pgan.cli.eval", *eval_args, *data, f"device={device}", log=run_dir / "eval.log")
    result = json.loads((run_dir / "eval.log").read_text().strip().splitlines()[-1])
    row = {"name": name, "train_s": round(seconds, 1), "eval": result}
    if not shapes and "model.conditional=true" in overrides:
        row["eval"]["class_accuracy"] = photo_class_accuracy(final, out / "photos", device)
    return row


def photo_class_accuracy(final: Path, photos: Path, device: str) -> float:
    """How often a logistic regression fitted on the real crops' 8x8 colour thumbnails reads a conditional
    sample of class c as c (1,000 samples, every class in turn)."""
    import torch
    import torch.nn.functional as F
    from sklearn.linear_model import LogisticRegression

    from pgan.data import FolderDataset, class_labels
    from pgan.export import load_generator
    from pgan.networks import cycle_labels
    from pgan.sample import generate, seeded_latents

    reals = FolderDataset(photos, 32)
    labels = class_labels(reals).labels
    thumbs = torch.stack([reals[i] for i in range(len(reals))])
    features = F.adaptive_avg_pool2d(thumbs, 8).flatten(1).numpy()
    classifier = LogisticRegression(max_iter=2000).fit(features, labels)
    G, alpha = load_generator(final)
    G = G.to("cuda" if device == "cuda" else "cpu")
    fakes = generate(G, seeded_latents(0, SIZE, G.latent_dim), alpha).clamp(-1, 1)
    predicted = classifier.predict(F.adaptive_avg_pool2d(fakes, 8).flatten(1).numpy())
    wanted = cycle_labels(SIZE, G.num_classes).numpy()
    return float((predicted == wanted).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipe", choices=["default", "2026-11"], default="default")
    parser.add_argument("--kimg", type=float, default=1.0, help="scales every stage's kimg (recipe 2026-11)")
    parser.add_argument("--only", nargs="*", help="run names to run (default: all)")
    args = parser.parse_args()
    out = args.out.resolve()
    photos = build_photos(out / "photos")
    todo = {k: v for k, v in arms(args.seeds, photos).items() if not args.only or k in args.only}
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.parallel)))
    steps = recipe(args.recipe, args.kimg)
    start = time.perf_counter()
    with ThreadPoolExecutor(args.parallel) as pool:
        futures = {name: pool.submit(train_and_evaluate, name, o, out, args.device, steps) for name, o in todo.items()}
        rows = []
        for name, future in futures.items():
            try:
                rows.append(future.result())
            except Exception as exc:  # one failed arm is reported, the others still count
                rows.append({"name": name, "error": str(exc)})
            print(json.dumps(rows[-1]), flush=True)
    summary = {
        "recipe": args.recipe,
        "kimg_scale": args.kimg,
        "device": args.device,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    # Runs of earlier invocations into the same DIR stay in the summary unless this one ran them again.
    earlier = json.loads((out / "summary.json").read_text())["runs"] if (out / "summary.json").is_file() else []
    rows = [r for r in earlier if r["name"] not in todo] + rows
    (out / "summary.json").write_text(json.dumps({**summary, "runs": rows}, indent=1) + "\n")
    print(f"done in {summary['wall_s']} s: {out / 'summary.json'}")


if __name__ == "__main__":
    main()
