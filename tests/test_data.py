"""Tests for pgan.data: the shapes, folder and torchvision sources, make_dataset and InfiniteSampler."""

import itertools
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import DATA_CONF_DIR, load_conf
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pgan.data import FolderDataset, InfiniteSampler, ShapesDataset, TorchvisionDataset, make_dataset
from pgan.data.shapes import COLOUR_RGB, COLOURS, NUM_MODES, SHAPES
from pgan.errors import UserError


def assert_image(item: torch.Tensor, channels: int, resolution: int) -> None:
    """`item` is a float32 [channels, resolution, resolution] tensor in [-1, 1] with some content."""
    assert item.shape == (channels, resolution, resolution)
    assert item.dtype == torch.float32
    assert item.min() >= -1.0 and item.max() <= 1.0
    assert item.max() - item.min() > 0.1  # not a blank image


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("name, workers", [("shapes", 1), ("folder", 4), ("torchvision", 4)])
def test_config_files_name_their_source(name: str, workers: int) -> None:
    cfg = OmegaConf.load(DATA_CONF_DIR / f"{name}.yaml")
    assert cfg.source == name
    assert cfg.channels == 3
    assert cfg.num_workers == workers


def test_missing_mandatory_path_is_a_user_error() -> None:
    with pytest.raises(UserError, match="data.path"):
        make_dataset(load_conf("folder"), 8)


def test_unknown_source_is_a_user_error() -> None:
    with pytest.raises(UserError, match="nope"):
        make_dataset({"source": "nope", "channels": 3}, 8)


def test_bad_channels_is_a_user_error() -> None:
    with pytest.raises(UserError, match="channels"):
        make_dataset(load_conf("shapes", channels=2), 8)


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("resolution", [8, 32, 256])
def test_shapes_items_are_images_in_range(resolution: int) -> None:
    dataset = make_dataset(load_conf("shapes"), resolution)
    assert isinstance(dataset, ShapesDataset)
    assert len(dataset) == 50000
    for index in range(3):
        assert_image(dataset[index], 3, resolution)


def test_shapes_same_index_gives_same_image() -> None:
    dataset = ShapesDataset(32, seed=3)
    assert torch.equal(dataset[7], dataset[7])
    assert torch.equal(dataset[7], ShapesDataset(32, seed=3)[7])


def test_shapes_different_seeds_give_different_images() -> None:
    first, second = ShapesDataset(32, seed=0), ShapesDataset(32, seed=1)
    for index in range(5):
        assert not torch.equal(first[index], second[index])


def test_shapes_geometry_is_the_same_at_every_resolution() -> None:
    small, large = ShapesDataset(32), ShapesDataset(64)
    for index in range(10):
        downsampled = F.avg_pool2d(large[index][None], 2)[0]
        same = (downsampled - small[index]).abs().mean()
        other = (downsampled - small[index + 1]).abs().mean()
        assert same < 0.02, index
        assert other > 5 * same  # the metric does tell items apart


def test_shapes_cover_all_modes() -> None:
    dataset = ShapesDataset(8)
    modes = {dataset.mode_of(index) for index in range(400)}
    assert modes == set(range(NUM_MODES))
    assert dataset.num_modes == NUM_MODES == len(SHAPES) * len(COLOURS) == 16


def test_shapes_mode_matches_rendered_colour() -> None:
    dataset = ShapesDataset(32)
    for index in range(48):
        pixels = (dataset[index].flatten(1).T + 1) * 127.5  # [pixels, 3] in 0..255
        background = pixels[0]  # the top-left corner is always background
        # The pixel farthest from the background is fully inside the shape: exactly the foreground colour.
        foreground = pixels[(pixels - background).norm(dim=1).argmax()]
        expected = torch.tensor(COLOUR_RGB[COLOURS[dataset.mode_of(index) % len(COLOURS)]], dtype=torch.float32)
        assert (foreground - expected).abs().max() < 1.0, index


