"""
Progressive GAN (Karras et al. 2018). Generator and discriminator grow from 4x4 to
data.resolution: each new level first fades in (its output is blended with the upsampled output of
the previous level, and the real images with their down-then-up-sampled versions, with weight
alpha rising 0 -> 1), then trains stable. Equalized learning rate (weights ~ N(0, 1) scaled at run
time by He's constant), pixel norm in the generator, minibatch standard deviation in the
discriminator's last block, WGAN-GP loss (lambda 10, drift 0.001) or the non-saturating loss
(optionally with the R1 penalty on real images of Mescheder et al. 2018, as in StyleGAN),
Adam(1e-3, betas (0, 0.99)) re-created whenever a level is added, an EMA of the generator for
samples. `progressive: false` trains the final resolution from the start (the ablation baseline).

    python -m trainers.progan --config config.json --out DIR

metrics.jsonl: `loss` is the discriminator's loss (loss_d); loss_g, resolution, alpha and, every
eval_every steps and at step 0, the sample metrics of trainers/metrics.py on EMA samples
(upsampled to data.resolution while the networks are still small); also at the `eval_average`
steps whose evaluations summary.json averages (eval_steps_averaged).
"""

import copy
import math
import sys
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import model_validator

from trainers import metrics
from trainers.common import Run, average_evaluations, averaged_eval_steps, main, seed_everything
from trainers.data import load_split, to_float, to_uint8
from trainers.judge import JUDGE_UPSTREAM, JudgedConfig

# -----------------------------------------------------------------------------
# config


