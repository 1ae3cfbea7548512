"""experiments/quality/shape_reading.py: the CNN is kept and reloaded as fitted, and a reading's numbers are
what the two classifiers' labels say (shares, agreement), on real shapes and on a generator's samples."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from pgan.metrics.modes import train_shapes_classifier
from pgan.networks import Generator

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "quality" / "shape_reading.py"
spec = importlib.util.spec_from_file_location("shape_reading", SCRIPT)
shape_reading = importlib.util.module_from_spec(spec)
spec.loader.exec_module(shape_reading)


def test_the_fitted_cnn_is_kept_and_its_reading_is_the_labels(tmp_path: Path) -> None:
    path = tmp_path / "cnn.pt"
    cnn = shape_reading.fitted_cnn(path, count=256, epochs=2, batch=64)
    again = shape_reading.fitted_cnn(path)  # loaded, not fitted again
    images, modes = shape_reading.rendered(64, shape_reading.TEST_SEED)
    with torch.no_grad():
        assert torch.equal(cnn(images), again(images))
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
