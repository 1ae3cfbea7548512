"""pgan: progressive-growing GANs (ProGAN) in PyTorch."""

from pgan.losses import make_loss
from pgan.networks import Discriminator, Generator, channels_for, grow_from
from pgan.schedule import Stage, alpha_at, build_stages, ema_beta

__all__ = [
    "Discriminator",
    "Generator",
    "Stage",
    "alpha_at",
    "build_stages",
    "channels_for",
    "ema_beta",
    "grow_from",
    "make_loss",
]
__version__ = "0.1.0"
