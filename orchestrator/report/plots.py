"""The report's PNG plots, drawn with matplotlib's object API on the Agg canvas (no pyplot, no display).

- One figure per metric the trainer declares, the primary metric first (`primary_metric.png`, then
  `metric_<name>.png`), plus the training loss (`loss.png`) when the trainer does not declare it: each arm's
  mean over its kept seeds as a thick line, each seed's own curve as a thin line beside it, every arm in its own
  colour and line style (two arms with identical curves stay told apart), a broken seed dotted.
- `samples.png`: the grid the trainer declares (`SAMPLES_IMAGE`, default "samples": `samples/<name>_stepNNNNNN.png`
  during training, `samples/<name>.png` at the end) for each arm and a few of its seeds, at a few steps spread
  through training (always the last).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from orchestrator.report.collect import BROKEN_STATES, ArmResult, SeedResult, StudyResults, finite_number

LOSS_KEY = "loss"
LOG_SCALE_RATIO = 50          # a loss plot uses a log y axis when max / min of its positive values exceeds this
SAMPLE_PANEL_PIXELS = 256     # sample grids are shrunk to at most this size before drawing
SAMPLE_STEPS = 4              # columns of the samples figure: steps spread through training
MAX_SAMPLE_ROWS = 12          # rows (arm x seed) of the samples figure; fewer seeds per arm when there are many arms
MAX_SEEDS_SHOWN = 3
DEFAULT_SAMPLES_IMAGE = "samples"
LINE_STYLES = ("-", "--", "-.", (0, (1, 1.5)), (0, (5, 1.5, 1, 1.5, 1, 1.5)))
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
DPI = 110


@dataclass
class PlotOutcome:
    name: str                  # primary_metric, metric_<key>, loss, samples
    title: str
    path: Path | None          # None when skipped
    skipped_because: str | None = None


@dataclass
class ArmStyle:
    colour: tuple
    linestyle: object
    marker: str


def write_plots(results: StudyResults, plots_dir: Path) -> list[PlotOutcome]:
    plots_dir.mkdir(parents=True, exist_ok=True)
    styles = arm_styles(results.arms)
    outcomes = []
    if not results.primary:
        outcomes.append(PlotOutcome("primary_metric", "Primary metric", None, "the run names no primary metric"))
    for key, mode in results.metrics.items():
        direction = {"min": " (lower is better)", "max": " (higher is better)"}.get(mode or "", "")
        name = "primary_metric" if key == results.primary else metric_plot_name(key)
        outcomes.append(_curve_plot(results, key, name, f"{key} per arm{direction}", plots_dir, styles))
    if LOSS_KEY not in results.metrics:
        outcomes.append(_curve_plot(results, LOSS_KEY, "loss", "Training loss per arm", plots_dir, styles))
    outcomes.append(_samples_plot(results, plots_dir))
    drawn = {outcome.path for outcome in outcomes if outcome.path is not None}
    for stale in plots_dir.glob("*.png"):   # a plot not drawn now must not leave an earlier report's PNG behind
        if stale not in drawn and (stale.stem in ("primary_metric", "loss", "samples")
                                   or stale.stem.startswith("metric_")):
            stale.unlink(missing_ok=True)
    return outcomes


def metric_plot_name(key: str) -> str:
    return "metric_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", key)


def arm_styles(arms: list[ArmResult]) -> dict[str, ArmStyle]:
    palette = colormaps["tab10" if len(arms) <= 10 else "tab20"]
    return {arm.name: ArmStyle(palette(i % palette.N), LINE_STYLES[i % len(LINE_STYLES)], MARKERS[i % len(MARKERS)])
            for i, arm in enumerate(arms)}


def series(seeds: list[SeedResult], key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps, mean) over the seeds' finite values of `key`, at every step any seed has one."""
    by_step: dict[int, list[float]] = {}
    for seed in seeds:
        for row in seed.metric_rows:
            if finite_number(row.get(key)) and "step" in row:
                by_step.setdefault(int(row["step"]), []).append(float(row[key]))
    if not by_step:
        return None
    steps = sorted(by_step)
    return np.array(steps), np.array([np.mean(by_step[s]) for s in steps])


def _curve_plot(results: StudyResults, key: str, name: str, title: str, plots_dir: Path,
                styles: dict[str, ArmStyle]) -> PlotOutcome:
    fig = curve_figure(results, key, title, styles)
    if fig is None:
        return PlotOutcome(name, title, None, f"no metrics row carries {key!r}")
    return PlotOutcome(name, title, _save(fig, plots_dir / f"{name}.png"))


