"""Estimate vs billed: the provider's charges per instance beside what the cost model says.

`fetch_provider_charges` reads the account's charges (`VastAI.show_invoices_v1(charges=True)`,
GET /api/v0/charges/) and records, per ledger instance, what the provider billed as
`charges` rows with source='provider'. The ledger stays append-only: a later fetch that
finds a bigger bill (an instance still running) adds the difference as an adjustment
row, and one that finds the same bill adds nothing, so the rows of an instance always
sum to its latest bill.

`reconcile` puts each instance's billed sum beside what the ledger says Vast should bill
(`expected_bill`, Vast's rules as vast-api.md states them) and flags every difference above 1% of
the estimate, however few dollars it is, each with its reason (a cent's threshold once hid
differences of several percent on small bills, the ones a short study is made of):

  GPU        dph_total $/h (the bid of an interruptible rental) for every second the instance
             was `running`: the periods `instance.status` events record (`observe_instance`),
             else ready_at until the first stop / exit / destroy the ledger has
  storage    disk_gb x storage_cost $/GB/month for every second from the provider's start of the
             rental (its `start_date`, else the create request) to the destroy request it accepted
             (stopped, exited and loading included; else to the confirmed destroy)
  bandwidth  not metered by armature: a billed amount shows up as a flagged difference

Contracted rates the ledger lacks (disk_gb, storage_cost of instances recorded before those
columns) are taken from the charge line's own breakdown; the times never are.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from orchestrator.cost.model import instance_end, instance_is_billed
from orchestrator.ledger import Ledger

PROVIDER = "provider"
DEFAULT_THRESHOLD_RATIO = 0.01
MONTH_S = 30 * 24 * 3600.0          # Vast's storage month
STATUS_EVENT = "instance.status"
# Statuses that end a running (GPU-billed) period.
_GPU_STOPS = ("stopped", "exited", "offline", "destroyed")
_DAY_S = 86400
# A bill fetched this long after the destroy was confirmed is final: later fetches skip the instance.
SETTLED_AFTER_S = _DAY_S
_MAX_PAGES = 1000


@dataclass
class InstanceReconciliation:
    instance_id: int
    provider_instance_id: str | None
    run_id: str | None
    estimated_dollars: float | None     # None when the instance has no contracted $/h
    billed_dollars: float | None        # None when no provider charge is recorded yet
    still_running: bool
    flagged: bool
    reason: str | None = None           # why a flagged bill differs, part by part

    @property
    def difference(self) -> float | None:
        """Billed minus estimated dollars."""
        if self.estimated_dollars is None or self.billed_dollars is None:
            return None
        return self.billed_dollars - self.estimated_dollars

    @property
    def relative_difference(self) -> float | None:
        if self.difference is None or not self.estimated_dollars:
            return None
        return self.difference / self.estimated_dollars

    @property
    def status(self) -> str:
        if self.billed_dollars is None:
            return "not billed yet"
        if self.estimated_dollars is None:
            return "no estimate"
        if self.flagged:
            return "MISMATCH"
        if self.still_running:
            return "still running"
        return "ok"


def is_mismatch(estimated: float, billed: float, threshold_ratio: float = DEFAULT_THRESHOLD_RATIO) -> bool:
    """A difference counts when it is above `threshold_ratio` of the estimate and above a millionth of a dollar
    (below any bill's precision: a rejected create's fraction of a second of storage)."""
    difference = abs(billed - estimated) - 1e-9      # a difference of exactly the threshold passes
    return difference > 1e-6 and difference > threshold_ratio * abs(estimated)


def reconcile(ledger: Ledger, run_id: str | None = None, *, now: float | None = None,
              threshold_ratio: float = DEFAULT_THRESHOLD_RATIO,
              instance_ids: list[int] | None = None) -> list[InstanceReconciliation]:
    """Every rented instance of a run (all instances, unowned included, when None; or just
    `instance_ids`) with its estimated and billed dollars. The estimate is the instance's whole
    cost in the model (its lines add up to $/h x billed lifetime). A still-running instance is
    never flagged: its bill lags."""
    now = time.time() if now is None else now
    sql, params = "SELECT * FROM instances WHERE 1", []
    if run_id is not None:
        ledger.get_run(run_id)   # an unknown id raises a UserError that lists recent runs
        sql, params = sql + " AND run_id = ?", [run_id]
    if instance_ids is not None:
        if not instance_ids:
            return []
        sql += f" AND id IN ({', '.join('?' for _ in instance_ids)})"
        params += list(instance_ids)
    instances = ledger.query(sql + " ORDER BY id", params)
    billed = {row["instance_id"]: row["dollars"] for row in ledger.query(
        "SELECT instance_id, SUM(amount_dollars) AS dollars FROM charges"
        " WHERE source = ? AND instance_id IS NOT NULL GROUP BY instance_id", (PROVIDER,))}

    results = []
    for instance in instances:
        if not instance_is_billed(instance) and instance["id"] not in billed:
            continue
        breakdown = bill_breakdown(ledger, instance["id"])
        expected = expected_bill(instance, status_changes(ledger, instance["id"]), now, breakdown)
        estimate = None if expected is None else expected.dollars
        bill = billed.get(instance["id"])
        still_running = instance_end(instance, now)[1]
        flagged = (estimate is not None and bill is not None and not still_running
                   and is_mismatch(estimate, bill, threshold_ratio))
        results.append(InstanceReconciliation(
            instance_id=instance["id"], provider_instance_id=instance["provider_instance_id"],
            run_id=instance["run_id"], estimated_dollars=estimate, billed_dollars=bill,
            still_running=still_running, flagged=flagged,
            reason=mismatch_reason(expected, bill, breakdown, threshold_ratio) if flagged else None))
    return results


# ---- what Vast should bill, from the ledger ----------------------------------------------

@dataclass
class ExpectedBill:
    gpu_seconds: float
    gpu_dollars: float
    storage_seconds: float
    storage_dollars: float

    @property
    def dollars(self) -> float:
        return self.gpu_dollars + self.storage_dollars


def observe_instance(ledger: Ledger, instance_id: int, info: dict | None, now: float | None = None) -> str | None:
    """Record what a show-instance row says about billing, when it changed: the instance started running
    (dated by its `uptime_mins`), was stopped (by us, or outbid while `intended_status` stays running),
    exited or went offline, or is gone (None). Backends call this with every row they poll. Returns the
    status recorded, or None when nothing changed."""
    now = time.time() if now is None else now
    status = "destroyed" if info is None else info.get("actual_status")
    changes = status_changes(ledger, instance_id)
    if info is not None and not changes:    # until its first status move (booting): the start does not change
        _record_provider_start(ledger, instance_id, info.get("start_date"))
    last = changes[-1][1] if changes else None
    if status not in ("running", *_GPU_STOPS) or status == last:
        return None
    at = now
    if status == "running" and info.get("uptime_mins") is not None:
        at = now - 60.0 * float(info["uptime_mins"])
    if status == "stopped" and info.get("intended_status") == "running":
        status = "outbid"       # billed like a stop; the backend treats it as a preemption
        if last == "outbid":
            return None
    record_instance_status(ledger, instance_id, status, at)
    return status


def _record_provider_start(ledger: Ledger, instance_id: int, start_date) -> None:
    """The provider's start of the rental, once: a number of epoch seconds within an hour of our create request
    (anything else, e.g. a clock far off, is ignored and storage is dated from the request)."""
    if isinstance(start_date, bool) or not isinstance(start_date, (int, float)):
        return
    row = ledger.instance(instance_id)
    if row is None or row["provider_started_at"] is not None or abs(start_date - row["created_at"]) > 3600:
        return
    ledger.update_instance(instance_id, provider_started_at=float(start_date))


def record_instance_status(ledger: Ledger, instance_id: int, status: str, at: float) -> None:
    """An `instance.status` event, and the instance's stopped_at / exited_at column for a stop or exit."""
    row = ledger.instance(instance_id)
    column = {"stopped": "stopped_at", "outbid": "stopped_at", "exited": "exited_at"}.get(status)
    if column:
        ledger.update_instance(instance_id, **{column: at})
    ledger.event(row["run_id"] if row else None, STATUS_EVENT, instance_id=instance_id, status=status, at=at)


