"""Pre-run cost estimates (for `armature validate`), and the estimate a run recorded in the ledger.

An estimate is arm runs x expected hours x the price of what each arm run occupies:
the chosen offer's $/h on Vast, energy at an assumed GPU power locally, or the machine's
$/h for a local CPU arm run. The
orchestrator stores it as a `cost.estimate` event ({dollars, hours}) so that the
cost report can put it beside what the run actually cost.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from orchestrator.cost.model import JOULES_PER_KWH, Rates
from orchestrator.errors import UserError
from orchestrator.ledger import Ledger

ESTIMATE_EVENT = "cost.estimate"
# Assumed board power of a training GPU when nothing better is known (an RTX 4090 under load).
DEFAULT_GPU_WATTS = 300.0


@dataclass(frozen=True)
class Estimate:
    n_arm_runs: int
    hours_per_arm: float
    dollars_per_hour: float        # what one arm run occupies costs per hour
    gpus_per_arm: float

    @property
    def hours(self) -> float:
        return self.n_arm_runs * self.hours_per_arm

    @property
    def gpu_hours(self) -> float:
        return self.hours * self.gpus_per_arm

    @property
    def dollars(self) -> float:
        return self.hours * self.dollars_per_hour

    def describe(self) -> str:
        """e.g. '8 arm runs x 0.50 h x $0.40/h = $1.60 (4.0 GPU-hours)'."""
        return (f"{self.n_arm_runs} arm runs x {self.hours_per_arm:.2f} h x ${self.dollars_per_hour:.2f}/h"
                f" = ${self.dollars:.2f} ({self.gpu_hours:.1f} GPU-hours)")

    def as_event_detail(self) -> dict:
        return {"dollars": self.dollars, "hours": self.hours, "gpu_hours": self.gpu_hours,
                "dollars_per_hour": self.dollars_per_hour, "n_arm_runs": self.n_arm_runs}


def _check(name: str, value: float) -> float:
    value = float(value)
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise UserError(f"cost estimate: {name} must be a non-negative number, got {value!r}")
    return value


def estimate_study(n_arm_runs: int, expected_hours_per_arm: float, dollars_per_hour: float,
                   gpus_per_arm: float) -> Estimate:
    """Arm runs (arms x seeds) x expected hours x $/h of what each arm run occupies."""
    if int(n_arm_runs) != n_arm_runs or n_arm_runs < 0:
        raise UserError(f"cost estimate: the number of arm runs must be a whole number >= 0, got {n_arm_runs!r}")
    return Estimate(n_arm_runs=int(n_arm_runs),
                    hours_per_arm=_check("expected hours per arm", expected_hours_per_arm),
                    dollars_per_hour=_check("dollars per hour", dollars_per_hour),
                    gpus_per_arm=_check("GPUs per arm", gpus_per_arm))


def local_dollars_per_hour(gpus_per_arm: float, watts_per_gpu: float = DEFAULT_GPU_WATTS,
                           rates: Rates | None = None) -> float:
    """$/h of a local arm run: its GPUs' assumed power at $/kWh, plus the hardware price per GPU-hour; a CPU arm
    run the machine's $/h (at most what its share of the machine costs, see model.price_local_attempt)."""
    rates = rates or Rates.from_env()
    gpus = _check("GPUs per arm", gpus_per_arm)
    watts = _check("watts per GPU", watts_per_gpu)
    if gpus == 0:
        return rates.machine_dollars_per_hour
    return gpus * (watts * 3600 / JOULES_PER_KWH * rates.dollars_per_kwh + rates.hardware_dollars_per_gpu_hour)


def record_estimate(ledger: Ledger, run_id: str, estimate: Estimate) -> None:
    ledger.event(run_id, ESTIMATE_EVENT, **estimate.as_event_detail())


def recorded_estimates(ledger: Ledger, run_ids: list[str]) -> dict[str, dict]:
    """The latest recorded estimate ({dollars, hours, ...}) of each run that has one."""
    if not run_ids:
        return {}
    marks = ", ".join("?" for _ in run_ids)
    rows = ledger.query(f"SELECT run_id, detail_json FROM events WHERE kind = ? AND run_id IN ({marks})"
                        " ORDER BY id", [ESTIMATE_EVENT, *run_ids])
    found = {}
    for row in rows:
        try:
            detail = json.loads(row["detail_json"])
            found[row["run_id"]] = {"dollars": float(detail["dollars"]),
                                    "hours": float(detail["hours"]) if detail.get("hours") is not None else None}
        except (ValueError, KeyError, TypeError):
            continue   # a malformed event is skipped, never fatal to a report
    return found
