"""The SQLite ledger: transitions, schema versions, and several processes writing at once."""

import multiprocessing
import sqlite3

import pytest

from orchestrator.errors import UserError
from orchestrator.ledger import Ledger
from orchestrator.runs import gpu_share


def new_run(ledger, run_id="r1"):
    ledger.create_run(run_id, name="s", trainer="vqvae", backend="local", spec_path=None, metric="recon_mse",
                      metric_mode="min", baseline=None, budget_dollars=None, git_commit="abc", git_diff_hash=None)
    return ledger.add_arm_run(run_id, arm="a", seed=0, kind="arm", config={"steps": 3}, config_hash="h",
                              out_dir="/x", total_steps=3, gpus=0, cpus=1, gpu_memory_gb=None)


def test_transitions_attempts_and_metrics(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    arm_run_id = new_run(ledger)
    attempt = ledger.start_attempt(arm_run_id, backend="local")
    ledger.transition(arm_run_id, "running", attempt_id=attempt)
    ledger.record_metrics(arm_run_id, attempt, [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}])
    ledger.record_metrics(arm_run_id, attempt, [{"step": 2, "loss": 1.4, "acc": 0.5}])   # a resumed step replaces
    ledger.end_attempt(attempt, "succeeded", exit_code=0, end_step=2)
    ledger.transition(arm_run_id, "collecting", attempt_id=attempt)
    ledger.transition(arm_run_id, "succeeded")
    row = ledger.arm_run(arm_run_id)
    assert row["state"] == "succeeded" and row["ended_at"] is not None and row["last_step"] == 2
    assert [r["loss"] for r in ledger.metric_rows(arm_run_id)] == [2.0, 1.4]
    assert [(t["from_state"], t["to_state"]) for t in ledger.transitions(arm_run_id)] == [
        (None, "pending"), ("pending", "running"), ("running", "collecting"), ("collecting", "succeeded")]
    assert ledger.attempts(arm_run_id)[0]["n"] == 1 and ledger.open_attempts("r1") == []
    with pytest.raises(UserError, match="unknown run id 'nope'.*recent runs: r1"):
        ledger.get_run("nope")


def test_an_older_or_foreign_database_is_refused_clearly(tmp_path):
    old = tmp_path / "old.sqlite"
    Ledger(old).close()
    with sqlite3.connect(old) as db:
        db.execute("UPDATE meta SET value='0' WHERE key='schema_version'")
    with pytest.raises(UserError, match="written by an older armature"):
        Ledger(old)
    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(UserError, match="not an armature ledger"):
        Ledger(foreign)
    with pytest.raises(UserError, match="no ledger here yet"):
        Ledger(tmp_path / "missing.sqlite", create=False)


def _hammer(path, worker, count):
    ledger = Ledger(path)
    arm_run_id = ledger.arm_runs("r1")[0]["id"]
    for i in range(count):
        ledger.record_metrics(arm_run_id, None, [{"step": worker * 10_000 + i, "loss": float(i)}])
        ledger.event("r1", "test.write", arm_run_id, worker=worker, i=i)


def test_two_processes_writing_one_ledger_lose_nothing(tmp_path):
    path = tmp_path / "l.sqlite"
    arm_run_id = new_run(Ledger(path))
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_hammer, args=(path, w, 150)) for w in range(2)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(120)
        assert p.exitcode == 0
    ledger = Ledger(path)
    assert len(ledger.metric_rows(arm_run_id)) == 300
    assert len(ledger.events("r1", "test.")) == 300
    assert ledger.query_one("PRAGMA integrity_check")["integrity_check"] == "ok"


def test_memory_guard_packs_no_more_arms_than_the_card_holds():
    assert gpu_share(0.25, 2, 24) == 0.25                  # 2 GB of 24: a quarter card is enough
    assert gpu_share(0.25, 10, 24) == 0.42                 # 10 GB: at most two arms on the card
    assert gpu_share(0.5, None, 24) == 0.5 and gpu_share(0, 10, 24) == 0
    with pytest.raises(UserError, match="more than the 24.0 GB"):
        gpu_share(0.5, 30, 24)


def test_a_ledger_from_before_orchestrator_start_times_is_upgraded_in_place(tmp_path):
    path = tmp_path / "l.sqlite"
    new_run(Ledger(path))
    with sqlite3.connect(path) as db:
        db.execute("ALTER TABLE runs DROP COLUMN orchestrator_start_time")
    ledger = Ledger(path)
    assert ledger.get_run("r1")["orchestrator_start_time"] is None
    ledger.claim_run("r1")
    assert ledger.get_run("r1")["orchestrator_start_time"]
