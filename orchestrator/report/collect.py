"""What a report shows, gathered from the ledger and the arm runs' folders; no formatting here.

Summary metrics come from each arm run's `summary.json`, key by key falling back to the last
metrics the ledger holds. Statistics are over the seeds that succeeded, with the sample standard
deviation (ddof=1); each arm is compared with the baseline seed by seed (verdicts.py). Compute time is
wall time of every attempt x the resources it held.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from orchestrator.errors import UserError
from orchestrator.ledger import ACTIVE_STATES, Ledger
from orchestrator.report.verdicts import Verdict, check_guards, compare_to_baseline
from orchestrator.trainer_registry import (TrainerInfo, arms_on_other_upstreams, load_trainer, measuring_upstream,
                                          metric_caveat)

BROKEN_STATES = ("failed", "diverged", "cancelled")
STATE_ORDER = ("succeeded", "diverged", "failed", "cancelled", "pending") + ACTIVE_STATES
# Keys of summary.json / metrics rows that are bookkeeping, not metrics (used when the trainer cannot be loaded).
BOOKKEEPING_KEYS = {"step", "steps", "time", "wall_time_s", "device", "diverged", "reason"}


@dataclass
class Stat:
    """Mean and sample standard deviation (ddof=1; None with fewer than two values) of some seeds' values."""
    n: int
    mean: float | None
    std: float | None

    @classmethod
    def of(cls, values: list[float]) -> "Stat":
        if not values:
            return cls(0, None, None)
        std = statistics.stdev(values) if len(values) > 1 else None
        return cls(len(values), statistics.fmean(values), std)


@dataclass
class SeedResult:
    """One arm run (an arm x seed, or an upstream run) and what it produced."""
    row: dict                              # the arm_runs row
    out_dir: Path
    values: dict[str, float]               # finite numeric summary values
    from_summary: bool                     # False: summary.json missing, values are the ledger's last metrics
    gpu_hours: float
    cpu_hours: float
    hardware: list[str]
    still_running: bool                    # an attempt has not ended yet (its time counts up to now)
    metric_rows: list[dict] = field(default_factory=list)

    @property
    def state(self) -> str:
        return self.row["state"]

    @property
    def label(self) -> str:
        return f"{self.row['arm']} seed {self.row['seed']}"


@dataclass
class ArmResult:
    name: str
    description: str
    seeds: list[SeedResult]
    stats: dict[str, Stat] = field(default_factory=dict)
    verdict: Verdict | None = None   # the primary metric compared with the baseline (None: no comparison possible)
    is_baseline: bool = False
    stopped: dict | None = None      # its `early_stop.stop` ledger event (rule, step, reason, why): out of the verdicts

    @property
    def starred(self) -> bool:
        """Only an arm found better than the baseline gets the star."""
        return self.verdict is not None and self.verdict.verdict == "better"

    @property
    def succeeded(self) -> list[SeedResult]:
        return [s for s in self.seeds if s.state == "succeeded"]

    @property
    def state_counts(self) -> Counter:
        return Counter(s.state for s in self.seeds)

    @property
    def gpu_hours(self) -> float:
        return sum(s.gpu_hours for s in self.seeds)

    @property
    def cpu_hours(self) -> float:
        return sum(s.cpu_hours for s in self.seeds)

    @property
    def hardware(self) -> list[str]:
        return sorted({h for s in self.seeds for h in s.hardware})

    def count(self, state: str) -> int:
        return self.state_counts.get(state, 0)

    def primary_values(self, primary: str) -> dict[int, float]:
        """Seed -> primary metric of this arm's succeeded seeds that report it."""
        return {s.row["seed"]: s.values[primary] for s in self.succeeded if primary in s.values}