def status_changes(ledger: Ledger, instance_id: int) -> list[tuple[float, str]]:
    """(at, status) of an instance's recorded status moves, oldest first."""
    rows = ledger.query("SELECT detail_json FROM events"
                        " WHERE kind = ? AND json_extract(detail_json, '$.instance_id') = ?",
                        (STATUS_EVENT, instance_id))
    changes = [(float(d["at"]), d["status"]) for d in (json.loads(r["detail_json"]) for r in rows)]
    return sorted(changes)


def running_periods(instance: dict, changes: list[tuple[float, str]], end: float) -> list[tuple[float, float]]:
    """When the GPU was billed: from recorded status moves, else from ready_at to the first stop, exit or end."""
    if not changes:
        if instance["ready_at"] is None:
            return []
        stops = [t for t in (instance["stopped_at"], instance["exited_at"])
                 if t is not None and t >= instance["ready_at"]]
        return [(instance["ready_at"], min([end, *stops]))]
    periods, opened = [], None
    for at, status in changes:
        if status == "running" and opened is None:
            opened = at
        elif status != "running" and opened is not None:
            periods.append((opened, min(at, end)))
            opened = None
    if opened is not None:
        periods.append((opened, end))
    return [(start, stop) for start, stop in periods if stop > start]


def expected_bill(instance: dict, changes: list[tuple[float, str]], now: float,
                  breakdown: dict | None = None) -> ExpectedBill | None:
    """What Vast should bill an instance by the ledger's times; None without a contracted $/h."""
    if not instance_is_billed(instance):
        return ExpectedBill(0.0, 0.0, 0.0, 0.0)
    if instance["dph_total"] is None:
        return None
    end, still_running = instance_end(instance, now)
    gpu_seconds = sum(stop - start for start, stop in running_periods(instance, changes, end))
    # storage ends with the accepted destroy request (the last status move, `destroyed`), not our later confirmation
    accepted = not still_running and changes and changes[-1][1] == "destroyed"
    storage_end = min(end, changes[-1][0]) if accepted else end
    storage_seconds = max(0.0, storage_end - storage_start(instance))
    disk_gb = instance["disk_gb"] if instance["disk_gb"] is not None else (breakdown or {}).get("disk_gb")
    storage_cost = (instance["storage_cost"] if instance["storage_cost"] is not None
                    else (breakdown or {}).get("storage_cost"))
    storage_dollars = (disk_gb or 0.0) * (storage_cost or 0.0) * storage_seconds / MONTH_S
    return ExpectedBill(gpu_seconds=gpu_seconds, gpu_dollars=instance["dph_total"] * gpu_seconds / 3600,
                        storage_seconds=storage_seconds, storage_dollars=storage_dollars)


