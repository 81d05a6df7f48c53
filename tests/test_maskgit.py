import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from trainers import maskgit, metrics, vqvae
from tests.trainer_helpers import REPO, TINY_DATA, judge_dir, rows, without_time
from trainers.common import EXIT_BAD_CONFIG, EXIT_INTERRUPTED, Run, load_artifact, main
from trainers.data import load_split, to_float


DATA = TINY_DATA  # trainer_helpers.judge_dir is a judge of this data
TOK = {"steps": 60, "batch_size": 16, "lr": 3e-3, "log_every": 20, "eval_every": 60, "checkpoint_every": 60,
       "model": {"channels": 8, "code_dim": 8, "codebook_size": 32}, "vq": {"reset_every": 20}, "data": DATA}
TINY = {"steps": 80, "batch_size": 16, "lr": 3e-3, "warmup_steps": 5, "log_every": 1, "eval_every": 40,
        "checkpoint_every": 25, "tokenizer": TOK, "model": {"dim": 32, "depth": 1, "heads": 2, "dropout": 0.1},
        "decode_steps": 4, "eval_samples": 16, "num_inpaint": 8, "data": DATA}


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    return judge_dir(tmp_path_factory)




@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    torch.set_num_threads(1)
    cfg = vqvae.Config.model_validate(TOK)
    run = Run(cfg, out)
    vqvae.train(cfg, run)
    run.close()
    return out


