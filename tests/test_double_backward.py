"""experiments/throughput/double_backward.py: pgan's convolution timed in turns against PyTorch's F.conv2d."""

from __future__ import annotations

import sys

import torch
from helpers import experiment_script

import pgan.layers

double_backward = experiment_script("throughput/double_backward.py")


def test_the_library_side_runs_f_conv2d_and_restores_same_conv2d() -> None:
    """Inside `library_convolution()` a conv layer's output, in a pass differentiated twice, comes from F.conv2d's
    autograd node; after it (also after an error), from same_conv2d's again."""
    layer = pgan.layers.EqualizedConv2d(2, 3, 3)
    x = torch.randn(1, 2, 5, 5)
    with pgan.layers.differentiated_twice():
        with double_backward.library_convolution():
            assert type(layer(x).grad_fn).__name__ == "ConvolutionBackward0"
        assert type(layer(x).grad_fn).__name__ == "SameConv2dBackward"
    try:
        with double_backward.library_convolution():
            raise RuntimeError
    except RuntimeError:
        pass
    assert pgan.layers.same_conv2d is double_backward.OURS


def test_one_round_prints_a_row_per_case(monkeypatch, capsys) -> None:
    """The R1 pass and each variant's iteration, each with both times and a speedup."""
    argv = ["double_backward.py", "--resolutions", "8", "--variants", "default", "every_step", "--batch", "4"]
    monkeypatch.setattr(sys, "argv", [*argv, "--warmup", "0", "--rounds", "1", "--steps", "4"])
    double_backward.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 8 |")]
    assert [row.split(" | ")[1] for row in rows] == ["R1 pass on D", "iteration, `default`", "iteration, `every_step`"]
    for row in rows:
        library_ms, ours_ms = (float(cell) for cell in row.split(" | ")[2:4])
        assert library_ms > 0 and ours_ms > 0 and "×" in row
