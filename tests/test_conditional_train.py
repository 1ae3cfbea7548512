"""Class-conditional training (model.conditional=true): labels from the data through the step, the checkpoint,
exact resume, the sample grids and the evaluation paths."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY, assert_same_state, compose_config
from PIL import Image

from pgan.checkpoint import load_checkpoint
from pgan.cli.sample import sample
from pgan.data.labels import ClassLabels, grid_classes
from pgan.data.shapes import MODE_NAMES
from pgan.errors import UserError
from pgan.losses import make_loss
from pgan.networks import Discriminator, Generator
from pgan.sample import generate
from pgan.train.feed import sample_grid_inputs
from pgan.train.loop import train
from pgan.train.options import TrainOptions
from pgan.train.state import build_optimizers
from pgan.train.step import train_step
from pgan.train.watch import evaluation_samples

CONDITIONAL = [*TINY, "model.conditional=true", "data.size=64"]


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory) -> Path:
    """A conditional 8 -> 16 px run on shapes (16 classes), with the collapse watch and a training metric."""
    run_dir = tmp_path_factory.mktemp("conditional") / "run"
    train(compose_config(*CONDITIONAL, "metrics.every_kimg=0.064", "metrics.names=[pr]"), run_dir)
    return run_dir


def test_a_conditional_run_records_its_classes_and_trains_the_label_layers(conditional_run: Path) -> None:
    final = load_checkpoint(conditional_run / "stage-0016" / "final.pt")
    assert final["classes"] == list(MODE_NAMES)
    assert final["G_ema"]["embed.weight"].shape == (16, 16) and final["D"]["embed.weight"].shape[0] == 16
    first = load_checkpoint(conditional_run / "stage-0008" / "ckpt-0000000000.pt")
    # Both label embeddings moved in training, and the growth to 16 px carried them on.
    assert not torch.equal(first["D"]["embed.weight"], final["D"]["embed.weight"])
    assert not torch.equal(first["G"]["embed.weight"], final["G"]["embed.weight"])
    assert (conditional_run / "metrics.jsonl").read_text().count('"precision"') >= 2


def test_conditional_sample_grids_show_one_class_per_row(conditional_run: Path) -> None:
    """log.grid_size=4: 2 columns; 16 classes: 16 rows (torchvision's make_grid pads 2 px)."""
    grids = sorted((conditional_run / "samples").glob("fakes-stage-0016-*.png"))
    assert Image.open(grids[-1]).size == (2 + 2 * 18, 2 + 16 * 18)
    fewer = compose_config(*CONDITIONAL, "log.grid_classes=5")
    classes = ClassLabels(tuple(str(i) for i in range(16)), np.arange(16))
    z, labels, columns = sample_grid_inputs(TrainOptions.from_config(fewer), classes)
    assert columns == 2 and labels.tolist() == grid_classes(16, 5).repeat_interleave(2).tolist()
    assert torch.equal(z[0], z[2]) and not torch.equal(z[0], z[1])  # one latent per column, shared by the rows


def test_a_conditional_run_resumes_bit_identically(conditional_run: Path, tmp_path: Path) -> None:
    shutil.copytree(conditional_run / "stage-0008", tmp_path / "stage-0008")
    (tmp_path / "stage-0016").mkdir()
    shutil.copy(conditional_run / "stage-0016" / "latest.pt", tmp_path / "stage-0016" / "latest.pt")
    train(compose_config(*CONDITIONAL, "metrics.every_kimg=0.064", "metrics.names=[pr]"), tmp_path)
    assert_same_state(
        load_checkpoint(tmp_path / "stage-0016" / "final.pt"),
        load_checkpoint(conditional_run / "stage-0016" / "final.pt"),
    )


def test_resuming_on_data_with_other_classes_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for k, name in enumerate(("cats", "dogs", "owls")):
        (data / name).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (16, 16), (80 * k, 20 * i, 90)).save(data / name / f"{i}.png")
    folder = [*TINY, "model.conditional=true", "data=folder", f"data.path={data}", "data.num_workers=0"]
    train(compose_config(*folder, "stage=8"), tmp_path / "run")
    shutil.rmtree(data / "owls")
    with pytest.raises(UserError, match=r"was trained on 3 classes, the data has 2 \(gone: owls\)"):
        train(compose_config(*folder), tmp_path / "run")
    unconditional = [*TINY, "data=folder", f"data.path={data}", "data.num_workers=0"]
    with pytest.raises(UserError, match="model.conditional: True there vs False here"):
        train(compose_config(*unconditional), tmp_path / "run")


