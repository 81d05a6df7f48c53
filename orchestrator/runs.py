"""A run's life outside the scheduler: writing it into the ledger, and cleaning up after a killed orchestrator."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import time
from pathlib import Path

from orchestrator.backends.provision import capabilities
from orchestrator.errors import UserError
from orchestrator.ledger import ACTIVE_STATES, Ledger, orchestrator_alive  # noqa: F401 (used by reap)
from orchestrator.procs import same_process_alive
from orchestrator.spec import Plan, PlannedUpstream, config_hash, replicate, spec_yaml, upstream_runs
from orchestrator.trainer_registry import load_trainer

ORPHAN_GRACE_SECONDS = 120


def new_run_id(study_name: str) -> str:
    return f"{study_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_run_id(ledger: Ledger, run_id: str, run_dir: Path) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.=@+-]*", run_id):
        raise UserError(f"--run-id {run_id!r}: letters, digits and _ . = @ + - only")
    if ledger.query_one("SELECT run_id FROM runs WHERE run_id=?", (run_id,)) or run_dir.exists():
        raise UserError(f"run {run_id!r} exists already ({run_dir}); `armature resume {run_id}` continues it")


def gpu_share(gpus: float, gpu_memory_gb: float | None, card_memory_gb: float | None) -> float:
    """The memory guard: a packed arm takes at least the share of the card its memory needs."""
    if gpus == 0 or gpu_memory_gb is None or card_memory_gb is None or gpus >= 1:
        return gpus
    if gpu_memory_gb > card_memory_gb:
        raise UserError(f"resources.gpu_memory_gb={gpu_memory_gb} is more than the {card_memory_gb:.1f} GB "
                        f"the GPU has")
    return max(gpus, round(gpu_memory_gb / card_memory_gb + 0.005, 2))


def create_run(ledger: Ledger, plan: Plan, run_id: str, run_dir: Path, backend: str, code: dict,
               gpus: float) -> None:
    """Write the resolved spec and every planned arm run (upstream runs first)."""
    study = plan.study
    run_dir.mkdir(parents=True, exist_ok=True)     # the backend may have made it (e.g. for its keys)
    (run_dir / "spec.yaml").write_text(spec_yaml(plan, code))
    ledger.create_run(run_id, name=study.name, trainer=study.trainer, backend=backend, spec_path=str(plan.path),
                      metric=study.metric.name, metric_mode=study.metric.mode, baseline=study.baseline,
                      budget_dollars=study.budget.max_dollars, git_commit=code["commit"],
                      git_diff_hash=code["diff_hash"])
    resources = dict(gpus=gpus, cpus=study.resources.cpus, gpu_memory_gb=study.resources.gpu_memory_gb)
    upstream_ids = _add_upstream_runs(ledger, run_id, run_dir, plan.upstreams, {}, resources)
    for planned in plan.arm_runs:
        ledger.add_arm_run(
            run_id, arm=planned.arm, seed=planned.seed, kind="arm", trainer=planned.trainer, config=planned.config,
            config_hash=planned.config_hash, out_dir=str(run_dir / planned.arm / f"seed{planned.seed}"),
            total_steps=planned.config.get("steps"),
            upstream_ids={f: upstream_ids[u.config_hash] for f, u in planned.upstream.items()}, **resources)


def add_replicate(ledger: Ledger, run_id: str, run_dir: Path, arms: list[str], seed: int) -> list[int]:
    """Plan seed `seed` of the given arms in a running study (adaptive seeds): each arm's config with seed=k and
    data.draw=k, and the upstream runs it needs for that seed, reusing those the run has already. Returns the
    new arm runs' ids (upstream runs first)."""
    rows = ledger.arm_runs(run_id)
    upstream_ids = {r["config_hash"]: r["id"] for r in rows if r["kind"] == "upstream"}
    new_ids = []
    for arm in arms:
        template = [r for r in rows if r["kind"] == "arm" and r["arm"] == arm][-1]
        trainer = load_trainer(template["trainer"])
        config = replicate(json.loads(template["config_json"]), trainer, seed)
        planned: dict[str, PlannedUpstream] = {}
        links = upstream_runs(config, trainer, planned)
        resources = {key: template[key] for key in ("gpus", "cpus", "gpu_memory_gb")}
        known = set(upstream_ids)
        upstream_ids.update(_add_upstream_runs(ledger, run_id, run_dir, list(planned.values()), upstream_ids,
                                               resources))
        new_ids += [upstream_ids[h] for h in upstream_ids if h not in known]
        new_ids.append(ledger.add_arm_run(
            run_id, arm=arm, seed=seed, kind="arm", trainer=trainer.name, config=config,
            config_hash=config_hash(config), out_dir=str(run_dir / arm / f"seed{seed}"),
            total_steps=config.get("steps"),
            upstream_ids={f: upstream_ids[u.config_hash] for f, u in links.items()}, **resources))
    return new_ids


def _add_upstream_runs(ledger: Ledger, run_id: str, run_dir: Path, upstreams: list[PlannedUpstream],
                       existing: dict[str, int], resources: dict) -> dict[str, int]:
    """Add the upstream runs not in `existing` (config hash -> arm run id); returns the ids of all of them."""
    ids = dict(existing)
    for up in upstreams:
        if up.config_hash in ids:
            continue
        ids[up.config_hash] = ledger.add_arm_run(
            run_id, arm=up.name, seed=up.seed, kind="upstream", trainer=up.trainer, config=up.config,
            config_hash=up.config_hash, out_dir=str(run_dir / "_upstream" / up.name),
            total_steps=up.config.get("steps"),
            upstream_ids={f: ids[u.config_hash] for f, u in up.upstream.items()}, **resources)
    return ids


def stop_local_trainer(attempt: dict) -> bool:
    """Stop the trainer of a local attempt row if it still runs on this host: SIGTERM to its process group (it
    checkpoints), SIGKILL after ORPHAN_GRACE_SECONDS. Returns whether one was running."""
    pid, start_time = attempt["pid"], attempt["pid_start_time"]
    if not pid or attempt["host"] != socket.gethostname() or not same_process_alive(pid, start_time):
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.time() + ORPHAN_GRACE_SECONDS
    while same_process_alive(pid, start_time) and time.time() < deadline:
        time.sleep(0.2)
    if same_process_alive(pid, start_time):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    return True


def settle_orphans(ledger: Ledger, run_id: str) -> dict[int, dict]:
    """After an orchestrator died: stop its local trainers (they checkpoint) and close their attempts as
    interrupted (the orchestrator's death is no failure of the arm: it does not use up max_attempts).

    Returns the open attempts on rented instances, keyed by arm run, for the backend to adopt.
    """
    adopt = {}
    for attempt in ledger.open_attempts(run_id):
        if not capabilities(attempt["backend"]).runs_here:     # on a remote host: the backend adopts it
            adopt[attempt["arm_run_id"]] = attempt
            continue
        reason = ("the orchestrator died; its trainer was stopped with SIGTERM (checkpointed)"
                  if stop_local_trainer(attempt) else "the orchestrator died; no trainer was running")
        ledger.end_attempt(attempt["id"], "interrupted", reason=reason)
    for arm_run in ledger.arm_runs(run_id):
        if arm_run["state"] in ACTIVE_STATES:
            why = (f"to adopt attempt {adopt[arm_run['id']]['id']} on its instance" if arm_run["id"] in adopt
                   else "resumed after the orchestrator stopped")
            ledger.transition(arm_run["id"], "pending", why)
    return adopt
