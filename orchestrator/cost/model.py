"""The cost model: what each attempt, instance and idle hour cost, from the ledger alone.

A rented instance costs its contracted `dph_total` ($/h: the offer's price, or the bid of an
interruptible rental) plus its storage (disk_gb x storage_cost $/GB/month, Vast bills it for every
second the instance exists: loading, stopped and exited included) over its billed lifetime: from
`created_at` to the provider-confirmed `destroyed_at`, or to now while it is not confirmed gone
("still running"). That lifetime is cut into lines:

  boot     created_at -> ready_at (or the whole life when it never became ready)
  deploy   an attempt on the ready instance before its arm run reached `running`
  run      an attempt while it trained
  idle     GPU share nobody used while the instance was ready (including after
           the last attempt ended and before the destroy was confirmed)

At every moment the instance's $/h is split among the attempts on it by GPU share
(the whole GPUs an attempt holds / instances.num_gpus: a fractional request is rented,
costed and reported as whole GPUs, see gpus_held; an arm asking for no GPU takes the
whole box); the share nobody holds is idle. The lines of one instance add up to its
whole cost exactly. An attempt that ended failed, preempted, lost, interrupted or
cancelled is waste as a whole (one line named after its end state); so are boot,
deploy and idle.

An attempt without an instance ran on this machine (or a Ray cluster we do not
rent): it costs its measured energy at $/kWh (NVML for a GPU attempt, RAPL for a
CPU attempt's share of the CPU packages, see energy.py) plus an optional hardware
price per GPU-hour. Without an energy reading it costs machine time: its wall hours
x the machine's $/h (ARMATURE_MACHINE_DOLLARS_PER_HOUR) x its share of the machine
(the CPUs it holds over the machine's cores; a GPU attempt takes the whole machine).
Each line says which (`priced_by`); a local line is never of unknown cost.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

from orchestrator.backends.provision import capabilities
from orchestrator.cost.energy import cpu_share, machine_cpus
from orchestrator.errors import UserError
from orchestrator.ledger import Ledger

JOULES_PER_KWH = 3.6e6

# Attempt end states whose whole cost bought nothing that is kept.
WASTE_STATES = ("failed", "preempted", "lost", "interrupted", "cancelled")
# Instance lines that are overhead rather than an attempt's work.
OVERHEAD_KINDS = ("boot", "idle")

# An instance costs nothing when the provider never accepted the create:
# no provider id and a failed state.
_UNBILLED_STATES = ("failed", "failed_create")
_BILLED_SQL = "NOT (provider_instance_id IS NULL AND state IN ('failed', 'failed_create'))"
MONTH_HOURS = 30 * 24.0          # Vast's storage month
# An instance's $/h all in: the contracted GPU rate plus its storage (zero where the ledger has no disk price).
_RATE_SQL = f"(dph_total + COALESCE(disk_gb * storage_cost, 0) / {MONTH_HOURS})"


@dataclass(frozen=True)
class Rates:
    """Prices for hardware we do not rent: electricity, (optionally) the GPUs themselves, and the machine's time
    where no energy was measured (a 2-core cloud VM or a desktop's power and wear: about $0.10/h)."""
    dollars_per_kwh: float = 0.30
    hardware_dollars_per_gpu_hour: float = 0.0
    machine_dollars_per_hour: float = 0.10
    machine_cpus: int | None = None            # cores of the machine local attempts ran on; None: this one's

    @classmethod
    def from_env(cls) -> "Rates":
        """Rates from ARMATURE_DOLLARS_PER_KWH, ARMATURE_HARDWARE_DOLLARS_PER_GPU_HOUR and
        ARMATURE_MACHINE_DOLLARS_PER_HOUR (defaults otherwise)."""
        return cls(dollars_per_kwh=_env_float("ARMATURE_DOLLARS_PER_KWH", cls.dollars_per_kwh),
                   machine_dollars_per_hour=_env_float("ARMATURE_MACHINE_DOLLARS_PER_HOUR",
                                                       cls.machine_dollars_per_hour),
                   hardware_dollars_per_gpu_hour=_env_float("ARMATURE_HARDWARE_DOLLARS_PER_GPU_HOUR",
                                                            cls.hardware_dollars_per_gpu_hour))


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise UserError(f"{name}={raw!r} is not a number (dollars, e.g. {default})") from None
    if value < 0:
        raise UserError(f"{name}={raw!r} must not be negative")
    return value


# ---- cheap totals for the exporter and budget enforcement -------------------------------

def current_spend(ledger: Ledger, run_id: str, now: float | None = None, rates: Rates | None = None) -> float:
    """Dollars a run has cost so far: its instances' $/h over their lives (running ones up to
    `now`) plus its local attempts, priced as `price_local_attempt` prices them."""
    now = time.time() if now is None else now
    rates = rates or Rates.from_env()
    rented = ledger.query_one(
        f"SELECT COALESCE(SUM({_RATE_SQL} * MAX(0, MIN(COALESCE(destroyed_at, ?1), ?1) - created_at)), 0)"
        f" / 3600.0 AS dollars FROM instances WHERE run_id = ?2 AND dph_total IS NOT NULL AND {_BILLED_SQL}",
        (now, run_id))["dollars"]
    local = ledger.query_one(
        "SELECT COALESCE(SUM(a.energy_joules), 0) AS joules,"
        " COALESCE(SUM(r.gpus * MAX(0, MIN(COALESCE(a.ended_at, ?1), ?1) - a.started_at)), 0) / 3600.0"
        " AS gpu_hours,"
        " COALESCE(SUM(CASE WHEN a.energy_joules IS NOT NULL THEN 0"
        "  ELSE MAX(0, MIN(COALESCE(a.ended_at, ?1), ?1) - a.started_at)"
        "   * (CASE WHEN r.gpus > 0 OR COALESCE(r.cpus, 0) <= 0 THEN 1.0 ELSE MIN(1.0, r.cpus * 1.0 / ?3) END)"
        "  END), 0) / 3600.0 AS machine_hours"
        " FROM attempts a JOIN arm_runs r ON a.arm_run_id = r.id"
        " WHERE r.run_id = ?2 AND a.instance_id IS NULL AND a.backend != 'vast'",
        (now, run_id, rates.machine_cpus or machine_cpus()))
    return (rented + local["joules"] / JOULES_PER_KWH * rates.dollars_per_kwh
            + local["gpu_hours"] * rates.hardware_dollars_per_gpu_hour
            + local["machine_hours"] * rates.machine_dollars_per_hour)


def burn_rate(ledger: Ledger, run_id: str | None = None) -> float:
    """$/h of the rented instances alive now (not confirmed destroyed), of one run or of all."""
    sql = (f"SELECT COALESCE(SUM({_RATE_SQL}), 0) AS dph FROM instances"
           f" WHERE destroyed_at IS NULL AND dph_total IS NOT NULL AND {_BILLED_SQL}")
    if run_id is None:
        return ledger.query_one(sql)["dph"]
    return ledger.query_one(sql + " AND run_id = ?", (run_id,))["dph"]


# ---- the full model -----------------------------------------------------------------------

@dataclass
class CostLine:
    """One piece of spending: an attempt's work or deploy, or an instance's boot or idle time."""
    kind: str                      # run, deploy, boot, idle, or a waste end state (failed, preempted, ...)
    waste: bool
    run_id: str | None
    backend: str                   # 'vast' (rented) or the attempt's backend ('local', ...)
    hours: float                   # wall-clock hours
    gpu_hours: float
    dollars: float | None          # None: unknown (a local attempt without an energy reading)
    arm: str | None = None         # None for instance overhead (boot, idle)
    arm_kind: str | None = None    # 'arm' or 'upstream'
    seed: int | None = None
    arm_run_id: int | None = None
    attempt_id: int | None = None
    attempt_n: int | None = None
    attempt_state: str | None = None
    instance_id: int | None = None
    provider_instance_id: str | None = None
    still_running: bool = False    # priced up to now: the instance or attempt has not ended
    energy_joules: float | None = None
    priced_by: str = "rent"        # rent (instance $/h), energy (measured, local) or machine time (local)

    @property
    def dollars_per_hour(self) -> float | None:
        if self.dollars is None or self.hours <= 0:
            return None
        return self.dollars / self.hours


def instance_is_billed(instance: dict) -> bool:
    return not (instance["provider_instance_id"] is None and instance["state"] in _UNBILLED_STATES)


def dollars_per_hour(instance: dict) -> float | None:
    """What an instance costs per hour of its life: its contracted $/h plus its storage; None without a $/h."""
    if instance["dph_total"] is None:
        return None
    disk_gb, storage_cost = instance.get("disk_gb"), instance.get("storage_cost")
    storage = 0.0 if disk_gb is None or storage_cost is None else disk_gb * storage_cost / MONTH_HOURS
    return instance["dph_total"] + storage


def instance_end(instance: dict, now: float) -> tuple[float, bool]:
    """When billing of an instance ends (or now), and whether it is still running."""
    if instance["destroyed_at"] is not None:
        return instance["destroyed_at"], False
    return max(now, instance["created_at"]), True


def instance_cost(instance: dict, now: float) -> float | None:
    """An instance's whole cost: $/h x billed lifetime (what its lines add up to); None without a $/h."""
    if not instance_is_billed(instance):
        return 0.0
    if instance["dph_total"] is None:
        return None
    end, _ = instance_end(instance, now)
    return dollars_per_hour(instance) * (end - instance["created_at"]) / 3600


def gpus_held(attempt: dict, capacity: float) -> float:
    """GPUs an attempt holds on a rented instance: the ones it was given (gpu_index), else its request rounded
    up (a rented GPU is not shared: an arm asking for 0.25 holds, and pays for, a whole one); an arm asking
    for no GPU takes the whole box."""
    if attempt.get("gpu_index"):
        return float(len([g for g in str(attempt["gpu_index"]).split(",") if g.strip()]))
    if attempt["gpus"] and attempt["gpus"] > 0:
        return float(math.ceil(attempt["gpus"]))
    return capacity


def price_instance(instance: dict, attempts: list[dict], now: float) -> list[CostLine]:
    """Split one instance's cost into boot, per-attempt and idle lines.

    `attempts` are attempt rows joined with their arm run (`run_id`, `arm`, `arm_kind`, `seed`,
    `gpus`) and `running_at` (when the arm run reached `running` in this attempt, or None).
    """
    if not instance_is_billed(instance):
        return []
    start = instance["created_at"]
    end, still_running = instance_end(instance, now)
    capacity = float(instance["num_gpus"] or 1)
    rate = dollars_per_hour(instance)
    ready = end if instance["ready_at"] is None else min(max(instance["ready_at"], start), end)

    def new_line(kind: str, waste: bool, attempt: dict | None = None) -> CostLine:
        line = CostLine(kind=kind, waste=waste, run_id=instance["run_id"], backend=instance["provider"],
                        hours=0.0, gpu_hours=0.0, dollars=None if rate is None else 0.0,
                        instance_id=instance["id"], provider_instance_id=instance["provider_instance_id"],
                        still_running=still_running)
        if attempt is not None:
            line.run_id = attempt["run_id"]
            line.arm, line.arm_kind, line.seed = attempt["arm"], attempt["arm_kind"], attempt["seed"]
            line.arm_run_id, line.attempt_id, line.attempt_n = attempt["arm_run_id"], attempt["id"], attempt["n"]
            line.attempt_state = attempt["state"]
            line.still_running = still_running and attempt["ended_at"] is None
        return line

    def charge(line: CostLine, seconds: float, gpus: float) -> None:
        line.hours += seconds / 3600
        line.gpu_hours += gpus * seconds / 3600
        if rate is not None:
            line.dollars += rate * (gpus / capacity) * seconds / 3600

    lines: dict[tuple, CostLine] = {}
    if ready > start:
        boot = lines[("boot",)] = new_line("boot", True)
        charge(boot, ready - start, capacity)

    # Each attempt occupies [from, to) of the ready instance, in a deploy then a work phase.
    phases = []    # (from, to, line key, GPU weight)
    for a in attempts:
        a_from, a_to = max(a["started_at"], ready), min(a["ended_at"] or end, end)
        if a_to <= a_from:
            continue
        weight = gpus_held(a, capacity)
        in_waste = a["state"] in WASTE_STATES
        running_at = a["running_at"] if a["running_at"] is not None else a["started_at"]
        split = min(max(running_at, a_from), a_to)
        for p_from, p_to, kind in ((a_from, split, "deploy"), (split, a_to, "run")):
            if p_to > p_from:
                key_kind = a["state"] if in_waste else kind
                key = ("attempt", a["id"], key_kind)
                if key not in lines:
                    lines[key] = new_line(key_kind, in_waste or kind == "deploy", a)
                phases.append((p_from, p_to, key, weight))

    # Sweep the ready life segment by segment; in each, share the $/h by GPU weight.
    cuts = sorted({ready, end} | {t for p in phases for t in p[:2]})
    idle = new_line("idle", True)
    for seg_from, seg_to in zip(cuts, cuts[1:]):
        seconds = seg_to - seg_from
        active = [p for p in phases if p[0] <= seg_from and p[1] >= seg_to]
        held = sum(p[3] for p in active)
        denominator = max(capacity, held)
        for _, _, key, weight in active:
            charge(lines[key], seconds, weight * capacity / denominator)
        if held < capacity:
            charge(idle, seconds, capacity - held)
    if idle.gpu_hours > 0:
        lines[("idle",)] = idle
    return list(lines.values())


def price_local_attempt(attempt: dict, rates: Rates, now: float) -> CostLine:
    """A local attempt: measured energy at $/kWh, else its share of the machine's time at $/h; plus hardware
    $/GPU-hour."""
    end = attempt["ended_at"] if attempt["ended_at"] is not None else max(now, attempt["started_at"])
    hours = max(0.0, end - attempt["started_at"]) / 3600
    gpu_hours = float(attempt["gpus"] or 0) * hours
    joules = attempt["energy_joules"]
    rented_elsewhere = capabilities(attempt["backend"]).rents_instances   # its cost is on instance lines
    priced_by = "rent" if rented_elsewhere else "machine time" if joules is None else "energy"
    if rented_elsewhere:
        dollars = 0.0
    elif joules is None:
        share = 1.0 if attempt["gpus"] else cpu_share(attempt["cpus"], rates.machine_cpus)
        dollars = hours * share * rates.machine_dollars_per_hour + gpu_hours * rates.hardware_dollars_per_gpu_hour
    else:
        dollars = joules / JOULES_PER_KWH * rates.dollars_per_kwh + gpu_hours * rates.hardware_dollars_per_gpu_hour
    in_waste = attempt["state"] in WASTE_STATES
    return CostLine(kind=attempt["state"] if in_waste else "run", waste=in_waste, run_id=attempt["run_id"],
                    backend=attempt["backend"], hours=hours, gpu_hours=gpu_hours, dollars=dollars,
                    arm=attempt["arm"], arm_kind=attempt["arm_kind"], seed=attempt["seed"],
                    arm_run_id=attempt["arm_run_id"], attempt_id=attempt["id"], attempt_n=attempt["n"],
                    attempt_state=attempt["state"], still_running=attempt["ended_at"] is None,
                    energy_joules=joules, priced_by=priced_by)


def _in_clause(column: str, values) -> tuple[str, list]:
    values = list(values)
    return f"{column} IN ({', '.join('?' for _ in values)})", values


_ATTEMPTS_SQL = (
    "SELECT a.*, r.run_id, r.arm, r.kind AS arm_kind, r.seed, r.gpus, r.cpus,"
    " (SELECT MIN(t.at) FROM transitions t WHERE t.arm_run_id = a.arm_run_id AND t.attempt_id = a.id"
    "  AND t.to_state = 'running') AS running_at"
    " FROM attempts a JOIN arm_runs r ON a.arm_run_id = r.id")


def cost_lines(ledger: Ledger, run_ids: list[str] | None = None, *, now: float | None = None,
               rates: Rates | None = None, include_unowned: bool = False) -> list[CostLine]:
    """Every cost line of the given runs (all runs when None). With `include_unowned`, also
    the instances that belong to no run (e.g. leaked ones that `reap` found)."""
    now = time.time() if now is None else now
    rates = rates or Rates.from_env()
    if run_ids is None:
        attempts = ledger.query(_ATTEMPTS_SQL + " ORDER BY a.id")
        owner = "" if include_unowned else " WHERE run_id IS NOT NULL"
        instances = {i["id"]: i for i in ledger.query(f"SELECT * FROM instances{owner} ORDER BY id")}
    else:
        attempts, instances = _load_runs(ledger, run_ids, include_unowned)

    lines: list[CostLine] = []
    on_instance: dict[int, list[dict]] = {}
    for a in attempts:
        if a["instance_id"] in instances:
            on_instance.setdefault(a["instance_id"], []).append(a)
        else:
            lines.append(price_local_attempt(a, rates, now))
    for instance_id, instance in instances.items():
        lines.extend(price_instance(instance, on_instance.get(instance_id, []), now))
    if run_ids is not None:
        wanted = set(run_ids)
        lines = [line for line in lines if line.run_id in wanted or (include_unowned and line.run_id is None)]
    return lines


def _load_runs(ledger: Ledger, run_ids: list[str], include_unowned: bool) -> tuple[list[dict], dict[int, dict]]:
    """Attempts and instances of some runs, plus what shares their instances: an instance
    recorded under another run that an attempt names, and other runs' attempts on them."""
    clause, params = _in_clause("r.run_id", run_ids)
    attempts = ledger.query(f"{_ATTEMPTS_SQL} WHERE {clause} ORDER BY a.id", params)
    clause, params = _in_clause("run_id", run_ids)
    unowned = " OR run_id IS NULL" if include_unowned else ""
    instances = {i["id"]: i for i in ledger.query(f"SELECT * FROM instances WHERE {clause}{unowned}", params)}
    missing = {a["instance_id"] for a in attempts if a["instance_id"] is not None} - set(instances)
    if missing:
        clause, params = _in_clause("id", sorted(missing))
        instances.update({i["id"]: i for i in ledger.query(f"SELECT * FROM instances WHERE {clause}", params)})
    if instances:
        clause, params = _in_clause("a.instance_id", sorted(instances))
        have = {a["id"] for a in attempts}
        attempts += [a for a in ledger.query(f"{_ATTEMPTS_SQL} WHERE {clause} ORDER BY a.id", params)
                     if a["id"] not in have]
    return attempts, instances
