"""Print the expanded plan of a spec (arms x seeds, what each arm changes, resources, cost estimate)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from orchestrator.cost.estimate import Estimate, estimate_study, local_dollars_per_hour, record_estimate
from orchestrator.ledger import Ledger
from orchestrator.spec import Plan, flatten


def arm_changes(plan: Plan) -> dict[str, str]:
    """What each arm sets on top of `base`, as 'key=value' text."""
    study = plan.study
    changes = {}
    for run in plan.arm_runs:
        if run.arm in changes:
            continue
        arm = next((a for a in study.arms if run.arm == a.name or run.arm.startswith(a.name + "@")), None)
        flat = flatten(arm.set) if arm else {}
        for key in study.grid:
            flat[key] = _lookup(run.config, key)
        changes[run.arm] = ", ".join(f"{k}={v}" for k, v in flat.items()) or "(base)"
    return changes


def _lookup(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def estimate(plan: Plan, gpus: float) -> Estimate | None:
    study = plan.study
    hours = study.budget.expected_hours_per_arm
    if hours is None:
        return None
    if study.backend == "vast":
        price = study.vast.get("max_dollars_per_hour")
        if price is None:
            return None
        return estimate_study(len(plan.arm_runs), hours, float(price), gpus)
    return estimate_study(len(plan.arm_runs), hours, local_dollars_per_hour(gpus), gpus)


def print_plan(plan: Plan, console: Console) -> None:
    study = plan.study
    seeds = study.seed_list
    console.print(f"[bold]{study.name}[/bold] ({plan.path}): trainer {study.trainer}, backend {study.backend}, "
                  f"{len(plan.arm_runs)} arm runs = {len(plan.arm_runs) // len(seeds)} arms x {len(seeds)} seeds "
                  f"{seeds}", soft_wrap=True)
    table = Table(show_header=True, header_style="bold")
    for column in ("arm", "changes from base", "steps", "seeds"):
        table.add_column(column)
    steps = {run.arm: run.config.get("steps") for run in plan.arm_runs}
    for arm, change in arm_changes(plan).items():
        marker = " (baseline)" if arm == study.baseline else ""
        table.add_row(arm + marker, change, str(steps[arm]), str(len(seeds)))
    console.print(table)
    for up in plan.upstreams:
        users = sorted({r.arm for r in plan.arm_runs if any(u is up for u in r.upstream.values())})
        console.print(f"upstream {up.name}: one {up.trainer} run shared by {', '.join(users)}")
    res = study.resources
    memory = f", {res.gpu_memory_gb} GB GPU memory" if res.gpu_memory_gb else ""
    console.print(f"resources per arm run: {res.gpus:g} GPU, {res.cpus:g} CPU{memory} "
                  f"(CPU only where there is no GPU); primary metric {study.metric.name} ({study.metric.mode})")
    est = estimate(plan, res.gpus)
    if est is not None:
        console.print(f"cost estimate: {est.describe()}")
    if study.budget.max_dollars:
        console.print(f"budget: ${study.budget.max_dollars:.2f}")


def estimate_event(ledger: Ledger, run_id: str, plan: Plan, gpus: float) -> None:
    est = estimate(plan, gpus)
    if est is not None:
        record_estimate(ledger, run_id, est)
