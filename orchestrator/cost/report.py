"""Rendering a cost report: a terminal table (rich), CSV, JSON or Markdown.

Every format carries the same facts: per study (run) one row per arm and per kind of
instance overhead (boot, idle), with GPU-hours, $/h, cost, waste and share of the total;
a total; the recorded estimate beside the actual; the provider's bill beside the model's
estimate per instance; and notes on what is still running or of unknown cost.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import time

from rich import box
from rich.console import Console
from rich.table import Table

from orchestrator.cost.energy import machine_cpus
from orchestrator.cost.model import CostLine, Rates
from orchestrator.cost.summary import CostReport, Group, Study, Totals, money

FORMATS = ("table", "csv", "json", "markdown")
COLUMNS = ("Arm", "Attempts", "Hours", "GPU-h", "$/h", "Cost", "Waste", "Share")


def render(report: CostReport, fmt: str, *, detail: bool = False, console_width: int | None = None) -> str:
    if fmt == "table":
        return render_table(report, detail=detail, console_width=console_width)
    if fmt == "csv":
        return render_csv(report, detail=detail)
    if fmt == "json":
        return render_json(report)
    if fmt == "markdown":
        return render_markdown(report, detail=detail)
    raise ValueError(f"unknown format {fmt!r}")


# ---- cells shared by the table and Markdown ---------------------------------------------------

def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "-"


def _cost_cell(totals: Totals) -> str:
    return totals.cost_text


def _share_cell(report: CostReport, dollars: float) -> str:
    share = report.share(dollars)
    return "-" if share is None else f"{share:.0%}"


def _rate_cell(totals: Totals) -> str:
    rate = totals.dollars_per_hour
    return "-" if rate is None else money(rate)


def _group_label(group: Group) -> str:
    if group.kind == "upstream":
        return f"{group.label} (upstream)"
    if group.kind == "overhead":
        return f"{group.label} (overhead)"
    return group.label


def _line_label(line: CostLine) -> str:
    if line.attempt_id is None:
        where = f"instance {line.instance_id}"
        return where + (f" (vast {line.provider_instance_id})" if line.provider_instance_id else "")
    priced = f" ({line.priced_by})" if line.priced_by != "rent" else ""
    return f"seed {line.seed} #{line.attempt_n} {line.kind}{priced}"


def _line_order(line: CostLine) -> tuple:
    return (line.seed or 0, line.attempt_n or 0, line.instance_id or 0)


def _row_cells(report: CostReport, label: str, totals: Totals, attempts: str) -> list[str]:
    return [label, attempts, f"{totals.hours:.2f}", f"{totals.gpu_hours:.2f}", _rate_cell(totals), _cost_cell(totals),
            money(totals.waste_dollars), _share_cell(report, totals.dollars)]


def _study_rows(report: CostReport, study: Study, detail: bool) -> list[tuple[str, list[str]]]:
    """(style, cells) rows of a study: its groups, with their lines under them when `detail`."""
    rows = []
    for group in study.groups:
        totals = group.totals
        attempts = str(totals.attempts) if group.kind != "overhead" else "-"
        rows.append(("dim" if group.kind == "overhead" else "", _row_cells(report, _group_label(group), totals,
                                                                           attempts)))
        if detail:
            for line in sorted(group.lines, key=_line_order):
                rows.append(("dim", _row_cells(report, "  " + _line_label(line), Totals.of([line]), "")))
    return rows


def _study_caption(study: Study) -> list[str]:
    parts = []
    totals = study.totals
    if study.estimate is not None:
        text = f"estimate {money(study.estimate['dollars'])}"
        if study.estimate.get("hours") is not None:
            text += f" for {study.estimate['hours']:.1f} h"
        text += f", actual {money(totals.dollars)}"
        if study.estimate["dollars"] > 0:
            text += f" ({(totals.dollars - study.estimate['dollars']) / study.estimate['dollars']:+.0%})"
        parts.append(text)
    if totals.still_running:
        parts.append("still running: priced up to now")
    return parts


def _decision_lines(study: Study) -> list[str]:
    """The study's decisions (cost.decisions), one line each with its local time."""
    return [f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(d.at))}  {d.text}" for d in study.decisions]


def _study_heading(study: Study) -> str:
    if study.run is None:
        return "Instances that belong to no run"
    run = study.run
    return f"{study.title} · {run['backend']} · {run['state']} · started {_when(run['created_at'])}"


