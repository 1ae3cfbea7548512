"""Tests for pgan.metrics.modes: the mode classifiers' held-out accuracy and the mode-coverage numbers."""

import math
import sys

import pytest
import torch
from helpers import compose_config

from pgan.data import DigitsDataset, ShapesDataset, StackedDigitsDataset, make_dataset
from pgan.errors import UserError
from pgan.metrics.modes import (
    ModeClassifier,
    digit_kl,
    mode_classifier_for,
    mode_coverage,
    stacked,
    train_digits_classifier,
)

# The last third of the bundled digits (about 13 of the ~40 writers in load_digits' order) is held out of
# training, so accuracy is measured on handwriting the classifier has never seen.
HELD_OUT = range(1197, 1797)


@pytest.fixture(scope="module")
def digit_classifier() -> ModeClassifier:
    """A digit classifier fitted without the HELD_OUT digits."""
    return train_digits_classifier(exclude=HELD_OUT)


@pytest.fixture(scope="module")
def shapes_classifier() -> ModeClassifier:
    """The shapes classifier the trainer would use (fitted on items of its own seed, never on seed 0's)."""
    return mode_classifier_for(compose_config("data=shapes").data)


def batch(dataset, indices) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and true mode labels of `indices`."""
    images = torch.stack([dataset[i] for i in indices])
    return images, torch.tensor([dataset.mode_of(i) for i in indices])


def accuracy(classifier: ModeClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of `images` the classifier labels correctly."""
    predicted = classifier.predict(images)
    assert predicted.dtype == torch.int64 and predicted.shape == labels.shape
    return (predicted == labels).float().mean().item()


# ---------------------------------------------------------------- mode_coverage


