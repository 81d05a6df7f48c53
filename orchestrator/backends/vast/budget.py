"""The run's budget as a hard cap: what is committed, not only what is spent.

Committed spend = spent so far (cost/model.current_spend)
                + every live instance's $/h until the end of its expected work
                + for a new instance: boot + expected work + teardown, all at its $/h.

An instance's expected work ends `boot_seconds + expected_hours_per_instance + teardown_seconds`
after its create; one that works longer still holds `teardown_seconds` in reserve, since it
has to be stopped and destroyed. Boot is the worst case (ready deadline + dependency install);
teardown is the stop's worst case: one poll to notice, the stop grace, three polls waiting for
the exit, the last checkpoint pull, and the destroy.

Launches are admitted one at a time under `Budget.lock`; the admitted instance's ledger row is
written under the same lock, so the next launch sees it. (One process drives a run: the ledger's
claim on the run is atomic; the lock serializes that process's attempt threads.)

While arms run, the stop starts as soon as spent + (the $/h of every live instance) x (teardown +
one poll) reaches the cap, so the teardown completes under it.

The dead-man switch of an instance is armed at boot with `silence_seconds`: no longer than what the
cap left for that instance pays for (minus a destroy). Admission reserves boot + work + teardown for
it, so that is never less than the install timeout the switch must outlast (the floor it gets
regardless). Every poll then shortens it to `silence_now`: what is left of the budget / the $/h of
all live instances (minus a destroy), so instances orphaned at any moment cannot outspend the cap.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from orchestrator.backends.vast.config import VastConfig
from orchestrator.cost.model import burn_rate, current_spend, instance_is_billed
from orchestrator.ledger import Ledger


class BudgetRefused(Exception):
    """Renting another instance would take the run's committed spend over its budget."""


class Budget:
    """The run's spending limit (None = unlimited), from the ledger's cost model."""

    def __init__(self, ledger: Ledger, run_id: str, dollars: float | None, cfg: VastConfig):
        self.ledger, self.run_id, self.dollars, self.cfg = ledger, run_id, dollars, cfg
        self.lock = threading.Lock()
        self._stop_recorded = False

    # ---- the allowances ----

    @property
    def boot_seconds(self) -> float:
        return self.cfg.ready_deadline_seconds + self.cfg.install_timeout_seconds

    @property
    def teardown_seconds(self) -> float:
        cfg = self.cfg
        return 4 * cfg.poll_seconds + cfg.stop_grace_seconds + cfg.checkpoint_pull_seconds + cfg.destroy_seconds

    @property
    def new_instance_seconds(self) -> float:
        return self.boot_seconds + self.cfg.expected_hours_per_instance * 3600 + self.teardown_seconds

    # ---- what is spent and committed ----

    def spent(self) -> float:
        return current_spend(self.ledger, self.run_id)

    def committed(self, now: float | None = None) -> tuple[float, float]:
        """(spent so far, what the live instances will still cost until their expected work and teardown end)."""
        now = time.time() if now is None else now
        future = 0.0
        for row in self.ledger.live_instances(self.run_id):
            if row["dph_total"] is None or not instance_is_billed(row):
                continue
            ends = row["created_at"] + self.new_instance_seconds
            future += row["dph_total"] * max(self.teardown_seconds, ends - now) / 3600
        return current_spend(self.ledger, self.run_id, now=now), future

    def launch_refusal(self, dollars_per_hour: float) -> str | None:
        """Why a new instance at this price may not be rented now, or None when it fits under the cap."""
        if self.dollars is None:
            return None
        spent, future = self.committed()
        new = dollars_per_hour * self.new_instance_seconds / 3600
        if spent + future + new <= self.dollars:
            return None
        hours = self.cfg.expected_hours_per_instance
        return (f"budget: renting a ${dollars_per_hour:.3f}/h instance for the expected {hours:g} h (plus boot and "
                f"teardown, ${new:.2f}) would commit ${spent + future + new:.2f}, over the budget of "
                f"${self.dollars:.2f} (spent so far ${spent:.2f}, committed to running instances ${future:.2f})")

    def admit(self, dollars_per_hour: float, record: Callable[[], int]) -> tuple[int, float]:
        """Check the cap and, under the same lock, `record()` the instance's ledger row; (row id, the dead-man
        silence for it). Raises BudgetRefused."""
        with self.lock:
            refusal = self.launch_refusal(dollars_per_hour)
            if refusal:
                raise BudgetRefused(refusal)
            headroom = None
            if self.dollars is not None:
                spent, future = self.committed()
                headroom = self.dollars - spent - future
            row_id = record()
        return row_id, self.silence_seconds(dollars_per_hour, headroom)

    def silence_seconds(self, dollars_per_hour: float, headroom_dollars: float | None) -> float:
        """The dead-man silence for an instance the cap leaves `headroom_dollars` for: an orphan bills for the
        silence plus a destroy. Floored just above the install timeout (the switch must outlast an install,
        which touches nothing) and twice the poll period; admission makes the floor a no-op."""
        configured = self.cfg.orchestrator_silence_seconds
        if headroom_dollars is None or dollars_per_hour <= 0:
            return configured
        affordable = headroom_dollars / dollars_per_hour * 3600 - self.cfg.destroy_seconds
        floor = max(self.cfg.install_timeout_seconds, 2 * self.cfg.poll_seconds) + 1.0
        return max(floor, min(configured, affordable))

    def silence_now(self) -> float | None:
        """The dead-man silence for every live instance from now on (written at each poll), None when unlimited:
        what is left of the budget pays for all of them orphaned at once, for the silence plus a destroy.
        Floored at four polls (the watch loop must not trip it). The stop keeps a teardown's worth in hand,
        so the floor only binds past the cap; below the install timeout, a dependency install on a reused
        instance can trip it, which is intended: the budget cannot pay for that install."""
        if self.dollars is None:
            return None
        burn = burn_rate(self.ledger, self.run_id)
        if burn <= 0:
            return None
        affordable = (self.dollars - self.spent()) / burn * 3600 - self.cfg.destroy_seconds
        return max(4 * self.cfg.poll_seconds, min(self.cfg.orchestrator_silence_seconds, affordable))

    # ---- the stop ----

    def exhausted(self) -> str | None:
        """Why every arm must stop now (None while the cap allows going on): the spend plus the teardown of every
        live instance (and one more poll until the next check) reaches the cap."""
        if self.dollars is None:
            return None
        spent = self.spent()
        burn = burn_rate(self.ledger, self.run_id)
        reserve = burn * (self.teardown_seconds + self.cfg.poll_seconds) / 3600
        if spent + reserve < self.dollars:
            return None
        with self.lock:
            if not self._stop_recorded:
                self._stop_recorded = True
                self.ledger.event(self.run_id, "budget.stop", spent_dollars=round(spent, 4),
                                  teardown_reserve_dollars=round(reserve, 4), budget_dollars=self.dollars)
        return f"budget: spent ${spent:.2f} of ${self.dollars:.2f}"
