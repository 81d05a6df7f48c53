import contextlib
import json

import pytest
import torch
from pydantic import ValidationError

from tests.trainer_helpers import (TINY_DATA, assert_bit_exact_resume, assert_outputs, assert_same,  # noqa: F401
                                   judge_dir, rows, without_time)
from trainers import progan
from trainers.common import Interrupted, Run

TINY = {"steps": 24, "steps_per_level": 8, "batch_size": 8, "log_every": 1, "eval_every": 12, "checkpoint_every": 5,
        "g_width": 8, "d_width": 8, "latent_dim": 16, "eval_samples": 64}


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    return judge_dir(tmp_path_factory)


def cfg_of(enc, **over):
    return progan.Config.model_validate({**TINY, "data": TINY_DATA, "judge_dir": enc, **over})


def test_schedule():
    cfg = progan.Config.model_validate({"steps": 100, "steps_per_level": [20, 30], "data": {"resolution": 16}})
    assert progan.level_starts(cfg) == [0, 20, 50]
    assert progan.phase(cfg, 0) == (0, 1.0)
    assert progan.phase(cfg, 20) == (1, 0.0)
    assert progan.phase(cfg, 27) == (1, pytest.approx(7 / 15))   # fades over half of its 30 steps
    assert progan.phase(cfg, 40) == (1, 1.0)
    assert progan.phase(cfg, 75) == (2, 1.0)                      # final level: 50 steps, fade 25
    even = progan.Config.model_validate({"steps": 90, "data": {"resolution": 32}})
    assert progan.level_starts(even) == [0, 22, 44, 66]
    flat = progan.Config.model_validate({"steps": 90, "progressive": False})
    assert progan.phase(flat, 0) == (2, 1.0)
    for bad in ({"steps_per_level": [10]}, {"steps_per_level": 50}, {"data": {"resolution": 24}}):
        with pytest.raises(ValidationError):
            progan.Config.model_validate({"steps": 100, **bad})


def test_networks_grow_and_fade():
    G, D = progan.Generator(16, 16, 3), progan.Discriminator(16, 3, 4)
    z = torch.randn(8, 16)
    for level, res in enumerate((4, 8, 16)):
        for alpha in (0.0, 0.5, 1.0):
            x = G(z, level, torch.tensor(alpha))
            assert x.shape == (8, 3, res, res)
            assert D(x, level, torch.tensor(alpha)).shape == (8,)
    # alpha 0 shows exactly the previous level's output, upsampled
    assert torch.allclose(G(z, 1, torch.tensor(0.0)), progan.up2(G(z, 0, torch.tensor(1.0))), atol=1e-6)
    real = torch.rand(4, 3, 16, 16)
    assert torch.allclose(progan.real_at(real, 1, 3, torch.tensor(0.0)),
                          progan.up2(torch.nn.functional.avg_pool2d(real, 4)), atol=1e-6)


def test_minibatch_stddev():
    x = torch.randn(8, 5, 4, 4)
    y = progan.minibatch_stddev(x, 4)
    assert y.shape == (8, 6, 4, 4) and torch.equal(y[:, :5], x)
    same = progan.minibatch_stddev(torch.ones(8, 5, 4, 4), 4)
    assert same[:, 5].abs().max() < 1e-3  # identical samples: no spread
    assert progan.minibatch_stddev(torch.randn(6, 5, 4, 4), 4).shape == (6, 6, 4, 4)  # group 3 divides 6


def test_subprocess_outputs_and_bit_exact_resume(tmp_path, enc):
    out = assert_bit_exact_resume("progan", {**TINY, "data": TINY_DATA, "judge_dir": enc}, tmp_path)
    assert_outputs(out, progan, grids=("samples", "samples_4px", "samples_8px"))
    assert [r["resolution"] for r in rows(out) if r["step"] in (1, 9, 17)] == [4, 8, 16]


class StopAfter(Run):
    """A run that is 'SIGTERMed' right after its checkpoint at a given step."""
    def __init__(self, cfg, out, at):
        super().__init__(cfg, out)
        self.at = at

    @property
    def stop_requested(self):
        return self.last_step >= self.at


def test_resume_exactly_at_a_level_boundary(tmp_path, enc):
    """The optimisers are re-created when a level starts; a checkpoint taken on the boundary must
    resume into the fresh optimisers too."""
    cfg = cfg_of(enc, steps=20, checkpoint_every=8, eval_every=100, g_width=8)
    straight = Run(cfg, tmp_path / "a")
    progan.train(cfg, straight)
    straight.close()
    cut = StopAfter(cfg, tmp_path / "b", at=8)
    with pytest.raises(Interrupted):
        progan.train(cfg, cut)
    cut.close()
    assert torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=False)["step"] == 8
    resumed = Run(cfg, tmp_path / "b")
    progan.train(cfg, resumed)
    resumed.close()
    assert without_time(rows(tmp_path / "a")) == without_time(rows(tmp_path / "b"))
    a = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=False)
    a.pop("_wall_time_s"), b.pop("_wall_time_s")
    assert_same(a, b)