def _notes(report: CostReport) -> list[str]:
    notes = []
    lines = report.lines
    unknown = [line for line in lines if line.dollars is None]
    if unknown:
        rented = len({line.instance_id for line in unknown if line.instance_id is not None})
        if rented:
            notes.append(f"{rented} instance{'s have' if rented != 1 else ' has'} no contracted $/h: cost unknown.")
    notes += _local_pricing_notes(report.rates, [line for line in lines if line.instance_id is None])
    running = {}
    for line in lines:
        if line.instance_id is not None and line.still_running:
            running[line.instance_id] = line
    for instance_id, line in sorted(running.items()):
        where = f" (vast {line.provider_instance_id})" if line.provider_instance_id else ""
        notes.append(f"Instance {instance_id}{where} of run {line.run_id or '-'} is not confirmed destroyed:"
                     f" still running, priced up to now.")
    checks = report.reconciliation
    if checks and all(check.billed_dollars is None for check in checks):
        notes.append(f"No billed amounts recorded yet for {len(checks)} rented instance"
                     f"{'s' if len(checks) != 1 else ''}: nothing to reconcile.")
    flagged = [check for check in checks if check.flagged]
    if flagged:
        notes.append(f"{len(flagged)} instance{'s' if len(flagged) != 1 else ''} billed differently from the"
                     " estimate by more than the threshold (see Billed vs estimate).")
    return notes


def _local_pricing_notes(rates: Rates, lines: list[CostLine]) -> list[str]:
    """How the local attempts were priced: measured energy, or machine time where nothing was measured."""
    hardware = rates.hardware_dollars_per_gpu_hour
    gpus = f"; GPUs also at {money(hardware)}/GPU-hour" if hardware else ""
    notes = []
    measured = sum(line.priced_by == "energy" for line in lines)
    timed = sum(line.priced_by == "machine time" for line in lines)
    if measured:
        notes.append(f"{measured} local attempt{'s' if measured != 1 else ''} priced from measured energy (NVML for"
                     f" GPUs, RAPL for CPU packages) at {money(rates.dollars_per_kwh)}/kWh{gpus}.")
    if timed:
        cores = rates.machine_cpus or machine_cpus()
        notes.append(f"{timed} local attempt{'s' if timed != 1 else ''} without an energy reading priced by machine"
                     f" time: wall hours x its share of the machine (CPUs held / {cores} cores; a GPU attempt takes"
                     f" all of it) x {money(rates.machine_dollars_per_hour)}/h (ARMATURE_MACHINE_DOLLARS_PER_HOUR)"
                     f"{gpus}.")
    return notes


def _reconciliation_rows(report: CostReport) -> list[list[str]]:
    rows = []
    for check in report.reconciliation:
        rel = check.relative_difference
        difference = "-" if check.difference is None else money(check.difference) + (
            f" ({rel:+.0%})" if rel is not None else "")
        rows.append([str(check.instance_id), check.provider_instance_id or "-", check.run_id or "-",
                     money(check.estimated_dollars), "-" if check.billed_dollars is None else money(check.billed_dollars),
                     difference, check.status])
    return rows


RECONCILIATION_COLUMNS = ("Instance", "Vast id", "Run", "Estimate", "Billed", "Difference", "Status")


def _mismatch_reasons(report: CostReport) -> list[str]:
    """Why each flagged instance's bill differs from the estimate (cost.reconcile.mismatch_reason)."""
    return [f"Instance {check.instance_id}: {check.reason}" for check in report.reconciliation
            if check.flagged and check.reason]


def _has_bills(report: CostReport) -> bool:
    return any(check.billed_dollars is not None for check in report.reconciliation)


def _empty_message(report: CostReport) -> str:
    filters = ", ".join(f"{k} {v}" for k, v in report.filters.items() if v is not None)
    return f"No runs match ({filters})." if filters else "No runs to report."


# ---- terminal table -------------------------------------------------------------------------

def render_table(report: CostReport, *, detail: bool = False, console_width: int | None = None) -> str:
    width = console_width or shutil.get_terminal_size((100, 24)).columns
    console = Console(file=io.StringIO(), width=width, color_system=None, highlight=False, emoji=False,
                      markup=False)
    say = lambda text="": console.print(text, soft_wrap=True)   # free text: never wrapped mid-line
    if not report.studies:
        say(_empty_message(report))
        return _strip(console.file.getvalue())
    say(report.headline())
    for study in report.studies:
        say()
        say(_study_heading(study))
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        for i, name in enumerate(COLUMNS):
            table.add_column(name, justify="left" if i == 0 else "right", no_wrap=i != 0)
        for style, cells in _study_rows(report, study, detail):
            table.add_row(*cells, style=style or None)
        table.add_section()
        table.add_row(*_row_cells(report, "total", study.totals, str(study.totals.attempts)), style="bold")
        console.print(table)
        for caption in _study_caption(study):
            say(caption)
        if detail and study.decisions:
            say()
            say("Decisions")
            for line in _decision_lines(study):
                say(f"  {line}")
    totals = report.totals
    say()
    say(f"Total: {_cost_cell(totals)} over {len(report.studies)} stud{'ies' if len(report.studies) != 1 else 'y'},"
        f" {totals.gpu_hours:.2f} GPU-hours, waste {money(totals.waste_dollars)}")
    if _has_bills(report):
        say()
        say("Billed vs estimate")
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        for i, name in enumerate(RECONCILIATION_COLUMNS):
            table.add_column(name, justify="right" if i in (3, 4, 5) else "left", no_wrap=True)
        for cells in _reconciliation_rows(report):
            table.add_row(*cells)
        console.print(table)
        for reason in _mismatch_reasons(report) if detail else []:
            say(reason)
    notes = _notes(report)
    if notes:
        say()
    for note in notes:
        say(f"Note: {note}")
    return _strip(console.file.getvalue())


