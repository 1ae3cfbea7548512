"""Class labels for class-conditional training: every source says what its classes are, once, as a
`ClassLabels` (the class names and one integer label per item), and the loader pairs each image with its label.

Where the labels come from:
- shapes: the 16 known modes (shape x colour), named like "blue circle";
- digits: the digit, "0" to "9"; stacked_digits: the 1000 modes, "000" to "999" (red, green, blue digit);
- folder: the first-level sub-folder of each image under data.path, in sorted order (torchvision's
  ImageFolder convention; images further down count for their first-level folder);
- torchvision: the dataset's own targets and class names.

The labels are read once per dataset (a pure function of its items), never while training, so a resumed run
sees the same labels and the loader's workers only index an array.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from pgan.errors import UserError


@dataclass(frozen=True)
class ClassLabels:
    """The class names and each item's class index (int64 [num_items], values in [0, len(names)))."""

    names: tuple[str, ...]
    labels: np.ndarray

    def __post_init__(self) -> None:
        if len(self.names) < 1:
            raise ValueError("ClassLabels needs at least one class")
        if self.labels.ndim != 1 or self.labels.dtype != np.int64:
            raise ValueError(f"labels must be int64 [num_items], got {self.labels.dtype} {self.labels.shape}")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.names)):
            raise ValueError(f"labels must lie in [0, {len(self.names)}), got {self.labels.min()}..{self.labels.max()}")

    @property
    def num_classes(self) -> int:
        """How many classes there are."""
        return len(self.names)

    def counts(self) -> np.ndarray:
        """Items per class, int64 [num_classes]."""
        return np.bincount(self.labels, minlength=self.num_classes)


def class_labels(dataset: Dataset) -> ClassLabels:
    """The dataset's ClassLabels (cached on it), or a UserError when its source has no classes."""
    cached = getattr(dataset, "_class_labels", None)
    if cached is not None:
        return cached
    method = getattr(dataset, "class_labels", None)
    if method is None:
        raise UserError(
            f"model.conditional=true needs class labels, and {type(dataset).__name__} has none: use data=shapes, "
            "digits, stacked_digits, folder (one sub-folder per class) or torchvision"
        )
    labels = method()
    if len(labels.labels) != len(dataset):
        raise ValueError(f"{type(dataset).__name__} gave {len(labels.labels)} labels for {len(dataset)} items")
    dataset._class_labels = labels
    return labels


def check_two_classes(labels: ClassLabels, where: str) -> None:
    """A UserError when `labels` (the data `where` names) has one class: a conditional model of one class is an
    unconditional one, and for a folder it mostly means data.path one level too deep."""
    if labels.num_classes < 2:
        raise UserError(
            f"model.conditional=true needs at least two classes, and {where} has one ({labels.names[0]!r}): point "
            "data.path at the folder whose sub-folders are the classes, or train with model.conditional=false"
        )


def labels_from_names(item_classes: Sequence[str]) -> ClassLabels:
    """ClassLabels from each item's class name: classes in sorted order."""
    names = tuple(sorted(set(item_classes)))
    index = {name: i for i, name in enumerate(names)}
    return ClassLabels(names, np.fromiter((index[c] for c in item_classes), dtype=np.int64, count=len(item_classes)))


class LabelledDataset(Dataset):
    """`dataset`'s items paired with their class index: (image, label int64 scalar tensor)."""

    def __init__(self, dataset: Dataset, labels: ClassLabels) -> None:
        self.dataset = dataset
        self.labels = torch.from_numpy(labels.labels)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dataset[index], self.labels[index]


def grid_classes(num_classes: int, rows: int) -> torch.Tensor:
    """The classes a conditional sample grid shows, one per row: all of them when they fit in `rows`, else
    `rows` classes evenly spread over 0..num_classes-1 (int64 [min(rows, num_classes)])."""
    if num_classes <= rows:
        return torch.arange(num_classes)
    return torch.linspace(0, num_classes - 1, rows).round().long()
