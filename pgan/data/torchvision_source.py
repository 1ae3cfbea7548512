"""A torchvision dataset read from files already on disk (never downloaded), as square [-1, 1] image tensors."""

import difflib
import inspect
import os
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as F

from pgan.data.labels import ClassLabels
from pgan.data.pil import pil_mode, square_resize, to_signed_tensor
from pgan.errors import UserError

# Where torchvision datasets keep their integer class per image (MNIST/CIFAR: targets, SVHN/STL10: labels,
# Flowers102: _labels).
_TARGET_ATTRIBUTES = ("targets", "labels", "_labels")

# Shown when data.name is unknown; any dataset class in torchvision.datasets taking `root` works.
EXAMPLE_NAMES = ("MNIST", "FashionMNIST", "CIFAR10", "CIFAR100", "CelebA", "SVHN", "STL10", "Flowers102")


def dataset_class(name: str) -> type[Dataset]:
    """The class torchvision.datasets.<name>, or a UserError suggesting valid names."""
    candidate = getattr(torchvision.datasets, name, None) if name in torchvision.datasets.__all__ else None
    if isinstance(candidate, type) and issubclass(candidate, Dataset):
        return candidate
    # Match case-insensitively so data.name=cifar10 suggests CIFAR10.
    by_lower = {valid.lower(): valid for valid in torchvision.datasets.__all__}
    close = [by_lower[match] for match in difflib.get_close_matches(name.lower(), by_lower, n=3, cutoff=0.6)]
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UserError(
        f"unknown torchvision dataset data.name={name!r}: {hint}valid names include {', '.join(EXAMPLE_NAMES)}"
    )


class ImageFolder(torchvision.datasets.ImageFolder):
    """torchvision's ImageFolder without hidden folders as classes: pgan's prepared store (`.pgan-prepared`,
    made in data.path by default) was read as a class of no images and failed every later run."""

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
        return classes, {name: i for i, name in enumerate(classes)}


def split_arguments(cls: type[Dataset], split: str) -> dict[str, object]:
    """The constructor arguments selecting `split`: train=bool for MNIST/CIFAR-like (data.split train or test),
    split=str for CelebA/SVHN-like (torchvision checks the value)."""
    parameters = inspect.signature(cls).parameters
    if "train" in parameters:
        if split not in ("train", "test"):
            raise UserError(f"data.split must be train or test for {cls.__name__}, got {split!r}")
        return {"train": split == "train"}
    if "split" in parameters:
        return {"split": split}
    return {}


def _download_command(name: str, root: Path, arguments: dict[str, object]) -> str:
    """A one-line shell command that downloads the dataset into `root` with torchvision."""
    call_arguments = ", ".join([repr(str(root))] + [f"{key}={value!r}" for key, value in arguments.items()])
    return f'python -c "import torchvision; torchvision.datasets.{name}({call_arguments}, download=True)"'


def _one_line(error: Exception) -> str:
    """The error's message collapsed onto one line (UserErrors print as exactly one line)."""
    return " ".join(str(error).split())


def _to_pil(image: object) -> Image.Image:
    """The PIL image for whatever a torchvision dataset returned (PIL, CHW tensor or HWC array)."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (torch.Tensor, np.ndarray)):
        return F.to_pil_image(image)
    raise TypeError(f"torchvision dataset returned an image of unsupported type {type(image).__name__}")


class TorchvisionDataset(Dataset):
    """torchvision.datasets.<name> under `path`, items as [channels, resolution, resolution] tensors in [-1, 1]."""

    def __init__(self, name: str, path: str | Path, resolution: int, channels: int = 3, split: str = "train") -> None:
        self.mode = pil_mode(channels)
        cls = dataset_class(name)
        if cls is torchvision.datasets.ImageFolder:
            cls = ImageFolder
        root = Path(path).expanduser()
        arguments = split_arguments(cls, split)
        downloadable = "download" in inspect.signature(cls).parameters
        try:
            # Never download: training must not reach the network, and a silent multi-GB download surprises.
            self.dataset = cls(root=str(root), **arguments, **({"download": False} if downloadable else {}))
            len(self.dataset)  # an abstract class (VisionDataset) builds, and fails here
        except (TypeError, NotImplementedError) as error:
            # A class that needs more than root= and a split (FakeData, DatasetFolder's loader, Kinetics' clip
            # length) or none at all (VisionDataset, the abstract base).
            why = _one_line(error) or type(error).__name__
            raise UserError(
                f"torchvision dataset data.name={name} cannot be read from data.path alone ({why}); "
                f"pgan reads datasets built from root= and a split, e.g. {', '.join(EXAMPLE_NAMES[:4])} or ImageFolder"
            ) from error
        except (RuntimeError, FileNotFoundError) as error:
            # torchvision raises RuntimeError("Dataset not found ...") or FileNotFoundError for missing files.
            if downloadable:
                fix = f"download it yourself with: {_download_command(name, root, arguments)}"
            else:
                fix = f"torchvision cannot download {name}: put its files there by hand"
            reason = _one_line(error)
            raise UserError(f"torchvision dataset {name} not found under data.path {root} ({reason}); {fix}") from error
        except ValueError as error:
            raise UserError(f"torchvision dataset {name} rejected data.split={split!r}: {_one_line(error)}") from error
        self.name = name
        self.root = root
        self.split = split
        self.resolution = resolution
        self.channels = channels

    def content_key(self) -> dict[str, object]:
        """What the images depend on besides the settings (the key of a prepared store)."""
        return {"root": str(self.root.resolve()), "class": type(self.dataset).__name__, "count": len(self.dataset)}

    def class_labels(self) -> ClassLabels:
        """The dataset's own integer targets as classes (model.conditional=true), named by its `classes` when it
        has them (MNIST, CIFAR10, ...), else "0", "1", ..."""
        targets = next(
            (
                getattr(self.dataset, name)
                for name in _TARGET_ATTRIBUTES
                if getattr(self.dataset, name, None) is not None
            ),
            None,
        )
        labels = (
            np.asarray(targets.numpy() if isinstance(targets, torch.Tensor) else targets)
            if targets is not None
            else None
        )
        if labels is None or labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(self):
            raise UserError(
                f"torchvision dataset {self.name} has no integer class per image (looked for "
                f"{', '.join(_TARGET_ATTRIBUTES)}), so model.conditional=true cannot use it"
            )
        if len(labels) and labels.min() < 0:
            raise UserError(
                f"torchvision dataset {self.name} (data.split={self.split}) has unlabelled images (target "
                f"{labels.min()}): pick a labelled split for model.conditional=true"
            )
        classes = getattr(self.dataset, "classes", None)
        count = int(labels.max()) + 1 if len(labels) else 1
        if isinstance(classes, (list, tuple)) and len(classes) >= count:
            names = tuple(str(name) for name in classes)
        else:
            names = tuple(str(i) for i in range(count))
        return ClassLabels(names, labels.astype(np.int64))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        sample = self.dataset[index]
        # Drop the label: items are images only for now.
        image = sample[0] if isinstance(sample, (tuple, list)) else sample
        # PIL's convert: "L" for grayscale (luma), "RGB" replicates a grey channel or drops alpha.
        converted = _to_pil(image).convert(self.mode)
        return to_signed_tensor(square_resize(converted, self.resolution))
