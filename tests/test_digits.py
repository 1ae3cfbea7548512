"""Tests for pgan.data.digits: the bundled-digits and stacked-digits sources, their configs and resampling."""

import pickle
import sys

import pytest
import torch
from helpers import DATA_CONF_DIR, compose_config
from omegaconf import OmegaConf

from pgan.data import DigitsDataset, StackedDigitsDataset, make_dataset
from pgan.data.digits import NUM_DIGITS, downsample, load_digit_images, upsample, upsample_matrix
from pgan.errors import UserError

RESOLUTIONS = [8, 32, 64]


def assert_image(item: torch.Tensor, channels: int, resolution: int) -> None:
    """`item` is a float32 [channels, resolution, resolution] tensor in [-1, 1] with a black background."""
    assert item.shape == (channels, resolution, resolution)
    assert item.dtype == torch.float32
    assert item.min() >= -1.0 and item.max() <= 1.0
    assert item.min() == -1.0  # the digits are white on black: every channel has background pixels
    assert item.max() > 0.5  # and a bright stroke


def bundled(index: int) -> torch.Tensor:
    """Bundled digit `index` as an [8, 8] tensor on the datasets' [-1, 1] scale."""
    return load_digit_images()[0][index] * 2 - 1


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("name, size", [("digits", NUM_DIGITS), ("stacked_digits", 50000)])
def test_config_files_name_their_source(name: str, size: int) -> None:
    cfg = OmegaConf.load(DATA_CONF_DIR / f"{name}.yaml")
    assert (cfg.source, cfg.channels, cfg.size, cfg.seed, cfg.num_workers) == (name, 3, size, 0, 1)


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_make_dataset_digits_from_composed_config(resolution: int) -> None:
    cfg = compose_config("data=digits")
    assert cfg.model.image_channels == 3
    dataset = make_dataset(cfg.data, resolution)
    assert isinstance(dataset, DigitsDataset) and len(dataset) == NUM_DIGITS and dataset.num_modes == 10
    for index in (0, 1, NUM_DIGITS - 1):
        item = dataset[index]
        assert_image(item, 3, resolution)
        assert torch.equal(item[0], item[1]) and torch.equal(item[1], item[2])  # grey repeated to RGB


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_make_dataset_stacked_digits_from_composed_config(resolution: int) -> None:
    dataset = make_dataset(compose_config("data=stacked_digits", "data.size=100", "data.seed=2").data, resolution)
    assert isinstance(dataset, StackedDigitsDataset) and len(dataset) == 100 and dataset.num_modes == 1000
    assert dataset.seed == 2
    for index in (0, 99):
        assert_image(dataset[index], 3, resolution)


def test_digits_grayscale_from_config() -> None:
    dataset = make_dataset(compose_config("data=digits", "data.channels=1").data, 32)
    assert_image(dataset[5], 1, 32)


def test_stacked_digits_refuse_one_channel() -> None:
    with pytest.raises(UserError, match=r"data.channels must be 3 for stacked_digits.*got 1"):
        make_dataset(compose_config("data=stacked_digits", "data.channels=1").data, 8)


def test_digits_refuse_two_channels() -> None:
    with pytest.raises(UserError, match="data.channels"):
        make_dataset(compose_config("data=digits", "data.channels=2").data, 8)


def test_missing_scikit_learn_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    load_digit_images.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes `from sklearn.datasets import` fail
    try:
        with pytest.raises(UserError, match="pip install scikit-learn"):
            DigitsDataset(8)
    finally:
        load_digit_images.cache_clear()  # the next caller loads the real digits again


# ---------------------------------------------------------------- digits


def test_digits_at_8_px_are_the_bundled_digits() -> None:
    dataset = DigitsDataset(8, channels=1)
    for index in (0, 10, 1000):
        assert torch.equal(dataset[index][0], bundled(dataset.digit_index(index)))
        assert dataset.mode_of(index) == int(load_digit_images()[1][dataset.digit_index(index)])


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_digits_are_deterministic(resolution: int) -> None:
    dataset = DigitsDataset(resolution, seed=4)
    assert torch.equal(dataset[7], dataset[7])
    assert torch.equal(dataset[7], DigitsDataset(resolution, seed=4)[7])
    assert dataset.mode_of(7) == DigitsDataset(resolution, seed=4).mode_of(7)