def storage_start(instance: dict) -> float:
    """When storage starts billing: the provider's start of the rental where it told us, else our create request."""
    started = instance.get("provider_started_at")
    return instance["created_at"] if started is None else started


def bill_breakdown(ledger: Ledger, instance_id: int) -> dict | None:
    """The parts of an instance's latest fetched bill (GPU, storage, bandwidth), when the provider gave them."""
    row = ledger.query_one("SELECT detail_json FROM charges WHERE source = ? AND instance_id = ?"
                           " ORDER BY recorded_at DESC, id DESC LIMIT 1", (PROVIDER, instance_id))
    return None if row is None else json.loads(row["detail_json"]).get("breakdown")


def mismatch_reason(expected: ExpectedBill | None, bill: float | None, breakdown: dict | None,
                    threshold_ratio: float = DEFAULT_THRESHOLD_RATIO) -> str:
    """Which part of a bill differs from the ledger's account, and what probably caused it."""
    if expected is None or bill is None:
        return "nothing to compare"
    total = f"billed {_dollars(bill)} against {_dollars(expected.dollars)} expected"
    if not breakdown:
        return f"{total}; the charge gives no breakdown"

    def differs(billed: float, wanted: float) -> bool:
        return abs(billed - wanted) > max(threshold_ratio * abs(wanted), 1e-3)

    reasons = []
    gpu_s = breakdown.get("gpu_seconds")
    if gpu_s is not None and differs(gpu_s, expected.gpu_seconds):
        # A stop, exit or outbid the ledger sees is dated halfway between the last contact and the poll that saw it.
        hint = ("a stop, exit or outbid the ledger did not record, or dated late by the poll that saw it"
                if gpu_s < expected.gpu_seconds else
                "running before the ledger saw it ready, or a stop dated early by the poll that saw it")
        reasons.append(f"GPU billed for {_seconds(gpu_s)}, the ledger has it running {_seconds(expected.gpu_seconds)} "
                       f"({hint})")
    storage_s = breakdown.get("storage_seconds")
    if storage_s is not None and differs(storage_s, expected.storage_seconds):
        hint = ("destroyed later than the ledger confirmed it" if storage_s > expected.storage_seconds
                else "the ledger confirmed the destroy late")
        reasons.append(f"storage billed for {_seconds(storage_s)}, the ledger has the instance alive "
                       f"{_seconds(expected.storage_seconds)} ({hint})")
    bandwidth = breakdown.get("bandwidth_amount") or 0.0
    if bandwidth > threshold_ratio * max(expected.dollars, 1e-9):
        reasons.append(f"bandwidth {_dollars(bandwidth)} billed, which armature does not meter")
    rate = breakdown.get("dph_total")
    contracted = expected.gpu_dollars * 3600 / expected.gpu_seconds if expected.gpu_seconds else None
    if rate is not None and contracted is not None and abs(rate - contracted) > 1e-6:
        reasons.append(f"GPU billed at ${rate:g}/h, the ledger has ${contracted:g}/h")
    return "; ".join([total, *reasons]) if reasons else f"{total}; no single part explains it"


