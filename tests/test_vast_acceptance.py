"""Acceptance of issue 10 ("safe with a real credit card"), through the real `armature` command line against
the Vast simulator (real vastai SDK, real sshd, real trainers):

* kill -9 of the orchestrator while its instances stand at every stage of an instance's life at once
  (create sent, created, loading, running, pulling, destroying), then what a user does (`armature resume`,
  later Ctrl-C);
* a run through every simulator fault at once (429s, a create answered 502, one answered late, the list
  lagging, the API down, offers gone once rented, an OCI failure, SSH refused a while, a host going offline,
  failing destroys, a host serving hostile file names), ending by itself;
* two ledgers (two ARMATURE_HOMEs, two API keys) on one account: one killed -9 and its instance reaped
  (`armature reap`) while the other trains; neither touches the other's instance.

Every test ends with the same checks (`assert_clean`): no instance left on the account, the simulator's bill
of each ledger's instances at most its max_dollars plus one minute of the dearest instance, and no armature
key on the account (runs attach their key to each instance, never to the account).
"""

from __future__ import annotations

import json
import secrets
import signal
import time
from pathlib import Path

import pytest

from infra.vastsim import Simulator
from infra.vastsim.instances import find_sshd
from orchestrator.backends.vast import VastConfig, make_client, provider
from orchestrator.ledger import Ledger
from tests.armature_helpers import TINY_VQVAE_BASE, armature, ledger, start_armature, tiny_spec, wait_for
from tests.test_vast_backend import ALLOW_DIRTY, Harness

pytestmark = pytest.mark.skipif(find_sshd() is None, reason="OpenSSH sshd is not installed")

API_KEY = "vk-" + secrets.token_hex(20)
SECOND_KEY = "vk-" + secrets.token_hex(20)          # a teammate's key on the same account
DIRTY = ["--allow-dirty"] if ALLOW_DIRTY else []
CHANGED = ["--allow-code-change"] if ALLOW_DIRTY else []     # the tree may be edited while a test runs
LONG = 1_000_000                                    # steps of an arm that trains until it is stopped


def offer(offer_id: int, dph: float) -> dict:
    return {"id": offer_id, "machine_id": offer_id - 3000, "gpu_name": "RTX 4090", "num_gpus": 1,
            "dph_total": dph, "reliability2": 0.99, "boot_delay_s": 0.4}


def spec(sim: Simulator, arms: dict[str, int], max_dollars: float, **vast) -> str:
    """A tiny VQ-VAE study, one arm per entry (name: steps), one instance per arm, on `sim`."""
    settings = dict(server_url=sim.url, min_cuda="null", disk_gb=10, max_dollars_per_hour=10,
                    max_instances=len(arms), ready_deadline_seconds=60, status_poll_seconds=0.2,
                    api_backoff_seconds=0.05, api_deadline_seconds=60, create_timeout_seconds=30,
                    create_lookup_seconds=5, poll_seconds=0.5, pull_checkpoints_every_minutes=0.02,
                    heartbeat_seconds=0.5, health_seconds=0.5, heartbeat_timeout_seconds=30,
                    orchestrator_silence_seconds=300, install_timeout_seconds=60, destroy_deadline_seconds=60,
                    stop_grace_seconds=5, checkpoint_pull_seconds=5, destroy_seconds=5,
                    expected_hours_per_instance=0.02, max_launch_tries=4)
    settings.update(vast)
    arm_lines = "".join(f"  - name: {name}\n    set: {{steps: {steps}}}\n" for name, steps in arms.items())
    vast_lines = "".join(f"  {key}: {value}\n" for key, value in settings.items())
    return (f"name: acceptance\ntrainer: vqvae\nmetric: {{name: recon_mse, mode: min}}\n"
            f"base: {TINY_VQVAE_BASE}\narms:\n{arm_lines}seeds: 1\nresources: {{gpus: 1}}\n"
            f"budget: {{max_dollars: {max_dollars}}}\nbackend: vast\nvast:\n{vast_lines}")


