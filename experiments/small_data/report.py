"""Tables (markdown) and a plot of a small_data run: python experiments/small_data/report.py DIR [--plot FILE.png]"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

STATES = ("ok", "warning", "collapsed")
COLUMNS = (  # (summary key, header, format)
    ("fid", "FID (random features)", "{:.1f}"),
    ("swd", "SWD ×1e3", "{:.0f}"),
    ("precision", "precision", "{:.2f}"),
    ("recall", "recall", "{:.2f}"),
    ("coverage", "coverage", "{:.2f}"),
    ("modes_covered", "modes of 16", "{:.1f}"),
    ("class_accuracy", "class accuracy", "{:.2f}"),
    ("vendi_ratio", "Vendi ratio (last)", "{:.2f}"),
    ("collapsed_share", "evaluations collapsed", "{:.0%}"),
    ("train_min", "train min", "{:.1f}"),
)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def run_row(out: Path, summary_row: dict) -> dict:
    """One run's numbers: pgan-eval's at the end, and the collapse watch's over the run."""
    name = summary_row["name"]
    watch = _jsonl(out / "runs" / name / "collapse.jsonl")
    judged = [r for r in watch if not r.get("in_grace")]
    row = dict(summary_row.get("eval", {}))
    row["train_min"] = summary_row.get("train_s", float("nan")) / 60
    row["vendi_ratio"] = watch[-1]["vendi_ratio"] if watch else float("nan")
    row["collapsed_share"] = sum(r["state"] == "collapsed" for r in judged) / len(judged) if judged else float("nan")
    row["final_state"] = watch[-1]["state"] if watch else "?"
    row["timeline"] = [(r["kimg"], r["state"]) for r in watch]
    return row


def arm_of(name: str) -> str:
    """`shapes-augment-s1` -> `shapes-augment`."""
    return name.rsplit("-s", 1)[0]


def _cell(values: list[float], fmt: str) -> str:
    values = [v for v in values if v == v]  # drop NaN
    if not values:
        return "–"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def tables(out: Path) -> str:
    """The per-arm table (mean ± sd over seeds) and the per-run collapse timelines."""
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["name"]: run_row(out, r) for r in summary["runs"] if "error" not in r}
    errors = [r for r in summary["runs"] if "error" in r]
    by_arm: dict[str, list[dict]] = defaultdict(list)
    for name, row in rows.items():
        by_arm[arm_of(name)].append(row)
    lines = [
        f"recipe {summary.get('recipe', '2026-11')}, device {summary['device']}, kimg scale {summary['kimg_scale']}, "
        f"wall {summary['wall_s'] / 60:.1f} min",
        "",
        "| arm | runs | " + " | ".join(h for _, h, _ in COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for arm, arm_rows in by_arm.items():
        cells = [_cell([r.get(k, float("nan")) for r in arm_rows], fmt) for k, _, fmt in COLUMNS]
        lines.append(f"| {arm} | {len(arm_rows)} | " + " | ".join(cells) + " |")
    lines += ["", "| run | final state | the detector's verdicts (kimg: state) |", "|---|---|---|"]
    for name, row in rows.items():
        changes = [
            f"{k:.1f}: {s}" for i, (k, s) in enumerate(row["timeline"]) if i == 0 or s != row["timeline"][i - 1][1]
        ]
        lines.append(f"| {name} | {row['final_state']} | {', '.join(changes)} |")
    for error in errors:
        lines.append(f"\nfailed: {error['name']}: {error['error']}")
    return "\n".join(lines)


def per_class(out: Path, name: str, samples: int = 1024) -> list[float]:
    """A shapes run's final G_ema, `samples` images (each class in turn when conditional): per mode, the share
    of the samples the mode classifier assigns to it (unconditional), or of the class's samples read back as
    that class (conditional)."""
    import torch

    from pgan.data import ShapesDataset
    from pgan.export import load_generator
    from pgan.metrics.modes import mode_classifier_for
    from pgan.networks import cycle_labels
    from pgan.sample import generate, seeded_latents

    G, alpha = load_generator(out / "runs" / name / "stage-0128" / "final.pt")
    fakes = generate(G, seeded_latents(0, samples, G.latent_dim), alpha).clamp(-1, 1)
    predicted = mode_classifier_for(ShapesDataset(128, size=1000)).predict(fakes)
    if not G.num_classes:
        return (torch.bincount(predicted, minlength=16).double() / samples).tolist()
    labels = cycle_labels(samples, G.num_classes)
    return [(predicted[labels == c] == c).double().mean().item() for c in range(G.num_classes)]


def per_class_table(out: Path) -> str:
    """Per mode: the unconditional runs' share of samples, the conditional runs' class accuracy (seed 0)."""
    from pgan.data.shapes import MODE_NAMES

    summary = json.loads((out / "summary.json").read_text())
    names = [r["name"] for r in summary["runs"] if "error" not in r and r["name"].startswith("shapes")]
    columns = {name: per_class(out, name) for name in names if name.endswith("-s0")}
    lines = ["| mode | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for k, mode in enumerate(MODE_NAMES):
        lines.append(f"| {mode} | " + " | ".join(f"{values[k]:.2f}" for values in columns.values()) + " |")
    return "\n".join(lines)


def plot(out: Path, path: Path) -> None:
    """The collapse watch's Vendi ratio (every run) and modes covered (shapes) over kimg, and the adaptive p when
    a run used it, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = json.loads((out / "summary.json").read_text())
    names = [r["name"] for r in summary["runs"] if "error" not in r]
    colours = {
        "shapes-plain": "tab:red",
        "shapes-augment": "tab:blue",
        "shapes-conditional": "tab:green",
        "photos-plain": "tab:purple",
        "photos-conditional": "tab:olive",
    }
    adaptive = {name: [r for r in _jsonl(out / "runs" / name / "stats.jsonl") if "Augment/p" in r] for name in names}
    panels = 3 if any(adaptive.values()) else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    for name in names:
        watch = _jsonl(out / "runs" / name / "collapse.jsonl")
        colour = colours.get(arm_of(name), "grey")
        kimg = [r["kimg"] for r in watch]
        label = arm_of(name) if name.endswith("-s0") else None
        axes[0].plot(kimg, [r["vendi_ratio"] for r in watch], color=colour, label=label, alpha=0.8)
        if name.startswith("shapes"):
            axes[1].plot(kimg, [r.get("modes_covered", float("nan")) for r in watch], color=colour, label=label)
        collapsed = [r for r in watch if r["state"] == "collapsed"]
        axes[0].scatter([r["kimg"] for r in collapsed], [r["vendi_ratio"] for r in collapsed], color=colour, marker="x")
        if adaptive[name]:
            stats = adaptive[name]
            axes[2].plot(
                [r["Progress/kimg"] for r in stats], [r["Augment/p"] for r in stats], color=colour, label=label
            )
    axes[0].set(title="Vendi ratio fake / real (x: judged collapsed)", xlabel="kimg")
    axes[1].set(title="modes covered (of 16, shapes)", xlabel="kimg")
    if panels == 3:
        axes[2].set(title="adaptive augmentation p", xlabel="kimg")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--per-class", action="store_true", help="also the per-mode table (loads the checkpoints)")
    args = parser.parse_args()
    print(tables(args.out))
    if args.per_class:
        print("\n" + per_class_table(args.out))
    if args.plot:
        plot(args.out, args.plot)


if __name__ == "__main__":
    main()
