"""Cost lines gathered into what a report shows: studies (runs), their arms and overhead, totals."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from orchestrator.cost.decisions import Decision, run_decisions
from orchestrator.cost.model import OVERHEAD_KINDS, CostLine, Rates, cost_lines
from orchestrator.cost.estimate import recorded_estimates
from orchestrator.cost.reconcile import InstanceReconciliation, reconcile
from orchestrator.ledger import Ledger


@dataclass
class Totals:
    """Sums over some cost lines. `dollars` sums the known lines; `unknown` counts the others."""
    dollars: float = 0.0
    waste_dollars: float = 0.0
    hours: float = 0.0
    known_hours: float = 0.0      # hours of the lines whose dollars are known
    gpu_hours: float = 0.0
    attempts: int = 0
    unknown: int = 0
    still_running: bool = False

    @classmethod
    def of(cls, lines: list[CostLine]) -> "Totals":
        totals = cls(attempts=len({line.attempt_id for line in lines if line.attempt_id is not None}))
        for line in lines:
            totals.hours += line.hours
            totals.gpu_hours += line.gpu_hours
            totals.still_running |= line.still_running
            if line.dollars is None:
                totals.unknown += 1
                continue
            totals.known_hours += line.hours
            totals.dollars += line.dollars
            if line.waste:
                totals.waste_dollars += line.dollars
        return totals

    @property
    def dollars_per_hour(self) -> float | None:
        return self.dollars / self.known_hours if self.known_hours > 0 else None

    @property
    def cost_text(self) -> str:
        """The dollars, 'unknown' when no line is priced, '$x + ?' when some are not (the same everywhere)."""
        if self.unknown and self.dollars == 0:
            return "unknown"
        return money(self.dollars) + (" + ?" if self.unknown else "")

    @property
    def waste_ratio(self) -> float | None:
        return self.waste_dollars / self.dollars if self.dollars > 0 else None


@dataclass
class Group:
    """One row of a study: an arm (all its seeds and attempts) or one kind of instance overhead."""
    label: str
    kind: str                     # 'arm', 'upstream' or 'overhead'
    lines: list[CostLine] = field(default_factory=list)

    @cached_property
    def totals(self) -> Totals:
        return Totals.of(self.lines)


@dataclass
class Study:
    """A run and its cost; `run` is None for the instances that belong to no run."""
    run: dict | None
    groups: list[Group]
    experiments: int                # arm runs of kind 'arm'
    estimate: dict | None           # {dollars, hours} recorded before the run, if any
    decisions: list[Decision] = field(default_factory=list)   # outbids, idle stops, exclusions, early stops

    @property
    def run_id(self) -> str | None:
        return self.run["run_id"] if self.run else None

    @property
    def title(self) -> str:
        return f"{self.run['name']} ({self.run['run_id']})" if self.run else "instances of no run"

    @cached_property
    def lines(self) -> list[CostLine]:
        return [line for group in self.groups for line in group.lines]

    @cached_property
    def totals(self) -> Totals:
        return Totals.of(self.lines)


@dataclass
class CostReport:
    studies: list[Study]
    reconciliation: list[InstanceReconciliation]
    rates: Rates
    now: float
    filters: dict

    @cached_property
    def lines(self) -> list[CostLine]:
        return [line for study in self.studies for line in study.lines]

    @cached_property
    def totals(self) -> Totals:
        return Totals.of(self.lines)

    @property
    def experiments(self) -> int:
        return sum(study.experiments for study in self.studies)

    def share(self, dollars: float) -> float | None:
        total = self.totals.dollars
        return dollars / total if total > 0 else None

    def headline(self) -> str:
        """e.g. '12 experiments for $4.32 (waste $0.61, 14%)'."""
        totals = self.totals
        n = self.experiments
        text = f"{n} experiment{'s' if n != 1 else ''} for {totals.cost_text}"
        if totals.waste_ratio is not None:
            text += f" (waste {money(totals.waste_dollars)}, {totals.waste_ratio:.0%})"
        if totals.unknown:
            text += f" ({totals.unknown} line{'s' if totals.unknown != 1 else ''} of unknown cost)"
        if totals.still_running:
            text += "; still running, priced up to now"
        return text


def money(dollars: float | None) -> str:
    if dollars is None:
        return "unknown"
    if 0 < abs(dollars) < 0.005:
        return "<$0.01" if dollars > 0 else "-<$0.01"
    return f"-${-dollars:,.2f}" if dollars < 0 else f"${dollars:,.2f}"


def _arm_names(ledger: Ledger, run_ids: list[str]) -> dict[str, list[tuple[str, str]]]:
    """Each run's arms in planning order, as (arm, kind), so arms with no attempt yet still show."""
    if not run_ids:
        return {}
    marks = ", ".join("?" for _ in run_ids)
    names: dict[str, list[tuple[str, str]]] = {}
    for row in ledger.query(f"SELECT run_id, arm, kind, MIN(id) AS first FROM arm_runs WHERE run_id IN ({marks})"
                            " GROUP BY run_id, arm, kind ORDER BY first", run_ids):
        names.setdefault(row["run_id"], []).append((row["arm"], row["kind"]))
    return names


