"""What several test files share: the tiny config, the commands, exact-state comparisons, run logs and waits.
The fixtures built from them (the shared tiny runs among them) are in conftest.py. No test file imports another."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import save_image

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = str(ROOT / "conf")
BIN = Path(sys.executable).parent
PGAN_TRAIN = str(BIN / "pgan-train")
TORCHRUN = str(BIN / "torchrun")

# Generous bounds on waits for a condition, for a loaded 2-core machine: a test waits as long as it takes to see
# what it waits for, and these only turn a hang into a failure.
TRAIN_TIMEOUT_S = 300  # a tiny run in a pgan-train (or torchrun) process, interpreter start-up included
WAIT_TIMEOUT_S = 300  # a run reaching a point (a checkpoint, a log line, a worker process)

# A two-stage 8 -> 16 px run of a tiny model that trains in a couple of seconds on a CPU.
TINY = [
    "model.latent_dim=16",
    "model.fmap_base=64",
    "model.fmap_max=16",
    "model.fmap_min=4",
    "schedule.resolutions=[8,16]",
    "schedule.fade_kimg=0.128",
    "schedule.stable_kimg=0.016",
    "schedule.batch_size=8",
    "schedule.lr=0.001",
    "schedule.ema_kimg=0.05",
    "data.num_workers=0",
    "checkpoint.every_kimg=0.056",
    "log.tick_kimg=0.016",
    "log.image_every_kimg=0.064",
    "log.grid_size=4",
    "log.progress_bar=false",
    "diversity.every_kimg=0.032",
    "diversity.num_samples=16",
    "diversity.num_real=32",
    "diversity.mode_coverage=false",
    # PGAN_TEST_DEVICE=cuda runs the training tests on a GPU (experiments/cuda); CI has none: cpu.
    f"device={os.environ.get('PGAN_TEST_DEVICE', 'cpu')}",
]
# The tiny model's one 8 px stage.
TINY_8PX = [*TINY, "schedule.resolutions=[8]"]


@functools.cache
def _composed(overrides: tuple[str, ...], config_name: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def compose_config(*overrides: str, config_name: str = "train") -> DictConfig:
    """The config `pgan-train` (or the command of `config_name`) would build from these overrides.

    Composed once per distinct overrides (Hydra takes ~70 ms a time, and the suite asks for the same configs
    hundreds of times); every call gets its own copy, free to change."""
    return copy.deepcopy(_composed(tuple(overrides), config_name))


# --- comparing runs ---------------------------------------------------------------------------------------
STATE_KEYS = ("G", "D", "G_ema", "opt_G", "opt_D")


def assert_same_state(a: dict, b: dict) -> None:
    """Every tensor of the networks and optimizers is bit-identical."""
    for key in STATE_KEYS:
        flat_a, flat_b = _flatten(a[key]), _flatten(b[key])
        assert flat_a.keys() == flat_b.keys(), key
        for name, value in flat_a.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, flat_b[name]), f"{key}.{name} differs"
            else:
                assert value == flat_b[name], f"{key}.{name} differs"


def assert_resumes_mid_fade_exactly(overrides: list[str], root: Path) -> None:
    """Train the tiny 8 -> 16 px run of `overrides` in root/full, then resume a copy from its snapshot at 56
    images (mid fade-in) in root/resumed: its final.pt is bit-identical to the uninterrupted run's."""
    import shutil

    from pgan.checkpoint import load_checkpoint
    from pgan.train.loop import train

    train(compose_config(*overrides), root / "full")
    shutil.copytree(root / "full" / "stage-0008", root / "resumed" / "stage-0008")
    (root / "resumed" / "stage-0016").mkdir()
    snapshot = root / "full" / "stage-0016" / "ckpt-0000000056.pt"
    assert 0 < load_checkpoint(snapshot)["nimg"] < 128, "the test needs a checkpoint taken during the fade-in"
    shutil.copy(snapshot, root / "resumed" / "stage-0016" / "latest.pt")
    train(compose_config(*overrides), root / "resumed")
    assert_same_state(
        load_checkpoint(root / "resumed" / "stage-0016" / "final.pt"),
        load_checkpoint(root / "full" / "stage-0016" / "final.pt"),
    )


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out |= _flatten(v, f"{prefix}{k}.")
        return out
    if isinstance(tree, (list, tuple)):
        return _flatten(dict(enumerate(tree)), prefix)
    return {prefix: tree}


def jsonl_rows(run_dir: Path, name: str) -> list[dict]:
    """The rows of a run's <name>.jsonl."""
    return [json.loads(line) for line in (run_dir / f"{name}.jsonl").read_text().splitlines()]


def stats_rows(run_dir: Path) -> list[dict]:
    """The rows of a run's stats.jsonl."""
    return jsonl_rows(run_dir, "stats")


