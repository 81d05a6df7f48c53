import pytest
import torch
from pydantic import ValidationError

from tests.trainer_helpers import (TINY_DATA, assert_bit_exact_resume, assert_outputs, assert_same,  # noqa: F401
                                   encoder_cache, rows, without_time)
from trainers import progan
from trainers.common import Interrupted, Run

TINY = {"steps": 24, "steps_per_level": 8, "batch_size": 8, "log_every": 1, "eval_every": 12, "checkpoint_every": 5,
        "g_width": 8, "d_width": 8, "latent_dim": 16, "eval_samples": 64}


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    return encoder_cache(tmp_path_factory)


def cfg_of(enc, **over):
    return progan.Config.model_validate({**TINY, "data": {**TINY_DATA, "cache_dir": enc}, **over})


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
    out = assert_bit_exact_resume("progan", {**TINY, "data": {**TINY_DATA, "cache_dir": enc}}, tmp_path)
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


@pytest.mark.parametrize("over", [{"loss": "nonsaturating"}, {"progressive": False}])
def test_variants_run(tmp_path, enc, over):
    cfg = cfg_of(enc, steps=6, steps_per_level=2, eval_every=100, **over)
    run = Run(cfg, tmp_path)
    final = progan.train(cfg, run)
    run.close()
    assert set(progan.METRICS) - {"loss_d", "loss_g"} <= set(final)
    resolutions = {r["resolution"] for r in rows(tmp_path) if "loss" in r}
    assert resolutions == ({4, 8, 16} if cfg.progressive else {16})


def test_learns(tmp_path, enc):
    cfg = cfg_of(enc, steps=300, steps_per_level=100, batch_size=32, lr=3e-3, g_width=32, d_width=32,
                 latent_dim=64, log_every=10, eval_every=300, checkpoint_every=300)
    run = Run(cfg, tmp_path)
    progan.train(cfg, run)
    run.close()
    rs = rows(tmp_path)
    init, final = rs[0], rs[-1]
    assert init["step"] == 0 and final["step"] == 300
    assert final["swd"] < 0.75 * init["swd"]
    assert final["fid_scratchenc"] < 0.75 * init["fid_scratchenc"]
    assert final["wdist"] > 0  # the critic tells real from generated
