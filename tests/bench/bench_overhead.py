"""Orchestration overhead: N arms through `armature ablation` against the same trainer commands
started by a plain shell loop (xargs -P) at the same concurrency, measured in one run.

    .venv/bin/python tests/bench/bench_overhead.py [--arms 8] [--short-steps 20] [--long-steps 400]

Prints wall times, their ratio, and the overhead per arm (ms). Targets (issue 2): under 0.3 s per
arm, and under 5% of wall time for ~30-second arms.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from orchestrator.spec import load_plan  # noqa: E402

CONCURRENCY = os.cpu_count() or 2


def spec_text(arms: int, steps: int) -> str:
    arm_lines = "\n".join(f"  - {{name: a{i}, set: {{lr: {0.001 + i * 1e-5}}}}}" for i in range(arms))
    return f"""name: overhead
trainer: vqvae
metric: {{name: recon_mse, mode: min}}
base: {{steps: {steps}, eval_every: {steps}, checkpoint_every: {steps}, log_every: 10, batch_size: 16,
       data.num_train: 128, data.num_heldout: 32}}
arms:
{arm_lines}
resources: {{gpus: 0, cpus: 1}}
"""


def through_armature(spec: Path, home: Path) -> float:
    env = {**os.environ, "ARMATURE_HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "orchestrator", "ablation", str(spec), "--run-id", "bench",
                    "--metrics-port", "-1"], cwd=REPO, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def through_shell_loop(spec: Path, work: Path) -> float:
    plan = load_plan(spec)
    commands = []
    for run in plan.arm_runs:
        out = work / run.arm
        out.mkdir(parents=True)
        (out / "config.json").write_text(json.dumps(run.config))
        commands.append(f"{sys.executable} -m trainers.vqvae --config {out}/config.json --out {out} > {out}/log 2>&1")
    script = work / "commands.txt"
    script.write_text("\n".join(commands) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    start = time.perf_counter()
    subprocess.run(["bash", "-c", f"xargs -P {CONCURRENCY} -I CMD bash -c CMD < {script}"], cwd=REPO, env=env,
                   check=True)
    return time.perf_counter() - start


def measure(arms: int, steps: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spec = tmp / "spec.yaml"
        spec.write_text(spec_text(arms, steps))
        shell = through_shell_loop(spec, tmp / "shell")
        armature = through_armature(spec, tmp / "home")
    overhead = armature - shell
    print(f"{arms} arms x {steps} steps, {CONCURRENCY} at a time: shell loop {shell:.1f} s, armature {armature:.1f} s, "
          f"ratio {armature / shell:.3f}, overhead {overhead * 1000 / arms:.0f} ms per arm "
          f"({overhead / armature:.1%} of armature's wall time; includes Ray start/stop and the report)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arms", type=int, default=8)
    parser.add_argument("--short-steps", type=int, default=20)
    parser.add_argument("--long-steps", type=int, default=0, help="steps for ~30 s arms (0: skip)")
    args = parser.parse_args()
    measure(args.arms, args.short_steps)
    if args.long_steps:
        measure(max(2, args.arms // 2), args.long_steps)


if __name__ == "__main__":
    main()