def file_listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` with its size and modification time (to see that nothing was written)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


# --- waiting on a condition -------------------------------------------------------------------------------
def wait_for(condition: Callable[[], object], what: str, proc: subprocess.Popen | None = None) -> object:
    """Poll `condition` until it returns something true (returned), failing after WAIT_TIMEOUT_S or when `proc`
    exits first. Never a fixed sleep: a loaded machine only makes the wait longer."""
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while not (result := condition()):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited with {proc.returncode} before {what}")
        assert time.monotonic() < deadline, f"no {what} after {WAIT_TIMEOUT_S} s"
        time.sleep(0.005)
    return result


def logged_at_resolution(run_dir: Path, resolution: int) -> bool:
    """Whether stats.jsonl has a (complete) row of the stage at `resolution`: it is training, past its start."""
    path = run_dir / "stats.jsonl"
    if not path.is_file():
        return False
    for line in path.read_text().splitlines(keepends=True):
        if line.endswith("\n") and json.loads(line).get("Progress/resolution") == resolution:
            return True
    return False


# --- stop signals: a run with a long 16 px stage -----------------------------------------------------------
LONG = [*TINY, "schedule.stable_kimg=1.0", "checkpoint.every_kimg=10", "diversity.enabled=false"]
STAGE = "stage-0016"


def wait_until_training_stage_16(proc: subprocess.Popen, run_dir: Path) -> None:
    """Until the run in `proc` has taken steps in its 16 px stage (its first snapshot written, then a logged
    tick), so that a signal now lands mid-stage with steps to checkpoint."""
    wait_for(lambda: (run_dir / STAGE / "latest.pt").exists(), "stage-16 snapshot", proc)
    wait_for(lambda: logged_at_resolution(run_dir, 16), "logged tick at 16 px", proc)


def start_and_wait_for_stage_16(run_dir: Path, *extra: str) -> subprocess.Popen:
    """`pgan-train` with LONG in `run_dir`, returned once it is training its 16 px stage."""
    proc = subprocess.Popen(
        [PGAN_TRAIN, *LONG, *extra, f"hydra.run.dir={run_dir}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until_training_stage_16(proc, run_dir)
    return proc


# --- torchrun ---------------------------------------------------------------------------------------------
# Minibatch-stddev groups are per rank (as in the official multi-GPU code); with groups of 1 the statistic is
# the same constant in both layouts, so 2 ranks and 1 process compute the same function. The all-reduce sums in
# another order, and the tiny GAN can amplify that rounding chaotically: once a pre-activation lies within
# rounding of a leaky ReLU's kink, R1's input gradient takes the other slope and Adam (beta1 = 0) turns the jump
# into an update of about lr. Seen: at lr 1e-3 9e-4 apart after 20 steps (a Xeon); at lr 3e-4 on an AMD EPYC
# (AVX2) the penalty jumped by 2.7e-4 relative at the 16 px stage's 11th step and the weights ended 3.6e-4 apart.
# That tests the dynamics, not the data parallelism: lr 1e-4 here (2.4e-7 apart on that EPYC).
# In fp32: bf16 autocast (precision=auto's choice on CPUs with AMX / AVX512-BF16) rounds each product to 8 bits of
# mantissa, so the all-reduce's other order of sums then differs by far more than the data parallelism is tested to.
SAME_FUNCTION = ["model.mbstd_group_size=1", "schedule.lr=0.0001", "precision=fp32"]
# Float sums in another order (the gradient all-reduce) over the 20 steps of TINY, through Adam;
TOLERANCE = {"rtol": 1e-4, "atol": 5e-5}  # measured: 3.6e-7 apart (a Xeon, lr 3e-4), 2.4e-7 (the EPYC, 1e-4)


def torchrun(run_dir: Path, *overrides: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=nproc -m pgan.train` on the CPU with the tiny config, in run_dir's parent."""
    args = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "-m", "pgan.train"]
    args += [*TINY, *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.run(args, capture_output=True, text=True, timeout=TRAIN_TIMEOUT_S, cwd=run_dir.parent)


# --- data -------------------------------------------------------------------------------------------------
DATA_CONF_DIR = ROOT / "conf" / "data"


def load_conf(group: str, **overrides: object):
    """conf/data/<group>.yaml with `overrides` applied, as the trainer would see cfg.data."""
    cfg = OmegaConf.load(DATA_CONF_DIR / f"{group}.yaml")
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the IDX format MNIST uses: magic 0x08 (uint8) + ndim, big-endian sizes, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(size).to_bytes(4, "big") for size in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_images(folder: Path, images) -> Path:
    """Images in [-1, 1] as numbered PNGs in a new `folder`."""
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        save_image(image * 0.5 + 0.5, folder / f"{i:04d}.png")
    return folder


def run_eval(*overrides: str) -> dict:
    """`pgan-eval` in this process: its result."""
    from pgan.cli.eval import evaluate

    return evaluate(compose_config(*overrides, config_name="eval"))


class FakeClock:
    """A `time.perf_counter` that only the code under test advances (`clock.now += seconds`): timings without the
    machine, for the timers of pgan.bench and the experiments."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def experiment_script(relative: str, name: str | None = None) -> ModuleType:
    """The script experiments/<relative> imported as module `name` (default: its file's stem), once per session:
    registered in sys.modules, where dataclasses look their module up and a second test file finds it."""
    name = name or Path(relative).stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / relative)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
