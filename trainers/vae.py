"""
Convolutional VAE (Kingma & Welling 2014) with a spatial latent [latent_channels, R/f, R/f], a
Gaussian decoder of fixed standard deviation `recon_sigma` (pixels in [-1, 1]) and a KL weight beta
(Higgins et al. 2017): loss = (||x - x_hat||^2 / (2 sigma^2) + beta * KL(q(z|x) || N(0, I))) / D,
with D the number of pixel values. beta = 1 is the ELBO.

`beta_mode: geco` sets beta with GECO (Rezende & Viola 2018, "Taming VAEs"): minimise KL subject to
the reconstruction constraint C = E[(x - x_hat)^2] - geco_tolerance <= 0 (mean over pixel values),
with a Lagrange multiplier lambda updated every step from a moving average of the batch constraint,
C_ma <- geco_alpha C_ma + (1 - geco_alpha) C, lambda <- lambda exp(geco_rate C_ma / geco_tolerance)
(the step in units of the tolerance). Training minimises recon + beta KL with beta = 1 / lambda, the
same minimiser as KL + lambda recon (Adam does not see the overall scale); beta is clipped to BETA_RANGE.

Evaluation on the held-out images: recon_mse decodes the posterior mean; nelbo is the negative ELBO
with beta = 1 in nats per pixel value under the stated likelihood p(x|z) = N(x_hat, recon_sigma^2)
on pixels scaled to [-1, 1] (a continuous density, so it can be negative), estimated with one
posterior sample per image: an upper bound on -log p(x) / D whatever beta the model was trained with.

The artifact is usable as an upstream autoencoder (latent diffusion): `load_autoencoder(dir)`.

    python -m trainers.vae --config config.json --out DIR
"""

import math
import sys
from typing import Literal

import torch
import torch.nn as nn
from pydantic import model_validator

from trainers import metrics
from trainers.common import BadConfig, Run, load_artifact, main, seed_everything
from trainers.data import load_split, to_float, to_uint8
from trainers.judge import JUDGE_UPSTREAM, JudgedConfig

# -----------------------------------------------------------------------------
# config


class Config(JudgedConfig):
    steps: int = 600
    batch_size: int = 64
    lr: float = 1e-3
    log_every: int = 10
    eval_every: int = 200
    checkpoint_every: int = 200
    sample_every: int = 0
    width: int = 32                 # channels at full resolution, doubled at each downsampling
    downsample: int = 4             # f: the latent is R/f x R/f
    latent_channels: int = 4
    recon_sigma: float = 0.1        # decoder standard deviation, in [-1, 1] pixel units
    beta_mode: Literal["fixed", "geco"] = "fixed"
    beta: float = 1.0               # the KL weight (geco: its initial value, 1 / lambda)
    geco_tolerance: float = 0.04    # geco: the reconstruction MSE to meet ([-1, 1] pixels; 0.04 ~ 26/255 RMS)
    geco_alpha: float = 0.99        # geco: moving-average coefficient of the constraint
    geco_rate: float = 0.002        # geco: log lambda moves by geco_rate * C_ma / geco_tolerance per step

    @model_validator(mode="after")
    def _check(self):
        f = self.downsample
        if f < 1 or f & (f - 1) or self.data.resolution % f:
            raise ValueError(f"downsample must be a power of two dividing data.resolution, got {f}")
        if self.beta <= 0 or self.recon_sigma <= 0 or self.geco_tolerance <= 0 or self.geco_rate < 0:
            raise ValueError("need beta > 0, recon_sigma > 0, geco_tolerance > 0, geco_rate >= 0")
        if not 0 <= self.geco_alpha < 1:
            raise ValueError(f"geco_alpha must be in [0, 1), got {self.geco_alpha}")
        return self


METRICS = {"recon_mse": "min", "kl": "min", "nelbo": "min", **metrics.DIRECTIONS}
FLATTERED_BY = {**metrics.FLATTERED_BY,
                "kl": ("posterior collapse: a latent the decoder ignores costs no KL", ("nelbo",))}
UPSTREAM = {"judge": JUDGE_UPSTREAM}
SEED_RANDOMISES = ["model initialisation", "batch order and reparameterisation noise",
                   "prior samples and posterior samples at evaluation", "data draw (data.draw)"]
BETA_RANGE = (1e-4, 1e4)

# -----------------------------------------------------------------------------
# model


def norm(ch):
    return nn.GroupNorm(8 if ch % 8 == 0 else 1, ch)


class ResBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.block = nn.Sequential(norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1),
                                   norm(cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        return self.skip(x) + self.block(x)


class VAE(nn.Module):
    def __init__(self, width, downsample, latent_channels):
        super().__init__()
        self.downsample, self.latent_channels = downsample, latent_channels
        n = int(math.log2(downsample))
        ch = [width * 2 ** i for i in range(n + 1)]
        enc = [nn.Conv2d(3, ch[0], 3, padding=1)]
        for i in range(n):
            enc += [ResBlock(ch[i], ch[i]), nn.Conv2d(ch[i], ch[i + 1], 4, stride=2, padding=1)]
        enc += [ResBlock(ch[-1], ch[-1]), norm(ch[-1]), nn.SiLU(), nn.Conv2d(ch[-1], 2 * latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        dec = [nn.Conv2d(latent_channels, ch[-1], 3, padding=1), ResBlock(ch[-1], ch[-1])]
        for i in reversed(range(n)):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch[i + 1], ch[i], 3, padding=1),
                    ResBlock(ch[i], ch[i])]
        dec += [norm(ch[0]), nn.SiLU(), nn.Conv2d(ch[0], 3, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def encode(self, x):
        """-> (mu, logvar), each [N, latent_channels, R/f, R/f]."""
        mu, logvar = self.encoder(x).float().chunk(2, dim=1)
        return mu, logvar.clamp(-30, 20)

    def decode(self, z):
        return self.decoder(z)


def kl_per_image(mu, logvar):
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1)


def load_autoencoder(out_dir, device="cpu") -> VAE:
    """The trained VAE of a finished run (its OUT/artifact.pt), in eval mode, frozen."""
    art = load_artifact(out_dir)
    if art.get("kind") != "vae":
        raise BadConfig(f"{out_dir}/artifact.pt is not a VAE artifact (kind={art.get('kind')!r})")
    cfg = Config.model_validate(art["config"])
    model = VAE(cfg.width, cfg.downsample, cfg.latent_channels)
    model.load_state_dict(art["state_dict"])
    model.config = cfg
    return model.to(device).eval().requires_grad_(False)

# -----------------------------------------------------------------------------
# training


def losses(encoder, decoder, x, eps, sigma, run):
    with run.autocast():
        h = encoder(x)
    mu, logvar = h.float().chunk(2, dim=1)
    logvar = logvar.clamp(-30, 20)
    z = mu + (0.5 * logvar).exp() * eps
    with run.autocast():
        x_hat = decoder(z).float()
    recon = (x_hat - x).pow(2).flatten(1).sum(1) / (2 * sigma ** 2)
    return recon.mean(), kl_per_image(mu, logvar).mean()


def geco_update(beta, c_ma, mse, cfg):
    """One GECO step: (beta, C_ma) after a batch whose reconstruction MSE per pixel value was `mse`."""
    c = mse - cfg.geco_tolerance
    c_ma = c if c_ma is None else cfg.geco_alpha * c_ma + (1 - cfg.geco_alpha) * c
    beta = beta * math.exp(-cfg.geco_rate * c_ma / cfg.geco_tolerance)  # beta = 1 / lambda
    return min(max(beta, BETA_RANGE[0]), BETA_RANGE[1]), c_ma


def gaussian_nll_const(cfg, d):
    """The normaliser of N(x_hat, sigma^2) over d pixel values: d log(sigma sqrt(2 pi))."""
    return d * math.log(cfg.recon_sigma * math.sqrt(2 * math.pi))


@torch.no_grad()
def evaluate(model, x_held, z_eval, evaluator, cfg, run, batch=256):
    model.eval()
    se = se_sampled = kl = 0.0
    g = torch.Generator().manual_seed(cfg.seed + 2)  # the same posterior noise at every evaluation
    for xb in x_held.split(batch):
        with run.autocast():
            mu, logvar = model.encode(xb)
            z = mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=g).to(mu.device)
            x_hat, x_sampled = model.decode(mu).float(), model.decode(z).float()
        se += (x_hat - xb).pow(2).sum().item()
        se_sampled += (x_sampled - xb).pow(2).sum().item()
        kl += kl_per_image(mu, logvar).sum().item()
    samples = []
    for zb in z_eval.split(batch):
        with run.autocast():
            samples.append(to_uint8(model.decode(zb).float()).cpu())
    model.train()
    samples = torch.cat(samples)
    n, d = x_held.shape[0], x_held[0].numel()
    nelbo = (se_sampled / (2 * cfg.recon_sigma ** 2) + n * gaussian_nll_const(cfg, d) + kl) / (n * d)
    out = {"recon_mse": se / (n * d), "kl": kl / n, "nelbo": nelbo}
    out.update(evaluator(samples))
    return out, samples


@torch.no_grad()
def save_recon_grid(model, x_held, run, name, n=32, per_row=8):
    model.eval()
    x = x_held[:n]
    with run.autocast():
        recon = model.decode(model.encode(x)[0]).float()
    model.train()
    rows = []
    for i in range(0, x.shape[0], per_row):  # a row of originals, then their reconstructions
        rows += [x[i:i + per_row], recon[i:i + per_row]]
    run.save_grid(name, torch.cat(rows).clamp(-1, 1), nrow=per_row)


def train(cfg: Config, run: Run):
    dev = run.device
    R, f = cfg.data.resolution, cfg.downsample
    x_u8, y_train = load_split(cfg.data, "train")
    held_u8, y_held = load_split(cfg.data, "heldout")
    x_train, x_held = to_float(x_u8).to(dev), to_float(held_u8).to(dev)
    evaluator = metrics.build_evaluator(cfg, run, x_u8, held_u8)

    seed_everything(cfg.seed)
    model = VAE(cfg.width, f, cfg.latent_channels).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)   # batch order and reparameterisation noise
    latent = (cfg.latent_channels, R // f, R // f)
    z_eval = torch.randn(cfg.eval_samples, *latent, generator=torch.Generator().manual_seed(cfg.seed + 1)).to(dev)
    step, beta, c_ma, last_log = 0, cfg.beta, None, {}
    acc = torch.zeros(4, device=dev)  # sums of loss, recon, kl and a count since the last log

    state = run.resume()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        step, beta, c_ma, acc, last_log = (state["step"], state["beta"], state["c_ma"], state["acc"].to(dev),
                                           state["last_log"])

    def snapshot():
        return {"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(), "beta": beta,
                "c_ma": c_ma, "acc": acc, "last_log": last_log}

    if step == 0:
        run.log(0, beta=beta, **evaluate(model, x_held, z_eval, evaluator, cfg, run)[0])
    encoder, decoder = run.maybe_compile(model.encoder), run.maybe_compile(model.decoder)
    last_eval, last_eval_step = None, -1
    D = x_train[0].numel()
    while step < cfg.steps:
        idx = torch.randint(x_train.shape[0], (cfg.batch_size,), generator=gen).to(dev)
        eps = torch.randn(cfg.batch_size, *latent, generator=gen).to(dev)
        x = x_train[idx]
        recon, kl = losses(encoder, decoder, x, eps, cfg.recon_sigma, run)
        loss = (recon + beta * kl) / D
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cfg.beta_mode == "geco":
            beta, c_ma = geco_update(beta, c_ma, recon.item() * 2 * cfg.recon_sigma ** 2 / D, cfg)
        step += 1
        acc += torch.stack([loss.detach(), recon.detach() / D, kl.detach(), torch.ones((), device=dev)])

        row = {}
        if step % cfg.log_every == 0 or step == cfg.steps:
            lo, rc, k = (acc[:3] / acc[3]).tolist()
            run.check_finite(step, loss=lo)
            last_log = {"loss": lo}
            row.update(loss=lo, recon_loss=rc, kl_train=k, beta=beta)
            if c_ma is not None:
                row.update(geco_constraint=c_ma)
            acc = torch.zeros(4, device=dev)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            last_eval, last_eval_step = evaluate(model, x_held, z_eval, evaluator, cfg, run), step
            run.check_finite(step, recon_mse=last_eval[0]["recon_mse"])
            row.update(last_eval[0])
        if row:
            run.log(step, **row)
        if cfg.sample_every and step % cfg.sample_every == 0:
            save_recon_grid(model, x_held, run, f"recon_step{step:06d}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            run.save_checkpoint(step, snapshot())
        if run.stop_requested:
            run.stop(step, snapshot())

    if last_eval_step != step:  # resumed from the final checkpoint
        last_eval = evaluate(model, x_held, z_eval, evaluator, cfg, run)
    final, samples = last_eval
    run.save_grid("samples", samples[:64])
    save_recon_grid(model, x_held, run, "recon")
    run.save_artifact({"kind": "vae", "config": cfg.model_dump(), "step": step,
                       "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}})
    run.write_summary({"steps": step, **last_log, "beta": beta, **final, "diverged": False})
    return final


if __name__ == "__main__":
    sys.exit(main(train, Config))
