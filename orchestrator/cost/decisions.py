"""The decisions that changed what a study cost, read back from its ledger events for `armature cost --detail`:
an outbid waited out or moved away from (with the expected dollars of each), an instance resumed after an
outbid, an instance stopped for idle GPUs (with the dollars they wasted), an offer's machine excluded after a
failed launch, and an arm stopped early because its verdict was decided.

The event kinds are defined here, and the emitters (backends.vast.provider, .backend, .idle, .offers and
early_stop) write them under these names; a ledger written by an older version simply shows fewer decisions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from orchestrator.ledger import Ledger

OUTBID = "instance.outbid"                      # wait or move after an outbid (backends.vast.provider.record_outbid)
RESUMED = "instance.resumed_after_outbid"       # a wait that worked (backends.vast.backend)
IDLE_STOPPED = "instance.idle_stopped"          # backends.vast.idle.record_idle_waste
EXCLUDED = "offer.excluded"                     # backends.vast.offers.RankedOffers.failed
STOPPED_EARLY = "early_stop.stop"               # early_stop.EarlyStopper
KINDS = (OUTBID, RESUMED, IDLE_STOPPED, EXCLUDED, STOPPED_EARLY)
_DURING = {"boot": "while booting", "deploy": "while deploying", "run": "while the arm ran"}


@dataclass(frozen=True)
class Decision:
    at: float
    kind: str                       # the ledger event's kind
    instance_id: int | None         # the ledger's instance id, where the decision is about one
    text: str                       # one line, as the report shows it
    waste_dollars: float | None     # what it cost for nothing (idle GPUs), where known
    detail: dict                    # the event's own fields


def _dollars(value) -> str:
    return "?" if value is None else f"${float(value):.4f}"


def _instance(detail: dict) -> str:
    where = f"instance {detail.get('instance_id')}"
    return where + (f" (vast {detail['provider_instance_id']})" if detail.get("provider_instance_id") else "")


def describe(kind: str, detail: dict) -> str:
    """One line saying what was decided and on what numbers."""
    if kind == OUTBID:
        action = {"wait": "waited for it", "move": "moved on"}.get(detail.get("action"), str(detail.get("action")))
        during = _DURING.get(detail.get("during"), "")
        numbers = []
        if detail.get("wait_dollars") is not None or detail.get("move_dollars") is not None:
            numbers.append(f"expected {_dollars(detail.get('wait_dollars'))} waiting,"
                           f" {_dollars(detail.get('move_dollars'))} moving")
        if detail.get("own_rate") is not None:
            numbers.append(f"own ${float(detail['own_rate']):.3f}/h" + (
                "" if detail.get("best_rate") is None else f", best offer ${float(detail['best_rate']):.3f}/h"))
        return (f"{_instance(detail)} outbid{' ' + during if during else ''}: {action}"
                + (f" ({'; '.join(numbers)})" if numbers else ""))
    if kind == RESUMED:
        waited = detail.get("waited_seconds")
        return f"{_instance(detail)} resumed after its outbid" + (f", {float(waited):.0f} s later" if waited else "")
    if kind == IDLE_STOPPED:
        arm = f" under arm {detail['arm']}" if detail.get("arm") else " holding no arm"
        return (f"{_instance(detail)} stopped: GPUs idle {float(detail.get('idle_seconds') or 0):.0f} s{arm},"
                f" waste {_dollars(detail.get('waste_dollars'))}")
    if kind == EXCLUDED:
        return (f"offer {detail.get('offer_id')} failed; machine {detail.get('machine_id')} excluded for the rest of"
                f" the run: {detail.get('reason', 'no reason recorded')}")
    if kind == STOPPED_EARLY:
        why = f" ({detail['why']})" if detail.get("why") else ""
        return f"arm {detail.get('arm')} stopped early at step {detail.get('step')}: {detail.get('reason')}{why}"
    return f"{kind}: {json.dumps(detail, sort_keys=True)}"


def run_decisions(ledger: Ledger, run_id: str) -> list[Decision]:
    """The run's decisions in the order they were taken."""
    marks = ", ".join("?" for _ in KINDS)
    rows = ledger.query(f"SELECT kind, detail_json, at FROM events WHERE run_id = ? AND kind IN ({marks})"
                        " ORDER BY id", (run_id, *KINDS))
    found = []
    for row in rows:
        try:
            detail = json.loads(row["detail_json"] or "{}")
        except ValueError:
            detail = {}
        instance = detail.get("instance_id")
        waste = detail.get("waste_dollars") if row["kind"] == IDLE_STOPPED else None
        found.append(Decision(at=float(row["at"]), kind=row["kind"],
                              instance_id=int(instance) if isinstance(instance, (int, float)) else None,
                              text=describe(row["kind"], detail),
                              waste_dollars=None if waste is None else float(waste), detail=detail))
    return found
