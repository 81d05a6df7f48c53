"""The local Ray under a run: arms it can never hold are refused up front, and its death mid-run stops the
run as interrupted at once, with every arm's retries intact and a resume that finishes the study."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

from infra.vastsim.instances import descendants
from tests.armature_helpers import (TINY_VQVAE_BASE, armature, ledger, start_armature, tiny_spec,
                                    wait_for)

STEPS = 600                 # a tiny step is ~7 ms: the trainer must outlive the time Ray takes to fall
LONG = f"""name: raydown
trainer: vqvae
metric: {{name: recon_mse, mode: min}}
base: {TINY_VQVAE_BASE.replace("steps: 20,", f"steps: {STEPS},").replace("eval_every: 10", "eval_every: 100")}
seeds: 1
arms:
  - name: a
resources: {{gpus: 0, cpus: 1}}
"""


def _named(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "comm").read_text().strip()
    except OSError:
        return ""


def test_arms_no_node_can_hold_are_refused_before_anything_is_written(tmp_path):
    home = tmp_path / "home"
    spec = tiny_spec(tmp_path, LONG.replace("cpus: 1", "cpus: 512"))
    result = armature(home, "ablation", str(spec), "--run-id", "huge", "--metrics-port", "-1", timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    message = result.stdout + result.stderr
    assert "512 CPUs" in message and "this machine has" in message and "resources.cpus" in message, message
    assert "Traceback" not in message
    assert not (home / "huge").exists()
    assert not (home / "ledger.sqlite").exists() or ledger(home).list_runs() == []


def test_a_dead_local_ray_interrupts_the_run_without_using_retries_and_resume_finishes(tmp_path):
    home = tmp_path / "home"
    spec = tiny_spec(tmp_path, LONG)
    log = tmp_path / "armature.log"
    proc = start_armature(home, "ablation", str(spec), "--run-id", "rd", "--metrics-port", "-1", log=log, PYTHONFAULTHANDLER="1")
    try:
        out = home / "rd" / "a" / "seed0"
        wait_for(lambda: (out / "checkpoints" / "last.pt").exists(), 120, "a first checkpoint")
        (gcs,) = wait_for(lambda: [p for p in descendants(proc.pid) if _named(p) == "gcs_server"], 30,
                          "the run's own gcs_server")
        os.kill(gcs, signal.SIGKILL)
        killed_at = time.time()
        code = proc.wait(60)
        took = time.time() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert code == 130, text
    assert took < 45, f"the run took {took:.0f}s to notice its Ray had died"
    assert "the local Ray died" in text and "armature resume rd" in text, text
    assert "Traceback" not in text, text
    db = ledger(home)
    assert db.get_run("rd")["state"] == "interrupted"
    (arm_run,) = db.arm_runs("rd")
    assert arm_run["state"] == "pending", arm_run
    assert [a["state"] for a in db.attempts(arm_run["id"])] == ["interrupted"]
    assert any(e["kind"] == "backend.down" for e in db.events("rd"))

    result = armature(home, "resume", "rd", "--metrics-port", "-1", "--allow-code-change", timeout=240)  # the tree may change meanwhile
    assert result.returncode == 0, result.stdout + result.stderr
    (arm_run,) = ledger(home).arm_runs("rd")
    assert arm_run["state"] == "succeeded"
    states = [a["state"] for a in ledger(home).attempts(arm_run["id"])]
    assert states == ["interrupted", "succeeded"], states
    resumed = re.search(r"resumed from \S+ at step (\d+)", (out / "log").read_text())
    assert resumed and int(resumed.group(1)) > 0, "the resume started from step 0"
