"""pgan-bench runs, prints one JSON line per resolution x alpha with the documented fields, and counts FLOPs
the way torch's flop counter does, penalty included."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import FakeClock, compose_config
from torch.utils.flop_counter import FlopCounterMode

import pgan.bench
import pgan.cli.bench
from pgan.bench import IterationFlops, interleaved_step_seconds, project_schedule, ratio_per_round
from pgan.cli.bench import projection_line
from pgan.losses import make_loss
from pgan.networks import Discriminator, Generator, channels_for
from pgan.train.step import d_step

PGAN_BENCH = str(Path(sys.executable).with_name("pgan-bench"))
FIELDS = {
    "resolution",
    "batch_size",
    "alpha",
    "img_per_s",
    "gflop_per_img",
    "achieved_gflops",
    "ceiling_gflops",
    "mfu",
    "peak_mem_mb",
    "loader_img_per_s",
    "latent_dim",
    "channels",
    "device",
}
TINY_MODEL = ["model.latent_dim=16", "model.fmap_base=64", "model.fmap_max=16", "model.fmap_min=4"]
QUICK = ["batch_size=4", "warmup_steps=1", "steps=1", "repeats=2", "loader_batches=2", "matmul_size=256"]
# The decimals pgan-bench rounds its derived fields to (pgan/bench.py). A field computed from others is compared with
# every value their printed, rounded numbers allow, never more closely: on a slow machine mfu is 0.0032 while
# achieved_gflops / ceiling_gflops of the printed numbers is 0.00315, 1.6 % apart, and both are right.
DECIMALS = {
    "img_per_s": 3,
    "gflop_per_img": 4,
    "achieved_gflops": 2,
    "ceiling_gflops": 1,
    "mfu": 4,
    "conv_achieved_gflops": 2,
    "conv_mfu": 4,
}


@pytest.fixture(scope="module")
def bench_run() -> tuple[list[dict], str]:
    """pgan-bench on the tiny model at 8 and 16 px, both alphas, on the CPU, with the quick schedule projected:
    its stdout's JSON objects and its stderr."""
    result = subprocess.run(
        [PGAN_BENCH, *TINY_MODEL, *QUICK, "resolutions=[8,16]", "loss=wgan_gp", "device=cpu", "data.num_workers=0"]
        + ["threads=1", "project=quick"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()], result.stderr


@pytest.fixture(scope="module")
def bench_lines(bench_run) -> tuple[list[dict], str]:
    """The measurements (one object per resolution x alpha) and the table."""
    objects, stderr = bench_run
    return [o for o in objects if "projection" not in o], stderr


@pytest.mark.subprocess
def test_the_projection_is_the_schedule_at_the_measured_rates(bench_run) -> None:
    """project=quick: the last line is the quick schedule's wall-clock from the 8 and 16 px rates (fade-in at
    the fading rate, stable phase at alpha 1); the stages not measured are named, not guessed."""
    objects, table = bench_run
    *measured, last = objects
    rate = {(r["resolution"], r["alpha"]): r["img_per_s"] for r in measured}
    projection = last["projection"]
    expected = {8: 2048 / rate[(8, 1.0)], 16: 1024 / rate[(16, 0.5)] + 12288 / rate[(16, 1.0)]}
    assert [s["resolution"] for s in projection["stages"]] == [8, 16]
    for stage in projection["stages"]:
        assert stage["hours"] == pytest.approx(expected[stage["resolution"]] / 3600, abs=6e-4)
        assert stage["schedule_batch"] == 16
    assert projection["missing"] == [32, 64, 128, 256] and projection["measured_batch"] == 4
    assert projection["total_h"] == pytest.approx(sum(expected.values()) / 3600, abs=0.01)
    assert "projected schedule=quick" in table and "not measured: [32, 64, 128, 256] px" in table


def test_a_projection_says_which_stages_it_leaves_out_and_why() -> None:
    """Measured at alpha 1 only, every stage but the first (which has no fade-in) lacks its fade-in's rate: the
    projection names them apart from the stages never measured, and the printed line says what to do."""
    rates = [SimpleNamespace(resolution=r, alpha=1.0, img_per_s=100.0, batch_size=16) for r in (8, 16)]
    projection = project_schedule(rates, "quick")
    assert [s["resolution"] for s in projection["stages"]] == [8]
    assert projection["total_h"] == pytest.approx(2048 / 100 / 3600, abs=0.01)
    assert projection["missing"] == [16, 32, 64, 128, 256] and projection["missing_fade"] == [16]
    line = projection_line(projection)
    assert line.startswith("projected schedule=quick: 0.01 h for the [8] px stages only;")
    assert "not measured: [16, 32, 64, 128, 256] px ([16] px at alpha 1 only: a fade-in needs an alpha < 1" in line
    nothing = project_schedule([], "quick")
    assert projection_line(nothing) == "projected schedule=quick: 0 h, not measured: [8, 16, 32, 64, 128, 256] px"
    whole = project_schedule(
        [
            SimpleNamespace(resolution=r, alpha=a, img_per_s=50.0, batch_size=16)
            for r in (8, 16, 32, 64, 128, 256)
            for a in (0.5, 1.0)
        ],
        "quick",
    )
    assert whole["missing"] == [] and projection_line(whole) == f"projected schedule=quick: {whole['total_h']} h"


@pytest.mark.subprocess
def test_the_cuda_experiments_table_reads_pgan_benchs_lines(bench_run, tmp_path: Path) -> None:
    """experiments/cuda/summarize.py (run only on a lent GPU) makes its table from real pgan-bench output: one row
    per measurement of each bench_<name>.jsonl, and the projection's line."""
    objects, _ = bench_run
    measured = [o for o in objects if "projection" not in o]
    (tmp_path / "bench_tiny.jsonl").write_text("\n".join(json.dumps(o) for o in measured) + "\n")
    (tmp_path / "bench_paper_projection.jsonl").write_text("\n".join(json.dumps(o) for o in objects) + "\n")
    summarize = Path(__file__).resolve().parents[1] / "experiments" / "cuda" / "summarize.py"
    result = subprocess.run([sys.executable, str(summarize), str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| tiny |")]
    assert len(rows) == len(measured)
    for row, o in zip(rows, measured):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1:4] == [str(o["resolution"]), str(o["batch_size"]), f"{o['img_per_s']:.1f}"]
        assert cells[5] == f"{100 * o['mfu']:.1f}%"
    total = objects[-1]["projection"]["total_h"]
    assert f"Projected `schedule=quick` at batch 4: {total} h (8 px" in result.stdout
    assert "not measured: [32, 64, 128, 256]" in result.stdout


@pytest.mark.subprocess
def test_one_json_line_per_resolution_and_alpha_with_the_fields(bench_lines) -> None:
    lines, table = bench_lines
    assert [(r["resolution"], r["alpha"]) for r in lines] == [(8, 0.5), (8, 1.0), (16, 0.5), (16, 1.0)]
    for r in lines:
        assert FIELDS <= r.keys()
        assert r["batch_size"] == 4 and r["latent_dim"] == 16 and r["device"].startswith("cpu")
        assert r["img_per_s"] > 0 and r["gflop_per_img"] > 0 and r["ceiling_gflops"] > 0
        assert r["loader_img_per_s"] > 0 and r["peak_mem_mb"] > 0
        # The derived fields are what their names say.
        _assert_rounded(r, "achieved_gflops", _product(_unrounded(r, "gflop_per_img"), _unrounded(r, "img_per_s")))
        _assert_rounded(r, "mfu", _quotient(_unrounded(r, "achieved_gflops"), _unrounded(r, "ceiling_gflops")))
        # The convolutions are most of the FLOPs and part of the time; their own rate is above the average.
        assert 0 < r["conv_share"] < 1 and r["conv_achieved_gflops"] > 0
        conv = _quotient(_unrounded(r, "conv_achieved_gflops"), _unrounded(r, "ceiling_gflops"))
        _assert_rounded(r, "conv_mfu", conv)
        assert not r["compile"] and not r["reuse_fakes"] and not r["loader_prepared"] and r["first_step_s"] > 0
        assert r["threads"] == 1 and r["penalty_mode"] == "exact" and r["penalty_every"] == 1
    assert "img/s" in table and "MFU" in table and "conv MFU" in table
    assert "loss=wgan_gp, exact penalties" in table and "compile=False reuse_fakes=False" in table


def _unrounded(r: dict, key: str) -> tuple[float, float]:
    """Where the value printed as r[key] lay before rounding: within half a rounding step of it."""
    half = 0.5 * 10 ** -DECIMALS[key]
    return r[key] - half, r[key] + half


def _product(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    ends = [x * y for x in a for y in b]
    return min(ends), max(ends)


def _quotient(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    assert b[0] > 0
    ends = [x / y for x in a for y in b]
    return min(ends), max(ends)


def _assert_rounded(r: dict, key: str, interval: tuple[float, float]) -> None:
    """r[key] is a value of `interval` rounded to its decimals."""
    half = 0.5 * 10 ** -DECIMALS[key] + 1e-12  # and a float's last bit
    assert interval[0] - half <= r[key] <= interval[1] + half, (key, r[key], interval)


@pytest.mark.subprocess
def test_channels_map_every_resolution_from_4_up(bench_lines) -> None:
    lines, _ = bench_lines
    for r in lines:
        expected = {str(res): channels_for(res, 64, 16, 4) for res in (4, 8, 16) if res <= r["resolution"]}
        assert r["channels"] == expected


@pytest.mark.subprocess
def test_flops_grow_with_resolution(bench_lines) -> None:
    """Four times the pixels: the 16 px iteration costs more FLOPs per image than the 8 px one."""
    lines, _ = bench_lines
    per_res = {r["resolution"]: r["gflop_per_img"] for r in lines if r["alpha"] == 1.0}
    assert per_res[16] > 2 * per_res[8]


def test_iteration_flops_match_torch_flop_counter_on_a_forward() -> None:
    """On a forward pass (where torch's FlopCounterMode works) both counts agree exactly."""
    G = Generator(16, latent_dim=16, fmap_base=64, fmap_max=16, fmap_min=4)
    z = torch.randn(4, 16)
    with FlopCounterMode(display=False) as reference:
        G(z, 0.5)
    with IterationFlops() as ours:
        G(z, 0.5)
    assert ours.total == reference.get_total_flops() > 0


def test_iteration_flops_split_off_the_convolutions() -> None:
    """A generator is convolutions and one dense layer: the convolution part is most, not all, of its FLOPs."""
    G = Generator(16, latent_dim=16, fmap_base=64, fmap_max=16, fmap_min=4)
    with IterationFlops() as flops:
        G(torch.randn(4, 16), 1.0).sum().backward()
    assert 0.5 * flops.total < flops.convolution < flops.total


def test_steps_timed_in_turns_alternate_their_order_and_time_each_call(monkeypatch) -> None:
    """Every round times each step over its calls, in the given order, then reversed: what each step costs per call
    comes back per round, whatever the machine did between rounds."""
    clock, calls = FakeClock(), []
    monkeypatch.setattr(pgan.bench.time, "perf_counter", clock)
    slowdown = iter([1.0] * 2 + [1.0] * 6 + [3.0] * 6)  # warm-up calls, round 0, round 1 (the machine got slower)

    def step(name: str, cost_s: float):
        def run() -> None:
            calls.append(name)
            clock.now += cost_s * next(slowdown)

        return run

    seconds = interleaved_step_seconds(
        {"ours": step("ours", 0.01), "peer": step("peer", 0.02)}, torch.device("cpu"), warmup=1, rounds=2, calls=3
    )
    assert calls == ["ours", "peer"] + ["ours"] * 3 + ["peer"] * 3 + ["peer"] * 3 + ["ours"] * 3
    assert seconds["ours"] == pytest.approx([0.01, 0.03])
    assert seconds["peer"] == pytest.approx([0.02, 0.06])
    assert ratio_per_round(seconds["peer"], seconds["ours"]) == pytest.approx((2.0, 2.0, 2.0))


def test_the_ratio_of_rounds_is_their_median_with_its_spread() -> None:
    assert ratio_per_round([3.0, 2.0, 5.0], [1.0, 1.0, 2.0]) == pytest.approx((2.5, 2.0, 3.0))
    with pytest.raises(ValueError, match="same number of rounds"):
        ratio_per_round([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="rounds and calls"):
        interleaved_step_seconds({"a": lambda: None}, torch.device("cpu"), warmup=0, rounds=0, calls=1)


def test_iteration_flops_count_the_gradient_penalty() -> None:
    """The D step with WGAN-GP's double backward costs more than the same step without a penalty."""
    torch.manual_seed(0)
    G = Generator(8, latent_dim=16, fmap_base=64, fmap_max=16, fmap_min=4)
    D = Discriminator(8, fmap_base=64, fmap_max=16, fmap_min=4)
    reals, z = torch.randn(4, 3, 8, 8), torch.randn(4, 16)
    counts = {}
    for name in ("wgan_gp", "hinge"):
        opt = torch.optim.Adam(D.parameters(), fused=True)
        with IterationFlops() as flops:
            d_step(G, D, opt, make_loss(name), reals, z, 1.0)
        counts[name] = flops.total
    assert counts["wgan_gp"] > 1.5 * counts["hinge"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("resolutions=[24]", "error: resolutions:"),
        ("loss.penalty_every=0", "error: loss.penalty_every must be"),
        ("project=weekly", "error: project=weekly: no schedule preset"),
        ("threads=0", "error: threads must be auto or an integer >= 1"),
        # Tracebacks before, and a projection of nothing ("0 h").
        ("resolutions=8", "error: resolutions must list at least one resolution, e.g. resolutions=[32,64], got 8"),
        ("resolutions=[8,abc]", "error: each of resolutions must be an integer, got 'abc'"),
        ("matmul_size=-5", "error: matmul_size must be an integer >= 1, got -5"),
        ("batch_size=abc", "error: batch_size must be an integer >= 1, got 'abc'"),
        ("resolutions=[4] project=quick", "error: project=quick: its stages are [8, 16, 32, 64, 128, 256] px and"),
    ],
)
def test_bad_settings_are_one_line_exit_2(override: str, message: str, monkeypatch, capsys) -> None:
    """pgan-bench's entry point in this process, as its console script calls it (Hydra reads sys.argv); the
    console script itself in `test_the_console_script_reports_a_bad_setting_in_one_line`."""
    monkeypatch.setattr(sys, "argv", ["pgan-bench", *override.split()])
    with pytest.raises(SystemExit) as exited:
        pgan.cli.bench.main()
    stderr = capsys.readouterr().err
    assert exited.value.code == 2 and stderr.startswith(message), stderr
    assert len(stderr.strip().splitlines()) == 1


@pytest.mark.subprocess
def test_the_console_script_reports_a_bad_setting_in_one_line() -> None:
    result = subprocess.run([PGAN_BENCH, "loss.penalty_every=0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: loss.penalty_every must be"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_issue_command_line_composes() -> None:
    """The documented interface: model, resolutions, batch_size, loss and device as overrides."""
    cfg = compose_config(
        "model=small", "resolutions=[32,64,128]", "batch_size=16", "loss=wgan_gp", "device=cpu", config_name="bench"
    )
    assert list(cfg.resolutions) == [32, 64, 128] and cfg.batch_size == 16 and cfg.loss.name == "wgan_gp"
