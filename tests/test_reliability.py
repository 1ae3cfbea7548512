"""Crash safety: checkpoint rotation, validation and fallback, stop signals, the non-finite guard, crashed
DataLoader workers, refusing pickled code, and atomic writes on a full disk."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    LONG,
    PGAN_TRAIN,
    STAGE,
    TINY,
    TRAIN_TIMEOUT_S,
    assert_same_state,
    compose_config,
    start_and_wait_for_stage_16,
    stats_rows,
    wait_for,
)

from pgan.checkpoint import (
    FORMAT,
    CheckpointDamaged,
    link_checkpoint,
    load_checkpoint,
    rewind_snapshots,
    save_checkpoint,
    set_aside,
    snapshot_name,
    snapshots,
)
from pgan.errors import UserError
from pgan.losses import make_loss
from pgan.monitor import Monitor
from pgan.networks import Discriminator, Generator
from pgan.train.guard import GuardGaveUp
from pgan.train.loop import train
from pgan.train.step import d_step


@pytest.fixture
def reference(tiny_run: Path) -> Path:
    """One uninterrupted tiny run (the session's; snapshots of stage 16 at 0, 56 and 112 images)."""
    return tiny_run


def _final(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / STAGE / "final.pt")


def _interrupted_copy(reference: Path, tmp_path: Path) -> Path:
    """The reference run as if killed late in stage 16: final.pt gone, its snapshots still there."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    (run_dir / STAGE / "final.pt").unlink()
    return run_dir


def test_snapshots_rotate_and_latest_points_at_the_newest(tmp_path: Path) -> None:
    """checkpoint.keep=2 leaves the two newest snapshots; latest.pt is the newest one (a hard link)."""
    train(compose_config(*TINY, "checkpoint.keep=2"), tmp_path)
    names = [p.name for p in snapshots(tmp_path / STAGE)]
    assert names == ["ckpt-0000000112.pt", "ckpt-0000000056.pt"]
    assert os.path.samefile(tmp_path / STAGE / "latest.pt", tmp_path / STAGE / names[0])
    assert load_checkpoint(tmp_path / STAGE / names[0])["nimg"] == 112


def _damage_truncate(path: Path) -> None:
    data = path.read_bytes()
    path.unlink()  # a new inode: latest.pt keeps the old data, as after a torn copy of one file
    path.write_bytes(data[: len(data) // 2])


def _damage_nan(path: Path) -> None:
    state = load_checkpoint(path, validate=False)
    state["G"]["blocks.16.conv1.weight"][0, 0, 0, 0] = float("nan")
    path.unlink()
    save_checkpoint(path, state)


def _damage_shape(path: Path) -> None:
    state = load_checkpoint(path, validate=False)
    state["D"]["from_rgb.16.weight"] = state["D"]["from_rgb.16.weight"][:1]
    path.unlink()
    save_checkpoint(path, state)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [(_damage_truncate, "damaged file"), (_damage_nan, "non-finite"), (_damage_shape, "has shape")],
    ids=["truncated", "nan", "wrong-shape"],
)
def test_damaged_newest_snapshot_falls_back_to_the_previous_one(
    damage, reason: str, reference: Path, tmp_path: Path, capfd
) -> None:
    """A truncated, non-finite or mis-shaped newest snapshot is reported, set aside, and the previous one
    used; the resumed run ends bit-identical to the uninterrupted one."""
    run_dir = _interrupted_copy(reference, tmp_path)
    newest = run_dir / STAGE / "ckpt-0000000112.pt"
    damage(newest)
    (run_dir / STAGE / "latest.pt").unlink()
    train(compose_config(*TINY), run_dir)
    err = capfd.readouterr().err
    assert f"checkpoint {newest}" in err and reason in err and "trying the previous checkpoint" in err
    assert (run_dir / STAGE / "ckpt-0000000112.pt.damaged").is_file()
    assert_same_state(_final(run_dir), _final(reference))


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(reference: Path, tmp_path: Path) -> None:
    """When every checkpoint of a run is damaged the trainer refuses to start over silently."""
    run_dir = _interrupted_copy(reference, tmp_path)
    for path in run_dir.rglob("*.pt"):
        path.write_bytes(b"")
    for _attempt in range(3):  # repeating the command does not wear the refusal down to a fresh start
        with pytest.raises(UserError, match=r"no usable checkpoint in .*: all \d+ are damaged"):
            train(compose_config(*TINY), run_dir)
    assert not list(run_dir.rglob("ckpt-*.pt")) and not (run_dir / STAGE / "final.pt").exists()


def test_a_run_whose_stage_folders_were_deleted_says_it_starts_over(reference: Path, tmp_path: Path, capfd) -> None:
    """No checkpoint left but the logs of an attempt: the run starts over, and says so (it was silent)."""
    run_dir = _interrupted_copy(reference, tmp_path)
    for stage in run_dir.glob("stage-*"):
        shutil.rmtree(stage)
    train(compose_config(*TINY), run_dir)
    assert f"no checkpoint in {run_dir}: training starts from the beginning" in capfd.readouterr().out
    assert_same_state(_final(run_dir), _final(reference))


def test_random_bytes_or_text_are_not_a_checkpoint_and_not_pickled_code(tmp_path: Path) -> None:
    """Neither is called pickled code, nor gets torch's advice to retry with weights_only=False; a truncated
    archive stays a damaged checkpoint (test above)."""
    for name, content in (("garbage.pt", bytes(range(256)) * 8), ("notes.pt", b"hello world\n")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointDamaged, match=rf"not a pgan checkpoint: .*{name} \(not a torch.save archive\)$"):
            load_checkpoint(tmp_path / name)


def test_an_archive_cut_anywhere_is_a_damaged_checkpoint(tmp_path: Path) -> None:
    """Whatever the length it was cut to: torch's reader fails with EOFError, RuntimeError or an OSError
    (EINVAL, at some lengths), and each is a damaged file to set aside, not a file-system error that stops
    every resume."""
    whole = tmp_path / "whole.pt"
    save_checkpoint(whole, {"nimg": 1, "G": torch.randn(100_000)})
    data = whole.read_bytes()
    for length in (100, 1000, 5000, 5500, 20_000, 68_000, len(data) // 2, len(data) - 100):
        cut = tmp_path / f"cut-{length}.pt"
        cut.write_bytes(data[:length])
        with pytest.raises(CheckpointDamaged, match=rf"cannot load checkpoint {cut}: damaged file"):
            load_checkpoint(cut)


def test_a_log_line_cut_short_by_a_kill_is_dropped_when_the_run_resumes(tmp_path: Path, capfd) -> None:
    """A SIGKILL mid-write leaves half a jsonl line: the resume drops it (and any other line that is not a whole
    record) with a warning, instead of failing on it at every attempt."""
    whole = ['{"step": 1, "Loss/D": 0.5}', '{"step": 2, "Loss/D": 0.4}', '{"step": 3, "Loss/D": 0.3}']
    (tmp_path / "stats.jsonl").write_text("\n".join(whole) + '\n{"step": 4, "Loss/D": 0.')
    (tmp_path / "collapse.jsonl").write_text('{"step": 2, "state": "ok"}\n[1, 2]\n{"step": "x"}\n')
    Monitor(tmp_path, purge_step=3).close()
    assert (tmp_path / "stats.jsonl").read_text().splitlines() == whole[:2]
    assert (tmp_path / "collapse.jsonl").read_text() == '{"step": 2, "state": "ok"}\n'
    err = capfd.readouterr().err
    assert f"warning: {tmp_path / 'stats.jsonl'}: dropped 1 line(s) that are not whole records" in err
    assert f"{tmp_path / 'collapse.jsonl'}: dropped 2 line(s)" in err


def _tiny_checkpoint(path: Path, nimg: int) -> Path:
    save_checkpoint(path, {"nimg": nimg, "G": torch.full((2,), float(nimg))})
    return path


def test_set_aside_takes_the_links_to_the_damaged_file_with_it(tmp_path: Path) -> None:
    """latest.pt and ok.pt pointing at a damaged snapshot are removed with it; other links stay."""
    newest = _tiny_checkpoint(tmp_path / "ckpt-0000000064.pt", 64)
    older = _tiny_checkpoint(tmp_path / "ckpt-0000000032.pt", 32)
    link_checkpoint(newest, tmp_path / "latest.pt")
    link_checkpoint(older, tmp_path / "ok.pt")
    aside = set_aside(newest)
    assert aside.name == "ckpt-0000000064.pt.damaged" and aside.is_file()
    assert not (tmp_path / "latest.pt").exists() and os.path.samefile(tmp_path / "ok.pt", older)


def test_rewind_deletes_the_abandoned_branch_and_repoints_latest(tmp_path: Path) -> None:
    """A rollback to a point whose own snapshot was rotated away: newer snapshots go, the restored file
    becomes a snapshot again, latest.pt points at it."""
    for nimg in (96, 128, 160):
        _tiny_checkpoint(tmp_path / snapshot_name(nimg), nimg)
    ok = _tiny_checkpoint(tmp_path / "ok.pt", 64)
    link_checkpoint(tmp_path / snapshot_name(160), tmp_path / "latest.pt")
    rewind_snapshots(tmp_path, ok, 64)
    assert [p.name for p in snapshots(tmp_path)] == [snapshot_name(64)]
    assert os.path.samefile(tmp_path / "latest.pt", ok)


class _RunsCode:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_pickled_code_is_refused(tmp_path: Path) -> None:
    """weights_only=True refuses a checkpoint that would run code, with a clear message, and runs nothing."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "G": _RunsCode(marker)}, evil)
    with pytest.raises(UserError, match=r"refusing to load .*evil.pt: it holds pickled Python objects \(\w+\.system\)"):
        load_checkpoint(evil)
    with pytest.raises(UserError, match="refusing to load"):
        train(compose_config(*TINY, "stage=16", f"init_from={evil}"), tmp_path / "run")
    assert not marker.exists()


@pytest.mark.subprocess
def test_full_disk_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    """A write that fails part-way (a file-size limit standing in for a full disk) leaves the old file
    intact and no temporary file behind."""
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"G": torch.ones(10)})
    script = (
        "import resource, signal, sys, torch\n"
        "from pathlib import Path\n"
        "from pgan.checkpoint import save_checkpoint\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n"
        "try:\n"
        "    save_checkpoint(Path(sys.argv[1]), {'G': torch.zeros(1_000_000)})\n"
        "except OSError as exc:\n"
        "    print('OSError', exc.errno)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=60)
    assert result.stdout.startswith("OSError"), result.stderr
    assert torch.equal(torch.load(path, weights_only=True)["G"], torch.ones(10))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


# --- stop signals ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def long_reference(tmp_path_factory) -> Path:
    """An uninterrupted run of LONG (a stage 16 long enough to be signalled mid-stage)."""
    run_dir = tmp_path_factory.mktemp("long")
    train(compose_config(*LONG), run_dir)
    return run_dir


@pytest.mark.subprocess
def test_sigterm_finishes_the_step_writes_a_checkpoint_and_exits_143(long_reference: Path, tmp_path: Path) -> None:
    """SIGTERM mid-stage: exit 143 after writing a snapshot at the current step (not a periodic one: those
    are 10 kimg apart here); the resumed run is bit-identical to an uninterrupted one."""
    run_dir = tmp_path / "run"
    proc = start_and_wait_for_stage_16(run_dir)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=TRAIN_TIMEOUT_S)
    assert proc.returncode == 143, stderr
    assert "received SIGTERM: finishing the current step" in stderr
    assert f"checkpoint written: {run_dir / STAGE}/ckpt-" in stderr
    assert f"resume with: pgan-train hydra.run.dir={run_dir}" in stderr and "Traceback" not in stderr
    written = load_checkpoint(run_dir / STAGE / "latest.pt")
    assert 0 < written["nimg"] < 1128 and not written["done"]
    resumed = subprocess.run(
        [PGAN_TRAIN, f"hydra.run.dir={run_dir}"], capture_output=True, text=True, timeout=TRAIN_TIMEOUT_S
    )
    assert resumed.returncode == 0, resumed.stderr
    assert_same_state(_final(run_dir), _final(long_reference))


