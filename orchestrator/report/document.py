"""results.md: what ran, the results table, the hardware warning, the plots and notes."""

from __future__ import annotations

import time

from orchestrator.report.collect import SeedResult, StudyResults, one_line
from orchestrator.report.plots import PlotOutcome
from orchestrator.report.table import (format_hours, markdown_table, numeric_columns, state_counts, table_columns,
                                       table_legend)

DIRECTION_WORDS = {"min": "lower is better", "max": "higher is better"}


def results_markdown(results: StudyResults, plots: list[PlotOutcome]) -> str:
    run = results.run
    lines = [f"# {run['name']}: results", ""]
    lines += [f"- Run: `{run['run_id']}` ({run['state']}, backend {run['backend']})",
              f"- Trainer: `{run['trainer']}`",
              f"- Code: {_code_line(run)}"]
    if results.primary:
        direction = DIRECTION_WORDS.get(results.mode or "", "direction unknown")
        lines.append(f"- Primary metric: `{results.primary}` ({direction})")
    if results.baseline:
        lines.append(f"- Baseline arm: `{results.baseline}`")
    lines.append(f"- Report written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    if results.description.strip():
        lines += ["", results.description.strip()]
    described = [arm for arm in results.arms if arm.description.strip()]
    if described:
        lines += [""] + [f"- `{arm.name}`: {arm.description.strip()}" for arm in described]

    lines += ["", "## Arms", ""]
    if results.arms:
        headers, rows = table_columns(results)
        lines += [markdown_table(headers, rows, numeric_columns(headers)), "", table_legend(results)]
    else:
        lines.append("This run has no arm runs.")
    if results.hardware_warning:
        lines += ["", f"> **Warning:** {results.hardware_warning}"]

    if results.upstream:
        lines += ["", "## Upstream runs", "",
                  "Trained once and shared by every arm that needs them.", ""]
        headers = ["Upstream", "Trainer", "Seed", "State", "Compute", "Hardware", "Reason"]
        lines.append(markdown_table(headers, [_upstream_cells(seed) for seed in results.upstream]))

    lines += ["", "## Plots", ""]
    for plot in plots:
        if plot.path is not None:
            lines += [f"### {plot.title}", "", f"![{plot.title}](plots/{plot.path.name})", ""]
    skipped = [f"- {plot.title}: not drawn, {plot.skipped_because}." for plot in plots if plot.path is None]
    lines += skipped + [""] if skipped else []

    lines += ["## Notes", ""]
    if results.notes:
        lines += [f"- {note}" for note in results.notes]
    else:
        lines.append("- Every arm run succeeded." if results.seeds else "- Nothing has been planned in this run.")
    return "\n".join(lines).rstrip() + "\n"


def _upstream_cells(seed: SeedResult) -> list[str]:
    compute = f"{format_hours(seed.gpu_hours)} GPU-h" if seed.row["gpus"] else f"{format_hours(seed.cpu_hours)} CPU-h"
    return [seed.row["arm"], seed.row["trainer"], str(seed.row["seed"]), state_counts([seed]), compute,
            ", ".join(seed.hardware) or "—", one_line(seed.row["reason"]) if seed.row["reason"] else ""]


def _code_line(run: dict) -> str:
    if not run["git_commit"]:
        return "git commit unknown"
    line = f"git commit `{run['git_commit']}`"
    if run["git_diff_hash"]:
        line += f" with uncommitted changes (diff hash `{run['git_diff_hash']}`)"
    return line