class Config(JudgedConfig):
    steps: int = 900
    batch_size: int = 32
    lr: float = 1e-3
    log_every: int = 10
    eval_every: int = 200
    checkpoint_every: int = 200
    sample_every: int = 0
    progressive: bool = True
    # steps at each resolution before growing, for every level but the last (which trains until
    # `steps`): an int for all, a list with one entry per growing level, None = `steps` split evenly
    steps_per_level: int | list[int] | None = None
    fade_fraction: float = 0.5      # share of a new level's steps spent fading it in
    loss: Literal["wgan_gp", "nonsaturating"] = "wgan_gp"
    r1_gamma: float = 0.0           # nonsaturating only: + gamma/2 * E||grad_x D(x_real)||^2; 0 = off
    gp_lambda: float = 10.0
    drift: float = 0.001            # epsilon_drift * D(real)^2 keeps WGAN critic outputs near 0
    latent_dim: int = 64
    g_width: int = 32               # generator channels at 4x4 and 8x8, halved at each further doubling
    d_width: int = 32
    mbstd_group: int = 4
    ema_beta: float = 0.99
    # summary metrics = the mean of eval_average evaluations, eval_average_every steps apart (0 = steps // 20)
    # and ending at `steps`, so an oscillating GAN is not judged on one draw; they come on top of the
    # curve's evaluations every eval_every steps (all with eval_samples samples)
    eval_average: int = 3
    eval_average_every: int = 0

    @model_validator(mode="after")
    def _check(self):
        R = self.data.resolution
        if R < 8 or 4 * 2 ** int(math.log2(R // 4)) != R:
            raise ValueError(f"progan needs data.resolution = 4 * 2^k >= 8, got {R}")
        if not 0.0 <= self.fade_fraction <= 1.0 or not 0.0 <= self.ema_beta < 1.0:
            raise ValueError("fade_fraction must be in [0, 1] and ema_beta in [0, 1)")
        if min(self.g_width, self.d_width, self.latent_dim, self.mbstd_group) < 1:
            raise ValueError("g_width, d_width, latent_dim, mbstd_group must be >= 1")
        if self.eval_average < 1 or self.eval_average_every < 0:
            raise ValueError(f"need eval_average >= 1 and eval_average_every >= 0, got {self.eval_average} "
                             f"and {self.eval_average_every}")
        if self.r1_gamma < 0 or (self.r1_gamma > 0 and self.loss != "nonsaturating"):
            raise ValueError(f"r1_gamma must be >= 0 and needs loss 'nonsaturating' (got {self.r1_gamma} "
                             f"with loss {self.loss!r})")
        spl = self.steps_per_level
        if isinstance(spl, list) and len(spl) != num_levels(R) - 1:
            raise ValueError(f"steps_per_level needs {num_levels(R) - 1} entries (levels before "
                             f"{R}x{R}), got {len(spl)}")
        if spl is not None and self.progressive:
            budgets = spl if isinstance(spl, list) else [spl] * (num_levels(R) - 1)
            if min(budgets, default=1) < 1 or sum(budgets) >= self.steps:
                raise ValueError(f"steps_per_level {spl} must be >= 1 each and leave steps for the "
                                 f"final level (steps = {self.steps})")
        return self


METRICS = {"loss_d": "min", "loss_g": "min", **metrics.DIRECTIONS}
# A GAN's losses are the state of its game, not a measure of its samples (trainers/metrics.py FLATTERED_BY).
FLATTERED_BY = {**metrics.FLATTERED_BY,
                "loss_d": ("a weaker generator: the losses measure the game, not the samples", metrics.KID_GUARD),
                "loss_g": ("a weaker discriminator: the losses measure the game, not the samples", metrics.KID_GUARD)}
UPSTREAM = {"judge": JUDGE_UPSTREAM}
SEED_RANDOMISES = ["model initialisation", "batch order, latents and gradient-penalty mixing",
                   "evaluation latents", "data draw (data.draw)"]


def num_levels(resolution: int) -> int:
    return int(math.log2(resolution // 4)) + 1


def level_starts(cfg: Config) -> list[int]:
    """The step at which each level begins."""
    L = num_levels(cfg.data.resolution)
    if not cfg.progressive:
        return [0]
    spl = cfg.steps_per_level
    budgets = spl if isinstance(spl, list) else [spl or cfg.steps // L] * (L - 1)
    return [sum(budgets[:i]) for i in range(L)]


def phase(cfg: Config, step: int) -> tuple[int, float]:
    """(level, alpha) of a training step; level 0 is 4x4, alpha the weight of the newest level."""
    L = num_levels(cfg.data.resolution)
    if not cfg.progressive:
        return L - 1, 1.0
    starts = level_starts(cfg) + [cfg.steps]
    level = max(i for i in range(L) if starts[i] <= step)
    fade = cfg.fade_fraction * (starts[level + 1] - starts[level])
    alpha = 1.0 if level == 0 or fade <= 0 else min(1.0, (step - starts[level]) / fade)
    return level, alpha

# -----------------------------------------------------------------------------
# model


class EqLinear(nn.Module):
    def __init__(self, cin, cout, gain=math.sqrt(2)):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.scale = gain / math.sqrt(cin)

    def forward(self, x):
        return F.linear(x, self.weight * self.scale, self.bias)


class EqConv2d(nn.Module):
    def __init__(self, cin, cout, k, gain=math.sqrt(2)):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.scale = gain / math.sqrt(cin * k * k)

    def forward(self, x):
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.weight.shape[-1] // 2)


def pixel_norm(x):
    return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


def lrelu(x):
    return F.leaky_relu(x, 0.2)


def channels(width, level):
    return max(width >> max(0, level - 1), 8)


def up2(x):
    return F.interpolate(x, scale_factor=2, mode="nearest")


class Generator(nn.Module):
    def __init__(self, latent_dim, width, levels):
        super().__init__()
        c0 = channels(width, 0)
        self.c0 = c0
        self.dense = EqLinear(latent_dim, c0 * 16, gain=math.sqrt(2) / 4)
        self.conv0 = EqConv2d(c0, c0, 3)
        self.blocks = nn.ModuleList([nn.ModuleList([EqConv2d(channels(width, i - 1), channels(width, i), 3),
                                                    EqConv2d(channels(width, i), channels(width, i), 3)])
                                     for i in range(1, levels)])
        self.to_rgb = nn.ModuleList([EqConv2d(channels(width, i), 3, 1, gain=1.0) for i in range(levels)])

    def forward(self, z, level: int, alpha: torch.Tensor):
        h = pixel_norm(lrelu(self.dense(pixel_norm(z)).view(-1, self.c0, 4, 4)))
        h = pixel_norm(lrelu(self.conv0(h)))
        prev = h
        for conv_a, conv_b in self.blocks[:level]:
            prev = h
            h = pixel_norm(lrelu(conv_a(up2(h))))
            h = pixel_norm(lrelu(conv_b(h)))
        rgb = self.to_rgb[level](h)
        if level > 0:  # fade-in: blend with the previous level's output, upsampled
            rgb = torch.lerp(up2(self.to_rgb[level - 1](prev)), rgb, alpha)
        return rgb


def minibatch_stddev(x, group):
    """Appends one feature map: the standard deviation of each feature over groups of `group`
    samples, averaged over features and pixels (samples b and b + B/g share a group)."""
    B, C, H, W = x.shape
    g = min(group, B)
    while B % g:
        g -= 1
    y = x.float().view(g, B // g, C, H, W)
    std = (y - y.mean(0)).pow(2).mean(0).add(1e-8).sqrt().mean(dim=(1, 2, 3))  # [B/g]
    return torch.cat([x, std.repeat(g).view(B, 1, 1, 1).expand(B, 1, H, W).to(x.dtype)], dim=1)


class Discriminator(nn.Module):
    def __init__(self, width, levels, mbstd_group):
        super().__init__()
        self.mbstd_group = mbstd_group
        c0 = channels(width, 0)
        self.from_rgb = nn.ModuleList([EqConv2d(3, channels(width, i), 1) for i in range(levels)])
        # blocks[i - 1] takes level i (4 * 2^i px) down to level i - 1
        self.blocks = nn.ModuleList([nn.ModuleList([EqConv2d(channels(width, i), channels(width, i), 3),
                                                    EqConv2d(channels(width, i), channels(width, i - 1), 3)])
                                     for i in range(1, levels)])
        self.conv_final = EqConv2d(c0 + 1, c0, 3)
        self.dense = EqLinear(c0 * 16, c0)
        self.out = EqLinear(c0, 1, gain=1.0)

    def forward(self, x, level: int, alpha: torch.Tensor):
        h = lrelu(self.from_rgb[level](x))
        for i in range(level, 0, -1):
            conv_a, conv_b = self.blocks[i - 1]
            h = F.avg_pool2d(lrelu(conv_b(lrelu(conv_a(h)))), 2)
            if i == level:  # fade-in: blend with the downsampled input through the previous from_rgb
                h = torch.lerp(lrelu(self.from_rgb[level - 1](F.avg_pool2d(x, 2))), h, alpha)
        h = lrelu(self.conv_final(minibatch_stddev(h, self.mbstd_group)))
        return self.out(lrelu(self.dense(h.flatten(1)))).flatten()


def real_at(x, level, levels, alpha):
    """Real images as the networks see them at `level`, faded like the generator's output."""
    x = F.avg_pool2d(x, 2 ** (levels - 1 - level)) if level < levels - 1 else x
    if level > 0:
        x = torch.lerp(up2(F.avg_pool2d(x, 2)), x, alpha)
    return x

# -----------------------------------------------------------------------------
# training


@torch.no_grad()
def generate(G, z, level, alpha, resolution, run, batch=256):
    out = []
    a = torch.tensor(alpha, device=z.device)
    for zb in z.split(batch):
        with run.autocast():
            x = G(zb, level, a).float()
        out.append(to_uint8(F.interpolate(x, size=resolution, mode="nearest")).cpu())
    return torch.cat(out)


def d_loss(cfg, d_fwd, D, real, fake, level, alpha, gen, run):
    """d_fwd: D, possibly compiled; the gradient penalties need double backward, so they use plain D, in fp32
    (a penalty built from bf16 gradients is too coarse to hold D's gradient norm where it should be)."""
    r1 = cfg.loss == "nonsaturating" and cfg.r1_gamma > 0
    if r1:
        real = real.detach().requires_grad_(True)
        d_real = D(real, level, alpha).float()
    with run.autocast():
        if not r1:
            d_real = d_fwd(real, level, alpha).float()
        d_fake = d_fwd(fake, level, alpha).float()
    if cfg.loss == "nonsaturating":
        loss = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
        if not r1:
            return loss, {}
        grad, = torch.autograd.grad(d_real.sum(), real, create_graph=True)
        penalty = grad.flatten(1).pow(2).sum(1).mean()
        return loss + 0.5 * cfg.r1_gamma * penalty, {"penalty": penalty.detach()}
    eps = torch.rand(real.shape[0], 1, 1, 1, generator=gen).to(real.device)
    x_hat = torch.lerp(real, fake, eps).requires_grad_(True)
    d_hat = D(x_hat, level, alpha).float()
    grad, = torch.autograd.grad(d_hat.sum(), x_hat, create_graph=True)
    gp = (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()
    wdist = d_real.mean() - d_fake.mean()
    loss = -wdist + cfg.gp_lambda * gp + cfg.drift * d_real.pow(2).mean()
    return loss, {"wdist": wdist.detach(), "penalty": gp.detach()}


def train(cfg: Config, run: Run):
    dev = run.device
    R = cfg.data.resolution
    L = num_levels(R)
    x_u8, y_train = load_split(cfg.data, "train")
    held_u8, y_held = load_split(cfg.data, "heldout")
    x_train = to_float(x_u8).to(dev)
    evaluator = metrics.build_evaluator(cfg, run, x_u8, held_u8)

    seed_everything(cfg.seed)
    G = Generator(cfg.latent_dim, cfg.g_width, L).to(dev)
    D = Discriminator(cfg.d_width, L, cfg.mbstd_group).to(dev)
    G_ema = copy.deepcopy(G).requires_grad_(False)

    def make_opts():  # fresh Adam moments whenever a level is added
        return (torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=(0.0, 0.99), eps=1e-8),
                torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=(0.0, 0.99), eps=1e-8))

    opt_g, opt_d = make_opts()
    gen = torch.Generator().manual_seed(cfg.seed)   # batch order, latents, GP interpolation
    z_eval = torch.randn(cfg.eval_samples, cfg.latent_dim, generator=torch.Generator().manual_seed(cfg.seed + 1)).to(dev)
    step, last_log = 0, {}
    acc = torch.zeros(5, device=dev)  # sums of loss_d, loss_g, wdist, gp or r1 and a count since the last log
    window = averaged_eval_steps(cfg)
    recent: list[dict] = []           # the evaluations at the steps in `window` so far

    state = run.resume()
    if state is not None:
        for m, k in ((G, "G"), (D, "D"), (G_ema, "G_ema"), (opt_g, "opt_g"), (opt_d, "opt_d")):
            m.load_state_dict(state[k])
        gen.set_state(state["gen"])
        step, acc, last_log, recent = state["step"], state["acc"].to(dev), state["last_log"], state["recent"]

    def snapshot():
        return {"G": G.state_dict(), "D": D.state_dict(), "G_ema": G_ema.state_dict(), "opt_g": opt_g.state_dict(),
                "opt_d": opt_d.state_dict(), "gen": gen.get_state(), "acc": acc, "last_log": last_log, "recent": recent}

    def evaluate(at_step):
        level, alpha = phase(cfg, at_step)
        samples = generate(G_ema, z_eval, level, alpha, R, run)
        return evaluator(samples), samples

    if step == 0:
        run.log(0, resolution=4 * 2 ** phase(cfg, 0)[0], **evaluate(0)[0])
    g_fwd, d_fwd = run.maybe_compile(G), run.maybe_compile(D)
    current_level = phase(cfg, max(step - 1, 0))[0]  # the level of the last step taken
    last_samples = None
    while step < cfg.steps:
        level, alpha = phase(cfg, step)
        if level != current_level:
            run.save_grid(f"samples_{4 * 2 ** current_level}px", generate(G_ema, z_eval[:64], current_level, 1.0, R, run))
            opt_g, opt_d = make_opts()
            current_level = level
        a = torch.tensor(alpha, device=dev)
        idx = torch.randint(x_train.shape[0], (cfg.batch_size,), generator=gen).to(dev)
        z = torch.randn(cfg.batch_size, cfg.latent_dim, generator=gen).to(dev)
        real = real_at(x_train[idx], level, L, a)

        with run.autocast():
            fake = g_fwd(z, level, a).float()
        loss_d, extra = d_loss(cfg, d_fwd, D, real, fake.detach(), level, a, gen, run)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()

        D.requires_grad_(False)         # the G step needs gradients through D, not D's own
        with run.autocast():
            d_gen = d_fwd(fake, level, a).float()
        loss_g = F.softplus(-d_gen).mean() if cfg.loss == "nonsaturating" else -d_gen.mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        D.requires_grad_(True)
        step += 1
        beta = min(cfg.ema_beta, (1 + step) / (10 + step))  # ramp-up: early EMA follows G closely
        with torch.no_grad():
            torch._foreach_lerp_(list(G_ema.parameters()), list(G.parameters()), 1 - beta)
        zero = torch.zeros((), device=dev)
        acc += torch.stack([loss_d.detach(), loss_g.detach(), extra.get("wdist", zero), extra.get("penalty", zero),
                            torch.ones((), device=dev)])

        row = {}
        if step % cfg.log_every == 0 or step == cfg.steps:
            ld, lg, wd, penalty = (acc[:4] / acc[4]).tolist()
            run.check_finite(step, loss_d=ld, loss_g=lg)
            last_log = {"loss_d": ld, "loss_g": lg}
            row.update(loss=ld, **last_log, resolution=4 * 2 ** level, alpha=alpha)
            if cfg.loss == "wgan_gp":
                row.update(wdist=wd, gp=penalty)
            elif cfg.r1_gamma:
                row.update(r1=penalty)
            acc = torch.zeros(5, device=dev)
        if step % cfg.eval_every == 0 or step in window:
            scores, last_samples = evaluate(step - 1)
            if step in window:
                recent.append({"step": step, **scores})
            row.update(scores)
        if row:
            run.log(step, **row)
        if cfg.sample_every and step % cfg.sample_every == 0:
            run.save_grid(f"samples_step{step:06d}", generate(G_ema, z_eval[:64], level, alpha, R, run))
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            run.save_checkpoint(step, snapshot())
        if run.stop_requested:
            run.stop(step, snapshot())

    if last_samples is None:  # resumed from the final checkpoint (its evaluation is in `recent`), or steps 0
        scores, last_samples = evaluate(max(step - 1, 0))
        recent = recent or [{"step": step, **scores}]
    final = average_evaluations(recent)
    run.save_grid("samples", last_samples[:64])
    run.save_artifact({"kind": "progan", "config": cfg.model_dump(), "step": step,
                       "state_dict": {k: v.detach().cpu() for k, v in G_ema.state_dict().items()}})
    run.write_summary({"steps": step, "loss": last_log.get("loss_d"), **last_log, **final, "diverged": False})
    return final


if __name__ == "__main__":
    sys.exit(main(train, Config))
