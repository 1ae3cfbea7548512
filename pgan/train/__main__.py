"""`python -m pgan.train ...` is `pgan-train ...` (for launchers such as torchrun that want a module)."""

from pgan.cli.train import main

main()