def curve_figure(results: StudyResults, key: str, title: str, styles: dict[str, ArmStyle]) -> Figure | None:
    """`key` against the step for every arm (None when no metrics row carries it)."""
    fig = Figure(figsize=(8.5, 5), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    drawn = []
    for arm in results.arms:
        style = styles[arm.name]
        kept = [s for s in arm.seeds if s.state not in BROKEN_STATES]
        for seed in kept:
            if len(kept) > 1 and (own := series([seed], key)) is not None:
                ax.plot(*own, color=style.colour, linestyle=style.linestyle, linewidth=0.7, alpha=0.45)
        mean = series(kept, key)
        if mean is not None:
            marker = style.marker if len(mean[0]) <= 30 else None
            ax.plot(*mean, color=style.colour, linestyle=style.linestyle, marker=marker, markersize=4,
                    linewidth=2.2, label=f"{arm.name} ({len(kept)} seed{'s' if len(kept) != 1 else ''})")
            drawn.append(mean[1])
        for seed in arm.seeds:
            if seed.state in BROKEN_STATES and (broken := series([seed], key)) is not None:
                ax.plot(*broken, color=style.colour, linestyle=":", linewidth=1.2, label=f"{seed.label} ({seed.state})")
                drawn.append(broken[1])
    if not drawn:
        return None
    values = np.concatenate(drawn)
    if key.startswith(LOSS_KEY) and values.min() > 0 and values.max() / values.min() > LOG_SCALE_RATIO:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=13)
    ax.set_xlabel("step")
    ax.set_ylabel(key + (" (log scale)" if ax.get_yscale() == "log" else ""))
    ax.grid(True, alpha=0.3)
    ax.legend(title="thick: mean over seeds; thin: each seed", fontsize=9, title_fontsize=9, loc="best")
    return fig


def sample_images(seed: SeedResult, image: str) -> dict[int, Path]:
    """Step -> the seed's `image` grid at that step: `<image>_stepNNNNNN.png` files, and the final `<image>.png`
    at the seed's last step."""
    folder = seed.out_dir / "samples"
    pattern = re.compile(rf"^{re.escape(image)}_step(\d+)\.png$")
    found = {int(match[1]): path for path in folder.glob(f"{image}_step*.png") if (match := pattern.match(path.name))}
    final = folder / f"{image}.png"
    last_step = seed.row.get("last_step") or int(seed.values.get("steps", 0)) or max(found, default=0)
    if final.is_file():
        found[max(last_step, max(found, default=0))] = final
    return dict(sorted(found.items()))


def spread_steps(steps: list[int], count: int = SAMPLE_STEPS) -> list[int]:
    """At most `count` of the sorted `steps`, evenly spread, the first and the last included."""
    if len(steps) <= count:
        return steps
    return [steps[round(i * (len(steps) - 1) / (count - 1))] for i in range(count)]


def _samples_plot(results: StudyResults, plots_dir: Path) -> PlotOutcome:
    per_arm = max(1, min(MAX_SEEDS_SHOWN, MAX_SAMPLE_ROWS // max(1, len(results.arms))))
    rows = []   # (arm, seed, step -> png)
    declared = set()
    for arm in results.arms:
        image = results.samples_images.get(arm.seeds[0].row["trainer"], DEFAULT_SAMPLES_IMAGE) if arm.seeds \
            else DEFAULT_SAMPLES_IMAGE
        declared.add(image)
        shown = [s for s in arm.seeds if s.state == "succeeded"] + [s for s in arm.seeds if s.state != "succeeded"]
        with_images = [(seed, pngs) for seed in shown if (pngs := sample_images(seed, image))]
        rows += [(arm, seed, pngs) for seed, pngs in with_images[:per_arm]]
    names = sorted({png.stem.split("_step")[0] for _, _, pngs in rows for png in pngs.values()})
    title = f"Sample grids ({', '.join(names) or DEFAULT_SAMPLES_IMAGE}.png) through training"
    if not rows:
        wanted = " or ".join(f"samples/{image}.png" for image in sorted(declared or {DEFAULT_SAMPLES_IMAGE}))
        return PlotOutcome("samples", title, None, f"no arm run has a {wanted}")
    steps = spread_steps(sorted({step for _, _, pngs in rows for step in pngs}))
    fig = Figure(figsize=(2.6 * len(steps) + 0.6, 2.7 * len(rows) + 0.6), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=13)
    for r, (arm, seed, pngs) in enumerate(rows):
        for c, step in enumerate(steps):
            ax = fig.add_subplot(len(rows), len(steps), r * len(steps) + c + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(f"{arm.name}\nseed {seed.row['seed']}" + ("" if seed.state == "succeeded"
                                                                         else f" ({seed.state})"), fontsize=10)
            if r == 0:
                ax.set_title(f"step {step}", fontsize=10)
            if step not in pngs:
                ax.text(0.5, 0.5, "no grid", ha="center", va="center", fontsize=9, color="grey",
                        transform=ax.transAxes)
                continue
            with Image.open(pngs[step]) as grid:
                grid = grid.convert("RGB")
                grid.thumbnail((SAMPLE_PANEL_PIXELS, SAMPLE_PANEL_PIXELS), Image.Resampling.LANCZOS)
                ax.imshow(np.asarray(grid), interpolation="nearest")
    return PlotOutcome("samples", title, _save(fig, plots_dir / "samples.png"))


def _save(fig: Figure, path: Path) -> Path:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(temporary, format="png")
    os.replace(temporary, path)
    return path
