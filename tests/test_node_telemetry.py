"""An attempt on another host of a Ray cluster reports its own health and energy, read where it runs, and the
scheduler treats that host like a rented one: its memory breach stops the attempt (the driver's own breach does
not), and its energy is recorded as reported instead of read on the driver.

The scheduler, ledger, watchdog and NodeTelemetry are the real ones; the backend is a small one of this test's
own that plays a Ray node on another host: it sends what the attempt task there sends.
"""

import threading

from orchestrator.backends.base import AttemptResult
from orchestrator.ledger import Ledger
from orchestrator.runs import create_run
from orchestrator.scheduler import Scheduler
from orchestrator.spec import load_plan
from orchestrator.telemetry.gpu import NodeTelemetry
from tests.armature_helpers import tiny_spec

# every host is over this memory limit: the driver's, and the node's
SPEC = """name: node
trainer: vqvae
metric: {name: recon_mse, mode: min}
watchdog: {poll_seconds: 0.2, cooldown_seconds: 0, max_restarts: 0, host_memory_ratio: 0.01}
"""
NODE = "armature-node-b"
NODE_JOULES = 12.5


class OtherHostNodeBackend:
    """The local backend's attempt task on a Ray node whose host is not the driver's."""

    name = "local"

    def start(self) -> None:
        pass

    def max_concurrent(self, cpus: float, gpus: float) -> int | None:
        return None

    def run_attempt(self, spec, emit, stop: threading.Event) -> AttemptResult:
        telemetry = NodeTelemetry([], spec.cpus, host=NODE)
        emit({"kind": "attempt", "host": NODE, "hardware": "cpu", "gpu_index": None})
        emit({"kind": "state", "state": "running", "reason": None})
        emit(telemetry.health_event())
        if not stop.wait(30):
            return AttemptResult("failed", 1, "the watchdog did not stop the attempt", None)
        emit({"kind": "energy", "joules": NODE_JOULES})
        return AttemptResult("interrupted", 143, "stopped", None)

    def shutdown(self) -> None:
        pass


def test_node_telemetry_reads_the_host_it_runs_on():
    telemetry = NodeTelemetry([], cpus=1, host=NODE)
    event = telemetry.health_event()
    assert event["kind"] == "health" and event["host"] == NODE and event["samples"] == []
    assert 0 < event["host_memory_ratio"] < 1
    energy = telemetry.energy_event()            # RAPL where readable, else no energy event at all
    assert energy is None or (energy["kind"] == "energy" and energy["joules"] >= 0)


def test_another_hosts_memory_breach_stops_its_attempt_and_its_energy_is_kept(tmp_path):
    plan = load_plan(tiny_spec(tmp_path, SPEC))
    ledger = Ledger(tmp_path / "ledger.sqlite")
    create_run(ledger, plan, "node", tmp_path / "node", "local", {"commit": "x", "diff_hash": None}, gpus=0)
    scheduler = Scheduler(ledger, "node", plan.study, OtherHostNodeBackend(), tmp_path / "node", local_gpus=None)
    assert scheduler.run() == "finished"

    (arm_run,) = ledger.arm_runs("node")
    (breach,) = ledger.events("node", "watchdog.breach")
    assert f"on {NODE}" in breach["detail_json"] and "host memory" in breach["detail_json"], breach
    assert arm_run["state"] == "failed" and "gave up after 0 restarts" in arm_run["reason"], arm_run
    (attempt,) = ledger.attempts(arm_run["id"])
    assert (attempt["host"], attempt["energy_joules"]) == (NODE, NODE_JOULES)