def _strip(text: str) -> str:
    """Without trailing spaces or repeated blank lines (rich pads and spaces its tables)."""
    lines: list[str] = []
    for line in (line.rstrip() for line in text.splitlines()):
        if line or (lines and lines[-1]):
            lines.append(line)
    return "\n".join(lines).rstrip("\n") + "\n"


# ---- CSV ------------------------------------------------------------------------------------

CSV_FIELDS = ("row", "run_id", "study", "backend", "group", "group_kind", "seed", "attempt", "attempt_state",
              "instance", "provider_instance", "kind", "waste", "attempts", "hours", "gpu_hours",
              "dollars_per_hour", "dollars", "waste_dollars", "share", "unknown", "still_running",
              "estimate_dollars", "priced_by", "at", "decision")


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def _totals_fields(report: CostReport, totals: Totals) -> dict:
    share = report.share(totals.dollars)
    return {"attempts": totals.attempts, "hours": _number(totals.hours), "gpu_hours": _number(totals.gpu_hours),
            "dollars_per_hour": _number(totals.dollars_per_hour),
            "dollars": "" if totals.unknown and totals.dollars == 0 else _number(totals.dollars),
            "waste_dollars": _number(totals.waste_dollars), "share": _number(share), "unknown": totals.unknown,
            "still_running": int(totals.still_running)}


