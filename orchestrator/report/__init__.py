"""A run's results: `run_dir/results.md`, `results.csv` and `plots/*.png`, and the table on the terminal.

Written when a run ends and by `armature report RUN_ID`; every call rewrites all of them from the ledger
and the arm runs' folders, so it is safe to run again at any time (also while a run is still going).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.text import Text

from orchestrator.ledger import Ledger
from orchestrator.report.collect import StudyResults, collect_results
from orchestrator.report.document import answer_lines, results_markdown
from orchestrator.report.plots import write_plots
from orchestrator.report.table import LAYOUTS, csv_text, rich_table

__all__ = ["ReportPaths", "StudyResults", "write_report"]


@dataclass
class ReportPaths:
    markdown: Path
    csv: Path
    plots: dict[str, Path] = field(default_factory=dict)          # plot name -> PNG written
    skipped_plots: dict[str, str] = field(default_factory=dict)   # plot name -> why it was not drawn

    def __str__(self) -> str:
        return ", ".join(str(p) for p in [self.markdown, self.csv, *self.plots.values()])


def write_report(ledger: Ledger, run_id: str, run_dir: Path, console: Console | None = None) -> ReportPaths:
    """(Re)write the report of `run_id` into `run_dir`; print its table to `console` when given.
    Raises UserError for a run the ledger does not know."""
    run_dir = Path(run_dir)
    results = collect_results(ledger, run_id, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(results, run_dir / "plots")
    paths = ReportPaths(
        markdown=_write_text(run_dir / "results.md", results_markdown(results, plots)),
        csv=_write_text(run_dir / "results.csv", csv_text(results)),
        plots={p.name: p.path for p in plots if p.path is not None},
        skipped_plots={p.name: p.skipped_because for p in plots if p.path is None})
    if console is not None:
        print_results(results, console)
    return paths


def print_results(results: StudyResults, console: Console) -> None:
    if not results.arms:
        console.print(Text(f"{results.run['run_id']}: no arm runs", style="bold"))
    else:
        for layout in LAYOUTS:   # the fullest table that fits the terminal (the narrowest one when none does)
            table = rich_table(results, layout)
            if console.measure(table, options=console.options.update_width(1 << 16)).minimum <= console.width:
                break
        console.print(table)
        for line in answer_lines(results):
            console.print(Text(line, style="bold" if line.startswith("Better") else None))
    if results.hardware_warning:
        console.print(Text(f"warning: {results.hardware_warning}", style="yellow"))
    for seed in results.upstream:
        console.print(Text(f"upstream {seed.row['arm']} ({seed.row['trainer']}): {seed.state}", style="dim"))
    for note in results.notes:
        console.print(Text(f"note: {note}", style="dim"))


def _write_text(path: Path, text: str) -> Path:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
    return path
