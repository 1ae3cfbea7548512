"""What generating evaluation samples and their MS-SSIM cost on a CPU, by the size of each pass.

    python experiments/throughput/eval_cost.py [--repeats 3] [--out results/eval_cost_cpu.jsonl]

Two parts of every collapse-watch evaluation (and of pgan-eval / pgan-sample's generation) grow with the
resolution: G_ema's forward passes for 512 latents (`evaluation_samples`) and the MS-SSIM of 256 disjoint
pairs of 512 images (`pairwise_ms_ssim`). Each is timed at several pass sizes, the median of `repeats`
interleaved runs on random inputs: G at 1 to 512 images a pass (up to 2**22 pixels a pass) for the small
model at 32-256 px and the wide one at 32 px (`act` below: G's largest feature map of one image, channels
x pixels, `pgan.networks.largest_activation`), MS-SSIM at 2**19, 2**20 and 2**24 elements a chunk. The
defaults chosen from it: `pgan.networks.eval_chunk` (2**21 elements of `act` a pass) and `pairwise_ms_ssim`'s
max_elements (2**20). One JSON line per setting, and a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from pgan.cli import CONFIG_DIR
from pgan.metrics.diversity import pairwise_ms_ssim
from pgan.networks import largest_activation
from pgan.train.state import build_models
from pgan.train.watch import evaluation_samples

SAMPLES = 512  # diversity.num_samples and num_real, the defaults
CASES = [("small", 32), ("small", 64), ("small", 128), ("small", 256), ("wide", 32)]


def seconds(fn) -> float:
    """Wall time of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def generator_rows(model: str, resolution: int, repeats: int) -> list[dict]:
    """Median seconds for 512 samples of the `model` preset's G at each pass size, interleaved per repeat."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose("train", overrides=[f"model={model}"])
    G, _ = build_models(cfg.model, resolution, torch.device("cpu"))
    z = torch.randn(SAMPLES, int(cfg.model.latent_dim), generator=torch.Generator().manual_seed(0))
    chunks = [c for c in (2**i for i in range(10)) if c * resolution**2 <= 2**22]
    runs: dict[int, list[float]] = {c: [] for c in chunks}
    for _ in range(repeats):
        for chunk in chunks:
            runs[chunk].append(
                seconds(lambda chunk=chunk: evaluation_samples(G, z, 1.0, contextlib.nullcontext(), chunk))
            )
    return [
        {
            "part": "G_ema samples",
            "model": model,
            "resolution": resolution,
            "largest_activation": largest_activation(G),
            "per_pass": chunk,
            "unit": "images",
            "median_s": round(statistics.median(times), 3),
            "runs_s": [round(t, 3) for t in times],
        }
        for chunk, times in runs.items()
    ]


def msssim_rows(resolution: int, repeats: int) -> list[dict]:
    """Median seconds of the MS-SSIM of 256 pairs at each chunk size, interleaved per repeat."""
    images = torch.rand(SAMPLES, 3, resolution, resolution, generator=torch.Generator().manual_seed(1)) * 2 - 1
    runs: dict[int, list[float]] = {2**19: [], 2**20: [], 2**24: []}
    for _ in range(repeats):
        for elements, times in runs.items():
            times.append(seconds(lambda elements=elements: pairwise_ms_ssim(images, max_elements=elements)))
    return [
        {
            "part": "pairwise MS-SSIM",
            "resolution": resolution,
            "per_pass": elements,
            "unit": "elements",
            "median_s": round(statistics.median(times), 3),
            "runs_s": [round(t, 3) for t in times],
        }
        for elements, times in runs.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "eval_cost_cpu.jsonl")
    args = parser.parse_args()
    rows = [row for model, res in CASES for row in generator_rows(model, res, args.repeats)]
    rows += [row for res in (128, 256) for row in msssim_rows(res, args.repeats)]
    for row in rows:
        row["threads"] = torch.get_num_threads()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print("| part | model | px | act | per pass | median s |\n|---|---|---|---|---|---|")
    for r in rows:
        act = f"2^{r['largest_activation'].bit_length() - 1}" if "largest_activation" in r else ""
        size = f"{r['per_pass']} images" if r["unit"] == "images" else f"2^{r['per_pass'].bit_length() - 1} elements"
        cells = [r["part"], r.get("model", ""), r["resolution"], act, size, f"{r['median_s']:.2f}"]
        print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
