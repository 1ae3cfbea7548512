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
    """Index of the collapse onset: the first evaluation whose samples' effective number of modes,
    num_modes * exp(-KL to uniform), is at most a quarter of the modes (KL >= ln 4)."""
    return next((i for i, e in enumerate(evals) if e["mode_kl"] >= math.log(4)), None)


def training_tables(runs: list[dict]) -> str:
    """Per-run outcomes; false positives of healthy runs; detection and delay of collapsing ones."""
    out = [
        "| kind | dataset | final px | seed | evals | first `collapsed` (kimg) | onset (kimg) | delay (evals) "
        "| modes covered, mode KL at the end | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    summary: dict[str, dict] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        evals = [e for e in run["evaluations"] if "event" not in e]
        first = next((i for i, e in enumerate(evals) if e["state"] == "collapsed"), None)
        start = onset(evals, run["modes"])
        delay = first - start if first is not None and start is not None else None
        s = summary[run["kind"]]
        s["collapsed"].append(first is not None)
        s["left_ok"].append(any(e["state"] != "ok" for e in evals))
        s["final_kl"].append(evals[-1]["mode_kl"])
        s["final_modes"].append(evals[-1]["modes_covered"] / run["modes"])
        if delay is not None:
            s["delay"].append(delay)
            s["delay_kimg"].append(evals[first]["kimg"] - evals[start]["kimg"])
        out.append(
            f"| {run['kind']} | {run['dataset']} | {run['final_resolution']} | {run['seed']} | {len(evals)} | "
            f"{evals[first]['kimg'] if first is not None else '-'} | "
            f"{evals[start]['kimg'] if start is not None else '-'} | {delay if delay is not None else '-'} | "
            f"{evals[-1]['modes_covered']}/{run['modes']}, {evals[-1]['mode_kl']:.2f} | {run['seconds']:.0f} |"
        )
    out.append("")
    for kind, s in summary.items():
        n = len(s["collapsed"])
        line = (
            f"- {kind} runs: reached `collapsed` in {rate(sum(s['collapsed']), n)}, left `ok` in "
            f"{rate(sum(s['left_ok']), n)}; mode KL at the end median {statistics.median(s['final_kl']):.2f} nats"
        )
        if s["delay"] and kind.endswith("collapsing"):
            line += (
                f"; delay from onset to `collapsed`: median {statistics.median(s['delay'])} evaluations "
                f"({statistics.median(s['delay_kimg']):.3f} kimg), range {min(s['delay'])}..{max(s['delay'])}"
            )
        out.append(line)
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
    # The first run of each kind: the 2026-11 recipe's three on the first row, today's recipe's two on the second.
    kinds = ("healthy", "undertrained", "collapsing", "recipe", "recipe_collapsing")
    picks = [next(r for r in runs if r["kind"] == k) for k in kinds if any(r["kind"] == k for r in runs)]
    columns = min(3, len(picks))
    rows = -(-len(picks) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(picks) :]:
        ax.set_visible(False)
    for ax, run in zip(axes.flat, picks):
        evals = [e for e in run["evaluations"] if "event" not in e]
        kimg = [e["kimg"] for e in evals]
        ax.plot(kimg, [e["excess_pair"] for e in evals], label="excess_pair")
        ax.plot(kimg, [e["vendi_ratio"] for e in evals], label="vendi_ratio")
        ax.plot(kimg, [e["mode_kl"] / math.log(run["modes"]) for e in evals], label="mode KL / ln(modes)")
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
        if not (log.parent / f"stage-{int(final):04d}").exists() and not any(
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
    if controlled and runs:
        print("\n## The detector replayed on the logged metrics with other settings\n")
        print(tune(controlled, runs))
    plots(results, controlled, runs)


# --- replaying the detector with other settings ---------------------------------------------------------
def replay(evals: list[dict], t, patience: int, grace_fade_fraction: float, first_resolution: int = 8) -> list[str]:
    """The states the detector would have gone through on a run's logged metrics with other settings.

    Grace is recomputed from alpha (the runs evaluate every 0.256 kimg, so grace_kimg=0.256 never applies
    after the first stage, whose first evaluation is at 0.256 kimg).
    """
    from pgan.metrics.collapse import DetectorState, update

    state, states = DetectorState(), []
    for e in evals:
        grace = e["resolution"] != first_resolution and e["alpha"] < grace_fade_fraction
        state = update(state, e, t, patience=patience, recover_patience=2, in_grace=grace)
        states.append(state.state)
    return states


def tune(controlled: list[dict], runs: list[dict]) -> str:
    """Error rates of a grid of detector settings, on the controlled sets and the logged training runs."""
    from pgan.metrics.collapse import Thresholds, severity

    out = [
        "| vendi warn/coll | excess warn/coll | patience | grace fade | controlled k<=8 warning+ | k<=4 collapsed "
        "| healthy sets flagged | healthy runs collapsed | of which with > 1/4 of the modes | collapsing runs "
        "collapsed | median delay (evals) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    k8 = [r for r in controlled if r["family"] == "k_prototypes" and r["param"] <= 8]
    k4 = [r for r in k8 if r["param"] <= 4]
    healthy_sets = [r for r in controlled if r["family"] == "healthy"]
    healthy = [r for r in runs if r["kind"] == "healthy"]
    collapsing = [r for r in runs if r["kind"] == "collapsing"]
    evals = {id(r): [e for e in r["evaluations"] if "event" not in e] for r in runs}
    for vw, vc in ((0.6, 0.4), (0.5, 0.3), (0.7, 0.5)):
        for ew, ec in ((0.1, 0.25), (0.05, 0.15)):
            for patience in (2, 3):
                for grace in (0.5, 0.75, 1.0):
                    t = Thresholds(
                        excess_pair_warning=ew,
                        excess_pair_collapsed=ec,
                        vendi_ratio_warning=vw,
                        vendi_ratio_collapsed=vc,
                    )
                    states = {id(r): replay(evals[id(r)], t, patience, grace) for r in runs}
                    fp = [r for r in healthy if "collapsed" in states[id(r)]]
                    # A flag is clearly false when G_ema's samples still spread over more than a quarter of the
                    # modes (mode KL < ln 4) at every evaluation the state was `collapsed`.
                    clearly_false = [
                        r
                        for r in fp
                        if all(
                            e["mode_kl"] < math.log(4)
                            for e, st in zip(evals[id(r)], states[id(r)])
                            if st == "collapsed"
                        )
                    ]
                    delays = []
                    for r in collapsing:
                        first = next((i for i, st in enumerate(states[id(r)]) if st == "collapsed"), None)
                        start = onset(evals[id(r)], r["modes"])
                        if first is not None and start is not None:
                            delays.append(first - start)
                    out.append(
                        f"| {vw}/{vc} | {ew}/{ec} | {patience} | {grace} "
                        f"| {sum(severity(r, t) >= 1 for r in k8) / len(k8):.2f} "
                        f"| {sum(severity(r, t) == 2 for r in k4) / len(k4):.2f} "
                        f"| {sum(severity(r, t) >= 1 for r in healthy_sets)}/{len(healthy_sets)} "
                        f"| {len(fp)}/{len(healthy)} | {len(clearly_false)}/{len(healthy)} "
                        f"| {sum('collapsed' in states[id(r)] for r in collapsing)}/{len(collapsing)} "
                        f"| {statistics.median(delays) if delays else '-'} |"
                    )
    return "\n".join(out)


if __name__ == "__main__":
    report(Path(__file__).resolve().parent / "results")
