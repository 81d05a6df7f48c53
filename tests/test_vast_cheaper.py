"""Cheaper studies (issue 13) through the vast backend against the simulator: interruptible bids billed at the bid and
reconciled with the charges, an outbid arm that waits for its instance and continues on it, offer failover within one
search, idle paid GPUs stopped as waste, the plan's ranked offers, and the cost model's storage.

The harness (run, checks at teardown: nothing alive, no leaked key) is test_vast_backend's; the simulator here has
its own market: a cheap interruptible machine (capacity 1, so a rival bid stops ours) and dearer ones.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator.backends.vast import make_client
from orchestrator.backends.vast.offers import EXCLUDED_EVENT
from orchestrator.backends.vast.outbid import OUTBID_EVENT
from orchestrator.cost.command import cost_command
from orchestrator.cost.model import MONTH_HOURS, cost_lines, current_spend
from orchestrator.cost.reconcile import (STATUS_EVENT, bill_breakdown, expected_bill, fetch_provider_charges,
                                         reconcile, status_changes)
from orchestrator.planview import vast_offer_lines
from tests.armature_helpers import vast_simulator
from tests.test_vast_backend import API_KEY, checkpoint_step, harness, longer  # noqa: F401 (harness: a fixture)

STORAGE_COST = 0.15            # $/GB/month, the simulator's default
OFFERS = [   # by $/reliable hour: 5001 (bid 0.15), 5002 (0.30 / 0.375 as a bid), 5003 (0.40 / 0.5)
    {"id": 5001, "machine_id": 901, "gpu_name": "RTX 4090", "num_gpus": 1, "dph_total": 0.24, "min_bid": 0.12,
     "reliability2": 0.99, "boot_delay_s": 0.4, "capacity": 1},
    {"id": 5002, "machine_id": 902, "gpu_name": "RTX 4090", "num_gpus": 1, "dph_total": 0.30, "min_bid": 0.30,
     "reliability2": 0.99, "boot_delay_s": 0.4},
    {"id": 5003, "machine_id": 903, "gpu_name": "RTX 4090", "num_gpus": 1, "dph_total": 0.40, "min_bid": 0.40,
     "reliability2": 0.99, "boot_delay_s": 0.4},
]


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    with vast_simulator(tmp_path_factory.mktemp("vastsim"), API_KEY, OFFERS, export_key=True) as simulator:
        yield simulator


def events(harness, kind: str) -> list[dict]:
    return [json.loads(e["detail_json"]) for e in harness.ledger.events(harness.run_id, kind)]


def instances(harness) -> list[dict]:
    return harness.ledger.query("SELECT * FROM instances WHERE run_id=? ORDER BY id", (harness.run_id,))


def test_an_outbid_arm_waits_for_its_instance_continues_on_it_and_is_billed_the_bid(harness, sim):
    # quick polls and no SSH retries: the outbid is seen (and dated) within a fraction of a second
    backend = harness.backend(interruptible=True, outbid_wait_minutes=0.5, pull_checkpoints_every_minutes=0.005,
                              poll_seconds=0.2, ssh_retries=1)
    arm = harness.arm("outbid", longer(1000, checkpoint_every=20))
    first = harness.spec(arm)
    checkpoint = Path(first.out_dir) / "checkpoints" / "last.pt"
    outbid: dict = {}

    def rival_bid_then_leave(event, stop):
        if event["kind"] == "metrics" and event["rows"][-1]["step"] >= 40 and checkpoint.exists() and not outbid:
            outbid["done"] = True
            sim.compete(5001, bids=[0.2])                          # outbids our 0.15
            threading.Timer(1.5, sim.compete, args=(5001,)).start()  # the rival leaves: ours may resume

    result, _ = harness.run(backend, first, rival_bid_then_leave)
    assert result.outcome == "preempted", result
    assert "outbid and resumed" in result.reason
    (decision,) = events(harness, OUTBID_EVENT)
    assert decision["action"] == "wait" and decision["wait_dollars"] < decision["move_dollars"]
    assert decision["own_rate"] == 0.15 and decision["best_rate"] == 0.375
    resume_step = checkpoint_step(checkpoint)

    second = harness.spec(arm)
    result, events_ = harness.run(backend, second)
    assert result.outcome == "succeeded", result
    assert result.end_step == 1000
    rows = [r for e in events_ if e["kind"] == "metrics" for r in e["rows"]]
    assert rows[0]["step"] > resume_step                           # continued, not started over
    (row,) = instances(harness)                                    # on the same instance: nothing else rented
    assert [a["instance_id"] for a in harness.ledger.attempts(arm)] == [row["id"], row["id"]]
    assert (row["dph_total"], row["interruptible"], row["disk_gb"], row["storage_cost"]) == (0.15, 1, 10, STORAGE_COST)
    statuses = [e["status"] for e in events(harness, STATUS_EVENT)]
    assert statuses == ["running", "outbid", "running"]

    backend.shutdown()
    fetch_provider_charges(make_client(sim.url), harness.ledger, harness.run_id)
    (check,) = reconcile(harness.ledger, harness.run_id)
    assert check.billed_dollars is not None and not check.flagged
    # Billed at the bid for the running time the ledger dated: starts by the instance's uptime, the outbid halfway
    # through the window between the last contact and the poll that saw it (here under 0.7 s: on ~12 s of GPU time
    # that can be 3%; the 1% of issue 13 needs a minute of GPU time or more at this polling)
    billed = bill_breakdown(harness.ledger, row["id"])
    expected = expected_bill(harness.ledger.instance(row["id"]), status_changes(harness.ledger, row["id"]), time.time())
    assert billed["dph_total"] == 0.15
    # (and a create or destroy request takes up to about a second to arrive on a loaded 2-core machine: storage
    # is dated from the ledger's intent, before the create is sent, and ends when the destroy is sent)
    assert abs(billed["gpu_seconds"] - expected.gpu_seconds) < 1.0, (billed, expected)
    assert abs(billed["storage_seconds"] - expected.storage_seconds) < 1.2, (billed, expected)
    assert abs(check.relative_difference) < 0.04, (check.estimated_dollars, check.billed_dollars)
    (charge,) = [line for line in sim.state()["charges"] if line["metadata"]["instance_id"] == int(
        row["provider_instance_id"])]
    assert charge["metadata"]["dph_total"] == 0.15 and charge["metadata"]["is_bid"]


def test_an_outbid_arm_without_an_expected_wait_moves_at_once(harness, sim):
    backend = harness.backend(interruptible=True, pull_checkpoints_every_minutes=0.005)
    first = harness.spec(harness.arm("move", longer(5000)))
    outbid: dict = {}

    def rival_bid(event, stop):
        if event["kind"] == "metrics" and event["rows"][-1]["step"] >= 20 and not outbid:
            outbid["done"] = True
            sim.compete(5001, bids=[0.2])

    try:
        result, _ = harness.run(backend, first, rival_bid)
    finally:
        sim.compete(5001)
    assert result.outcome == "preempted", result
    assert "was outbid: moving on" in result.reason
    (decision,) = events(harness, OUTBID_EVENT)
    assert decision["action"] == "move" and decision["wait_dollars"] is None
    (row,) = instances(harness)
    assert row["destroyed_at"] is not None and "901" in backend.excluded_machines


def test_a_refused_create_and_a_stuck_boot_fail_over_within_one_search(harness, sim):
    sim.set_faults(offer_id=5001, no_such_ask=True)                 # refused at every create
    sim.set_faults(offer_id=5002, stuck_loading=True)
    backend = harness.backend(ready_deadline_seconds=3)
    result, _ = harness.run(backend, harness.spec(harness.arm("failover")))
    assert result.outcome == "succeeded", result
    # 5001 gone (404): searched again once, gone again: refused; then the same list's next offers
    rows = instances(harness)
    assert [(r["offer_id"], r["state"]) for r in rows[:2]] == [("5001", "failed_create")] * 2
    assert [r["offer_id"] for r in rows[2:]] == ["5002", "5003"]
    assert "not ready after 3s" in rows[2]["reason"] and rows[3]["ready_at"] is not None
    excluded = [(e["machine_id"], e["reason"]) for e in events(harness, EXCLUDED_EVENT)]
    assert [m for m, _ in excluded] == ["901", "902"]
    assert "create refused twice" in excluded[0][1] and "not ready after 3s" in excluded[1][1]
    assert {"901", "902"} <= backend.excluded_machines


def test_idle_gpus_under_a_running_arm_are_stopped_and_reported_as_waste(harness, sim):
    backend = harness.backend(idle_minutes=0.02, idle_gpu_percent=5.0)
    result, _ = harness.run(backend, harness.spec(harness.arm("idle", longer(100000))))   # GPUs report 0%
    assert result.outcome == "preempted", result
    (waste,) = events(harness, "instance.idle_stopped")
    assert waste["arm"] == "idle" and waste["idle_seconds"] >= 1.2 and waste["waste_dollars"] > 0
    (row,) = instances(harness)
    assert row["destroyed_at"] is not None and row["reason"].startswith("GPUs under 5%")


def test_the_plan_shows_the_ranked_offers(sim):
    study = SimpleNamespace(vast={"server_url": sim.url, "min_cuda": None, "interruptible": True})
    lines = vast_offer_lines(study)
    assert lines[0].startswith("vast offers, best first") and "bids" in lines[0]
    assert lines[1].startswith("   1. offer 5001 (machine 901) 1x RTX 4090: $0.150/h bid")
    assert [line.split()[2] for line in lines[1:4]] == ["5001", "5002", "5003"]
    down = SimpleNamespace(vast={"server_url": "http://127.0.0.1:9", "min_cuda": None, "api_backoff_seconds": 0.05})
    started = time.monotonic()
    (line,) = vast_offer_lines(down)
    assert line.startswith("vast offers: not searched") and time.monotonic() - started < 15


def test_the_cost_model_counts_storage_for_the_whole_life_at_the_contracted_rate(tmp_path):
    from orchestrator.ledger import Ledger

    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.create_run("st", name="st", trainer="vqvae", backend="vast", spec_path=None, metric=None, metric_mode=None,
                      baseline=None, budget_dollars=None, git_commit=None, git_diff_hash=None)
    instance = ledger.add_instance(run_id="st", provider="vast", label="x", dph_total=0.15, num_gpus=1)
    row = ledger.instance(instance)
    start = row["created_at"]
    ledger.update_instance(instance, provider_instance_id="7", state="destroyed", ready_at=start + 60,
                           stopped_at=start + 1800, destroyed_at=start + 3600, disk_gb=100.0, storage_cost=0.2,
                           interruptible=1)
    storage_per_hour = 100.0 * 0.2 / MONTH_HOURS
    expected = 0.15 + storage_per_hour                              # one hour of life
    assert current_spend(ledger, "st", now=start + 7200) == pytest.approx(expected)
    lines = cost_lines(ledger, ["st"], now=start + 7200)
    assert sum(line.dollars for line in lines) == pytest.approx(expected)
    assert {line.kind for line in lines} == {"boot", "idle"}
    ledger.close()


def test_cost_detail_shows_why_a_bill_differs(tmp_path):
    from orchestrator.ledger import Ledger

    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.create_run("bw", name="bw", trainer="vqvae", backend="vast", spec_path=None, metric=None, metric_mode=None,
                      baseline=None, budget_dollars=None, git_commit=None, git_diff_hash=None)
    instance = ledger.add_instance(run_id="bw", provider="vast", label="x", dph_total=1.0, num_gpus=1)
    start = ledger.instance(instance)["created_at"]
    ledger.update_instance(instance, provider_instance_id="8", state="destroyed", ready_at=start,
                           destroyed_at=start + 3600, disk_gb=0.0, storage_cost=0.0)
    ledger.add_charge(instance_id=instance, run_id="bw", source="provider", amount_dollars=1.5,
                      breakdown={"gpu_seconds": 3600.0, "storage_seconds": 3600.0, "bandwidth_amount": 0.5,
                                 "dph_total": 1.0})
    plain = cost_command(ledger, "bw", now=start + 7200, console_width=200)
    detail = cost_command(ledger, "bw", now=start + 7200, console_width=200, detail=True)
    reason = f"Instance {instance}: billed $1.5000 against $1.0000 expected; bandwidth $0.5000 billed"
    assert "MISMATCH" in plain and reason not in plain
    assert reason in detail
    assert f"- {reason}" in cost_command(ledger, "bw", now=start + 7200, fmt="markdown", detail=True)
    ledger.close()


def test_an_outbid_while_deploying_is_weighed_and_the_arm_continues_on_the_resumed_instance(harness, sim):
    # keep_instances off: the resumed instance must outlive the hit attempt's release, for the arm's next attempt
    backend = harness.backend(interruptible=True, outbid_wait_minutes=0.5, keep_instances=False, ssh_retries=1)
    arm = harness.arm("outbid-deploy")
    outbid: dict = {}

    def rival_bid_while_deploying(event, stop):
        if event["kind"] == "state" and event["state"] == "deploying" and not outbid:
            outbid["at"] = time.monotonic()
            sim.compete(5001, bids=[0.2])                          # sshd and every process die before the deploy
            threading.Timer(1.5, sim.compete, args=(5001,)).start()  # the rival leaves: ours may resume

    first = harness.spec(arm)
    result, events_ = harness.run(backend, first, rival_bid_while_deploying)
    assert time.monotonic() - outbid["at"] < 30, "seen when the connection failed, not at the deploy's 120 s timeout"
    assert result.outcome == "preempted", result
    assert "outbid and resumed" in result.reason
    assert not [e for e in events_ if e["kind"] == "attempt"]        # no trainer started on it
    (decision,) = events(harness, OUTBID_EVENT)
    assert (decision["action"], decision["during"], decision["own_rate"]) == ("wait", "deploy", 0.15)
    assert decision["wait_dollars"] < decision["move_dollars"]
    assert "901" not in backend.excluded_machines

    result, _ = harness.run(backend, harness.spec(arm))
    assert result.outcome == "succeeded", result
    (row,) = instances(harness)                                    # the same instance: nothing else rented
    hit, second = harness.ledger.attempts(arm)
    assert (hit["state"], second["state"], second["instance_id"]) == ("preempted", "succeeded", row["id"])
    assert row["destroyed_at"] is not None                         # keep_instances off: gone once the arm ended
    assert harness.ours_alive_at_provider() == []
    detail = cost_command(harness.ledger, harness.run_id, detail=True, console_width=250)
    assert (f"instance {row['id']} (vast {row['provider_instance_id']}) outbid while deploying: waited for it"
            f" (expected ${decision['wait_dollars']:.4f} waiting, ${decision['move_dollars']:.4f} moving") in detail
    assert f"instance {row['id']} resumed after its outbid" in detail


def test_a_deploy_step_failing_because_its_instance_was_outbid_is_weighed_not_retired(harness, sim, monkeypatch):
    """The step's exit status (137: killed) can arrive before its connection drops: the failure is the outbid's,
    so the instance is waited for as in any outbid, not retired as a broken host."""
    from orchestrator.backends.remote.deploy import DeployError
    from orchestrator.backends.vast import backend as vast_backend

    deploy = vast_backend.deploy_code
    hit: dict = {}

    def outbid_under_the_install(conn, paths, bundle, settings):
        if not hit:
            hit["done"] = True
            sim.compete(5001, bids=[0.2])                          # the real outbid: every process on it dies
            threading.Timer(1.5, sim.compete, args=(5001,)).start()
            raise DeployError("install dependencies failed on the host (exit 137, 1s):\nKilled")
        return deploy(conn, paths, bundle, settings)

    monkeypatch.setattr(vast_backend, "deploy_code", outbid_under_the_install)
    backend = harness.backend(interruptible=True, outbid_wait_minutes=0.5, ssh_retries=1)
    arm = harness.arm("outbid-install")
    result, _ = harness.run(backend, harness.spec(arm))
    assert result.outcome == "preempted" and "outbid and resumed" in result.reason, result
    assert "exit 137" in result.reason
    (decision,) = events(harness, OUTBID_EVENT)
    assert (decision["action"], decision["during"]) == ("wait", "deploy")
    assert "901" not in backend.excluded_machines
    result, _ = harness.run(backend, harness.spec(arm))
    assert result.outcome == "succeeded", result
    (row,) = instances(harness)                                    # the same instance, deployed on its resume


def test_an_outbid_while_booting_moves_to_the_next_offer_and_is_recorded(harness, sim):
    sim.set_faults(offer_id=5001, stuck_loading=True)              # still booting when the rival bids
    backend = harness.backend(interruptible=True, outbid_wait_minutes=0.5)

    def rival_bid_once_loading():
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if [i for i in harness.ours_alive_at_provider() if i["machine_id"] == 901
                    and i["actual_status"] == "loading"]:
                sim.compete(5001, bids=[0.2])
                return
            time.sleep(0.05)

    rival = threading.Thread(target=rival_bid_once_loading)
    rival.start()
    try:
        result, _ = harness.run(backend, harness.spec(harness.arm("outbid-boot")))
    finally:
        rival.join()
        sim.compete(5001)
    assert result.outcome == "succeeded", result
    (decision,) = events(harness, OUTBID_EVENT)
    assert (decision["action"], decision["during"], decision["own_rate"]) == ("move", "boot", 0.15)
    first, second = instances(harness)
    assert (first["offer_id"], decision["instance_id"], second["offer_id"]) == ("5001", first["id"], "5002")
    assert "outbid while booting" in first["reason"] and "901" in backend.excluded_machines
