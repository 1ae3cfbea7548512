"""experiments/quality's arms are valid pgan-train runs, and the ones its README says reproduce the defaults do."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from helpers import compose_config, experiment_script

from pgan.cli.train import replace_resolution_maps
from pgan.train.options import TrainOptions

QUALITY = experiment_script("quality/run.py", "quality_run")  # not "run": experiments/throughput has one too
ARMS = [(suite, arm) for suite, s in QUALITY.SUITES.items() for arm in s.arms]


def options_of(suite: str, arm: str) -> TrainOptions:
    """What `pgan-train` resolves from the arm's command line (its maps replace the preset's, as in pgan-train)."""
    s = QUALITY.SUITES[suite]
    return TrainOptions.from_config(compose_config(*replace_resolution_maps([*s.common, *s.arms[arm], "seed=0"])))


@pytest.mark.parametrize(("suite", "arm"), ARMS, ids=[f"{s}-{a}" for s, a in ARMS])
def test_every_arm_is_a_valid_run_to_its_suites_resolution(suite: str, arm: str) -> None:
    options = options_of(suite, arm)
    assert options.stages[-1].resolution == QUALITY.SUITES[suite].resolution


def test_the_default_arms_run_make_trains_recipe() -> None:
    """`default` is make train itself, and so is `smooth` (measured before grow_smooth became the default);
    `lazy4` (measured before lazy regularisation became the default) is the same run with nearest-upsampled starts."""
    make_train = TrainOptions.from_config(compose_config())
    assert make_train.loss.name == "rpgan" and make_train.loss.penalty_every == 4
    assert make_train.model["grow_smooth"] is True
    for arm in ("default", "smooth", "lazy4"):
        options = options_of("default", arm)
        assert options.stages == make_train.stages, arm
        assert options.loss == make_train.loss, arm
        expected = {**make_train.model, "grow_smooth": False} if arm == "lazy4" else make_train.model
        assert options.model == expected, arm


def test_the_older_arms_pin_the_defaults_they_were_measured_on() -> None:
    """fade64: the default before lazy regularisation; fade1: also before the 64 px fade doubled; FRESH arms: also
    before grow_init=preserve and lr 0.001 at 256 px. Each differs from today's defaults in exactly those settings,
    and every arm but those measured on today's default (lazy4, rpgan_lazy4, b8, s16x4, s16x4_w32, pall,
    s16x4_pall, the smooth ones, the betas / minibatch-stddev ablations of make train and the reuse arms) has the
    penalties on every step. Every arm that starts a width-keeping stage as the smaller model's function, measured
    before grow_smooth became the default, pins it off."""
    make_train = TrainOptions.from_config(compose_config())
    fade64 = options_of("default", "fade64")
    assert fade64.stages == make_train.stages and fade64.model == {**make_train.model, "grow_smooth": False}
    assert fade64.loss == replace(make_train.loss, penalty_every=1)
    for suite, arm in ARMS:
        if arm not in (
            "default",
            "lazy4",
            "rpgan_lazy4",
            "b8",
            "s16x4",
            "s16x4_w32",
            "pall",
            "s16x4_pall",
            "smooth",
            "pall_smooth",
            "s16x4_pall_smooth",
            "beta05",
            "beta2_09",
            "mbstd_off",
            "rpgan_wide_b8_xxlong_ema_today",
            "rpgan_lazy4_reuse",
            "reuse_fakes",
        ):  # on today's lazy default
            assert options_of(suite, arm).loss.penalty_every == 1, (suite, arm)
    assert options_of("digits", "rpgan_lazy4").loss.penalty_every == 4
    # The reuse arms are their baselines with the G step on the D step's fakes, and nothing else.
    for suite, arm, baseline in (("digits", "rpgan_lazy4_reuse", "rpgan_lazy4"), ("default", "reuse_fakes", "default")):
        reusing, base = options_of(suite, arm), options_of(suite, baseline)
        assert reusing.reuse_fakes and not base.reuse_fakes
        assert replace(reusing, config=None) == replace(base, reuse_fakes=True, config=None), arm
    smooth = {
        "smooth",
        "pall_smooth",
        "s16x4_pall_smooth",
        "default",
        "beta05",
        "beta2_09",
        "mbstd_off",
        "rpgan_wide_b8_xxlong_ema_today",
        "reuse_fakes",
    }
    for suite, arm in ARMS:
        model = options_of(suite, arm).model
        if model["grow_init"] != "fresh":
            assert model["grow_smooth"] is (arm in smooth), (suite, arm)

    today = make_train.stages
    fade1 = options_of("default", "fade1").stages
    assert [st.resolution for st in fade1] == [st.resolution for st in today]
    assert fade1[3].resolution == 64 and fade1[3].fade_kimg == 1.024 and today[3].fade_kimg == 2.048
    assert tuple(replace(st, fade_kimg=t.fade_kimg, start_nimg=t.start_nimg) for st, t in zip(fade1, today)) == today

    fresh = options_of("default", "fresh")
    assert fresh.model["grow_init"] == "fresh" and options_of("default", "default").model["grow_init"] == "preserve"
    assert [st.lr for st in fresh.stages][-1] == 0.002 and today[-1].lr == 0.001
    assert [st.fade_kimg for st in fresh.stages] == [st.fade_kimg for st in fade1]


def test_a_result_records_the_machine_and_the_trainers_device_line(tmp_path: Path) -> None:
    """bf16 on a CPU with AMX and fp32 on one without are different runs: each result says which it was."""
    line = "device cpu, fp32 (precision=auto), threads 1 (OMP_NUM_THREADS=1)"
    (tmp_path / "train.out").write_text(f"run directory: {tmp_path}\n{line}\nstage 0: 8 px\n")
    recorded = QUALITY.machine(tmp_path)
    assert recorded["device"] == line
    names = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
    assert recorded["cpu"] == (names[0].split(":", 1)[1].strip() if names else "unknown")


def test_the_stacked_digits_preset_is_the_arm_that_met_the_goal() -> None:
    """experiment=stacked_digits (the README's row for stacked digits) trains what arm rpgan_wide_b8_xxlong_ema did."""
    preset = TrainOptions.from_config(compose_config("experiment=stacked_digits", "seed=0"))
    arm = options_of("digits", "rpgan_wide_b8_xxlong_ema")
    assert preset.stages == arm.stages and preset.loss == arm.loss and preset.betas == arm.betas
    assert (preset.ema_kimg, preset.ema_rampup) == (arm.ema_kimg, arm.ema_rampup) == (10.0, 0.15)
    assert {**preset.model, "name": "-"} == {**arm.model, "name": "-"} and preset.model["fmap_max"] == 128
    assert preset.data == arm.data and preset.precision == arm.precision == "auto"


def test_the_stacked_digits_arm_on_todays_defaults_differs_only_in_them() -> None:
    """rpgan_wide_b8_xxlong_ema_today is the preset's arm with the lazy penalties and preserved, smooth stages."""
    today, preset = (
        options_of("digits", "rpgan_wide_b8_xxlong_ema_today"),
        options_of("digits", "rpgan_wide_b8_xxlong_ema"),
    )
    assert today.stages == preset.stages and today.loss == replace(preset.loss, penalty_every=4)
    assert today.model == {**preset.model, "grow_init": "preserve"} and today.model["grow_smooth"] is True
