"""experiments/cuda/run.sh is run only when a GPU is lent (minutes, a few times a month): every pgan-bench
command in it must be one that pgan-bench accepts, or the one chance is spent on an error. Checked here with the
same checks pgan-bench runs before measuring, on the CPU (no command is run)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from helpers import compose_config, experiment_script
from omegaconf import OmegaConf

from pgan.bench import check_bench_config, check_project
from pgan.losses import make_loss
from pgan.train.options import check_speed

RUN_SH = Path(__file__).resolve().parents[1] / "experiments" / "cuda" / "run.sh"
BENCH_MODULE = "python3 -m pgan.cli.bench"


def bench_commands(text: str) -> dict[str, list[str]]:
    """The script's `run NAME LIMIT $bench|$paper ARGS` lines, by NAME, as pgan-bench overrides: $bench and
    $paper expanded as the script defines them, continuation lines joined, a loop's $b taken per value."""
    joined = re.sub(r"\\\n\s*", " ", text)
    variables = dict(re.findall(r'^\s*(bench|paper)="([^"]*)"', joined, flags=re.M))
    commands = {}
    for line in joined.splitlines():
        loop = re.match(r"\s*for (\w+) in ([\w ]+); do", line)
        if loop:
            values = loop.group(2).split()
            continue
        match = re.match(r"\s*run (\S+) \d+ (.*)$", line)
        if not match:
            continue
        name, words = match.groups()
        for value in values if "$b" in name else [None]:
            expanded = words.replace("$b", str(value)) if value is not None else words
            for _ in range(2):  # $paper holds $bench
                expanded = expanded.replace("$paper", variables["paper"]).replace("$bench", variables["bench"])
            commands[name.replace("$b", str(value))] = expanded
    return {name: _overrides(command) for name, command in commands.items()}


def _overrides(command: str) -> list[str]:
    assert command.startswith(BENCH_MODULE), command
    return shlex.split(command[len(BENCH_MODULE) :])


COMMANDS = bench_commands(RUN_SH.read_text())


def test_the_script_has_its_measurements() -> None:
    """The rows the issue asks for: the paper model at 256 px (batch 16 / 32 / 64, eager, approx, CUDA graphs,
    compiled), the small model at 32 px (eager, and with CUDA graphs) and the paper schedule's projection."""
    assert {"paper256_eager_b16", "paper256_approx_b16", "paper256_approx_b32", "paper256_approx_b64"} <= set(COMMANDS)
    assert {"paper256_approx_graphs_b64", "paper256_approx_compiled_b64", "small32", "paper_projection"} <= set(
        COMMANDS
    )
    assert {"small32_graphs"} <= set(COMMANDS) and "speed.compile_mode=reduce-overhead" in COMMANDS["small32_graphs"]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_bench_command_passes_pgan_benchs_checks(name: str) -> None:
    overrides = COMMANDS[name]
    assert "device=cuda" in overrides
    cfg = compose_config(*overrides, config_name="bench")  # an unknown key or group choice fails here
    resolutions = check_bench_config(cfg)
    check_speed(cfg.speed)
    make_loss(**OmegaConf.to_container(cfg.loss, resolve=True))
    if cfg.get("project"):
        check_project(str(cfg.project), resolutions)
    if "model=paper" in overrides:
        assert cfg.model.name == "paper" and cfg.model.fmap_max == 512


def test_the_double_backward_step_is_a_command_its_script_accepts() -> None:
    """The optional `double_backward` step's arguments parse (double_backward.py's own parser: variants, and whole
    lazy-penalty periods in a round)."""
    joined = re.sub(r"\\\n\s*", " ", RUN_SH.read_text())
    (line,) = re.findall(r"python3 experiments/throughput/double_backward\.py ([^>]*)>", joined)
    module = experiment_script("throughput/double_backward.py")
    args = module.parse_args(shlex.split(line))
    assert (args.device, args.model, args.resolutions) == ("cuda", "paper", [256])
    with pytest.raises(SystemExit, match="multiple of 4"):  # and the parser does check the rounds' periods
        module.parse_args([*shlex.split(line), "--steps", "6"])
