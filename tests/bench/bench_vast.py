"""Benchmark of the vast backend on the Vast simulator (its default offers and boot delays).

    .venv/bin/python tests/bench/bench_vast.py [--arms 12] [--concurrency 4] [--json]

1. Latency: from `run_attempt` to the trainer's first step, minus the instance's boot time
   (created -> ready); target <= 20 s.
2. A 12-arm study run twice with the same concurrency: armature (2-GPU instances, arms
   packed one per GPU, instances kept and reused) against one instance per arm, destroyed
   after it (Ratiocinator's approach). Instance-hours (created -> destroyed, from the
   ledger) and dollars (the cost model over the ledger) are compared; target >= 30% fewer
   instance-hours.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from infra.vastsim import Simulator  # noqa: E402
from orchestrator.backends.base import AttemptSpec  # noqa: E402
from orchestrator.backends.vast import VastBackend, VastConfig  # noqa: E402
from orchestrator.cost.model import current_spend  # noqa: E402
from orchestrator.ledger import Ledger  # noqa: E402

ARM = {"steps": 60, "batch_size": 8, "log_every": 1, "eval_every": 60, "checkpoint_every": 30,
       "model": {"channels": 8, "codebook_size": 16, "code_dim": 4}, "data": {"num_train": 64, "num_heldout": 16}}


def config(sim: Simulator, **overrides) -> VastConfig:
    values = dict(server_url=sim.url, min_cuda=None, disk_gb=10, status_poll_seconds=0.5, api_backoff_seconds=0.2,
                  poll_seconds=1.0, heartbeat_seconds=1.0, health_seconds=2.0, heartbeat_timeout_seconds=60,
                  pull_checkpoints_every_minutes=1.0, orchestrator_silence_seconds=600, install_timeout_seconds=300,
                  idle_destroy_seconds=120)
    values.update(overrides)
    return VastConfig(**values)


def dirty() -> bool:
    out = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True)
    return bool(out.stdout.strip())


class Study:
    def __init__(self, sim: Simulator, root: Path, run_id: str, cfg: VastConfig):
        self.ledger = Ledger(root / "ledger.sqlite")
        self.run_id = run_id
        self.ledger.create_run(run_id, name=run_id, trainer="vqvae", backend="vast", spec_path=None, metric=None,
                               metric_mode=None, baseline=None, budget_dollars=None, git_commit=None,
                               git_diff_hash=None)
        self.run_dir = root / run_id
        self.backend = VastBackend(self.ledger, run_id, self.run_dir, cfg, None, allow_dirty=dirty())

    def spec(self, name: str) -> AttemptSpec:
        arm_run_id = self.ledger.add_arm_run(self.run_id, arm=name, seed=0, kind="arm", config=ARM, config_hash=name,
                                             out_dir=str(self.run_dir / name), total_steps=ARM["steps"], gpus=1,
                                             cpus=1, gpu_memory_gb=None)
        attempt_id = self.ledger.start_attempt(arm_run_id, backend="vast")
        return AttemptSpec(run_id=self.run_id, arm_run_id=arm_run_id, attempt_id=attempt_id, arm=name, seed=0,
                           trainer="vqvae", config=ARM, out_dir=str(self.run_dir / name), gpus=1, cpus=1)

    def run(self, spec: AttemptSpec, first_step: dict | None = None):
        def emit(event):
            if event["kind"] == "attempt":
                self.ledger.update_attempt(spec.attempt_id, **{k: v for k, v in event.items() if k != "kind"})
            elif event["kind"] == "metrics" and first_step is not None and "at" not in first_step:
                first_step["at"] = event["rows"][0]["time"]
                first_step["received"] = time.time()
        result = self.backend.run_attempt(spec, emit, threading.Event())
        self.ledger.end_attempt(spec.attempt_id, result.outcome, exit_code=result.exit_code, reason=result.reason)
        return result

    def instance_hours(self) -> float:
        rows = self.ledger.query("SELECT created_at, destroyed_at FROM instances WHERE run_id=? AND "
                                 "provider_instance_id IS NOT NULL", (self.run_id,))
        return sum((r["destroyed_at"] or time.time()) - r["created_at"] for r in rows) / 3600

    def instances(self) -> int:
        return len(self.ledger.query("SELECT id FROM instances WHERE run_id=? AND provider_instance_id IS NOT NULL",
                                     (self.run_id,)))


def latency(sim: Simulator, root: Path) -> dict:
    study = Study(sim, root, "latency", config(sim, num_gpus=1, poll_seconds=0.5))
    study.backend.start()
    try:
        first: dict = {}
        started = time.time()
        result = study.run(study.spec("first"), first)
        (instance,) = study.ledger.query("SELECT * FROM instances WHERE run_id='latency'")
    finally:
        study.backend.shutdown()
    boot = instance["ready_at"] - instance["created_at"]
    to_first_step = first["at"] - started
    return {"outcome": result.outcome, "boot_seconds": round(boot, 2),
            "start_to_first_step_seconds": round(to_first_step, 2),
            "beyond_boot_seconds": round(to_first_step - boot, 2),
            "first_step_seen_by_orchestrator_seconds": round(first["received"] - started, 2)}


def study(sim: Simulator, root: Path, run_id: str, cfg: VastConfig, arms: int, concurrency: int) -> dict:
    s = Study(sim, root, run_id, cfg)
    s.backend.start()
    started = time.time()
    try:
        specs = [s.spec(f"arm{i:02d}") for i in range(arms)]
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(s.run, specs))
        outcomes = [r.outcome for r in results]
        for r in results:
            if r.outcome != "succeeded":
                print(f"{run_id}: {r.outcome}: {r.reason}", file=sys.stderr)
    finally:
        s.backend.shutdown()
    return {"outcomes": {o: outcomes.count(o) for o in set(outcomes)}, "instances": s.instances(),
            "instance_hours": round(s.instance_hours(), 5), "dollars": round(current_spend(s.ledger, run_id), 5),
            "wall_seconds": round(time.time() - started, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arms", type=int, default=12)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    key = "bench-" + secrets.token_hex(12)
    os.environ["VAST_API_KEY"] = key
    with tempfile.TemporaryDirectory(prefix="bench-vast-") as tmp:
        root = Path(tmp)
        sim = Simulator(root / "sim", api_key=key).start()
        try:
            figures = {"latency": latency(sim, root / "latency")}
            figures["armature"] = study(sim, root / "armature", "packed", config(sim, num_gpus=2, keep_instances=True),
                                        args.arms, args.concurrency)
            figures["one_instance_per_arm"] = study(sim, root / "single", "single",
                                                    config(sim, num_gpus=1, keep_instances=False),
                                                    args.arms, args.concurrency)
        finally:
            sim.stop()
    packed, single = figures["armature"], figures["one_instance_per_arm"]
    figures["instance_hours_saved_ratio"] = round(1 - packed["instance_hours"] / single["instance_hours"], 3)
    figures["dollars_saved_ratio"] = round(1 - packed["dollars"] / single["dollars"], 3)
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    lat = figures["latency"]
    print(f"latency: boot {lat['boot_seconds']} s, start -> first training step {lat['start_to_first_step_seconds']}"
          f" s, beyond boot {lat['beyond_boot_seconds']} s (target <= 20 s)")
    for name in ("armature", "one_instance_per_arm"):
        f = figures[name]
        print(f"{name:>22}: {args.arms} arms {f['outcomes']}, {f['instances']} instances, "
              f"{f['instance_hours'] * 3600:.0f} instance-seconds, ${f['dollars']:.4f}, wall {f['wall_seconds']} s")
    print(f"instance-hours saved: {figures['instance_hours_saved_ratio']:.0%} (target >= 30%), "
          f"dollars saved: {figures['dollars_saved_ratio']:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
