"""Find and destroy rented instances that no live run owns (`armature reap [--dry-run]`).

An instance is an orphan when its label says it is armature's (`armature:<run_id>:...`)
and either the ledger does not know its run, or the run is not live: its state is not
`running`, or its orchestrator's pid is dead on this host. (A run driven from another
host counts as live: its pid cannot be checked from here.) Destruction is confirmed
(provider.terminate) and recorded in the ledger when the ledger knows the instance.
"""

from __future__ import annotations

import os

from orchestrator.backends.vast import provider
from orchestrator.backends.vast.config import VastConfig
from orchestrator.ledger import Ledger
from orchestrator.runs import orchestrator_alive


def orphan_reason(ledger: Ledger, run_id: str | None) -> str | None:
    """Why an instance of `run_id` is an orphan, or None when its run is live."""
    if run_id is None:
        return "label names no run"
    run = ledger.query_one("SELECT * FROM runs WHERE run_id=?", (run_id,))
    if run is None:
        return f"run {run_id} is not in the ledger"
    if run["state"] != "running":
        return f"run {run_id} is {run['state']}"
    if run["orchestrator_host"] == os.uname().nodename and not orchestrator_alive(run):
        return f"run {run_id}'s orchestrator (pid {run['orchestrator_pid']}) is dead"
    return None


def reap(client, ledger: Ledger, dry_run: bool = False, cfg: VastConfig | None = None,
         only_run: str | None = None) -> list[dict]:
    """Orphaned armature instances (of `only_run`, when given), destroyed (confirmed) unless dry_run; one dict
    per instance: provider_instance_id, label, run_id, status, dph_total, reason, destroyed (None on a dry run)."""
    cfg = cfg or VastConfig()
    found = []
    for info in provider.list_ours(client, cfg, provider.LABEL_PREFIX):
        if info.get("actual_status") == "destroyed":
            continue
        run_id = provider.run_id_of_label(info.get("label"))
        if only_run is not None and run_id != only_run:
            continue
        reason = orphan_reason(ledger, run_id)
        if reason is None:
            continue
        provider_id = str(info["id"])
        entry = {"provider_instance_id": provider_id, "label": info.get("label"), "run_id": run_id,
                 "status": info.get("actual_status"), "dph_total": info.get("dph_total"), "reason": reason,
                 "destroyed": None}
        if not dry_run:
            entry["destroyed"] = _destroy(client, ledger, cfg, info, run_id, reason)
        found.append(entry)
    return found


def _destroy(client, ledger: Ledger, cfg: VastConfig, info: dict, run_id: str | None, reason: str) -> bool:
    provider_id = str(info["id"])
    row = ledger.query_one("SELECT id FROM instances WHERE provider = ? AND provider_instance_id = ?",
                           (provider.PROVIDER, provider_id))
    if row is None:
        # Unknown to the ledger (rented elsewhere, or lost between create and the ledger update):
        # record it now, so its destruction and cost are on the books.
        known_run = ledger.query_one("SELECT run_id FROM runs WHERE run_id=?", (run_id,)) if run_id else None
        instance_id = ledger.add_instance(
            run_id=run_id if known_run else None, provider=provider.PROVIDER, label=info.get("label") or "",
            machine_id=str(info.get("machine_id")), gpu_name=info.get("gpu_name"), num_gpus=info.get("num_gpus"),
            dph_total=info.get("dph_total"))
        ledger.update_instance(instance_id, provider_instance_id=provider_id, state="booting", reason="found by reap")
    else:
        instance_id = row["id"]
    ledger.event(run_id, "instance.reap", instance_id=instance_id, provider_instance_id=provider_id, reason=reason)
    return provider.terminate(client, ledger, cfg, instance_id, reason=f"reaped: {reason}")