def test_shapes_mode_matches_rendered_shape() -> None:
    # The fraction of its bounding box a shape fills depends on rotation for squares and crosses, but not
    # for circles (pi/4) and barely for triangles (about 1/2), so those two identify the shape.
    dataset = ShapesDataset(64)
    checked = set()
    for index in range(64):
        params = dataset.params(index)
        coverage = (dataset[index] - dataset[index][:, :1, :1]).abs().amax(0) > 0.5
        rows, cols = coverage.any(1).nonzero(), coverage.any(0).nonzero()
        box_area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        fill = coverage.sum() / box_area
        if params.shape == "circle":
            assert abs(fill - torch.pi / 4) < 0.06, index
            checked.add("circle")
        elif params.shape == "triangle":
            assert fill < 0.56, index
            checked.add("triangle")
    assert checked == {"circle", "triangle"}


def test_shapes_grayscale_keeps_colours_apart() -> None:
    dataset = make_dataset(load_conf("shapes", channels=1), 32)
    assert_image(dataset[0], 1, 32)
    grey_by_colour: dict[str, float] = {}
    for index in range(64):
        image = dataset[index][0]
        colour = COLOURS[dataset.mode_of(index) % len(COLOURS)]
        grey_by_colour[colour] = float(image.max())  # the brightest pixel is inside the shape
        assert image.max() - image[0, 0] > 0.1  # the shape stands out from the background
    levels = sorted(grey_by_colour.values())
    assert len(levels) == len(COLOURS)
    assert min(b - a for a, b in itertools.pairwise(levels)) > 0.2


def test_shapes_dataset_pickles() -> None:
    dataset = ShapesDataset(16, size=100, seed=5)
    clone = pickle.loads(pickle.dumps(dataset))
    assert len(clone) == 100
    assert torch.equal(clone[42], dataset[42])
    assert clone.mode_of(42) == dataset.mode_of(42)


def test_shapes_index_out_of_range() -> None:
    with pytest.raises(IndexError):
        ShapesDataset(8, size=10)[10]


# ---------------------------------------------------------------- folder