def test_bit_exact_resume_after_sigterm(tmp_path, tokenizer_dir, judge):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({**TINY, "tokenizer_dir": str(tokenizer_dir), "judge_dir": judge, "judge": {"data": DATA}}))
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    p = subprocess.Popen([sys.executable, "-m", "trainers.maskgit", "--config", str(cfg), "--out", str(cut)],
                         cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not ((cut / "metrics.jsonl").exists() and (cut / "metrics.jsonl").read_text().strip()):
        assert p.poll() is None and time.time() < deadline, p.stderr.read().decode()
        time.sleep(0.002)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == EXIT_INTERRUPTED, p.stderr.read().decode()
    cut_at = torch.load(cut / "checkpoints" / "last.pt", weights_only=False)["step"]
    assert 1 <= cut_at < TINY["steps"]

    assert main(maskgit.train, maskgit.Config, ["--config", str(cfg), "--out", str(straight)]) == 0
    assert main(maskgit.train, maskgit.Config, ["--config", str(cfg), "--out", str(cut)]) == 0

    a, b = without_time(rows(straight)), without_time(rows(cut))
    assert [r["step"] for r in b] == list(range(1, TINY["steps"] + 1))
    assert a == b
    sa, sb = load_artifact(straight)["state_dict"], load_artifact(cut)["state_dict"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    summary = json.loads((cut / "summary.json").read_text())
    assert set(maskgit.METRICS) <= set(summary) and summary["diverged"] is False
    assert (cut / "samples" / "samples.png").exists() and (cut / "samples" / "inpaint.png").exists()


def test_standalone_trains_its_tokenizer_and_learns(tmp_path):
    cfg = maskgit.Config.model_validate({**TINY, "steps": 200, "log_every": 20, "eval_every": 100,
                                         "checkpoint_every": 100, "model": {"dim": 32, "depth": 1, "heads": 2},
                                         "judge": {"steps": 30}})
    run = Run(cfg, tmp_path)
    final = maskgit.train(cfg, run)
    run.close()
    assert (tmp_path / "upstream" / "tokenizer" / "artifact.pt").exists()
    assert json.loads((tmp_path / "upstream" / "tokenizer" / "summary.json").read_text())["steps"] == TOK["steps"]
    assert json.loads((tmp_path / "upstream" / "judge" / "summary.json").read_text())["steps"] == 30
    losses = [r["loss"] for r in rows(tmp_path) if "loss" in r]
    assert losses[-1] < losses[0] - 0.3
    K = TOK["model"]["codebook_size"]
    assert final["heldout_masked_acc"] > 3 / K
    assert final["heldout_loss"] < math.log(K)
    assert 0 <= final["inpaint_acc"] <= 1 and final["token_kl"] >= 0 and final["token_diversity_gap"] >= 0

    # a rerun of the finished run reuses the tokenizer and reproduces the final metrics
    run = Run(cfg, tmp_path)
    again = maskgit.train(cfg, run)
    run.close()
    assert json.dumps(again) == json.dumps(final)  # (fid_scratchenc is nan with 16 samples)


class Recorder(torch.nn.Module):
    """Stands in for the transformer: random logits, records how many [MASK] tokens each call sees."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.mask_id, self.seen = vocab, vocab, []

    def forward(self, ids):
        self.seen.append((ids == self.mask_id).sum(1))
        return torch.randn(*ids.shape, self.vocab)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "square"])
def test_decode_follows_schedule_and_keeps_known_tokens(tmp_path, schedule):
    cfg = maskgit.Config(mask_schedule=schedule, decode_steps=6, tokenizer_dir="unused")
    run = Run(cfg, tmp_path)
    run.close()
    model, L = Recorder(10), 16
    known = torch.randint(0, 10, (3, L))
    mask = torch.zeros(3, L, dtype=torch.bool)
    mask[0] = True
    mask[1, 4:12] = True  # sample 2 has nothing to fill
    out = maskgit.decode(model, known, mask, cfg, torch.Generator().manual_seed(0), run)
    assert out.shape == known.shape and out.max() < 10 and out.min() >= 0
    assert torch.equal(out[~mask], known[~mask])
    assert len(model.seen) == 6
    expect = mask.sum(1)
    n0 = expect.clone()
    for t, seen in enumerate(model.seen):
        assert torch.equal(seen, expect)
        gamma = maskgit.mask_fraction(schedule, torch.tensor((t + 1) / 6))
        expect = torch.minimum(torch.floor(n0 * gamma + 1e-6).long(), (expect - 1).clamp(min=0))
    assert expect.sum() == 0


def test_mask_schedules():
    r = torch.tensor([0.0, 0.5, 1.0])
    for s in ("cosine", "linear", "square"):
        f = maskgit.mask_fraction(s, r)
        assert f[0] == 1 and abs(f[2]) < 1e-6 and 0 < f[1] < 1
    assert maskgit.mask_fraction("square", r)[1] > maskgit.mask_fraction("linear", r)[1]


def test_missing_tokenizer_dir_is_a_config_error(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({**TINY, "tokenizer_dir": str(tmp_path / "nothing")}))
    assert main(maskgit.train, maskgit.Config, ["--config", str(cfg), "--out", str(tmp_path / "o")]) == EXIT_BAD_CONFIG
    assert "tokenizer_dir" in capsys.readouterr().err


def test_upstream_declaration():
    assert maskgit.UPSTREAM["tokenizer"]["trainer"] == "vqvae"
    assert maskgit.UPSTREAM["tokenizer"]["dir_field"] in maskgit.Config.model_fields
    assert isinstance(maskgit.Config().tokenizer, vqvae.Config)


class Oracle(torch.nn.Module):
    """Stands in for the transformer: confidently predicts row i % len(truth) of `truth` for row i."""

    def __init__(self, truth, vocab):
        super().__init__()
        self.truth, self.vocab, self.mask_id = truth, vocab, vocab

    def forward(self, ids):
        rows = self.truth[torch.arange(ids.shape[0]) % len(self.truth)]
        return 20.0 * torch.nn.functional.one_hot(rows, self.vocab).float()


def test_samples_are_judged_as_images(tmp_path, tokenizer_dir, judge):
    """An oracle that knows the held-out tokens inpaints exactly the tokenizer's reconstruction, and its
    samples score a far better KID than a model of a collapsed codebook, whose token accuracy is perfect."""
    cfg = maskgit.Config.model_validate({**TINY, "eval_samples": 64, "tokenizer_dir": str(tokenizer_dir),
                                         "judge_dir": judge, "judge": {"data": DATA}})
    run = Run(cfg, tmp_path)
    tok = vqvae.load_tokenizer(tokenizer_dir)
    train_u8, held_u8 = load_split(cfg.data, "train")[0], load_split(cfg.data, "heldout")[0]
    evaluator = metrics.build_evaluator(cfg, run, train_u8, held_u8)
    held = maskgit.tokenize(tok, held_u8, "cpu")
    grid = (4, 4)
    K = tok.codebook_size

    good, _, _ = maskgit.evaluate(Oracle(held, K), cfg, held, held_u8, tok, evaluator, grid, run)
    assert good["heldout_masked_acc"] == 1.0 and good["inpaint_acc"] == 1.0
    recon = maskgit.detokenize(tok, held[:cfg.num_inpaint], grid)
    hole = (slice(None), slice(None), slice(4, 12), slice(4, 12))  # the centre 2x2 tokens of 4 px
    expected = (recon[hole] - to_float(held_u8[:cfg.num_inpaint])[hole]).pow(2).mean().item()
    assert good["inpaint_mse"] == pytest.approx(expected, rel=1e-5) and good["inpaint_mse"] > 0

    collapsed = torch.zeros_like(held)  # every image is one code
    bad, _, _ = maskgit.evaluate(Oracle(collapsed, K), cfg, collapsed, held_u8, tok, evaluator, grid, run)
    run.close()
    assert bad["heldout_masked_acc"] == 1.0
    assert bad["kid_scratchenc"] > 1.2 * good["kid_scratchenc"]  # (the tiny tokenizer's reconstructions are poor too)
    assert bad["diversity_gap"] == math.inf and bad["inpaint_mse"] > good["inpaint_mse"]
    assert set(metrics.DIRECTIONS) <= set(good) and maskgit.METRICS["kid_scratchenc"] == "min"