def test_coverage_of_all_modes_equally_is_kl_zero() -> None:
    stats = mode_coverage(torch.arange(16).repeat(5), 16)
    assert stats["num_samples"] == 80 and stats["modes_covered"] == 16
    assert stats["kl_to_uniform"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("num_modes", [10, 16, 1000])
def test_coverage_of_one_mode_is_kl_log_num_modes(num_modes: int) -> None:
    stats = mode_coverage(torch.full((50,), 7), num_modes)
    assert stats["modes_covered"] == 1
    assert stats["kl_to_uniform"] == pytest.approx(math.log(num_modes))
    assert stats["max_kl"] == pytest.approx(math.log(num_modes))


def test_coverage_counts_and_kl_of_a_skewed_histogram() -> None:
    # Half the 10 modes, equally: KL = log 2. Then 3 of mode 0 and 1 of mode 1: KL = 0.75 log 7.5 + 0.25 log 2.5.
    half = mode_coverage(torch.tensor([0, 2, 4, 6, 8] * 3), 10)
    assert half["modes_covered"] == 5 and half["kl_to_uniform"] == pytest.approx(math.log(2))
    skewed = mode_coverage(torch.tensor([[0, 0], [0, 1]]), 10)  # any shape: labels are flattened
    assert skewed["num_samples"] == 4 and skewed["modes_covered"] == 2
    assert skewed["kl_to_uniform"] == pytest.approx(0.75 * math.log(7.5) + 0.25 * math.log(2.5))


def test_digit_kl_splits_stacked_labels_into_their_channels() -> None:
    # Red always 7 (KL log 10), green 0..9 equally (0), blue 3 and 8 equally (log 5): labels 7g3 and 7g8.
    labels = torch.tensor([700 + 10 * green + blue for green in range(10) for blue in (3, 8)])
    kl = digit_kl(labels)
    assert kl["kl_digits_red"] == pytest.approx(math.log(10))
    assert kl["kl_digits_green"] == pytest.approx(0.0, abs=1e-12)
    assert kl["kl_digits_blue"] == pytest.approx(math.log(5))
    # Independent channels: the joint KL is the sum of the channels' KLs.
    assert mode_coverage(labels, 1000)["kl_to_uniform"] == pytest.approx(sum(kl.values()))


def test_coverage_refuses_bad_labels() -> None:
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        mode_coverage(torch.tensor([3, 10]), 10)
    with pytest.raises(ValueError, match="at least one"):
        mode_coverage(torch.zeros(0, dtype=torch.long), 10)


# ---------------------------------------------------------------- digits


@pytest.mark.parametrize("resolution", [8, 64])
def test_digit_classifier_held_out_accuracy(digit_classifier: ModeClassifier, resolution: int) -> None:
    dataset = DigitsDataset(resolution)
    held_out = [i for i in range(len(dataset)) if dataset.digit_index(i) in set(HELD_OUT)]
    images, labels = batch(dataset, held_out)
    assert len(held_out) == 600
    assert accuracy(digit_classifier, images, labels) >= 0.95  # measured 0.978 at every resolution
    # A grayscale copy of the same digits gets the same labels.
    assert torch.equal(digit_classifier.predict(images[:, :1]), digit_classifier.predict(images))


@pytest.mark.parametrize("resolution", [8, 64])
def test_stacked_classifier_held_out_accuracy(digit_classifier: ModeClassifier, resolution: int) -> None:
    classifier = stacked(digit_classifier)
    assert classifier.num_modes == 1000
    dataset = StackedDigitsDataset(resolution, size=12000)
    held = set(HELD_OUT)
    # Items whose three digits are all held out: (600/1797)^3 of them, about 450.
    items = [i for i in range(len(dataset)) if held.issuperset(dataset.digit_indices(i))]
    images, labels = batch(dataset, items)
    assert len(items) > 300
    # All three digits must be right; measured 0.94, about the per-digit 0.978 cubed.
    assert accuracy(classifier, images, labels) >= 0.9


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("resolution", [8, 64])
def test_shapes_classifier_held_out_accuracy(shapes_classifier: ModeClassifier, resolution: int) -> None:
    assert shapes_classifier.num_modes == 16
    images, labels = batch(ShapesDataset(resolution, seed=0), range(500))
    assert accuracy(shapes_classifier, images, labels) >= 0.97  # measured 0.994 to 0.996 from 8 to 256 px


def test_coverage_of_real_and_collapsed_shapes(shapes_classifier: ModeClassifier) -> None:
    images, _ = batch(ShapesDataset(32, seed=1), range(800))
    real = mode_coverage(shapes_classifier.predict(images), 16)
    assert real["modes_covered"] == 16 and real["kl_to_uniform"] < 0.05  # 800 samples of 16 equiprobable modes
    collapsed = mode_coverage(shapes_classifier.predict(images[:1].expand(100, -1, -1, -1)), 16)
    assert collapsed["modes_covered"] == 1 and collapsed["kl_to_uniform"] == pytest.approx(math.log(16))


# ---------------------------------------------------------------- factory and errors


def test_factory_dispatches_on_dataset_and_config(shapes_classifier: ModeClassifier) -> None:
    assert mode_classifier_for(ShapesDataset(64)) is shapes_classifier  # fitted once per process
    digits = mode_classifier_for(make_dataset(compose_config("data=digits").data, 32))
    stacked_digits = mode_classifier_for(compose_config("data=stacked_digits").data)
    assert (digits.num_modes, stacked_digits.num_modes) == (10, 1000)
    assert stacked_digits.estimator is digits.estimator  # one digit classifier serves both
    assert mode_classifier_for(DigitsDataset(8, channels=1)) is digits


def test_factory_refuses_sources_without_known_modes() -> None:
    with pytest.raises(UserError, match="data.source=folder"):
        mode_classifier_for({"source": "folder", "channels": 3})


def test_predict_refuses_small_or_mismatched_images(shapes_classifier: ModeClassifier) -> None:
    with pytest.raises(ValueError, match="at least 8 px"):
        shapes_classifier.predict(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="expects 3 channels"):
        shapes_classifier.predict(torch.zeros(2, 1, 8, 8))
    assert shapes_classifier.predict(torch.zeros(0, 3, 16, 16)).shape == (0,)


def test_missing_scikit_learn_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.svm", None)  # makes `from sklearn.svm import SVC` fail
    with pytest.raises(UserError, match="pip install scikit-learn"):
        train_digits_classifier()