@pytest.mark.subprocess
def test_crashed_loader_worker_is_reported_and_the_run_goes_on(long_reference: Path, tmp_path: Path) -> None:
    """SIGKILL a DataLoader worker: the trainer reports it, continues from the newest snapshot and ends
    bit-identical to an uninterrupted run."""
    run_dir = tmp_path / "run"
    proc = start_and_wait_for_stage_16(run_dir, "data.num_workers=1")
    # The 16 px stage's loader starts its worker when the stage starts iterating: wait for it, however long.
    children = wait_for(
        lambda: Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split(), "DataLoader worker", proc
    )
    os.kill(int(children[0]), signal.SIGKILL)
    _, stderr = proc.communicate(timeout=TRAIN_TIMEOUT_S)
    assert proc.returncode == 0, stderr
    assert "DataLoader worker" in stderr and f"resuming from {run_dir / STAGE}" in stderr
    assert_same_state(_final(run_dir), _final(long_reference))


# --- the non-finite guard -------------------------------------------------------------------------------
def test_d_step_with_non_finite_loss_is_skipped_on_the_device() -> None:
    """NaN reals: the D step reports skipped=1 and leaves D's weights and Adam's state untouched."""
    torch.manual_seed(0)
    G = Generator(8, latent_dim=16, fmap_base=64, fmap_max=16, fmap_min=4)
    D = Discriminator(8, fmap_base=64, fmap_max=16, fmap_min=4)
    opt = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.0, 0.99), fused=True)
    loss = make_loss("wgan_gp")
    reals, z = torch.randn(4, 3, 8, 8), torch.randn(4, 16)
    before = {k: v.clone() for k, v in D.state_dict().items()}
    stats = d_step(G, D, opt, loss, reals * float("nan"), z, 1.0)
    assert stats["Guard/skipped_D"].item() == 1.0
    assert all(torch.equal(v, before[k]) for k, v in D.state_dict().items())
    assert all(float(s["step"]) == 0 for s in opt.state.values())
    stats = d_step(G, D, opt, loss, reals, z, 1.0)
    assert stats["Guard/skipped_D"].item() == 0.0
    assert not torch.equal(D.state_dict()["from_rgb.8.weight"], before["from_rgb.8.weight"])


