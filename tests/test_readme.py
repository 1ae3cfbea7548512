"""The README and docs/ stay true: their pgan-* commands compose, the make targets they name exist, their Python
snippets run, and their relative links point at files (and headings) that exist."""

from __future__ import annotations

import importlib
import re
import shlex
import tomllib
from pathlib import Path

import pytest
from conftest import compose_config
from omegaconf import OmegaConf

from pgan.schedule import stages_from_config

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TEXTS = {page.relative_to(ROOT).as_posix(): page.read_text() for page in PAGES}
README = TEXTS["README.md"]
FENCE = re.compile(r"```[^\n]*\n.*?```", flags=re.S)


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


PYTHON_SNIPPETS = [s for text in TEXTS.values() for s in _blocks(text, "python")]


def _commands(program: str, texts: dict[str, str] = TEXTS) -> list[tuple[str, list[str]]]:
    """Every `program ...` line in the pages' bash blocks, continuation lines joined, split like a shell, with
    the page it is on."""
    found = []
    for page, text in texts.items():
        lines = [line.strip() for line in "\n".join(_blocks(text, "bash")).replace("\\\n", " ").splitlines()]
        found += [(page, shlex.split(line.split("#")[0])) for line in lines if line.startswith(program + " ")]
    return found


def _id(page: str, command: list[str]) -> str:
    return f"{page}: {' '.join(command)[:60]}"


# torchrun lines count as pgan-train commands: what follows `-m pgan.train` are pgan-train's arguments.
TORCHRUN = [(page, c[c.index("pgan.train") :]) for page, c in _commands("torchrun")]
TRAIN_COMMANDS = [(page, c) for page, c in _commands("pgan-train") if "--help" not in c] + TORCHRUN


def test_docs_show_single_and_multi_node_torchrun() -> None:
    lines = [" ".join(c) for _, c in _commands("torchrun")]
    assert any("--standalone" in c and "-m pgan.train" in c for c in lines)
    assert any("--nnodes=2" in c and "--node_rank=" in c and "--rdzv_endpoint=" in c for c in lines)


def test_docs_have_train_commands() -> None:
    """The pages show the paper preset, a custom run, resuming and chained stages."""
    joined = [" ".join(c) for _, c in TRAIN_COMMANDS]
    assert any("experiment=paper256" in c for c in joined)
    assert any("init_from=" in c for c in joined)
    assert any(c.split()[1:] and all(a.startswith("hydra.run.dir=") for a in c.split()[1:]) for c in joined)


def test_readme_tour_shows_each_step() -> None:
    """The README itself shows training, watching, resuming, sampling, evaluating, reporting, export and demo."""
    steps = ("pgan-train", "tensorboard", "pgan-sample", "pgan-eval", "pgan-report", "pgan-export", "pgan-demo")
    assert all(_commands(program, {"README.md": README}) for program in steps)
    resume = [c for p, c in TRAIN_COMMANDS if p == "README.md" and all(a.startswith("hydra.run.dir=") for a in c[1:])]
    assert resume and all(c[1:] for c in resume)


@pytest.mark.parametrize(("page", "command"), TRAIN_COMMANDS, ids=[_id(p, c[1:]) for p, c in TRAIN_COMMANDS])
def test_docs_train_command_composes(page: str, command: list[str]) -> None:
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


def test_docs_make_targets_exist() -> None:
    """`make <target>` on any page names a real Makefile target, and the README's first two are train and test."""
    makefile = (ROOT / "Makefile").read_text()

    def targets(text: str) -> list[str]:
        return re.findall(r"^make (\w[\w-]*)", "\n".join(_blocks(text, "bash")), re.M)

    assert targets(README)[:2] == ["train", "test"]
    for target in {t for text in TEXTS.values() for t in targets(text)}:
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), target


def test_docs_python_snippet_rebuilds_the_generator(tmp_path: Path) -> None:
    """The snippet that rebuilds G_ema from a final.pt runs and produces images."""
    from conftest import TINY

    from pgan.train.loop import train

    final = train(compose_config(*TINY), tmp_path)
    (snippet,) = [s for s in PYTHON_SNIPPETS if "runs/my-run/stage-0256/final.pt" in s]
    namespace: dict = {}
    exec(snippet.replace("runs/my-run/stage-0256/final.pt", str(final)), namespace)
    assert namespace["images"].shape == (16, 3, 16, 16)


