"""Images/s of pgan-train against the number of data-parallel processes (torchrun), and what the gradient
all-reduce costs.

    python experiments/scaling/run.py --nprocs 1 2

For each process count, one `torchrun --standalone --nproc_per_node=N -m pgan.train` run of one stage
(small model, 32 px, global batch 16, stable only) on the CPU with gloo; the images/s of the run are the
median of its log ticks after the first (`Speed/img_per_s` in stats.jsonl, the wall-clock rate of the whole
loop: data, step, all-reduces). Each rank gets `threads / N` intra-op threads, so every row uses the same
cores. Then: the bytes one step's all-reduces move (G's and D's gradients, float32, plus the two losses),
and the time of those all-reduces measured alone (2 gloo processes, the same sizes). Results:
results/scaling_cpu.json, a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
RESOLUTION = 32
BATCH = 16
RUN = [
    "model=small",
    f"schedule.resolutions=[{RESOLUTION}]",
    f"schedule.batch_size={BATCH}",
    "schedule.stable_kimg=1.536",
    "log.tick_kimg=0.128",
    "log.image_every_kimg=100",
    "log.progress_bar=false",
    "checkpoint.every_kimg=100",
    "diversity.enabled=false",
    "data.num_workers=1",
    "device=cpu",
]


def run_training(nproc: int, threads: int, out: Path) -> dict:
    """One torchrun run with `nproc` processes; images/s from its ticks."""
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / f"nproc{nproc}"
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // nproc))}
    args = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "-m", "pgan.train", *RUN]
    t0 = time.perf_counter()
    subprocess.run([*args, f"hydra.run.dir={run_dir}"], check=True, env=env, capture_output=True, cwd=out)
    wall_s = time.perf_counter() - t0
    rows = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    rates = [r["Speed/img_per_s"] for r in rows[1:]]  # the first tick includes start-up
    return {
        "nproc": nproc,
        "threads_per_rank": max(1, threads // nproc),
        "img_per_s": statistics.median(rates),
        "ticks": len(rates),
        "wall_s": wall_s,
    }


def gradient_numels() -> tuple[int, int]:
    """Number of gradient elements of G and D at RESOLUTION with the small model."""
    from hydra import compose, initialize_config_dir

    from pgan.networks import networks_from

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["model=small"])
    G, D = networks_from(cfg.model, RESOLUTION)
    return sum(p.numel() for p in G.parameters()), sum(p.numel() for p in D.parameters())


def _time_allreduce(rank: int, world: int, sizes: list[int], repeats: int, port: int, result_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    buffers = [torch.randn(n) for n in sizes]
    for buf in buffers:  # warm-up
        dist.all_reduce(buf)
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        for buf in buffers:
            dist.all_reduce(buf)
        times.append(time.perf_counter() - t0)
    if rank == 0:
        Path(result_file).write_text(json.dumps(statistics.median(times)))
    dist.destroy_process_group()


def allreduce_seconds(sizes: list[int], world: int = 2, repeats: int = 50) -> float:
    """Median seconds of one step's all-reduces (one per optimizer step) between `world` gloo processes."""
    with tempfile.NamedTemporaryFile(suffix=".json") as handle:
        mp.spawn(_time_allreduce, args=(world, sizes, repeats, 29517, handle.name), nprocs=world)
        return float(json.loads(Path(handle.name).read_text()))


# Assumptions of the 8-GPU projection (not measurements: no GPU was available): H100 SXM, bf16 dense peak
# 989 TFLOP/s reached at 40 % (issue 5's target), NCCL ring all-reduce at 350 GB/s bus bandwidth over NVLink.
H100_BF16_TFLOPS = 989.0
ASSUMED_MFU = 0.40
NVLINK_BUS_GBPS = 350.0


