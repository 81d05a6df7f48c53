"""`armature cost`: check the arguments, pick the runs, build the report, render it."""

from __future__ import annotations

import os
import re
import sqlite3
import time
from datetime import date, datetime, timedelta
from pathlib import Path

from orchestrator.backends.provision import BACKEND_NAMES, capabilities
from orchestrator.cost.model import Rates
from orchestrator.cost.report import FORMATS, render
from orchestrator.cost.summary import build_report
from orchestrator.errors import UserError
from orchestrator.ledger import Ledger

BACKENDS = BACKEND_NAMES
_SPAN = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_SPAN_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DATE_HELP = "use YYYY-MM-DD, 'YYYY-MM-DD HH:MM', an ISO 8601 time, 'today', or a span back from now like 7d or 12h"


def parse_date(value, name: str, *, end_of_day: bool = False, now: float | None = None) -> float | None:
    """Epoch seconds from a user's date. A bare day given as the end of a range means the end
    of that day (`--until 2026-01-05` includes the 5th). Naive times are local time."""
    if value is None or value == "":
        return None
    now = time.time() if now is None else now
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, date):
        return _day_start(value + timedelta(days=1) if end_of_day else value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip().lower()
    today = datetime.fromtimestamp(now).date()
    if text in ("today", "yesterday"):
        day = today if text == "today" else today - timedelta(days=1)
        return _day_start(day + timedelta(days=1) if end_of_day else day)
    if text == "now":
        return now
    span = _SPAN.match(text)
    if span:
        return now - float(span.group(1)) * _SPAN_SECONDS[span.group(2)]
    if re.fullmatch(r"\d{9,}(\.\d+)?", text):
        return float(text)
    try:
        day = date.fromisoformat(text)
    except ValueError:
        pass
    else:
        return _day_start(day + timedelta(days=1) if end_of_day else day)
    try:
        return datetime.fromisoformat(str(value).strip().replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise UserError(f"--{name} {value!r}: not a date; {_DATE_HELP}") from None


def _day_start(day: date) -> float:
    return datetime(day.year, day.month, day.day).timestamp()


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts).isoformat(timespec="seconds")


def _open(ledger: Ledger | str | os.PathLike) -> Ledger:
    if isinstance(ledger, Ledger):
        return ledger
    return Ledger(Path(ledger), create=False)


def cost_command(ledger: Ledger | str | os.PathLike, run: str | None = None, since=None, until=None,
                 backend: str | None = None, fmt: str = "table", console_width: int | None = None, *,
                 detail: bool = False, now: float | None = None, rates: Rates | None = None) -> str:
    """The text `armature cost` prints. `ledger` is an open Ledger or the path of one.
    Raises UserError for what the user can fix: a bad format, backend or date, an unknown
    run id, an empty, unreadable or foreign-version ledger."""
    fmt = "markdown" if fmt == "md" else (fmt or "table").lower()
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    now = time.time() if now is None else now
    since_ts = parse_date(since, "since", now=now)
    until_ts = parse_date(until, "until", end_of_day=True, now=now)
    if since_ts is not None and until_ts is not None and since_ts >= until_ts:
        raise UserError(f"--since {since} is not before --until {until}: the range is empty")
    rates = rates or Rates.from_env()
    path = getattr(ledger, "path", ledger)
    try:
        opened = _open(ledger)
        try:
            return _cost(opened, run, since_ts, until_ts, backend, fmt, console_width, detail, now, rates)
        finally:
            if opened is not ledger:
                opened.close()
    except sqlite3.DatabaseError as exc:
        raise UserError(f"{path}: cannot read this ledger ({exc}); is it an armature ledger?") from None


def _cost(ledger: Ledger, run: str | None, since: float | None, until: float | None, backend: str | None,
          fmt: str, console_width: int | None, detail: bool, now: float, rates: Rates) -> str:
    counts = ledger.query_one("SELECT (SELECT COUNT(*) FROM runs) AS runs, (SELECT COUNT(*) FROM instances)"
                              " AS instances, (SELECT MIN(created_at) FROM runs) AS first,"
                              " (SELECT MAX(created_at) FROM runs) AS last")
    if not counts["runs"] and not counts["instances"]:
        raise UserError(f"{ledger.path}: the ledger has no runs yet, so nothing has cost anything;"
                        " start one with `armature ablation ARMS.yaml`")
    if backend is not None:
        known = set(BACKENDS) | {r["backend"] for r in ledger.query("SELECT DISTINCT backend FROM runs")}
        if backend not in known:
            raise UserError(f"--backend {backend!r}: choose one of {', '.join(sorted(known))}")
    if run is not None:
        ledger.get_run(run)   # an unknown id raises a UserError naming it and the recent runs

    where, params = ["1"], []
    for clause, value in (("run_id = ?", run), ("created_at >= ?", since), ("created_at < ?", until),
                          ("backend = ?", backend)):
        if value is not None:
            where.append(clause)
            params.append(value)
    runs = ledger.query(f"SELECT * FROM runs WHERE {' AND '.join(where)} ORDER BY created_at", params)

    unowned: set[int] = set()
    if run is None and (backend is None or capabilities(backend).rents_instances):   # unowned instances
        sql, params = "SELECT id FROM instances WHERE run_id IS NULL", []
        if since is not None:
            sql, params = sql + " AND created_at >= ?", params + [since]
        if until is not None:
            sql, params = sql + " AND created_at < ?", params + [until]
        unowned = {row["id"] for row in ledger.query(sql, params)}

    filters = {"run": run, "since": _iso(since), "until": _iso(until), "backend": backend}
    if not runs and not unowned and fmt in ("table", "markdown"):
        described = ", ".join(f"{k} {v}" for k, v in filters.items() if v is not None)
        held = (f"the ledger has {counts['runs']} run{'s' if counts['runs'] != 1 else ''}, created"
                f" {_iso(counts['first'])} to {_iso(counts['last'])}") if counts["runs"] else "the ledger has no runs"
        return f"No runs match ({described}); {held}.\n"
    report = build_report(ledger, runs, now=now, rates=rates, filters=filters, unowned_instances=unowned)
    return render(report, fmt, detail=detail, console_width=console_width)
