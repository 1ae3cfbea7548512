"""Kill `pgan-train` with SIGKILL at random moments, and right as it writes a checkpoint, then resume it.

    python experiments/fault_injection/run.py            # 24 kills (about 3 minutes on 2 CPU cores)
    python experiments/fault_injection/run.py --kills 8  # fewer

A three-stage run (8 -> 16 -> 32 px, 3.84 kimg, the tiny model, checkpoint.every_kimg=0.064) is trained once without
interruption, then again under fire: the command is started, killed with SIGKILL (the whole process group,
DataLoader worker included) and restarted with `pgan-train hydra.run.dir=DIR` alone, until it finishes.
Every other kill is aimed at a checkpoint write: the script polls for the temporary file a write creates
and kills the moment it appears. After each kill every checkpoint file in the run directory is loaded and
validated, and the resume point the trainer reports is compared with the newest checkpoint on disk.

Reported: runs (starts) needed, kills, kills that landed mid-write (a temporary file was left behind),
checkpoints lost (damaged, or newer than the point the trainer resumed from), kimg of work lost per kill
(progress at the kill from the per-step stats.jsonl, minus the resume point) against checkpoint.every_kimg,
and whether the final weights are bit-identical to the uninterrupted run. Results: results/results.json,
and README.md rewritten from them (`--readme` rewrites it alone).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from pgan.checkpoint import load_checkpoint

HERE = Path(__file__).resolve().parent
PGAN_TRAIN = str(Path(sys.executable).with_name("pgan-train"))
EVERY_KIMG = 0.064
OVERRIDES = [
    "model.latent_dim=16",
    "model.fmap_base=64",
    "model.fmap_max=16",
    "model.fmap_min=4",
    "schedule.resolutions=[8,16,32]",
    "schedule.fade_kimg=0.768",
    "schedule.stable_kimg=0.768",
    "schedule.batch_size=8",
    "schedule.lr=0.001",
    "schedule.ema_kimg=0.05",
    "data.num_workers=1",
    f"checkpoint.every_kimg={EVERY_KIMG}",
    "log.tick_kimg=0.008",  # one stats row per step: the progress at a kill is known to the step
    "log.image_every_kimg=0.256",
    "log.progress_bar=false",
    "diversity.every_kimg=0.128",
    "diversity.num_samples=16",
    "diversity.num_real=32",
    "diversity.mode_coverage=false",
    "device=cpu",
]
STATE_KEYS = ("G", "D", "G_ema", "opt_G", "opt_D")


def progress_kimg(run_dir: Path) -> float:
    """The last step logged in stats.jsonl, in kimg (0 if none)."""
    path = run_dir / "stats.jsonl"
    if not path.is_file():
        return 0.0
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    for line in reversed(lines):
        try:
            return json.loads(line)["step"] / 1000
        except (json.JSONDecodeError, KeyError):
            continue  # a line cut by the kill
    return 0.0


def checkpoint_files(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.rglob("*.pt") if p.is_file())


def audit(run_dir: Path) -> tuple[int, float]:
    """(damaged checkpoint files, total kimg of the newest usable checkpoint) right after a kill."""
    damaged, newest = 0, 0.0
    for path in checkpoint_files(run_dir):
        try:
            state = load_checkpoint(path)
        except Exception:  # noqa: BLE001 - any failure to load is a lost checkpoint
            damaged += 1
            continue
        newest = max(newest, state["total_nimg"] / 1000)
    return damaged, newest


def same_weights(a: dict, b: dict) -> bool:
    def flat(tree, prefix=""):
        if isinstance(tree, dict):
            return {k2: v2 for k, v in tree.items() for k2, v2 in flat(v, f"{prefix}{k}.").items()}
        if isinstance(tree, (list, tuple)):
            return flat(dict(enumerate(tree)), prefix)
        return {prefix: tree}

    for key in STATE_KEYS:
        fa, fb = flat(a[key]), flat(b[key])
        if fa.keys() != fb.keys():
            return False
        for name, value in fa.items():
            other = fb[name]
            if isinstance(value, torch.Tensor):
                if not torch.equal(value, other):
                    return False
            elif value != other:
                return False
    return True


def start(run_dir: Path, fresh: bool) -> subprocess.Popen:
    args = [PGAN_TRAIN, *(OVERRIDES if fresh else []), f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def kill_when(proc: subprocess.Popen, run_dir: Path, aim_at_write: bool, rng: random.Random) -> bool:
    """Kill `proc` (its process group) once training has begun: after a random delay, or the moment a
    checkpoint's temporary file appears. False if the run finished first."""
    logged = progress_kimg(run_dir)
    deadline = time.monotonic() + 120
    while progress_kimg(run_dir) <= logged:  # wait for the first new step (start-up is not training)
        if proc.poll() is not None:
            return False
        if time.monotonic() > deadline:
            raise RuntimeError("the trainer made no progress for 120 s")
        time.sleep(0.01)
    if aim_at_write:
        while not any(run_dir.rglob(".*.tmp")):
            if proc.poll() is not None:
                return False
            time.sleep(0.0005)
    else:
        end = time.monotonic() + rng.uniform(0.0, 2.0)
        while time.monotonic() < end:
            if proc.poll() is not None:
                return False
            time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