def _experiment_counts(ledger: Ledger, run_ids: list[str]) -> dict[str, int]:
    if not run_ids:
        return {}
    marks = ", ".join("?" for _ in run_ids)
    return {row["run_id"]: row["n"] for row in ledger.query(
        f"SELECT run_id, COUNT(*) AS n FROM arm_runs WHERE kind = 'arm' AND run_id IN ({marks}) GROUP BY run_id",
        run_ids)}


def _groups(lines: list[CostLine], arms: list[tuple[str, str]]) -> list[Group]:
    by_key: dict[tuple[str, str], Group] = {}
    for arm, kind in arms:
        by_key[(kind, arm)] = Group(label=arm, kind=kind)
    for line in lines:
        key = ("overhead", line.kind) if line.arm is None else (line.arm_kind or "arm", line.arm)
        if key not in by_key:
            by_key[key] = Group(label=key[1], kind=key[0])
        by_key[key].lines.append(line)
    order = {"upstream": 0, "arm": 1, "overhead": 2}
    overhead_order = {kind: i for i, kind in enumerate(OVERHEAD_KINDS)}
    return sorted(by_key.values(), key=lambda g: (order.get(g.kind, 1), overhead_order.get(g.label, 0)))


def build_report(ledger: Ledger, runs: list[dict], *, now: float, rates: Rates, filters: dict,
                 unowned_instances: set[int] = frozenset()) -> CostReport:
    """The report over some runs (rows of `runs`), plus the given instances that belong to no run."""
    run_ids = [run["run_id"] for run in runs]
    lines = cost_lines(ledger, run_ids, now=now, rates=rates, include_unowned=bool(unowned_instances))
    lines = [line for line in lines if line.run_id is not None or line.instance_id in unowned_instances]
    arms = _arm_names(ledger, run_ids)
    experiments = _experiment_counts(ledger, run_ids)
    estimates = recorded_estimates(ledger, run_ids)
    by_run: dict[str | None, list[CostLine]] = {}
    for line in lines:
        by_run.setdefault(line.run_id, []).append(line)

    studies = [Study(run=run, groups=_groups(by_run.get(run["run_id"], []), arms.get(run["run_id"], [])),
                     experiments=experiments.get(run["run_id"], 0), estimate=estimates.get(run["run_id"]),
                     decisions=run_decisions(ledger, run["run_id"]))
               for run in runs]
    if by_run.get(None):
        studies.append(Study(run=None, groups=_groups(by_run[None], []), experiments=0, estimate=None))

    instance_ids = sorted({line.instance_id for line in lines if line.instance_id is not None})
    checks = reconcile(ledger, None, now=now, instance_ids=instance_ids) if instance_ids else []
    return CostReport(studies=studies, reconciliation=checks, rates=rates, now=now, filters=filters)
