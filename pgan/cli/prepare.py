"""`pgan-prepare`: make the prepared stores (uint8, memory-mapped, one per resolution) of a dataset ahead of
training. Every resolution is checked first (usable images at each, the classes with model.conditional=true,
the disk space of all stores together), so a dataset that fails anywhere writes nothing. One line per
resolution on stdout; exit 2 with one line `error: ...` when the data is unusable."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig
from torch.utils.data import Dataset

from pgan.cli import CONFIG_DIR, checked_resolutions, exit_on_bad_overrides, exit_with_user_error
from pgan.errors import UserError, check_bool, check_int


def sources_at(data_cfg: DictConfig, resolutions: list[int]) -> dict[int, Dataset]:
    """The dataset at each resolution, smallest first, writing nothing (a folder is scanned once). A failure
    that only a larger resolution has (its images are too small) is a UserError naming that resolution."""
    from pgan.data import make_dataset

    sources: dict[int, Dataset] = {}
    for res in sorted(set(resolutions)):
        try:
            sources[res] = make_dataset(data_cfg, res)
        except UserError as exc:
            if not sources:  # fails at the smallest resolution: the data or a setting, not the resolution
                raise
            smaller = max(sources)
            raise UserError(
                f"{res} px: {exc}; {smaller} px keeps {len(sources[smaller])} images; nothing was prepared"
            ) from exc
    return sources


def check_classes_kept(sources: dict[int, Dataset]) -> None:
    """A UserError unless every resolution keeps images of every class (what conditional training needs): a
    class whose images are all smaller than a resolution is gone there."""
    from pgan.data import class_labels
    from pgan.data.labels import check_two_classes

    names = {res: class_labels(source).names for res, source in sources.items()}
    smallest = min(names)
    check_two_classes(class_labels(sources[smallest]), f"the data at {smallest} px")
    for res, kept in sorted(names.items()):
        gone = [name for name in names[smallest] if name not in kept]
        if gone:
            shown = ", ".join(gone[:3]) + (", ..." if len(gone) > 3 else "")
            raise UserError(
                f"model.conditional=true needs every class at every resolution, but at {res} px {len(gone)} of the "
                f"{len(names[smallest])} classes have no usable image ({shown}: smaller than {res} px); "
                "data.small_images=upscale keeps them; nothing was prepared"
            )


def prepare_all(cfg: DictConfig) -> list[dict]:
    """Prepare (or find up to date) the store of cfg.data at every resolution in cfg.resolutions, after
    checking all of them."""
    from pgan.data.prepared import build_store, check_space, plan_store

    resolutions = checked_resolutions(cfg.resolutions, "resolutions must be a list of resolutions in px, e.g. [32,64]")
    workers = None if cfg.workers is None else check_int("workers", cfg.workers, low=0)
    force = check_bool("force", cfg.force)
    conditional = check_bool("model.conditional", cfg.model.conditional)
    sources = sources_at(cfg.data, resolutions)
    if conditional:
        check_classes_kept(sources)
    plans = {res: plan_store(cfg.data, res, source, force=force) for res, source in sources.items()}
    check_space(list(plans.values()))
    infos = []
    for res in resolutions:
        info = build_store(cfg.data, plans[res], sources[res], workers=workers).info
        plans[res].build = False  # a resolution listed twice is then up to date
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
