"""A run's report from its own logs: a PNG of D/G losses and real/fake scores over the whole run's kimg (stage
boundaries and fade-ins marked), and a short markdown summary (stages, time per stage, final values, the
collapse detector's events, config highlights).

Everything comes from the run directory: `stats.jsonl` (one record per log tick, and under
schedule.advance=plateau one `stage_advance` record per stage: when its stable phase ended and why),
`collapse.jsonl` (one per diversity evaluation, plus rollbacks), `metrics.jsonl` (one per quality-metrics
evaluation, shown among the final values as `Metrics/<name>`) and `config.yaml` (the resolved config, for the
schedule and the highlights). The jsonl records carry no timestamps: the time per stage is the trainer's own tick
timer, added up (each tick's images / its `Speed/img_per_s`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pgan.errors import UserError, first_line
from pgan.metrics.collapse import STATES
from pgan.schedule import DEFAULT_KEY, Stage, adam_betas, alpha_at, stages_as_run, stages_from_config

_SHOWN_LINES = 5  # unreadable jsonl lines a report names (it counts them all)
# collapse.jsonl keys that are not metrics.
_EVALUATION_KEYS = ("step", "kimg", "stage", "resolution", "alpha", "state", "previous", "in_grace", "n_fake", "n_real")
# The curves of the plot: (title, [(column, label)]).
PANELS = (
    ("losses", [("Loss/D", "D loss"), ("Loss/G", "G loss")]),
    ("D output (scores)", [("Scores/real", "real"), ("Scores/fake", "fake")]),
)
DIVERSITY_CURVES = [("Diversity/excess_pair", "excess-pair fraction"), ("Diversity/vendi_ratio", "Vendi ratio")]
AUGMENT_CURVES = [("Augment/p", "p"), ("Augment/rt", "r_t = E[sign(D(augmented reals))]")]
TIME_SOURCE = (
    "time: the trainer's tick timer summed over the stage (each tick's images / its Speed/img_per_s in "
    "stats.jsonl): the training loop with its sample grids, diversity evaluations and snapshots; not the "
    "stage's setup, its final.pt, nor any time between an interruption and its resume"
)


@dataclass
class RunTable:
    """A run's logged values, one row per logged step (ascending), as float columns (NaN where a row lacks one).

    Columns: `kimg` (over the whole run), `stage`, `resolution`, `alpha`, then the scalars of stats.jsonl under
    their TensorBoard tags (`Loss/D`, `Loss/G`, `Scores/real`, `Scores/fake`, `Speed/img_per_s`, `Guard/*`,
    any `Metrics/*` ...), and the diversity evaluations of collapse.jsonl as `Diversity/<metric>` with the
    detector's level as `Collapse/level` (0 ok, 1 warning, 2 collapsed).
    """

    columns: dict[str, np.ndarray]
    stages: list[Stage]  # the run's stages as trained: its config.yaml's schedule, plateau ends applied
    events: list[dict] = field(default_factory=list)  # detector state changes and rollbacks, in the order logged
    advances: list[dict] = field(default_factory=list)  # stats.jsonl's stage_advance records (advance=plateau)
    last_evaluation: dict | None = None  # the last diversity evaluation's record in collapse.jsonl
    superseded: int = 0  # records of an interrupted attempt that a later one replaced
    unreadable: list[str] = field(default_factory=list)  # jsonl lines that are no record, as read_jsonl names them

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    def __contains__(self, name: object) -> bool:
        return name in self.columns

    def __len__(self) -> int:
        return len(self.columns["kimg"])

    def stage_rows(self, stage: Stage) -> np.ndarray:
        """A boolean mask of the rows logged during `stage`."""
        return self.columns["stage"] == stage.index

    @property
    def logged_stages(self) -> list[Stage]:
        """The stages of the schedule that have records."""
        present = set(self.columns["stage"].astype(int).tolist())
        return [st for st in self.stages if st.index in present]


def jsonl_record(line: str) -> dict | None:
    """One line of a run's jsonl logs as its record: a JSON object with a numeric "step"; None for a line cut
    short by a kill, damaged or edited (the trainer's purge on resume and the report judge lines alike)."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    step = row.get("step") if isinstance(row, dict) else None
    return row if isinstance(step, (int, float)) and not isinstance(step, bool) else None


def read_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    """The records of a jsonl file, and its lines that are not JSON objects with a step, as "NAME line N" (N from 1;
    "(the last)" marks a last line, which a kill can cut short; any other was damaged or edited)."""
    rows, bad = [], []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    last = max((n for n, line in enumerate(lines) if line.strip()), default=-1)
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        row = jsonl_record(line)
        if row is not None:
            rows.append(row)
        else:
            bad.append(f"{path.name} line {number + 1}" + (" (the last)" if number == last else ""))
    return rows, bad


def latest_attempt(rows: list[dict]) -> list[dict]:
    """The records the run's latest attempt stands by, in step order.

    A resumed attempt (or a rollback) starts logging again from an earlier step. The trainer purges what it
    replaces (Monitor's purge_step), so a record whose step is not after the previous one's only appears in
    a log from elsewhere (copied, merged, an older pgan): the later record wins, and with it everything the
    earlier attempt logged at or after its step.
    """
    kept: list[dict] = []
    for row in rows:
        while kept and kept[-1]["step"] >= row["step"]:
            kept.pop()
        kept.append(row)
    return kept


def run_stages(run_dir: Path, advances: list[dict] | None = None) -> list[Stage]:
    """The run's stages as it trained them (one line naming `run_dir` if it is not a run): the schedule of its
    resolved config, with the stable phases that schedule.advance=plateau ended early and the later stages
    moved to where they started (`advances`: stats.jsonl's stage_advance records; None: read them)."""
    config = Path(run_dir) / "config.yaml"
    if not config.is_file():
        raise UserError(f"run={run_dir}: not a pgan run directory (no config.yaml)")
    try:
        loaded = OmegaConf.load(config)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise UserError(f"run={run_dir}: cannot read {config.name} ({first_line(exc)})") from exc
    if not isinstance(loaded, DictConfig) or not isinstance(loaded.get("schedule"), DictConfig):
        raise UserError(f"run={run_dir}: {config.name} is not a pgan run's resolved config (no schedule section)")
    try:
        stages = stages_from_config(loaded)
    except (ValueError, OmegaConfBaseException) as exc:
        raise UserError(f"run={run_dir}: {exc}") from exc
    if advances is None:
        stats = Path(run_dir) / "stats.jsonl"
        advances = stage_advances(read_jsonl(stats)[0]) if stats.is_file() else []
    return stages_as_run(stages, {int(r["stage"]): (round(r["start_kimg"] * 1000), int(r["nimg"])) for r in advances})


def stage_advances(stats: list[dict]) -> list[dict]:
    """The stage_advance records among stats.jsonl's (the latest attempt's)."""
    return latest_attempt([r for r in stats if r.get("event") == "stage_advance"])


def load_table(run_dir: Path) -> RunTable:
    """The table of a run directory's stats.jsonl, collapse.jsonl and metrics.jsonl (see RunTable)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run={run_dir}: {'not a directory' if run_dir.exists() else 'no such directory'}")
    stats_path = run_dir / "stats.jsonl"
    if not (run_dir / "config.yaml").is_file() or not stats_path.is_file():
        run_stages(run_dir)  # the one-line error for a directory that is not a run
        raise UserError(f"run={run_dir}: no stats.jsonl (the trainer's log) in this run directory")
    stats, bad = read_jsonl(stats_path)
    advances = stage_advances(stats)
    stages = run_stages(run_dir, advances)
    stats = [r for r in stats if "event" not in r]  # the log ticks
    collapse, bad_collapse = (
        read_jsonl(run_dir / "collapse.jsonl") if (run_dir / "collapse.jsonl").is_file() else ([], [])
    )
    quality, bad_quality = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else ([], [])
    evaluations = [r for r in collapse if "event" not in r]
    kept_stats, kept_evals, kept_quality = latest_attempt(stats), latest_attempt(evaluations), latest_attempt(quality)
    if not kept_stats:
        raise UserError(f"run={run_dir}: stats.jsonl has no records yet (the run has not reached its first log tick)")
    try:
        table = build_table(kept_stats, kept_evals, stages, kept_quality)
    except (TypeError, ValueError) as exc:  # e.g. "Progress/resolution": "abc" in a hand-edited or merged log
        raise UserError(f"run={run_dir}: a record of its jsonl logs holds a value of the wrong type ({exc})") from exc
    kept_ids = {id(r) for r in kept_evals}
    events = []
    for row in collapse:  # in the order logged: rollbacks are interleaved with the evaluations
        if row.get("event") == "rollback" or (id(row) in kept_ids and row.get("state") != row.get("previous")):
            events.append(row)
    table.events = events
    table.advances = advances
    table.last_evaluation = kept_evals[-1] if kept_evals else None
    table.superseded = (
        len(stats) - len(kept_stats) + len(evaluations) - len(kept_evals) + len(quality) - len(kept_quality)
    )
    table.unreadable = bad + bad_collapse + bad_quality
    return table


def build_table(stats: list[dict], evaluations: list[dict], stages: list[Stage], quality: list[dict] = ()) -> RunTable:
    """Merge stats records, diversity evaluations and quality-metric evaluations (`metrics.every_kimg`; each in
    ascending step order) into one RunTable; the quality metrics become `Metrics/<name>` columns."""
    rows: dict[int, dict[str, float]] = {}
    for r in stats:
        row = rows.setdefault(int(r["step"]), _position(int(r["step"]), stages))
        if "Progress/stage" in r:
            row |= {"stage": r["Progress/stage"], "resolution": r["Progress/resolution"], "alpha": r["Progress/alpha"]}
        row |= {k: v for k, v in r.items() if _number(v) and k != "step" and not k.startswith("Progress/")}
    for r in evaluations:
        row = rows.setdefault(int(r["step"]), _position(int(r["step"]), stages))
        row |= {k: r[k] for k in ("stage", "resolution", "alpha") if k in r}
        row |= {f"Diversity/{k}": v for k, v in r.items() if _number(v) and k not in _EVALUATION_KEYS}
        if r.get("state") in STATES:
            row["Collapse/level"] = STATES.index(r["state"])
    for r in quality:
        row = rows.setdefault(int(r["step"]), _position(int(r["step"]), stages))
        row |= {f"Metrics/{k}": v for k, v in r.items() if _number(v) and k not in _EVALUATION_KEYS}
    steps = sorted(rows)
    names = ["kimg", "stage", "resolution", "alpha"]
    names += sorted({k for row in rows.values() for k in row} - set(names))
    columns = {name: np.array([rows[s].get(name, math.nan) for s in steps], dtype=float) for name in names}
    columns["kimg"] = np.array(steps, dtype=float) / 1000
    return RunTable(columns, list(stages))


def _position(step: int, stages: list[Stage]) -> dict[str, float]:
    """Stage, resolution and alpha after `step` images of the run, from the schedule (for a record without them)."""
    for st in stages:
        if step <= st.start_nimg + st.num_images or st is stages[-1]:
            return {"stage": st.index, "resolution": st.resolution, "alpha": alpha_at(st, step - st.start_nimg)}
    return {}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def stage_boundaries(table: RunTable) -> list[tuple[float, int]]:
    """(kimg, resolution) where each logged stage after the first starts, from the run's schedule."""
    return [(st.start_nimg / 1000, st.resolution) for st in table.logged_stages[1:]]


def stage_summaries(table: RunTable) -> list[dict[str, Any]]:
    """Per stage of the schedule: its size, how far the logs go, the time it took (see TIME_SOURCE), the speed,
    the skipped steps and its last losses and scores."""
    summaries = []
    for st in table.stages:
        mask = table.stage_rows(st)
        end_kimg = (st.start_nimg + st.num_images) / 1000
        entry: dict[str, Any] = {
            "stage": st.index,
            "resolution": st.resolution,
            "fade_kimg": st.fade_kimg,
            "stable_kimg": st.stable_kimg,
            "batch_size": st.batch_size,
            "start_kimg": st.start_nimg / 1000,
            "end_kimg": end_kimg,
            "logged_kimg": None,
            "done": False,
            "seconds": None,
            "img_per_s": None,
            "skipped_steps": 0,
        }
        if mask.any():
            kimg = table["kimg"][mask]
            entry["logged_kimg"] = float(kimg[-1])
            entry["done"] = bool(np.isclose(kimg[-1], end_kimg))
            if "Speed/img_per_s" in table:
                seconds, images = _tick_seconds(table, st)
                entry["seconds"] = seconds
                entry["img_per_s"] = images / seconds if seconds else None
            if "Guard/skipped_steps" in table:
                entry["skipped_steps"] = int(np.nansum(table["Guard/skipped_steps"][mask]))
            for name in ("Loss/D", "Loss/G", "Scores/real", "Scores/fake"):
                entry[name] = last_value(table, name, mask)
        summaries.append(entry)
    return summaries


def _tick_seconds(table: RunTable, stage: Stage) -> tuple[float, int]:
    """The stage's logged ticks: their summed duration (images / img_per_s) and images."""
    mask = table.stage_rows(stage) & np.isfinite(table["Speed/img_per_s"])
    steps = np.round(table["kimg"][mask] * 1000)
    speeds = table["Speed/img_per_s"][mask]
    images = np.diff(steps, prepend=stage.start_nimg)
    ok = speeds > 0
    return float(np.sum(images[ok] / speeds[ok])), int(np.sum(images[ok]))


def last_value(table: RunTable, name: str, mask: np.ndarray | None = None) -> float | None:
    """The last finite value of a column (among the rows of `mask`), or None."""
    if name not in table:
        return None
    values = table[name] if mask is None else table[name][mask]
    finite = values[np.isfinite(values)]
    return float(finite[-1]) if len(finite) else None


def plot_report(table: RunTable, path: Path, title: str | None = None) -> Path:
    """Write a PNG of the losses and the real/fake scores (and the diversity metrics, when evaluated) over the
    run's kimg, with stage boundaries labelled by resolution and fade-ins shaded."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise UserError("pgan-report needs matplotlib: pip install 'pgan[report]' (or matplotlib)") from exc

    panels = [panel for panel in PANELS if any(name in table for name, _ in panel[1])]
    if any(name in table for name, _ in DIVERSITY_CURVES):
        panels.append(("diversity of G_ema (collapse detector)", DIVERSITY_CURVES))
    if any(name in table for name, _ in AUGMENT_CURVES):
        panels.append(("D's input augmentation", AUGMENT_CURVES))
    # A bare Figure renders with Agg and leaves pyplot's global backend and figure list alone.
    fig = Figure(figsize=(11, 2.6 * len(panels) + 1.2), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    kimg = table["kimg"]
    for ax, (panel_title, curves) in zip(axes, panels):
        for name, label in curves:
            if name in table:
                values = table[name]
                ok = np.isfinite(values)
                marker = "o" if name.startswith("Diversity/") else None
                ax.plot(kimg[ok], values[ok], label=label, linewidth=1.2, marker=marker, markersize=3)
        ax.set_title(panel_title, loc="left", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=8, framealpha=0.8)
        _mark_stages(ax, table, label=ax is axes[0])
    titles = [title for title, _ in panels]
    if "Collapse/level" in table:  # on the diversity panel (the last one unless augmentation is plotted below it)
        diversity = "diversity of G_ema (collapse detector)"
        _mark_detector(axes[titles.index(diversity)] if diversity in titles else axes[-1], table)
    for event in table.events:
        if event.get("event") == "rollback":
            for ax in axes:
                ax.axvline(event["from_kimg"], color="tab:red", linestyle=":", linewidth=1)
    # From the start of the first logged stage (not its first tick): the first stage's region shows in full.
    start, end = table.logged_stages[0].start_nimg / 1000, float(kimg[-1])
    axes[-1].set_xlim(start - 0.01 * (end - start), end + 0.01 * (end - start))
    axes[-1].set_xlabel(
        "kimg (thousands of real images shown to D, over the whole run); dashed: a stage starts, shaded: its fade-in"
    )
    fig.suptitle(title or "training curves", fontsize=11)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def _mark_stages(ax: Any, table: RunTable, label: bool) -> None:
    """Dashed lines at stage starts, shaded fade-ins, and (on the top panel) the resolution of each stage."""
    for st in table.logged_stages:
        start = st.start_nimg / 1000
        if st.index != table.logged_stages[0].index:
            ax.axvline(start, color="0.35", linestyle="--", linewidth=0.9)
        if st.fade_kimg > 0:
            ax.axvspan(start, start + st.fade_kimg, color="tab:blue", alpha=0.08, linewidth=0)
        if label:
            ax.text(
                start, 0.98, f" {st.resolution} px", transform=ax.get_xaxis_transform(), va="top", ha="left", fontsize=9
            )


def _mark_detector(ax: Any, table: RunTable) -> None:
    """The detector's verdict at each evaluation: orange for warning, red for collapsed, along the panel's foot."""
    level = table["Collapse/level"]
    for value, color, name in ((1, "tab:orange", "warning"), (2, "tab:red", "collapsed")):
        at = table["kimg"][level == value]
        if len(at):
            ax.scatter(
                at,
                np.zeros_like(at),
                transform=ax.get_xaxis_transform(),
                marker="s",
                s=18,
                color=color,
                label=f"detector: {name}",
                clip_on=False,
            )
    ax.legend(loc="best", fontsize=8, framealpha=0.8)


# --- the markdown summary ------------------------------------------------------------------------------------


def summary_markdown(run_dir: Path, table: RunTable, plot_name: str | None = "report.png") -> str:
    """The run's summary as markdown: config highlights, stages with their time, final values, collapse events."""
    run_dir = Path(run_dir)
    cfg = _config(run_dir)
    lines = [f"# Run report: `{run_dir.name}`", ""]
    lines += [f"- {item}" for item in config_highlights(cfg)]
    lines += ["", "## Stages", ""]
    lines += [
        "| stage | resolution | kimg (fade + stable) | batch | logged up to kimg | time | img/s | skipped steps |"
    ]
    lines += ["|---:|---:|---|---:|---:|---:|---:|---:|"]
    summaries = stage_summaries(table)
    for s in summaries:
        if s["logged_kimg"] is None:
            reached = "not reached"
        else:
            reached = f"{s['logged_kimg']:.3f}" + ("" if s["done"] else f" of {s['end_kimg']:.3f} (unfinished)")
        lines.append(
            f"| {s['stage']} | {s['resolution']} px | {s['fade_kimg'] + s['stable_kimg']:g} "
            f"({s['fade_kimg']:g} + {s['stable_kimg']:g}) | {s['batch_size']} | {reached} | "
            f"{format_seconds(s['seconds'])} | {_fmt(s['img_per_s'], '.1f')} | {s['skipped_steps']} |"
        )
    total = sum(s["seconds"] or 0 for s in summaries)
    lines += ["", f"Total: {table['kimg'][-1]:.3f} kimg logged in {format_seconds(total)}.", ""]
    lines += [f"_{TIME_SOURCE[0].upper()}{TIME_SOURCE[1:]}._"]

    if table.advances or (cfg.get("schedule") or {}).get("advance") == "plateau":
        lines += ["", "## Stage advance", ""]
        lines += advance_markdown(cfg, table)

    lines += ["", "## Final values", ""]
    lines += final_values_markdown(table)

    lines += ["", "## Collapse detector", ""]
    lines += collapse_markdown(cfg, table)

    notes = []
    if table.superseded:
        notes.append(f"{table.superseded} records of an interrupted attempt were replaced by the attempt that resumed")
    if table.unreadable:
        notes.append(unreadable_note(table.unreadable))
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}." for n in notes]
    if plot_name:
        lines += ["", f"![losses and scores over kimg]({plot_name})"]
    return "\n".join(lines) + "\n"


