"""Training throughput (images/s) of every trainer at a fixed small config, in one run.

    .venv/bin/python tests/bench/bench_trainers.py [--device cpu|cuda] [--variants fp32,bf16,compile]

Each trainer runs as a real subprocess (`python -m trainers.<name>`) for S steps; its own
metrics.jsonl timestamps between step 10 and step S-10 give the training rate, without start-up,
data generation, compilation warm-up or the final evaluation. Figures are printed as images/s and
as ratios against the first trainer (vqvae) measured in the same run; on a GPU the variants compare
fp32, bf16 autocast and torch.compile.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BATCH = 32
DATA = {"num_train": 512, "num_heldout": 64, "resolution": 16}
TRAINERS = {
    "vqvae": {},
    "maskgit": {"tokenizer": {"steps": 20, "eval_every": 20, "checkpoint_every": 20, "data": DATA}},
    "dcgan": {},
    "progan": {},
    "vae": {},
    "diffusion": {},
    "latent_diffusion": {"autoencoder": {"steps": 20, "eval_every": 20, "checkpoint_every": 20}},
}
VARIANTS = {"fp32": {"bf16": False}, "bf16": {"bf16": True}, "compile": {"bf16": True, "compile": True}}


def images_per_second(trainer: str, steps: int, extra: dict, device: str, work: Path) -> float:
    config = {"steps": steps, "batch_size": BATCH, "eval_every": steps, "checkpoint_every": steps, "log_every": 10,
              "data": DATA, "device": device, **TRAINERS[trainer], **extra}
    if trainer in ("dcgan", "progan", "vae", "diffusion", "latent_diffusion"):
        config["eval_samples"] = 32
    if trainer == "maskgit":
        config.update(eval_samples=8, num_inpaint=8)
    out = work / f"{trainer}-{json.dumps(extra, sort_keys=True)}"
    (work / "config.json").write_text(json.dumps(config))
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    subprocess.run([sys.executable, "-m", f"trainers.{trainer}", "--config", str(work / "config.json"),
                    "--out", str(out)], cwd=REPO, env=env, check=True, capture_output=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = {row["step"]: row["time"] for row in rows if 10 <= row["step"] <= steps - 10}
    first, last = min(times), max(times)
    return BATCH * (last - first) / (times[last] - times[first])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--variants", default=None, help="comma list of fp32,bf16,compile (default: fp32 on cpu)")
    parser.add_argument("--steps", type=int, default=120, help="S: training steps per run")
    args = parser.parse_args()
    variants = (args.variants or ("fp32" if args.device == "cpu" else "fp32,bf16,compile")).split(",")
    baseline = None
    print(f"batch {BATCH}, {DATA['resolution']} px, device {args.device}; images/s from steps 10..{args.steps - 10}")
    with tempfile.TemporaryDirectory() as tmp:
        for trainer in TRAINERS:
            cells = []
            for variant in variants:
                rate = images_per_second(trainer, args.steps, VARIANTS[variant], args.device, Path(tmp))
                baseline = baseline or rate
                cells.append(f"{variant} {rate:7.0f} img/s ({rate / baseline:5.2f}x vqvae {variants[0]})")
            print(f"{trainer:17s} " + "   ".join(cells), flush=True)


if __name__ == "__main__":
    main()
