"""Differentiable augmentation (pgan/augment.py): the operations' contracts, the same pipeline for reals and fakes,
ADA's adaptive p on scripted D outputs, and the trainer with augmentation on (logging, exact resume, config)."""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
from helpers import SAME_FUNCTION, TINY, TOLERANCE, assert_same_state, compose_config, stats_rows, torchrun
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pgan import dist
from pgan.augment import (
    AugmentPipe,
    adjust_p,
    augment,
    color,
    cut_out,
    cutout,
    parse_policy,
    translate,
    translation,
)
from pgan.checkpoint import load_checkpoint
from pgan.errors import UserError
from pgan.losses import make_loss
from pgan.networks import Discriminator, Generator
from pgan.train.loop import train
from pgan.train.step import d_step, g_step

OPS = {"translation": translation, "cutout": cutout, "color": color}
ALL = "color,translation,cutout"
FAST = ["diversity.enabled=false"]
SMALL = {"fmap_base": 64, "fmap_max": 16, "fmap_min": 4}  # the collapse watch is not what these runs test


def _images(n: int, channels: int, res: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return (torch.rand(n, channels, res, res, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2) - 1


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- the operations ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("res", [8, 16, 64])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", list(OPS))
def test_each_operation_keeps_the_shape_and_passes_gradients(name: str, channels: int, res: int) -> None:
    x = _images(6, channels, res).requires_grad_(True)
    y = OPS[name](x, 1.0, _gen())
    assert y.shape == x.shape and y.dtype == x.dtype
    (y * torch.randn(y.shape, generator=_gen(1))).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("policy", ["translation", "cutout", "color", ALL])
def test_gradients_are_exact_and_twice_differentiable(policy: str) -> None:
    """gradcheck and gradgradcheck in float64 with the random transform held fixed (the same generator seed in
    every call): R1 differentiates D(augment(reals)) w.r.t. the reals twice."""
    x = _images(2, 3, 8, dtype=torch.float64).requires_grad_(True)

    def fn(images: torch.Tensor) -> torch.Tensor:
        return augment(images, policy, 1.0, _gen(3))

    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("name", [*OPS, "all"])
def test_p_zero_is_the_identity_and_draws_nothing(name: str) -> None:
    x = _images(4, 3, 16)
    fn = partial(augment, policy=ALL) if name == "all" else OPS[name]
    rng_before = torch.get_rng_state()
    g = _gen()
    g_before = g.get_state()
    assert fn(x, p=0.0, generator=g) is x
    assert fn(x, p=0, generator=None) is x
    assert torch.equal(g.get_state(), g_before) and torch.equal(torch.get_rng_state(), rng_before)
    # A tensor p (the adaptive one: never read on the host) of 0 draws, but leaves every image bit for bit.
    assert torch.equal(fn(x, p=torch.tensor(0.0), generator=g), x)


@pytest.mark.parametrize("name", list(OPS))
def test_p_one_changes_the_images(name: str) -> None:
    x = _images(8, 3, 16)
    y = OPS[name](x, 1.0, _gen())
    changed = (y != x).flatten(1).any(dim=1)
    # A translation can draw (0, 0): 1 in 25 at 16 px; colour and cutout always change an image.
    assert changed.sum() >= (6 if name == "translation" else 8)


def test_p_is_a_per_image_probability() -> None:
    x = _images(2000, 1, 8)
    changed = (cutout(x, 0.3, _gen()) != x).flatten(1).any(dim=1).float().mean()
    assert changed == pytest.approx(0.3, abs=0.04)


def test_reals_and_fakes_go_through_the_same_pipeline() -> None:
    """The same images as reals and as fakes, the same random state: the same output (each image of a batch
    still draws its own transform)."""
    images = _images(8, 3, 16)
    as_reals = augment(images, ALL, 0.7, _gen(5))
    as_fakes = augment(images.clone(), ALL, 0.7, _gen(5))
    assert torch.equal(as_reals, as_fakes)
    # Not one transform for the batch: the same image eight times comes back in several versions.
    same = augment(images[:1].expand(8, -1, -1, -1), ALL, 0.7, _gen(5))
    assert len({tuple(image.flatten().tolist()) for image in same}) > 4


def test_the_steps_augment_every_image_d_sees() -> None:
    """d_step passes the reals and G(z) through the augmentation, g_step G(z): reals and fakes alike."""
    torch.manual_seed(0)
    G, D = Generator(8, latent_dim=16, **SMALL), Discriminator(8, **SMALL)
    seen: list[torch.Tensor] = []

    def spy(images: torch.Tensor) -> torch.Tensor:
        seen.append(images.detach().clone())
        return augment(images, ALL, 1.0)

    reals, z = _images(4, 3, 8), torch.randn(4, 16)
    opt = torch.optim.Adam(D.parameters(), fused=True)
    stats = d_step(G, D, opt, make_loss("wgan_gp"), reals, z, 1.0, augment=spy)
    with torch.no_grad():
        fakes = G(z, 1.0)
    assert len(seen) == 2 and torch.equal(seen[0], reals) and torch.equal(seen[1], fakes)
    assert -1 <= stats["Augment/rt"] <= 1 and torch.isfinite(stats["Loss/gp"])
    g_step(G, D, torch.optim.Adam(G.parameters(), fused=True), make_loss("wgan_gp"), z, 1.0, augment=spy)
    assert len(seen) == 3 and seen[2].shape == fakes.shape
    # R1 through the augmentation: the gradient w.r.t. the un-augmented reals (StyleGAN2-ADA's).
    stats = d_step(G, D, opt, make_loss("logistic", r1_gamma=1.0), reals, z, 1.0, augment=spy)
    assert stats["Loss/gp"] > 0 and torch.isfinite(stats["Loss/gp"])


def test_translation_moves_content_by_whole_pixels() -> None:
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6) + 1
    y = translate(x, torch.tensor([2, 0]), torch.tensor([-1, 3]))
    assert torch.equal(y[0, 0, :5, 2:], x[0, 0, 1:, :4])  # 2 px right, 1 px up
    assert (y[0, 0, 5, :] == 0).all() and (y[0, 0, :, :2] == 0).all()
    assert torch.equal(y[1, 0, 3:, :], x[1, 0, :3, :]) and (y[1, 0, :3] == 0).all()  # 3 px down
    # Random translations at 16 px: each image is its input shifted by whole pixels, at most 2 (1/8 of 16).
    x = torch.arange(16 * 16, dtype=torch.float32).reshape(1, 1, 16, 16).repeat(64, 1, 1, 1) + 1
    y = translation(x, 1.0, _gen())
    shifts = set()
    for i in range(64):
        found = [
            (dx, dy)
            for dx in range(-2, 3)
            for dy in range(-2, 3)
            if torch.equal(y[i], translate(x[i : i + 1], torch.tensor([dx]), torch.tensor([dy]))[0])
        ]
        assert len(found) == 1, f"image {i} is not a whole-pixel shift of at most 2 px"
        shifts.add(found[0])
    assert len(shifts) > 15  # the shifts are spread over the 25 possible ones


@pytest.mark.parametrize("res", [4, 8, 16, 64])
def test_cutout_sets_a_square_of_half_the_side_to_mid_grey(res: int) -> None:
    x = _images(64, 3, res).abs() + 0.5  # no pixel is 0 before
    y = cutout(x, 1.0, _gen())
    side = res // 2
    for i in range(64):
        cut = y[i] == 0
        assert (cut == cut[0:1]).all(), "every channel is cut alike"
        rows, cols = cut[0].any(dim=1).nonzero().flatten(), cut[0].any(dim=0).nonzero().flatten()
        assert 1 <= len(rows) <= side and 1 <= len(cols) <= side
        assert rows.diff().eq(1).all() and cols.diff().eq(1).all()  # contiguous: a rectangle ...
        assert cut[0].sum() == len(rows) * len(cols)  # ... filled
        # A square of the full side unless it reaches past a border.
        assert len(rows) == side or rows[0] == 0 or rows[-1] == res - 1
        assert torch.equal(y[i][~cut], x[i][~cut])
    assert torch.equal(cut_out(x[:1], torch.tensor([res]), torch.tensor([0]), side, side), x[:1])  # outside: none


def test_colour_keeps_values_in_a_reasonable_range() -> None:
    x = _images(1000, 3, 8)
    y = color(x, 1.0, _gen())
    # brightness +-0.5, saturation x [0, 2), contrast x [0.5, 1.5): at most 9 in absolute value, mostly near [-1, 1].
    assert y.abs().max() <= 9 and (y.abs() > 2).float().mean() < 0.05
    assert 0.5 < y.std() / x.std() < 2
    # A flat grey image is changed by the brightness alone: a shift in [-0.5, 0.5).
    flat = torch.full((200, 3, 8, 8), 0.25)
    shift = (color(flat, 1.0, _gen()) - flat).flatten(1)
    assert torch.allclose(shift, shift[:, :1], atol=1e-6) and (shift.abs() <= 0.5).all() and shift.std() > 0.2


def test_saturation_is_a_no_op_on_grey_images() -> None:
    """One-channel images get brightness and contrast only: what a grey image in three equal channels gets."""
    grey = _images(16, 1, 8)
    one = color(grey, 1.0, _gen(2))
    three = color(grey.expand(-1, 3, -1, -1), 1.0, _gen(2))
    torch.testing.assert_close(three, one.expand(-1, 3, -1, -1), rtol=0, atol=1e-6)


def test_the_ranks_draw_what_one_process_draws(monkeypatch) -> None:
    """Under torchrun each rank augments its chunk of the global batch with its rows of the global batch's random
    numbers: together exactly what one process computes (pgan.dist.draw_for_rank)."""
    images = _images(8, 3, 16)
    single = augment(images, ALL, 0.5, _gen(7))
    for rank in (0, 1):
        monkeypatch.setattr(dist, "current", lambda rank=rank: dist.Ranks(rank, 2, 0))
        chunk = augment(images[rank * 4 : (rank + 1) * 4], ALL, 0.5, _gen(7))
        assert torch.equal(chunk, single[rank * 4 : (rank + 1) * 4])


def test_channels_last_stays_channels_last() -> None:
    x = _images(4, 3, 16).contiguous(memory_format=torch.channels_last)
    assert augment(x, ALL, 1.0, _gen()).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    ("policy", "expected"),
    [("", ()), ("color, translation", ("color", "translation")), (["cutout"], ("cutout",)), (None, ())],
)
def test_policies_parse(policy, expected) -> None:
    assert parse_policy(policy) == expected


