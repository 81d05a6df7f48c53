"""Who may drive a run, and how: the ledger's state machines, the claim on a run, resuming on other code,
and a local Ray that only this machine can reach."""

import ipaddress
import json
import multiprocessing
import os
import subprocess
from pathlib import Path

import pytest

from infra.vastsim.instances import descendants
from orchestrator.ledger import (ARM_STATES, FINAL_STATES, IllegalTransition, Ledger, RunClaimed,
                                 orchestrator_alive)
from orchestrator.procs import process_start_time
from tests.armature_helpers import TINY_VQVAE_BASE, armature, tiny_spec

HOST = os.uname().nodename


def new_run(ledger, run_id="r1", git_commit="abc", git_diff_hash=None):
    ledger.create_run(run_id, name="s", trainer="vqvae", backend="local", spec_path=None, metric="recon_mse",
                      metric_mode="min", baseline=None, budget_dollars=None, git_commit=git_commit,
                      git_diff_hash=git_diff_hash)
    return ledger.add_arm_run(run_id, arm="a", seed=0, kind="arm", config={"steps": 3}, config_hash="h",
                              out_dir="/x", total_steps=3, gpus=0, cpus=1, gpu_memory_gb=None)


def force_state(ledger, arm_run_id, state):
    with ledger.write() as db:
        db.execute("UPDATE arm_runs SET state=? WHERE id=?", (state, arm_run_id))


# ---- the arm run and run state machines ----------------------------------------------------------

# Every move the scheduler, the backends, `resume` (settle_orphans) and `cancel` make.
MOVES_THE_CODE_MAKES = [
    ("pending", "provisioning"), ("provisioning", "deploying"), ("deploying", "running"),   # vast
    ("pending", "running"),                                          # local: Ray started the trainer
    ("provisioning", "running"),                                     # vast: an adopted attempt
    ("running", "collecting"), ("collecting", "collecting"), ("collecting", "succeeded"),
    ("running", "failed"), ("running", "diverged"), ("running", "cancelled"),
    ("provisioning", "failed"), ("deploying", "cancelled"), ("collecting", "failed"),
    ("running", "pending"), ("provisioning", "pending"), ("deploying", "pending"), ("collecting", "pending"),
    ("pending", "pending"),                                          # an attempt lost before it started
    ("pending", "failed"), ("pending", "cancelled"),                 # a failed upstream; a cancel
]
ILLEGAL = [(final, to) for final in FINAL_STATES for to in ARM_STATES] + [
    ("pending", "succeeded"), ("running", "succeeded"),              # succeeded only once collected
    ("running", "provisioning"), ("collecting", "running"), ("deploying", "provisioning"),
]


