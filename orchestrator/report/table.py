"""The results table, one row per arm, as markdown, as a rich Table and as CSV rows."""

from __future__ import annotations

import csv
import io

from rich import box
from rich.table import Table
from rich.text import Text

from orchestrator.report.collect import STATE_ORDER, ArmResult, SeedResult, StudyResults
from orchestrator.report.verdicts import ALPHA, CONFIDENCE, Verdict

BEST_MARK = "★"
ARROWS = {"min": "↓", "max": "↑"}
TEXT_COLUMNS = ("Arm", "Seeds", "Verdict", "Hardware")   # left-aligned; every other column holds numbers
WRAPPING_COLUMNS = ("Seeds", "Hardware")                  # the only columns that wrap on a narrow terminal
# How much of the table to show: everything (results.md, wide terminals); the primary metric, verdict,
# difference, n, seed states and hours; or only the arm, n, primary metric, verdict and difference.
LAYOUTS = ("full", "compact", "narrow")


def format_number(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def format_signed(value: float, digits: int = 3) -> str:
    return f"{value:+.{digits}g}"


def format_hours(hours: float) -> str:
    return "0" if hours == 0 else f"{hours:.3g}"


def format_p(p: float | None) -> str:
    if p is None:
        return "—"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def format_diff(verdict: Verdict) -> str:
    """'+0.031 [+0.012, +0.05]': the mean paired difference and its interval (no interval with one seed)."""
    if verdict.diff_mean is None:
        return "—"
    text = format_signed(verdict.diff_mean)
    if verdict.ci_low is not None and verdict.ci_high is not None:
        text += f" [{format_signed(verdict.ci_low)}, {format_signed(verdict.ci_high)}]"
    return text


def state_counts(seeds: list[SeedResult]) -> str:
    counts: dict[str, int] = {}
    for seed in seeds:
        counts[seed.state] = counts.get(seed.state, 0) + 1
    ordered = sorted(counts, key=lambda s: STATE_ORDER.index(s) if s in STATE_ORDER else len(STATE_ORDER))
    return ", ".join(f"{counts[state]} {state}" for state in ordered)


def has_verdicts(results: StudyResults) -> bool:
    return any(arm.verdict is not None for arm in results.arms)


def seeds_compared(results: StudyResults, arm: ArmResult) -> int:
    """n: the seeds behind the arm's verdict (paired with the baseline), else its seeds with the primary metric."""
    if arm.verdict is not None:
        return arm.verdict.n
    if results.primary:
        return arm.stats[results.primary].n
    return len(arm.succeeded)


def table_columns(results: StudyResults, layout: str = "full") -> tuple[list[str], list[list[str]]]:
    """Headers and one row of cells per arm, shared by the markdown and the terminal table (see LAYOUTS)."""
    full = layout == "full"
    shown = shown_metrics(results) if full or not results.primary else [results.primary]
    headers = ["Arm"] + (["Seeds"] if layout != "narrow" else []) + ["n"]
    headers += [f"{m} {ARROWS.get(results.metrics[m] or '', '')}".rstrip() for m in shown]
    if has_verdicts(results):
        headers += ["Verdict", f"diff {results.primary} [{CONFIDENCE:.0%} CI]" if full else
                    f"diff [{CONFIDENCE:.0%} CI]"]
        if full:
            headers += ["Wins", "p (Holm)"]
    if layout != "narrow":
        headers += (["GPU-h"] if results.uses_gpus else []) + (["CPU-h"] if results.uses_cpu_only else [])
    if full:
        headers.append("Hardware")
    return headers, [_row_cells(results, arm, shown, layout) for arm in results.arms]


def shown_metrics(results: StudyResults) -> list[str]:
    """The primary metric, and the others that some arm has a value of (results.csv keeps them all)."""
    return [m for m in results.metrics if m == results.primary or any(arm.stats[m].n for arm in results.arms)]


def _row_cells(results: StudyResults, arm: ArmResult, shown: list[str], layout: str) -> list[str]:
    full = layout == "full"
    cells = [arm.name + (f" {BEST_MARK}" if arm.starred else "")]
    cells += ([state_counts(arm.seeds)] if layout != "narrow" else []) + [str(seeds_compared(results, arm))]
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
    if has_verdicts(results):
        verdict = arm.verdict
        if arm.stopped is not None:      # out of the verdicts: its status instead
            cells += [arm.stopped["reason"], "—"] + (["—", "—"] if full else [])
        elif verdict is None or verdict.verdict == "baseline":
            cells += ["baseline" if verdict else "—", "—"] + (["—", "—"] if full else [])
        else:
            cells += [verdict.verdict, format_diff(verdict)]
            if full:
                cells += [verdict.wins_text, format_p(verdict.p_adjusted)]
    if layout != "narrow":
        cells += ([format_hours(arm.gpu_hours)] if results.uses_gpus else [])
        cells += ([format_hours(arm.cpu_hours)] if results.uses_cpu_only else [])
    if full:
        cells.append(", ".join(arm.hardware) or "—")
    return cells


def table_legend(results: StudyResults) -> str:
    parts = ["Metrics: mean ± sample standard deviation (ddof=1) over the seeds that succeeded "
             "(no ± with one seed; n= where fewer seeds reported the metric); "
             "↓ lower is better, ↑ higher is better."]
    if has_verdicts(results):
        parts.append(f"n: seeds compared with {results.baseline}, paired by seed. "
                     f"diff: mean over those seeds of (arm − {results.baseline}) in {results.primary}, with its "
                     f"{CONFIDENCE:.0%} Student t interval. Wins: seeds where the arm beats {results.baseline}. "
                     f"p (Holm): two-sided paired t-test, Holm-adjusted over the arms. "
                     f"Verdict: better or worse when p (Holm) < {ALPHA}, else inconclusive.")
    if any(arm.starred for arm in results.arms):
        parts.append(f"{BEST_MARK}: verdict better than {results.baseline}.")
    if any(arm.stopped for arm in results.arms):
        parts.append("Stopped early / by halving: the arm was stopped at an interim look (see \"Stopped early\"); "
                     "it has no final verdict and is not in the Holm family of the others.")
    if results.uses_gpus:
        parts.append("GPU-h: wall time of every attempt × GPUs it held.")
    if results.uses_cpu_only:
        parts.append("CPU-h: wall time of every attempt × CPU cores, for arms without a GPU.")
    return " ".join(parts)


def numeric_columns(headers: list[str]) -> set[int]:
    """The columns holding numbers (right-aligned): all but the arm, its seeds' states, verdict and hardware."""
    return {i for i, header in enumerate(headers) if header not in TEXT_COLUMNS}


def markdown_table(headers: list[str], rows: list[list[str]], right_aligned: set[int] | range | tuple = ()) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
    align = ["---:" if i in right_aligned else "---" for i in range(len(headers))]
    return "\n".join([line(headers), "|" + "|".join(align) + "|"] + [line(r) for r in rows])


def rich_table(results: StudyResults, layout: str = "full") -> Table:
    headers, rows = table_columns(results, layout)
    run = results.run
    table = Table(title=Text(f"{run['name']} · {run['run_id']} · {run['state']}", style="bold"),
                  box=box.SIMPLE_HEAVY, caption=Text(_short_legend(results, layout), style="dim"),
                  caption_justify="left", pad_edge=False, show_edge=False, collapse_padding=True)
    numeric = numeric_columns(headers)
    for i, header in enumerate(headers):
        wraps = header in WRAPPING_COLUMNS
        widest = max([len(cells[i]) for cells in rows] + [0 if wraps or i == 0 else len(header)])
        # Arm names, numbers, verdicts and their headers keep their width on a narrow terminal; states and
        # hardware wrap.
        table.add_column(Text(header), justify="right" if i in numeric else "left", overflow="fold",
                         min_width=None if wraps else widest)
    for arm, cells in zip(results.arms, rows):
        table.add_row(*[Text(c) for c in cells], style="bold" if arm.starred else None)
    return table


def _short_legend(results: StudyResults, layout: str) -> str:
    parts = ["mean ± sample std (ddof=1) over succeeded seeds"]
    if layout != "full":
        parts.append("other metrics, wins, p and hardware: results.md")
    if has_verdicts(results):
        parts.append(f"diff = arm − {results.baseline} over n paired seeds, {CONFIDENCE:.0%} t interval")
    if any(arm.starred for arm in results.arms):
        parts.append(f"{BEST_MARK} better than {results.baseline}")
    return " · ".join(parts)


def csv_text(results: StudyResults) -> str:
    """One row per arm; empty cells where a value does not exist (no seed succeeded, one seed, no baseline)."""
    columns = ["arm", "is_baseline", "verdict", "n_paired", "diff_mean", "diff_ci_low", "diff_ci_high",
               "diff_bca_low", "diff_bca_high", "p_value", "p_adjusted", "wins", "verdict_note",
               "stopped_early", "stopped_rule", "stopped_step",
               "n_seeds", "n_succeeded", "n_failed", "n_diverged", "n_cancelled", "n_unfinished"]
    for metric in results.metrics:
        columns += [f"{metric}_mean", f"{metric}_std", f"{metric}_n"]
    columns += ["gpu_hours", "cpu_hours", "hardware"]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for arm in results.arms:
        finished = sum(arm.count(s) for s in ("succeeded", "failed", "diverged", "cancelled"))
        row = {"arm": arm.name, "is_baseline": int(arm.is_baseline),
               "n_seeds": len(arm.seeds), "n_succeeded": arm.count("succeeded"), "n_failed": arm.count("failed"),
               "n_diverged": arm.count("diverged"), "n_cancelled": arm.count("cancelled"),
               "n_unfinished": len(arm.seeds) - finished,
               "gpu_hours": _csv_float(arm.gpu_hours), "cpu_hours": _csv_float(arm.cpu_hours),
               "hardware": "; ".join(arm.hardware)}
        if arm.stopped is not None:
            row.update({"stopped_early": arm.stopped["reason"], "stopped_rule": arm.stopped["rule"],
                        "stopped_step": arm.stopped["step"]})
        if arm.verdict is not None:
            v = arm.verdict
            row.update({"verdict": v.verdict, "n_paired": v.n, "diff_mean": _csv_float(v.diff_mean),
                        "diff_ci_low": _csv_float(v.ci_low), "diff_ci_high": _csv_float(v.ci_high),
                        "diff_bca_low": _csv_float(v.bca_low), "diff_bca_high": _csv_float(v.bca_high),
                        "p_value": _csv_float(v.p_value), "p_adjusted": _csv_float(v.p_adjusted),
                        "wins": "" if v.verdict == "baseline" else v.wins_text, "verdict_note": v.note})
        for metric, stat in arm.stats.items():
            row[f"{metric}_mean"] = _csv_float(stat.mean)
            row[f"{metric}_std"] = _csv_float(stat.std)
            row[f"{metric}_n"] = stat.n
        writer.writerow(row)
    return out.getvalue()


def _csv_float(value: float | None) -> str:
    return "" if value is None else repr(float(value))
