"""generator_from_config: the one place a Generator is built from a config, whether a training config's model
section, a checkpoint's or an export's config.json (which records a width table and no fmap_* rule)."""

from __future__ import annotations

import torch
from helpers import TINY, compose_config

from pgan.export import export_config
from pgan.networks import Generator, generator_from_config, networks_from


def shapes(G: Generator) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in G.state_dict().items()}


def test_a_training_config_builds_the_generator_networks_from_builds() -> None:
    model = compose_config(*TINY).model
    torch.manual_seed(0)
    G = generator_from_config(model, 16, 3)
    torch.manual_seed(0)
    H, _ = networks_from(model, 16, 3)
    assert G.num_classes == 3 and G.state_dict().keys() == H.state_dict().keys()
    assert all(torch.equal(G.state_dict()[k], H.state_dict()[k]) for k in G.state_dict())


def test_an_export_config_without_the_fmap_rule_rebuilds_the_width_table() -> None:
    original = Generator(16, latent_dim=8, image_channels=1, channels={4: 12, 8: 6, 16: 5}, num_classes=2)
    config = export_config(original, alpha=1.0)
    assert not {"fmap_base", "fmap_max", "fmap_min"} & set(config)
    rebuilt = generator_from_config(config, int(config["resolution"]))
    assert shapes(rebuilt) == shapes(original) and rebuilt.num_classes == 2