RED, BLUE = (255, 0, 0), (0, 0, 255)


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    """A nested folder of 5 images of varied sizes, modes and extensions, plus files that are not images."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "c").mkdir()
    # Wide image: 10 px red borders left and right of a 40x40 blue centre that the centre crop keeps.
    wide = Image.new("RGB", (60, 40), RED)
    wide.paste(BLUE, (10, 0, 50, 40))
    wide.save(tmp_path / "a" / "b" / "wide.png")
    Image.new("L", (20, 30), 128).save(tmp_path / "a" / "grey.png")
    Image.new("RGBA", (50, 50), (0, 255, 0, 128)).save(tmp_path / "a" / "alpha.png")
    Image.new("RGB", (100, 70), (200, 100, 50)).save(tmp_path / "c" / "photo.JPG")
    Image.new("RGB", (33, 33), (10, 20, 30)).save(tmp_path / "c" / "small.jpeg")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "c" / "data.npy").write_bytes(b"\x00" * 10)
    return tmp_path


def test_folder_finds_every_image_in_sorted_order(image_tree: Path) -> None:
    dataset = make_dataset(load_conf("folder", path=str(image_tree)), 16)
    assert isinstance(dataset, FolderDataset)
    relative = [path.relative_to(image_tree).as_posix() for path in dataset.files]
    assert relative == ["a/alpha.png", "a/b/wide.png", "a/grey.png", "c/photo.JPG", "c/small.jpeg"]
    assert FolderDataset(image_tree, 16).files == dataset.files


@pytest.mark.parametrize("channels", [1, 3])
def test_folder_items_are_images_in_range(image_tree: Path, channels: int) -> None:
    dataset = FolderDataset(image_tree, 16, channels=channels)
    for index in range(len(dataset)):
        item = dataset[index]
        assert item.shape == (channels, 16, 16)
        assert item.dtype == torch.float32
        assert item.min() >= -1.0 and item.max() <= 1.0


def test_folder_centre_crops_non_square_images(image_tree: Path) -> None:
    dataset = FolderDataset(image_tree, 16)
    wide = dataset[[path.name for path in dataset.files].index("wide.png")]
    # Only the blue centre survives: no red from the cropped-away borders.
    assert wide[0].max() < -0.99
    assert wide[2].min() > 0.99


def test_folder_grey_image_becomes_rgb(image_tree: Path) -> None:
    dataset = FolderDataset(image_tree, 8)
    grey = dataset[[path.name for path in dataset.files].index("grey.png")]
    assert torch.allclose(grey, torch.full_like(grey, 128 / 255 * 2 - 1), atol=1e-6)


def test_folder_applies_exif_orientation(tmp_path: Path) -> None:
    # Stored with red on top and blue at the bottom; EXIF orientation 6 means "rotate 90 degrees clockwise
    # to display", which puts the stored bottom (blue) on the left and the top (red) on the right.
    image = Image.new("RGB", (20, 20), RED)
    image.paste(BLUE, (0, 10, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(tmp_path / "rotated.png", exif=exif)
    item = FolderDataset(tmp_path, 20)[0]
    assert item[2, :, 0].min() > 0.99 and item[0, :, 0].max() < -0.99  # left column blue
    assert item[0, :, -1].min() > 0.99 and item[2, :, -1].max() < -0.99  # right column red


def test_folder_dataset_pickles(image_tree: Path) -> None:
    dataset = FolderDataset(image_tree, 8)
    assert torch.equal(pickle.loads(pickle.dumps(dataset))[1], dataset[1])


def test_folder_missing_path_is_a_user_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match="does not exist") as error:
        make_dataset(load_conf("folder", path=str(missing)), 8)
    assert str(missing) in str(error.value)


def test_folder_path_that_is_a_file_is_a_user_error(tmp_path: Path) -> None:
    file = tmp_path / "image.png"
    Image.new("RGB", (8, 8)).save(file)
    with pytest.raises(UserError) as error:
        FolderDataset(file, 8)
    assert str(file) in str(error.value)


def test_folder_without_images_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.txt").write_text("no images here")
    with pytest.raises(UserError) as error:
        FolderDataset(tmp_path, 8)
    message = str(error.value)
    assert str(tmp_path) in message and "png" in message and "jpg" in message
    assert "\n" not in message


def test_folder_corrupt_image_is_skipped_and_counted(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8), RED).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    dataset = FolderDataset(tmp_path, 8)
    assert [path.name for path in dataset.files] == ["good.png"]
    assert dataset.report.skipped["corrupt"].examples == ["broken.png"]


def test_folder_of_only_corrupt_images_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(UserError, match="1 corrupt") as error:
        FolderDataset(tmp_path, 8)
    assert str(tmp_path) in str(error.value)


# ---------------------------------------------------------------- torchvision


def test_torchvision_mnist_from_disk_matches_the_digits(mnist_root: Path, digits) -> None:
    images, _ = digits
    dataset = make_dataset(load_conf("torchvision", path=str(mnist_root), channels=1), 28)
    assert isinstance(dataset, TorchvisionDataset)
    assert len(dataset) == 50
    for index in (0, 7, 49):
        item = dataset[index]
        assert_image(item, 1, 28)
        # At the native 28 px nothing is resampled: exact pixels, mapped to [-1, 1].
        expected = torch.from_numpy(images[index]).float() / 255 * 2 - 1
        assert torch.allclose(item[0], expected, atol=1e-6)


def test_torchvision_mnist_resized_to_rgb(mnist_root: Path, digits) -> None:
    images, _ = digits
    dataset = make_dataset(load_conf("torchvision", path=str(mnist_root)), 32)
    item = dataset[3]
    assert_image(item, 3, 32)
    assert torch.equal(item[0], item[1]) and torch.equal(item[1], item[2])  # grey replicated to RGB
    expected = F.interpolate(torch.from_numpy(images[3]).float()[None, None], size=32, mode="bilinear")[0, 0]
    correlation = torch.corrcoef(torch.stack([item[0].flatten(), expected.flatten()]))[0, 1]
    assert correlation > 0.95


def test_torchvision_split_selects_test_files(mnist_root: Path) -> None:
    dataset = make_dataset(load_conf("torchvision", path=str(mnist_root), split="test"), 8)
    assert len(dataset) == 10


def test_torchvision_dataset_pickles(mnist_root: Path) -> None:
    dataset = TorchvisionDataset("MNIST", mnist_root, 16)
    assert torch.equal(pickle.loads(pickle.dumps(dataset))[4], dataset[4])


def test_torchvision_missing_files_say_how_to_download(tmp_path: Path) -> None:
    with pytest.raises(UserError) as error:
        make_dataset(load_conf("torchvision", name="MNIST", path=str(tmp_path)), 8)
    message = str(error.value)
    assert "MNIST" in message and str(tmp_path) in message and "download=True" in message
    assert "\n" not in message
    assert not any(tmp_path.iterdir())  # nothing was downloaded


def test_torchvision_unknown_name_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="NotADataset.*MNIST"):
        make_dataset(load_conf("torchvision", name="NotADataset", path=str(tmp_path)), 8)


def test_torchvision_split_other_than_train_or_test_is_refused(mnist_root: Path) -> None:
    """MNIST-like classes take train=True/False: any other split used to read the test files silently."""
    with pytest.raises(UserError, match="data.split must be train or test for MNIST, got 'bogus'"):
        make_dataset(load_conf("torchvision", path=str(mnist_root), split="bogus"), 8)


@pytest.mark.parametrize(
    ("name", "why"),
    [("FakeData", "unexpected keyword argument 'root'"), ("DatasetFolder", "loader"), ("VisionDataset", "")],
)
def test_torchvision_classes_pgan_cannot_build_are_one_line(name: str, why: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=f"data.name={name} cannot be read from data.path alone .*{why}"):
        make_dataset(load_conf("torchvision", name=name, path=str(tmp_path)), 8)


def test_torchvision_image_folder_ignores_hidden_folders(tmp_path: Path) -> None:
    """pgan's prepared store lives in data.path/.pgan-prepared by default: not a class of ImageFolder."""
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * i, 200 if label == "a" else 0, 0)).save(tmp_path / label / f"{i}.png")
    (tmp_path / ".pgan-prepared").mkdir()
    dataset = make_dataset(load_conf("torchvision", name="ImageFolder", path=str(tmp_path)), 8)
    assert len(dataset) == 6 and dataset.dataset.classes == ["a", "b"]


