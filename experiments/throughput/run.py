"""pgan's training iteration against the peer, `pro-gan-pth` (the PyPI ProGAN package), side by side.

    pip install --no-deps pro-gan-pth==3.4   # into the same venv; --no-deps keeps our torch (it pins 1.10)
    python experiments/throughput/run.py --device cpu --resolutions 32 64 128 --batch 16

Both run in this one process, on the same machine, with the same channel widths (the peer's `nf` is
replaced by our `small` preset's table: its fmap_base is a module constant), latent size 128, batch,
WGAN-GP loss (drift 0.001, lambda 10), Adam(0, 0.99) and EMA. They are timed in turns
(`pgan.bench.interleaved_step_seconds`): after `warmup` iterations of each, `rounds` rounds in which pgan's
variants and the peer each run `steps` iterations, so that all of them meet the machine in the same state;
each one's img/s is the median over rounds, and each speedup the median of the rounds' ratios, with their
lowest and highest. One peer iteration is what its `ProGAN.train` does per batch: `optimize_discriminator`,
`update_average`, `optimize_generator` (one shared latent batch, `.item()` and a finiteness check of every
gradient per step, as the package does). FLOPs of both are counted with pgan.bench.IterationFlops over one
iteration (pgan's: over one lazy-regularisation cycle, per iteration).

The shim the peer needs on current torch (ConvTranspose2d._output_padding gained arguments since 1.10)
is applied here, not in pgan. Results: results/side_by_side_<device>.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import itertools
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.nn import ConvTranspose2d

from pgan.bench import IterationFlops, interleaved_step_seconds, matmul_ceiling_gflops, ratio_per_round
from pgan.losses import make_loss
from pgan.networks import channels_for
from pgan.runtime import autocast_for, resolve_precision
from pgan.schedule import ema_beta
from pgan.train.state import build_models, build_optimizers
from pgan.train.step import fast_networks, train_step

HERE = Path(__file__).resolve().parent
CONF_DIR = str(HERE.parents[1] / "conf")
LATENT = 128
SMALL = {"fmap_base": 512, "fmap_max": 64, "fmap_min": 16}  # conf/model/small.yaml


def load_peer():
    """Import pro_gan_pytorch with the compatibility shim and our channel table."""
    import pro_gan_pytorch.custom_layers as layers
    import pro_gan_pytorch.networks as networks
    from pro_gan_pytorch.gan import ProGAN
    from pro_gan_pytorch.losses import WganGP

    original = ConvTranspose2d._output_padding

    def output_padding(self, input, output_size, stride, padding, kernel_size, num_spatial_dims=2, dilation=None):
        # torch >= 1.12 added num_spatial_dims (and dilation) to this private method; the peer calls it
        # with the 1.10 signature.
        return original(self, input, output_size, stride, padding, kernel_size, num_spatial_dims, dilation)

    layers.EqualizedConvTranspose2d._output_padding = output_padding
    # The peer's widths are nf(stage) with module-level defaults (fmap_base 16384, max 512); ours are the
    # small preset's. Both index stages the same way (stage 1 = 4 px).
    networks.nf = lambda stage, **_: channels_for(2 ** (stage + 1), **SMALL)
    return networks, layers, ProGAN, WganGP


# pgan's variants: pgan-train overrides of each. `default` is the iteration `pgan-train` runs with no overrides
# (today: rpgan with lazy R1 / R2 every 4th iteration, with bf16 autocast on CPUs with native bf16); `every_step`
# the default before 2026-12-06's last change (R1 / R2 on every D step); `wgan_gp` does the peer's work (its
# loss) in pgan's default precision; `wgan_gp_fp32` the same in the peer's precision.
VARIANTS = {
    "default": [],
    "every_step": ["loss.penalty_every=1"],
    "wgan_gp": ["loss=wgan_gp"],
    "wgan_gp_fp32": ["loss=wgan_gp", "precision=fp32"],
    "approx": ["loss.penalty_mode=approx"],
    "lazy4": ["loss.penalty_every=4"],
    "wgan_gp_lazy4": ["loss=wgan_gp", "loss.penalty_every=4"],
    "reuse_fakes": ["speed.reuse_fakes=true"],
    "compile": ["speed.compile=true"],
    "approx_compile": ["loss.penalty_mode=approx", "speed.compile=true"],
}


def train_config(*overrides: str, model: str = "small"):
    """pgan-train's config with `overrides`; the `small` model with the peer's latent size, or another preset as is."""
    preset = ["model=small", f"model.latent_dim={LATENT}"] if model == "small" else [f"model={model}"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=[*preset, *overrides])


def our_iteration(resolution: int, batch: int, alpha: float, device: torch.device, variant: str, model: str = "small"):
    """pgan's training iteration for `variant` with `model` (`small`: the peer's widths), ready to call; its networks
    and loss."""
    cfg = train_config(*VARIANTS[variant], model=model)
    use_bf16 = resolve_precision(cfg.precision, device)
    autocast = autocast_for(device, use_bf16)
    loss = make_loss(**OmegaConf.to_container(cfg.loss, resolve=True)).for_precision(use_bf16)
    torch.manual_seed(0)
    G, D = build_models(OmegaConf.to_container(cfg.model, resolve=True), resolution, device)
    G_ema = copy.deepcopy(G).requires_grad_(False)
    opt_G, opt_D = build_optimizers(G, D, 0.001, loss.lazy_ratio)
    reals = (torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1).contiguous(
        memory_format=torch.channels_last
    )
    beta = ema_beta(batch, 10.0)
    count = itertools.count()
    G_fast, D_fast = fast_networks(G, D, bool(cfg.speed.compile), str(cfg.speed.compile_mode))
    reuse = bool(cfg.speed.reuse_fakes)

    def step(fast: bool = True) -> None:
        nets = (G_fast, D_fast) if fast else (G, D)
        fixed = (G_ema, opt_G, opt_D, loss, reals, alpha, beta, autocast)
        train_step(*nets, *fixed, step_index=next(count), eager_D=D, reuse_fakes=reuse)

    return step, G, D, loss, use_bf16


@dataclass
class Contender:
    """One side of the comparison: its training iteration, ready to call, and what is known of it besides its
    speed."""

    step: Callable[[], None]
    facts: dict


def ours(resolution: int, batch: int, alpha: float, device: torch.device, variant: str = "default") -> Contender:
    step, G, D, loss, use_bf16 = our_iteration(resolution, batch, alpha, device, variant)
    t0 = time.perf_counter()
    step()  # the compile variants compile here
    first_step_s = time.perf_counter() - t0
    with IterationFlops() as flops:
        for _ in range(loss.penalty_every):
            step(fast=False)  # the same operations, uncompiled (FlopCounter cannot see inside compiled code)
    return Contender(
        step,
        {
            "gflop_per_img": flops.total / loss.penalty_every / batch / 1e9,
            "first_step_s": first_step_s,
            "loss": loss.name,
            "penalty_mode": loss.penalty_mode,
            "penalty_every": loss.penalty_every,
            "precision": "bf16" if use_bf16 else "fp32",
            "params_g": sum(p.numel() for p in G.parameters()),
            "params_d": sum(p.numel() for p in D.parameters()),
        },
    )


def profile_table(resolution: int, batch: int, device: torch.device, args, rows: int = 20) -> str:
    """torch.profiler's per-op table (self time) of pgan's default iteration at `resolution`, alpha 1."""
    step, *_ = our_iteration(resolution, batch, 1.0, device, "default")
    for _ in range(args.warmup):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=48)


def peer(resolution: int, batch: int, alpha: float, device: torch.device) -> Contender:
    networks, layers, ProGAN, WganGP = load_peer()
    depth = resolution.bit_length() - 1  # the peer's depth: 2 = 4 px, log2(resolution) in general
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints both networks
        gan = ProGAN(networks.Generator(depth, 3, LATENT), networks.Discriminator(depth, 3, LATENT), device=device)
    # What ProGAN.train builds, but betas as floats: its (0, 0.99) is refused by current torch ("betas must be
    # either both floats or both Tensors") - the second part of the shim.
    kwargs = dict(lr=0.001, betas=(0.0, 0.99), eps=1e-8)
    gen_optim = torch.optim.Adam(gan.gen.parameters(), **kwargs)
    dis_optim = torch.optim.Adam(gan.dis.parameters(), **kwargs)
    loss = WganGP()
    images = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1
    beta = ema_beta(batch, 10.0)

    def step() -> None:
        noise = torch.randn(batch, LATENT, device=device)
        gan.optimize_discriminator(loss, dis_optim, noise, images, depth, alpha)
        layers.update_average(gan.gen_shadow, gan.gen, beta=beta)
        gan.optimize_generator(loss, gen_optim, noise, images, depth, alpha)

    with IterationFlops() as flops:
        step()
    return Contender(
        step,
        {
            "gflop_per_img": flops.total / batch / 1e9,
            "params_g": sum(p.numel() for p in gan.gen.parameters()),
            "params_d": sum(p.numel() for p in gan.dis.parameters()),
        },
    )


def check_steps(steps: int, variants: list[str]) -> None:
    """Exit unless `steps` iterations a round hold whole periods of every variant's lazy penalties, so that every
    round has the same share of penalty steps."""
    every = math.lcm(*(int(train_config(*VARIANTS[v]).loss.penalty_every) for v in variants))
    if steps % every:
        raise SystemExit(f"--steps {steps}: must be a multiple of {every} (the lazy penalties' period)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--alphas", type=float, nargs="+", default=[1.0, 0.5])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=7, help="rounds of timing in turns")
    parser.add_argument("--steps", type=int, default=8, help="iterations of each side per round")
    parser.add_argument("--variants", nargs="+", default=["default"], choices=list(VARIANTS), help="pgan's settings")
    parser.add_argument("--profile", type=int, default=None, help="also write the per-op profile at this px")
    parser.add_argument("--profile-only", action="store_true", help="the profile, no side-by-side measurement")
    parser.add_argument("--tag", default="", help="appended to the result file's name (another machine's run)")
    args = parser.parse_args()
    check_steps(args.steps, args.variants)
    device = torch.device(args.device)
    (HERE / "results").mkdir(exist_ok=True)
    if args.profile:
        table = profile_table(args.profile, args.batch, device, args)
        (HERE / "results" / f"profile_{device.type}_{args.profile}px.txt").write_text(table + "\n")
        print(table, flush=True)
        if args.profile_only:
            return
    size = 8192 if device.type == "cuda" else 4096
    ceilings = {"fp32": matmul_ceiling_gflops(device, torch.float32, size)}
    if resolve_precision("auto", device):
        ceilings["bf16"] = matmul_ceiling_gflops(device, torch.bfloat16, size)
    rows = []
    for res in args.resolutions:
        for alpha in args.alphas:
            sides = {v: ours(res, args.batch, alpha, device, v) for v in args.variants}
            sides["peer"] = peer(res, args.batch, alpha, device)
            seconds = interleaved_step_seconds(
                {name: side.step for name, side in sides.items()}, device, args.warmup, args.rounds, args.steps
            )
            measured = {}
            for name, side in sides.items():
                img_per_s = args.batch / statistics.median(seconds[name])
                measured[name] = {**side.facts, "img_per_s": img_per_s, "seconds_per_step": seconds[name]}
                if name != "peer":
                    median, low, high = ratio_per_round(seconds["peer"], seconds[name])
                    measured[name] |= {"speedup": median, "speedup_range": [low, high]}
            a, b = measured[args.variants[0]], measured.pop("peer")
            row = {
                "resolution": res,
                "alpha": alpha,
                "batch_size": args.batch,
                "rounds": args.rounds,
                "steps_per_round": args.steps,
                "pgan": a,
                "peer": b,
                "speedup": a["speedup"],
                "speedup_range": a["speedup_range"],
                "pgan_mfu": a["img_per_s"] * a["gflop_per_img"] / ceilings[a["precision"]],  # its precision's
                "peer_mfu": b["img_per_s"] * b["gflop_per_img"] / ceilings["fp32"],
                "variants": measured,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = {
        "device": args.device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "ceiling_gflops": ceilings,
        "rows": rows,
    }
    out["variants"] = {v: VARIANTS[v] for v in args.variants}
    suffix = "" if args.variants[0] == "default" else f"_{args.variants[0]}"
    (HERE / "results" / f"side_by_side_{device.type}{suffix}{args.tag}.json").write_text(
        json.dumps(out, indent=2) + "\n"
    )
    shown = ", ".join(f"{k} {v:.0f}" for k, v in ceilings.items())
    print(f"\nceilings (GFLOP/s, a {size}² matmul, best of 10): {shown}; torch {torch.__version__}\n")
    print(
        f"{args.rounds} rounds of {args.steps} iterations each, in turns; img/s: the median round; speedup: the "
        "median of the rounds' ratios (lowest-highest)\n"
    )
    print("| px | alpha | pgan img/s | peer img/s | speedup | pgan GFLOP/img | peer GFLOP/img | pgan MFU | peer MFU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        low, high = r["speedup_range"]
        print(
            f"| {r['resolution']} | {r['alpha']:g} | {r['pgan']['img_per_s']:.1f} | {r['peer']['img_per_s']:.1f} "
            f"| {r['speedup']:.2f}x ({low:.2f}-{high:.2f}) | {r['pgan']['gflop_per_img']:.3f} "
            f"| {r['peer']['gflop_per_img']:.3f} | {100 * r['pgan_mfu']:.0f}% | {100 * r['peer_mfu']:.0f}% |"
        )
    if len(args.variants) > 1:
        header = " | ".join(f"{v} img/s (× peer)" for v in args.variants)
        print(f"\n| px | alpha | {header} | compile: first step s |")
        print("|---|---|" + "---|" * (len(args.variants) + 1))
        for r in rows:
            cells = [f"{x['img_per_s']:.1f} ({x['speedup']:.2f}×)" for x in r["variants"].values()]
            first = max((x["first_step_s"] for v, x in r["variants"].items() if "compile" in v), default=None)
            compile_cell = f"{first:.1f}" if first is not None else "-"
            print(f"| {r['resolution']} | {r['alpha']:g} | " + " | ".join(cells) + f" | {compile_cell} |")


if __name__ == "__main__":
    main()
