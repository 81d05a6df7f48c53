"""Orchestration overhead: N arms through `armature ablation` against the same trainer commands
started by a plain shell loop (xargs -P) at the same concurrency, measured in one run.

    .venv/bin/python tests/bench/bench_overhead.py [--few 4] [--many 12] [--short-steps 20] [--long-steps 2000]

Prints wall times and their ratio; the overhead per arm (ms) is how the overhead grows from a small
to a large study, the fixed part what is left. Targets (issue 2): under 0.3 s per arm, and under 5%
of wall time for ~30-second arms.
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

from orchestrator.ledger import Ledger  # noqa: E402
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


def through_armature(spec: Path, home: Path) -> tuple[float, float]:
    """Wall time of `armature ablation`, and the span from its first attempt's start to its last one's end."""
    env = {**os.environ, "ARMATURE_HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "orchestrator", "ablation", str(spec), "--run-id", "bench",
                    "--metrics-port", "-1"], cwd=REPO, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    attempts = Ledger(home / "ledger.sqlite").query("SELECT started_at, ended_at FROM attempts")
    return wall, max(a["ended_at"] for a in attempts) - min(a["started_at"] for a in attempts)


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


def measure(arms: int, steps: int) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spec = tmp / "spec.yaml"
        spec.write_text(spec_text(arms, steps))
        shell = through_shell_loop(spec, tmp / "shell")
        armature, span = through_armature(spec, tmp / "home")
    print(f"  {arms:2d} arms x {steps} steps, {CONCURRENCY} at a time: shell loop {shell:6.1f} s, armature {armature:6.1f} s "
          f"(ratio {armature / shell:.3f}); its arms ran within {span:.1f} s (ratio {span / shell:.3f})", flush=True)
    return shell, armature, span


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--few", type=int, default=4, help="arms in the small study")
    parser.add_argument("--many", type=int, default=12, help="arms in the large study")
    parser.add_argument("--short-steps", type=int, default=20, help="steps of a short arm (~4 s)")
    parser.add_argument("--long-steps", type=int, default=2000, help="steps of a ~30 s arm (0: skip)")
    args = parser.parse_args()

    print("overhead = armature - shell loop; per arm = its growth from the small to the large study")
    few = measure(args.few, args.short_steps)
    many = measure(args.many, args.short_steps)
    per_arm = ((many[1] - many[0]) - (few[1] - few[0])) / (args.many - args.few)
    fixed = (few[1] - few[0]) - per_arm * args.few
    scheduling = (many[2] - many[0]) / args.many
    print(f"overhead per arm: {per_arm * 1000:.0f} ms (target < 300 ms), of which scheduling (the arms' span "
          f"against the shell loop) {scheduling * 1000:.0f} ms; fixed per study: {fixed:.1f} s "
          f"(Python and torch imports, Ray start and stop, the report)")
    if args.long_steps:
        shell, armature, span = measure(args.few, args.long_steps)
        print(f"~30 s arms: armature adds {(armature - shell) / armature:.1%} of its wall time with its fixed cost, "
              f"{(span - shell) / span:.1%} without it (target < 5%)")


if __name__ == "__main__":
    main()
