"""Quality metrics (issue 7): FID / KID / precision-recall / density-coverage / modes, their feature spaces,
and `pgan-eval metrics=[...]` with them. Known answers on the offline random embedding; no network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import compose_config

from pgan.cli.eval import evaluate
from pgan.data import ShapesDataset
from pgan.errors import UserError
from pgan.metrics.diversity import sample_dataset
from pgan.metrics.features import INCEPTION_FILE, feature_space, find_inception_weights
from pgan.metrics.prdc import density_coverage, kth_neighbour_radii, precision_recall
from pgan.metrics.quality import Precomputed, QualityEvaluator, fid_from_features, kid_from_features

PGAN_EVAL = str(Path(sys.executable).with_name("pgan-eval"))
CPU = torch.device("cpu")


def _gaussians(n: int, d: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale + shift


@pytest.mark.parametrize(("n_real", "n_fake", "dim"), [(50, 70, 64), (300, 200, 16)])  # n < d, then n > d
def test_fid_equals_torchmetrics_on_both_branches(n_real: int, n_fake: int, dim: int) -> None:
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = _gaussians(n_real, dim, 0), _gaussians(n_fake, dim, 1, shift=0.2, scale=1.3)
    reference = FrechetInceptionDistance(feature=Precomputed(dim)).double()
    reference.update(real, real=True)
    reference.update(fake, real=False)
    assert fid_from_features(real, fake) == pytest.approx(float(reference.compute()), rel=1e-6)


def test_fid_is_zero_for_a_set_against_itself_and_grows_with_a_shift() -> None:
    real = _gaussians(200, 32, 0)
    assert abs(fid_from_features(real, real)) < 1e-8
    shifts = [fid_from_features(real, real + s) for s in (0.1, 0.5, 1.0)]
    # a mean shift of s in every one of 32 dimensions adds exactly 32 s^2
    assert shifts == pytest.approx([32 * 0.01, 32 * 0.25, 32 * 1.0], rel=1e-9)


def test_kid_is_near_zero_for_one_distribution_and_leaves_the_global_rng_alone() -> None:
    real, same, other = _gaussians(100, 16, 0), _gaussians(100, 16, 1), _gaussians(100, 16, 2, shift=1.0)
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    same_kid, _ = kid_from_features(real, same)
    assert torch.equal(torch.random.get_rng_state(), before)
    other_kid, _ = kid_from_features(real, other)
    assert abs(same_kid) < 0.1 * other_kid
    assert kid_from_features(real, other, seed=3) == kid_from_features(real, other, seed=3)


def test_kth_neighbour_radius_skips_the_point_itself() -> None:
    points = torch.tensor([[0.0], [1.0], [3.0], [7.0]], dtype=torch.float64)
    assert kth_neighbour_radii(points, 1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert kth_neighbour_radii(points, 2).tolist() == [3.0, 2.0, 3.0, 6.0]
    with pytest.raises(ValueError, match="k=4 needs at least"):
        kth_neighbour_radii(points, 4)


def test_a_set_against_itself_has_full_precision_recall_and_coverage() -> None:
    real = _gaussians(120, 8, 0)
    assert precision_recall(real, real) == {"precision": 1.0, "recall": 1.0}
    assert density_coverage(real, real)["coverage"] == 1.0


def test_prdc_of_disjoint_collapsed_and_matching_sets() -> None:
    real = _gaussians(400, 8, 0)
    far = _gaussians(400, 8, 1, shift=20.0)
    assert precision_recall(real, far) == {"precision": 0.0, "recall": 0.0}
    assert density_coverage(real, far) == {"density": 0.0, "coverage": 0.0}
    collapsed = real[:1].expand(400, -1) + 1e-3 * _gaussians(400, 8, 2)  # every fake near one real point
    pr, dc = precision_recall(real, collapsed), density_coverage(real, collapsed)
    assert pr["precision"] == 1.0 and pr["recall"] < 0.05 and dc["coverage"] < 0.05
    fresh = _gaussians(400, 8, 3)  # another sample of the same distribution
    dc = density_coverage(real, fresh)
    assert 0.8 < dc["density"] < 1.2 and dc["coverage"] > 0.9


@pytest.fixture(scope="module")
def shapes() -> dict[str, torch.Tensor]:
    ds = ShapesDataset(32, size=2000, seed=0)
    a, b = sample_dataset(ds, 96, 1), sample_dataset(ds, 96, 2)
    return {"a": a, "b": b, "noisy": (b + 0.4 * torch.randn(b.shape, generator=torch.Generator().manual_seed(0)))}


def test_evaluator_on_the_offline_embedding_ranks_real_noisy_and_collapsed(shapes) -> None:
    evaluator = QualityEvaluator(["fid", "pr", "coverage"], shapes["a"], features=feature_space("random", None, CPU))
    itself, other, noisy = evaluator(shapes["a"]), evaluator(shapes["b"]), evaluator(shapes["noisy"].clamp(-1, 1))
    collapsed = evaluator(shapes["b"][:1].expand(96, -1, -1, -1).contiguous())
    assert itself["features"] == "random" and abs(itself["fid"]) < 1e-6 and itself["coverage"] == 1.0
    assert other["fid"] < noisy["fid"] < collapsed["fid"]
    assert other["coverage"] > noisy["coverage"] and collapsed["recall"] < 0.05 and collapsed["coverage"] < 0.2


def test_modes_counts_the_shapes_modes_of_real_and_collapsed_fakes(shapes) -> None:
    from pgan.metrics.modes import mode_classifier_for

    evaluator = QualityEvaluator(["modes"], shapes["a"], modes=mode_classifier_for({"source": "shapes"}))
    assert evaluator(shapes["b"])["modes_covered"] == 16
    collapsed = evaluator(torch.cat([shapes["b"][:1].expand(48, -1, -1, -1), shapes["b"][1:2].expand(48, -1, -1, -1)]))
    assert collapsed["modes_covered"] <= 2 and collapsed["kl_to_uniform"] > 2.0
    assert "kl_digits_red" not in collapsed  # the per-channel reading is for stacked digits only


def test_modes_of_stacked_digits_say_which_channel_the_kl_comes_from() -> None:
    from pgan.data import StackedDigitsDataset
    from pgan.metrics.modes import mode_classifier_for

    data = StackedDigitsDataset(16, size=600, seed=0)
    images = torch.stack([data[i] for i in range(600)])
    evaluator = QualityEvaluator(["modes"], images[:8], modes=mode_classifier_for(data))
    real = evaluator(images)
    assert max(real["kl_digits_red"], real["kl_digits_green"], real["kl_digits_blue"]) < 0.05
    blurred_blue = images.clone()
    blurred_blue[:, 2] = blurred_blue[:, 2].mean(0, keepdim=True)  # every blue digit is the average digit
    one_blue = evaluator(blurred_blue)
    assert one_blue["kl_digits_blue"] > 2.0 and one_blue["kl_digits_red"] == real["kl_digits_red"]


def _inception_weights_file(path: Path) -> Path:
    """A randomly initialised Inception-v3 state dict in torch-fidelity's layout (the real file is not here)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random init
            return None

    empty = path.with_suffix(".empty")
    torch.save({}, empty)
    torch.manual_seed(0)
    torch.save(Skeleton("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty)).state_dict(), path)
    return path


def test_inception_weights_load_from_a_path_and_from_the_hub_cache(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("torch_fidelity")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert find_inception_weights(None) is None
    cached = tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_FILE
    cached.parent.mkdir(parents=True)
    _inception_weights_file(cached)
    assert find_inception_weights(None) == cached
    space = feature_space("auto", None, CPU)
    images = torch.rand(3, 1, 16, 16) * 2 - 1  # grey images are repeated to RGB
    features = space.extract(images)
    assert space.name == "inception" and features.shape == (3, 2048) and torch.isfinite(features).all()
    assert torch.equal(features, feature_space("inception", str(cached), CPU).extract(images))


def test_missing_or_bad_inception_weights_are_one_line_errors(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty cache: nothing to find, nothing fetched
    with pytest.raises(UserError, match="Inception-v3 FID weights not found"):
        feature_space("inception", None, CPU)
    with pytest.raises(UserError, match="or features=random"):
        feature_space("auto", None, CPU, random_by_default=False)
    assert feature_space("auto", None, CPU).name == "random"  # pr / coverage fall back to the offline space
    with pytest.raises(UserError, match="inception_weights=/nope.pth: no such file"):
        feature_space("inception", "/nope.pth", CPU)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    pytest.importorskip("torch_fidelity")
    with pytest.raises(UserError, match="not Inception-v3 FID weights"):
        feature_space("inception", str(garbage), CPU)


@pytest.mark.subprocess
def test_pgan_eval_reports_every_metric_as_json(folders, tmp_path: Path) -> None:
    run = subprocess.run(
        [
            PGAN_EVAL,
            f"fake={folders['healthy']}",
            "data=shapes",
            "metrics=[fid,kid,pr,coverage,modes]",
            "features=random",
            "num_real=128",
            "device=cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        # A bare environment (no cached weights, no venv on PATH), with the suite's torch threads (conftest.py).
        env={"TORCH_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"]},
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["features"] == "random" and result["fid"] > 0 and result["modes_covered"] >= 14
    assert {"kid", "kid_std", "precision", "recall", "density", "coverage", "kl_to_uniform"} <= result.keys()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["metrics=[fid]"], "Inception-v3 FID weights not found"),
        (["metrics=[modes]", "real=REAL"], "modes needs a dataset with known modes"),
        (["metrics=[coverage]", "features=random", "num_real=5"], "need more than 5"),
        (["metrics=[fid]", "features=imagenet"], "features=imagenet: unknown"),
    ],
)
def test_metric_misuse_is_a_one_line_error(overrides, message, folders, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError, match=message):
        overrides = [o.replace("REAL", str(folders["real"])) for o in overrides]
        evaluate(compose_config(f"fake={folders['healthy']}", "device=cpu", *overrides, config_name="eval"))