def start(home: Path, tmp_path: Path, sim: Simulator, run_id: str, body: str, key: str = API_KEY):
    path = tiny_spec(tmp_path, body, name=f"{run_id}.yaml")
    return start_armature(home, "ablation", str(path), "--run-id", run_id, "--metrics-port", "-1", *DIRTY,
                          log=tmp_path / f"{run_id}.log", VAST_API_KEY=key)


def wait_while_running(proc, predicate, timeout: float, what: str, log: Path, interval: float = 0.3):
    """wait_for(predicate), failing at once (with the end of its log) when the orchestrator exits first."""
    def reached():
        if proc.poll() is not None:
            raise AssertionError(f"armature exited {proc.returncode} before {what}:\n{log.read_text()[-3000:]}")
        return predicate()
    return wait_for(reached, timeout, what, interval)


def training(home: Path, run_id: str) -> bool:
    return (home / "ledger.sqlite").exists() and any((r["last_step"] or 0) > 0 for r in ledger(home).arm_runs(run_id))


def kill_9(proc) -> None:
    proc.send_signal(signal.SIGKILL)                 # no handler, no atexit, no teardown
    proc.wait(30)


def reap(home: Path, sim: Simulator, key: str = API_KEY):
    result = armature(home, "reap", "--server-url", sim.url, timeout=180, VAST_API_KEY=key)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def ours(sim: Simulator, home: Path) -> list[dict]:
    """The simulator's live instances whose label names the ledger of `home`."""
    prefix = f"armature:{Ledger(home / 'ledger.sqlite').identity()}:"
    return [i for i in sim.instances() if str(i.get("label") or "").startswith(prefix)]


def assert_clean(sim: Simulator, budgets: dict[Path, float]) -> None:
    """No instance on the account; each ledger's bill at most its budget + one minute of its dearest instance;
    no armature key on the account."""
    assert sim.instances() == [], [(i["id"], i["label"], i["actual_status"]) for i in sim.instances()]
    charges = sim.state()["charges"]
    for home, budget in budgets.items():
        prefix = f"armature:{Ledger(home / 'ledger.sqlite').identity()}:"
        lines = [c for c in charges if str(c["metadata"]["label"]).startswith(prefix)]
        assert lines, f"{home}: nothing was rented"
        billed = sum(c["amount"] for c in lines)
        dearest = max(c["metadata"]["dph_total"] for c in lines)
        assert billed <= budget + dearest / 60, f"{home}: billed ${billed:.4f}, budget ${budget}"
        rows = ledger(home).query("SELECT provider_instance_id FROM instances")
        recorded = {r["provider_instance_id"] for r in rows}
        assert {str(c["id"]) for c in lines} <= recorded, "an instance the ledger never recorded"
    assert armature_keys(sim) == [], "armature keys left on the account"


def armature_keys(sim: Simulator) -> list[str]:
    return [k["key"] for k in sim.account_ssh_keys() if "armature-" in k["key"]]


# ---- kill -9 at every stage of an instance's life ------------------------------------------------------

# One offer per stage, cheapest first, so the six launches take them in this order; each offer's faults hold
# its instance at its stage (an instance of a running arm needs none).
STAGES = {
    "create sent": (4001, {"create_answer_after_s": 120}),
    "created": (4002, {"stuck_created": True}),
    "loading": (4003, {"stuck_loading": True}),
    "running": (4004, {}),
    "pulling": (4005, {"slow_sftp_read_s": 0.5}),
    "destroying": (4006, {"preempt_after_s": 4, "destroy_fails": True}),
}


