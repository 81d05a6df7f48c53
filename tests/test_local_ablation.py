"""Real ablations through the real CLI, a real local Ray and real trainer processes."""

import csv
import json
import os
import signal
import time

from tests.armature_helpers import (TINY_MASKGIT_BASE, TINY_VQVAE_BASE, armature, ledger,
                                    metric_steps, start_armature, tiny_spec, wait_for)
from tests.test_tensorboard import assert_every_metric_reads_back

TWO_ARMS = f"""name: tiny
trainer: vqvae
metric: {{name: recon_mse, mode: min}}
baseline: a
base: {TINY_VQVAE_BASE}
arms:
  - name: a
  - name: b
    set: {{model.codebook_size: 16}}
seeds: 2
resources: {{gpus: 0, cpus: 1}}
"""

# Long enough to interrupt mid-way (a tiny step takes about 7 ms, and the driver sees a step and forwards a
# signal a second or two late on a loaded machine); checkpoints often so the resume point is recent.
LONG_STEPS = 600
LONG_ARMS = TWO_ARMS.replace("steps: 20,", f"steps: {LONG_STEPS},") \
    .replace("checkpoint_every: 10", "checkpoint_every: 20").replace("eval_every: 10", "eval_every: 200") \
    .replace("seeds: 2", "seeds: 1")


def test_two_arms_two_seeds_end_to_end(tmp_path):
    home = tmp_path / "home"
    result = armature(home, "ablation", str(tiny_spec(tmp_path, TWO_ARMS)), "--run-id", "e2e", "--metrics-port", "-1")
    assert result.returncode == 0, result.stdout + result.stderr
    db = ledger(home)
    run = db.get_run("e2e")
    assert run["state"] == "finished" and run["git_commit"]
    arm_runs = db.arm_runs("e2e")
    assert sorted((r["arm"], r["seed"]) for r in arm_runs) == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    for arm_run in arm_runs:
        assert arm_run["state"] == "succeeded"
        states = [t["to_state"] for t in db.transitions(arm_run["id"])]
        assert states == ["pending", "running", "collecting", "succeeded"]
        out = home / "e2e" / arm_run["arm"] / f"seed{arm_run['seed']}"
        config = json.loads((out / "config.json").read_text())
        assert config["seed"] == arm_run["seed"]
        assert (out / "summary.json").exists() and (out / "checkpoints" / "last.pt").exists()
        # every metrics.jsonl line reached the ledger
        assert [r["step"] for r in db.metric_rows(arm_run["id"])] == metric_steps(out)
        assert json.loads(arm_run["summary_json"]) == json.loads((out / "summary.json").read_text())
        (attempt,) = db.attempts(arm_run["id"])
        assert attempt["state"] == "succeeded" and attempt["exit_code"] == 0 and attempt["hardware"].startswith("cpu")
    rows = list(csv.DictReader(open(home / "e2e" / "results.csv")))
    assert [r["arm"] for r in rows] == ["a", "b"]
    assert (home / "e2e" / "results.md").exists() and (home / "e2e" / "plots" / "loss.png").exists()
    assert_every_metric_reads_back(home, "e2e", {"a": {"model.codebook_size": 128.0},
                                                 "b": {"model.codebook_size": 16.0}})
    assert "git" in (home / "e2e" / "spec.yaml").read_text()

    status = armature(home, "status", "e2e")
    assert status.returncode == 0 and "succeeded" in status.stdout
    assert armature(home, "status", "nope").returncode == 2


def _running_with_progress(home, run_id, min_step):
    db = ledger(home)
    arm_runs = db.arm_runs(run_id)
    return arm_runs and all(r["state"] == "running" and (r["last_step"] or 0) >= min_step for r in arm_runs)


def _assert_curve_continues(home, run_id, arm_runs, total):
    for arm_run in arm_runs:
        steps = metric_steps(home / run_id / arm_run["arm"] / f"seed{arm_run['seed']}")
        train_steps = sorted(set(steps))
        assert steps == sorted(steps), "a resumed run must not write steps twice"
        assert train_steps == list(range(5, total + 1, 5))


