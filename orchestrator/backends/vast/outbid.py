"""After an outbid (issue 13, point 1): an interruptible instance the bid market stopped (`stopped` while its
`intended_status` stays `running`: its processes were killed, its disk kept) is either waited for, or given up
for the best offer now, whichever `offers.after_outbid` expects to cost less. Each decision is an
`instance.outbid` ledger event (provider.record_outbid; shown by `armature cost --detail`), with when the outbid
came: `deploy` (before a trainer started on the instance) or `run`. An outbid while booting is not weighed: the
next offer costs only its boot (provider.wait_ready records it as a move during `boot`).

Either way the attempt on it ends preempted and the scheduler's next attempt continues from the last pulled
checkpoint: on the resumed instance (kept in the pool, its deployed code still on its disk) after a wait, else
on a new instance.
"""

from __future__ import annotations

import time
from pathlib import Path

from orchestrator.backends.remote.deploy import install_helper_and_watchdog
from orchestrator.backends.remote.pool import PooledInstance
from orchestrator.backends.remote.ssh import SshError
from orchestrator.backends.vast import offers as offer_rules
from orchestrator.backends.vast import provider
from orchestrator.backends.vast.idle import ArmActivity
from orchestrator.backends.vast.offers import OutbidChoice
from orchestrator.backends.vast.provider import OUTBID_EVENT, is_outbid  # noqa: F401 (this module's names too)
from orchestrator.cost.model import dollars_per_hour


def decide(backend, instance: PooledInstance, during: str, now: float | None = None) -> OutbidChoice:
    """Wait or move, on expected cost; recorded as an `instance.outbid` event (`during`: deploy or run)."""
    now = time.time() if now is None else now
    cfg, row = backend.cfg, backend.ledger.instance(instance.ledger_id)
    own_rate = float(row["dph_total"])
    quick = cfg.model_copy(update={"api_deadline_seconds": min(cfg.api_deadline_seconds, 30.0)})
    try:
        excluded = set(backend.excluded_machines) | {str(instance.machine_id)}
        ranked = offer_rules.rank(provider.search_offers(backend.client, quick), excluded, cfg=cfg)
        best_rate = offer_rules.contract_rate(ranked[0], cfg) if ranked else own_rate
    except provider.ProviderError:
        best_rate = own_rate            # no market view: assume a machine like ours
    views = backend.activity.on_instance(instance.ledger_id)
    remaining = [h for h in (ArmActivity.remaining_hours(v, now) for v in views) if h is not None]
    choice = offer_rules.after_outbid(
        own_rate=own_rate, own_storage_per_hour=dollars_per_hour(row) - own_rate, best_rate=best_rate,
        boot_hours=max(0.0, (row["ready_at"] or row["created_at"]) - row["created_at"]) / 3600.0,
        redo_hours=max([_hours_since_checkpoint(v, now) for v in views] or [0.0]),
        remaining_hours=max(remaining) if remaining else cfg.expected_hours_per_instance,
        expected_wait_hours=None if cfg.outbid_wait_minutes is None else cfg.outbid_wait_minutes / 60.0)
    provider.record_outbid(backend.ledger, backend.run_id, instance.ledger_id, instance.provider_id,
                           action=choice.action, during=during, wait_dollars=choice.wait_dollars,
                           move_dollars=choice.move_dollars, own_rate=own_rate, best_rate=best_rate)
    return choice


def _hours_since_checkpoint(view: dict, now: float) -> float:
    """Work lost by moving: the time since the arm's last pulled checkpoint (else since it started running)."""
    checkpoint = Path(view["out_dir"]) / "checkpoints" / "last.pt"
    if checkpoint.exists():
        since = checkpoint.stat().st_mtime
    elif view["running_since"] is not None:
        since = view["running_since"][0]
    else:
        return 0.0
    return max(0.0, now - since) / 3600.0


def wait_for_resume(backend, instance: PooledInstance) -> float | None:
    """Wait (at most vast.outbid_wait_minutes) for an outbid instance to run again and answer SSH; then restart
    its dead-man watchdog (killed with its processes). Seconds waited, or None when it did not come back."""
    cfg = backend.cfg
    started = time.monotonic()
    deadline = started + 60.0 * (cfg.outbid_wait_minutes or 0.0)
    while time.monotonic() < deadline and not backend._closing.is_set():
        try:
            info = backend.provider.describe(str(instance.ledger_id))
        except provider.ProviderError:
            info = {}
        if info is None:
            backend.observe(instance.ledger_id, None)
            return None
        if info:
            backend.observe(instance.ledger_id, info)
        if info.get("actual_status") == "running":
            try:
                install_helper_and_watchdog(instance.conn, instance.paths, backend.settings, backend.repo_root,
                                            backend.budget.silence_now())
                return time.monotonic() - started
            except SshError:
                pass                     # sshd not up yet
        backend._closing.wait(cfg.status_poll_seconds)
    return None