# ---------------------------------------------------------------- sampler


def take(sampler: InfiniteSampler, count: int) -> list[int]:
    """The first `count` indices `sampler` yields."""
    return list(itertools.islice(sampler, count))


def test_sampler_is_deterministic() -> None:
    assert take(InfiniteSampler(13, seed=4, start=5), 60) == take(InfiniteSampler(13, seed=4, start=5), 60)
    assert take(InfiniteSampler(13, seed=4), 60) != take(InfiniteSampler(13, seed=5), 60)


@pytest.mark.parametrize("start", [0, 1, 6, 7, 20, 70])
def test_sampler_resumes_where_an_uninterrupted_stream_is(start: int) -> None:
    uninterrupted = take(InfiniteSampler(7, seed=11), 100)
    assert take(InfiniteSampler(7, seed=11, start=start), 30) == uninterrupted[start : start + 30]


def test_sampler_epochs_are_different_permutations() -> None:
    num_items = 20
    stream = take(InfiniteSampler(num_items, seed=0), 3 * num_items)
    epochs = [stream[i * num_items : (i + 1) * num_items] for i in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(num_items))
    assert epochs[0] != epochs[1] != epochs[2]


def test_sampler_order_is_the_documented_randperm() -> None:
    seed, num_items = 3, 10
    stream = take(InfiniteSampler(num_items, seed=seed), 2 * num_items)
    for epoch in range(2):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        expected = torch.randperm(num_items, generator=generator).tolist()
        assert stream[epoch * num_items : (epoch + 1) * num_items] == expected


def test_sampler_leaves_the_global_rng_alone() -> None:
    state = torch.get_rng_state()
    take(InfiniteSampler(50, seed=1, start=30), 500)
    assert torch.equal(torch.get_rng_state(), state)


class IndexDataset(Dataset):
    """Item i is tensor(i), so a batch shows exactly which indices the sampler chose."""

    def __len__(self) -> int:
        return 23

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor(index)


def test_sampler_in_a_dataloader_is_independent_of_workers() -> None:
    def batches(num_workers: int) -> list[list[int]]:
        loader = DataLoader(
            IndexDataset(), batch_size=4, sampler=InfiniteSampler(23, seed=2, start=9), num_workers=num_workers
        )
        return [batch.tolist() for batch in itertools.islice(loader, 10)]

    single = batches(0)
    assert single == batches(2)
    assert sum(single, []) == take(InfiniteSampler(23, seed=2, start=9), 40)
