"""experiments/throughput/op_times.py: per-op times of an iteration, convolutions by shape, iterations by phase."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import FakeClock, experiment_script
from torch.utils.flop_counter import FlopCounterMode

op_times = experiment_script("throughput/op_times.py")


def test_every_convolution_flop_lands_under_its_shape_and_the_gradients_it_computes() -> None:
    x, w, b = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3, requires_grad=True), torch.zeros(4, requires_grad=True)
    with FlopCounterMode(display=False) as reference:
        F.conv2d(x, w, b, padding=1).square().sum().backward()
    with op_times.OpTimes() as times:
        F.conv2d(x, w, b, padding=1).square().sum().backward()
    assert set(times.conv_flops) == {
        "fwd (2, 3, 8, 8) x (4, 3, 3, 3)",
        "bwd (2, 3, 8, 8) x (4, 3, 3, 3) -> weight bias",
    }
    assert sum(times.conv_flops.values()) == reference.get_total_flops() > 0
    assert times.calls["aten.convolution"] == 1 and times.calls["aten.convolution_backward"] == 1
    assert all(s > 0 for s in times.conv_seconds.values())
    assert sum(times.conv_seconds.values()) <= sum(times.seconds.values())


def test_iterations_are_timed_by_their_phase_in_the_penalty_period(monkeypatch) -> None:
    """Index 0 of every period is the lazy penalty's iteration: here it costs 3 units, the others 1."""
    clock, index = FakeClock(), iter(range(100))
    monkeypatch.setattr(op_times.time, "perf_counter", clock)

    def step() -> None:
        clock.now += 3.0 if next(index) % 4 == 0 else 1.0

    assert op_times.seconds_by_phase(step, period=4, cycles=3) == pytest.approx([3.0, 1.0, 1.0, 1.0])