def test_ctrl_c_then_resume_continues_the_same_curve(tmp_path):
    home = tmp_path / "home"
    proc = start_armature(home, "ablation", str(tiny_spec(tmp_path, LONG_ARMS)), "--run-id", "cc",
                          "--metrics-port", "-1", log=tmp_path / "log")
    try:
        wait_for(lambda: (home / "ledger.sqlite").exists() and _running_with_progress(home, "cc", 40), 180,
                 "both arms past step 40")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 130, (tmp_path / "log").read_text()
    finally:
        proc.kill()
    db = ledger(home)
    assert db.get_run("cc")["state"] == "interrupted"
    stopped_at = {}
    for arm_run in db.arm_runs("cc"):
        assert arm_run["state"] == "pending" and "interrupted" in arm_run["reason"]
        (attempt,) = db.attempts(arm_run["id"])
        assert attempt["state"] == "interrupted" and attempt["exit_code"] == 143
        assert (home / "cc" / arm_run["arm"] / "seed0" / "checkpoints" / "last.pt").exists()
        stopped_at[arm_run["id"]] = attempt["end_step"]

    result = armature(home, "resume", "cc", "--metrics-port", "-1")
    assert result.returncode == 0, result.stdout + result.stderr
    arm_runs = db.arm_runs("cc")
    assert all(r["state"] == "succeeded" for r in arm_runs)
    _assert_curve_continues(home, "cc", arm_runs, LONG_STEPS)
    for arm_run in arm_runs:
        first, second = db.attempts(arm_run["id"])
        assert second["state"] == "succeeded" and second["started_at"] >= first["ended_at"]
        assert first["start_step"] is not None and second["start_step"] > first["start_step"]   # where each began
        log = (home / "cc" / arm_run["arm"] / "seed0" / "log").read_text()
        assert "resum" in log.lower(), "the second attempt must start from the checkpoint"
    assert armature(home, "resume", "cc").returncode == 2        # finished: nothing to resume


def _trainer_pids(run_dir):
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = open(f"/proc/{entry}/cmdline", "rb").read().decode(errors="replace")
            except OSError:
                continue
            if "trainers.vqvae" in cmdline and str(run_dir) in cmdline:
                pids.append(int(entry))
    return pids


def test_kill_9_then_resume_runs_no_arm_twice(tmp_path):
    home = tmp_path / "home"
    proc = start_armature(home, "ablation", str(tiny_spec(tmp_path, LONG_ARMS)), "--run-id", "k9",
                          "--metrics-port", "-1", log=tmp_path / "log")
    try:
        wait_for(lambda: (home / "ledger.sqlite").exists() and _running_with_progress(home, "k9", 40), 180,
                 "both arms past step 40")
    finally:
        proc.kill()                                         # SIGKILL: no handler runs
        proc.wait(30)
    db = ledger(home)
    assert db.get_run("k9")["state"] == "running"           # nobody recorded an end
    result = armature(home, "resume", "k9", "--metrics-port", "-1")
    assert result.returncode == 0, result.stdout + result.stderr
    arm_runs = db.arm_runs("k9")
    assert all(r["state"] == "succeeded" for r in arm_runs)
    for arm_run in arm_runs:
        attempts = db.attempts(arm_run["id"])
        # the orchestrator's death is no failure of the arm: its attempt is closed as interrupted
        assert attempts[0]["state"] == "interrupted" and attempts[-1]["state"] == "succeeded"
        for earlier, later in zip(attempts, attempts[1:]):
            assert later["started_at"] >= earlier["ended_at"], "two attempts of one arm run overlapped"
    _assert_curve_continues(home, "k9", arm_runs, LONG_STEPS)
    assert _trainer_pids(home / "k9") == []


ONE_ARM = LONG_ARMS.replace("  - name: b\n    set: {model.codebook_size: 16}\n", "")


def _open_attempt(home, run_id):
    (attempt,) = ledger(home).open_attempts(run_id)
    return attempt


