"""Find and destroy rented instances that no live run owns (`armature reap [--dry-run] [--instance ID ...]`).

Only this ledger's instances are reaped: those whose label carries this ledger's id
(`armature:<ledger id>:<run_id>:...`, see provider.py) or that the ledger recorded. One is an
orphan when the ledger does not know its run, or the run is not live: its state is not `running`,
or its orchestrator's pid is dead on this host (a run driven from another host counts as live:
its pid cannot be checked from here). Instances of another ledger on the same account (another
ARMATURE_HOME, another checkout, another person), and armature labels without a ledger id (from
older versions), are listed as foreign and never destroyed, unless the user names them
(`instances`). Destruction is confirmed (provider.terminate) and recorded in the ledger.

Runs attach their SSH key to each instance they rent, never to the account. `reap_keys` removes
from the account the keys this ledger's runs registered with older armature versions and did not
remove because they did not end cleanly (a kill -9): a key left there gets root on every later
instance of the account.
"""

from __future__ import annotations

import os

from orchestrator.backends.vast import provider
from orchestrator.backends.vast.config import VastConfig
from orchestrator.ledger import Ledger, orchestrator_alive


def orphan_reason(ledger: Ledger, run_id: str | None) -> str | None:
    """Why an instance of `run_id` is an orphan, or None when its run is live."""
    if run_id is None:
        return "label names no run"
    run = ledger.query_one("SELECT * FROM runs WHERE run_id=?", (run_id,))
    if run is None:
        return f"run {run_id} is not in the ledger"
    if run["state"] not in ("running", "stopping"):       # stopping: its orchestrator is destroying them
        return f"run {run_id} is {run['state']}"
    if run["orchestrator_host"] == os.uname().nodename and not orchestrator_alive(run):
        return f"run {run_id}'s orchestrator (pid {run['orchestrator_pid']}) is dead"
    return None


def reap(client, ledger: Ledger, dry_run: bool = False, cfg: VastConfig | None = None,
         only_run: str | None = None, instances: set[str] | None = None) -> list[dict]:
    """This ledger's orphaned instances (of `only_run`, when given), destroyed (confirmed) unless dry_run, and
    the armature instances of other ledgers, listed (`foreign`) but left alone. `instances` (provider ids)
    narrows the work to those and destroys them whoever owns them. One dict per instance:
    provider_instance_id, label, run_id, status, dph_total, reason, foreign, destroyed (None when not destroyed)."""
    cfg = cfg or VastConfig()
    ours = ledger.identity()
    named = {str(i) for i in instances} if instances is not None else None
    found = []
    for info in provider.list_ours(client, cfg, "" if named else provider.LABEL_PREFIX):
        provider_id = str(info["id"])
        if info.get("actual_status") == "destroyed" or (named is not None and provider_id not in named):
            continue
        owner = provider.owner_of_label(info.get("label")) or provider.LabelOwner(None, None)
        if only_run is not None and owner.run_id != only_run:
            continue
        recorded = _ledger_row(ledger, info) is not None
        foreign = owner.ledger_id != ours and not recorded
        if foreign:
            reason = (f"another ledger's (id {owner.ledger_id})" if owner.ledger_id
                      else "label without a ledger id (an older armature, or not armature's)")
        else:
            reason = orphan_reason(ledger, owner.run_id)
        if named is not None:
            reason = "named by the user" + (f"; {reason}" if reason else "")
        elif reason is None:
            continue
        entry = {"provider_instance_id": provider_id, "label": info.get("label"), "run_id": owner.run_id,
                 "status": info.get("actual_status"), "dph_total": info.get("dph_total"), "reason": reason,
                 "foreign": foreign, "destroyed": None}
        if not dry_run and (named is not None or not foreign):
            entry["destroyed"] = _destroy(client, ledger, cfg, info, owner.run_id, reason)
        found.append(entry)
    return found


def _ledger_row(ledger: Ledger, info: dict) -> dict | None:
    """This ledger's row of a provider instance: by its id, else by a label whose create never answered."""
    row = ledger.query_one("SELECT * FROM instances WHERE provider = ? AND provider_instance_id = ?",
                           (provider.PROVIDER, str(info["id"])))
    if row is None and info.get("label"):
        row = ledger.query_one("SELECT * FROM instances WHERE provider = ? AND provider_instance_id IS NULL"
                               " AND label = ?", (provider.PROVIDER, info["label"]))
    return row


def _destroy(client, ledger: Ledger, cfg: VastConfig, info: dict, run_id: str | None, reason: str) -> bool:
    provider_id = str(info["id"])
    row = _ledger_row(ledger, info)
    if row is None:
        # Unknown to the ledger (a foreign instance the user named, or one lost between create and the
        # ledger update): record it now, so its destruction and cost are on the books.
        known_run = ledger.query_one("SELECT run_id FROM runs WHERE run_id=?", (run_id,)) if run_id else None
        instance_id = ledger.add_instance(
            run_id=run_id if known_run else None, provider=provider.PROVIDER, label=info.get("label") or "",
            machine_id=str(info.get("machine_id")), gpu_name=info.get("gpu_name"), num_gpus=info.get("num_gpus"),
            dph_total=info.get("dph_total"))
        ledger.update_instance(instance_id, provider_instance_id=provider_id, state="booting", reason="found by reap")
    else:
        instance_id = row["id"]
        if row["provider_instance_id"] is None:
            ledger.update_instance(instance_id, provider_instance_id=provider_id, state="booting")
    ledger.event(run_id, "instance.reap", instance_id=instance_id, provider_instance_id=provider_id, reason=reason)
    return provider.terminate(client, ledger, cfg, instance_id, reason=f"reaped: {reason}")


def reap_keys(client, ledger: Ledger, dry_run: bool = False, cfg: VastConfig | None = None,
              starting_run: str | None = None) -> list[dict]:
    """This ledger's account SSH keys whose run is not live, and `starting_run`'s (the run starting now needs
    none there), removed unless dry_run; one dict per key: key_id, run_id, reason, removed."""
    cfg = cfg or VastConfig()
    ours = ledger.identity()
    found = []
    for entry in provider.list_ssh_keys(client, cfg):
        owner = provider.owner_of_key(entry["key"])
        if owner is None or owner.ledger_id != ours:
            continue
        reason = ("its key belongs on its instances, not on the account" if owner.run_id == starting_run
                  else orphan_reason(ledger, owner.run_id))
        if reason is None:
            continue
        if not dry_run:
            provider.remove_ssh_key(client, cfg, entry["id"])
            ledger.event(owner.run_id, "ssh_key.reaped", key_id=entry["id"], reason=reason)
        found.append({"key_id": entry["id"], "run_id": owner.run_id, "reason": reason, "removed": not dry_run})
    return found
