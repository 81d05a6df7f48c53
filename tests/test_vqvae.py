import json
import os
import signal
import subprocess
import sys
import time

import torch

from trainers import vqvae
from tests.trainer_helpers import REPO, rows, without_time
from trainers.common import EXIT_DIVERGED, EXIT_INTERRUPTED, Run, load_artifact, main
from trainers.data import to_float, load_split




TINY = {"steps": 120, "batch_size": 16, "lr": 3e-3, "log_every": 1, "eval_every": 30, "checkpoint_every": 25,
        "model": {"channels": 8, "code_dim": 8, "codebook_size": 32},
        "vq": {"reset_every": 20}, "data": {"num_train": 256, "num_heldout": 64}}


def trainer(cfg_path, out):
    return subprocess.Popen([sys.executable, "-m", "trainers.vqvae", "--config", str(cfg_path), "--out", str(out)],
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_bit_exact_resume_after_sigterm(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY))
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    p_cut = trainer(cfg, cut)  # the interrupted attempt is a real process receiving a real SIGTERM
    deadline = time.time() + 120
    while not ((cut / "metrics.jsonl").exists() and (cut / "metrics.jsonl").read_text().strip()):
        assert p_cut.poll() is None and time.time() < deadline, p_cut.stderr.read().decode()
        time.sleep(0.002)
    p_cut.send_signal(signal.SIGTERM)
    assert p_cut.wait(timeout=120) == EXIT_INTERRUPTED, p_cut.stderr.read().decode()
    cut_at = torch.load(cut / "checkpoints" / "last.pt", weights_only=False)["step"]
    assert 1 <= cut_at < TINY["steps"]

    # the straight run and the resumption go through the same entry point in-process (saves two torch imports)
    assert main(vqvae.train, vqvae.Config, ["--config", str(cfg), "--out", str(straight)]) == 0
    assert main(vqvae.train, vqvae.Config, ["--config", str(cfg), "--out", str(cut)]) == 0

    a, b = without_time(rows(straight)), without_time(rows(cut))
    assert [r["step"] for r in b] == sorted({r["step"] for r in b})  # no duplicate steps
    assert a == b
    sa, sb = load_artifact(straight)["state_dict"], load_artifact(cut)["state_dict"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    sum_a = json.loads((straight / "summary.json").read_text())
    sum_b = json.loads((cut / "summary.json").read_text())
    for k in vqvae.METRICS:
        assert sum_a[k] == sum_b[k]
    assert (cut / "samples" / "recon.png").exists()


def test_learns_and_tokenizer_api(tmp_path):
    cfg = vqvae.Config.model_validate({**TINY, "steps": 150, "log_every": 10, "checkpoint_every": 150})
    run = Run(cfg, tmp_path)
    final = vqvae.train(cfg, run)
    run.close()
    losses = [r["loss"] for r in rows(tmp_path) if "loss" in r]
    assert losses[-1] < 0.6 * losses[0]
    assert set(vqvae.METRICS) <= set(final)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["diverged"] is False and summary["steps"] == 150
    assert 0 < summary["codebook_usage"] <= 1 and summary["dead_codes"] == round(32 * (1 - summary["codebook_usage"]))
    assert 1 <= summary["perplexity"] <= 32 and 4 / 32 <= summary["top4_mass"] <= 1

    tok = vqvae.load_tokenizer(tmp_path, "cpu")
    x = to_float(load_split(cfg.data, "heldout")[0][:5])
    ids = tok.encode(x)
    assert ids.shape == (5, 4, 4) and ids.dtype == torch.int64 and 0 <= ids.min() and ids.max() < 32
    rec = tok.decode(ids)
    assert rec.shape == x.shape and not tok.training
    assert ((rec - x) ** 2).mean() < ((x - x.mean()) ** 2).mean()


def test_codebook_loss_variant_without_resets(tmp_path):
    cfg = vqvae.Config.model_validate({**TINY, "steps": 30, "log_every": 10, "eval_every": 30,
                                       "vq": {"ema": False, "dead_code_reset": False}})
    run = Run(cfg, tmp_path)
    vqvae.train(cfg, run)
    run.close()
    tok = vqvae.load_tokenizer(tmp_path)
    assert isinstance(tok.quant.codebook, torch.nn.Parameter)
    assert "codes_reset" not in "".join((tmp_path / "metrics.jsonl").read_text())


def test_dead_code_reset_revives_codes():
    vq = vqvae.VQConfig(ema=True)
    q = vqvae.Quantizer(8, 2, vq)
    q.usage[:] = torch.tensor([5.0, 0, 3, 0, 0, 1, 1, 1])
    flat = torch.randn(20, 2)
    n = q.reset_dead(flat, torch.Generator().manual_seed(0))
    assert n == 3 and q.usage.sum() == 0
    for i in (1, 3, 4):
        assert (q.codebook[i][None] == flat).all(1).any()


def test_absurd_lr_diverges(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({**TINY, "lr": 1e6, "steps": 30}))
    assert main(vqvae.train, vqvae.Config, ["--config", str(cfg), "--out", str(tmp_path / "o")]) == EXIT_DIVERGED
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["diverged"] is True


def test_default_config_is_valid():
    cfg = vqvae.Config()
    assert cfg.model.codebook_size == 128 and cfg.vq.beta == 0.25 and cfg.model.downsample == 4
    assert vqvae.UPSTREAM == {}