@pytest.mark.parametrize("loss", ["wgan_gp", "logistic", "hinge"])
def test_the_step_trains_exactly_the_classes_in_the_batch(loss: str) -> None:
    """With every loss (and its penalty), one step moves the label embeddings of the batch's classes in G and
    D, and no other class's (Adam leaves a parameter with a zero gradient where it is)."""
    torch.manual_seed(0)
    G = Generator(8, latent_dim=16, fmap_base=64, fmap_max=16, fmap_min=4, num_classes=5)
    D = Discriminator(8, fmap_base=64, fmap_max=16, fmap_min=4, num_classes=5)
    G_ema = Generator(8, latent_dim=16, fmap_base=64, fmap_max=16, fmap_min=4, num_classes=5)
    opt_G, opt_D = build_optimizers(G, D, 0.01)
    before = {"G": G.embed.weight.detach().clone(), "D": D.embed.weight.detach().clone()}
    labels = torch.tensor([0, 3, 3, 0, 0, 3, 0, 3])
    stats = train_step(
        G, D, G_ema, opt_G, opt_D, make_loss(loss), torch.rand(8, 3, 8, 8) * 2 - 1, 0.5, 0.9, labels=labels
    )
    assert torch.isfinite(stats["Loss/D"]) and torch.isfinite(stats["Loss/G"])
    for name, net in (("G", G), ("D", D)):
        moved = (net.embed.weight.detach() != before[name]).any(dim=1)
        assert moved.tolist() == [True, False, False, True, False], name


def test_evaluation_and_sampling_give_a_conditional_G_every_class_in_turn() -> None:
    torch.manual_seed(1)
    G = Generator(8, latent_dim=16, fmap_base=64, fmap_max=16, fmap_min=4, num_classes=3).eval()
    z = torch.randn(7, 16)
    with torch.no_grad():
        expected = G(z, 1.0, torch.tensor([0, 1, 2, 0, 1, 2, 0]))
    torch.testing.assert_close(generate(G, z, batch_size=2), expected)
    torch.testing.assert_close(evaluation_samples(G, z, 1.0, torch.autocast("cpu", enabled=False)), expected)
    only_two = generate(G, z, labels=torch.full((7,), 2))
    with torch.no_grad():
        torch.testing.assert_close(only_two, G(z, 1.0, torch.full((7,), 2)))


def _sample_dir(ckpt: Path, out: Path, *args: str) -> list[np.ndarray]:
    """pgan-sample (in this process) into a folder of PNGs; their pixels."""
    written = sample(compose_config(f"ckpt={ckpt}", "device=cpu", "n=3", f"out={out}/", *args, config_name="sample"))
    return [np.asarray(Image.open(path)) for path in written]


def test_pgan_sample_class_takes_a_name_or_an_index(conditional_run: Path, tmp_path: Path) -> None:
    final = conditional_run / "stage-0016" / "final.pt"
    by_name = _sample_dir(final, tmp_path / "name", "class=red square")
    by_index = _sample_dir(final, tmp_path / "index", f"class={MODE_NAMES.index('red square')}")
    other = _sample_dir(final, tmp_path / "other", "class=0")
    assert all(np.array_equal(a, b) for a, b in zip(by_name, by_index, strict=True))
    assert not any(np.array_equal(a, b) for a, b in zip(by_name, other))  # the class changes the image
    every = _sample_dir(final, tmp_path / "every")  # no class: image i in class i (mod 16)
    assert np.array_equal(every[0], other[0]) and not np.array_equal(every[1], other[1])
    with pytest.raises(UserError, match=r"class=16 is not one of this generator's 16 classes \(blue circle, "):
        _sample_dir(final, tmp_path / "bad", "class=16")


def test_pgan_sample_class_on_an_unconditional_generator_is_a_user_error(
    tiny_checkpoint_8px: Path, tmp_path: Path
) -> None:
    with pytest.raises(UserError, match="class=1: this generator is unconditional"):
        _sample_dir(tiny_checkpoint_8px, tmp_path / "x", "class=1")


