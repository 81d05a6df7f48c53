"""
Denoising diffusion in pixel space with a U-Net (Ho et al. 2020; Nichol & Dhariwal 2021):
residual blocks with GroupNorm and SiLU, a sinusoidal time embedding, self-attention at low
resolution. Continuous time t in [0, 1] with x_t = alpha_t x_0 + sigma_t eps and
alpha_t^2 = alphabar(t) from a `cosine` or `linear` (DDPM's betas 1e-4..0.02 over 1000 steps)
schedule. Objectives: `eps` (predict the noise), `v` (predict v = alpha_t eps - sigma_t x_0,
Salimans & Ho 2022) or `flow` (flow matching on the straight path x_t = (1 - t) x_0 + t eps,
predicting the velocity eps - x_0, Lipman et al. 2023 / Liu et al. 2023; sampled with Euler steps,
`schedule` does not apply). eps and v sample with DDIM (Song et al. 2021) and `ddim_eta`.
`loss_weighting: eps` (the default) weights every objective so that its loss equals the MSE of the
noise estimate it implies: an arm that changes the objective changes only the parameterisation, not
which noise levels the loss emphasises; `native` is the plain MSE on each objective's own target.
Optional class conditioning on the procedural family with label dropout, and classifier-free
guidance (Ho & Salimans 2022) at sampling: out = out_uncond + w (out_cond - out_uncond). Samples
come from an EMA of the weights (`ema_beta: 0` samples from the raw weights).

`fit` is the whole training loop on tensors in model space; trainers/latent_diffusion.py calls it
on VAE latents.

    python -m trainers.diffusion --config config.json --out DIR
"""

import copy
import math
import sys
from typing import Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, model_validator

from trainers import metrics
from trainers.common import Run, main, seed_everything
from trainers.data import FAMILIES, load_split, to_float, to_uint8
from trainers.judge import JUDGE_UPSTREAM, JudgedConfig

# -----------------------------------------------------------------------------
# config


class UNetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    channels: int = 32
    channel_mult: list[int] = [1, 2, 2]   # one entry per resolution level, 2x downsampling between them
    num_res_blocks: int = 1
    attn_resolutions: list[int] = [4]     # feature-map sizes that get self-attention (plus the middle)
    heads: int = 4
    dropout: float = 0.0

    @model_validator(mode="after")
    def _check(self):
        if self.channels < 1 or not self.channel_mult or min(self.channel_mult) < 1 or self.num_res_blocks < 1:
            raise ValueError("channels, channel_mult entries and num_res_blocks must be >= 1")
        if any((self.channels * m) % self.heads for m in self.channel_mult) or self.heads < 1:
            raise ValueError(f"every level's channels must be divisible by heads ({self.heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        return self


class Config(JudgedConfig):
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 50
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 500
    checkpoint_every: int = 250
    sample_every: int = 0
    unet: UNetConfig = UNetConfig()
    objective: Literal["eps", "v", "flow"] = "eps"
    loss_weighting: Literal["eps", "native"] = "eps"  # see loss_weight()
    schedule: Literal["cosine", "linear"] = "cosine"
    ema_beta: float = 0.999         # EMA of the weights for sampling; 0 = no EMA (the raw weights)
    class_cond: bool = True         # condition on the procedural family (folder data: one class)
    label_dropout: float = 0.1      # share of training labels replaced by the null label
    guidance_scale: float = 1.0     # classifier-free guidance at sampling; 1 = plain conditional
    sample_steps: int = 50          # DDIM / Euler steps
    ddim_eta: float = 0.0

    @model_validator(mode="after")
    def _check(self):
        if not 0.0 <= self.label_dropout <= 1.0 or not 0.0 <= self.ema_beta < 1.0:
            raise ValueError("label_dropout must be in [0, 1] and ema_beta in [0, 1)")
        if self.sample_steps < 1 or self.eval_samples < 2 or self.warmup_steps < 0 or self.ddim_eta < 0:
            raise ValueError("need sample_steps >= 1, eval_samples >= 2, warmup_steps >= 0, ddim_eta >= 0")
        if self.guidance_scale != 1.0 and not self.class_cond:
            raise ValueError("guidance_scale != 1 needs class_cond")
        levels = 2 ** (len(self.unet.channel_mult) - 1)
        if self.model_resolution() % levels:
            raise ValueError(f"the U-Net's input ({self.model_resolution()} px) must be divisible by "
                             f"2^(len(unet.channel_mult) - 1) = {levels}")
        return self

    def model_resolution(self) -> int:
        """Side of the tensors the U-Net sees."""
        return self.data.resolution


METRICS = {"loss": "min", **metrics.DIRECTIONS}
# The training loss is what its objective and weighting make it: an arm that changes them changes the quantity.
FLATTERED_BY = {**metrics.FLATTERED_BY,
                "loss": ("a changed prediction target, schedule or loss weighting (it changes what the loss measures)",
                         metrics.KID_GUARD)}
UPSTREAM = {"judge": JUDGE_UPSTREAM}
SEED_RANDOMISES = ["model initialisation", "batch order, diffusion times, noise, label dropout and dropout masks",
                   "evaluation labels and sampling noise", "data draw (data.draw)"]

# -----------------------------------------------------------------------------
# noise schedules (continuous time)


def alpha_bar(schedule: str, t: torch.Tensor) -> torch.Tensor:
    if schedule == "cosine":  # Nichol & Dhariwal, s = 0.008
        s = 0.008
        ab = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    elif schedule == "linear":  # DDPM: beta linear from 1e-4 to 0.02 over T = 1000 steps, integrated
        b0, b1 = 1e-4 * 1000, 0.02 * 1000
        ab = torch.exp(-(b0 * t + 0.5 * (b1 - b0) * t * t))
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return ab.clamp(1e-5, 1.0)  # keeps alpha_t > 0 at t = 1


def alpha_sigma(schedule, t):
    ab = alpha_bar(schedule, t)
    return ab.sqrt(), (1 - ab).sqrt()

# -----------------------------------------------------------------------------
# model


def norm(ch):
    return nn.GroupNorm(8 if ch % 8 == 0 else 1, ch)


def timestep_embedding(t, dim):
    """Sinusoidal embedding of t in [0, 1] (scaled to DDPM's 0..1000 range)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, emb_dim, dropout):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2, self.drop, self.conv2 = norm(cout), nn.Dropout(dropout), nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    def __init__(self, ch, heads):
        super().__init__()
        self.heads = heads
        self.norm, self.qkv, self.proj = norm(ch), nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, 3, self.heads, C // self.heads, H * W).transpose(-1, -2).unbind(1)
        a = F.scaled_dot_product_attention(q, k, v)  # [B, heads, HW, C/heads]
        return x + self.proj(a.transpose(-1, -2).reshape(B, C, H, W))


class UNet(nn.Module):
    def __init__(self, in_ch, resolution, num_classes, u: UNetConfig):
        super().__init__()
        ch, emb_dim = u.channels, 4 * u.channels
        self.num_classes = num_classes  # label num_classes is the null (unconditional) label
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim)
        self.inp = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.down, skips, res, cur = nn.ModuleList(), [ch], resolution, ch
        for i, m in enumerate(u.channel_mult):
            for _ in range(u.num_res_blocks):
                self.down.append(nn.ModuleList([ResBlock(cur, ch * m, emb_dim, u.dropout)]
                                                + ([Attention(ch * m, u.heads)] if res in u.attn_resolutions else [])))
                cur = ch * m
                skips.append(cur)
            if i < len(u.channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(cur, cur, 3, stride=2, padding=1)]))
                skips.append(cur)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(cur, cur, emb_dim, u.dropout), Attention(cur, u.heads),
                                  ResBlock(cur, cur, emb_dim, u.dropout)])
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(u.channel_mult))):
            for _ in range(u.num_res_blocks + 1):
                self.up.append(nn.ModuleList([ResBlock(cur + skips.pop(), ch * m, emb_dim, u.dropout)]
                                              + ([Attention(ch * m, u.heads)] if res in u.attn_resolutions else [])))
                cur = ch * m
            if i > 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(cur, cur, 3, padding=1)]))
                res *= 2
        self.out = nn.Sequential(norm(cur), nn.SiLU(), nn.Conv2d(cur, in_ch, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)
        self.ch = ch

    def forward(self, x, t, labels):
        emb = self.time_mlp(timestep_embedding(t, self.ch)) + self.label_emb(labels)
        h = self.inp(x)
        hs = [h]
        for layers in self.down:
            if isinstance(layers[0], ResBlock):
                h = layers[0](h, emb)
                for a in layers[1:]:
                    h = a(h)
            else:
                h = layers[0](h)
            hs.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
        for layers in self.up:
            if isinstance(layers[0], ResBlock):
                h = layers[0](torch.cat([h, hs.pop()], dim=1), emb)
                for a in layers[1:]:
                    h = a(h)
            else:
                h = layers[1](layers[0](h))
        return self.out(h)

# -----------------------------------------------------------------------------
# objectives and samplers


def training_pair(cfg, x0, t, noise):
    """(x_t, regression target) for the configured objective."""
    if cfg.objective == "flow":
        tt = t[:, None, None, None]
        return (1 - tt) * x0 + tt * noise, noise - x0
    a, s = (v[:, None, None, None] for v in alpha_sigma(cfg.schedule, t))
    x_t = a * x0 + s * noise
    return x_t, (noise if cfg.objective == "eps" else a * noise - s * x0)


def loss_weight(cfg, t):
    """Per-sample weight of the objective's MSE; None = 1. With loss_weighting 'eps' the weighted MSE is
    the MSE of the implied noise estimate:
      v:    v = alpha eps - sigma x0 and x_t = alpha x0 + sigma eps give eps = sigma x_t + alpha v, so
            ||eps_hat - eps||^2 = alpha^2 ||v_hat - v||^2 = SNR / (1 + SNR) ||v_hat - v||^2 (in x0 terms,
            plain v-MSE is (1 + SNR) ||x0_hat - x0||^2 and eps-MSE is SNR ||x0_hat - x0||^2);
      flow: x_t = (1 - t) x0 + t eps and u = eps - x0 give eps = x_t + (1 - t) u, so the weight is (1 - t)^2."""
    if cfg.loss_weighting == "native" or cfg.objective == "eps":
        return None
    if cfg.objective == "v":
        return alpha_sigma(cfg.schedule, t)[0] ** 2
    return (1 - t) ** 2


def guided(model, x, t, labels, cfg, run):
    """Model output with classifier-free guidance (one batched call for both branches)."""
    tt = torch.full((x.shape[0],), float(t), device=x.device)
    if cfg.guidance_scale == 1.0 or not cfg.class_cond:
        with run.autocast():
            return model(x, tt, labels).float()
    null = torch.full_like(labels, model.num_classes)
    with run.autocast():
        out = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, null])).float()
    cond, uncond = out.chunk(2)
    return uncond + cfg.guidance_scale * (cond - uncond)


@torch.no_grad()
def sample(model, shape, labels, cfg, gen, run, clip_x0=True):
    """Draws x_0 from noise in cfg.sample_steps steps: Euler for flow, DDIM (eta) for eps and v."""
    dev = labels.device
    x = torch.randn(shape, generator=gen).to(dev)
    ts = torch.linspace(1.0, 0.0, cfg.sample_steps + 1)
    for t, s in zip(ts[:-1], ts[1:]):
        out = guided(model, x, t, labels, cfg, run)
        if cfg.objective == "flow":
            x = x + (s - t).item() * out
            continue
        a_t, s_t = alpha_sigma(cfg.schedule, t)
        if cfg.objective == "eps":
            x0 = (x - s_t * out) / a_t
        else:
            x0 = a_t * x - s_t * out
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        eps = (x - a_t * x0) / s_t
        if s <= 0:
            x = x0
            break
        a_s, s_s = alpha_sigma(cfg.schedule, s)
        # DDIM: sigma_eta = eta * sqrt((1 - ab_s) / (1 - ab_t)) * sqrt(1 - ab_t / ab_s)
        c = cfg.ddim_eta * (s_s / s_t) * (1 - (a_t / a_s) ** 2).clamp(min=0).sqrt()
        x = a_s * x0 + (s_s ** 2 - c ** 2).clamp(min=0).sqrt() * eps
        if c > 0:
            x = x + c * torch.randn(shape, generator=gen).to(dev)
    return x

# -----------------------------------------------------------------------------
# training


def lr_at(cfg, step):
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr


def fit(cfg: Config, run: Run, x_train, y_train, evaluator, num_classes: int,
        decode: Callable = lambda x: x, clip_x0: bool = True, artifact: dict | None = None):
    """The training loop on tensors in model space (pixels in [-1, 1], or latents). `decode` maps
    model-space samples to images in [-1, 1] for the metrics and grids."""
    dev = run.device
    shape = tuple(x_train.shape[1:])
    families = sorted(set(y_train.tolist()))
    y_train = y_train.to(dev)

    seed_everything(cfg.seed)
    model = UNet(shape[0], shape[-1], num_classes, cfg.unet).to(dev)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)   # batches, times, noise, label dropout
    g_eval = torch.Generator().manual_seed(cfg.seed + 1)
    pick = torch.randint(len(families), (cfg.eval_samples,), generator=g_eval)
    eval_labels = torch.tensor(families)[pick].to(dev) if cfg.class_cond else \
        torch.full((cfg.eval_samples,), num_classes, device=dev)
    step, last_log = 0, {}
    acc = torch.zeros(2, device=dev)  # sum of losses and a count since the last log

    state = run.resume()
    if state is not None:
        for m, k in ((model, "model"), (ema, "ema"), (opt, "opt")):
            m.load_state_dict(state[k])
        gen.set_state(state["gen"])
        step, acc, last_log = state["step"], state["acc"].to(dev), state["last_log"]

    def snapshot():
        return {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "gen": gen.get_state(), "acc": acc, "last_log": last_log}

    @torch.no_grad()
    def generate(n=None, batch=256):
        labels = eval_labels[:n]
        g = torch.Generator().manual_seed(cfg.seed + 2)  # the same noise at every evaluation
        out = [to_uint8(decode(sample(ema, (len(lb), *shape), lb, cfg, g, run, clip_x0)).float()).cpu()
               for lb in labels.split(batch)]
        return torch.cat(out)

    def evaluate():
        samples = generate()
        return evaluator(samples), samples

    if step == 0:
        run.log(0, **evaluate()[0])
    fwd = run.maybe_compile(model)
    last_eval, last_eval_step = None, -1
    while step < cfg.steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        B = cfg.batch_size
        idx = torch.randint(x_train.shape[0], (B,), generator=gen).to(dev)
        t = torch.rand(B, generator=gen).to(dev)
        noise = torch.randn(B, *shape, generator=gen).to(dev)
        drop = (torch.rand(B, generator=gen) < cfg.label_dropout).to(dev)
        labels = torch.where(drop | (not cfg.class_cond), num_classes, y_train[idx])
        x_t, target = training_pair(cfg, x_train[idx], t, noise)
        with run.autocast():  # dropout masks come from the global RNG, which checkpoints restore
            pred = fwd(x_t, t, labels).float()
        weight = loss_weight(cfg, t)
        loss = F.mse_loss(pred, target) if weight is None else \
            ((pred - target).pow(2).flatten(1).mean(1) * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        beta = min(cfg.ema_beta, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - beta)
        acc += torch.stack([loss.detach(), torch.ones((), device=dev)])

        row = {}
        if step % cfg.log_every == 0 or step == cfg.steps:
            last_log = {"loss": (acc[0] / acc[1]).item()}
            run.check_finite(step, **last_log)
            row.update(last_log, lr=lr_at(cfg, step - 1))
            acc = torch.zeros(2, device=dev)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            last_eval, last_eval_step = evaluate(), step
            row.update(last_eval[0])
        if row:
            run.log(step, **row)
        if cfg.sample_every and step % cfg.sample_every == 0:
            run.save_grid(f"samples_step{step:06d}", generate(64))
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            run.save_checkpoint(step, snapshot())
        if run.stop_requested:
            run.stop(step, snapshot())

    if last_eval_step != step:  # resumed from the final checkpoint
        last_eval = evaluate()
    final, samples = last_eval
    run.save_grid("samples", samples[:64])
    run.save_artifact({"kind": "diffusion", "config": cfg.model_dump(), "step": step, "shape": shape,
                       "num_classes": num_classes, **(artifact or {}),
                       "state_dict": {k: v.detach().cpu() for k, v in ema.state_dict().items()}})
    run.write_summary({"steps": step, **last_log, **final, "diverged": False})
    return final


def train(cfg: Config, run: Run):
    x_u8, y_train = load_split(cfg.data, "train")
    held_u8, y_held = load_split(cfg.data, "heldout")
    evaluator = metrics.build_evaluator(cfg, run, x_u8, held_u8)
    return fit(cfg, run, to_float(x_u8).to(run.device), y_train, evaluator, num_classes=len(FAMILIES))


if __name__ == "__main__":
    sys.exit(main(train, Config))
