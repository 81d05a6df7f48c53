"""What a GPU does with the trainers, in one run of a few minutes (ratios are within this run):

    .venv/bin/python tests/bench/bench_gpu.py [--steps 120] [--pack 1,2,4,8]

1. each trainer's training images/s in fp32 eager, bf16 autocast and bf16 + torch.compile (bench_trainers.py's
   measurement: a real trainer subprocess, rate from its metrics.jsonl timestamps past warm-up);
2. host synchronisations per training step (torch.cuda.set_sync_debug_mode through ARMATURE_SYNC_DEBUG: every
   synchronising call prints a warning; log, evaluation and checkpoint steps included, so read the figure as an
   upper bound of the syncs inside a plain step);
3. packing: N small DCGAN arms through `armature ablation` with `resources.gpus: 1/N`, aggregate images/s while
   they run against one arm alone (the N = 1 run);
4. NVML against nvidia-smi: temperature and memory of every GPU read both ways at the same moment.

Without a CUDA device it says so and exits 0 (`make bench` runs every bench script).
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

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_trainers import BATCH, TRAINERS, VARIANTS, images_per_second  # noqa: E402

SYNC_WARNING = "called a synchronizing CUDA operation"


def trainer_rates(steps: int, work: Path) -> None:
    print(f"== 1. training images/s, batch {BATCH}, steps 10..{steps - 10}")
    for trainer in TRAINERS:
        rates = {v: images_per_second(trainer, steps, VARIANTS[v], "cuda", work) for v in ("fp32", "bf16", "compile")}
        print(f"{trainer:17s} fp32 {rates['fp32']:8.0f}   bf16 {rates['bf16']:8.0f} ({rates['bf16'] / rates['fp32']:.2f}x)"
              f"   bf16+compile {rates['compile']:8.0f} ({rates['compile'] / rates['fp32']:.2f}x fp32 eager)", flush=True)


def host_syncs(steps: int, work: Path) -> None:
    print(f"== 2. host synchronisations per step ({steps} steps, bf16, eager; every step kind included)")
    for trainer in TRAINERS:
        config = {"steps": steps, "batch_size": BATCH, "eval_every": steps, "checkpoint_every": steps,
                  "log_every": 10, "device": "cuda", "bf16": True, **TRAINERS[trainer]}
        (work / "sync.json").write_text(json.dumps(config))
        out = subprocess.run([sys.executable, "-m", f"trainers.{trainer}", "--config", str(work / "sync.json"),
                              "--out", str(work / f"sync-{trainer}")], cwd=REPO, capture_output=True, text=True,
                             env={**os.environ, "ARMATURE_SYNC_DEBUG": "1"})
        count = out.stderr.count(SYNC_WARNING)
        print(f"{trainer:17s} {count / steps:6.2f} syncs/step ({count} in all, exit {out.returncode})", flush=True)


def packed_rate(arms: int, steps: int, home: Path) -> float:
    """Aggregate training images/s of `arms` DCGAN arms sharing the GPU (1/arms GPU each), from their own
    metrics.jsonl: images trained past warm-up over the span in which they trained."""
    spec = home / f"pack{arms}.yaml"
    spec.write_text("\n".join([
        f"name: pack{arms}", "trainer: dcgan", "metric: {name: kid_scratchenc, mode: min}", "seeds: 1",
        "base:", f"  steps: {steps}", f"  batch_size: {BATCH}", f"  eval_every: {steps}",
        f"  checkpoint_every: {steps}", "  log_every: 10", "  eval_samples: 64", "  judge: {steps: 50}",
        "arms:", *[f"  - name: a{i}\n    set: {{lr: {2e-4 * (1 + i / 100):.6g}}}" for i in range(arms)],
        f"resources: {{gpus: {1 / arms:.4f}, cpus: 1}}", ""]))
    env = {**os.environ, "ARMATURE_HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([sys.executable, "-m", "orchestrator", "ablation", str(spec), "--run-id", f"pack{arms}",
                    "--metrics-port", "-1", "--yes"], cwd=REPO, env=env, check=True, capture_output=True)
    begin, end, images = float("inf"), 0.0, 0
    for metrics in (home / f"pack{arms}").glob("a*/seed0/metrics.jsonl"):
        times = {row["step"]: row["time"] for row in map(json.loads, metrics.read_text().splitlines())}
        first, last = min(s for s in times if s >= 10), max(times)
        begin, end, images = min(begin, times[first]), max(end, times[last]), images + BATCH * (last - first)
    return images / (end - begin)


def packing(counts: list[int], steps: int, work: Path) -> None:
    print(f"== 3. packing DCGAN arms on one GPU ({steps} steps each), aggregate images/s")
    alone = None
    for arms in counts:
        rate = packed_rate(arms, steps, work / f"home{arms}")
        alone = alone or rate
        print(f"{arms} arm(s) at {1 / arms:.3g} GPU each: {rate:8.0f} img/s ({rate / alone:.2f}x one arm alone)",
              flush=True)


def nvml_against_smi() -> None:
    from orchestrator.telemetry.gpu import LocalGpus, SmiGpus
    print("== 4. NVML against nvidia-smi")
    nvml, smi = LocalGpus(), SmiGpus()
    by_nvml = {s.gpu: s for s in nvml.read()}
    for sample in smi.read():
        other = by_nvml.get(sample.gpu)
        if other is None:
            print(f"gpu {sample.gpu}: nvidia-smi only")
            continue
        dtemp = abs((sample.temperature_celsius or 0) - (other.temperature_celsius or 0))
        dmem = abs((sample.memory_used_bytes or 0) - (other.memory_used_bytes or 0)) / (sample.memory_total_bytes or 1)
        print(f"gpu {sample.gpu} {sample.name}: temperature differs by {dtemp:.0f} C, memory used by {dmem:.2%} "
              f"of the card ({'within' if dtemp <= 1 and dmem <= 0.01 else 'OUTSIDE'} 1 C and 1%)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--pack", default="1,2,4,8")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; nothing measured")
        return
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        trainer_rates(args.steps, work)
        host_syncs(args.steps, work)
        packing([int(n) for n in args.pack.split(",")], args.steps * 4, work)
        nvml_against_smi()


if __name__ == "__main__":
    main()