@dataclass
class StudyResults:
    run: dict
    description: str
    metrics: dict[str, str | None]     # metric -> "min" | "max" | None (unknown), the primary metric first
    primary: str | None
    mode: str | None                   # the primary metric's direction
    baseline: str | None
    arms: list[ArmResult]
    upstream: list[SeedResult]
    hardware_warning: str | None
    notes: list[str]
    upstream_metrics: dict[str, dict[str, str | None]] = field(default_factory=dict)  # trainer -> its metrics
    upstream_users: dict[int, list[str]] = field(default_factory=dict)   # upstream arm_runs.id -> arms using it
    seed_randomises: dict[str, list[str]] = field(default_factory=dict)  # trainer -> what a seed changes
    seed_rounds: list[str] = field(default_factory=list)   # why adaptive seeds were added or stopped, in order
    samples_images: dict[str, str] = field(default_factory=dict)   # trainer -> the sample grid it declares
    primary_caveat: str | None = None    # what the primary metric can be flattered by (TrainerInfo.caveat)

    @property
    def seeds(self) -> list[SeedResult]:
        return [s for arm in self.arms for s in arm.seeds]

    @property
    def uses_gpus(self) -> bool:
        return any(s.row["gpus"] > 0 for s in self.seeds)

    @property
    def uses_cpu_only(self) -> bool:
        return any(s.row["gpus"] == 0 for s in self.seeds)


def collect_results(ledger: Ledger, run_id: str, run_dir: Path) -> StudyResults:
    run = ledger.get_run(run_id)
    spec = _read_spec(run_dir / "spec.yaml")
    arm_descriptions = {a["name"]: a.get("description") or "" for a in spec.get("arms") or []
                        if isinstance(a, dict) and "name" in a}
    now = time.time()

    arms: dict[str, ArmResult] = {}
    for row in ledger.arm_runs(run_id, kind="arm"):
        seed = _seed_result(ledger, row, run_dir, now, with_metric_rows=True)
        if row["arm"] not in arms:
            description = arm_descriptions.get(row["arm"]) or arm_descriptions.get(row["arm"].split("@")[0], "")
            arms[row["arm"]] = ArmResult(row["arm"], str(description), [])
        arms[row["arm"]].seeds.append(seed)
    upstream = [_seed_result(ledger, row, run_dir, now, with_metric_rows=False)
                for row in ledger.arm_runs(run_id, kind="upstream")]

    trainers = _trainer_infos([run["trainer"]] + [s.row["trainer"] for arm in arms.values() for s in arm.seeds]
                              + [s.row["trainer"] for s in upstream])
    arm_seeds = [s for arm in arms.values() for s in arm.seeds]
    metrics = _declared_metrics(trainers, [run["trainer"]] + [s.row["trainer"] for s in arm_seeds], arm_seeds)
    primary = run["metric"]
    if primary:
        metrics = {primary: run["metric_mode"] or metrics.get(primary),
                   **{k: v for k, v in metrics.items() if k != primary}}
    mode = metrics[primary] if primary else None
    results = StudyResults(run=run, description=str(spec.get("description") or ""), metrics=metrics,
                           primary=primary, mode=mode, baseline=run["baseline"], arms=list(arms.values()),
                           upstream=upstream, hardware_warning=None, notes=[])
    for arm in results.arms:
        arm.stats = {m: Stat.of([s.values[m] for s in arm.succeeded if m in s.values]) for m in metrics}
    from orchestrator.early_stop import stopped_arms   # here: early_stop uses report.verdicts

    for arm_name, stop in stopped_arms(ledger, run_id).items():
        if arm_name in arms and arm_name != results.baseline:
            arms[arm_name].stopped = stop
    used_by_arms = dict.fromkeys([run["trainer"]] + [s.row["trainer"] for s in arm_seeds])
    primary_trainers = [trainers[name] for name in used_by_arms if name in trainers]
    _compare_with_baseline(results, primary_trainers)
    results.upstream_metrics = {name: _declared_metrics(trainers, [name], upstream)
                                for name in dict.fromkeys(s.row["trainer"] for s in upstream)}
    results.upstream_users = _upstream_users(results.arms)
    used = dict.fromkeys([s.row["trainer"] for s in results.seeds] + [s.row["trainer"] for s in upstream])
    results.seed_randomises = {name: trainers[name].seed_randomises for name in used
                               if name in trainers and trainers[name].seed_randomises}
    results.samples_images = {name: info.samples_image for name, info in trainers.items()}
    results.hardware_warning = hardware_warning(results.arms)
    results.seed_rounds = [_event_reason(event) for event in ledger.events(run_id, "seeds.")]
    results.notes = _notes(results)
    return results