def paper_projection(gpus: tuple[int, ...] = (1, 2, 4, 8), resolution: int = 256, batch: int = 16) -> dict:
    """Step time of the paper preset at `resolution` px, global batch `batch`, on N GPUs: compute from the
    counted FLOPs per image at the assumed MFU, plus the gradient all-reduces (not overlapped with compute)."""
    import copy

    from hydra import compose, initialize_config_dir

    from pgan.bench import IterationFlops
    from pgan.losses import make_loss
    from pgan.networks import networks_from
    from pgan.train.loop import build_optimizers
    from pgan.train.step import train_step

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["model=paper"])
    G, D = networks_from(cfg.model, resolution)
    G_ema = copy.deepcopy(G).requires_grad_(False)
    opt_G, opt_D = build_optimizers(G, D, 0.001)
    counted = 2  # images per counted iteration (FLOPs per image do not depend on the batch)
    reals = torch.rand(counted, 3, resolution, resolution) * 2 - 1
    with IterationFlops() as flops:
        train_step(G, D, G_ema, opt_G, opt_D, make_loss("wgan_gp"), reals, 1.0, 0.999)
    gflop_per_img = flops.total / counted / 1e9
    grad_bytes = 4 * (sum(p.numel() for p in G.parameters()) + sum(p.numel() for p in D.parameters()) + 2)
    compute_s = gflop_per_img * batch / (H100_BF16_TFLOPS * 1e3 * ASSUMED_MFU)
    rows = []
    for n in gpus:
        comm_s = 0.0 if n == 1 else 2 * (n - 1) / n * grad_bytes / (NVLINK_BUS_GBPS * 1e9)
        step_s = compute_s / n + comm_s
        rows.append(
            {
                "gpus": n,
                "step_ms": 1000 * step_s,
                "img_per_s": batch / step_s,
                "efficiency": compute_s / (n * step_s),
                "comm_ms": 1000 * comm_s,
            }
        )
    return {
        "resolution": resolution,
        "batch_size": batch,
        "gflop_per_img": gflop_per_img,
        "allreduce_bytes_per_step": grad_bytes,
        "compute_ms_1gpu": 1000 * compute_s,
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="cores shared by the ranks")
    parser.add_argument("--repeats", type=int, default=3, help="runs per process count, interleaved")
    parser.add_argument("--projection-only", action="store_true", help="only the paper-preset 8-GPU projection")
    args = parser.parse_args()
    if args.projection_only:
        print(json.dumps(paper_projection(), indent=2))
        return
    # Interleaved repeats (1, 2, 1, 2, ...): this shared machine's speed drifts by up to 25 % between runs.
    runs: dict[int, list[dict]] = {n: [] for n in args.nprocs}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for n in args.nprocs:
                runs[n].append(run_training(n, args.threads, Path(tmp) / str(repeat)))
    rows = []
    for results in runs.values():
        rates = [r["img_per_s"] for r in results]
        rows.append({**results[0], "img_per_s": statistics.median(rates), "img_per_s_runs": rates})
    # The ranks share the same cores (threads / N each): perfect scaling keeps the 1-process rate, so the
    # efficiency is the rate relative to it (on N devices it would be relative to N x the 1-device rate).
    for row in rows:
        row["efficiency_same_cores"] = row["img_per_s"] / rows[0]["img_per_s"]
    g, d = gradient_numels()
    sizes = [d + 1, g + 1]  # one all-reduce per optimizer step: gradients + the loss
    step_bytes = 4 * sum(sizes)
    comm_s = allreduce_seconds(sizes)
    out = {
        "resolution": RESOLUTION,
        "batch_size": BATCH,
        "threads": args.threads,
        "torch": torch.__version__,
        "rows": rows,
        "allreduce_bytes_per_step": step_bytes,
        "allreduce_s_per_step_2proc_gloo": comm_s,
        "params_g": g,
        "params_d": d,
    }
    out["paper_256px_8gpu_projection"] = projection = paper_projection()
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "scaling_cpu.json").write_text(json.dumps(out, indent=2) + "\n")
    print("| processes | threads each | img/s: median (each run) | efficiency (same cores) |")
    print("|---|---|---|---|")
    for r in rows:
        runs = ", ".join(f"{x:.1f}" for x in r["img_per_s_runs"])
        print(
            f"| {r['nproc']} | {r['threads_per_rank']} | {r['img_per_s']:.1f} ({runs}) "
            f"| {100 * r['efficiency_same_cores']:.0f}% |"
        )
    print(f"\nall-reduce per step: {step_bytes / 1e6:.2f} MB, {1000 * comm_s:.2f} ms (2 gloo processes, alone)")
    print(
        f"\npaper preset, 256 px, global batch 16: {projection['gflop_per_img']:.1f} GFLOP/img, "
        f"{projection['allreduce_bytes_per_step'] / 1e6:.0f} MB of gradients per step (projection)"
    )
    print("| GPUs | step ms | img/s | all-reduce ms | efficiency |")
    print("|---|---|---|---|---|")
    for r in projection["rows"]:
        print(
            f"| {r['gpus']} | {r['step_ms']:.2f} | {r['img_per_s']:.0f} | {r['comm_ms']:.2f} | "
            f"{100 * r['efficiency']:.0f}% |"
        )


if __name__ == "__main__":
    main()
