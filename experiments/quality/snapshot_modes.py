"""Modes and KL of a stacked-digits stage's snapshots, and of weight averages of its last ones.

    python experiments/quality/snapshot_modes.py RUN_DIR/stage-0032 --last 2 3 4 > snapshots.jsonl

Every ckpt-*.pt of the stage and its final.pt is read as `pgan-eval metrics=[modes] num_fake=10000` reads
final.pt (G_ema, pgan-sample's latents of `--seed`, the stacked-digits classifier), and so is the raw G of
final.pt. `--last N` adds the uniform average of the last N snapshots' G_ema weights (final.pt included):
what a G_ema averaging over a longer window would have drawn, without training again (all of them in
the stable phase). One JSON line each.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from pgan.checkpoint import generator_from_checkpoint, load_checkpoint, snapshots
from pgan.metrics.modes import ModeClassifier, digit_kl, mode_classifier_for, mode_coverage
from pgan.networks import Generator
from pgan.sample import generate, seeded_latents


def read(G: Generator, alpha: float, classifier: ModeClassifier, num: int, seed: int) -> dict[str, float]:
    """Modes covered, KL to uniform and each channel's digit KL of `num` samples of G."""
    fakes = generate(G, seeded_latents(seed, num, G.latent_dim), alpha).clamp(-1, 1)
    labels = classifier.predict(fakes)
    return mode_coverage(labels, classifier.num_modes) | digit_kl(labels)


def weight_average(generators: list[Generator]) -> Generator:
    """A generator whose floating-point parameters and buffers are the mean of `generators`' (same shapes)."""
    mean = copy.deepcopy(generators[-1])
    states = [g.state_dict() for g in generators]
    with torch.no_grad():
        for name, tensor in mean.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.stack([s[name] for s in states]).mean(dim=0))
    return mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage_dir", type=Path)
    parser.add_argument("--last", type=int, nargs="*", default=[], help="average the last N snapshots' G_ema")
    parser.add_argument("--num", type=int, default=10_000, help="samples per reading")
    parser.add_argument("--seed", type=int, default=0, help="pgan-sample's latents of this seed")
    args = parser.parse_args()
    paths = [*reversed(snapshots(args.stage_dir)), args.stage_dir / "final.pt"]  # oldest first
    if not paths[-1].is_file():
        raise SystemExit(f"error: {paths[-1]} does not exist (a stage that finished has one)")
    classifier = mode_classifier_for({"source": "stacked_digits"})
    ema, nimg, alphas = [], [], []
    for path in paths:
        state = load_checkpoint(path)
        G, alpha = generator_from_checkpoint(state, "G_ema")
        ema.append(G)
        nimg.append(int(state["nimg"]))
        alphas.append(alpha)
        rows = [(f"{path.name} G_ema", G, alpha)]
        if path.name == "final.pt":
            rows.append((f"{path.name} G", *generator_from_checkpoint(state, "G")))
        for name, generator, a in rows:
            result = {"snapshot": name, "stage_nimg": nimg[-1], "alpha": a}
            print(json.dumps(result | read(generator, a, classifier, args.num, args.seed)), flush=True)
    for n in args.last:
        if not 1 < n <= len(ema):
            raise SystemExit(f"error: --last {n}: the stage has {len(ema)} snapshots")
        if min(alphas[-n:]) < 1:
            raise SystemExit(f"error: --last {n} reaches into the fade-in (alpha {min(alphas[-n:]):.2f}): fewer")
        result = {"snapshot": f"mean of the last {n} G_ema", "stage_nimg": nimg[-n:]}
        print(json.dumps(result | read(weight_average(ema[-n:]), 1.0, classifier, args.num, args.seed)), flush=True)


if __name__ == "__main__":
    main()