def _inject(steps: int, times: int) -> str:
    """guard.inject_nonfinite: NaN reals for `steps` steps from 0.064 kimg, while fewer than `times` rollbacks."""
    return f"guard.inject_nonfinite={{at_kimg: 0.064, steps: {steps}, times: {times}}}"


def test_a_few_non_finite_steps_are_skipped_and_counted(tmp_path: Path) -> None:
    """3 poisoned steps (fewer than guard.max_bad_steps in a row): skipped, counted, no rollback."""
    train(compose_config(*TINY, _inject(3, 1)), tmp_path)
    rows = stats_rows(tmp_path)
    assert rows[-1]["Guard/skipped_total"] == 3 and sum(r["Guard/skipped_steps"] for r in rows) == 3
    assert all(torch.isfinite(torch.tensor(r["Loss/D"])) for r in rows if "Loss/D" in r)
    final = _final(tmp_path)
    assert final["guard"]["rollbacks"] == 0 and final["guard"]["total_bad_steps"] == 3


def test_a_run_of_non_finite_steps_rolls_back_with_lower_learning_rates(tmp_path: Path, capfd) -> None:
    """10 poisoned steps with guard.max_bad_steps=4: one rollback to the newest snapshot from before the
    run of bad steps, learning rates halved, logged, and the stage finishes with finite weights."""
    train(compose_config(*TINY, _inject(10, 1), "guard.max_bad_steps=4"), tmp_path)
    err = capfd.readouterr().err
    # The poisoned run starts at 48 images into the stage: the snapshot at 56 was written inside it (with the
    # weights it already had), so the rollback goes to the one before, the stage's first.
    assert "non-finite steps (loss or gradients inf/NaN)" in err and "rolled back to ckpt-0000000000.pt" in err
    final = _final(tmp_path)
    assert final["guard"]["rollbacks"] == 1 and final["guard"]["lr_scale"] == 0.5
    assert all(g["lr"] == 0.0005 for g in final["opt_G"]["param_groups"])
    # D's Adam runs at lr * 4 / 5: rpgan's lazy regularisation every 4th iteration (StyleGAN2's correction).
    assert all(g["lr"] == pytest.approx(0.0005 * 4 / 5) for g in final["opt_D"]["param_groups"])
    assert all(v.isfinite().all() for v in final["G"].values())


@pytest.mark.subprocess
def test_persistent_non_finite_steps_give_up_with_exit_code_4(tmp_path: Path) -> None:
    """When every retry is poisoned again the trainer gives up after guard.max_rollbacks: exit 4, one line."""
    overrides = [_inject(10, 99), "guard.max_bad_steps=4", "guard.max_rollbacks=1"]
    with pytest.raises(GuardGaveUp, match=r"after 1 rollback\(s\)"):
        train(compose_config(*TINY, *overrides), tmp_path / "in-process")
    run_dir = tmp_path / "cli"
    result = subprocess.run(
        [PGAN_TRAIN, *TINY, *overrides, f"hydra.run.dir={run_dir}"],
        capture_output=True,
        text=True,
        timeout=TRAIN_TIMEOUT_S,
    )
    assert result.returncode == 4, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: 4 non-finite steps in a row again")
    assert "Traceback" not in result.stderr
