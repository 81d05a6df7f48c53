"""
DCGAN (Radford et al. 2016): a generator of strided transposed convolutions with batch norm and
ReLU, a discriminator of strided convolutions with batch norm and leaky ReLU, N(0, 0.02) weight
init, Adam(2e-4, beta1 0.5), the non-saturating GAN loss. Works at data.resolution = 4 * 2^k >= 8.

    python -m trainers.dcgan --config config.json --out DIR

metrics.jsonl: `loss` is the discriminator's loss (loss_d); loss_g, d_real, d_fake (mean sigmoid
outputs) and, every eval_every steps and at step 0, the sample metrics of trainers/metrics.py.
Also at the `eval_average` steps whose evaluations summary.json averages (eval_steps_averaged).
"""

import math
import sys

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
    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-4
    beta1: float = 0.5
    log_every: int = 10
    eval_every: int = 200
    checkpoint_every: int = 200
    sample_every: int = 0
    latent_dim: int = 64
    g_width: int = 64        # channels of the generator's last hidden layer, doubled towards 4x4
    d_width: int = 64        # channels of the discriminator's first layer, doubled towards 4x4
    # summary metrics = the mean of eval_average evaluations, eval_average_every steps apart (0 = steps // 20)
    # and ending at `steps`, so an oscillating GAN is not judged on one draw; they come on top of the
    # curve's evaluations every eval_every steps (all with eval_samples samples)
    eval_average: int = 3
    eval_average_every: int = 0

    @model_validator(mode="after")
    def _check(self):
        num_ups(self.data.resolution)
        if self.eval_average < 1 or self.eval_average_every < 0:
            raise ValueError(f"need eval_average >= 1 and eval_average_every >= 0, got {self.eval_average} "
                             f"and {self.eval_average_every}")
        return self


METRICS = {"loss_d": "min", "loss_g": "min", **metrics.DIRECTIONS}
# A GAN's losses are the state of its game, not a measure of its samples (trainers/metrics.py FLATTERED_BY).
FLATTERED_BY = {**metrics.FLATTERED_BY,
                "loss_d": ("a weaker generator: the losses measure the game, not the samples", metrics.KID_GUARD),
                "loss_g": ("a weaker discriminator: the losses measure the game, not the samples", metrics.KID_GUARD)}
UPSTREAM = {"judge": JUDGE_UPSTREAM}
SEED_RANDOMISES = ["model initialisation", "batch order and latents", "evaluation latents", "data draw (data.draw)"]

# -----------------------------------------------------------------------------
# model


