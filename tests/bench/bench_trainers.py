"""Training throughput (images/s) of every trainer at a fixed small config, in one run.

    .venv/bin/python tests/bench/bench_trainers.py [--device cpu|cuda] [--variants fp32,bf16,compile]

Each trainer runs twice as a real subprocess (`python -m trainers.<name>`), for S and 3S steps; the
difference removes start-up, data generation and the final evaluation, leaving the cost of 2S
training steps. Figures are printed as images/s and as ratios against the first trainer (vqvae)
measured in the same run; on a GPU the variants compare fp32, bf16 autocast and torch.compile.
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


def run_seconds(trainer: str, steps: int, extra: dict, device: str, work: Path) -> float:
    config = {"steps": steps, "batch_size": BATCH, "eval_every": steps, "checkpoint_every": steps, "log_every": 10,
              "data": DATA, "device": device, **TRAINERS[trainer], **extra}
    if trainer in ("dcgan", "progan", "vae", "diffusion", "latent_diffusion"):
        config["eval_samples"] = 32
    if trainer == "maskgit":
        config.update(num_samples=8, num_inpaint=8)
    out = work / f"{trainer}-{steps}-{json.dumps(extra, sort_keys=True)}"
    (work / "config.json").write_text(json.dumps(config))
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", f"trainers.{trainer}", "--config", str(work / "config.json"),
                    "--out", str(out)], cwd=REPO, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--variants", default=None, help="comma list of fp32,bf16,compile (default: fp32 on cpu)")
    parser.add_argument("--steps", type=int, default=30, help="S: the runs take S and 3S steps")
    args = parser.parse_args()
    variants = (args.variants or ("fp32" if args.device == "cpu" else "fp32,bf16,compile")).split(",")
    baseline = None
    print(f"batch {BATCH}, {DATA['resolution']} px, device {args.device}; images/s over {2 * args.steps} steps")
    with tempfile.TemporaryDirectory() as tmp:
        for trainer in TRAINERS:
            cells = []
            for variant in variants:
                extra = VARIANTS[variant]
                short = run_seconds(trainer, args.steps, extra, args.device, Path(tmp))
                long = run_seconds(trainer, 3 * args.steps, extra, args.device, Path(tmp))
                images_per_s = BATCH * 2 * args.steps / max(long - short, 1e-6)
                baseline = baseline or images_per_s
                cells.append(f"{variant} {images_per_s:8.0f} img/s ({images_per_s / baseline:5.2f}x vqvae {variants[0]})")
            print(f"{trainer:17s} " + "   ".join(cells), flush=True)


if __name__ == "__main__":
    main()
