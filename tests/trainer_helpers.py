"""Shared pieces of the generative trainers' tests (dcgan, progan, vae, diffusion, latent_diffusion)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from trainers import judge
from trainers.common import DataConfig, EXIT_INTERRUPTED, Run

REPO = Path(__file__).resolve().parents[1]
TINY_DATA = {"resolution": 16, "num_train": 256, "num_heldout": 64}




def judge_dir(tmp_path_factory) -> str:
    """The folder of a judge run on TINY_DATA, trained once per pytest session and handed to trainers
    as `judge_dir`, so their runs and subprocesses load it instead of training their own."""
    path = tmp_path_factory.getbasetemp() / "judge-tiny"
    if not (path / "summary.json").exists():
        cfg = judge.Config(data=DataConfig(**TINY_DATA))
        run = Run(cfg, path)
        judge.train(cfg, run)
        run.close()
    return str(path)



def rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def without_time(rs):
    return [{k: v for k, v in r.items() if k != "time"} for r in rs]


def start(trainer, cfg_path, out):
    return subprocess.Popen([sys.executable, "-m", f"trainers.{trainer}", "--config", str(cfg_path), "--out", str(out)],
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def assert_same(a, b, where="checkpoint"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), where  # nan (e.g. FID of too few samples) equals nan


def assert_bit_exact_resume(trainer, cfg: dict, tmp_path):
    """A straight run and a SIGTERM-interrupted + resumed run log identical rows and end with
    identical checkpoints (weights, optimiser and RNG states) and summaries."""
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(json.dumps(cfg))
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    p_straight, p_cut = start(trainer, cfg_path, straight), start(trainer, cfg_path, cut)
    deadline = time.time() + 120
    while not any(r.get("step", 0) > 0 for r in (rows(cut) if (cut / "metrics.jsonl").exists() else [])):
        assert p_cut.poll() is None and time.time() < deadline, p_cut.stderr.read().decode()
        time.sleep(0.005)
    p_cut.send_signal(signal.SIGTERM)
    assert p_cut.wait(timeout=120) == EXIT_INTERRUPTED, p_cut.stderr.read().decode()
    cut_at = torch.load(cut / "checkpoints" / "last.pt", weights_only=False)["step"]
    assert 1 <= cut_at < cfg["steps"]
    assert p_straight.wait(timeout=180) == 0, p_straight.stderr.read().decode()
    p_resume = start(trainer, cfg_path, cut)
    assert p_resume.wait(timeout=180) == 0, p_resume.stderr.read().decode()

    a, b = without_time(rows(straight)), without_time(rows(cut))
    assert [r["step"] for r in b] == sorted({r["step"] for r in b})  # no duplicated steps
    assert a == b
    ca = torch.load(straight / "checkpoints" / "last.pt", weights_only=False)
    cb = torch.load(cut / "checkpoints" / "last.pt", weights_only=False)
    ca.pop("_wall_time_s")
    cb.pop("_wall_time_s")
    assert_same(ca, cb)
    sa = json.loads((straight / "summary.json").read_text())
    sb = json.loads((cut / "summary.json").read_text())
    for k in ("steps", "wall_time_s"):
        sa.pop(k), sb.pop(k)
    assert sa == sb
    return straight


def assert_outputs(out, trainer_module, grids=("samples",)):
    """summary.json holds every METRICS key (numbers), metrics.jsonl rows carry step, time and loss,
    the sample grids and the artifact exist."""
    out = Path(out)
    summary = json.loads((out / "summary.json").read_text())
    for k in trainer_module.METRICS:
        if k == "fid_scratchenc" and summary.get(k) is None:  # nan: too few samples for the covariance
            continue
        assert isinstance(summary.get(k), (int, float)), (k, summary.get(k))
    assert summary["diverged"] is False
    rs = rows(out)
    assert all("step" in r and "time" in r for r in rs)
    assert any("loss" in r for r in rs)
    for g in grids:
        assert (out / "samples" / f"{g}.png").exists(), g
    assert (out / "artifact.pt").exists()
    return summary
