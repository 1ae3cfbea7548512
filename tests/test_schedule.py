"""Tests for pgan.schedule: build_stages, Stage arithmetic, alpha_at and ema_beta."""

import math

import pytest

from pgan.schedule import Stage, alpha_at, build_stages, ema_beta, ema_half_life_kimg, filled_settings, setting_at

# ---------------------------------------------------------------- build_stages


def test_build_stages_with_scalars():
    """Scalar settings apply to every stage; only the first stage drops its fade-in."""
    stages = build_stages([4, 8, 16], fade_kimg=0.8, stable_kimg=1.6, batch_size=16, lr=0.001)
    assert [s.index for s in stages] == [0, 1, 2]
    assert [s.resolution for s in stages] == [4, 8, 16]
    assert [s.fade_kimg for s in stages] == [0.0, 0.8, 0.8]
    assert [s.stable_kimg for s in stages] == [1.6, 1.6, 1.6]
    assert [s.batch_size for s in stages] == [16, 16, 16]
    assert [s.lr for s in stages] == [0.001, 0.001, 0.001]
    # 1600 images = 100 steps; 2400 images = 150 steps (all exact multiples of 16).
    assert [s.num_steps for s in stages] == [100, 150, 150]
    assert [s.num_images for s in stages] == [1600, 2400, 2400]
    assert [s.start_nimg for s in stages] == [0, 1600, 4000]


@pytest.mark.parametrize("key", [int, str], ids=["int-keys", "str-keys"])
def test_build_stages_with_per_resolution_maps(key):
    """{resolution: value} maps (int or str keys) pick each stage's value; start_nimg accumulates."""
    res = [8, 16, 32]
    stages = build_stages(
        res,
        fade_kimg={key(8): 99.0, key(16): 0.2, key(32): 0.4},  # the 8 px entry is ignored: no fade-in there
        stable_kimg={key(8): 0.1, key(16): 0.3, key(32): 0.5},
        batch_size={key(8): 16, key(16): 8, key(32): 4},
        lr={key(8): 1e-3, key(16): 2e-3, key(32): 3e-3},
    )
    assert [s.fade_kimg for s in stages] == [0.0, 0.2, 0.4]
    assert [s.stable_kimg for s in stages] == [0.1, 0.3, 0.5]
    assert [s.batch_size for s in stages] == [16, 8, 4]
    assert [s.lr for s in stages] == [1e-3, 2e-3, 3e-3]
    # 100 images at batch 16 -> 7 steps -> 112; 500 at 8 -> 63 steps -> 504; 900 at 4 -> 225 steps -> 900.
    assert [s.num_steps for s in stages] == [7, 63, 225]
    assert [s.num_images for s in stages] == [112, 504, 900]
    assert [s.start_nimg for s in stages] == [0, 112, 616]


def test_build_stages_mixes_scalars_and_maps():
    """Scalars and maps can be combined, and a map may hold entries for unused resolutions."""
    stages = build_stages(
        [4, 8], fade_kimg=1.0, stable_kimg={4: 2.0, 8: 3.0, 1024: 9.0}, batch_size={"4": 32, "8": 16}, lr=0.5
    )
    assert [(s.fade_kimg, s.stable_kimg, s.batch_size, s.lr) for s in stages] == [
        (0.0, 2.0, 32, 0.5),
        (1.0, 3.0, 16, 0.5),
    ]


@pytest.mark.parametrize(
    "kimg, batch, steps", [(0.1, 16, 7), (0.128, 16, 8), (0.128, 12, 11), (0.001, 16, 1), (1.0, 1, 1000), (0.0, 8, 0)]
)
def test_num_images_rounds_up_to_whole_batches(kimg, batch, steps):
    """num_steps = ceil(kimg * 1000 / batch) (robust to float kimg); num_images = num_steps * batch."""
    (stage,) = build_stages([4], fade_kimg=0.0, stable_kimg=kimg, batch_size=batch, lr=1.0)
    assert stage.num_steps == steps
    assert stage.num_images == steps * batch
    assert stage.num_images >= round(kimg * 1000)
    assert stage.num_images - round(kimg * 1000) < batch


def test_num_steps_counts_fade_and_stable_images_together():
    """A stage's images are fade + stable, rounded up once (0.06 + 0.068 kimg = 128 images = 8 steps of 16)."""
    stages = build_stages([4, 8], fade_kimg=0.06, stable_kimg={4: 0.016, 8: 0.068}, batch_size=16, lr=1.0)
    assert stages[1].num_steps == 8
    assert stages[1].num_images == 128
    assert stages[1].start_nimg == 16


@pytest.mark.parametrize("key", ["fade_kimg", "stable_kimg", "batch_size", "lr"])
def test_map_gaps_take_the_nearest_smaller_resolution_then_the_smallest(key):
    """A map that does not name a resolution gives it the value of the nearest smaller one it names; below all
    of them, the value of the smallest; filled_settings says which rule filled what."""
    settings = {"fade_kimg": 1.0, "stable_kimg": 1.0, "batch_size": 16, "lr": 1e-3}
    settings[key] = {"16": 32, 64: 48}  # nothing for 8 and 32; a string key counts like an int
    stages = build_stages([8, 16, 32, 64, 128], fade_first=True, **settings)
    assert [getattr(s, key) for s in stages] == [32, 32, 32, 48, 48]
    schedule = {k: settings[k] for k in settings}
    assert [filled_settings(schedule, s).get(key) for s in stages] == [
        "from 16 px",
        None,
        "from 16 px",
        None,
        "from 64 px",
    ]