@pytest.mark.parametrize("over", [{"loss": "nonsaturating"}, {"progressive": False},
                                  {"loss": "nonsaturating", "r1_gamma": 1.0}])
def test_variants_run(tmp_path, enc, over):
    cfg = cfg_of(enc, steps=6, steps_per_level=2, eval_every=100, **over)
    run = Run(cfg, tmp_path)
    final = progan.train(cfg, run)
    run.close()
    assert set(progan.METRICS) - {"loss_d", "loss_g"} <= set(final)
    logged = [r for r in rows(tmp_path) if "loss" in r]
    assert {r["resolution"] for r in logged} == ({4, 8, 16} if cfg.progressive else {16})
    assert all(("r1" in r) == (cfg.r1_gamma > 0) and ("gp" in r) == (cfg.loss == "wgan_gp") for r in logged)


class LinearCritic(torch.nn.Module):
    """D(x) = <w, x>: its gradient with respect to every real image is w."""
    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(w)

    def forward(self, x, level, alpha):
        return (x * self.w).flatten(1).sum(1)


def test_r1_penalty_is_half_gamma_times_the_squared_gradient_norm_on_reals():
    D = LinearCritic(torch.randn(3, 4, 4))
    real, fake = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    losses = {}
    for gamma in (0.0, 3.0):
        cfg = progan.Config(loss="nonsaturating", r1_gamma=gamma)
        losses[gamma], extra = progan.d_loss(cfg, D, D, real, fake, 0, torch.tensor(1.0), None, NoAutocast())
    assert extra["penalty"].item() == pytest.approx(D.w.pow(2).sum().item(), rel=1e-5)
    assert (losses[3.0] - losses[0.0]).item() == pytest.approx(0.5 * 3.0 * D.w.pow(2).sum().item(), rel=1e-5)
    losses[3.0].backward()  # the penalty is differentiable in D's weights: d/dw 0.5 g ||w||^2 = g w + ...
    assert D.w.grad is not None
    with pytest.raises(ValidationError):
        progan.Config(r1_gamma=1.0)  # R1 belongs to the non-saturating loss here


class NoAutocast:
    def autocast(self):
        return contextlib.nullcontext()


def test_summary_averages_the_last_evaluations_and_resumes_them(tmp_path, enc):
    cfg = cfg_of(enc, steps=12, steps_per_level=4, eval_every=4, checkpoint_every=4, eval_average=3,
                 eval_average_every=1, eval_samples=32)
    straight = Run(cfg, tmp_path / "a")
    progan.train(cfg, straight)
    straight.close()
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    evals = {r["step"]: r for r in rows(tmp_path / "a") if "swd" in r}
    assert sorted(evals) == [0, 4, 8, 10, 11, 12]  # the curve every 4 steps, the averaged window 10..12
    assert summary["eval_steps_averaged"] == [10, 11, 12]
    for k in ("swd", "kid_scratchenc", "coverage_scratchenc"):
        assert summary[k] == pytest.approx(sum(evals[s][k] for s in (10, 11, 12)) / 3)
    assert progan.averaged_eval_steps(progan.Config(steps=900)) == [810, 855, 900]  # default: steps // 20 apart
    cut = StopAfter(cfg, tmp_path / "b", at=11)  # the checkpoint holds the evaluations at steps 10 and 11
    with pytest.raises(Interrupted):
        progan.train(cfg, cut)
    cut.close()
    resumed = Run(cfg, tmp_path / "b")
    progan.train(cfg, resumed)
    resumed.close()
    resumed_summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    for s in (summary, resumed_summary):
        s.pop("wall_time_s")
    assert resumed_summary == summary


def test_learns(tmp_path, enc):
    cfg = cfg_of(enc, steps=300, steps_per_level=100, batch_size=32, lr=3e-3, g_width=32, d_width=32,
                 latent_dim=64, log_every=10, eval_every=300, checkpoint_every=300, eval_samples=128)
    run = Run(cfg, tmp_path)
    progan.train(cfg, run)
    run.close()
    rs = rows(tmp_path)
    init, final = rs[0], rs[-1]
    assert init["step"] == 0 and final["step"] == 300
    assert final["kid_scratchenc"] < 0.5 * init["kid_scratchenc"]
    assert final["coverage_scratchenc"] > init["coverage_scratchenc"] + 0.1
    assert final["wdist"] > 0  # the critic tells real from generated
