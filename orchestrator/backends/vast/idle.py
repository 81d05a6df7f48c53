"""Idle paid GPUs: an instance whose GPUs stay near 0% utilisation while an arm is said to run on it (or that
holds no arm) for longer than `vast.idle_minutes` is stopped and reported as waste (dstack's utilisation policy).

An arm that is deploying or installing legitimately leaves the GPUs idle: only an arm said to be running, or no
arm at all, lets idle time count. Any sample at or above `idle_gpu_percent` on any GPU, or an arm that is not yet
running, starts the count again.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from orchestrator.backends.vast.config import VastConfig
from orchestrator.cost import decisions

IDLE_EVENT = decisions.IDLE_STOPPED


@dataclass
class IdleWatch:
    idle_minutes: float | None
    idle_gpu_percent: float
    _idle_since: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: VastConfig) -> "IdleWatch":
        return cls(cfg.idle_minutes, cfg.idle_gpu_percent)

    def observe(self, instance, gpu_utils: list[float], arm_state: str | None, now: float) -> float | None:
        """One sample of an instance (its GPUs' utilisation in %, the state of the arm on it or None).
        Returns how long it has been idle once that is past idle_minutes (stop it), else None."""
        counts = arm_state in (None, "running")
        idle = counts and bool(gpu_utils) and max(gpu_utils) < self.idle_gpu_percent
        if not idle or self.idle_minutes is None:
            self._idle_since.pop(instance, None)
            return None
        since = self._idle_since.setdefault(instance, now)
        return now - since if now - since > 60.0 * self.idle_minutes else None

    def forget(self, instance) -> None:
        self._idle_since.pop(instance, None)


def record_idle_waste(ledger, run_id: str | None, instance_id: int, idle_seconds: float,
                      dollars_per_hour: float | None, arm: str | None) -> float | None:
    """The ledger event of an instance stopped for idling; returns the dollars its idle GPUs cost."""
    waste = None if dollars_per_hour is None else dollars_per_hour * idle_seconds / 3600.0
    ledger.event(run_id, IDLE_EVENT, instance_id=instance_id, idle_seconds=round(idle_seconds, 1),
                 waste_dollars=waste, arm=arm)
    return waste


class ArmActivity:
    """What the backend knows of each attempt from the events it emits: its instance (ledger id), the state of its
    arm, its GPUs' latest utilisation (%), its latest step and when it started running. Fed from the attempt
    threads (`note`), read by the polling loop (`by_instance`) and the outbid decision (`on_instance`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._attempts: dict[int, dict] = {}

    def begin(self, attempt_id: int, arm: str, out_dir: str, total_steps: int | None) -> None:
        with self._lock:
            self._attempts[attempt_id] = {"arm": arm, "out_dir": out_dir, "total_steps": total_steps,
                                          "instance": None, "state": None, "utils": [], "step": None,
                                          "running_since": None, "contact_at": None}

    def note(self, attempt_id: int, event: dict) -> None:
        with self._lock:
            view = self._attempts.get(attempt_id)
            if view is None:
                return
            if event["kind"] in ("metrics", "health"):         # read off the instance just now: it was running
                view["contact_at"] = time.time()
            if event["kind"] == "attempt":
                view["instance"] = event.get("instance_id")
            elif event["kind"] == "state":
                view["state"] = event["state"]
                if event["state"] == "running" and view["running_since"] is None:
                    view["running_since"] = (time.time(), view["step"] or 0)
            elif event["kind"] == "metrics" and event["rows"]:
                view["step"] = event["rows"][-1].get("step", view["step"])
            elif event["kind"] == "health":
                utils = [100.0 * s["utilization_ratio"] for s in event["samples"]
                         if s.get("utilization_ratio") is not None]
                if utils:
                    view["utils"] = utils

    def end(self, attempt_id: int) -> None:
        with self._lock:
            self._attempts.pop(attempt_id, None)

    def last_contact(self, ledger_id: int) -> float | None:
        """When an attempt last read news off the instance (so it was running then), or None."""
        with self._lock:
            times = [v["contact_at"] for v in self._attempts.values()
                     if v["instance"] == ledger_id and v["contact_at"] is not None]
        return max(times, default=None)

    def on_instance(self, ledger_id: int) -> list[dict]:
        with self._lock:
            return [dict(view) for view in self._attempts.values() if view["instance"] == ledger_id]

    def by_instance(self) -> dict[int, tuple[list[float], str | None, str | None]]:
        """Per instance holding arms: (its GPUs' latest utilisation, the state that lets idle time count only
        when every arm on it is running, the first arm's name)."""
        grouped: dict[int, list[dict]] = {}
        with self._lock:
            for view in self._attempts.values():
                if view["instance"] is not None:
                    grouped.setdefault(view["instance"], []).append(dict(view))
        result = {}
        for ledger_id, views in grouped.items():
            states = [v["state"] for v in views]
            state = next((s for s in states if s != "running"), "running") or "starting"
            result[ledger_id] = ([u for v in views for u in v["utils"]], state, views[0]["arm"])
        return result

    @staticmethod
    def remaining_hours(view: dict, now: float) -> float | None:
        """The arm's remaining work at the pace it has trained so far; None before two steps are known."""
        started, first_step = view["running_since"] or (None, None)
        step, total = view["step"], view["total_steps"]
        if started is None or step is None or total is None or step <= first_step or now <= started:
            return None
        return max(0, total - step) * (now - started) / (step - first_step) / 3600.0