def _config(run_dir: Path) -> dict:
    try:
        return yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def config_highlights(cfg: Mapping[str, Any]) -> list[str]:
    """One-line highlights of the resolved config: data, model, loss, schedule, seed and precision."""
    data, loss, model = cfg.get("data") or {}, cfg.get("loss") or {}, cfg.get("model") or {}
    sched = cfg.get("schedule") or {}
    where = next((f"{k}={data[k]}" for k in ("path", "root") if data.get(k)), None)
    data_text = ", ".join(
        [f"`{data.get('source', '?')}`"]
        + ([where] if where else [])
        + ([f"{data['size']} images"] if "size" in data else [])
    )
    loss_args = ", ".join(f"{k}={v}" for k, v in loss.items() if k != "name")
    items = [
        f"**data**: {data_text}",
        f"**loss**: `{loss.get('name', '?')}`" + (f" ({loss_args})" if loss_args else ""),
        f"**model**: `{model.get('name', '?')}` (latent_dim={model.get('latent_dim')})",
        f"**batch size**: {_per_resolution(sched.get('batch_size'))}; **lr**: {_per_resolution(sched.get('lr'))}; "
        f"**Adam betas**: {_betas(sched)}",
        f"**resolutions**: {' → '.join(f'{r} px' for r in sched.get('resolutions', []))}",
        f"**seed** {cfg.get('seed')}, **precision** {cfg.get('precision')}, **device** {cfg.get('device')}",
    ]
    if cfg.get("init_from") or cfg.get("stage") is not None:
        items.append(f"**stage** {cfg.get('stage')}, **init_from** {cfg.get('init_from')}")
    return items


