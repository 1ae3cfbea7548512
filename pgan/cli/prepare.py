"""`pgan-prepare`: make the prepared stores (uint8, memory-mapped, one per resolution) of a dataset ahead of
training. One line per resolution on stdout; exit 2 with one line `error: ...` when the data is unusable."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from pgan.cli import CONFIG_DIR, exit_on_bad_overrides, exit_with_user_error
from pgan.errors import UserError


def prepare_all(cfg: DictConfig) -> list[dict]:
    """Prepare (or find up to date) the store of cfg.data at every resolution in cfg.resolutions."""
    from pgan.data import make_dataset
    from pgan.data.prepared import prepare
    from pgan.networks import check_resolution

    resolutions = OmegaConf.to_container(cfg.resolutions, resolve=True)
    if not isinstance(resolutions, list) or not resolutions:
        raise UserError(f"resolutions must be a list of resolutions in px, e.g. [32,64], got {cfg.resolutions}")
    for res in resolutions:
        try:
            check_resolution(int(res))
        except (TypeError, ValueError) as exc:
            raise UserError(f"resolutions: {exc}") from exc
    workers = None if cfg.workers is None else max(0, int(cfg.workers))
    infos = []
    for res in resolutions:
        source = make_dataset(cfg.data, int(res))
        info = prepare(cfg.data, int(res), source, workers=workers, force=bool(cfg.force)).info
        done = f"prepared in {info['seconds']:.1f} s" if info["built"] else "already up to date"
        print(f"{res} px: {info['count']} images, {info['mib']} MiB, {done}: {info['path']}", flush=True)
        infos.append(info)
    return infos


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="prepare")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        prepare_all(cfg)
    except UserError as exc:
        exit_with_user_error(exc)


def main() -> None:
    """Console entry point of `pgan-prepare`."""
    exit_on_bad_overrides("prepare", sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