def test_the_arm_run_state_machine_allows_every_move_the_code_makes(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    arm_run_id = new_run(ledger)
    for from_state, to_state in MOVES_THE_CODE_MAKES:
        force_state(ledger, arm_run_id, from_state)
        ledger.transition(arm_run_id, to_state, "why")
        assert ledger.arm_run(arm_run_id)["state"] == to_state
    assert ledger.transitions(arm_run_id)[-1]["reason"] == "why"


@pytest.mark.parametrize("from_state,to_state", ILLEGAL)
def test_an_illegal_arm_run_move_is_refused_and_changes_nothing(tmp_path, from_state, to_state):
    ledger = Ledger(tmp_path / "l.sqlite")
    arm_run_id = new_run(ledger)
    force_state(ledger, arm_run_id, from_state)
    before, transitions = ledger.arm_run(arm_run_id), ledger.transitions(arm_run_id)
    with pytest.raises(IllegalTransition, match=f"arm run {arm_run_id} \\(a seed 0\\): "
                                                f"{from_state} -> {to_state} is not a legal move"):
        ledger.transition(arm_run_id, to_state, "nope")
    assert ledger.arm_run(arm_run_id) == before and ledger.transitions(arm_run_id) == transitions


def test_a_final_state_says_so_and_unknown_states_are_named(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    arm_run_id = new_run(ledger)
    for state in ("running", "collecting", "succeeded"):
        ledger.transition(arm_run_id, state)
    with pytest.raises(IllegalTransition, match="from succeeded: nothing: it is a final state"):
        ledger.transition(arm_run_id, "pending", "resume")
    with pytest.raises(IllegalTransition, match="unknown state 'done'; states are pending, provisioning"):
        ledger.transition(arm_run_id, "done")


def test_the_run_state_machine_refuses_to_leave_finished_or_cancelled(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    new_run(ledger)
    ledger.set_run_state("r1", "interrupted")
    with pytest.raises(IllegalTransition, match="run r1: interrupted -> finished is not a legal move"):
        ledger.set_run_state("r1", "finished")          # only the driver finishes a run, while it runs
    ledger.claim_run("r1")
    ledger.set_run_state("r1", "finished")
    for state in ("running", "interrupted", "cancelled"):
        with pytest.raises(IllegalTransition, match=f"run r1: finished -> {state} is not a legal move"):
            ledger.set_run_state("r1", state)
    with pytest.raises(IllegalTransition, match="finished -> running"):
        ledger.claim_run("r1")
    assert ledger.get_run("r1")["state"] == "finished"


# ---- the claim on a run ------------------------------------------------------------------------------


def _claim_and_hold(path, barrier, results, release):
    ledger = Ledger(path)
    barrier.wait()
    try:
        ledger.claim_run("r1")
        results.put((os.getpid(), None))
    except RunClaimed as exc:
        results.put((os.getpid(), str(exc)))
    release.wait(60)                    # stay alive: a live holder is what the others must respect


def test_of_three_processes_claiming_one_run_at_once_exactly_one_wins(tmp_path):
    path = tmp_path / "l.sqlite"
    ledger = Ledger(path)
    new_run(ledger)
    ledger.set_run_state("r1", "interrupted")           # as after Ctrl-C: `armature resume r1` x 3
    ctx = multiprocessing.get_context("spawn")
    barrier, results, release = ctx.Barrier(3), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_claim_and_hold, args=(path, barrier, results, release)) for _ in range(3)]
    for p in procs:
        p.start()
    try:
        outcomes = [results.get(timeout=60) for _ in procs]
    finally:
        release.set()
        for p in procs:
            p.join(30)
    winners = [pid for pid, error in outcomes if error is None]
    assert len(winners) == 1, outcomes
    for pid, error in outcomes:
        if pid != winners[0]:
            assert error == (f"run r1 is being driven by pid {winners[0]} on {HOST}; "
                             f"`armature cancel r1` stops it")
    run = ledger.get_run("r1")
    assert run["state"] == "running" and run["orchestrator_pid"] == winners[0]
    assert not orchestrator_alive(run)                  # the winner has exited: the run is free again
    ledger.claim_run("r1")
    assert ledger.get_run("r1")["orchestrator_pid"] == os.getpid()


def test_a_cancel_during_start_up_survives_the_schedulers_claim(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    new_run(ledger)
    ledger.set_run_state("r1", "interrupted")
    ledger.set_run_state("r1", "running", claim=True)  # `resume` claims the run...
    ledger.request_cancel("r1")                         # ...`armature cancel r1` arrives...
    ledger.set_run_state("r1", "running", claim=True)  # ...and the scheduler starts
    assert ledger.cancel_requested("r1")


def test_a_reused_pid_does_not_hold_a_run(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    new_run(ledger)
    holder = subprocess.Popen(["sleep", "30"])
    try:
        with ledger.write() as db:
            db.execute("UPDATE runs SET orchestrator_pid=?, orchestrator_start_time=? WHERE run_id='r1'",
                       (holder.pid, process_start_time(holder.pid)))
        with pytest.raises(RunClaimed, match=f"being driven by pid {holder.pid} on {HOST}"):
            ledger.claim_run("r1")
        with ledger.write() as db:                      # same pid, another process: the holder died long ago
            db.execute("UPDATE runs SET orchestrator_start_time='1' WHERE run_id='r1'")
        ledger.claim_run("r1")
        assert ledger.get_run("r1")["orchestrator_pid"] == os.getpid()
    finally:
        holder.kill()
        holder.wait()


def test_resume_refuses_a_run_another_live_process_drives(tmp_path):
    home = tmp_path / "home"
    ledger = Ledger(home / "ledger.sqlite")
    new_run(ledger)
    holder = subprocess.Popen(["sleep", "30"])
    try:
        with ledger.write() as db:
            db.execute("UPDATE runs SET orchestrator_pid=?, orchestrator_start_time=? WHERE run_id='r1'",
                       (holder.pid, process_start_time(holder.pid)))
        result = armature(home, "resume", "r1", "--metrics-port", "-1", timeout=60)
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"run r1 is being driven by pid {holder.pid} on {HOST}" in result.stderr
        assert "Traceback" not in result.stderr
        assert ledger.get_run("r1")["orchestrator_pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_cancel_of_a_run_nobody_drives_claims_it_and_ends_it(tmp_path):
    home = tmp_path / "home"
    ledger = Ledger(home / "ledger.sqlite")
    arm_run_id = new_run(ledger)
    ledger.set_run_state("r1", "interrupted")
    result = armature(home, "cancel", "r1", timeout=60)
    assert result.returncode == 0 and "run r1: cancelled" in result.stdout, result.stdout + result.stderr
    run = ledger.get_run("r1")
    assert run["state"] == "cancelled" and run["orchestrator_pid"] not in (None, os.getpid())
    assert ledger.arm_run(arm_run_id)["state"] == "cancelled"
    again = armature(home, "resume", "r1", timeout=60)
    assert again.returncode == 2 and "run r1 is cancelled; nothing to resume" in again.stderr


# ---- resuming on other code ------------------------------------------------------------------------------


def test_resume_on_other_code_is_refused_unless_allowed_and_then_recorded(tmp_path):
    from orchestrator.runs import create_run
    from orchestrator.spec import load_plan

    home = tmp_path / "home"
    spec = tiny_spec(tmp_path, f"""name: tiny
trainer: vqvae
metric: {{name: recon_mse, mode: min}}
base: {TINY_VQVAE_BASE}
arms:
  - name: a
seeds: 1
resources: {{gpus: 0, cpus: 1}}
""")
    ledger = Ledger(home / "ledger.sqlite")
    old_code = {"commit": "0123456789abcdef" * 2 + "01234567", "dirty": True, "diff_hash": "d1ff"}
    create_run(ledger, load_plan(str(spec), [], False), "cc", home / "cc", "local", old_code, 0.0)
    ledger.set_run_state("cc", "interrupted")

    refused = armature(home, "resume", "cc", "--metrics-port", "-1", timeout=60)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert ("the run started on commit 0123456789ab with uncommitted changes (diff d1ff); the code is now commit"
            in refused.stderr) and "--allow-code-change" in refused.stderr and "Traceback" not in refused.stderr
    assert ledger.get_run("cc")["state"] == "interrupted" and ledger.events("cc", "run.code_change") == []

    allowed = armature(home, "resume", "cc", "--metrics-port", "-1", "--allow-code-change", timeout=120)
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    (event,) = ledger.events("cc", "run.code_change")
    detail = json.loads(event["detail_json"])
    assert detail["from_commit"] == old_code["commit"] and detail["from_diff_hash"] == "d1ff"
    assert detail["to_commit"] != old_code["commit"]
    assert detail["text"].startswith("resumed on other code (--allow-code-change): the run started on commit "
                                     "0123456789ab")
    assert ledger.get_run("cc")["state"] == "finished"
    assert [r["state"] for r in ledger.arm_runs("cc")] == ["succeeded"]


# ---- a local Ray reachable from this machine only --------------------------------------------------------


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        pass
    return inodes


def _listening() -> dict[str, ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Listening TCP sockets of this machine: inode -> local address."""
    sockets = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":                        # TCP_LISTEN
                continue
            raw = bytes.fromhex(fields[1].split(":")[0])
            words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))   # 32-bit words, host order
            address = ipaddress.ip_address(words)
            sockets[fields[9]] = getattr(address, "ipv4_mapped", None) or address
    return sockets


def test_the_local_backends_own_ray_listens_on_loopback_only():
    import ray

    from orchestrator.backends.local import LocalBackend

    assert not ray.is_initialized()
    backend = LocalBackend(num_cpus=1)
    backend.start()
    try:
        assert backend._started_ray
        listening = _listening()
        ours = {}
        for pid in [os.getpid(), *descendants(os.getpid())]:
            for inode in _socket_inodes(pid) & set(listening):
                ours[(pid, Path(f"/proc/{pid}/comm").read_text().strip())] = listening[inode]
    finally:
        backend.shutdown()
    names = {name for _, name in ours}
    assert {"gcs_server", "raylet"} <= names, ours
    exposed = {proc: str(address) for proc, address in ours.items() if not address.is_loopback}
    assert exposed == {}, f"Ray listens beyond this machine: {exposed}"