def test_docs_export_snippet_loads_an_export_directory(tmp_path: Path) -> None:
    """The snippet that loads an exported generator runs on a real pgan-export directory."""
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
OTHER_COMMANDS = [(name, page, c) for name in CLIS for page, c in _commands(f"pgan-{name}")]


@pytest.mark.parametrize(
    ("config_name", "page", "command"), OTHER_COMMANDS, ids=[_id(p, c) for _, p, c in OTHER_COMMANDS]
)
def test_docs_other_commands_compose(config_name: str, page: str, command: list[str]) -> None:
    """The command composes into its config, and plain values land in it as written."""
    args = ["mode=timelapse" if a == "timelapse" else a for a in command[1:]]  # what pgan-sample's main does
    cfg = compose_config(*args, config_name=config_name)
    for override in args:
        key, value = override.split("=", 1)
        if key in cfg and not OmegaConf.is_config(cfg[key]):  # group choices like data=shapes select a node
            assert str(cfg[key]).lower() == value.lower()  # force=true composes to True


def test_docs_show_every_command() -> None:
    """Every installed pgan-* command has an example that composes, and a section of its own in docs/commands.md."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {name for name, _, _ in OTHER_COMMANDS} | {"train"} == {s.removeprefix("pgan-") for s in scripts}
    headings = set(re.findall(r"^## (pgan-[\w-]+)$", FENCE.sub("", TEXTS["docs/commands.md"]), re.M))
    assert headings == set(scripts)


def test_readme_links_every_docs_page() -> None:
    """Every page under docs/ is one hop from the README."""
    linked = {target.split("#")[0] for _, target in _links("README.md")}
    assert {page for page in TEXTS if page.startswith("docs/")} <= linked


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation (backticks too) dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        slug, n = _slug(heading), 1
        while slug in anchors:  # a repeated heading gets -1, -2, ...
            slug, n = f"{_slug(heading)}-{n}", n + 1
        anchors.add(slug)
    return anchors


def _links(page: str) -> list[tuple[str, str]]:
    """(page, target) of every relative link and image on the page, outside code blocks and code spans."""
    text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", TEXTS[page]))
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [(page, t) for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # not http:, mailto:, ...


LINKS = [link for page in TEXTS for link in _links(page)]


@pytest.mark.parametrize(("page", "target"), LINKS, ids=[f"{p} -> {t}" for p, t in LINKS])
def test_docs_relative_link_points_at_a_file(page: str, target: str) -> None:
    """A relative link resolves to a file or folder of the repository; an #anchor to a heading of that page."""
    path, _, anchor = target.partition("#")
    resolved = (ROOT / page).parent / path if path else ROOT / page
    assert resolved.exists(), f"{page}: {target} does not exist"
    assert resolved.resolve().is_relative_to(ROOT), f"{page}: {target} leaves the repository"
    if anchor and resolved.suffix == ".md":
        assert anchor in _anchors(resolved), f"{page}: {target}: no heading with that anchor"


def test_links_are_found() -> None:
    """The link scan sees the README's links (a guard against a regex that finds nothing)."""
    assert len([t for p, t in LINKS if p == "README.md"]) >= len([p for p in TEXTS if p.startswith("docs/")])


# The pages say where things live (docs/layout.md above all): every file and every pgan.* object they name exists.
NAMED_PATHS = sorted(
    {p for text in TEXTS.values() for p in re.findall(r"`((?:pgan|conf|tests|experiments)/[^`<>*\s]*)`", text)}
)
NAMED_OBJECTS = sorted({n for text in TEXTS.values() for n in re.findall(r"`(pgan(?:\.\w+)+)`", text)})


@pytest.mark.parametrize("path", NAMED_PATHS)
def test_docs_named_path_exists(path: str) -> None:
    assert (ROOT / path).exists(), path


@pytest.mark.parametrize("name", NAMED_OBJECTS)
def test_docs_named_object_exists(name: str) -> None:
    """`pgan.a.b.c`: the longest importable module prefix, then attributes."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
            break
        except ModuleNotFoundError:
            continue
    for attr in parts[i:]:
        obj = getattr(obj, attr)