def test_a_default_entry_fills_every_gap_and_a_named_resolution_wins():
    """`default` applies to every resolution the map does not name; a named one keeps its own value."""
    assert setting_at({"default": 0.5, 32: 0.1}, 64, "lr") == (0.5, "default")
    assert setting_at({"default": 0.5, 32: 0.1}, 32, "lr") == (0.1, None)
    assert setting_at({"default": 0.5}, 8, "lr") == (0.5, "default")
    assert setting_at(0.3, 8, "lr") == (0.3, None)


@pytest.mark.parametrize(
    ("value", "message"),
    [({}, "schedule.lr is an empty map"), ({"big": 1.0}, "schedule.lr has the key 'big': keys are resolutions")],
)
def test_a_map_without_a_rule_names_the_setting(value, message):
    """Only a map with no entry at all has no rule; a key that is neither a resolution nor default is refused."""
    with pytest.raises(ValueError, match=message):
        build_stages([8, 16], 1.0, 1.0, 16, value)


def test_stage_name():
    """The stage directory name is the zero-padded resolution."""
    stages = build_stages([4, 64, 1024], 1.0, 1.0, 16, 1e-3)
    assert [s.name for s in stages] == ["stage-0004", "stage-0064", "stage-1024"]


# ---------------------------------------------------------------- alpha_at


def make_stage(fade_kimg: float, stable_kimg: float = 1.0) -> Stage:
    """A stage with the given fade-in, built directly."""
    return Stage(
        index=1, resolution=8, fade_kimg=fade_kimg, stable_kimg=stable_kimg, batch_size=16, lr=1e-3, start_nimg=0
    )


@pytest.mark.parametrize(
    "nimg, alpha",
    [
        (0, 0.0),
        (16, 0.0125),
        (320, 0.25),
        (640, 0.5),
        (960, 0.75),
        (1279, 1279 / 1280),
        (1280, 1.0),
        (1296, 1.0),
        (10**6, 1.0),
    ],
)
def test_alpha_at_is_linear_over_the_fade_then_one(nimg, alpha):
    """alpha is 0 at the start of a fade, nimg / fade_nimg during it, and 1 at and after its end."""
    assert alpha_at(make_stage(1.28), nimg) == pytest.approx(alpha, abs=1e-12)


@pytest.mark.parametrize("nimg", [0, 1, 500, 10**6])
def test_alpha_at_is_one_without_fade(nimg):
    """A stage with fade_kimg 0 (like the first one) is at alpha 1 from its first image."""
    assert alpha_at(make_stage(0.0), nimg) == 1.0


def test_first_built_stage_is_at_alpha_one():
    """The first stage of a built schedule has no fade, hence alpha 1 everywhere; the second starts at 0."""
    first, second = build_stages([4, 8], fade_kimg=0.5, stable_kimg=0.5, batch_size=16, lr=1e-3)
    assert alpha_at(first, 0) == 1.0
    assert alpha_at(second, 0) == 0.0
    assert alpha_at(second, 250) == pytest.approx(0.5)


# ---------------------------------------------------------------- ema_beta


def test_ema_beta_paper_value():
    """At batch 16 a half-life of 11.085 kimg is the paper's 0.999 per step."""
    assert ema_beta(16, 11.085) == pytest.approx(0.999, abs=1e-6)


@pytest.mark.parametrize("batch, half_life_kimg", [(16, 11.085), (8, 0.05), (64, 10.0), (1, 0.001), (32, 0.016)])
def test_ema_beta_halves_the_weight_after_one_half_life(batch, half_life_kimg):
    """beta ** (half_life_nimg / batch) == 0.5, and 0 < beta < 1."""
    beta = ema_beta(batch, half_life_kimg)
    assert 0.0 < beta < 1.0
    assert beta ** (half_life_kimg * 1000 / batch) == pytest.approx(0.5, rel=1e-9)
    assert math.log(beta) == pytest.approx(batch * math.log(0.5) / (half_life_kimg * 1000), rel=1e-9)


@pytest.mark.parametrize("half_life_kimg", [0.0, -1.0])
def test_ema_beta_is_zero_without_half_life(half_life_kimg):
    """A half-life of 0 (or less) means no averaging: beta 0, so the EMA copy follows G exactly."""
    assert ema_beta(16, half_life_kimg) == 0.0


# ---------------------------------------------------------------- ema_half_life_kimg


@pytest.mark.parametrize("stage_nimg", [0, 8, 10**6])
def test_ema_half_life_is_ema_kimg_without_rampup(stage_nimg):
    """No rampup: the configured half-life at every point of a stage."""
    assert ema_half_life_kimg(0.1, None, stage_nimg) == 0.1


@pytest.mark.parametrize(
    ("stage_nimg", "expected_kimg"),
    [(0, 0.0), (8, 0.0012), (1000, 0.15), (20_000, 3.0), (66_667, 10.0), (10**6, 10.0)],
)
def test_ema_half_life_grows_with_the_stage_up_to_ema_kimg(stage_nimg, expected_kimg):
    """With rampup r the half-life is r x the stage's kimg so far, capped at ema_kimg (StyleGAN2-ADA's rule);
    0 at the stage's first step, where beta is 0 and G_ema becomes G."""
    assert ema_half_life_kimg(10.0, 0.15, stage_nimg) == pytest.approx(expected_kimg, rel=1e-4, abs=1e-12)
    assert ema_beta(8, ema_half_life_kimg(10.0, 0.15, 0)) == 0.0