def _trainer_infos(names: list[str]) -> dict[str, TrainerInfo]:
    """The trainers that can be loaded (a report of an old run may name one that no longer exists)."""
    infos = {}
    for name in dict.fromkeys(names):
        try:
            infos[name] = load_trainer(name)
        except (UserError, ImportError):
            pass
    return infos


def _upstream_users(arms: list[ArmResult]) -> dict[int, list[str]]:
    users: dict[int, list[str]] = {}
    for arm in arms:
        for seed in arm.seeds:
            for upstream_id in json.loads(seed.row.get("upstream_ids") or "{}").values():
                if arm.name not in users.setdefault(upstream_id, []):
                    users[upstream_id].append(arm.name)
    return users


def _event_reason(event: dict) -> str:
    detail = json.loads(event["detail_json"] or "{}")
    return str(detail.get("reason") or f"{event['kind']}: {detail}")


def _read_spec(path: Path) -> dict:
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return spec if isinstance(spec, dict) else {}


def _seed_result(ledger: Ledger, row: dict, run_dir: Path, now: float, with_metric_rows: bool) -> SeedResult:
    out_dir = Path(row["out_dir"])
    if not out_dir.exists() and row["kind"] == "arm":  # the run folder moved with ARMATURE_HOME
        out_dir = run_dir / row["arm"] / f"seed{row['seed']}"
    summary = _read_json(out_dir / "summary.json")
    last = _numeric(json.loads(row["last_metrics_json"] or "{}"))
    values = {**last, **_numeric(summary or {})}

    attempts = ledger.attempts(row["id"])
    wall_hours = sum(max(0.0, (a["ended_at"] or now) - a["started_at"]) for a in attempts) / 3600
    return SeedResult(
        row=row, out_dir=out_dir, values=values, from_summary=summary is not None,
        gpu_hours=wall_hours * row["gpus"],
        cpu_hours=wall_hours * row["cpus"] if row["gpus"] == 0 else 0.0,
        hardware=sorted({a["hardware"] for a in attempts if a["hardware"]}),
        still_running=any(a["ended_at"] is None for a in attempts),
        metric_rows=ledger.metric_rows(row["id"]) if with_metric_rows else [])


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _numeric(data: dict) -> dict[str, float]:
    return {k: float(v) for k, v in data.items() if finite_number(v)}


def finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _declared_metrics(trainers: dict[str, TrainerInfo], names: list[str],
                      seeds: list[SeedResult]) -> dict[str, str | None]:
    """Metric -> direction: the METRICS of the named trainers, or for one that cannot be loaded the numbers its
    succeeded seeds' summaries hold (direction None)."""
    declared: dict[str, str | None] = {}
    for name in dict.fromkeys(names):
        if name in trainers:
            found = trainers[name].metrics
        else:
            found = {k: None for s in seeds if s.row["trainer"] == name and s.state == "succeeded"
                     for k in s.values if k not in BOOKKEEPING_KEYS}
        declared.update({k: v for k, v in found.items() if k not in declared})
    return declared


