"""The speed options of the training step (speed.compile, speed.reuse_fakes): what they compute, and their
one-line config errors. How fast they are is measured in experiments/throughput/, not here."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from helpers import TINY, compose_config
from torch._dynamo.utils import counters

from pgan.errors import UserError
from pgan.losses import make_loss
from pgan.networks import Discriminator, Generator
from pgan.train.loop import train
from pgan.train.step import fast_networks, train_step

SMALL = {"fmap_base": 64, "fmap_max": 16, "fmap_min": 4}


def _networks(seed: int = 0) -> tuple[Generator, Discriminator]:
    torch.manual_seed(seed)
    return Generator(8, latent_dim=16, **SMALL), Discriminator(8, **SMALL)


def _run(G, D, steps: int, alphas, loss=None, **options) -> tuple[Generator, Discriminator, list[dict]]:
    """`steps` iterations (WGAN-GP unless `loss`) from fixed data and latents (the same random stream for every
    variant)."""
    loss = loss or make_loss("wgan_gp")
    G_ema = copy.deepcopy(G).requires_grad_(False)
    opts = [torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.0, 0.99), fused=True) for net in (G, D)]
    reals = torch.rand(4, 3, 8, 8) * 2 - 1
    torch.manual_seed(1)
    stats = []
    for i in range(steps):
        stats.append(train_step(G, D, G_ema, *opts, loss, reals, alphas[i], 0.9, None, i, **options))
    return G, D, stats


def test_compiled_step_matches_the_eager_step_and_does_not_recompile_per_alpha() -> None:
    """G and D compiled, the gradient penalty through the eager D (a compiled graph has no double backward):
    the same updates as eager up to float reassociation, and a fade's changing alpha reuses the graphs."""
    cfg = compose_config(*TINY, "speed.compile=true")
    alphas = [0.3, 0.4, 0.5, 0.6]
    G, D = _networks()
    eager_G, eager_D, eager_stats = _run(*_networks(), 4, alphas)
    G_fast, D_fast = fast_networks(G, D, cfg.speed.compile, cfg.speed.compile_mode)
    assert G_fast is not G and D_fast is not D
    _run(G_fast, D_fast, 2, alphas, eager_D=D)
    graphs = counters["stats"]["unique_graphs"]
    _, _, fast_stats = _run(G_fast, D_fast, 2, alphas[2:], eager_D=D)  # new alphas, same phase
    assert counters["stats"]["unique_graphs"] == graphs
    # Fresh networks to compare the whole 4-step trajectory with eager.
    G2, D2 = _networks()
    G2_fast, D2_fast = fast_networks(G2, D2, cfg.speed.compile, cfg.speed.compile_mode)
    _, _, compiled_stats = _run(G2_fast, D2_fast, 4, alphas, eager_D=D2)
    for a, b in zip(eager_G.parameters(), G2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(eager_D.parameters(), D2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert compiled_stats[-1]["Loss/gp"].item() == pytest.approx(eager_stats[-1]["Loss/gp"].item(), rel=1e-3)


@pytest.mark.parametrize("name", ["rpgan", "wgan_gp"])
def test_with_the_approx_penalty_every_d_call_is_compiled(name: str) -> None:
    """loss.penalty_mode=approx: the compiled step never calls the eager D, and it makes the eager approximate
    step's updates up to float reassociation (with WGAN-GP: under rpgan D's output bias cancels from every
    term, and Adam turns its rounding-noise gradient into steps of about lr that differ with the order of
    the sums)."""

    class Forbidden(torch.nn.Module):
        def forward(self, *args):
            raise AssertionError("the approximate penalty called the eager D")

    gammas = {"r1_gamma": 1.0, "r2_gamma": 1.0} if name == "rpgan" else {}
    loss = make_loss(name, penalty_mode="approx", **gammas)
    alphas = [0.5, 1.0, 1.0]
    eager_G, eager_D, eager_stats = _run(*_networks(), 3, alphas, loss)
    G, D = _networks()
    G_fast, D_fast = fast_networks(G, D, True)
    _, _, stats = _run(G_fast, D_fast, 3, alphas, loss, eager_D=Forbidden())
    if name == "wgan_gp":
        for a, b in zip([*eager_G.parameters(), *eager_D.parameters()], [*G.parameters(), *D.parameters()]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for key in ("Loss/gp", "Loss/D", "Loss/G"):
        assert stats[-1][key].item() == pytest.approx(eager_stats[-1][key].item(), rel=1e-3, abs=1e-5)


def test_without_compile_the_networks_are_used_as_they_are() -> None:
    G, D = _networks()
    assert fast_networks(G, D, compose_config(*TINY).speed.compile) == (G, D)


def test_reuse_fakes_runs_g_forward_once_per_iteration_and_the_g_step_still_learns() -> None:
    counts = {}
    for reuse in (False, True):
        G, D = _networks()
        calls: list[int] = []
        G.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        before = [p.detach().clone() for p in G.parameters()]
        _, _, stats = _run(G, D, 3, [1.0] * 3, reuse_fakes=reuse)
        counts[reuse] = len(calls)
        assert all(torch.isfinite(s["Loss/G"]) for s in stats)
        assert any(not torch.equal(a, b) for a, b in zip(before, G.parameters()))  # G was updated
    assert counts == {False: 6, True: 3}


def test_reuse_fakes_trains_end_to_end(tmp_path: Path) -> None:
    final = train(compose_config(*TINY, "speed.reuse_fakes=true", "diversity.enabled=false"), tmp_path)
    assert final.is_file()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("speed.compile=sometimes", "speed.compile must be true or false, got 'sometimes'"),
        ("speed.reuse_fakes=1", "speed.reuse_fakes must be true or false, got 1"),
        ("speed.compile_mode=fastest", "speed.compile_mode must be one of default, reduce-overhead, max-autotune"),
    ],
)
def test_bad_speed_settings_are_user_errors(override: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=message):
        train(compose_config(*TINY, override), tmp_path)
    assert not any(tmp_path.iterdir())
