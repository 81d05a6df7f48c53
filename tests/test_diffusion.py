import contextlib
import math

import pytest
import torch
from pydantic import ValidationError

from tests.trainer_helpers import (TINY_DATA, assert_bit_exact_resume, assert_outputs, judge_dir,  # noqa: F401
                                   rows)
from trainers import diffusion
from trainers.common import Run

TINY = {"steps": 20, "batch_size": 8, "log_every": 1, "eval_every": 10, "checkpoint_every": 5, "warmup_steps": 5,
        "unet": {"channels": 8, "channel_mult": [1, 2], "attn_resolutions": [8], "dropout": 0.1},
        "guidance_scale": 2.0, "sample_steps": 4, "ddim_eta": 0.5, "eval_samples": 64}


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    return judge_dir(tmp_path_factory)


def cfg_of(enc, **over):
    return diffusion.Config.model_validate({**TINY, "data": TINY_DATA, "judge_dir": enc, **over})


def test_schedules():
    t = torch.linspace(0, 1, 101)
    for schedule in ("cosine", "linear"):
        ab = diffusion.alpha_bar(schedule, t)
        assert ab[0] > 0.999 and ab[-1] < 1e-3 and (ab[1:] <= ab[:-1]).all()
        a, s = diffusion.alpha_sigma(schedule, t)
        assert torch.allclose(a ** 2 + s ** 2, torch.ones(101))
    # DDPM's discrete linear schedule: alphabar after 500 of 1000 steps
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    discrete = torch.cumprod(1 - betas, 0)[499].item()
    assert diffusion.alpha_bar("linear", torch.tensor(0.5)).item() == pytest.approx(discrete, rel=0.02)


@pytest.mark.parametrize("objective", ["eps", "v", "flow"])
def test_training_pair_inverts(objective):
    cfg = diffusion.Config(objective=objective)
    x0, noise, t = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.rand(4)
    x_t, target = diffusion.training_pair(cfg, x0, t, noise)
    tt = t[:, None, None, None]
    if objective == "flow":
        assert torch.allclose(x_t + (1 - tt) * target, noise, atol=1e-5)  # integrating u from t to 1
    else:
        a, s = (v[:, None, None, None] for v in diffusion.alpha_sigma(cfg.schedule, t))
        rec = (x_t - s * target) / a if objective == "eps" else a * x_t - s * target
        assert torch.allclose(rec, x0, atol=1e-4)


@pytest.mark.parametrize("objective", ["v", "flow"])
def test_eps_weighting_makes_the_loss_the_implied_noise_mse(objective):
    """With loss_weighting eps, an objective's weighted MSE equals the MSE of the noise estimate its
    prediction implies, so the v (or flow) arm changes the parameterisation and not the weighting."""
    cfg = diffusion.Config(objective=objective)
    x0, noise, t = torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8), torch.rand(6)
    x_t, target = diffusion.training_pair(cfg, x0, t, noise)
    pred = target + 0.3 * torch.randn_like(target)  # an imperfect model
    tt = t[:, None, None, None]
    if objective == "v":
        a, s = (v[:, None, None, None] for v in diffusion.alpha_sigma(cfg.schedule, t))
        eps_hat = s * x_t + a * pred
    else:
        eps_hat = x_t + (1 - tt) * pred
    eps_mse = (eps_hat - noise).pow(2).flatten(1).mean(1)
    weighted = (pred - target).pow(2).flatten(1).mean(1) * diffusion.loss_weight(cfg, t)
    assert torch.allclose(weighted, eps_mse, rtol=1e-4, atol=1e-6)
    native = diffusion.Config(objective=objective, loss_weighting="native")
    assert diffusion.loss_weight(native, t) is None and diffusion.loss_weight(diffusion.Config(), t) is None
    if objective == "v":  # plain v-MSE would weight the x0 error by 1 + SNR, eps-MSE by SNR
        snr = (a / s).pow(2).flatten()
        assert torch.allclose(diffusion.loss_weight(cfg, t), snr / (1 + snr), rtol=1e-4)


def test_ema_beta_zero_samples_from_the_raw_weights(tmp_path, enc):
    cfg = cfg_of(enc, steps=3, eval_every=100, checkpoint_every=3, ema_beta=0.0, eval_samples=8)
    run = Run(cfg, tmp_path)
    diffusion.train(cfg, run)
    run.close()
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["ema"].keys() == ckpt["model"].keys()
    assert all(torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in ckpt["model"])


