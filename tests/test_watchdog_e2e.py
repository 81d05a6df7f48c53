"""The watchdog and PAUSE files on a real local ablation.

The machine has no GPU, so the GPU is the Vast simulator's stand-in `nvidia-smi`
on PATH, reading its values from a JSON file the test changes mid-run; armature
reads it through the same nvidia-smi path it uses where NVML is missing.
"""

import json
import os
import sys

from infra.vastsim.instances import FAKE_NVIDIA_SMI
from tests.armature_helpers import TINY_VQVAE_BASE, ledger, metric_steps, start_armature, tiny_spec, wait_for

# batch 64: each step slow enough that a stop asked for after step 30 lands well before step 300 on a loaded machine
BASE = (TINY_VQVAE_BASE.replace("steps: 20,", "steps: 300,").replace("eval_every: 10", "eval_every: 100")
        .replace("batch_size: 16", "batch_size: 64"))
SPEC = f"""name: wd
trainer: vqvae
metric: {{name: recon_mse, mode: min}}
base: {BASE}
seeds: 1
resources: {{gpus: 0}}
watchdog: {{poll_seconds: 0.5, cooldown_seconds: 1, gpu_temp_celsius: 83, max_restarts: 3}}
"""


def fake_gpu(tmp_path, temperature):
    root = tmp_path / "fakegpu"
    (root / "bin").mkdir(parents=True, exist_ok=True)
    (root / ".vastsim").mkdir(exist_ok=True)
    smi = root / "bin" / "nvidia-smi"
    if not smi.exists():
        smi.write_text(f"#!{sys.executable}\n" + FAKE_NVIDIA_SMI.read_text())
        smi.chmod(0o755)
    gpu = {"index": 0, "name": "NVIDIA GeForce RTX 4090", "uuid": "GPU-test", "temperature.gpu": temperature,
           "utilization.gpu": 90, "utilization.memory": 40, "memory.used": 2000, "memory.total": 24564,
           "power.draw": 300.0, "power.limit": 450.0, "clocks.sm": 2500, "clocks.max.sm": 2520,
           "clocks_throttle_reasons.active": "0x0000000000000000"}
    (root / ".vastsim" / "gpu.json").write_text(json.dumps({"gpus": [gpu]}))
    return root / "bin"


def arm_run(home):
    return ledger(home).arm_runs("wd")[0]


def test_overheat_stops_the_arm_which_restarts_after_cooling_and_continues(tmp_path):
    home = tmp_path / "home"
    bin_dir = fake_gpu(tmp_path, 60)
    proc = start_armature(home, "ablation", str(tiny_spec(tmp_path, SPEC)), "--run-id", "wd", "--metrics-port", "-1",
                          log=tmp_path / "log", PATH=f"{bin_dir}:{os.environ['PATH']}")
    try:
        wait_for(lambda: (home / "ledger.sqlite").exists() and ledger(home).arm_runs("wd")
                 and (arm_run(home)["last_step"] or 0) >= 30, 180, "the arm past step 30")
        fake_gpu(tmp_path, 92)
        wait_for(lambda: arm_run(home)["state"] == "pending" and "watchdog" in (arm_run(home)["reason"] or ""), 60,
                 "the watchdog to stop the arm")
        stopped = arm_run(home)
        assert "92" in stopped["reason"] and "83" in stopped["reason"]
        fake_gpu(tmp_path, 60)
        assert proc.wait(240) == 0, (tmp_path / "log").read_text()
    finally:
        proc.kill()
    final = arm_run(home)
    assert final["state"] == "succeeded" and final["restarts"] == 1
    db = ledger(home)
    first, second = db.attempts(final["id"])
    assert first["state"] == "interrupted" and first["exit_code"] == 143 and second["state"] == "succeeded"
    assert [e["kind"] for e in db.events("wd", "watchdog")] == ["watchdog.breach"]
    steps = metric_steps(home / "wd" / "base" / "seed0")
    assert steps == sorted(steps) and sorted(set(steps)) == list(range(5, 301, 5)), "the resumed curve continues"


def test_pause_file_pauses_and_removing_it_resumes(tmp_path):
    home = tmp_path / "home"
    proc = start_armature(home, "ablation", str(tiny_spec(tmp_path, SPEC)), "--run-id", "wd", "--metrics-port", "-1",
                          log=tmp_path / "log")
    try:
        wait_for(lambda: (home / "ledger.sqlite").exists() and ledger(home).arm_runs("wd")
                 and (arm_run(home)["last_step"] or 0) >= 20, 180, "the arm past step 20")
        pause = home / "wd" / "PAUSE"
        pause.touch()
        wait_for(lambda: arm_run(home)["state"] == "pending" and "paused" in (arm_run(home)["reason"] or ""), 60,
                 "the arm to pause")
        paused_step = arm_run(home)["last_step"]
        assert proc.poll() is None, "a paused run waits; it does not exit"
        assert len(ledger(home).attempts(arm_run(home)["id"])) == 1
        pause.unlink()
        assert proc.wait(240) == 0, (tmp_path / "log").read_text()
    finally:
        proc.kill()
    final = arm_run(home)
    assert final["state"] == "succeeded" and final["last_step"] > paused_step
    steps = metric_steps(home / "wd" / "base" / "seed0")
    assert steps == sorted(steps) and sorted(set(steps)) == list(range(5, 301, 5))