# --- adaptive p -------------------------------------------------------------------------------------------------


def test_adjust_p_moves_toward_the_target_and_clamps() -> None:
    """ADA's rule on scripted r_t: up when D is too sure of the reals (r_t > target), down below, by
    images / (adjust_kimg * 1000), within [0, 1]."""
    p = torch.tensor(0.5)
    step = 8 * 4 / (500 * 1000)
    assert adjust_p(p, torch.tensor(0.9), 0.6, 32, 500) == pytest.approx(0.5 + step)
    assert adjust_p(p, torch.tensor(0.1), 0.6, 32, 500) == pytest.approx(0.5 - step)
    assert adjust_p(p, torch.tensor(0.6), 0.6, 32, 500) == 0.5  # at the target: no change
    assert adjust_p(torch.tensor(0.99), torch.tensor(1.0), 0.6, 32_000, 500) == 1.0
    assert adjust_p(torch.tensor(0.01), torch.tensor(-1.0), 0.6, 32_000, 500) == 0.0
    # adjust_kimg thousand images take p from 0 to 1.
    p = torch.tensor(0.0)
    for _ in range(500_000 // 32):
        p = adjust_p(p, torch.tensor(1.0), 0.6, 32, 500)
    assert p == pytest.approx(1.0, abs=1e-3)


def test_the_adaptive_pipe_adjusts_every_interval_on_scripted_d_outputs() -> None:
    pipe = AugmentPipe(ALL, p=0.2, adaptive=True, target=0.6, adjust_kimg=0.32, interval=4)  # 0.1 per interval
    assert pipe.enabled and float(pipe.p) == pytest.approx(0.2)

    def feed(*signs: float) -> float:
        for s in signs:
            pipe.observe(torch.tensor(s), 8)
        return float(pipe.p)

    assert feed(1.0, 1.0, 1.0) == pytest.approx(0.2)  # not yet: 3 of 4 steps
    assert feed(1.0) == pytest.approx(0.3)  # r_t = 1 > 0.6: up
    assert feed(1.0, 1.0, -1.0, 0.6) == pytest.approx(0.2)  # r_t = mean 0.4 < 0.6: down
    assert feed(0.75, 0.75, float("nan"), 0.75) == pytest.approx(0.3)  # a skipped (NaN) step is left out
    assert feed(*[-1.0] * 16) == 0.0  # clamped at 0
    state = pipe.state_dict()
    feed(1.0, 1.0)
    resumed = AugmentPipe(ALL, p=0.2, adaptive=True, target=0.6, adjust_kimg=0.32, interval=4)
    resumed.load_state_dict(pipe.state_dict())
    assert feed(1.0, 1.0) == pytest.approx(0.1)  # the partial interval carried on ...
    for s in (1.0, 1.0, 1.0, 1.0):
        resumed.observe(torch.tensor(s), 8)
    assert float(resumed.p) == float(pipe.p)  # ... in a checkpointed copy too
    assert float(state["p"]) == 0.0 and AugmentPipe(ALL, p=0.5).state_dict() is None  # a fixed p: the config's


# --- the trainer ------------------------------------------------------------------------------------------------


def test_a_run_with_augmentation_trains_and_logs_p(tmp_path: Path) -> None:
    train(compose_config(*TINY, *FAST, f"augment.policy=[{ALL}]", "augment.p=0.5"), tmp_path)
    rows = stats_rows(tmp_path)
    assert all(r["Augment/p"] == 0.5 and -1 <= r["Augment/rt"] <= 1 for r in rows)
    assert all(torch.isfinite(torch.tensor([r["Loss/D"], r["Loss/G"], r.get("Loss/gp", 0.0)])).all() for r in rows)
    assert any("Loss/gp" in r for r in rows)  # lazy R1 / R2: logged by the ticks that had a penalty step
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert {"Augment/p", "Augment/rt"} <= set(events.Tags()["scalars"])
    assert load_checkpoint(tmp_path / "stage-0016" / "final.pt")["augment"] is None  # a fixed p is the config's


def test_p_zero_changes_nothing(tmp_path: Path) -> None:
    """A policy at p = 0 draws no random number and logs nothing new: bit-identical to a run without a policy."""
    overrides = [*TINY, *FAST, "schedule.resolutions=[8]", "schedule.stable_kimg=0.048"]
    train(compose_config(*overrides), tmp_path / "off")
    train(compose_config(*overrides, f"augment.policy=[{ALL}]", "augment.p=0"), tmp_path / "p0")
    final = "stage-0008/final.pt"
    assert_same_state(load_checkpoint(tmp_path / "p0" / final), load_checkpoint(tmp_path / "off" / final))
    logged = [
        {k: v for k, v in r.items() if not k.startswith(("Speed/", "Resources/"))} for r in stats_rows(tmp_path / "p0")
    ]
    assert logged == [{k: v for k, v in r.items() if k in logged[0]} for r in stats_rows(tmp_path / "off")]
    assert not any(k.startswith("Augment/") for k in logged[0])


ADAPTIVE = [
    *TINY,
    *FAST,
    f"augment.policy=[{ALL}]",
    "augment.adaptive=true",
    "augment.p=0.5",  # where it starts: mid-range, so that every adjustment shows
    "augment.adjust_kimg=1",  # 0.032 per interval of 4 steps of 8 images
    "loss=logistic",
    "loss.r1_gamma=1.0",  # R1 through the augmentation
]


def test_adaptive_p_is_carried_across_stages_saved_and_resumed_bit_identically(tmp_path: Path) -> None:
    full = tmp_path / "full"
    train(compose_config(*ADAPTIVE), full)
    final = load_checkpoint(full / "stage-0016" / "final.pt")
    # 20 steps: 5 adjustments of +-0.032 (r_t, a multiple of 1/32, is never the target 0.6): p has moved.
    assert final["augment"]["p"] != 0.5 and 0 <= float(final["augment"]["p"]) <= 1
    ps = [r["Augment/p"] for r in stats_rows(full)]
    assert len(set(ps)) > 1 and all(abs(round((p - 0.5) / 0.032) * 0.032 + 0.5 - p) < 1e-6 for p in ps)
    # The 16 px stage starts where the 8 px stage ended (its first snapshot is taken before any step).
    first16 = load_checkpoint(full / "stage-0016" / "ckpt-0000000000.pt")["augment"]
    end8 = load_checkpoint(full / "stage-0008" / "final.pt")["augment"]
    assert all(torch.equal(torch.as_tensor(first16[k]), torch.as_tensor(end8[k])) for k in end8)
    assert end8["steps"] == 2  # the 8 px stage's 2 steps: the interval of 4 goes on into the 16 px stage
    # Killed mid-stage: resumed from stage 16's latest snapshot, the same weights, p and logs.
    latest = load_checkpoint(full / "stage-0016" / "latest.pt")
    assert 0 < latest["nimg"] < final["nimg"]
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "stage-0008", resumed / "stage-0008")
    (resumed / "stage-0016").mkdir()
    shutil.copy(full / "stage-0016" / "latest.pt", resumed / "stage-0016" / "latest.pt")
    train(compose_config(*ADAPTIVE), resumed)
    again = load_checkpoint(resumed / "stage-0016" / "final.pt")
    assert_same_state(again, final)
    for key, value in final["augment"].items():
        assert torch.equal(torch.as_tensor(again["augment"][key]), torch.as_tensor(value)), key
    rows = {r["step"]: r for r in stats_rows(full)}
    for row in stats_rows(resumed):
        assert row["Augment/p"] == rows[row["step"]]["Augment/p"] and row["Loss/D"] == rows[row["step"]]["Loss/D"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["augment.policy=[color,flip]"], "augment.policy: unknown augmentation 'flip'; choose from color"),
        (["augment.policy='color,color'"], "augment.policy: 'color' is named twice"),
        (["augment.policy=color", "augment.p=1.5"], "augment.p must be a probability in [0, 1], got 1.5"),
        (["augment.policy=color", "augment.p=-0.1"], "augment.p must be a probability"),
        (["augment.policy=color", "augment.p=often"], "augment.p must be a probability in [0, 1], got 'often'"),
        (["augment.policy=color", "augment.adaptive=yes"], "augment.adaptive must be true or false"),
        (["augment.policy=color", "augment.target=1.0"], "augment.target must be in (0, 1)"),
        (["augment.policy=color", "augment.target=0"], "augment.target must be in (0, 1)"),
        (["augment.policy=color", "augment.adjust_kimg=0"], "augment.adjust_kimg must be > 0"),
        (["augment.policy=color", "augment.interval=0"], "augment.interval must be an integer >= 1"),
        (["augment.policy=color", "augment.interval=2.5"], "augment.interval must be an integer >= 1"),
        (["augment.p=0.5"], "augment.p=0.5 but augment.policy is empty"),
        (["augment.adaptive=true"], "augment.adaptive=true but augment.policy is empty"),
    ],
)
def test_bad_augment_settings_are_one_line_user_errors(overrides: list[str], message: str, tmp_path: Path) -> None:
    with pytest.raises(UserError) as info:
        train(compose_config(*TINY, *overrides), tmp_path / "run")
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_augment_and_adapt_p_like_one_process(tmp_path: Path) -> None:
    """torchrun with 2 ranks: each augments its chunk with its rows of the global batch's random numbers, r_t is
    averaged across the ranks, so p and the weights are those of one process with the same global batch."""
    overrides = [*ADAPTIVE, *SAME_FUNCTION]
    (tmp_path / "ddp").mkdir()
    result = torchrun(tmp_path / "ddp" / "run", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    ours = load_checkpoint(tmp_path / "ddp" / "run" / "stage-0016" / "final.pt")
    theirs = load_checkpoint(train(compose_config(*overrides), tmp_path / "single"))
    assert torch.equal(ours["augment"]["p"], theirs["augment"]["p"])
    for key in ("G", "D", "G_ema"):
        for name, value in ours[key].items():
            torch.testing.assert_close(value, theirs[key][name], **TOLERANCE, msg=f"{key}.{name}")
