"""Data parallelism under torchrun (gloo, 2 CPU processes): the ranks stay identical, together they compute what
one process with the same global batch computes, only rank 0 writes, growth and resume work."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import (
    SAME_FUNCTION,
    TINY,
    TOLERANCE,
    TORCHRUN,
    TRAIN_TIMEOUT_S,
    assert_same_state,
    compose_config,
    stats_rows,
    torchrun,
)

from pgan.checkpoint import load_checkpoint
from pgan.data import InfiniteSampler
from pgan.errors import UserError
from pgan.train.loop import train
from pgan.train.options import TrainOptions


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A 2-rank run of the tiny 8 -> 16 px schedule (a stage boundary: growth under data parallelism)."""
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    result = torchrun(run_dir, *SAME_FUNCTION)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


@pytest.mark.distributed
def test_two_ranks_compute_what_one_process_with_the_same_global_batch_computes(two_rank_run, tmp_path: Path) -> None:
    run_dir, _ = two_rank_run
    single = train(compose_config(*TINY, *SAME_FUNCTION), tmp_path / "single")
    ours, theirs = load_checkpoint(run_dir / "stage-0016" / "final.pt"), load_checkpoint(single)
    for key in ("G", "D", "G_ema"):
        for name, value in ours[key].items():
            torch.testing.assert_close(value, theirs[key][name], **TOLERANCE, msg=f"{key}.{name}")
    # The logged losses are averages over both ranks' halves: those of the one process.
    for a, b in zip(stats_rows(run_dir), stats_rows(tmp_path / "single"), strict=True):
        assert a["step"] == b["step"]
        assert a["Loss/D"] == pytest.approx(b["Loss/D"], rel=1e-3, abs=1e-4)


@pytest.mark.distributed
def test_a_conditional_two_rank_run_computes_what_one_process_computes(tmp_path: Path) -> None:
    """Each rank's images come with their own labels (the sampler's chunks), so the class-conditional step
    is data parallel too."""
    conditional = [*SAME_FUNCTION, "model.conditional=true", "data.size=64"]
    result = torchrun(tmp_path / "ddp", *conditional)
    assert result.returncode == 0, result.stderr[-3000:]
    single = load_checkpoint(train(compose_config(*TINY, *conditional), tmp_path / "single"))
    ours = load_checkpoint(tmp_path / "ddp" / "stage-0016" / "final.pt")
    assert ours["classes"] == single["classes"] and len(ours["classes"]) == 16
    for key in ("G", "D", "G_ema"):
        for name, value in ours[key].items():
            torch.testing.assert_close(value, single[key][name], **TOLERANCE, msg=f"{key}.{name}")


@pytest.mark.distributed
def test_only_rank_0_writes_and_prints(two_rank_run) -> None:
    run_dir, result = two_rank_run
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1  # one TensorBoard writer
    steps = [row["step"] for row in stats_rows(run_dir)]
    assert steps == sorted(set(steps))  # no line logged twice
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "config.yaml").is_file()
    assert not (run_dir.parent / "runs").exists()  # no second run directory from the other rank
    assert result.stdout.count("done. watch it with") == 1
    assert sorted(p.name for p in (run_dir / "stage-0016").iterdir()) == [
        "ckpt-0000000000.pt",
        "ckpt-0000000056.pt",
        "ckpt-0000000112.pt",
        "final.pt",
        "latest.pt",
        "ok.pt",
    ]


@pytest.mark.distributed
def test_a_two_rank_run_resumes_bit_identically(two_rank_run, tmp_path: Path) -> None:
    """Killed mid-fade (final.pt and the newest snapshots gone), resumed on 2 ranks: the same weights. The
    save before it also checked that both ranks held the same weights (pgan.dist.check_in_sync)."""
    run_dir, _ = two_rank_run
    cut = tmp_path / "run"
    shutil.copytree(run_dir, cut)
    stage = cut / "stage-0016"
    for name in ("final.pt", "latest.pt", "ok.pt", "ckpt-0000000112.pt"):
        (stage / name).unlink()
    assert load_checkpoint(stage / "ckpt-0000000056.pt")["nimg"] == 56
    result = torchrun(cut, *SAME_FUNCTION)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout and result.stdout.count("resuming from") == 1
    assert_same_state(load_checkpoint(stage / "final.pt"), load_checkpoint(run_dir / "stage-0016" / "final.pt"))


def test_the_ranks_share_every_global_batch_exactly() -> None:
    """Rank r's k-th batch is chunk r of the k-th global batch a single process takes, from any start."""
    for start in (0, 24):
        single = iter(InfiniteSampler(50, seed=3, start=start))
        ranks = [iter(InfiniteSampler(50, seed=3, start=start, rank=r, world_size=2, chunk=4)) for r in (0, 1)]
        for _ in range(20):  # across epoch boundaries (50 items)
            expected = [next(single) for _ in range(8)]
            assert [next(ranks[0]) for _ in range(4)] + [next(ranks[1]) for _ in range(4)] == expected


SPLITS = [(8, 1, True), (8, 2, True), (8, 3, False), (8, 16, False), (24, 2, False)]


@pytest.mark.parametrize(("batch", "world", "ok"), SPLITS)
def test_the_global_batch_must_split_into_groupable_rank_batches(batch: int, world: int, ok: bool) -> None:
    """Per-rank batches: whole, at least one image, and in whole minibatch-stddev groups (12 is not 3 groups of 8)."""
    cfg = compose_config(*TINY, f"schedule.batch_size={batch}", "model.mbstd_group_size=8")
    if ok:
        TrainOptions.from_config(cfg, world_size=world)
    else:
        with pytest.raises(UserError, match=f"does not split into {world} per-rank batches"):
            TrainOptions.from_config(cfg, world_size=world)


def _sync_check(rank: int, port: int, result_dir: str) -> None:
    """Rank 1 perturbs one weight by one float32 step: check_in_sync must notice it, on both ranks."""
    import os

    import torch.distributed as torch_dist

    from pgan import dist
    from pgan.networks import Generator

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    G = Generator(8, latent_dim=16, fmap_base=64, fmap_max=16, fmap_min=4)
    dist.check_in_sync(G)  # the same seed: in sync
    if rank == 1:
        with torch.no_grad():
            weight = G.to_rgb["8"].weight
            weight[0, 0, 0, 0] = torch.nextafter(weight[0, 0, 0, 0], torch.tensor(float("inf")))
    try:
        dist.check_in_sync(G)
        outcome = "not noticed"
    except RuntimeError as exc:
        outcome = str(exc)
    Path(result_dir, f"rank{rank}").write_text(outcome)
    torch_dist.destroy_process_group()


@pytest.mark.distributed
def test_ranks_out_of_sync_are_caught(tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as free:  # a port no other test run on this machine holds (a fixed one could be taken)
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    mp.spawn(_sync_check, args=(port, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        assert "the ranks' weights differ (1 tensors)" in (tmp_path / f"rank{rank}").read_text()


@pytest.mark.distributed
def test_without_a_run_directory_the_ranks_agree_on_one(tmp_path: Path) -> None:
    """Hydra would resolve runs/${now:...} in each process; the ranks use rank 0's."""
    args = [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "pgan.train", *TINY]
    args += ["schedule.resolutions=[8]", "diversity.enabled=false"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=TRAIN_TIMEOUT_S, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "stage-0008" / "final.pt").is_file()
