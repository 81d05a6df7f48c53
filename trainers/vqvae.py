"""
VQ-VAE tokenizer (van den Oord et al. 2017): conv encoder -> nearest-codebook quantisation with a
straight-through gradient -> conv decoder. The codebook is learned either by its own loss term
||sg(z) - e||^2 or by exponential moving averages of the assigned encoder outputs, with optional
resets of dead codes to random encoder outputs. The artifact (weights + config) is the tokenizer
MaskGIT consumes through `load_tokenizer`.

    python -m trainers.vqvae --config config.json --out DIR
"""

import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, model_validator

from trainers.common import BadConfig, Run, TrainerConfig, load_artifact, main, seed_everything
from trainers.data import load_split, to_float

# -----------------------------------------------------------------------------
# config


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    channels: int = 32          # width after the first stride-2 conv, doubled at each further one
    downsample: int = 4         # spatial reduction (power of two): 16 px -> 4x4 tokens
    res_blocks: int = 1         # residual blocks at token resolution, in encoder and decoder
    codebook_size: int = 128    # K
    code_dim: int = 16

    @model_validator(mode="after")
    def _check(self):
        if self.downsample < 2 or self.downsample & (self.downsample - 1):
            raise ValueError(f"downsample must be a power of two >= 2, got {self.downsample}")
        if min(self.channels, self.codebook_size, self.code_dim) < 1 or self.res_blocks < 0:
            raise ValueError("channels, codebook_size, code_dim must be >= 1 and res_blocks >= 0")
        return self


class VQConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    beta: float = 0.25             # commitment cost
    ema: bool = True               # EMA codebook updates instead of the codebook loss
    ema_decay: float = 0.99
    dead_code_reset: bool = True   # re-init codes unused for reset_every steps from encoder outputs
    reset_every: int = 50

    @model_validator(mode="after")
    def _check(self):
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.reset_every < 1:
            raise ValueError(f"reset_every must be >= 1, got {self.reset_every}")
        return self


class Config(TrainerConfig):
    steps: int = 500
    batch_size: int = 64
    lr: float = 2e-3
    log_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 100
    sample_every: int = 0
    model: ModelConfig = ModelConfig()
    vq: VQConfig = VQConfig()


METRICS = {"recon_mse": "min", "codebook_usage": "max", "perplexity": "max", "top4_mass": "min", "dead_codes": "min"}
SAMPLES_IMAGE = "recon"   # the grid a report shows: held-out images over their reconstructions
UPSTREAM: dict = {}
SEED_RANDOMISES = ["model initialisation (codebook included)", "batch order", "dead-code resets",
                   "data draw (data.draw)"]

# -----------------------------------------------------------------------------
# model