class NoRun:
    """The one piece of Run the samplers use."""

    def autocast(self):
        return contextlib.nullcontext()


class Oracle(torch.nn.Module):
    """The exact minimiser of each objective when the data is one image x*."""
    num_classes = 8

    def __init__(self, cfg, x_star):
        super().__init__()
        self.cfg, self.x_star = cfg, x_star

    def forward(self, x, t, labels):
        tt = t[:, None, None, None]
        if self.cfg.objective == "flow":
            return (x - self.x_star) / tt.clamp(min=1e-8)
        a, s = (v[:, None, None, None] for v in diffusion.alpha_sigma(self.cfg.schedule, t))
        eps = (x - a * self.x_star) / s
        return eps if self.cfg.objective == "eps" else a * eps - s * self.x_star


@pytest.mark.parametrize("objective,schedule,eta", [("eps", "cosine", 0.0), ("eps", "linear", 1.0),
                                                    ("v", "cosine", 0.5), ("v", "linear", 0.0),
                                                    ("flow", "cosine", 0.0)])
def test_samplers_reach_the_data_with_an_exact_model(objective, schedule, eta):
    cfg = diffusion.Config(objective=objective, schedule=schedule, ddim_eta=eta, sample_steps=10)
    x_star = torch.rand(1, 3, 8, 8) * 1.6 - 0.8
    out = diffusion.sample(Oracle(cfg, x_star), (5, 3, 8, 8), torch.zeros(5, dtype=torch.long), cfg,
                           torch.Generator().manual_seed(0), NoRun())
    assert torch.allclose(out, x_star.expand(5, -1, -1, -1), atol=1e-3)


def test_classifier_free_guidance_combines_branches():
    class Const(torch.nn.Module):
        num_classes = 8

        def forward(self, x, t, labels):
            return labels.float()[:, None, None, None].expand(-1, *x.shape[1:])

    labels = torch.tensor([2, 5])
    x = torch.zeros(2, 3, 4, 4)
    for w in (1.0, 3.0):
        cfg = diffusion.Config(guidance_scale=w)
        out = diffusion.guided(Const(), x, torch.tensor(0.5), labels, cfg, NoRun())
        expected = 8 + w * (labels.float() - 8)  # null label 8 = unconditional branch
        assert torch.allclose(out[:, 0, 0, 0], expected)


def test_unet_shapes():
    u = diffusion.UNetConfig(channels=8, channel_mult=[1, 2, 2], attn_resolutions=[8, 4])
    for in_ch, res in ((3, 16), (3, 32), (4, 8)):
        net = diffusion.UNet(in_ch, res, 8, u)
        x = torch.randn(2, in_ch, res, res)
        assert net(x, torch.rand(2), torch.tensor([0, 8])).shape == x.shape


def test_subprocess_outputs_and_bit_exact_resume(tmp_path, enc):
    out = assert_bit_exact_resume("diffusion", {**TINY, "data": TINY_DATA, "judge_dir": enc}, tmp_path)
    assert_outputs(out, diffusion)


def test_learns(tmp_path, enc):
    cfg = cfg_of(enc, objective="eps", steps=120, batch_size=32, log_every=10, eval_every=150,
                 checkpoint_every=150, guidance_scale=1.0, ddim_eta=0.0, sample_steps=10, warmup_steps=10,
                 unet={"channels": 16, "channel_mult": [1, 2], "attn_resolutions": [8]}, eval_samples=128)
    run = Run(cfg, tmp_path)
    diffusion.train(cfg, run)
    run.close()
    rs = rows(tmp_path)
    losses = [r["loss"] for r in rs if "loss" in r]
    assert losses[-1] < 0.5 * losses[0]
    init, final = rs[0], rs[-1]
    assert final["kid_scratchenc"] < 0.5 * init["kid_scratchenc"]
    assert final["coverage_scratchenc"] > init["coverage_scratchenc"] + 0.05


def test_config_checks():
    with pytest.raises(ValidationError):
        diffusion.Config(guidance_scale=3.0, class_cond=False)
    with pytest.raises(ValidationError):
        diffusion.Config.model_validate({"unet": {"channels": 6, "heads": 4}})
    with pytest.raises(ValidationError):  # 18 -> 9 -> 5 would not upsample back to 9
        diffusion.Config.model_validate({"data": {"resolution": 18}})
    assert math.isclose(diffusion.lr_at(diffusion.Config(lr=1.0, warmup_steps=4), 1), 0.5)
