"""Class labels from every data source (pgan.data.labels), through prepared stores and the training loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY, compose_config, load_conf
from PIL import Image

from pgan.data import DigitsDataset, ShapesDataset, StackedDigitsDataset, make_dataset
from pgan.data.labels import ClassLabels, class_labels, grid_classes, labels_from_names
from pgan.data.sampler import InfiniteSampler
from pgan.data.shapes import MODE_NAMES
from pgan.errors import UserError
from pgan.train.feed import make_loader, to_device_batch
from pgan.train.loop import train


def test_shapes_classes_are_the_modes() -> None:
    dataset = ShapesDataset(8, size=200, seed=3)
    labels = class_labels(dataset)
    assert labels.names == MODE_NAMES and labels.num_classes == 16
    assert labels.labels.tolist() == [dataset.mode_of(i) for i in range(200)]
    assert class_labels(dataset) is labels  # read once


def test_digit_classes_are_the_digits_and_stacked_classes_the_1000_modes() -> None:
    bundled = DigitsDataset(8, size=300, seed=1)
    labels = class_labels(bundled)
    assert labels.names == tuple("0123456789")
    assert labels.labels.tolist() == [bundled.mode_of(i) for i in range(300)]
    stacked = StackedDigitsDataset(8, size=50, seed=2)
    labels = class_labels(stacked)
    assert labels.num_classes == 1000 and labels.names[357] == "357"
    assert labels.labels.tolist() == [stacked.mode_of(i) for i in range(50)]


def _class_tree(root: Path, counts: dict[str, int], size: int = 12) -> None:
    """Solid-colour PNGs: `counts[name]` of them under root/name/ (a nested folder for the second class)."""
    for k, (name, count) in enumerate(counts.items()):
        folder = root / name / ("deeper" if k == 1 else "")
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", (size, size), (40 * k, 10 * i, 200)).save(folder / f"{i}.png")


def test_folder_classes_are_the_first_level_sub_folders(tmp_path: Path) -> None:
    _class_tree(tmp_path, {"zebra": 3, "apple": 2, "mango": 4})
    dataset = make_dataset(load_conf("folder", path=str(tmp_path)), 8)
    labels = class_labels(dataset)
    assert labels.names == ("apple", "mango", "zebra")  # sorted, whatever the order on disk
    # Each file's label is its first-level folder (apple's images lie one folder further down).
    expected = [labels.names.index(path.relative_to(tmp_path).parts[0]) for path in dataset.files]
    assert labels.labels.tolist() == expected and labels.counts().tolist() == [2, 4, 3]


def test_folder_images_outside_a_class_folder_are_a_user_error(tmp_path: Path) -> None:
    _class_tree(tmp_path, {"a": 2, "b": 2})
    Image.new("RGB", (12, 12)).save(tmp_path / "loose.png")
    dataset = make_dataset(load_conf("folder", path=str(tmp_path)), 8)
    with pytest.raises(UserError, match=r"1 images lie directly in it \(e.g. loose.png\)"):
        class_labels(dataset)


def test_a_folder_of_one_class_is_a_user_error(tmp_path: Path) -> None:
    """One class sub-folder (data.path one level too deep, say): a conditional run of one class is refused before
    it writes anything."""
    _class_tree(tmp_path / "data", {"cats": 16})
    cfg = compose_config(*TINY, "model.conditional=true", "data=folder", f"data.path={tmp_path / 'data'}")
    with pytest.raises(UserError, match=r"at least two classes, and the data at 8 px has one \('cats'\)"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "stage-0008").exists()


def test_torchvision_classes_are_its_targets(mnist_root: Path) -> None:
    from torchvision.datasets import MNIST

    dataset = make_dataset(load_conf("torchvision", path=str(mnist_root)), 8)
    labels = class_labels(dataset)
    truth = MNIST(str(mnist_root), train=True)
    assert labels.names == tuple(truth.classes) and labels.num_classes == 10
    assert labels.labels.tolist() == truth.targets.tolist()


@pytest.mark.parametrize("prepared", [False, True])
def test_the_loader_pairs_every_image_with_its_label(tmp_path: Path, prepared: bool) -> None:
    """Batches are (images, labels) with each label the class of that very image, from a prepared store too
    (whose labels come from its source, in the store's order)."""
    _class_tree(tmp_path / "data", {"dark": 5, "mid": 3, "light": 6})
    cfg = load_conf("folder", path=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    dataset = make_dataset(cfg, 8, prepared=prepared)
    labels = class_labels(dataset)
    colour_class = {round(float(dataset[i][0].mean()), 3): int(labels.labels[i]) for i in range(len(dataset))}
    sampler = InfiniteSampler(len(dataset), seed=5)
    loader = make_loader(dataset, sampler, 4, 0, torch.device("cpu"), 0, labels=labels)
    order = iter(InfiniteSampler(len(dataset), seed=5))
    for _ in range(6):  # across an epoch boundary
        images, y = to_device_batch(next(loader), torch.device("cpu"))
        assert y.dtype == torch.int64 and y.shape == (4,)
        assert y.tolist() == [int(labels.labels[next(order)]) for _ in range(4)]
        assert [colour_class[round(float(image[0].mean()), 3)] for image in images] == y.tolist()


def test_class_labels_check_their_values() -> None:
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        ClassLabels(("a", "b"), np.array([0, 2]))
    with pytest.raises(ValueError, match="int64"):
        ClassLabels(("a",), np.array([0], dtype=np.int32))
    assert labels_from_names(["b", "a", "b"]).labels.tolist() == [1, 0, 1]


def test_a_source_without_classes_is_a_user_error() -> None:
    with pytest.raises(UserError, match="model.conditional=true needs class labels"):
        class_labels(torch.utils.data.TensorDataset(torch.zeros(3, 1)))


def test_grid_classes_show_all_classes_or_an_even_spread() -> None:
    assert grid_classes(3, 16).tolist() == [0, 1, 2]
    assert grid_classes(1000, 5).tolist() == [0, 250, 500, 749, 999]