def _compare_with_baseline(results: StudyResults, trainers: list[TrainerInfo]) -> None:
    """Verdicts on the primary metric, minus what it cannot support: no verdict for an arm whose metric is measured
    in an upstream space the arm changes (MEASURED_IN), and no "better" that a guard metric contradicts when a
    degenerate model can flatter the primary one (FLATTERED_BY)."""
    baseline = next((a for a in results.arms if a.name == results.baseline), None)
    if baseline is None:
        return
    baseline.is_baseline = True
    primary = results.primary
    if primary is None or results.mode not in ("min", "max") or not baseline.primary_values(primary):
        return
    results.primary_caveat = metric_caveat(trainers, primary)
    compared = [arm for arm in results.arms if arm.stopped is None]    # stopped early: reported apart
    own_space = {}
    if (measured_in := measuring_upstream(trainers, primary)) is not None:
        field_name, dir_field = measured_in
        rows = [seed.row for arm in compared for seed in arm.succeeded]
        own_space = {name: f"not comparable: {primary} is measured in the {field_name}'s own space, and this arm "
                           f"trains another {field_name} than {baseline.name}"
                     for name in arms_on_other_upstreams(rows, baseline.name, dir_field)}
    values = {arm.name: arm.primary_values(primary) for arm in compared}
    verdicts = compare_to_baseline({name: v for name, v in values.items() if name not in own_space},
                                   baseline.name, results.mode)
    for name, why in own_space.items():
        verdict = compare_to_baseline({baseline.name: values[baseline.name], name: values[name]},
                                      baseline.name, results.mode)[name]
        verdict.p_value = verdict.p_adjusted = None
        verdict.verdict = "inconclusive"
        verdict.note = "; ".join(note for note in (why, verdict.note) if note)
        verdicts[name] = verdict
    flattered = next((info.flattered_by[primary] for info in trainers if primary in info.flattered_by), None)
    if flattered is not None:
        what, guards = flattered
        check_guards(verdicts, primary, what,
                     {g: (results.metrics[g], {arm.name: arm.primary_values(g) for arm in compared}) for g in guards},
                     baseline.name)
    for arm in compared:
        arm.verdict = verdicts[arm.name]


def hardware_warning(arms: list[ArmResult]) -> str | None:
    """A warning when the arms' attempts ran on more than one kind of hardware (GPU model or CPU)."""
    per_arm = {arm.name: arm.hardware for arm in arms if arm.hardware}
    if len({h for hardware in per_arm.values() for h in hardware}) <= 1:
        return None
    listing = "; ".join(f"{name}: {', '.join(hardware)}" for name, hardware in per_arm.items())
    return (f"arms ran on different hardware, so their speed (and possibly their numerics) differ; "
            f"compare with care. {listing}")


def one_line(reason: str | None, limit: int = 300) -> str:
    """A recorded reason (possibly a multi-line traceback tail) as one line for a note or a table cell."""
    text = " ".join((reason or "no reason recorded").split())
    return text if len(text) <= limit else "…" + text[-limit:]


def _notes(results: StudyResults) -> list[str]:
    notes = []
    for seed in results.seeds + results.upstream:
        kind = "upstream " if seed.row["kind"] == "upstream" else ""
        restarts = f" (after {seed.row['restarts']} restarts)" if seed.row["restarts"] else ""
        if seed.state in BROKEN_STATES:
            excluded = "; excluded from the means" if kind == "" else ""
            notes.append(f"{kind}{seed.label}: {seed.state}{restarts}: {one_line(seed.row['reason'])}{excluded}")
        elif seed.state == "succeeded" and seed.row["restarts"]:
            notes.append(f"{kind}{seed.label}: succeeded after {seed.row['restarts']} restarts")
        if seed.state == "succeeded" and not seed.from_summary:
            notes.append(f"{kind}{seed.label}: no summary.json in {seed.out_dir}; "
                         f"its values are the last metrics the ledger recorded")
    unfinished = [s for s in results.seeds + results.upstream if s.state not in BROKEN_STATES + ("succeeded",)]
    if unfinished:
        notes.append(f"{len(unfinished)} arm run(s) not finished ({', '.join(s.label for s in unfinished)}): "
                     f"these results are partial; time of running attempts counts up to now")
    baseline = next((a for a in results.arms if a.is_baseline), None)
    if results.baseline and baseline is None:
        notes.append(f"baseline {results.baseline!r} is not an arm of this run: no verdicts")
    elif baseline is not None and results.primary and baseline.stats[results.primary].mean is None:
        notes.append(f"baseline {results.baseline!r} has no succeeded seed with {results.primary}: no verdicts")
    elif baseline is not None and results.primary and results.mode not in ("min", "max"):
        notes.append(f"the direction of {results.primary} is unknown (no metric mode): no verdicts")
    return notes
