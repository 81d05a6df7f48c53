"""The results table, one row per arm, as markdown, as a rich Table and as CSV rows."""

from __future__ import annotations

import csv
import io

from rich import box
from rich.table import Table
from rich.text import Text

from orchestrator.report.collect import STATE_ORDER, ArmResult, SeedResult, StudyResults

BEST_MARK = "★"
ARROWS = {"min": "↓", "max": "↑"}


def format_number(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def format_hours(hours: float) -> str:
    return "0" if hours == 0 else f"{hours:.3g}"


def state_counts(seeds: list[SeedResult]) -> str:
    counts: dict[str, int] = {}
    for seed in seeds:
        counts[seed.state] = counts.get(seed.state, 0) + 1
    ordered = sorted(counts, key=lambda s: STATE_ORDER.index(s) if s in STATE_ORDER else len(STATE_ORDER))
    return ", ".join(f"{counts[state]} {state}" for state in ordered)


def has_delta_columns(results: StudyResults) -> bool:
    return bool(results.baseline and results.primary)


def table_columns(results: StudyResults, compact: bool = False) -> tuple[list[str], list[list[str]]]:
    """Headers and one row of cells per arm, shared by the markdown and the terminal table.
    `compact` keeps the primary metric alone and leaves the hardware out (for a narrow terminal)."""
    shown = [results.primary] if compact and results.primary else shown_metrics(results)
    headers = ["Arm", "Seeds"] + [f"{m} {ARROWS.get(results.metrics[m] or '', '')}".rstrip() for m in shown]
    if has_delta_columns(results):
        headers += ["Δ", "Δ/σ"] if compact else [f"Δ {results.primary}", "Δ / baseline σ"]
    if results.uses_gpus:
        headers.append("GPU-h")
    if results.uses_cpu_only:
        headers.append("CPU-h")
    if not compact:
        headers.append("Hardware")
    return headers, [_row_cells(results, arm, shown, compact) for arm in results.arms]


def shown_metrics(results: StudyResults) -> list[str]:
    """The primary metric, and the others that some arm has a value of (results.csv keeps them all)."""
    return [m for m in results.metrics if m == results.primary or any(arm.stats[m].n for arm in results.arms)]


def _row_cells(results: StudyResults, arm: ArmResult, shown: list[str], compact: bool) -> list[str]:
    cells = [arm.name + (f" {BEST_MARK}" if arm.is_best else ""), state_counts(arm.seeds)]
    for metric in shown:
        stat = arm.stats[metric]
        if stat.mean is None:
            cells.append("—")
            continue
        cell = format_number(stat.mean)
        if stat.std is not None:
            cell += f" ± {format_number(stat.std, 2)}"
        if stat.n < len(arm.succeeded):  # some succeeded seeds did not report this metric
            cell += f" (n={stat.n})"
        cells.append(cell)
    if has_delta_columns(results):
        if arm.delta is None:
            cells += ["—", "—"]
        else:
            cells.append("0 (baseline)" if arm.is_baseline else f"{arm.delta:+.3g}")
            cells.append("n/a" if arm.delta_in_baseline_std is None else f"{arm.delta_in_baseline_std:+.2f}")
    if results.uses_gpus:
        cells.append(format_hours(arm.gpu_hours))
    if results.uses_cpu_only:
        cells.append(format_hours(arm.cpu_hours))
    if not compact:
        cells.append(", ".join(arm.hardware) or "—")
    return cells


def table_legend(results: StudyResults) -> str:
    parts = ["Metrics: mean ± sample standard deviation (ddof=1) over the seeds that succeeded "
             "(no ± with one seed; n= where fewer seeds reported the metric); "
             "↓ lower is better, ↑ higher is better."]
    if has_delta_columns(results):
        parts.append(f"Δ: arm mean − baseline mean of {results.primary}; Δ / baseline σ: Δ in units of the "
                     f"baseline's standard deviation (n/a when that is 0 or the baseline has one seed).")
    if any(arm.is_best for arm in results.arms):
        parts.append(f"{BEST_MARK}: best arm for {results.primary}.")
    if results.uses_gpus:
        parts.append("GPU-h: wall time of every attempt × GPUs it held.")
    if results.uses_cpu_only:
        parts.append("CPU-h: wall time of every attempt × CPU cores, for arms without a GPU.")
    return " ".join(parts)


def numeric_columns(headers: list[str]) -> range:
    """Metrics, deltas and hours: after the arm and its seeds, before the hardware (if shown); right-aligned."""
    return range(2, len(headers) - 1 if headers[-1] == "Hardware" else len(headers))


def markdown_table(headers: list[str], rows: list[list[str]], right_aligned: range | tuple = ()) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
    align = ["---:" if i in right_aligned else "---" for i in range(len(headers))]
    return "\n".join([line(headers), "|" + "|".join(align) + "|"] + [line(r) for r in rows])


def rich_table(results: StudyResults, compact: bool = False) -> Table:
    headers, rows = table_columns(results, compact)
    run = results.run
    table = Table(title=Text(f"{run['name']} · {run['run_id']} · {run['state']}", style="bold"),
                  box=box.SIMPLE_HEAVY, caption=Text(_short_legend(results, compact), style="dim"),
                  caption_justify="left", pad_edge=False)
    for i, header in enumerate(headers):
        numeric = i in numeric_columns(headers)
        widest = max([len(cells[i]) for cells in rows] + [len(header) if numeric else 0])
        # Arm names, numbers and their headers keep their width on a narrow terminal; states and hardware wrap.
        table.add_column(Text(header), justify="right" if numeric else "left", overflow="fold",
                         min_width=widest if numeric or i == 0 else None)
    for arm, cells in zip(results.arms, rows):
        table.add_row(*[Text(c) for c in cells], style="bold" if arm.is_best else None)
    return table


def _short_legend(results: StudyResults, compact: bool) -> str:
    parts = ["mean ± sample std (ddof=1) over succeeded seeds"]
    if compact:
        parts.append("other metrics and hardware: results.md")
    if any(arm.is_best for arm in results.arms):
        parts.append(f"{BEST_MARK} best {results.primary}")
    if has_delta_columns(results):
        parts.append(f"Δ = arm − {results.baseline}, σ = std of {results.baseline}")
    return " · ".join(parts)


def csv_text(results: StudyResults) -> str:
    """One row per arm; empty cells where a value does not exist (no seed succeeded, one seed, no baseline)."""
    columns = ["arm", "is_baseline", "is_best", "n_seeds", "n_succeeded", "n_failed", "n_diverged",
               "n_cancelled", "n_unfinished"]
    for metric in results.metrics:
        columns += [f"{metric}_mean", f"{metric}_std", f"{metric}_n"]
    columns += ["delta", "delta_in_baseline_std", "gpu_hours", "cpu_hours", "hardware"]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for arm in results.arms:
        finished = sum(arm.count(s) for s in ("succeeded", "failed", "diverged", "cancelled"))
        row = {"arm": arm.name, "is_baseline": int(arm.is_baseline), "is_best": int(arm.is_best),
               "n_seeds": len(arm.seeds), "n_succeeded": arm.count("succeeded"), "n_failed": arm.count("failed"),
               "n_diverged": arm.count("diverged"), "n_cancelled": arm.count("cancelled"),
               "n_unfinished": len(arm.seeds) - finished,
               "delta": _csv_float(arm.delta), "delta_in_baseline_std": _csv_float(arm.delta_in_baseline_std),
               "gpu_hours": _csv_float(arm.gpu_hours), "cpu_hours": _csv_float(arm.cpu_hours),
               "hardware": "; ".join(arm.hardware)}
        for metric, stat in arm.stats.items():
            row[f"{metric}_mean"] = _csv_float(stat.mean)
            row[f"{metric}_std"] = _csv_float(stat.std)
            row[f"{metric}_n"] = stat.n
        writer.writerow(row)
    return out.getvalue()


def _csv_float(value: float | None) -> str:
    return "" if value is None else repr(float(value))