def _dollars(dollars: float) -> str:
    """Four decimals, or three significant digits for sums under a cent (a short instance's bill)."""
    return f"${dollars:.4f}" if abs(dollars) >= 0.01 else f"${dollars:.3g}"


def _seconds(seconds: float) -> str:
    """Whole seconds, or three significant digits below a minute (where a second is several percent of a short
    instance's bill)."""
    return f"{seconds:.0f} s" if seconds >= 60 else f"{seconds:.3g} s"


# ---- fetching the provider's charges ------------------------------------------------------

def provider_instance_id(line: dict) -> str | None:
    """The instance a charge line bills: its `source` is 'instance-<id>' (or a bare id)."""
    source = line.get("source")
    if source is None or source == "":
        return None
    source = str(source)
    return source.rsplit("-", 1)[-1] if "-" in source else source


def _charge_lines(client, start: int, end: int) -> list[dict]:
    """All instance charge lines between two epoch seconds, following the pagination."""
    lines, token, seen = [], None, set()
    for _ in range(_MAX_PAGES):
        page = client.show_invoices_v1(charges=True, start_date=start, end_date=end, limit=100,
                                       charge_type=["instance"], next_token=token)
        lines.extend(page.get("results") or [])
        token = page.get("next_token")
        if not token or token in seen:
            break
        seen.add(token)
    return lines


