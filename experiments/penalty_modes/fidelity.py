"""How close is `loss.penalty_mode=approx` to the exact R1 / R2 on trained discriminators?

    python experiments/penalty_modes/fidelity.py RUN_DIR [--out results/fidelity.json] [--draws 8] [--n 64]

For every stage of a pgan run (its final.pt: D, and G_ema for the fakes), at the stage's own data: the exact
zero-centred penalty E||grad D(x)||^2 (double backward, fp32) at n real and n generated images, and its
finite-difference estimates E[slope^2], averaged over `draws` draws of eps ~ N(0, I):
- one-sided: slope = (D(x + sigma eps) - D(x)) / sigma;
- central (what pgan uses): slope = (D(x + sigma eps) - D(x - sigma eps)) / (2 sigma);
each with D in fp32 and under bf16 autocast, for several sigma. Printed and written: estimate / exact.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pgan.checkpoint import load_checkpoint
from pgan.data import make_dataset
from pgan.networks import networks_from

SIGMAS = (0.003, 0.01, 0.03, 0.1)


def mean_squared_slope(D, x: torch.Tensor, sigma: float, central: bool, bf16: bool, draws: int) -> float:
    """E[slope^2] over the images and `draws` draws of eps."""
    total = 0.0
    for _ in range(draws):
        eps = torch.randn_like(x)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            plus = D(x + sigma * eps, 1.0).float()
            minus = D(x - sigma * eps, 1.0).float() if central else D(x, 1.0).float()
        total += ((plus - minus) / (2 * sigma if central else sigma)).square().mean().item()
    return total / draws


def exact_squared_gradient(D, x: torch.Tensor) -> float:
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(D(x, 1.0).sum(), x)
    return grad.flatten(1).square().sum(1).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fidelity.json")
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--n", type=int, default=64, help="real and generated images per stage")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for final in sorted(args.run.glob("stage-*/final.pt")):
        ckpt = load_checkpoint(final)
        resolution, config = ckpt["resolution"], ckpt["config"]
        if resolution < 16:
            continue
        G, D = networks_from(config["model"], resolution, 0)
        G.load_state_dict(ckpt["G_ema"])
        D.load_state_dict(ckpt["D"])
        D = D.to(memory_format=torch.channels_last)
        dataset = make_dataset(config["data"], resolution)
        reals = torch.stack([dataset[i] for i in range(args.n)])
        with torch.no_grad():
            fakes = G(torch.randn(args.n, G.latent_dim), 1.0)
        for where, x in (("reals", reals), ("fakes", fakes)):
            exact = exact_squared_gradient(D, x)
            for central in (False, True):
                for bf16 in (False, True):
                    ratios = {
                        str(sigma): round(mean_squared_slope(D, x, sigma, central, bf16, args.draws) / exact, 3)
                        for sigma in SIGMAS
                    }
                    row = {
                        "resolution": resolution,
                        "at": where,
                        "difference": "central" if central else "one-sided",
                        "precision": "bf16" if bf16 else "fp32",
                        "exact": round(exact, 5),
                        "estimate_over_exact": ratios,
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"run": str(args.run), "draws": args.draws, "n": args.n, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
