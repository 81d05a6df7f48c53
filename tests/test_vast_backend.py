"""The vast backend against the Vast simulator: real SDK, real sshd, real paramiko, real git deploy, real trainer.

One simulator serves the module. Every test runs a real `trainers.vqvae` arm (tiny
config) unless it is about launching alone, and ends by checking that no instance
of its run is alive, at the provider or in the ledger, and that the account API key
appears nowhere: not in the ledger, the run folder (pulled files, logs), or log records.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from infra.vastsim import Simulator
from infra.vastsim.instances import find_sshd
from orchestrator.backends.base import AttemptResult, AttemptSpec
from orchestrator.backends.vast import VastBackend, VastConfig, make_client, provider
from orchestrator.backends.remote.attempt import weights_only_refusal
from trainers.common import load_weights_only
from orchestrator.backends.remote.ssh import load_or_create_keypair
from orchestrator.cost.reconcile import _charge_lines, provider_instance_id
from orchestrator.ledger import Ledger
from orchestrator.paths import REPO_ROOT
from tests.armature_helpers import run_ledger, vast_simulator

pytestmark = pytest.mark.skipif(find_sshd() is None, reason="OpenSSH sshd is not installed")

API_KEY = "vk-" + secrets.token_hex(20)          # generated: a literal would sit in the deployed repo
OFFERS = [
    {"id": 3001, "machine_id": 701, "gpu_name": "RTX 4090", "num_gpus": 1, "dph_total": 0.20,
     "reliability2": 0.99, "boot_delay_s": 0.4},
    {"id": 3002, "machine_id": 702, "gpu_name": "RTX 4090", "num_gpus": 1, "dph_total": 0.25,
     "reliability2": 0.99, "boot_delay_s": 0.4},
    {"id": 3003, "machine_id": 703, "gpu_name": "RTX 4090", "num_gpus": 1, "dph_total": 0.30,
     "reliability2": 0.99, "boot_delay_s": 0.4},
    {"id": 3010, "machine_id": 710, "gpu_name": "RTX 4090", "num_gpus": 2, "dph_total": 0.50,
     "reliability2": 0.99, "boot_delay_s": 0.4},
]
TINY = {"steps": 30, "batch_size": 8, "log_every": 5, "eval_every": 30, "checkpoint_every": 10,
        "model": {"channels": 8, "codebook_size": 16, "code_dim": 4}, "data": {"num_train": 64, "num_heldout": 16}}


MASKGIT = {"steps": 10, "batch_size": 8, "log_every": 5, "eval_every": 10, "checkpoint_every": 10,
           "model": {"dim": 16, "depth": 1, "heads": 2}, "eval_samples": 4, "num_inpaint": 4, "decode_steps": 2,
           "data": {"num_train": 64, "num_heldout": 16}, "tokenizer": TINY, "judge": {"steps": 20}}


def longer(steps: int, checkpoint_every: int = 20) -> dict:
    return dict(TINY, steps=steps, eval_every=steps, log_every=10, checkpoint_every=checkpoint_every)


def repo_is_dirty() -> bool:
    out = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain"], capture_output=True, text=True)
    return bool(out.stdout.strip())


ALLOW_DIRTY = repo_is_dirty()        # the tests also run while the tree has uncommitted work


def fast_config(sim: Simulator, **overrides) -> VastConfig:
    values = dict(server_url=sim.url, min_cuda=None, disk_gb=10, ready_deadline_seconds=30, status_poll_seconds=0.2,
                  api_backoff_seconds=0.05, ssh_timeout_seconds=10, ssh_retries=3, poll_seconds=0.4,
                  pull_checkpoints_every_minutes=0.02, heartbeat_seconds=0.5, health_seconds=0.5,
                  heartbeat_timeout_seconds=30, stop_grace_seconds=30, orchestrator_silence_seconds=300,
                  install_timeout_seconds=120,
                  destroy_deadline_seconds=30, idle_destroy_seconds=300)
    values.update(overrides)
    return VastConfig(**values)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    with vast_simulator(tmp_path_factory.mktemp("vastsim"), API_KEY, OFFERS, export_key=True) as simulator:
        yield simulator


class Harness:
    """One run in a fresh ledger: backends, arm runs, attempts, and the checks every test ends with."""

    def __init__(self, sim: Simulator, root: Path, run_id: str):
        self.sim, self.root, self.run_id = sim, root, run_id
        self.ledger = run_ledger(root / "ledger.sqlite", run_id, trainer="vqvae")
        self.run_dir = root / run_id
        self.backends: list[VastBackend] = []

    def backend(self, budget: float | None = None, repo_root: Path = REPO_ROOT, **overrides) -> VastBackend:
        backend = VastBackend(self.ledger, self.run_id, self.run_dir, fast_config(self.sim, **overrides), budget,
                              allow_dirty=ALLOW_DIRTY, repo_root=repo_root)
        backend.start()
        self.backends.append(backend)
        return backend

    def arm(self, name: str, config: dict = TINY, gpus: float = 1) -> int:
        return self.ledger.add_arm_run(self.run_id, arm=name, seed=0, kind="arm", config=config, config_hash=name,
                                       out_dir=str(self.run_dir / name / "seed0"), total_steps=config["steps"],
                                       gpus=gpus, cpus=1, gpu_memory_gb=None)

    def spec(self, arm_run_id: int, adopt_attempt: int | None = None, trainer: str = "vqvae",
             upstream_dirs: dict | None = None) -> AttemptSpec:
        arm = self.ledger.arm_run(arm_run_id)
        attempt_id = adopt_attempt or self.ledger.start_attempt(arm_run_id, backend="vast")
        return AttemptSpec(run_id=self.run_id, arm_run_id=arm_run_id, attempt_id=attempt_id, arm=arm["arm"], seed=0,
                           trainer=trainer, config=json.loads(arm["config_json"]), out_dir=arm["out_dir"],
                           gpus=arm["gpus"], cpus=1, adopt=adopt_attempt is not None,
                           upstream_dirs=upstream_dirs or {})

    def run(self, backend: VastBackend, spec: AttemptSpec, on_event=None, stop: threading.Event | None = None):
        """run_attempt, recording events into the ledger as the scheduler does; (result, events)."""
        events: list[dict] = []
        stop = stop or threading.Event()

        def emit(event: dict) -> None:
            events.append(event)
            if event["kind"] == "attempt":
                self.ledger.update_attempt(spec.attempt_id, **{k: v for k, v in event.items() if k != "kind"})
            elif event["kind"] == "metrics":
                self.ledger.record_metrics(spec.arm_run_id, spec.attempt_id, event["rows"])
            if on_event is not None:
                on_event(event, stop)

        result = backend.run_attempt(spec, emit, stop)
        self.ledger.end_attempt(spec.attempt_id, result.outcome, exit_code=result.exit_code, reason=result.reason,
                                end_step=result.end_step)
        return result, events

    def provider_id(self, ledger_instance_id: int) -> int:
        return int(self.ledger.instance(ledger_instance_id)["provider_instance_id"])

    def ours(self, instances: list[dict]) -> list[dict]:
        prefix = f"armature:{self.ledger.identity()}:{self.run_id}:"
        return [i for i in instances if str(i.get("label") or "").startswith(prefix)]

    def ours_alive_at_provider(self) -> list[dict]:
        return self.ours(self.sim.instances())

    def close(self, log_text: str) -> None:
        for backend in self.backends:
            backend.shutdown()
        assert self.ledger.live_instances(self.run_id) == []
        assert self.ours_alive_at_provider() == []
        rented = {str(i["id"]) for i in self.ours(self.sim.instances(include_destroyed=True))}
        recorded = {r["provider_instance_id"] for r in self.ledger.query("SELECT * FROM instances WHERE run_id=?",
                                                                         (self.run_id,))}
        assert rented <= recorded, f"instances the ledger never knew: {sorted(rented - recorded)}"
        assert_no_secret(self.ledger, self.root, log_text)


def assert_no_secret(ledger: Ledger, root: Path, log_text: str) -> None:
    dump = {table: ledger.query(f"SELECT * FROM {table}")
            for table in ("runs", "arm_runs", "attempts", "events", "instances", "charges", "metrics", "transitions")}
    assert API_KEY not in json.dumps(dump, default=str)
    for path in root.rglob("*"):
        if path.is_file():
            assert API_KEY.encode() not in path.read_bytes(), f"the API key leaked into {path}"
    assert API_KEY not in log_text


@pytest.fixture
def harness(sim, tmp_path, request, caplog):
    caplog.set_level("DEBUG")
    run_id = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40]
    h = Harness(sim, tmp_path, run_id)
    yield h
    sim.clear_faults()
    h.close(caplog.text)


def processes_with(needle: bytes) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as handle:
                    if needle in handle.read():
                        found.append(int(entry.name))
            except OSError:
                pass
    return found


def environ_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as handle:
        items = handle.read().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in items if b"=" in item)


def trainers_on(sim: Simulator, provider_id: int) -> list[int]:
    pids = []
    for pid in sim.instance_pids(provider_id):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                cmdline = handle.read()
        except OSError:
            continue
        if b"trainers.vqvae" in cmdline and b"supervisor.py" not in cmdline:
            pids.append(pid)
    return pids


def checkpoint_step(path: Path) -> int:
    """The step of a pulled checkpoint, read the way the orchestrator accepts it (weights only)."""
    assert weights_only_refusal(path) is None
    return int(load_weights_only(path)["step"])


# ---- the tests ------------------------------------------------------------------------------------

def test_happy_path_deploys_runs_pulls_and_destroys(harness, sim):
    backend = harness.backend()
    spec = harness.spec(harness.arm("happy"))
    seen: dict = {}

    def on_event(event, stop):
        if event["kind"] == "attempt" and "checked" not in seen:
            seen["checked"] = True
            provider_id = harness.provider_id(event["instance_id"])
            sim.set_gpu(provider_id, temperature=94, throttle_reasons=0x40)       # overheating
            for pid in processes_with(API_KEY.encode()):                           # no process argument holds it
                raise AssertionError(f"the API key is in the arguments of pid {pid}")
            for pid in sim.instance_pids(provider_id):                             # nor any instance environment
                try:
                    assert API_KEY not in json.dumps(environ_of(pid))
                except OSError:
                    pass
            seen["provider_id"] = provider_id

    result, events = harness.run(backend, spec, on_event)
    assert result.outcome == "succeeded", result
    assert result.end_step == 30

    kinds = [e["kind"] for e in events]
    states = [e["state"] for e in events if e["kind"] == "state"]
    assert states == ["provisioning", "deploying", "running", "collecting"]
    rows = [r for e in events if e["kind"] == "metrics" for r in e["rows"]]
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    attempt = next(e for e in events if e["kind"] == "attempt")
    assert attempt["gpu_index"] == "0" and attempt["hardware"] == "RTX 4090" and attempt["pid"]
    hot = [s for e in events if e["kind"] == "health" for s in e["samples"] if s["temperature_celsius"] == 94]
    assert hot and hot[-1]["throttle_reasons"] == 0x40 and hot[-1]["host"] == f"vast-{seen['provider_id']}"
    assert "health" in kinds

    out = Path(spec.out_dir)
    assert checkpoint_step(out / "checkpoints" / "last.pt") == 30
    assert json.loads((out / "summary.json").read_text())["steps"] == 30
    assert (out / "artifact.pt").exists() and list((out / "samples").iterdir())
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [5, 10, 15,
                                                                                                      20, 25, 30]
    assert "step 30" in (out / "log").read_text()

    # The instance is kept for the next arm until shutdown; then destroyed, confirmed.
    (row,) = harness.ledger.query("SELECT * FROM instances WHERE run_id=?", (harness.run_id,))
    assert row["destroyed_at"] is None and row["state"] == "ready"
    assert row["label"] == f"armature:{harness.ledger.identity()}:{harness.run_id}:{spec.attempt_id}:{row['id']}"
    assert row["host_key"].startswith("ssh-ed25519 ") and row["ready_at"] >= row["created_at"]
    backend.shutdown()
    row = harness.ledger.instance(row["id"])
    assert row["state"] == "destroyed" and row["destroyed_at"] >= row["destroy_requested_at"]
    assert sim.show_instance(int(row["provider_instance_id"])) is None
    (deploy,) = harness.ledger.events(harness.run_id, "instance.deploy")
    head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert json.loads(deploy["detail_json"])["commit"] == head.strip()
    attempt_row = harness.ledger.attempts(spec.arm_run_id)[0]
    assert attempt_row["instance_id"] == row["id"] and attempt_row["gpu_index"] == "0"


def test_launch_faults_are_survived(harness, sim):
    """429s, offer gone (404), a create that rents but answers 502 (the list lagging behind), stuck in loading
    (deadline -> next offer), SSH refused a while, destroy failing."""
    sim.set_faults(offer_id=3001, stuck_loading=True)
    sim.set_faults(offer_id=3002, ssh_refused_s=2.5)
    sim.set_faults(rate_limit=4, create_no_such_ask=1, create_then_502=1, list_lag_s=0.5, destroy_fail=3)
    backend = harness.backend(ready_deadline_seconds=6)
    spec = harness.spec(harness.arm("faults"))
    result, events = harness.run(backend, spec)
    assert result.outcome == "succeeded", result
    rows = harness.ledger.query("SELECT * FROM instances WHERE run_id=? ORDER BY id", (harness.run_id,))
    assert [r["offer_id"] for r in rows] == ["3001", "3001", "3002"]
    assert rows[0]["state"] == "failed_create" and rows[0]["provider_instance_id"] is None      # 404: nothing rented
    assert rows[1]["destroyed_at"] is not None and "not ready after 6s" in rows[1]["reason"]   # stuck: destroyed
    (found,) = harness.ledger.events(harness.run_id, "instance.found_by_label")               # its create: 502
    assert json.loads(found["detail_json"])["instance_id"] == rows[1]["id"]
    assert "loading" in rows[1]["reason"]
    assert rows[2]["ready_at"] is not None
    assert harness.ledger.events(harness.run_id, "instance.destroy_retry"), "destroy failures were retried"
    assert "701" in backend.excluded_machines
    backend.shutdown()
    assert harness.ledger.instance(rows[2]["id"])["destroyed_at"] is not None


def test_preempted_attempt_resumes_from_pulled_checkpoint(harness, sim):
    backend = harness.backend(pull_checkpoints_every_minutes=0.005)       # a pull at every poll
    arm = harness.arm("preempt", longer(600))
    first = harness.spec(arm)
    checkpoint = Path(first.out_dir) / "checkpoints" / "last.pt"
    preempted: dict = {}

    def preempt_after_a_pulled_checkpoint(event, stop):
        if event["kind"] == "attempt":
            preempted["instance"] = event["instance_id"]
        if event["kind"] == "metrics" and event["rows"][-1]["step"] >= 40 and checkpoint.exists() \
                and "done" not in preempted:
            preempted["done"] = True
            sim.preempt(harness.provider_id(preempted["instance"]))

    result, _ = harness.run(backend, first, preempt_after_a_pulled_checkpoint)
    assert result.outcome == "preempted", result
    assert "exited" in result.reason
    resume_step = checkpoint_step(checkpoint)
    assert resume_step >= 20
    assert harness.ledger.instance(preempted["instance"])["destroyed_at"] is not None

    second = harness.spec(arm)
    result, events = harness.run(backend, second)
    assert result.outcome == "succeeded", result
    assert result.end_step == 600
    rows = [r for e in events if e["kind"] == "metrics" for r in e["rows"]]
    assert rows[0]["step"] > resume_step
    out = Path(second.out_dir)
    assert re.search(rf"resumed from \S+ at step {resume_step}\b", (out / "log").read_text())
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 600
    instances = harness.ledger.query("SELECT machine_id FROM instances WHERE run_id=? ORDER BY id", (harness.run_id,))
    assert instances[0]["machine_id"] != instances[1]["machine_id"]


def test_packing_two_arms_on_two_gpus_then_reuse(harness, sim):
    backend = harness.backend(gpu_name="RTX 4090", num_gpus=2)
    specs = [harness.spec(harness.arm(name)) for name in ("pack-a", "pack-b")]
    results: dict = {}
    environments: dict = {}

    def record_environment(event, stop):
        if event["kind"] == "attempt":
            environments[event["gpu_index"]] = environ_of(event["pid"]).get("CUDA_VISIBLE_DEVICES")

    def run(spec):
        results[spec.arm] = harness.run(backend, spec, record_environment)

    threads = [threading.Thread(target=run, args=(spec,)) for spec in specs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    assert {arm: r[0].outcome for arm, r in results.items()} == {"pack-a": "succeeded", "pack-b": "succeeded"}
    attempts = {arm: next(e for e in r[1] if e["kind"] == "attempt") for arm, r in results.items()}
    assert sorted(a["gpu_index"] for a in attempts.values()) == ["0", "1"]
    assert environments == {"0": "0", "1": "1"}
    assert len({a["instance_id"] for a in attempts.values()}) == 1
    for arm, (_, events) in results.items():
        gpus = {s["gpu"] for e in events if e["kind"] == "health" for s in e["samples"]}
        assert gpus == {attempts[arm]["gpu_index"]}

    # The next arm reuses the instance: a MaskGIT whose tokenizer is pack-a's artifact, uploaded as upstream.
    tokenizer = specs[0].out_dir
    third = harness.spec(harness.arm("pack-c", MASKGIT), trainer="maskgit", upstream_dirs={"tokenizer_dir": tokenizer})
    result, events = harness.run(backend, third)
    assert result.outcome == "succeeded", result
    log = (Path(third.out_dir) / "log").read_text()
    assert "training the tokenizer" not in log and "no artifact.pt" not in log
    assert json.loads((Path(third.out_dir) / "config.json").read_text())["tokenizer_dir"] == tokenizer
    reused = next(e for e in events if e["kind"] == "attempt")
    assert reused["instance_id"] == attempts["pack-a"]["instance_id"]
    assert len(harness.ledger.query("SELECT id FROM instances WHERE run_id=?", (harness.run_id,))) == 1
    assert len(harness.ledger.events(harness.run_id, "instance.deploy")) == 1


def test_failed_dependency_install_fails_the_attempt_with_the_log_tail(harness, tmp_path):
    repo = tmp_path / "project"
    (repo / "infra" / "remote").mkdir(parents=True)
    (repo / "infra" / "remote" / "supervisor.py").write_bytes(
        (REPO_ROOT / "infra" / "remote" / "supervisor.py").read_bytes())
    (repo / "requirements-trainer.txt").write_text("numpy\nthis is not a requirement ===\n")
    for args in (["init", "-q"], ["add", "."], ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "x"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True)
    backend = harness.backend(repo_root=repo)
    result, _ = harness.run(backend, harness.spec(harness.arm("broken-deps")))
    assert result.outcome == "failed"
    assert "install dependencies failed on the host" in result.reason
    assert "Invalid requirement" in result.reason or "this is not a requirement" in result.reason
    (row,) = harness.ledger.query("SELECT * FROM instances WHERE run_id=?", (harness.run_id,))
    assert row["destroyed_at"] is not None and row["reason"].startswith("deploy failed")


def test_budget_refuses_a_launch_that_would_cross_it(harness):
    backend = harness.backend(budget=0.01, expected_hours_per_instance=1.0)
    result, events = harness.run(backend, harness.spec(harness.arm("poor")))
    assert result.outcome == "cancelled"
    assert result.reason.startswith("budget:") and "over the budget of $0.01" in result.reason
    assert harness.ledger.query("SELECT id FROM instances WHERE run_id=?", (harness.run_id,)) == []


def test_budget_reached_while_running_checkpoints_and_stops(harness):
    backend = harness.backend(budget=100.0)
    spec = harness.spec(harness.arm("spender", longer(5000)))
    checkpoint = Path(spec.out_dir) / "checkpoints" / "last.pt"

    def spend_it_all(event, stop):
        if event["kind"] == "metrics" and event["rows"][-1]["step"] >= 40 and backend.budget.dollars == 100.0:
            backend.budget.dollars = backend.budget.spent()        # the spend has now reached the budget

    result, _ = harness.run(backend, spec, spend_it_all)
    assert result.outcome == "cancelled", result
    assert re.fullmatch(r"budget: spent \$\d+\.\d\d of \$\d+\.\d\d", result.reason)
    assert result.exit_code == 143
    assert checkpoint_step(checkpoint) >= 40
    assert len(harness.ledger.events(harness.run_id, "budget.stop")) == 1


def test_changed_host_key_is_refused(harness, sim):
    backend = harness.backend()
    spec = harness.spec(harness.arm("mitm", longer(5000)))

    def swap_host_key(event, stop):
        if event["kind"] == "attempt":
            sim.change_host_key(harness.provider_id(event["instance_id"]))
            backend.pool.find(event["instance_id"]).conn.close()        # force a fresh connection

    result, _ = harness.run(backend, spec, swap_host_key)
    assert result.outcome == "lost"
    assert "host key" in result.reason and "changed" in result.reason and "refusing" in result.reason
    assert harness.ledger.events(harness.run_id, "instance.host_key_changed")
    (row,) = harness.ledger.query("SELECT * FROM instances WHERE run_id=?", (harness.run_id,))
    assert row["destroyed_at"] is not None


CHILD = r"""
import json, sys, threading
sys.path.insert(0, sys.argv[2])
from orchestrator.backends.base import AttemptResult, AttemptSpec
from orchestrator.backends.vast import VastBackend, VastConfig, make_client, provider
from orchestrator.backends.remote.ssh import load_or_create_keypair
from orchestrator.ledger import Ledger
args = json.loads(sys.argv[1])
ledger = Ledger(args["ledger"])
backend = VastBackend(ledger, args["run_id"], args["run_dir"], VastConfig(**args["cfg"]), None,
                      allow_dirty=args["allow_dirty"])
