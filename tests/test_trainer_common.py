import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainers import common
from trainers.common import (EXIT_BAD_CONFIG, EXIT_DIVERGED, EXIT_INTERRUPTED, DataConfig, Diverged, Run,
                             TrainerConfig, load_artifact, main)



REPO = Path(__file__).resolve().parents[1]


class TinyConfig(TrainerConfig):
    steps: int = 10
    batch_size: int = 4
    lr: float = 0.1
    eval_every: int = 5
    checkpoint_every: int = 5


def rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_atomic_checkpoint(tmp_path):
    run = Run(TinyConfig(), tmp_path)
    w = torch.randn(3, 3)
    run.save_checkpoint(7, {"w": w, "gen": torch.Generator().manual_seed(3).get_state()})
    ckpt = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["last.pt"]  # no .tmp left behind
    state = torch.load(ckpt / "last.pt", weights_only=False)
    assert state["step"] == 7 and torch.equal(state["w"], w) and "_rng" in state
    run.save_checkpoint(8, {"w": w})
    assert sorted(p.name for p in ckpt.iterdir()) == ["last.pt"]
    assert torch.load(ckpt / "last.pt", weights_only=False)["step"] == 8


def test_resume_truncates_metrics_and_restores_rng(tmp_path):
    run = Run(TinyConfig(), tmp_path)
    assert run.resume() is None
    for s in range(1, 6):
        run.log(s, loss=1.0 / s)
    run.save_checkpoint(5, {"x": 1})
    expected = torch.rand(4)
    for s in range(6, 9):
        run.log(s, loss=1.0 / s)
    run.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "lo')  # torn line of a killed writer

    torch.manual_seed(999)
    run2 = Run(TinyConfig(), tmp_path)
    state = run2.resume()
    assert state["step"] == 5 and state["x"] == 1 and "_rng" not in state
    assert torch.equal(torch.rand(4), expected)
    assert [r["step"] for r in rows(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    run2.log(6, loss=0.5)
    run2.close()
    assert [r["step"] for r in rows(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


class Payload:
    """Unpickling this runs code: what a hostile checkpoint or artifact would carry."""

    def __reduce__(self):
        return (os.getpid, ())


def test_checkpoints_and_artifacts_load_without_arbitrary_unpickling(tmp_path):
    run = Run(TinyConfig(), tmp_path)
    run.save_checkpoint(3, {"w": torch.ones(2)})
    assert Run(TinyConfig(), tmp_path).resume()["step"] == 3          # numpy's RNG state is allowed
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    torch.save({**checkpoint, "evil": Payload()}, tmp_path / "checkpoints" / "last.pt")
    with pytest.raises(RuntimeError, match="last.pt: refused"):
        Run(TinyConfig(), tmp_path).resume()
    torch.save({"config": {}, "evil": Payload()}, tmp_path / "artifact.pt")
    with pytest.raises(RuntimeError, match="artifact.pt: refused"):
        load_artifact(tmp_path)


def test_resume_without_checkpoint_drops_stale_metrics(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "time": 0, "loss": 2.0}\n')
    run = Run(TinyConfig(), tmp_path)
    assert run.resume() is None
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_log_check_finite_summary_grid_artifact(tmp_path):
    run = Run(TinyConfig(), tmp_path)
    run.log(1, loss=torch.tensor(0.5), n=3, acc=np.float32(0.25))
    run.check_finite(2, loss=1.0)
    with pytest.raises(Diverged):
        run.check_finite(3, loss=float("nan"), other=1.0)
    run.close()
    r = rows(tmp_path / "metrics.jsonl")
    assert r[0]["loss"] == 0.5 and r[0]["n"] == 3 and r[0]["acc"] == 0.25 and "time" in r[0]
    assert r[1]["step"] == 3 and r[1]["loss"] is None

    run.save_grid("g", torch.rand(10, 3, 16, 16) * 2 - 1)
    run.save_grid("u", torch.randint(0, 255, (4, 3, 8, 8), dtype=torch.uint8))
    assert Image.open(tmp_path / "samples" / "g.png").size[0] > 16
    assert (tmp_path / "samples" / "u.png").exists()

    run.write_summary({"loss": 0.1, "steps": 10})
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["loss"] == 0.1 and s["steps"] == 10 and s["device"] == str(run.device) and s["wall_time_s"] >= 0

    run.save_artifact({"w": torch.ones(2), "config": {"a": 1}})
    art = load_artifact(tmp_path)
    assert torch.equal(art["w"], torch.ones(2)) and art["config"] == {"a": 1}
    assert not list(tmp_path.glob("**/*.tmp"))


def _cfg_file(tmp_path, obj):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return str(p)


def test_main_exit_codes_in_process(tmp_path, capsys):
    def ok(cfg, run):
        run.log(1, loss=1.0)
        run.write_summary({"loss": 1.0})

    def diverge(cfg, run):
        run.check_finite(4, loss=float("inf"))

    def boom(cfg, run):
        raise RuntimeError("kaboom")

    cfg = _cfg_file(tmp_path, {"steps": 3})
    assert main(ok, TinyConfig, ["--config", cfg, "--out", str(tmp_path / "a")]) == 0
    assert main(diverge, TinyConfig, ["--config", cfg, "--out", str(tmp_path / "b")]) == EXIT_DIVERGED
    s = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert s["diverged"] is True
    capsys.readouterr()
    assert main(boom, TinyConfig, ["--config", cfg, "--out", str(tmp_path / "c")]) == 1
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("content, needle", [
    ({"steps": "many"}, "steps"),
    ({"stepz": 3}, "stepz: unknown key (closest valid: steps"),
    ({"data": {"resolution": 8}}, "data"),
    ({"data": {"families": ["disc", "blob"]}}, "families"),
    ({"data.resolutoin": 32}, "data.resolutoin: unknown key (closest valid: data.resolution"),
    ("{not json", "not valid JSON"),
])
def test_bad_config_messages(tmp_path, capsys, content, needle):
    called = []
    rc = main(lambda cfg, run: called.append(1), TinyConfig,
              ["--config", _cfg_file(tmp_path, content), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_CONFIG and not called
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_config_file(tmp_path, capsys):
    assert main(lambda c, r: None, TinyConfig, ["--config", str(tmp_path / "nope.json"), "--out", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err


def test_dotted_keys_and_data_defaults():
    cfg = common.load_config(TinyConfig, None, {"data.resolution": 32, "seed": 5})
    assert cfg.data.resolution == 32 and cfg.seed == 5 and cfg.data == DataConfig(resolution=32)


TINY_VQ = {"steps": 400, "batch_size": 8, "log_every": 1, "eval_every": 100, "checkpoint_every": 100,
           "model": {"channels": 4, "code_dim": 4, "codebook_size": 16, "res_blocks": 0},
           "data": {"num_train": 64, "num_heldout": 16}}


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_sigterm_checkpoints_and_exits_143(tmp_path):
    cfg, out = _cfg_file(tmp_path, TINY_VQ), tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "trainers.vqvae", "--config", cfg, "--out", str(out)],
                         cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics, deadline = out / "metrics.jsonl", time.time() + 120
    while not (metrics.exists() and metrics.read_text().strip()):
        assert p.poll() is None and time.time() < deadline, p.stderr.read().decode()
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == EXIT_INTERRUPTED, p.stderr.read().decode()
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert 1 <= state["step"] < TINY_VQ["steps"]
    assert max(r["step"] for r in rows(metrics)) == state["step"]
    assert not (out / "summary.json").exists() and not list(out.glob("**/*.tmp"))


def test_bad_config_subprocess_no_traceback(tmp_path):
    cfg = _cfg_file(tmp_path, {"model": {"codebook_sise": 8}})
    p = subprocess.run([sys.executable, "-m", "trainers.vqvae", "--config", cfg, "--out", str(tmp_path / "o")],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == EXIT_BAD_CONFIG
    assert "model.codebook_sise" in p.stderr and "model.codebook_size" in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
