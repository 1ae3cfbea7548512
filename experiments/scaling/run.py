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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="cores shared by the ranks")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_training(n, args.threads, Path(tmp)) for n in args.nprocs]
    base = rows[0]["img_per_s"] / rows[0]["nproc"]
    for row in rows:
        row["efficiency"] = row["img_per_s"] / (base * row["nproc"])
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
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "scaling_cpu.json").write_text(json.dumps(out, indent=2) + "\n")
    print("| processes | threads each | img/s | efficiency | ticks |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['nproc']} | {r['threads_per_rank']} | {r['img_per_s']:.1f} | {100 * r['efficiency']:.0f}% "
            f"| {r['ticks']} |"
        )
    print(f"\nall-reduce per step: {step_bytes / 1e6:.2f} MB, {1000 * comm_s:.2f} ms (2 gloo processes, alone)")


if __name__ == "__main__":
    main()