@pytest.mark.server
def test_the_demo_has_a_class_selector_that_matches_pgan_sample(conditional_run: Path, tmp_path: Path) -> None:
    """A conditional G's app takes (seed, n, psi, class) at /generate, classes by name from a selector; the
    grid is pgan-sample's for the same class."""
    pytest.importorskip("gradio")
    from gradio_client import Client

    from pgan.demo import EVERY_CLASS, build_demo, grid_for
    from pgan.export import load_generator

    final = conditional_run / "stage-0016" / "final.pt"
    G, alpha = load_generator(final)
    expected = sample(
        compose_config(
            f"ckpt={final}", "device=cpu", "n=4", f"out={tmp_path}/g.png", "class=green cross", config_name="sample"
        )
    )
    assert np.array_equal(
        np.asarray(grid_for(G, alpha, 0, 4, 0.0, "green cross")), np.asarray(Image.open(expected[0]).convert("RGB"))
    )
    demo = build_demo(G, alpha)
    _, url, _ = demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        client = Client(url, verbose=False)
        info = client.view_api(return_format="dict", print_info=False)
        parameters = info["named_endpoints"]["/generate"]["parameters"]
        assert [p["label"] for p in parameters] == ["seed", "images", "truncation psi", "class"]
        assert parameters[3]["type"]["enum"] == [EVERY_CLASS, *MODE_NAMES]
        served = Image.open(client.predict(0, 4, 0.0, "green cross", api_name="/generate")).convert("RGB")
        assert np.array_equal(np.asarray(served), np.asarray(grid_for(G, alpha, 0, 4, 0.0, "green cross")))
    finally:
        demo.close()


def test_pgan_eval_reads_back_a_conditional_Gs_classes(conditional_run: Path) -> None:
    """On data whose modes are the classes, `modes` also measures how often each sample is its class."""
    from pgan.cli.eval import evaluate

    final = conditional_run / "stage-0016" / "final.pt"
    args = [f"ckpt={final}", "metrics=[modes]", "data.size=64", "num_fake=64", "num_real=32", "device=cpu"]
    result = evaluate(compose_config(*args, config_name="eval"))
    # 30 training steps teach the tiny G little: a few samples of 64 happen to read as their class.
    assert 0.0 <= result["class_accuracy_worst"] <= result["class_accuracy"] <= 1.0
    assert {"modes_covered", "kl_to_uniform"} <= result.keys()


def test_class_accuracy_counts_samples_read_back_as_their_class() -> None:
    from pgan.metrics.quality import class_accuracy

    result = class_accuracy(torch.tensor([0, 1, 1, 2, 2, 0]), torch.tensor([0, 1, 2, 2, 2, 1]))
    assert result == {"class_accuracy": pytest.approx(4 / 6), "class_accuracy_worst": 0.5}  # class 1: 1 of 2


def test_an_export_of_a_conditional_run_keeps_its_class_names(conditional_run: Path, tmp_path: Path) -> None:
    import json

    from pgan.export import CONFIG, export_safetensors, load_generator

    G, alpha = load_generator(conditional_run / "stage-0016" / "final.pt")
    export_safetensors(G, alpha, tmp_path / "x")
    assert json.loads((tmp_path / "x" / CONFIG).read_text())["classes"] == list(MODE_NAMES)
    H, _ = load_generator(tmp_path / "x")
    assert H.class_names == MODE_NAMES
    z, y = torch.randn(3, 16), torch.tensor([0, 7, 15])
    with torch.no_grad():
        assert torch.equal(H(z, alpha, y), G(z, alpha, y))


def test_the_reals_grid_shows_each_rows_class_and_blanks_where_a_class_has_too_few() -> None:
    from pgan.data import ShapesDataset, class_labels
    from pgan.train.feed import real_grid_images

    dataset = ShapesDataset(8, size=12, seed=0)
    classes = class_labels(dataset)
    _, grid_labels, columns = sample_grid_inputs(TrainOptions.from_config(compose_config(*CONDITIONAL)), classes)
    images = real_grid_images(dataset, 4, classes, grid_labels, columns)
    assert images.shape == (16 * columns, 3, 8, 8)
    for row, c in enumerate(grid_labels[::columns].tolist()):
        members = np.flatnonzero(classes.labels == c)[:columns].tolist()
        for k in range(columns):
            expected = dataset[members[k]] if k < len(members) else torch.zeros(3, 8, 8)
            assert torch.equal(images[row * columns + k], expected), (c, k)
    assert (classes.counts() < columns).any()  # the case the test is about: some rows are (partly) blank
