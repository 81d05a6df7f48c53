"""The watchdog per host: after a breach an arm restarts only once the host it ran on has cooled down.

The scheduler, ledger and watchdog are the real ones. The backend is a small one of this test's own that runs
each attempt on a named remote host, as a rented instance does: it reports the host, streams that host's GPU
samples while the attempt runs, and ends when asked to stop. The driver's own GPUs are cool (none here), so
only the ledger's record of the remote host can hold the restart back.
"""

import threading
import time

from orchestrator.backends.base import AttemptResult
from orchestrator.ledger import Ledger
from orchestrator.runs import create_run
from orchestrator.scheduler import Scheduler
from orchestrator.spec import load_plan
from orchestrator.telemetry.gpu import GpuSample
from tests.armature_helpers import tiny_spec, wait_for

SPEC = """name: hosts
trainer: vqvae
metric: {name: recon_mse, mode: min}
watchdog: {poll_seconds: 0.2, cooldown_seconds: 0, gpu_temp_celsius: 83}
"""

HOST = "rented-1"


def sample(temperature: float) -> dict:
    return GpuSample(host=HOST, gpu="0", name="NVIDIA GeForce RTX 4090", temperature_celsius=temperature,
                     at=time.time()).to_dict()


class RemoteHostBackend:
    """Attempt 1 reports its host at 92 °C (a breach); every later attempt succeeds at once."""

    name = "remote-host"

    def __init__(self):
        self.started: list[float] = []

    def start(self) -> None:
        pass

    def max_concurrent(self, cpus: float, gpus: float) -> int | None:
        return None

    def run_attempt(self, spec, emit, stop: threading.Event) -> AttemptResult:
        self.started.append(time.time())
        emit({"kind": "attempt", "host": HOST, "hardware": "NVIDIA GeForce RTX 4090", "gpu_index": "0"})
        emit({"kind": "state", "state": "running", "reason": None})
        if len(self.started) > 1:
            return AttemptResult("succeeded", 0, None, None)
        emit({"kind": "health", "samples": [sample(92)]})
        if not stop.wait(30):
            return AttemptResult("failed", 1, "the watchdog did not stop the attempt", None)
        return AttemptResult("interrupted", 143, "stopped", None)

    def shutdown(self) -> None:
        pass


def test_restart_waits_for_the_host_the_attempt_ran_on_to_cool(tmp_path):
    plan = load_plan(tiny_spec(tmp_path, SPEC))
    ledger = Ledger(tmp_path / "ledger.sqlite")
    create_run(ledger, plan, "hosts", tmp_path / "hosts", "remote-host", {"commit": "x", "diff_hash": None}, gpus=1)
    backend = RemoteHostBackend()
    scheduler = Scheduler(ledger, "hosts", plan.study, backend, tmp_path / "hosts", local_gpus=None)
    outcome = {}
    driver = threading.Thread(target=lambda: outcome.setdefault("state", scheduler.run()), daemon=True)
    driver.start()

    wait_for(lambda: ledger.events("hosts", "watchdog.breach"), 30, "the watchdog to stop the hot attempt")
    (arm_run,) = ledger.arm_runs("hosts")
    wait_for(lambda: any(t["to_state"] == "pending" and "watchdog" in (t["reason"] or "")
                         for t in ledger.transitions(arm_run["id"])), 30, "the arm run back to pending")
    time.sleep(2)                               # many scheduler ticks, the cool-down time long past
    assert len(backend.started) == 1, "restarted while the host it ran on was still hot"

    cooled_at = time.time()
    ledger.record_health([sample(60)], "hosts")  # the host's next sample: cool
    driver.join(30)
    assert outcome.get("state") == "finished"
    assert len(backend.started) == 2 and backend.started[1] >= cooled_at
    first, second = ledger.attempts(arm_run["id"])
    assert (first["state"], first["host"], second["state"]) == ("interrupted", HOST, "succeeded")
    assert ledger.arm_run(arm_run["id"])["restarts"] == 1