class ResBlock(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class Quantizer(nn.Module):
    def __init__(self, K, D, vq: VQConfig):
        super().__init__()
        self.K, self.D, self.vq = K, D, vq
        init = torch.randn(K, D)
        if vq.ema:
            self.register_buffer("codebook", init)
            self.register_buffer("ema_size", torch.ones(K))   # EMA of assignment counts
            self.register_buffer("ema_sum", init.clone())     # EMA of summed assigned encoder outputs
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("usage", torch.zeros(K))         # assignments since the last dead-code check

    def nearest(self, flat):
        # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2
        cb = self.codebook
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ cb.t() + cb.pow(2).sum(1)[None]
        return d.argmin(1)

    def forward(self, z):
        """z: [B, D, h, w] -> (straight-through z_q, vq loss, ids [B, h, w], flat encoder outputs)."""
        B, D, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = z.float().permute(0, 2, 3, 1).reshape(-1, D)
            ids = self.nearest(flat)
            zq = F.embedding(ids, self.codebook)
            loss = self.vq.beta * F.mse_loss(flat, zq.detach())
            if not self.vq.ema:
                loss = loss + F.mse_loss(zq, flat.detach())
            if self.training:
                with torch.no_grad():
                    onehot = F.one_hot(ids, self.K).float()
                    counts = onehot.sum(0)
                    self.usage += counts
                    if self.vq.ema:
                        a = 1 - self.vq.ema_decay
                        self.ema_size.mul_(1 - a).add_(counts, alpha=a)
                        self.ema_sum.mul_(1 - a).add_(onehot.t() @ flat, alpha=a)
                        # Laplace smoothing keeps rarely used codes from dividing by ~0
                        n = self.ema_size.sum()
                        size = (self.ema_size + 1e-5) / (n + self.K * 1e-5) * n
                        self.codebook.copy_(self.ema_sum / size[:, None])
            zq = flat + (zq - flat).detach()
        zq = zq.reshape(B, h, w, D).permute(0, 3, 1, 2)
        return zq, loss, ids.reshape(B, h, w), flat

    @torch.no_grad()
    def reset_dead(self, flat, gen: torch.Generator) -> int:
        """Codes with no assignment since the last call get a random encoder output of the batch."""
        dead = (self.usage == 0).nonzero().flatten()
        n = dead.numel()
        if n:
            pick = torch.randint(flat.shape[0], (n,), generator=gen).to(flat.device)
            new = flat[pick].detach().float()
            self.codebook.data[dead] = new
            if self.vq.ema:
                self.ema_sum[dead] = new
                self.ema_size[dead] = 1.0
        self.usage.zero_()
        return n


class VQVAE(nn.Module):
    def __init__(self, m: ModelConfig, vq: VQConfig):
        super().__init__()
        self.m = m
        n_down = int(math.log2(m.downsample))
        widths = [m.channels * 2 ** i for i in range(n_down)]
        enc = [nn.Conv2d(3, widths[0], 4, stride=2, padding=1)]
        for a, b in zip(widths[:-1], widths[1:]):
            enc += [nn.ReLU(), nn.Conv2d(a, b, 4, stride=2, padding=1)]
        enc += [ResBlock(widths[-1]) for _ in range(m.res_blocks)]
        enc += [nn.ReLU(), nn.Conv2d(widths[-1], m.code_dim, 1)]
        self.encoder = nn.Sequential(*enc)
        self.quant = Quantizer(m.codebook_size, m.code_dim, vq)
        dec = [nn.Conv2d(m.code_dim, widths[-1], 3, padding=1)]
        dec += [ResBlock(widths[-1]) for _ in range(m.res_blocks)]
        for a, b in zip(widths[::-1][:-1], widths[::-1][1:]):
            dec += [nn.ReLU(), nn.ConvTranspose2d(a, b, 4, stride=2, padding=1)]
        dec += [nn.ReLU(), nn.ConvTranspose2d(widths[0], 3, 4, stride=2, padding=1)]
        self.decoder = nn.Sequential(*dec)

    @property
    def codebook_size(self) -> int:
        return self.m.codebook_size

    @property
    def downsample(self) -> int:
        return self.m.downsample

    def forward(self, x):
        zq, vq_loss, ids, flat = self.quant(self.encoder(x))
        return self.decoder(zq), vq_loss, ids, flat

    @torch.no_grad()
    def encode(self, x):
        """float images [N, 3, H, W] in [-1, 1] -> token ids [N, H/f, W/f]."""
        z = self.encoder(x).float()
        B, D, h, w = z.shape
        return self.quant.nearest(z.permute(0, 2, 3, 1).reshape(-1, D)).reshape(B, h, w)

    @torch.no_grad()
    def decode(self, ids):
        """token ids [N, h, w] -> float images [N, 3, h*f, w*f] (roughly in [-1, 1])."""
        zq = F.embedding(ids, self.quant.codebook).permute(0, 3, 1, 2)
        return self.decoder(zq).float()


def load_tokenizer(out_dir, device="cpu") -> VQVAE:
    """The trained VQ-VAE of a finished run (its OUT/artifact.pt), in eval mode, frozen."""
    art = load_artifact(out_dir)
    if art.get("kind") != "vqvae":
        raise BadConfig(f"{out_dir}/artifact.pt is not a VQ-VAE artifact (kind={art.get('kind')!r})")
    cfg = Config.model_validate(art["config"])
    model = VQVAE(cfg.model, cfg.vq)
    model.load_state_dict(art["state_dict"])
    model.config = cfg
    model.to(device).eval().requires_grad_(False)
    return model

# -----------------------------------------------------------------------------
# training


@torch.no_grad()
def evaluate(model, x_held, run, batch=256):
    model.eval()
    K = model.codebook_size
    counts = torch.zeros(K, device=x_held.device)
    se = 0.0
    for i in range(0, x_held.shape[0], batch):
        x = x_held[i:i + batch]
        with run.autocast():
            recon, _, ids, _ = model(x)
        se += (recon.float() - x).pow(2).sum().item()
        counts += torch.bincount(ids.flatten(), minlength=K).float()
    model.train()
    p = counts / counts.sum()
    nz = p[p > 0]
    return {
        "recon_mse": se / x_held.numel(),
        "codebook_usage": (counts > 0).float().mean().item(),
        "perplexity": torch.exp(-(nz * nz.log()).sum()).item(),
        "top4_mass": p.topk(min(4, K)).values.sum().item(),
        "dead_codes": int((counts == 0).sum().item()),
    }


def train(cfg: Config, run: Run):
    dev = run.device
    if cfg.data.resolution % cfg.model.downsample:
        raise BadConfig(f"data.resolution {cfg.data.resolution} is not divisible by model.downsample {cfg.model.downsample}")
    seed_everything(cfg.seed)
    x_train = load_split(cfg.data, "train")[0].to(dev)   # uint8 on the device, converted per batch
    x_held = to_float(load_split(cfg.data, "heldout")[0]).to(dev)

    model = VQVAE(cfg.model, cfg.vq).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(cfg.seed)   # batch order and code resets
    step, loss_acc, loss_n, last_loss = 0, torch.zeros((), device=dev), 0, None

    state = run.resume()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        step, loss_acc, loss_n, last_loss = state["step"], state["loss_acc"].to(dev), state["loss_n"], state["last_loss"]

    def snapshot():
        return {"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                "loss_acc": loss_acc, "loss_n": loss_n, "last_loss": last_loss}

    fwd = run.maybe_compile(model)
    last_eval, last_eval_step = None, -1
    while step < cfg.steps:
        idx = torch.randint(x_train.shape[0], (cfg.batch_size,), generator=gen).to(dev)
        x = to_float(x_train[idx])
        with run.autocast():
            recon, vq_loss, ids, flat = fwd(x)
        recon_loss = F.mse_loss(recon.float(), x)
        loss = recon_loss + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        loss_acc, loss_n = loss_acc + loss.detach().float(), loss_n + 1

        row = {}
        if cfg.vq.dead_code_reset and step % cfg.vq.reset_every == 0:
            row["codes_reset"] = model.quant.reset_dead(flat, gen)
        if step % cfg.log_every == 0 or step == cfg.steps:
            last_loss = (loss_acc / loss_n).item()
            run.check_finite(step, loss=last_loss)
            row.update(loss=last_loss, recon_loss=recon_loss.item())
            loss_acc, loss_n = torch.zeros((), device=dev), 0
        if step % cfg.eval_every == 0 or step == cfg.steps:
            last_eval, last_eval_step = evaluate(model, x_held, run), step
            run.check_finite(step, recon_mse=last_eval["recon_mse"])
            row.update(last_eval)
        if row:
            run.log(step, **row)
        if cfg.sample_every and step % cfg.sample_every == 0:
            save_recon_grid(model, x_held, run, f"recon_step{step:06d}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            run.save_checkpoint(step, snapshot())
        if run.stop_requested:
            run.stop(step, snapshot())

    if last_eval_step != step:
        last_eval = evaluate(model, x_held, run)
    save_recon_grid(model, x_held, run, "recon")
    run.save_artifact({"kind": "vqvae", "config": cfg.model_dump(), "step": step,
                       "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}})
    run.write_summary({"steps": step, "loss": last_loss, **last_eval, "diverged": False})
    return last_eval


@torch.no_grad()
def save_recon_grid(model, x_held, run, name, n=32, per_row=8):
    model.eval()
    x = x_held[:n]
    with run.autocast():
        recon = model(x)[0].float()
    model.train()
    rows = []
    for i in range(0, x.shape[0], per_row):  # a row of originals, then their reconstructions
        rows += [x[i:i + per_row], recon[i:i + per_row]]
    run.save_grid(name, torch.cat(rows).clamp(-1, 1), nrow=per_row)


if __name__ == "__main__":
    sys.exit(main(train, Config))