def test_pause_and_a_sigkill_use_up_only_failed_attempts(tmp_path):
    """max_attempts: 2; a PAUSE cycle, then the out-of-memory killer's SIGKILL: the arm retries from its
    checkpoint and succeeds, because only the SIGKILL counts as a failed attempt."""
    home = tmp_path / "home"
    spec = ONE_ARM.replace("arms:", "max_attempts: 2\narms:")
    proc = start_armature(home, "ablation", str(tiny_spec(tmp_path, spec)), "--run-id", "sk", "--metrics-port", "-1",
                          log=tmp_path / "log")
    out = home / "sk" / "a" / "seed0"
    try:
        wait_for(lambda: (home / "ledger.sqlite").exists() and _running_with_progress(home, "sk", 20), 180,
                 "the arm past step 20")
        (home / "sk" / "PAUSE").touch()
        wait_for(lambda: "paused" in (ledger(home).arm_runs("sk")[0]["reason"] or ""), 60, "the arm to pause")
        (home / "sk" / "PAUSE").unlink()
        wait_for(lambda: "resumed from" in (out / "log").read_text(), 120, "the second attempt training",
                 interval=0.05)
        os.kill(_open_attempt(home, "sk")["pid"], signal.SIGKILL)
        assert proc.wait(180) == 0, (tmp_path / "log").read_text()
    finally:
        proc.kill()
    db = ledger(home)
    (arm_run,) = db.arm_runs("sk")
    assert arm_run["state"] == "succeeded"
    paused, killed, last = db.attempts(arm_run["id"])
    assert (paused["state"], killed["state"], last["state"]) == ("interrupted", "lost", "succeeded")
    assert killed["exit_code"] == -9
    assert "killed by SIGKILL (signal 9), possibly the out-of-memory killer" in killed["reason"]
    assert any("SIGKILL" in (t["reason"] or "") and "retrying from the last checkpoint" in t["reason"]
               for t in db.transitions(arm_run["id"]))
    assert (out / "log").read_text().lower().count("resumed from") == 2
    _assert_curve_continues(home, "sk", [arm_run], LONG_STEPS)


def test_an_event_the_ledger_refuses_stops_the_trainer_before_the_arm_is_retried(tmp_path):
    """A metrics row the ledger cannot store (its `time` is a list): the attempt's trainer is stopped (it
    checkpoints) before the arm run's next attempt starts, never two trainers in one folder."""
    home = tmp_path / "home"
    # Far more steps than the test lets it run: the first trainer is still training when the stop reaches it,
    # however slowly the driver reads on a loaded machine (400 steps once ended first, exit 0, in CI).
    spec = ONE_ARM.replace("arms:", "max_attempts: 2\narms:").replace(f"steps: {LONG_STEPS},", "steps: 20000,")
    proc = start_armature(home, "ablation", str(tiny_spec(tmp_path, spec)), "--run-id", "rf", "--metrics-port", "-1",
                          log=tmp_path / "log")
    most_trainers = 0
    try:
        wait_for(lambda: (home / "ledger.sqlite").exists() and _running_with_progress(home, "rf", 10), 180,
                 "the arm past step 10")
        with open(home / "rf" / "a" / "seed0" / "metrics.jsonl", "a") as metrics:
            metrics.write('{"step": 1, "time": [0]}\n')
        while proc.poll() is None:
            most_trainers = max(most_trainers, len(_trainer_pids(home / "rf")))
            time.sleep(0.05)
    finally:
        proc.kill()
    assert proc.returncode == 1, (tmp_path / "log").read_text()           # the arm did not finish
    assert most_trainers == 1, "two trainers ran in one arm run's folder"
    db = ledger(home)
    (arm_run,) = db.arm_runs("rf")
    first, second = db.attempts(arm_run["id"])
    assert second["started_at"] >= first["ended_at"]
    assert first["exit_code"] == 143                                        # stopped by SIGTERM, checkpointed
    assert second["exit_code"] in (143, -signal.SIGTERM)                    # (maybe before its handler was set)
    for attempt in (first, second):
        assert attempt["state"] == "lost"
        assert "could not record an event" in attempt["reason"] and "ProgrammingError" in attempt["reason"]
    assert arm_run["state"] == "failed" and arm_run["reason"].startswith("2 failed attempts (max_attempts 2)")


def test_diverged_arm_ends_diverged_and_the_others_go_on(tmp_path):
    home = tmp_path / "home"
    spec = TWO_ARMS.replace("set: {model.codebook_size: 16}", "set: {lr: 1.0e+8, vq.ema: false}") \
        .replace("seeds: 2", "seeds: 1")
    result = armature(home, "ablation", str(tiny_spec(tmp_path, spec)), "--run-id", "dv", "--metrics-port", "-1")
    assert result.returncode == 0, result.stdout + result.stderr
    states = {r["arm"]: (r["state"], r["reason"]) for r in ledger(home).arm_runs("dv")}
    assert states["a"][0] == "succeeded"
    assert states["b"] == ("diverged", "loss became NaN or inf")
    assert "diverged" in (home / "dv" / "results.md").read_text()