backend.start()
spec = AttemptSpec(**args["spec"])
def emit(event):
    if event["kind"] == "attempt":
        ledger.update_attempt(spec.attempt_id, **{k: v for k, v in event.items() if k != "kind"})
    elif event["kind"] == "metrics":
        ledger.record_metrics(spec.arm_run_id, spec.attempt_id, event["rows"])
        print("STEP", event["rows"][-1]["step"], flush=True)
backend.run_attempt(spec, emit, threading.Event())
"""


def test_adopt_after_kill_continues_without_a_second_trainer(harness, sim):
    arm = harness.arm("adopt", longer(5000))
    spec = harness.spec(arm)
    args = {"ledger": str(harness.root / "ledger.sqlite"), "run_id": harness.run_id, "run_dir": str(harness.run_dir),
            "cfg": fast_config(sim).model_dump(), "allow_dirty": ALLOW_DIRTY, "spec": spec.__dict__}
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args), str(REPO_ROOT)], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 120
        for line in child.stdout:
            if line.startswith("STEP") or time.monotonic() > deadline:
                break
    finally:
        os.kill(child.pid, signal.SIGKILL)                # the orchestrator dies, nothing is cleaned up
        child.wait()
    attempt = harness.ledger.attempts(arm)[0]
    assert attempt["instance_id"] is not None and attempt["ended_at"] is None
    provider_id = harness.provider_id(attempt["instance_id"])
    assert len(trainers_on(sim, provider_id)) == 1

    backend = harness.backend()                               # a new orchestrator: same run, same ledger
    adopted = harness.spec(arm, adopt_attempt=spec.attempt_id)
    counted: dict = {}

    def count_trainers_then_stop(event, stop):
        if event["kind"] == "metrics" and "trainers" not in counted:
            counted["trainers"] = len(trainers_on(sim, provider_id))
            counted["step"] = event["rows"][-1]["step"]
            stop.set()

    result, events = harness.run(backend, adopted, count_trainers_then_stop)
    assert counted["trainers"] == 1
    assert result.outcome == "interrupted", result
    assert result.exit_code == 143
    assert next(e for e in events if e["kind"] == "attempt")["instance_id"] == attempt["instance_id"]
    assert checkpoint_step(Path(spec.out_dir) / "checkpoints" / "last.pt") >= counted["step"] - 20
    assert len(harness.ledger.query("SELECT id FROM instances WHERE run_id=?", (harness.run_id,))) == 1


def test_resumed_run_adopts_its_idle_instance_and_destroys_it_when_idle_too_long(harness, sim):
    cfg = fast_config(sim)
    key = load_or_create_keypair(harness.run_dir / ".vast" / "id_ed25519", "previous orchestrator")
    client = make_client(sim.url)
    provider.register_ssh_key(client, cfg, key.public_line)
    offer = next(o for o in provider.search_offers(client, cfg) if o["id"] == 3003)
    instance_id = provider.launch(client, harness.ledger, cfg, run_id=harness.run_id, offer=offer,
                                  label=f"armature:{harness.run_id}:0", public_key=key.public_line, env={})
    provider.wait_ready(client, harness.ledger, cfg, instance_id, key, threading.Event())

    harness.backend(idle_destroy_seconds=1.0)               # the run resumes: its instance is found, idle
    (adopted,) = harness.ledger.events(harness.run_id, "instance.adopted")
    assert json.loads(adopted["detail_json"])["instance_id"] == instance_id
    deadline = time.monotonic() + 30
    while harness.ledger.instance(instance_id)["destroyed_at"] is None:
        assert time.monotonic() < deadline, "the idle instance was not destroyed"
        time.sleep(0.2)
    assert "idle for 1s" in harness.ledger.instance(instance_id)["reason"]


def test_adopt_of_a_vanished_instance_is_lost(harness, sim):
    backend = harness.backend()
    arm = harness.arm("vanished")
    attempt_id = harness.ledger.start_attempt(arm, backend="vast")
    instance_id = harness.ledger.add_instance(run_id=harness.run_id, provider="vast", label="armature:x:1")
    harness.ledger.update_attempt(attempt_id, instance_id=instance_id, gpu_index="0", pid=4242)   # trainer ran
    harness.ledger.update_instance(instance_id, state="failed_create")
    result, _ = harness.run(backend, harness.spec(arm, adopt_attempt=attempt_id))
    assert result.outcome == "lost" and "gone" in result.reason


# ---- the budget as a hard cap ---------------------------------------------------------------------------

DOLLAR_OFFERS = [{"id": 3100 + n, "machine_id": 800 + n, "gpu_name": "A100 SXM4", "num_gpus": 1, "dph_total": 1.0,
                  "reliability2": 0.99, "boot_delay_s": 0.4} for n in range(4)]


def test_budget_counts_what_running_instances_will_cost_before_each_launch(harness, sim):
    """$5, four $1/h offers, 2 h expected per instance: each launch commits $2 + boot and teardown, so two fit
    and the other two arms are refused before renting anything (all four used to launch)."""
    for offer in DOLLAR_OFFERS:
        sim.add_offer(offer)
    try:
        backend = harness.backend(budget=5.0, gpu_name="A100 SXM4", expected_hours_per_instance=2.0)
        specs = [harness.spec(harness.arm(f"four-{n}")) for n in range(4)]
        results: dict = {}

        def stop_once_running(event, stop):
            if event["kind"] == "attempt":
                stop.set()

        threads = [threading.Thread(target=lambda s=s: results.__setitem__(s.arm, harness.run(
            backend, s, stop_once_running)[0])) for s in specs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        for offer in DOLLAR_OFFERS:
            sim.remove_offer(offer["id"])
    refused = [r for r in results.values() if r.outcome == "cancelled"]
    assert len(results) == 4 and len(refused) == 2, {a: (r.outcome, r.reason) for a, r in results.items()}
    assert all(r.reason.startswith("budget:") and "committed to running instances" in r.reason for r in refused)
    rented = harness.ledger.query("SELECT * FROM instances WHERE run_id=?", (harness.run_id,))
    assert len(rented) == 2
    reserve = backend.budget.new_instance_seconds / 3600          # one instance, boot to destroyed, at $1/h
    assert 2 < reserve < 2.5 and 2 * reserve <= 5.0 < 3 * reserve


def test_a_small_budget_stops_in_time_for_the_teardown_to_finish_under_it(harness, sim):
    """A budget that pays for ~20 s of one instance: the arm is stopped early enough that the provider's bill,
    destroy included, stays under the cap; the dead-man switch is armed with a silence the budget pays for."""
    cfg = dict(ready_deadline_seconds=5, install_timeout_seconds=5, stop_grace_seconds=3, checkpoint_pull_seconds=1,
               destroy_seconds=1, expected_hours_per_instance=2 / 3600, keep_instances=True)
    dph = OFFERS[0]["dph_total"]
    budget = dph * (10 + 2 + 4 * 0.4 + 3 + 1 + 1) / 3600
    started = time.time()
    backend = harness.backend(budget=budget, **cfg)
    spec = harness.spec(harness.arm("capped", longer(100000)))
    result, _ = harness.run(backend, spec)
    assert result.outcome == "cancelled" and result.reason.startswith("budget:"), result
    (row,) = harness.ledger.query("SELECT * FROM instances WHERE run_id=?", (harness.run_id,))
    assert row["destroyed_at"] is not None, "a budget stop destroys the instance at once (nothing may run on it)"
    billed = [line for line in _charge_lines(backend.client, int(started) - 5, int(time.time()) + 5)
              if provider_instance_id(line) == row["provider_instance_id"]]
    assert len(billed) == 1 and billed[0]["end"] <= time.time()
    assert billed[0]["amount"] <= budget, f"billed ${billed[0]['amount']:.6f}, budget ${budget:.6f}"
    (armed,) = harness.ledger.events(harness.run_id, "instance.dead_man_switch")
    silence = json.loads(armed["detail_json"])["silence_seconds"]
    assert cfg["install_timeout_seconds"] < silence <= budget / dph * 3600 < 300     # 300: the configured silence


def test_no_metrics_row_is_lost_when_a_pulled_checkpoint_is_ahead_of_the_rows_read(harness, sim, monkeypatch):
    """A checkpoint pull that sees a newer last.pt than the metrics rows read so far (a slow poll), then the
    instance's host key changes before the next poll (refused: nothing more is read from it): the rows up to the
    checkpoint must have been read before it was accepted, or the attempt resumed from it on another instance
    leaves a gap in the curve."""
    from orchestrator.backends.remote.attempt import RemoteAttempt

    backend = harness.backend(pull_checkpoints_every_minutes=0.005)
    arm = harness.arm("gapless", longer(600))
    first = harness.spec(arm)
    checkpoint = Path(first.out_dir) / "checkpoints" / "last.pt"
    seen: dict = {}
    real_pull = RemoteAttempt.pull_checkpoint

    def remote_steps(remote) -> list[int]:
        path = Path(remote.work) / "out" / "metrics.jsonl"
        return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]

    def pull_while_the_trainer_runs_ahead(remote, *args, **kwargs):
        if "cut_off" in seen or remote.last_step is None or remote.last_step < 40:
            return real_pull(remote, *args, **kwargs)
        deadline = time.monotonic() + 20                   # the trainer gets 30 steps ahead of the rows read
        while max(remote_steps(remote), default=0) < remote.last_step + 30 and time.monotonic() < deadline:
            time.sleep(0.05)
        pulled = real_pull(remote, *args, **kwargs)
        if pulled:                                         # the host's key changes: no poll gets through again
            seen["cut_off"] = checkpoint_step(checkpoint)
            sim.change_host_key(harness.provider_id(seen["instance"]))
            backend.pool.find(seen["instance"]).conn.close()
        return pulled

    def note_instance(event, stop):
        if event["kind"] == "attempt":
            seen["instance"] = event["instance_id"]

    monkeypatch.setattr(RemoteAttempt, "pull_checkpoint", pull_while_the_trainer_runs_ahead)
    result, _ = harness.run(backend, first, note_instance)
    assert result.outcome == "lost" and "host key" in result.reason, result
    assert seen["cut_off"] >= 60

    result, _ = harness.run(backend, harness.spec(arm))
    assert result.outcome == "succeeded", result
    steps = [json.loads(line)["step"] for line in (Path(first.out_dir) / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(10, 601, 10)), f"rows missing: {sorted(set(range(10, 601, 10)) - set(steps))}"
    recorded = [r["step"] for r in harness.ledger.metric_rows(arm)]
    assert sorted(set(recorded)) == list(range(10, 601, 10))


def test_max_instances_counts_instances(harness, sim):
    """max_instances: 1 with two arms at once (one GPU each, so one arm per instance): the second arm waits for
    the first one's instance instead of renting a second (the pool used to count only arms)."""
    backend = harness.backend(max_instances=1, arms_per_instance=2)
    assert backend.max_concurrent(1, 1) == 1              # arms_per_instance is capped by the GPUs (1)
    specs = [harness.spec(harness.arm(name)) for name in ("cap-a", "cap-b")]
    results: dict = {}
    threads = [threading.Thread(target=lambda s=s: results.__setitem__(s.arm, harness.run(backend, s)[0]))
               for s in specs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    assert {arm: r.outcome for arm, r in results.items()} == {"cap-a": "succeeded", "cap-b": "succeeded"}
    assert len(harness.ledger.query("SELECT id FROM instances WHERE run_id=?", (harness.run_id,))) == 1


class RecordingBackend:
    """A backend of this test's own: records which attempts it is asked to run, in order; each succeeds."""

    name = "recording"

    def __init__(self):
        self.order: list[tuple[str, bool]] = []

    def run_attempt(self, spec, emit, stop):
        self.order.append((spec.arm, spec.adopt))
        emit({"kind": "state", "state": "running", "reason": None})
        emit({"kind": "state", "state": "collecting", "reason": None})
        return AttemptResult("succeeded", 0, None, None)


def test_a_resumed_run_launches_its_adopted_attempts_first(tmp_path):
    """After a resume the attempt still running on its instance is reattached before any pending arm takes the
    only slot (max_instances: 1); else it went unpolled until the dead-man switch destroyed its instance."""
    from orchestrator.runs import create_run
    from orchestrator.scheduler import Scheduler
    from orchestrator.spec import load_plan
    from tests.armature_helpers import TINY_VQVAE_BASE, tiny_spec

    plan = load_plan(tiny_spec(tmp_path, f"""name: adopt
trainer: vqvae
metric: {{name: recon_mse, mode: min}}
base: {TINY_VQVAE_BASE}
arms:
  - name: first
    set: {{batch_size: 8}}
  - name: second
    set: {{batch_size: 4}}
seeds: 1
"""))
    ledger = Ledger(tmp_path / "ledger.sqlite")
    create_run(ledger, plan, "adopt", tmp_path / "adopt", "recording", {"commit": "x", "diff_hash": None}, gpus=1)
    arm_runs = {r["arm"]: r for r in ledger.arm_runs("adopt") if r["kind"] == "arm"}
    running = ledger.start_attempt(arm_runs["second"]["id"], backend="recording")
    backend = RecordingBackend()
    scheduler = Scheduler(ledger, "adopt", plan.study, backend, tmp_path / "adopt", local_gpus=None,
                          max_concurrent=1)
    scheduler.adopt = {arm_runs["second"]["id"]: ledger.query_one("SELECT * FROM attempts WHERE id=?", (running,))}
    assert scheduler.run() == "finished"
    assert [arm for arm, _ in backend.order if arm in ("first", "second")][:2] == ["second", "first"]
    assert ("second", True) in backend.order
