"""experiments/quality/shape_reading.py: the CNN is kept and reloaded as fitted, and a reading's numbers are
what the two classifiers' labels say (shares, agreement), on real shapes and on a generator's samples."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import experiment_script

from pgan.metrics.modes import train_shapes_classifier
from pgan.networks import Generator

shape_reading = experiment_script("quality/shape_reading.py")


def test_the_fitted_cnn_is_kept_and_its_reading_is_the_labels(tmp_path: Path) -> None:
    path = tmp_path / "cnn.pt"
    cnn = shape_reading.fitted_cnn(path, count=256, epochs=2, batch=64)
    again = shape_reading.fitted_cnn(path)  # loaded, not fitted again
    images, modes = shape_reading.rendered(64, shape_reading.TEST_SEED)
    with torch.no_grad():
        assert torch.equal(cnn(shape_reading.thumbnails(images)), again(shape_reading.thumbnails(images)))
    svc = train_shapes_classifier(num_items=600)
    real = torch.stack([shape_reading.ShapesDataset(32, size=64, seed=5)[i] for i in range(64)])
    torch.manual_seed(0)
    fakes = Generator(32, latent_dim=16, fmap_base=64, fmap_max=16, fmap_min=4)(torch.randn(64, 16), 1.0).detach()
    for images in (real, fakes):
        out = shape_reading.reading(cnn, svc, images)
        with torch.no_grad():
            by_cnn = cnn(shape_reading.thumbnails(images)).argmax(1)
        by_svc = svc.predict(images)
        assert out["agree_colour"] == (by_cnn % 4 == by_svc % 4).double().mean().item()
        assert out["agree_shape"] == (by_cnn // 4 == by_svc // 4).double().mean().item()
        shares = [out["cnn_shape_share"][s] for s in shape_reading.SHAPES]
        assert shares == (torch.bincount(by_cnn // 4, minlength=4).double() / len(images)).tolist()
        assert out["cnn"]["modes_covered"] == len(by_cnn.unique())
        assert 1 / 16 <= out["cnn_confidence"] <= 1
    # The SVC, fitted on real shapes, reads real shapes' colours right whatever the tiny CNN says.
    assert (
        svc.predict(real) % 4
        == torch.tensor([shape_reading.ShapesDataset(32, size=64, seed=5).mode_of(i) % 4 for i in range(64)])
    ).all()


def test_colour_purity_reads_one_colour_per_real_shape_and_two_in_a_two_coloured_blob() -> None:
    real, _ = shape_reading.rendered(200, shape_reading.TEST_SEED)
    reading = shape_reading.colour_purity(real)
    assert reading["single_colour"] == 1.0
    assert reading["mean_purity"] > 0.99

    def painted(*halves: str) -> torch.Tensor:
        """A dark 64 px image with a square blob whose left and right halves are these palette colours."""
        image = torch.full((3, 64, 64), -0.9)
        for i, name in enumerate(halves):
            rgb = torch.tensor(shape_reading.COLOUR_RGB[name], dtype=torch.float32) / 127.5 - 1
            image[:, 16:48, 16 + 16 * i : 32 + 16 * i] = rgb[:, None, None]
        return image

    two = shape_reading.colour_purity(painted("blue", "green").unsqueeze(0))
    assert two["single_colour"] == 0.0
    assert abs(two["mean_purity"] - 0.5) < 0.01
    # Darker versions of a palette colour (a blob's anti-aliased rim, a dim sample) keep its colour.
    dim = painted("yellow", "yellow") * 0.5 + 0.5 * painted("yellow", "yellow").clamp(max=0.0)
    assert shape_reading.colour_purity(dim.unsqueeze(0))["single_colour"] == 1.0
    dark = torch.full((1, 3, 64, 64), -0.9)  # nothing bright: not a sample of one colour
    assert shape_reading.colour_purity(dark) == {"single_colour": 0.0, "mean_purity": 0.0}
    mixed = torch.stack([painted("red", "red"), painted("red", "yellow"), painted("green", "green"), dark[0]])
    assert shape_reading.colour_purity(mixed)["single_colour"] == 0.5