def test_digits_seed_picks_the_order_and_all_digits_appear() -> None:
    first, second = DigitsDataset(8, seed=0), DigitsDataset(8, seed=1)
    order = [first.digit_index(i) for i in range(NUM_DIGITS)]
    assert sorted(order) == list(range(NUM_DIGITS))  # a permutation: every digit exactly once
    assert order != [second.digit_index(i) for i in range(NUM_DIGITS)]
    assert {first.mode_of(i) for i in range(NUM_DIGITS)} == set(range(10))


def test_digits_larger_size_wraps() -> None:
    dataset = DigitsDataset(16, size=NUM_DIGITS + 10)
    assert len(dataset) == NUM_DIGITS + 10
    assert torch.equal(dataset[NUM_DIGITS + 3], dataset[3])
    assert dataset.mode_of(NUM_DIGITS + 3) == dataset.mode_of(3)
    with pytest.raises(IndexError):
        dataset[NUM_DIGITS + 10]


def test_digits_below_8_px_for_4_px_first_stages() -> None:
    # experiment=paper256 starts at 4 px: the digit is resized down (antialiased) rather than refused.
    dataset = DigitsDataset(4, channels=1)
    item = dataset[0]
    assert item.shape == (1, 4, 4) and item.min() >= -1 and item.max() <= 1
    digit = bundled(dataset.digit_index(0))[None, None]
    reference = torch.nn.functional.interpolate(digit, size=4, mode="bilinear", antialias=True, align_corners=False)
    assert torch.allclose(item, reference[0], atol=1e-6)


# ---------------------------------------------------------------- stacked digits


def test_stacked_mode_is_100_red_plus_10_green_plus_blue() -> None:
    dataset = StackedDigitsDataset(8, size=300, seed=5)
    labels = load_digit_images()[1]
    for index in range(300):
        red, green, blue = dataset.digit_indices(index)
        assert dataset.mode_of(index) == 100 * labels[red] + 10 * labels[green] + labels[blue]
    item = dataset[17]
    for channel, digit in enumerate(dataset.digit_indices(17)):
        assert torch.equal(item[channel], bundled(digit))  # red, green, blue in that order


def test_stacked_modes_spread_over_the_thousand() -> None:
    dataset = StackedDigitsDataset(8, size=2000)
    modes = {dataset.mode_of(i) for i in range(2000)}
    # 2000 uniform draws from 1000 modes hit about 1000 * (1 - e^-2) = 865 of them; dependent channels would not.
    assert 800 < len(modes) < 930
    assert all(0 <= mode < 1000 for mode in modes)


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_stacked_digits_are_deterministic(resolution: int) -> None:
    dataset = StackedDigitsDataset(resolution, seed=3)
    assert torch.equal(dataset[11], StackedDigitsDataset(resolution, seed=3)[11])
    assert dataset.digit_indices(11) != StackedDigitsDataset(resolution, seed=4).digit_indices(11)
    assert not torch.equal(dataset[11], dataset[12])


def test_datasets_pickle_for_dataloader_workers() -> None:
    for dataset in (DigitsDataset(32, seed=2), StackedDigitsDataset(32, seed=2)):
        copy = pickle.loads(pickle.dumps(dataset))
        assert torch.equal(copy[9], dataset[9]) and copy.mode_of(9) == dataset.mode_of(9)


# ---------------------------------------------------------------- resampling


@pytest.mark.parametrize("resolution", [8, 16, 32, 64, 256])
def test_downsample_inverts_the_datasets_upsampling(resolution: int) -> None:
    """The pair round-trips: an item at any resolution >= 8 downsamples back to its bundled 8x8 digit."""
    digits = DigitsDataset(resolution, channels=1)
    stacked = StackedDigitsDataset(resolution, size=10)
    assert torch.allclose(downsample(digits[3])[0], bundled(digits.digit_index(3)), atol=1e-5)
    expected = torch.stack([bundled(i) for i in stacked.digit_indices(4)])
    assert torch.allclose(downsample(stacked[4]), expected, atol=1e-5)


def test_upsampling_is_torch_bilinear() -> None:
    digits = load_digit_images()[0][:4, None]
    reference = torch.nn.functional.interpolate(digits, size=48, mode="bilinear", align_corners=False)
    assert torch.allclose(upsample(digits, 48), reference, atol=1e-6)
    assert torch.equal(upsample_matrix(8), torch.eye(8, dtype=torch.float64))
