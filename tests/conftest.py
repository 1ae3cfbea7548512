"""Shared fixtures: the tiny config, and the tiny runs (and data folders) built once per session and read by many
test files. A test that changes a shared run trains, resumes or writes in its own copy (shutil.copytree)."""

from __future__ import annotations

import os

# torch on one thread unless OMP_NUM_THREADS says otherwise: the tiny networks gain nothing from a second one, and
# on a busy 2-core machine OpenMP threads waiting for each other made training ~10x slower (test_train.py: 177 s
# with 2 threads, 18 s with 1, at a load of 4). Set before torch is imported; the pgan-* and torchrun processes
# the tests start inherit it, so a run in this process and one in a CLI compute alike (bit for bit).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import logging  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from helpers import CONF_DIR, TINY, TINY_8PX, compose_config, file_listing, write_idx, write_images  # noqa: E402, F401
from omegaconf import DictConfig  # noqa: E402


@pytest.fixture
def tiny_cfg() -> DictConfig:
    """The tiny two-stage config."""
    return compose_config(*TINY)


def _built_once(tmp_path_factory, name: str, build: Callable[[Path], Path]) -> Iterator[Path]:
    """`build(folder)` in a new folder, yielded to every test of the session; afterwards, a check that no test
    changed, added or removed a file in it (they read it, or copy it first)."""
    root = tmp_path_factory.mktemp(name)
    result = build(root)
    before = file_listing(root)
    yield result
    assert file_listing(root) == before, f"a test changed the shared {root}: copy it first (shutil.copytree)"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Iterator[Path]:
    """A finished run of TINY (8 -> 16 px, diversity evaluations, snapshots of stage 16 at 0, 56 and 112 images).
    Read it; to resume, damage or report into it, copy it first."""
    yield from _built_once(tmp_path_factory, "tiny-run", _run_of(TINY))


@pytest.fixture(scope="session")
def tiny_run_8px(tmp_path_factory) -> Iterator[Path]:
    """A finished run of TINY's 8 px stage alone (TINY_8PX, diversity evaluations on). Read it, never change it."""
    yield from _built_once(tmp_path_factory, "tiny-run-8px", _run_of(TINY_8PX))


@pytest.fixture(scope="session")
def tiny_checkpoint_8px(tmp_path_factory) -> Iterator[Path]:
    """The final.pt of a tiny 8 px generator, trained for a few steps (TINY_8PX without the collapse watch):
    what pgan-sample, pgan-export and pgan-demo are tested on. Read it, never change it."""
    yield from _built_once(
        tmp_path_factory, "tiny-checkpoint-8px", lambda root: _trained([*TINY_8PX, "diversity.enabled=false"], root)
    )


def _trained(overrides: list[str], run_dir: Path) -> Path:
    """Train `overrides` into run_dir: the last stage's final.pt."""
    from pgan.train.loop import train  # here, not at the top: a trainer that fails to import fails its tests only

    return train(compose_config(*overrides), run_dir)


def _run_of(overrides: list[str]) -> Callable[[Path], Path]:
    """What _built_once builds for a run directory: `overrides` trained in the folder."""

    def build(root: Path) -> Path:
        _trained(overrides, root)
        return root

    return build


@pytest.fixture(scope="session")
def folders(tmp_path_factory) -> Iterator[dict[str, Path]]:
    """Real shapes, other healthy shapes, and a set collapsed onto 2 of them, as 32 px PNG folders."""

    def build(root: Path) -> dict[str, Path]:
        from pgan.data import ShapesDataset

        ds = ShapesDataset(32, size=1000, seed=0)
        healthy = [ds[i] for i in range(500, 628)]
        return {
            "real": write_images(root / "real", [ds[i] for i in range(128)]),
            "healthy": write_images(root / "healthy", healthy),
            "collapsed": write_images(root / "collapsed", [healthy[i % 2] for i in range(128)]),
        }

    yield from _built_once(tmp_path_factory, "images", build)


@pytest.fixture
def hydra_job_logging() -> Iterator[None]:
    """For a test that runs pgan-train's Hydra entry point in this process: Hydra's job logging adds the console and
    the run's train.log to the root logger; after the test the root logger is as it was (the handlers it added
    closed), so later tests in this worker do not log into a finished run."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's bundled 8x8 digits as 28x28 uint8 MNIST-like images (3x nearest upscale, 2 px border), labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images[:60] * (255 / 16)).astype(np.uint8)
    images = np.pad(images.repeat(3, axis=1).repeat(3, axis=2), ((0, 0), (2, 2), (2, 2)))
    return images, bunch.target[:60].astype(np.uint8)


@pytest.fixture
def mnist_root(tmp_path: Path, digits: tuple[np.ndarray, np.ndarray]) -> Path:
    """A root folder holding MNIST's four raw IDX files, as torchvision.datasets.MNIST(root) expects."""
    images, labels = digits
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "train-images-idx3-ubyte", images[:50])
    write_idx(raw / "train-labels-idx1-ubyte", labels[:50])
    write_idx(raw / "t10k-images-idx3-ubyte", images[50:])
    write_idx(raw / "t10k-labels-idx1-ubyte", labels[50:])
    return tmp_path