def num_ups(resolution: int) -> int:
    k = int(math.log2(resolution // 4)) if resolution >= 8 else 0
    if k < 1 or 4 * 2 ** k != resolution:
        raise ValueError(f"dcgan needs data.resolution = 4 * 2^k >= 8, got {resolution}")
    return k


class Generator(nn.Module):
    def __init__(self, latent_dim, width, resolution):
        super().__init__()
        k = num_ups(resolution)
        ch = [width * 2 ** i for i in reversed(range(k))]  # 4x4 ... R/2
        layers = [nn.ConvTranspose2d(latent_dim, ch[0], 4, 1, 0, bias=False), nn.BatchNorm2d(ch[0]), nn.ReLU(True)]
        for a, b in zip(ch[:-1], ch[1:]):
            layers += [nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(ch[-1], 3, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z[:, :, None, None])


class Discriminator(nn.Module):
    def __init__(self, width, resolution):
        super().__init__()
        k = num_ups(resolution)
        ch = [width * 2 ** i for i in range(k)]  # R/2 ... 4x4
        layers = [nn.Conv2d(3, ch[0], 4, 2, 1), nn.LeakyReLU(0.2, True)]
        for a, b in zip(ch[:-1], ch[1:]):
            layers += [nn.Conv2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.LeakyReLU(0.2, True)]
        layers += [nn.Conv2d(ch[-1], 1, 4, 1, 0)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x).flatten()


def dcgan_init(m):
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)

# -----------------------------------------------------------------------------
# training


@torch.no_grad()
def generate(G, z, run, batch=256):
    G.eval()  # batch-norm running statistics
    out = []
    for zb in z.split(batch):
        with run.autocast():
            out.append(to_uint8(G(zb).float()).cpu())
    G.train()
    return torch.cat(out)


def train(cfg: Config, run: Run):
    dev = run.device
    x_u8, y_train = load_split(cfg.data, "train")
    held_u8, y_held = load_split(cfg.data, "heldout")
    R = cfg.data.resolution
    x_train = to_float(x_u8).to(dev)
    evaluator = metrics.build_evaluator(cfg, run, x_u8, held_u8)

    seed_everything(cfg.seed)
    G = Generator(cfg.latent_dim, cfg.g_width, R).to(dev)
    D = Discriminator(cfg.d_width, R).to(dev)
    G.apply(dcgan_init)
    D.apply(dcgan_init)
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    gen = torch.Generator().manual_seed(cfg.seed)   # batch order and latents
    z_eval = torch.randn(cfg.eval_samples, cfg.latent_dim, generator=torch.Generator().manual_seed(cfg.seed + 1)).to(dev)
    step, last_log = 0, {}
    acc = torch.zeros(5, device=dev)  # sums of loss_d, loss_g, d_real, d_fake and a count since the last log
    window = averaged_eval_steps(cfg)
    recent: list[dict] = []           # the evaluations at the steps in `window` so far

    state = run.resume()
    if state is not None:
        G.load_state_dict(state["G"])
        D.load_state_dict(state["D"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        gen.set_state(state["gen"])
        step, acc, last_log, recent = state["step"], state["acc"].to(dev), state["last_log"], state["recent"]

    def snapshot():
        return {"G": G.state_dict(), "D": D.state_dict(), "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
                "gen": gen.get_state(), "acc": acc, "last_log": last_log, "recent": recent}

    def evaluate():
        samples = generate(G, z_eval, run)
        return evaluator(samples), samples

    if step == 0:
        run.log(0, **evaluate()[0])
    g_fwd, d_fwd = run.maybe_compile(G), run.maybe_compile(D)
    last_samples = None
    while step < cfg.steps:
        idx = torch.randint(x_train.shape[0], (cfg.batch_size,), generator=gen).to(dev)
        z = torch.randn(cfg.batch_size, cfg.latent_dim, generator=gen).to(dev)
        real = x_train[idx]
        with run.autocast():
            fake = g_fwd(z)
            d_real, d_fake = d_fwd(real).float(), d_fwd(fake.detach()).float()
        loss_d = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        D.requires_grad_(False)             # the G step needs gradients through D, not D's own
        with run.autocast():
            d_gen = d_fwd(fake).float()
        loss_g = F.softplus(-d_gen).mean()  # non-saturating: -log D(G(z))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        D.requires_grad_(True)
        step += 1
        acc += torch.stack([loss_d.detach(), loss_g.detach(), torch.sigmoid(d_real).mean().detach(),
                            torch.sigmoid(d_fake).mean().detach(), torch.ones((), device=dev)])

        row = {}
        if step % cfg.log_every == 0 or step == cfg.steps:
            ld, lg, dr, df = (acc[:4] / acc[4]).tolist()
            run.check_finite(step, loss_d=ld, loss_g=lg)
            last_log = {"loss_d": ld, "loss_g": lg}
            row.update(loss=ld, **last_log, d_real=dr, d_fake=df)
            acc = torch.zeros(5, device=dev)
        if step % cfg.eval_every == 0 or step in window:
            scores, last_samples = evaluate()
            if step in window:
                recent.append({"step": step, **scores})
            row.update(scores)
        if row:
            run.log(step, **row)
        if cfg.sample_every and step % cfg.sample_every == 0:
            run.save_grid(f"samples_step{step:06d}", generate(G, z_eval[:64], run))
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            run.save_checkpoint(step, snapshot())
        if run.stop_requested:
            run.stop(step, snapshot())

    if last_samples is None:  # resumed from the final checkpoint (its evaluation is in `recent`), or steps 0
        scores, last_samples = evaluate()
        recent = recent or [{"step": step, **scores}]
    final = average_evaluations(recent)
    run.save_grid("samples", last_samples[:64])
    run.save_artifact({"kind": "dcgan", "config": cfg.model_dump(), "step": step,
                       "state_dict": {k: v.detach().cpu() for k, v in G.state_dict().items()}})
    run.write_summary({"steps": step, "loss": last_log.get("loss_d"), **last_log, **final, "diverged": False})
    return final


if __name__ == "__main__":
    sys.exit(main(train, Config))