def fetch_provider_charges(client, ledger: Ledger, run_id: str | None = None, *,
                           now: float | None = None) -> list[int]:
    """Record what the provider billed for a run's Vast instances (all runs' when None).

    `client` is a `vastai.VastAI`; its HTTP errors (`requests.HTTPError`) propagate.
    Returns the ids of the charge rows added (none when the bills did not change)."""
    now = time.time() if now is None else now
    sql = ("SELECT i.*, (SELECT MAX(c.recorded_at) FROM charges c WHERE c.instance_id = i.id AND c.source = ?)"
           " AS fetched_at, (SELECT COALESCE(SUM(c.amount_dollars), 0) FROM charges c"
           " WHERE c.instance_id = i.id AND c.source = ?) AS recorded"
           " FROM instances i WHERE i.provider = 'vast' AND i.provider_instance_id IS NOT NULL")
    params: list = [PROVIDER, PROVIDER]
    if run_id is not None:
        sql += " AND i.run_id = ?"
        params.append(run_id)
    instances = [i for i in ledger.query(sql + " ORDER BY i.id", params) if not _settled(i)]
    if not instances:
        return []
    start = int(min(i["created_at"] for i in instances)) - _DAY_S
    end = int(max(instance_end(i, now)[0] for i in instances)) + _DAY_S
    by_provider_id: dict[str, list[dict]] = {}
    for line in _charge_lines(client, start, end):
        key = provider_instance_id(line)
        if key is not None and line.get("type", "instance") == "instance":
            by_provider_id.setdefault(key, []).append(line)

    added = []
    for instance in instances:
        lines = by_provider_id.get(str(instance["provider_instance_id"]))
        if not lines:
            continue
        bill = sum(float(line.get("amount") or 0) for line in lines)
        delta = bill - instance["recorded"]
        if abs(delta) < 1e-9:
            continue
        breakdown = charge_breakdown(lines)
        starts = [float(line["start"]) for line in lines if line.get("start") is not None]
        ends = [float(line["end"]) for line in lines if line.get("end") is not None]
        added.append(ledger.add_charge(
            instance_id=instance["id"], run_id=instance["run_id"], source=PROVIDER, amount_dollars=delta,
            period_start=min(starts) if starts else None, period_end=max(ends) if ends else None,
            provider_instance_id=instance["provider_instance_id"], billed_total=bill,
            adjustment=instance["fetched_at"] is not None,
            lines=[line.get("description") for line in lines], breakdown=breakdown))
    return added


def charge_breakdown(lines: list[dict]) -> dict | None:
    """GPU, storage and bandwidth of an instance's charge lines, from their items and metadata (None when the
    lines carry neither)."""
    items: dict[str, float] = {}
    for line in lines:
        for item in line.get("items") or []:
            items[item.get("type")] = items.get(item.get("type"), 0.0) + float(item.get("amount") or 0)
    meta = [line.get("metadata") or {} for line in lines]
    if not items and not any("gpu_seconds" in m for m in meta):
        return None

    def total(key: str) -> float | None:
        values = [float(m[key]) for m in meta if m.get(key) is not None]
        return sum(values) if values else None

    def first(key: str):
        return next((m[key] for m in meta if m.get(key) is not None), None)

    return {"gpu_amount": items.get("gpu", total("gpu_amount")),
            "storage_amount": items.get("storage", total("storage_amount")),
            "bandwidth_amount": items.get("bandwidth", total("bandwidth_amount")),
            "gpu_seconds": total("gpu_seconds"), "storage_seconds": total("storage_seconds"),
            "dph_total": first("dph_total"), "disk_gb": first("disk_gb"), "storage_cost": first("storage_cost")}


def _settled(instance: dict) -> bool:
    return (instance["destroyed_at"] is not None and instance["fetched_at"] is not None
            and instance["fetched_at"] > instance["destroyed_at"] + SETTLED_AFTER_S)
