"""The README stays true: its pgan-train commands compose, and the make targets it names exist."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from conftest import compose_config
from omegaconf import OmegaConf

from pgan.train.loop import stages_from_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYTHON_SNIPPETS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def _commands(program: str) -> list[list[str]]:
    """Every `program ...` line in the README's bash blocks, continuation lines joined, split like a shell."""
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    lines = [line.strip() for line in "\n".join(blocks).replace("\\\n", " ").splitlines()]  # also in lists
    return [shlex.split(line.split("#")[0]) for line in lines if line.startswith(program + " ")]


# torchrun lines count as pgan-train commands: what follows `-m pgan.train` are pgan-train's arguments.
TORCHRUN = [c[c.index("pgan.train") :] for c in _commands("torchrun")]
TRAIN_COMMANDS = [c for c in _commands("pgan-train") if "--help" not in c] + TORCHRUN


def test_readme_shows_single_and_multi_node_torchrun() -> None:
    lines = [" ".join(c) for c in _commands("torchrun")]
    assert any("--standalone" in c and "-m pgan.train" in c for c in lines)
    assert any("--nnodes=2" in c and "--node_rank=" in c and "--rdzv_endpoint=" in c for c in lines)


def test_readme_has_train_commands() -> None:
    """The README shows the paper preset, a custom run, resuming and chained stages."""
    joined = [" ".join(c) for c in TRAIN_COMMANDS]
    assert any("experiment=paper256" in c for c in joined)
    assert any("init_from=" in c for c in joined)
    assert any(c.split()[1:] and all(a.startswith("hydra.run.dir=") for a in c.split()[1:]) for c in joined)


@pytest.mark.parametrize("command", TRAIN_COMMANDS, ids=[" ".join(c[1:])[:60] for c in TRAIN_COMMANDS])
def test_readme_train_command_composes(command: list[str]) -> None:
    """Each documented pgan-train command composes into a config with a valid schedule."""
    # Hydra's own settings (hydra.*, hydra/launcher=...) and flags (-m) are not the job's config.
    overrides = [a for a in command[1:] if not a.startswith(("hydra.", "hydra/", "-"))]
    cfg = compose_config(*overrides)
    assert stages_from_config(cfg)
    for override in overrides:  # the values really land in the config
        key, value = override.split("=", 1)
        if "." in key and not value.startswith(("[", "{")):
            node = cfg
            for part in key.split("."):
                node = node[part]
            assert (str(node).lower() if isinstance(node, bool) else str(node)) == value


def test_readme_make_targets_exist() -> None:
    """`make <target>` in the README names a real Makefile target, and the first two are train and test."""
    makefile = (ROOT / "Makefile").read_text()
    targets = re.findall(r"^make (\w+)", "\n".join(re.findall(r"```bash\n(.*?)```", README, flags=re.S)), re.M)
    assert targets[:2] == ["train", "test"]
    for target in set(targets):
        assert re.search(rf"^{target}:", makefile, re.M), target


def test_readme_python_snippet_rebuilds_the_generator(tmp_path: Path) -> None:
    """The README's snippet that rebuilds G_ema from a final.pt runs and produces images."""
    from conftest import TINY

    from pgan.train.loop import train

    final = train(compose_config(*TINY), tmp_path)
    (snippet,) = [s for s in PYTHON_SNIPPETS if "runs/my-run/stage-0256/final.pt" in s]
    namespace: dict = {}
    exec(snippet.replace("runs/my-run/stage-0256/final.pt", str(final)), namespace)
    assert namespace["images"].shape == (16, 3, 16, 16)


def test_readme_export_snippet_loads_an_export_directory(tmp_path: Path) -> None:
    """The README's snippet that loads an exported generator runs on a real pgan-export directory."""
    from conftest import TINY

    from pgan.export import export_safetensors, load_generator
    from pgan.train.loop import train

    G, alpha = load_generator(train(compose_config(*TINY), tmp_path / "run"))
    export_safetensors(G, alpha, tmp_path / "export")
    (snippet,) = [s for s in PYTHON_SNIPPETS if "exports/my-run" in s]
    namespace: dict = {}
    exec(snippet.replace("exports/my-run", str(tmp_path / "export")), namespace)
    assert namespace["images"].shape == (16, 3, 16, 16)


# Each documented command of the other CLIs composes, and its values land in the config.
CLIS = ("eval", "bench", "prepare", "sample", "export", "demo", "report")
OTHER_COMMANDS = [(name, c) for name in CLIS for c in _commands(f"pgan-{name}")]


@pytest.mark.parametrize(("config_name", "command"), OTHER_COMMANDS, ids=[" ".join(c)[:60] for _, c in OTHER_COMMANDS])
def test_readme_eval_and_bench_commands_compose(config_name: str, command: list[str]) -> None:
    """The command composes into its config, and plain values land in it as written."""
    args = ["mode=timelapse" if a == "timelapse" else a for a in command[1:]]  # what pgan-sample's main does
    cfg = compose_config(*args, config_name=config_name)
    for override in args:
        key, value = override.split("=", 1)
        if key in cfg and not OmegaConf.is_config(cfg[key]):  # group choices like data=shapes select a node
            assert str(cfg[key]).lower() == value.lower()  # force=true composes to True


def test_readme_shows_eval_and_bench() -> None:
    assert {name for name, _ in OTHER_COMMANDS} == set(CLIS)
