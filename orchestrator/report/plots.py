"""The report's PNG plots: the primary metric and the loss over steps (mean over seeds, min-max band), and the
last sample grid of every arm. Drawn with matplotlib's object API on the Agg canvas (no pyplot, no display)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from orchestrator.report.collect import BROKEN_STATES, ArmResult, SeedResult, StudyResults, finite_number

LOSS_KEY = "loss"
LOG_SCALE_RATIO = 50          # loss plots use a log y axis when max / min exceeds this
SAMPLE_PANEL_PIXELS = 512     # sample grids are shrunk to at most this size before drawing
DPI = 110


@dataclass
class PlotOutcome:
    name: str                  # primary_metric, loss, samples
    title: str
    path: Path | None          # None when skipped
    skipped_because: str | None = None


def write_plots(results: StudyResults, plots_dir: Path) -> list[PlotOutcome]:
    plots_dir.mkdir(parents=True, exist_ok=True)
    colours = arm_colours(results.arms)
    outcomes = []
    if results.primary:
        direction = {"min": " (lower is better)", "max": " (higher is better)"}.get(results.mode or "", "")
        outcomes.append(_curve_plot(results, results.primary, "primary_metric", f"{results.primary} per arm{direction}",
                                    plots_dir, colours, log_if_wide=False))
    else:
        outcomes.append(PlotOutcome("primary_metric", "Primary metric", None, "the run names no primary metric"))
    outcomes.append(_curve_plot(results, LOSS_KEY, "loss", "Training loss per arm", plots_dir, colours,
                                log_if_wide=True))
    outcomes.append(_samples_plot(results, plots_dir))
    for outcome in outcomes:  # a plot skipped now must not leave an earlier report's PNG behind
        if outcome.path is None:
            (plots_dir / f"{outcome.name}.png").unlink(missing_ok=True)
    return outcomes


def arm_colours(arms: list[ArmResult]) -> dict[str, tuple]:
    palette = colormaps["tab10" if len(arms) <= 10 else "tab20"]
    return {arm.name: palette(i % palette.N) for i, arm in enumerate(arms)}


def series(seeds: list[SeedResult], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(steps, mean, min, max) over the seeds' finite values of `key`, at every step any seed has one."""
    by_step: dict[int, list[float]] = {}
    for seed in seeds:
        for row in seed.metric_rows:
            if finite_number(row.get(key)) and "step" in row:
                by_step.setdefault(int(row["step"]), []).append(float(row[key]))
    if not by_step:
        return None
    steps = sorted(by_step)
    values = [by_step[s] for s in steps]
    return (np.array(steps), np.array([np.mean(v) for v in values]),
            np.array([min(v) for v in values]), np.array([max(v) for v in values]))


def _curve_plot(results: StudyResults, key: str, name: str, title: str, plots_dir: Path, colours: dict,
                log_if_wide: bool) -> PlotOutcome:
    fig = Figure(figsize=(8.5, 5), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    drawn = []
    for arm in results.arms:
        kept = [s for s in arm.seeds if s.state not in BROKEN_STATES]
        band = series(kept, key)
        if band is not None:
            steps, mean, low, high = band
            marker = "o" if len(steps) <= 30 else None
            ax.plot(steps, mean, color=colours[arm.name], marker=marker, markersize=3.5, linewidth=1.8,
                    label=f"{arm.name} ({len(kept)} seed{'s' if len(kept) != 1 else ''})")
            if len(kept) > 1:
                ax.fill_between(steps, low, high, color=colours[arm.name], alpha=0.18, linewidth=0)
            drawn.append(mean)
        for seed in arm.seeds:
            if seed.state in BROKEN_STATES and (broken := series([seed], key)) is not None:
                ax.plot(broken[0], broken[1], color=colours[arm.name], linestyle=":", linewidth=1.2,
                        label=f"{seed.label} ({seed.state})")
                drawn.append(broken[1])
    if not drawn:
        return PlotOutcome(name, title, None, f"no metrics row carries {key!r}")
    values = np.concatenate(drawn)
    if log_if_wide and values.min() > 0 and values.max() / values.min() > LOG_SCALE_RATIO:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=13)
    ax.set_xlabel("step")
    ax.set_ylabel(key + (" (log scale)" if ax.get_yscale() == "log" else ""))
    ax.grid(True, alpha=0.3)
    ax.legend(title="line: mean over seeds; band: min–max", fontsize=9, title_fontsize=9, loc="best")
    return PlotOutcome(name, title, _save(fig, plots_dir / f"{name}.png"))


def newest_sample(seed: SeedResult) -> Path | None:
    pngs = list((seed.out_dir / "samples").glob("*.png"))
    return max(pngs, key=lambda p: (p.stat().st_mtime, p.name)) if pngs else None


def _samples_plot(results: StudyResults, plots_dir: Path) -> PlotOutcome:
    title = "Last sample grid of each arm"
    panels = []  # (arm name, seed or None, png or None)
    for arm in results.arms:
        seed = arm.succeeded[0] if arm.succeeded else None
        panels.append((arm.name, seed, newest_sample(seed) if seed else None))
    if not any(png for _, _, png in panels):
        return PlotOutcome("samples", title, None, "no succeeded arm run has a PNG under samples/")
    ncols = min(len(panels), 3)
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 4.5 * nrows + 0.4), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=14)
    for i, (arm_name, seed, png) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.set_axis_off()
        if png is None:
            why = "no succeeded seed" if seed is None else "no sample grid"
            ax.text(0.5, 0.5, why, ha="center", va="center", fontsize=11, color="grey", transform=ax.transAxes)
            ax.set_title(arm_name, fontsize=12)
            continue
        with Image.open(png) as image:
            image = image.convert("RGB")
            image.thumbnail((SAMPLE_PANEL_PIXELS, SAMPLE_PANEL_PIXELS), Image.Resampling.LANCZOS)
            pixels = np.asarray(image)
        ax.imshow(pixels, interpolation="nearest")
        ax.set_title(f"{arm_name}\nseed {seed.row['seed']} · {png.name}", fontsize=11)
    return PlotOutcome("samples", title, _save(fig, plots_dir / "samples.png"))


def _save(fig: Figure, path: Path) -> Path:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(temporary, format="png")
    os.replace(temporary, path)
    return path