def render_csv(report: CostReport, *, detail: bool = False) -> str:
    """Rows: 'study' (a run's total and estimate), then its groups ('arm', 'upstream', 'overhead'),
    each followed by its 'line' rows when `detail`, and then (when `detail`) its 'decision' rows; a last
    'total' row. Unknown dollars are empty."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for study in report.studies:
        base = {"run_id": study.run_id or "", "study": study.run["name"] if study.run else "",
                "backend": study.run["backend"] if study.run else "vast"}
        writer.writerow({**base, "row": "study", **_totals_fields(report, study.totals),
                         "estimate_dollars": _number(study.estimate["dollars"]) if study.estimate else ""})
        for group in study.groups:
            writer.writerow({**base, "row": group.kind, "group": group.label, "group_kind": group.kind,
                             **_totals_fields(report, group.totals)})
            if not detail:
                continue
            for line in group.lines:
                writer.writerow({**base, "row": "line", "group": group.label, "group_kind": group.kind,
                                 "seed": "" if line.seed is None else line.seed,
                                 "attempt": "" if line.attempt_id is None else line.attempt_id,
                                 "attempt_state": line.attempt_state or "",
                                 "instance": "" if line.instance_id is None else line.instance_id,
                                 "provider_instance": line.provider_instance_id or "",
                                 "kind": line.kind, "waste": int(line.waste), "priced_by": line.priced_by,
                                 **_totals_fields(report, Totals.of([line]))})
        for decision in study.decisions if detail else []:
            writer.writerow({**base, "row": "decision", "kind": decision.kind,
                             "instance": "" if decision.instance_id is None else decision.instance_id,
                             "waste_dollars": _number(decision.waste_dollars), "at": f"{decision.at:.3f}",
                             "decision": decision.text})
    writer.writerow({"row": "total", **_totals_fields(report, report.totals),
                     "estimate_dollars": _number(sum(s.estimate["dollars"] for s in report.studies if s.estimate))
                     if any(s.estimate for s in report.studies) else ""})
    return out.getvalue()


# ---- JSON -----------------------------------------------------------------------------------

def _totals_json(report: CostReport, totals: Totals) -> dict:
    return {"dollars": round(totals.dollars, 6), "waste_dollars": round(totals.waste_dollars, 6),
            "waste_ratio": totals.waste_ratio, "hours": round(totals.hours, 6),
            "gpu_hours": round(totals.gpu_hours, 6), "dollars_per_hour": totals.dollars_per_hour,
            "share": report.share(totals.dollars), "attempts": totals.attempts, "unknown_lines": totals.unknown,
            "still_running": totals.still_running}


def _line_json(line: CostLine) -> dict:
    return {"kind": line.kind, "waste": line.waste, "backend": line.backend, "arm": line.arm, "seed": line.seed,
            "arm_run_id": line.arm_run_id, "attempt_id": line.attempt_id, "attempt_n": line.attempt_n,
            "attempt_state": line.attempt_state, "instance_id": line.instance_id,
            "provider_instance_id": line.provider_instance_id, "hours": round(line.hours, 6),
            "gpu_hours": round(line.gpu_hours, 6),
            "dollars": None if line.dollars is None else round(line.dollars, 6),
            "dollars_per_hour": line.dollars_per_hour, "energy_joules": line.energy_joules,
            "priced_by": line.priced_by,
            "still_running": line.still_running}


def render_json(report: CostReport) -> str:
    """Everything, per-attempt lines included; unknown dollars are null."""
    studies = []
    for study in report.studies:
        run = study.run or {}
        studies.append({
            "run_id": study.run_id, "name": run.get("name"), "backend": run.get("backend", "vast"),
            "state": run.get("state"), "created_at": run.get("created_at"), "experiments": study.experiments,
            "estimate": study.estimate, **_totals_json(report, study.totals),
            "groups": [{"label": group.label, "kind": group.kind, **_totals_json(report, group.totals),
                        "lines": [_line_json(line) for line in group.lines]} for group in study.groups],
            "decisions": [{"at": d.at, "kind": d.kind, "instance_id": d.instance_id, "text": d.text,
                           "waste_dollars": d.waste_dollars, "detail": d.detail} for d in study.decisions],
        })
    document = {
        "headline": report.headline() if report.studies else _empty_message(report),
        "generated_at": report.now, "filters": report.filters,
        "rates": {"dollars_per_kwh": report.rates.dollars_per_kwh,
                  "hardware_dollars_per_gpu_hour": report.rates.hardware_dollars_per_gpu_hour,
                  "machine_dollars_per_hour": report.rates.machine_dollars_per_hour},
        "experiments": report.experiments, "total": _totals_json(report, report.totals), "studies": studies,
        "reconciliation": [{"instance_id": c.instance_id, "provider_instance_id": c.provider_instance_id,
                            "run_id": c.run_id, "estimated_dollars": c.estimated_dollars,
                            "billed_dollars": c.billed_dollars, "difference": c.difference,
                            "relative_difference": c.relative_difference, "still_running": c.still_running,
                            "flagged": c.flagged, "status": c.status} for c in report.reconciliation],
        "notes": _notes(report),
    }
    return json.dumps(document) + "\n"   # compact: the C encoder; pipe through `jq` to read


# ---- Markdown -------------------------------------------------------------------------------

def _md_row(cells) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _md_table(columns, rows, right_from: int = 1) -> list[str]:
    align = ["---" if i < right_from else "---:" for i in range(len(columns))]
    return [_md_row(columns), "| " + " | ".join(align) + " |", *(_md_row(r) for r in rows)]


def render_markdown(report: CostReport, *, detail: bool = False) -> str:
    if not report.studies:
        return _empty_message(report) + "\n"
    out = [f"**{report.headline()}**", ""]
    for study in report.studies:
        out += [f"### {_study_heading(study)}", ""]
        rows = [cells for _, cells in _study_rows(report, study, detail)]
        rows.append(["**total**", *(f"**{c}**" for c in _row_cells(report, "", study.totals,
                                                                     str(study.totals.attempts))[1:])])
        out += _md_table(COLUMNS, rows)
        caption = _study_caption(study)
        out += ["", *(f"_{c}_" for c in caption), ""] if caption else [""]
        if detail and study.decisions:
            out += ["Decisions:", "", *(f"- {line}" for line in _decision_lines(study)), ""]
    totals = report.totals
    out += [f"**Total: {_cost_cell(totals)}**, {totals.gpu_hours:.2f} GPU-hours, waste {money(totals.waste_dollars)}",
            ""]
    if _has_bills(report):
        out += ["### Billed vs estimate", "", *_md_table(RECONCILIATION_COLUMNS, _reconciliation_rows(report), 3), ""]
        reasons = _mismatch_reasons(report) if detail else []
        out += [f"- {reason}" for reason in reasons] + ([""] if reasons else [])
    notes = _notes(report)
    if notes:
        out += [f"- {note}" for note in notes] + [""]
    return "\n".join(out)