def write_readme(results: dict) -> None:
    """README.md here, from results.json: the question, the command, the summary and the per-kill table."""
    s, kills = results["summary"], results["kills"]
    rows = "\n".join(
        f"| {k['kill']} | {'at a write' if k['aimed_at_write'] else 'random'} | {'yes' if k['mid_write'] else 'no'} "
        f"| {k['progress_kimg']:.3f} | {k['resumed_from_kimg']:.3f} | {k['lost_kimg']:.3f} | {k['damaged']} |"
        for k in kills
    )
    per_start = (s["under_fire_s"] - s["uninterrupted_s"]) / s["starts"]
    lost_random = " / ".join(f"{v:.3f}" for v in s["lost_kimg_random_kills"])
    lost_aimed = " / ".join(f"{v:.3f}" for v in s["lost_kimg_aimed_kills"])
    same = "bit-identical" if s["final_weights_bit_identical"] else "DIFFERENT"
    mid_write = f"{s['kills_mid_write']} left a half-written temporary file, i.e. landed mid-write"
    text = f"""# Fault injection: SIGKILL at random moments and mid-checkpoint-write, then resume

**Question.** Does a run killed without warning — including while it writes a checkpoint — always resume,
lose no checkpoint, lose at most `checkpoint.every_kimg` of work, and end with the weights an
uninterrupted run ends with?

**Command** (CPU, about 3 minutes on 2 cores; it also rewrites this README from `results/results.json`):

```bash
python experiments/fault_injection/run.py --kills {s["kills"]}
```

A three-stage run (8 → 16 → 32 px, 3.84 kimg, the tiny test model, batch 8, one DataLoader worker,
diversity evaluations on, `checkpoint.every_kimg={s["checkpoint_every_kimg"]}`, a stats row per step) is trained
once without interruption and once under fire: started, killed with SIGKILL (the whole process group, the
DataLoader worker included), restarted with `pgan-train hydra.run.dir=DIR` alone, and so on until it
finishes. Odd kills come after a random 0–2 s of training; even kills are aimed at a checkpoint write (the
script polls every 0.5 ms for the temporary file a write creates and kills the moment it appears). After
each kill every `*.pt` in the run directory is loaded and validated; the resume point the trainer prints is
compared with the newest checkpoint on disk and with the progress logged before the kill.

## Result (torch {s["torch"]}, CPU)

| | |
|---|---|
| kills | {s["kills"]} ({s["kills_aimed_at_writes"]} aimed at a write; {mid_write}) |
| starts until the run completed | {s["starts"]} (completed: {"yes" if s["completed"] else "no"}) |
| checkpoints lost (damaged, or newer than the resume point) | **{s["checkpoints_lost"]}** |
| damaged `.pt` files seen after kills | {s["damaged_files_seen"]} |
| work lost per kill, random kills (min / median / max kimg) | {lost_random} |
| work lost per kill, kills mid-write (min / median / max kimg) | {lost_aimed} |
| bound (`checkpoint.every_kimg`) | {s["checkpoint_every_kimg"]} |
| final weights (G, D, G_ema, both Adam states) vs the uninterrupted run | **{same}** |
| wall time: uninterrupted / under fire | {s["uninterrupted_s"]} s / {s["under_fire_s"]} s |

A kill mid-write loses exactly one checkpoint interval — the snapshot being written is discarded, the
previous one is whole — and never more. The work lost is measured from stats.jsonl (one row per 8-image
step), so it is exact to the step. The extra wall time under fire, ({s["under_fire_s"]} − {s["uninterrupted_s"]}) s /
{s["starts"]} starts = {per_start:.1f} s per start, is process start-up (Python, torch, Hydra, the first batch)
plus the re-done work, which is at most {s["kills"]} × {s["checkpoint_every_kimg"]} kimg of a 3.84 kimg run.

| kill | when | mid-write | progress at kill (kimg) | resumed from (kimg) | lost (kimg) | damaged files |
|---|---|---|---|---|---|---|
{rows}

What this does not cover: power loss (the directory fsync after the rename is there for it, but a kill
cannot test it), and CUDA (cuDNN's autotuned kernels are not bitwise deterministic, so on a GPU the
resumed run is equivalent, not bit-identical). Damaged checkpoints (truncated, NaN, wrong shapes) never
arise from kills here; their fallback is tested in `tests/test_reliability.py`.
"""
    (HERE / "README.md").write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "runs")
    parser.add_argument("--readme", action="store_true", help="only rewrite README.md from results/results.json")
    args = parser.parse_args()
    if args.readme:
        write_readme(json.loads((HERE / "results" / "results.json").read_text()))
        return
    rng = random.Random(args.seed)
    shutil.rmtree(args.out, ignore_errors=True)
    reference, run_dir = args.out / "reference", args.out / "under-fire"

    t0 = time.perf_counter()
    subprocess.run([PGAN_TRAIN, *OVERRIDES, f"hydra.run.dir={reference}"], check=True, capture_output=True)
    reference_s = time.perf_counter() - t0
    print(f"uninterrupted run: {reference_s:.1f} s", flush=True)

    kills, starts, fresh = [], 0, True
    t0 = time.perf_counter()
    while True:
        proc = start(run_dir, fresh)
        starts += 1
        pending = kills[-1] if kills and "resumed_from_kimg" not in kills[-1] else None
        aim = len(kills) % 2 == 1
        killed = len(kills) < args.kills and kill_when(proc, run_dir, aim, rng)
        output = proc.communicate()[0] if not killed else proc.stdout.read()
        resumed = re.search(r"resuming from (\S+) \(([\d.]+) kimg\)", output)
        if pending is not None:
            pending["resumed_from"] = resumed.group(1) if resumed else None
            pending["resumed_from_kimg"] = float(resumed.group(2)) if resumed else 0.0
            pending["lost_kimg"] = round(pending["progress_kimg"] - pending["resumed_from_kimg"], 3)
            pending["checkpoint_lost"] = pending["damaged"] > 0 or pending["resumed_from_kimg"] < pending["newest_kimg"]
        if not killed:
            if proc.returncode != 0:
                raise RuntimeError(f"the trainer failed:\n{output[-3000:]}")
            break
        fresh = False
        damaged, newest = audit(run_dir)
        record = {
            "kill": len(kills) + 1,
            "aimed_at_write": aim,
            "mid_write": bool(list(run_dir.rglob(".*.tmp"))),
            "progress_kimg": progress_kimg(run_dir),
            "damaged": damaged,
            "newest_kimg": newest,
        }
        kills.append(record)
        print(json.dumps(record), flush=True)
    under_fire_s = time.perf_counter() - t0

    stage = "stage-0032"
    match = same_weights(load_checkpoint(run_dir / stage / "final.pt"), load_checkpoint(reference / stage / "final.pt"))
    lost = [k["lost_kimg"] for k in kills]
    lost_random = [k["lost_kimg"] for k in kills if not k["aimed_at_write"]] or [0.0]
    lost_aimed = [k["lost_kimg"] for k in kills if k["aimed_at_write"]] or [0.0]
    summary = {
        "kills": len(kills),
        "kills_aimed_at_writes": sum(k["aimed_at_write"] for k in kills),
        "kills_mid_write": sum(k["mid_write"] for k in kills),
        "starts": starts,
        "completed": True,
        "checkpoints_lost": sum(k["checkpoint_lost"] for k in kills),
        "damaged_files_seen": sum(k["damaged"] for k in kills),
        "lost_kimg_max": max(lost) if lost else 0.0,
        "lost_kimg_median": statistics.median(lost) if lost else 0.0,
        "lost_kimg_random_kills": [min(lost_random), statistics.median(lost_random), max(lost_random)],
        "lost_kimg_aimed_kills": [min(lost_aimed), statistics.median(lost_aimed), max(lost_aimed)],
        "checkpoint_every_kimg": EVERY_KIMG,
        "final_weights_bit_identical": match,
        "uninterrupted_s": round(reference_s, 1),
        "under_fire_s": round(under_fire_s, 1),
        "torch": torch.__version__,
    }
    (HERE / "results").mkdir(exist_ok=True)
    results = {"summary": summary, "kills": kills}
    (HERE / "results" / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_readme(results)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