def test_one_upstream_tokenizer_run_shared_by_several_arms(tmp_path):
    home = tmp_path / "home"
    spec = f"""name: mg
trainer: maskgit
metric: {{name: heldout_masked_acc, mode: max}}
base:
{TINY_MASKGIT_BASE}arms:
  - name: a
  - name: b
    set: {{decode_steps: 2}}
  - name: c
    set: {{tokenizer.model.codebook_size: 16}}
resources: {{gpus: 0}}
"""
    result = armature(home, "ablation", str(tiny_spec(tmp_path, spec)), "--run-id", "up", "--metrics-port", "-1")
    assert result.returncode == 0, result.stdout + result.stderr
    db = ledger(home)
    upstream = db.arm_runs("up", kind="upstream")
    judges = [r for r in upstream if r["trainer"] == "judge"]
    upstream = [r for r in upstream if r["trainer"] != "judge"]
    assert len(judges) == 1 and judges[0]["state"] == "succeeded", "one judge for the study's seed"
    assert len(upstream) == 2 and all(r["state"] == "succeeded" and r["trainer"] == "vqvae" for r in upstream)
    assert all(len(db.attempts(r["id"])) == 1 for r in upstream + judges), "each upstream config trains once"
    dirs = {}
    for arm_run in db.arm_runs("up", kind="arm"):
        assert arm_run["state"] == "succeeded"
        config = json.loads((home / "up" / arm_run["arm"] / "seed0" / "config.json").read_text())
        dirs[arm_run["arm"]] = config["tokenizer_dir"]
        assert config["judge_dir"] == judges[0]["out_dir"]
        started = db.attempts(arm_run["id"])[0]["started_at"]
        tokenizer = next(r for r in upstream if r["out_dir"] == config["tokenizer_dir"])
        assert db.attempts(tokenizer["id"])[0]["ended_at"] <= started, "an arm started before its tokenizer ended"
    assert dirs["a"] == dirs["b"] != dirs["c"]
    assert all((home / "up" / "_upstream").glob("*/artifact.pt"))


def test_two_node_ray_cluster_runs_arms_on_both_nodes(tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        home = tmp_path / "home"
        spec = TWO_ARMS.replace("seeds: 2", "seeds: 1").replace("steps: 20,", "steps: 60,")
        result = armature(home, "ablation", str(tiny_spec(tmp_path, spec)), "--run-id", "tn", "--metrics-port", "-1",
                          "--ray-address", cluster.address)
        assert result.returncode == 0, result.stdout + result.stderr
        db = ledger(home)
        nodes = {db.attempts(r["id"])[0]["ray_node"] for r in db.arm_runs("tn")}
        assert len(nodes) == 2, "with one CPU per node, the two arms must run on different nodes"
        assert all(r["state"] == "succeeded" for r in db.arm_runs("tn"))
    finally:
        cluster.shutdown()


def test_cancel_from_another_process(tmp_path):
    home = tmp_path / "home"
    proc = start_armature(home, "ablation", str(tiny_spec(tmp_path, LONG_ARMS)), "--run-id", "cx",
                          "--metrics-port", "-1", log=tmp_path / "log")
    try:
        wait_for(lambda: (home / "ledger.sqlite").exists() and _running_with_progress(home, "cx", 10), 180,
                 "arms running")
        result = armature(home, "cancel", "cx")
        assert result.returncode == 0, result.stderr
        assert proc.wait(120) in (0, 1)
    finally:
        proc.kill()
    db = ledger(home)
    assert db.get_run("cx")["state"] == "cancelled"
    assert all(r["state"] == "cancelled" for r in db.arm_runs("cx"))
    assert _trainer_pids(home / "cx") == []


def test_early_stop_rule_ends_an_arm_with_its_reason(tmp_path):
    home = tmp_path / "home"
    spec = LONG_ARMS.replace("arms:", "early_stop: [{metric: loss, after_step: 20, below: 1000}]\narms:") \
        .replace("  - name: b\n    set: {model.codebook_size: 16}\n", "")
    result = armature(home, "ablation", str(tiny_spec(tmp_path, spec)), "--run-id", "es", "--metrics-port", "-1")
    assert result.returncode == 1, result.stdout + result.stderr          # an arm did not finish
    (arm_run,) = ledger(home).arm_runs("es")
    assert arm_run["state"] == "cancelled"
    assert arm_run["reason"].startswith("early stop: loss=") and "below 1000" in arm_run["reason"]
    assert 20 <= arm_run["last_step"] < LONG_STEPS
