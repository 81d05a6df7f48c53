"""Estimate vs billed: the provider's charges per instance beside what the cost model says.

`fetch_provider_charges` reads the account's charges (`VastAI.show_invoices_v1(charges=True)`,
GET /api/v0/charges/) and records, per ledger instance, what the provider billed as
`charges` rows with source='provider'. The ledger stays append-only: a later fetch that
finds a bigger bill (an instance still running) adds the difference as an adjustment
row, and one that finds the same bill adds nothing, so the rows of an instance always
sum to its latest bill.

`reconcile` puts each instance's billed sum beside the model's estimate and flags
differences above both a relative and an absolute threshold.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from orchestrator.cost.model import instance_cost, instance_end, instance_is_billed
from orchestrator.ledger import Ledger

PROVIDER = "provider"
DEFAULT_THRESHOLD_RATIO = 0.05
DEFAULT_THRESHOLD_DOLLARS = 0.01
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


def is_mismatch(estimated: float, billed: float, threshold_ratio: float = DEFAULT_THRESHOLD_RATIO,
                threshold_dollars: float = DEFAULT_THRESHOLD_DOLLARS) -> bool:
    """A difference counts when it is above both the relative and the absolute threshold."""
    difference = abs(billed - estimated)
    return difference > threshold_dollars and difference > threshold_ratio * abs(estimated)


def reconcile(ledger: Ledger, run_id: str | None = None, *, now: float | None = None,
              threshold_ratio: float = DEFAULT_THRESHOLD_RATIO, threshold_dollars: float = DEFAULT_THRESHOLD_DOLLARS,
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
        estimate = instance_cost(instance, now)
        bill = billed.get(instance["id"])
        still_running = instance_end(instance, now)[1]
        flagged = (estimate is not None and bill is not None and not still_running
                   and is_mismatch(estimate, bill, threshold_ratio, threshold_dollars))
        results.append(InstanceReconciliation(
            instance_id=instance["id"], provider_instance_id=instance["provider_instance_id"],
            run_id=instance["run_id"], estimated_dollars=estimate, billed_dollars=bill,
            still_running=still_running, flagged=flagged))
    return results


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
        starts = [float(line["start"]) for line in lines if line.get("start") is not None]
        ends = [float(line["end"]) for line in lines if line.get("end") is not None]
        added.append(ledger.add_charge(
            instance_id=instance["id"], run_id=instance["run_id"], source=PROVIDER, amount_dollars=delta,
            period_start=min(starts) if starts else None, period_end=max(ends) if ends else None,
            provider_instance_id=instance["provider_instance_id"], billed_total=bill,
            adjustment=instance["fetched_at"] is not None,
            lines=[line.get("description") for line in lines]))
    return added


def _settled(instance: dict) -> bool:
    return (instance["destroyed_at"] is not None and instance["fetched_at"] is not None
            and instance["fetched_at"] > instance["destroyed_at"] + SETTLED_AFTER_S)