def stages_reached(sim: Simulator, home: Path, run_id: str) -> set[str]:
    """The stages the run's instances stand at now, as the orchestrator sees them (ledger) and the
    provider has them (simulator)."""
    if not (home / "ledger.sqlite").exists():
        return set()
    db = ledger(home)
    live = {str(i["id"]): i for i in sim.instances()}
    labels = {i["label"] for i in live.values()}
    reached = set()
    for row in db.query("SELECT * FROM instances WHERE run_id=?", (run_id,)):
        info = live.get(row["provider_instance_id"])
        if row["provider_instance_id"] is None and row["label"] in labels and row["state"] != "failed_create":
            reached.add("create sent")
        elif info is None:
            continue
        elif row["state"] == "destroying":
            reached.add("destroying")
        elif row["state"] == "booting" and info["actual_status"] in ("created", "loading"):
            reached.add(info["actual_status"])
        elif info["actual_status"] == "running" and sim.sftp_reading(info["id"]):
            reached.add("pulling")
    if any(r["state"] == "running" and (r["last_step"] or 0) > 0 for r in db.arm_runs(run_id)):
        reached.add("running")
    return reached


def test_kill_9_with_instances_at_every_stage_then_resume_leaves_nothing(tmp_path):
    offers = [offer(offer_id, 3.0 + n * 0.1) for n, (offer_id, _) in enumerate(STAGES.values())]
    with Simulator(tmp_path / "sim", api_key=API_KEY, offers=offers) as sim:
        for offer_id, faults in STAGES.values():
            if faults:
                sim.set_faults(offer_id=offer_id, **faults)
        home, budget = tmp_path / "home", 3.0
        body = spec(sim, {f"arm{n}": LONG + n for n in range(len(STAGES))}, budget, ready_deadline_seconds=120,
                    create_timeout_seconds=150, destroy_deadline_seconds=120, max_launch_tries=6)
        proc = start(home, tmp_path, sim, "stages", body)
        seen: set[str] = set()

        def every_stage_at_once() -> bool:
            reached = stages_reached(sim, home, "stages")
            seen.update(reached)
            return reached == set(STAGES)

        try:
            wait_while_running(proc, every_stage_at_once, 150, "an instance at every stage at once", tmp_path /
                               "stages.log", interval=0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; stages seen: {sorted(seen)}") from None
        finally:
            kill_9(proc)
        assert len(sim.instances()) >= len(STAGES), "the instances outlive the orchestrator"
        assert armature_keys(sim) == [], "the run's key is on the account: root on every later instance"

        sim.clear_faults()                  # the provider recovers (destroys succeed again)
        db = ledger(home)
        before = {r["id"] for r in db.query("SELECT id FROM instances WHERE run_id='stages'")}
        steps_at_kill = {r["arm"]: r["last_step"] or 0 for r in db.arm_runs("stages")}
        resumed = start_armature(home, "resume", "stages", "--metrics-port", "-1", *DIRTY, *CHANGED,
                                 log=tmp_path / "resume.log", VAST_API_KEY=API_KEY)

        def settled_and_training_on() -> bool:
            db = ledger(home)
            adopted = {json.loads(e["detail_json"])["instance_id"] for e in db.events("stages", "instance.adopted")}
            old = [r for r in db.query("SELECT * FROM instances WHERE run_id='stages'") if r["id"] in before]
            return all(r["destroyed_at"] is not None or r["id"] in adopted for r in old) and any(
                (r["last_step"] or 0) > steps_at_kill[r["arm"]] for r in db.arm_runs("stages"))

        try:
            wait_while_running(resumed, settled_and_training_on, 120, "the resumed run settling its instances",
                               tmp_path / "resume.log")
            resumed.send_signal(signal.SIGINT)   # the user stops it: it ends by itself, torn down
            assert resumed.wait(120) == 130, (tmp_path / "resume.log").read_text()[-3000:]
        finally:
            if resumed.poll() is None:
                kill_9(resumed)
        db = ledger(home)
        assert db.get_run("stages")["state"] == "interrupted"
        assert db.live_instances("stages") == []
        attempts = [a for r in db.arm_runs("stages") for a in db.attempts(r["id"])]
        never_trained = [a for a in attempts if a["pid"] is None]
        assert never_trained and {a["state"] for a in never_trained} == {"interrupted"}, \
            "an attempt the orchestrator's death cut off before its trainer started used up max_attempts"
        assert_clean(sim, {home: budget})


def test_the_teardown_after_a_kill_during_a_create_waits_for_its_instance_to_show(tmp_path):
    """kill -9 while a create was sent: the ledger row has no instance id, and the provider lists the instance
    only a while later. The teardown (resume, shutdown) used to look its label up once, mark the row
    failed_create and leave the instance billing, unknown to everyone."""
    with Simulator(tmp_path / "sim", api_key=API_KEY, offers=[offer(4401, 0.3)]) as sim:
        db = Ledger(tmp_path / "ledger.sqlite")
        db.create_run("r", name="r", trainer="vqvae", backend="vast", spec_path=None, metric=None,
                      metric_mode=None, baseline=None, budget_dollars=None, git_commit=None, git_diff_hash=None)
        cfg = VastConfig(server_url=sim.url, create_timeout_seconds=1, create_lookup_seconds=2,
                         status_poll_seconds=0.1, api_backoff_seconds=0.05, destroy_deadline_seconds=10)
        client = make_client(sim.url, api_key=API_KEY)
        row = provider.record_intent(db, run_id="r", offer=offer(4401, 0.3), label="")
        label = provider.instance_label(db.identity(), "r", 1) + f":{row}"
        db.update_instance(row, label=label)
        sim.set_faults(list_lag_s=1.5)
        client.create_instance(4401, image="img", disk=10, label=label)   # the answer nobody read
        assert provider.terminate(client, db, cfg, row, reason="the run resumed")
        assert sim.instances() == []
        assert db.instance(row)["state"] == "destroyed"


# ---- every fault at once ----------------------------------------------------------------------------------

def test_a_run_through_every_simulator_fault_ends_clean(tmp_path):
    offers = [offer(offer_id, 3.0 + n * 0.1) for n, offer_id in enumerate(range(4101, 4106))]
    target = tmp_path / "target"                   # where the hostile host's file names point
    target.mkdir()
    with Simulator(tmp_path / "sim", api_key=API_KEY, offers=offers) as sim:
        for each in offers:
            sim.set_faults(offer_id=each["id"], gone_once_rented=True)
        sim.set_faults(offer_id=4101, oci_failure=True)
        sim.set_faults(offer_id=4102, ssh_refused_s=1.0, hostile_sftp=str(target))
        sim.set_faults(offer_id=4103, offline_after_s=3)
        sim.set_faults(rate_limit=30, rate_limit_retry_after=0.1, create_no_such_ask=1, create_then_502=1,
                       create_then_stall=1, create_stall_s=3, list_lag_s=1.0, destroy_fail=3)
        home, budget = tmp_path / "home", 1.0
        body = spec(sim, {"a": 30, "b": 40}, budget, ready_deadline_seconds=20, create_timeout_seconds=1.5,
                    max_launch_tries=6)
        proc = start(home, tmp_path, sim, "faults", body)
        try:
            wait_while_running(proc, sim.instances, 150, "an instance", tmp_path / "faults.log", interval=0.05)
            sim.set_faults(api_down_s=2)           # the API stops answering while instances boot
            assert proc.wait(150) == 0, (tmp_path / "faults.log").read_text()[-3000:]
        finally:
            if proc.poll() is None:
                kill_9(proc)
        db = ledger(home)
        assert {r["arm"]: r["state"] for r in db.arm_runs("faults")} == {"a": "succeeded", "b": "succeeded"}
        assert db.get_run("faults")["state"] == "finished"
        assert db.events("faults", "instance.found_by_label"), "a create answered 502 or late was not looked up"
        assert list(target.iterdir()) == [], "the hostile host wrote outside the run folder"
        assert_clean(sim, {home: budget})


# ---- two ledgers on one account --------------------------------------------------------------------------

def test_two_ledgers_on_one_account_never_destroy_each_others_instances(tmp_path):
    offers = [offer(offer_id, 3.0 + n * 0.1) for n, offer_id in enumerate(range(4201, 4204))]
    with Simulator(tmp_path / "sim", api_key=API_KEY, offers=offers, extra_api_keys=(SECOND_KEY,)) as sim:
        mine, theirs, budget = tmp_path / "mine", tmp_path / "theirs", 1.0
        my_run = start(mine, tmp_path, sim, "mine", spec(sim, {"m": LONG}, budget))
        their_run = start(theirs, tmp_path, sim, "theirs", spec(sim, {"t": LONG}, budget), key=SECOND_KEY)
        try:
            for proc, home, run_id in ((my_run, mine, "mine"), (their_run, theirs, "theirs")):
                wait_while_running(proc, lambda: training(home, run_id), 150, f"{run_id} training",
                                   tmp_path / f"{run_id}.log")
            (their_instance,) = ours(sim, theirs)
            out = reap(theirs, sim, key=SECOND_KEY)      # both alive: nothing is anyone's orphan
            assert out.startswith("no orphaned armature instances") and "left alone" in out, out
        finally:
            kill_9(my_run)
        (my_instance,) = ours(sim, mine)
        out = reap(mine, sim)                            # mine is an orphan now; theirs is not mine to touch
        assert f"destroyed (confirmed): instance {my_instance['id']}" in out, out
        assert f"left alone: instance {their_instance['id']}" in out, out
        assert sim.show_instance(their_instance["id"]) is not None
        steps = ledger(theirs).arm_runs("theirs")[0]["last_step"]
        wait_for(lambda: ledger(theirs).arm_runs("theirs")[0]["last_step"] > steps, 60, "theirs training on")

        their_run.send_signal(signal.SIGINT)             # they stop their run: it ends by itself, torn down
        assert their_run.wait(120) == 130, (tmp_path / "theirs.log").read_text()[-3000:]
        assert ledger(theirs).get_run("theirs")["state"] == "interrupted"
        assert_clean(sim, {mine: budget, theirs: budget})


# ---- the watchdog's cool-down on a rented host ------------------------------------------------------------

def test_an_idle_rented_host_keeps_reporting_its_gpus_for_the_cool_down(tmp_path, monkeypatch):
    """After an attempt ends (a watchdog stop), its instance is kept idle; the scheduler's cool-down reads that
    host's fresh GPU samples from the ledger. Only the attempt used to stream them: after it, none came, and
    the arm restarted at once on the hot machine."""
    monkeypatch.setenv("VAST_API_KEY", API_KEY)
    with Simulator(tmp_path / "sim", api_key=API_KEY, offers=[offer(4301, 0.3)]) as sim:
        harness = Harness(sim, tmp_path, "cool")
        backend = harness.backend()
        hot: dict = {}

        def overheat(event, stop):
            if event["kind"] == "attempt" and not hot:
                hot["id"] = harness.provider_id(event["instance_id"])
                sim.set_gpu(hot["id"], temperature=94)

        result, _ = harness.run(backend, harness.spec(harness.arm("hot")), overheat)
        assert result.outcome == "succeeded", result
        ended = time.time()
        sim.set_gpu(hot["id"], temperature=41)           # cooling while idle: only a new sample can tell

        def idle_sample() -> list[dict]:
            rows = harness.ledger.latest_health(max_age_s=30)
            return [json.loads(r["sample_json"]) for r in rows if r["host"] == f"vast-{hot['id']}" and r["at"] > ended]

        wait_for(lambda: [s for s in idle_sample() if s["temperature_celsius"] == 41], 20,
                 "a GPU sample of the idle instance")
        harness.close("")
        assert_clean(sim, {})