def _betas(schedule: Mapping[str, Any]) -> str:
    """schedule.betas as the run trained with them (the paper's where the config predates the setting); a hand-edited
    value the trainer would refuse, as written."""
    try:
        return ", ".join(f"{beta:g}" for beta in adam_betas(schedule))
    except ValueError:
        return str(schedule.get("betas"))


def _per_resolution(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{v} at {k} px" if str(k) != DEFAULT_KEY else f"{v} elsewhere" for k, v in value.items())
    return str(value)


ADVANCE_REASONS = {
    "plateau": "plateau: no {delta} % improvement of {metric} in {patience} evaluations",
    "max_stable_kimg": "reached max_stable_kimg",
    "metric_not_defined": "{metric} not defined at this resolution: ran max_stable_kimg",
}


def advance_markdown(cfg: Mapping[str, Any], table: RunTable) -> list[str]:
    """schedule.advance=plateau: per stage, the stable phase it spent (of its longest), its evaluations, the
    best value, and why it advanced; then the stable kimg the plateaus saved."""
    plateau = (cfg.get("schedule") or {}).get("plateau") or {}
    metric = plateau.get("metric", "?")
    lines = [
        f"`schedule.advance=plateau`: a stage's stable phase ends when `{metric}` has not improved by "
        f"{plateau.get('min_delta', 0) * 100:g} % in {plateau.get('patience')} evaluations (one every "
        f"{plateau.get('every_kimg')} kimg of it), after at least `min_stable_kimg` and at most `max_stable_kimg`.",
        "",
        f"| stage | resolution | stable kimg (of at most) | evaluations | best {metric} (at stable kimg) | last | "
        "advanced because |",
        "|---:|---:|---|---:|---:|---:|---|",
    ]
    saved = 0.0
    for r in table.advances:
        evaluations = r.get("evaluations") or []
        best = "-" if r.get("best") is None else f"{r['best']:.4g} ({r['best_stable_kimg']:.3f})"
        last = f"{evaluations[-1][1]:.4g}" if evaluations else "-"
        why = ADVANCE_REASONS.get(r["advance"], r["advance"]).format(
            delta=f"{r['min_delta'] * 100:g}", metric=r["metric"], patience=r["patience"]
        )
        lines.append(
            f"| {r['stage']} | {r['resolution']} px | {r['stable_kimg']:.3f} (of {r['max_stable_kimg']:g}) | "
            f"{len(evaluations)} | {best} | {last} | {why} |"
        )
        saved += r["max_stable_kimg"] - r["stable_kimg"]
    if not table.advances:
        lines.append("| | | no stage has ended yet | | | | |")
    lines += ["", f"Stable phases ended {saved:.3f} kimg before their maxima in all (stats.jsonl: `stage_advance`)."]
    return lines


def final_values_markdown(table: RunTable) -> list[str]:
    """The last logged losses and scores, any Metrics/*, and the last diversity evaluation, as a table."""
    where = (
        f"At {table['kimg'][-1]:.3f} kimg ({int(table['resolution'][-1])} px, alpha {table['alpha'][-1]:.2f}), "
        "the last log tick's means:"
    )
    lines = [where, "", "| value | |", "|---|---:|"]
    names = ["Loss/D", "Loss/G", "Loss/gp", "Scores/real", "Scores/fake"]
    names += sorted(n for n in table.columns if n.startswith("Metrics/"))
    for name in names:
        value = last_value(table, name)
        if value is not None:
            lines.append(f"| `{name}` | {value:.4g} |")
    if "Resources/peak_rss_mb" in table:
        lines.append(f"| peak RSS | {np.nanmax(table['Resources/peak_rss_mb']):.0f} MB |")
    evaluated = "Collapse/level" in table and np.isfinite(table["Collapse/level"]).any()
    if evaluated:
        at = np.flatnonzero(np.isfinite(table["Collapse/level"]))[-1]
        lines += [
            "",
            f"The last diversity evaluation, at {table['kimg'][at]:.3f} kimg:",
            "",
            "| metric | |",
            "|---|---:|",
        ]
        lines.append(f"| detector verdict | **{detector_verdict(table)}** |")
        if table.last_evaluation is not None and "reading" in table.last_evaluation:
            lines.append(f"| this evaluation alone reads | {table.last_evaluation['reading']} |")
        for name in (
            "excess_pair",
            "vendi_ratio",
            "msssim_fake",
            "msssim_real",
            "std_ratio",
            "modes_covered",
            "mode_kl",
        ):
            column = f"Diversity/{name}"
            if column in table and np.isfinite(table[column][at]):
                value = f"{table[column][at]:.4g}"
                if name == "excess_pair" and "Diversity/excess_pair_se" in table:
                    value += f" ± {table['Diversity/excess_pair_se'][at]:.3f}"
                lines.append(f"| `{name}` | {value} |")
    return lines


def detector_verdict(table: RunTable) -> str:
    """The collapse detector's last verdict: `pending` / `in grace` until it has judged (logs written before
    verdicts were logged: the state)."""
    last = table.last_evaluation or {}
    if "verdict" in last:
        return str(last["verdict"])
    return STATES[int(last_value(table, "Collapse/level") or 0)]


def collapse_markdown(cfg: Mapping[str, Any], table: RunTable) -> list[str]:
    """The detector's state changes and rollbacks, and the non-finite steps the guard skipped."""
    diversity = cfg.get("diversity") or {}
    if not diversity.get("enabled", True) or "Collapse/level" not in table:
        lines = ["Not evaluated (diversity.enabled=false, or no evaluation logged)."]
    else:
        evaluations = int(np.isfinite(table["Collapse/level"]).sum())
        lines = [
            f"{evaluations} evaluations (every {diversity.get('every_kimg')} kimg and at each stage's end), "
            f"on_collapse={diversity.get('on_collapse')}."
        ]
        if table.events:
            lines.append("")
        else:
            lines.append(f"No state changes; the detector's verdict: {detector_verdict(table)}.")
        for e in table.events:
            if e.get("event") == "rollback":
                lines.append(
                    f"- {e['kimg']:.3f} kimg: **rollback** {e.get('rollbacks')} from {e['from_kimg']:.3f} kimg, "
                    f"learning rates x{e.get('lr_scale')}"
                )
            else:
                values = ", ".join(f"{k} {e[k]:.3f}" for k in ("excess_pair", "vendi_ratio", "std_ratio") if k in e)
                lines.append(
                    f"- {e['kimg']:.3f} kimg ({e.get('resolution')} px, alpha {e.get('alpha', 1.0):.2f}): "
                    f"{e.get('previous')} → **{e.get('state')}** ({values})"
                )
    skipped = int(np.nansum(table["Guard/skipped_steps"])) if "Guard/skipped_steps" in table else 0
    lines += [
        "",
        f"Non-finite steps skipped by the guard: {skipped}. (Guard rollbacks are logged to TensorBoard only, "
        "`Guard/events`.)",
    ]
    return lines


def format_seconds(seconds: float | None) -> str:
    """`42.1 s`, `3 min 05 s`, `2 h 03 min`; `-` for None."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def unreadable_note(lines: list[str]) -> str:
    """One sentence naming the jsonl lines a report skipped (read_jsonl's names, the first few)."""
    shown = ", ".join(lines[:_SHOWN_LINES]) + (
        f" and {len(lines) - _SHOWN_LINES} more" if len(lines) > _SHOWN_LINES else ""
    )
    cause = "a write cut short by a kill" if all(n.endswith("(the last)") for n in lines) else "damaged or edited"
    return f"{len(lines)} unreadable line(s) in the jsonl logs were skipped ({cause}): {shown}"


# --- both files ----------------------------------------------------------------------------------------------


def write_report(run_dir: Path, out_dir: Path | None = None) -> dict[str, Any]:
    """Write `report.png` and `report.md` for `run_dir` into `out_dir` (default: the run directory); returns a
    summary (paths, kimg, stages with their time, the detector's final state, the last losses and scores)."""
    run_dir = Path(run_dir)
    table = load_table(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir
    png, md = out_dir / "report.png", out_dir / "report.md"
    cfg = _config(run_dir)
    loss, data = (cfg.get("loss") or {}).get("name", "?"), (cfg.get("data") or {}).get("source", "?")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        plot_report(table, png, title=f"{run_dir.name}: loss {loss}, data {data}")
        md.write_text(summary_markdown(run_dir, table, plot_name=png.name), encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot write the report in {out_dir}: {exc}") from exc
    level = last_value(table, "Collapse/level")
    return {
        "png": str(png),
        "markdown": str(md),
        "kimg": float(table["kimg"][-1]),
        "stages": [{k: s[k] for k in ("resolution", "logged_kimg", "done", "seconds")} for s in stage_summaries(table)],
        "collapse_state": None if level is None else detector_verdict(table),
        "collapse_events": len(table.events),
        # schedule.advance=plateau: when each stage's stable phase ended, and why
        "advances": [{k: r[k] for k in ("resolution", "stable_kimg", "advance")} for r in table.advances],
        "final": {k: last_value(table, k) for k in ("Loss/D", "Loss/G", "Scores/real", "Scores/fake")},
        "unreadable_lines": table.unreadable,
    }
