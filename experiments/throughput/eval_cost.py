"""What the collapse watch's evaluation costs at 128 and 256 px, by the size of its passes (CPU).

    python experiments/throughput/eval_cost.py [--resolutions 128 256] [--repeats 3] [--out results/eval_cost_cpu.jsonl]

Times the two parts of an evaluation that grow with the resolution, each the median of `repeats` interleaved
runs on random inputs: G_ema's forward passes for the watch's 512 fixed latents (`evaluation_samples`, the
small model) at 2**18, 2**19 and 2**21 pixels a pass, and the MS-SSIM of 256 disjoint pairs of 512 images
(`pairwise_ms_ssim`) at 2**19, 2**20 and 2**24 elements a chunk. The defaults (`pgan.networks.eval_chunk`,
`pairwise_ms_ssim`'s max_elements) are 2**18 and 2**20 on a CPU. One JSON line per resolution and setting.
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
from pgan.train.state import build_models
from pgan.train.watch import evaluation_samples

SAMPLES = 512  # diversity.num_samples and num_real, the defaults


def seconds(fn) -> float:
    """Wall time of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(resolution: int, repeats: int) -> list[dict]:
    """Median seconds of each setting at one resolution, the settings interleaved within every repeat."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose("train")
    G, _ = build_models(cfg.model, resolution, torch.device("cpu"))
    z = torch.randn(SAMPLES, int(cfg.model.latent_dim), generator=torch.Generator().manual_seed(0))
    images = torch.rand(SAMPLES, 3, resolution, resolution, generator=torch.Generator().manual_seed(1)) * 2 - 1
    no_autocast = contextlib.nullcontext()
    runs: dict[tuple[str, int], list[float]] = {}
    for _ in range(repeats):
        for pixels in (2**18, 2**19, 2**21):
            chunk = max(1, pixels // resolution**2)
            runs.setdefault(("G_ema samples", pixels), []).append(
                seconds(lambda chunk=chunk: evaluation_samples(G, z, 1.0, no_autocast, chunk))
            )
        for elements in (2**19, 2**20, 2**24):
            runs.setdefault(("pairwise MS-SSIM", elements), []).append(
                seconds(lambda elements=elements: pairwise_ms_ssim(images, max_elements=elements))
            )
    return [
        {
            "resolution": resolution,
            "part": part,
            "per_pass": size,
            "unit": "pixels" if part.startswith("G") else "elements",
            "median_s": round(statistics.median(times), 3),
            "runs_s": [round(t, 3) for t in times],
            "threads": torch.get_num_threads(),
        }
        for (part, size), times in runs.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "eval_cost_cpu.jsonl")
    args = parser.parse_args()
    rows = [row for res in args.resolutions for row in measure(res, args.repeats)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print("| px | part | per pass | median s |\n|---|---|---|---|")
    for r in rows:
        size = f"2^{r['per_pass'].bit_length() - 1} {r['unit']}"
        print(f"| {r['resolution']} | {r['part']} | {size} | {r['median_s']:.2f} |")


if __name__ == "__main__":
    main()
