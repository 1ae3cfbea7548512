"""Tables and plots of the collapse-detection experiment (run.py calls it; `python run.py report` alone too).

Prints markdown tables (what README.md holds) and writes results/detection.png and results/timelines.png.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path


def wilson(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if trials == 0:
        return (math.nan, math.nan)
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return (max(0.0, centre - half), min(1.0, centre + half))


def rate(successes: int, trials: int) -> str:
    """'s/n = p [lo, hi]'."""
    lo, hi = wilson(successes, trials)
    return f"{successes}/{trials} = {successes / trials:.2f} [{lo:.2f}, {hi:.2f}]"


def controlled_tables(rows: list[dict]) -> str:
    """Per-condition one-shot rates, and the pooled headline numbers."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["family"], r["param"], r["dataset"])].append(r)
    out = [
        "| condition | dataset | collapsed (level 2) | warning or worse | excess_pair | vendi_ratio | std_ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for (family, param, dataset), rs in groups.items():
        n = len(rs)
        collapsed = sum(r["level"] == 2 for r in rs)
        warned = sum(r["level"] >= 1 for r in rs)
        mean = {k: statistics.fmean(r[k] for r in rs) for k in ("excess_pair", "vendi_ratio", "std_ratio")}
        out.append(
            f"| {family} {param} | {dataset} | {rate(collapsed, n)} | {rate(warned, n)} | "
            f"{mean['excess_pair']:.3f} | {mean['vendi_ratio']:.3f} | {mean['std_ratio']:.3f} |"
        )
    k8 = [r for r in rows if r["family"] == "k_prototypes" and r["param"] <= 8]
    healthy = [r for r in rows if r["family"] == "healthy"]
    out += [
        "",
        f"- k <= 8 prototypes, all datasets: collapsed in {rate(sum(r['level'] == 2 for r in k8), len(k8))}, "
        f"warning or worse in {rate(sum(r['level'] >= 1 for r in k8), len(k8))} single evaluations",
        f"- healthy real samples, all datasets: collapsed in "
        f"{rate(sum(r['level'] == 2 for r in healthy), len(healthy))}, "
        f"warning or worse in {rate(sum(r['level'] >= 1 for r in healthy), len(healthy))} single evaluations",
    ]
    return "\n".join(out)


def onset(evals: list[dict], num_modes: int) -> int | None:
    """Index of the collapse onset: the first evaluation from which G_ema's samples cover at most a quarter of
    the modes at every later evaluation too (persistent, so that an undertrained G's early low coverage,
    which recovers, does not count)."""
    low = [e["modes_covered"] <= num_modes // 4 for e in evals]
    for i in range(len(low)):
        if all(low[i:]):
            return i
    return None


def training_tables(runs: list[dict]) -> str:
    """Per-run outcomes, false-positive rate on healthy runs, detection rate and delay on collapsing ones."""
    out = [
        "| run | dataset | final px | seed | evaluations | first collapsed (kimg) | onset (kimg) | delay (evals) "
        "| modes covered at end | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    healthy_fp, healthy_warn, healthy_n = 0, 0, 0
    detected, delays, delays_kimg, collapsing_n, with_onset = 0, [], [], 0, 0
    for run in runs:
        evals = [e for e in run["evaluations"] if "event" not in e]
        first = next((i for i, e in enumerate(evals) if e["state"] == "collapsed"), None)
        start = onset(evals, run["modes"])
        delay = first - start if first is not None and start is not None else None
        if run["kind"] == "healthy":
            healthy_n += 1
            healthy_fp += first is not None
            healthy_warn += any(e["state"] != "ok" for e in evals)
        else:
            collapsing_n += 1
            detected += first is not None
            with_onset += start is not None
            if delay is not None:
                delays.append(delay)
                delays_kimg.append(evals[first]["kimg"] - evals[start]["kimg"])
        out.append(
            f"| {run['kind']} | {run['dataset']} | {run['final_resolution']} | {run['seed']} | {len(evals)} | "
            f"{evals[first]['kimg'] if first is not None else '-'} | "
            f"{evals[start]['kimg'] if start is not None else '-'} | {delay if delay is not None else '-'} | "
            f"{evals[-1]['modes_covered']}/{run['modes']} | {run['seconds']:.0f} |"
        )
    out.append("")
    if healthy_n:
        out.append(f"- healthy runs that ever reached `collapsed` (false positives): {rate(healthy_fp, healthy_n)}")
        out.append(f"- healthy runs that ever left `ok` (warning or collapsed): {rate(healthy_warn, healthy_n)}")
    if collapsing_n:
        out.append(
            f"- collapsing runs flagged `collapsed`: {rate(detected, collapsing_n)}; with a mode-coverage "
            f"onset: {with_onset}"
        )
        if delays:
            out.append(
                f"- delay from onset to `collapsed`: median {statistics.median(delays)} evaluations "
                f"({statistics.median(delays_kimg):.3f} kimg), range {min(delays)}..{max(delays)} evaluations"
            )
    return "\n".join(out)


def plots(results: Path, controlled: list[dict], runs: list[dict]) -> None:
    """detection.png (rate vs severity per family) and timelines.png (metrics over a few runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = [("k_prototypes", "k prototypes"), ("kept_modes", "fraction of modes kept"), ("truncation_psi", "psi")]
    num_modes = {"shapes": 16, "digits": 10, "stacked_digits": 1000}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (family, label) in zip(axes, families):
        for colour, dataset in zip(("C0", "C1", "C2"), sorted({r["dataset"] for r in controlled})):
            rs = [r for r in controlled if r["family"] == family and r["dataset"] == dataset]
            params = sorted({r["param"] for r in rs})
            xs = [p / num_modes[dataset] for p in params] if family == "kept_modes" else params
            for level, style, name in ((2, "-", "collapsed"), (1, "--", "warning+")):
                y = [statistics.fmean(r["level"] >= level for r in rs if r["param"] == p) for p in params]
                ax.plot(xs, y, style, color=colour, marker="o", ms=3, label=f"{dataset} {name}")
        ax.set_xlabel(label)
        ax.set_ylabel("fraction flagged, one evaluation")
        if family in ("k_prototypes", "kept_modes"):
            ax.set_xscale("log", base=2)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(results / "detection.png", dpi=110)
    if not runs:
        return
    picks = [r for r in runs if r["kind"] == "collapsing"][:2] + [r for r in runs if r["kind"] == "healthy"][:2]
    fig, axes = plt.subplots(1, len(picks), figsize=(4 * len(picks), 3.4), squeeze=False)
    for ax, run in zip(axes[0], picks):
        evals = [e for e in run["evaluations"] if "event" not in e]
        kimg = [e["kimg"] for e in evals]
        ax.plot(kimg, [e["excess_pair"] for e in evals], label="excess_pair")
        ax.plot(kimg, [e["vendi_ratio"] for e in evals], label="vendi_ratio")
        ax.plot(kimg, [e["modes_covered"] / run["modes"] for e in evals], label="modes covered (fraction)")
        ax.step(
            kimg,
            [{"ok": 0, "warning": 0.5, "collapsed": 1}[e["state"]] for e in evals],
            where="post",
            color="k",
            alpha=0.6,
            label="state (0 ok, .5 warning, 1 collapsed)",
        )
        ax.set_title(f"{run['kind']} {run['dataset']} seed {run['seed']}", fontsize=9)
        ax.set_xlabel("kimg")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(results / "timelines.png", dpi=110)


def runs_from_logs(runs_dir: Path) -> list[dict]:
    """The training rows rebuilt from the run directories' collapse.jsonl (for a partial or interrupted run)."""
    modes = {"shapes": 16, "digits": 10}
    rows = []
    for log in sorted(runs_dir.glob("*/collapse.jsonl")):
        kind, dataset, final, seed = log.parent.name.split("-")
        evals = [json.loads(line) for line in log.read_text().splitlines()]
        if not (log.parent / "stage-%04d" % int(final)).exists() and not any(
            e["resolution"] == int(final) for e in evals
        ):
            continue  # unfinished
        rows.append(
            {
                "kind": kind,
                "dataset": dataset,
                "final_resolution": int(final),
                "seed": int(seed.removeprefix("seed")),
                "evaluations": evals,
                "seconds": float("nan"),
                "modes": modes[dataset],
            }
        )
    return rows


def report(results: Path) -> None:
    """Print every table and write the plots."""
    controlled = json.loads((results / "controlled.json").read_text()) if (results / "controlled.json").exists() else []
    runs = json.loads((results / "training.json").read_text()) if (results / "training.json").exists() else []
    if not runs:
        runs = runs_from_logs(results / "runs")
    if controlled:
        print("## Controlled positives (one evaluation each)\n")
        print(controlled_tables(controlled))
    if runs:
        print("\n## Training runs\n")
        print(training_tables(runs))
    plots(results, controlled, runs)


if __name__ == "__main__":
    report(Path(__file__).resolve().parent / "results")
