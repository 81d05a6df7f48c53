"""
MaskGIT (Chang et al. 2022) over VQ-VAE tokens: a bidirectional transformer with learned position
embeddings and a [MASK] token learns to predict masked tokens of the token grid, with the mask
fraction drawn from a schedule gamma(r), r ~ U(0, 1). Generation starts from an all-masked grid and
in each of `decode_steps` steps samples every masked token, keeps the most confident ones and
re-masks the rest, so that the number still masked follows gamma(t / T).

The tokenizer is the artifact of a vqvae run (`tokenizer_dir`); without one it is trained first,
from the `tokenizer` config, into OUT/upstream/tokenizer.

Evaluation judges the model by its images, not its tokens: eval_samples unconditional samples are
decoded by the tokenizer and scored by the study's judge against real held-out images (KID, FID,
SWD, PRDC, memorization; trainers/metrics.py), and the centre of num_inpaint held-out images is
inpainted and compared with the real pixels inside the hole (inpaint_mse). A collapsed codebook makes
tokens easy to predict (heldout_masked_acc) but cannot make the decoded images look more real.

    python -m trainers.maskgit --config config.json --out DIR
"""

import math
import sys
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, model_validator

from trainers import metrics, vqvae
from trainers.common import BadConfig, Run, main, seed_everything
from trainers.data import load_split, to_float, to_uint8
from trainers.judge import JUDGE_UPSTREAM, JudgedConfig

# -----------------------------------------------------------------------------
# config


class TransformerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dim: int = 128
    depth: int = 2
    heads: int = 4
    dropout: float = 0.0

    @model_validator(mode="after")
    def _check(self):
        if self.dim < 1 or self.depth < 1 or self.heads < 1 or self.dim % self.heads:
            raise ValueError(f"need dim, depth, heads >= 1 and dim divisible by heads (dim={self.dim}, heads={self.heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        return self


class Config(JudgedConfig):
    steps: int = 400
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20          # linear warm-up, then cosine decay to 10% of lr
    log_every: int = 10
    eval_every: int = 200           # each evaluation decodes and judges eval_samples images
    checkpoint_every: int = 100
    sample_every: int = 0
    tokenizer: vqvae.Config = vqvae.Config()
    tokenizer_dir: str | None = None
    model: TransformerConfig = TransformerConfig()
    mask_schedule: Literal["cosine", "linear", "square"] = "cosine"
    label_smoothing: float = 0.1
    decode_steps: int = 8
    temperature: float = 2.0        # scale of the Gumbel noise on confidences, annealed linearly to 0
    eval_mask_ratio: float = 0.5    # fixed mask ratio of the held-out masked-token metrics
    num_inpaint: int = 128          # held-out images inpainted per evaluation (eval_samples: unconditional)

    @model_validator(mode="after")
    def _check(self):
        if self.decode_steps < 1:
            raise ValueError(f"decode_steps must be >= 1, got {self.decode_steps}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 < self.eval_mask_ratio <= 1.0:
            raise ValueError(f"eval_mask_ratio must be in (0, 1], got {self.eval_mask_ratio}")
        if self.temperature < 0 or self.num_inpaint < 1 or self.warmup_steps < 0:
            raise ValueError("need temperature >= 0, num_inpaint >= 1, warmup_steps >= 0")
        return self


METRICS = {**metrics.DIRECTIONS, "inpaint_mse": "min",
           # token-level, secondary: a collapsed codebook flatters these
           "heldout_masked_acc": "max", "heldout_loss": "min", "token_kl": "min",
           "token_diversity_gap": "min", "inpaint_acc": "max"}
FLATTERED_BY = metrics.FLATTERED_BY
# Token-level metrics are measured in the tokenizer's codes: comparable only between arms sharing a tokenizer
# (a collapsed codebook makes the task easier, not the model better).
TOKEN_METRICS = ("heldout_masked_acc", "heldout_loss", "token_kl", "token_diversity_gap", "inpaint_acc")
MEASURED_IN = {name: "tokenizer" for name in TOKEN_METRICS}
# the `tokenizer` field holds the config of a vqvae run whose OUT directory goes into `tokenizer_dir`
UPSTREAM = {"tokenizer": {"trainer": "vqvae", "dir_field": "tokenizer_dir"}, "judge": JUDGE_UPSTREAM}
SEED_RANDOMISES = ["transformer initialisation", "batch order, mask ratios and mask positions",
                   "sampling and inpainting noise", "data draw (data.draw)",
                   "the tokenizer and the judge (upstream runs of the same seed)"]


def mask_fraction(schedule: str, r: torch.Tensor) -> torch.Tensor:
    """gamma(r): fraction of tokens masked at ratio r in [0, 1]; gamma(0) = 1, gamma(1) = 0."""
    if schedule == "cosine":
        return torch.cos(math.pi / 2 * r)
    if schedule == "linear":
        return 1 - r
    if schedule == "square":
        return 1 - r * r
    raise ValueError(f"unknown mask schedule {schedule!r}")


# -----------------------------------------------------------------------------
# model


class Block(nn.Module):
    def __init__(self, dim, heads, dropout):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(B, L, D)))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))


class MaskGIT(nn.Module):
    def __init__(self, m: TransformerConfig, vocab: int, length: int):
        super().__init__()
        self.vocab, self.length, self.mask_id = vocab, length, vocab  # [MASK] is the extra last id
        self.tok = nn.Embedding(vocab + 1, m.dim)
        self.pos = nn.Parameter(torch.zeros(1, length, m.dim))
        self.drop = nn.Dropout(m.dropout)
        self.blocks = nn.ModuleList([Block(m.dim, m.heads, m.dropout) for _ in range(m.depth)])
        self.ln = nn.LayerNorm(m.dim)
        self.head = nn.Linear(m.dim, vocab)
        for p in self.modules():
            if isinstance(p, (nn.Linear, nn.Embedding)):
                nn.init.normal_(p.weight, std=0.02)
                if getattr(p, "bias", None) is not None:
                    nn.init.zeros_(p.bias)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, ids):
        """ids [B, L] in 0..vocab (vocab = [MASK]) -> logits [B, L, vocab]."""
        x = self.drop(self.tok(ids) + self.pos)
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


def random_mask(n_masked: torch.Tensor, length: int, gen: torch.Generator) -> torch.Tensor:
    """Bool [B, length] with exactly n_masked[b] True entries at uniformly random positions."""
    ranks = torch.rand(n_masked.shape[0], length, generator=gen).argsort(1).argsort(1)
    return ranks < n_masked[:, None]


def gumbel(shape, gen, device):
    u = torch.rand(shape, generator=gen, device=device).clamp_(1e-10, 1.0)
    return -torch.log(-torch.log(u))


@torch.no_grad()
def decode(model, ids, mask, cfg: Config, gen: torch.Generator, run: Run):
    """Fills the masked positions of ids [N, L] (mask True = unknown) in cfg.decode_steps steps."""
    ids, mask = ids.clone(), mask.clone()
    n0 = mask.sum(1)
    T = cfg.decode_steps
    for t in range(T):
        with run.autocast():
            logits = model(torch.where(mask, model.mask_id, ids))
        logp = logits.float().log_softmax(-1)
        sampled = (logp + gumbel(logp.shape, gen, logp.device)).argmax(-1)  # categorical sample
        sampled = torch.where(mask, sampled, ids)
        conf = logp.gather(-1, sampled[..., None]).squeeze(-1)
        conf = conf + cfg.temperature * (1 - (t + 1) / T) * gumbel(conf.shape, gen, conf.device)
        conf = torch.where(mask, conf, torch.full_like(conf, float("inf")))  # known tokens stay
        # how many stay masked after this step: gamma((t+1)/T) of the initial count, at least one fewer
        r = torch.tensor((t + 1) / T, device=ids.device)
        still = torch.floor(n0 * mask_fraction(cfg.mask_schedule, r) + 1e-6).long()
        still = torch.minimum(still, (mask.sum(1) - 1).clamp(min=0))
        ranks = conf.argsort(1).argsort(1)
        ids, mask = sampled, ranks < still[:, None]
    return ids


# -----------------------------------------------------------------------------
# tokenizer


def get_tokenizer(cfg: Config, run: Run):
    return vqvae.load_tokenizer(run.upstream("tokenizer", cfg.tokenizer, cfg.tokenizer_dir, vqvae.train), run.device)


@torch.no_grad()
def tokenize(tok, images_u8, device, batch=512):
    out = [tok.encode(to_float(images_u8[i:i + batch]).to(device)) for i in range(0, images_u8.shape[0], batch)]
    return torch.cat(out).flatten(1)  # [N, L] row-major over the token grid


def centre_box(h, w, scale=1):
    """Row and column slices of the central hole of an h x w token grid, in units of `scale` pixels."""
    return slice(h // 4 * scale, (h - h // 4) * scale), slice(w // 4 * scale, (w - w // 4) * scale)


def centre_mask(n, h, w, device):
    m = torch.zeros(n, h, w, dtype=torch.bool, device=device)
    m[(slice(None), *centre_box(h, w))] = True
    return m.flatten(1)


@torch.no_grad()
def detokenize(tok, ids, grid_hw, batch=256):
    """Token ids [N, L] -> float images [N, 3, R, R] in [-1, 1], decoded in batches."""
    return torch.cat([tok.decode(b.view(-1, *grid_hw)).clamp(-1, 1) for b in ids.split(batch)])

# -----------------------------------------------------------------------------
# evaluation


def pairwise_hamming(ids):
    """Mean fraction of differing positions over all pairs of rows of ids [N, L]."""
    n = ids.shape[0]
    if n < 2:
        return 0.0
    diff = (ids[:, None, :] != ids[None, :, :]).float().mean(-1)
    return (diff.sum() / (n * (n - 1))).item()


@torch.no_grad()
def evaluate(model, cfg: Config, held, held_u8, tok, evaluator, grid_hw, run: Run):
    """Token-level metrics on held-out tokens, the judge's metrics on eval_samples decoded samples and
    inpainting of the centre of held-out images. Returns (metrics, sample images, inpainting grid)."""
    model.eval()
    dev = held.device
    N, L = held.shape
    K = model.vocab

    # masked-token prediction at a fixed ratio with a fixed mask
    g = torch.Generator().manual_seed(1234)
    n_mask = torch.full((N,), max(1, round(cfg.eval_mask_ratio * L)))
    mask = random_mask(n_mask, L, g).to(dev)
    correct, nll = 0.0, 0.0
    for i in range(0, N, 256):
        x, m = held[i:i + 256], mask[i:i + 256]
        with run.autocast():
            logits = model(torch.where(m, model.mask_id, x)).float()
        nll += F.cross_entropy(logits[m], x[m], reduction="sum").item()
        correct += (logits.argmax(-1)[m] == x[m]).sum().item()
    total = mask.sum().item()

    # unconditional samples, judged as images
    g = torch.Generator(device=dev).manual_seed(cfg.seed + 1)
    S = cfg.eval_samples
    samples = torch.cat([decode(model, torch.zeros(n, L, dtype=torch.long, device=dev),
                                torch.ones(n, L, dtype=torch.bool, device=dev), cfg, g, run)
                         for n in [min(512, S - i) for i in range(0, S, 512)]])
    sample_u8 = to_uint8(detokenize(tok, samples, grid_hw)).cpu()
    out = evaluator(sample_u8)
    h_gen = torch.bincount(samples.flatten(), minlength=K).float() + 1.0  # add-one smoothing
    h_data = torch.bincount(held.flatten(), minlength=K).float() + 1.0
    p_data, p_gen = h_data / h_data.sum(), h_gen / h_gen.sum()
    token_kl = (p_data * (p_data / p_gen).log()).sum().item()       # KL(data || generated)
    data_div, sample_div = pairwise_hamming(held[:256]), pairwise_hamming(samples[:256])
    token_div_gap = abs(math.log(sample_div / data_div)) if sample_div > 0 and data_div > 0 else float("inf")

    # inpainting the centre of held-out images: token accuracy and pixel MSE inside the hole
    g = torch.Generator(device=dev).manual_seed(cfg.seed + 2)
    n_in = min(cfg.num_inpaint, N)
    cm = centre_mask(n_in, *grid_hw, dev)
    filled = decode(model, held[:n_in], cm, cfg, g, run)
    inpaint_acc = (filled[cm] == held[:n_in][cm]).float().mean().item()
    inpainted = detokenize(tok, filled, grid_hw)
    real = to_float(held_u8[:n_in]).to(inpainted.device)
    hole = (slice(None), slice(None), *centre_box(*grid_hw, tok.downsample))
    inpaint_mse = (inpainted[hole] - real[hole]).pow(2).mean().item()
    model.train()

    out.update({"inpaint_mse": inpaint_mse, "heldout_masked_acc": correct / total, "heldout_loss": nll / total,
                "token_kl": token_kl, "token_diversity_gap": token_div_gap, "inpaint_acc": inpaint_acc})
    shown = real[:8].clone()
    shown[hole] = 0.0  # grey hole
    grid = torch.cat([real[:8], shown, inpainted[:8]])
    return out, sample_u8[:64], grid


def save_grids(sample_u8, inpaint_grid, run: Run, suffix=""):
    run.save_grid("samples" + suffix, sample_u8)
    run.save_grid("inpaint" + suffix, inpaint_grid, nrow=inpaint_grid.shape[0] // 3)

# -----------------------------------------------------------------------------
# training


def lr_at(cfg: Config, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(cfg: Config, run: Run):
    dev = run.device
    tok = get_tokenizer(cfg, run)
    f = tok.downsample
    if cfg.data.resolution % f:
        raise BadConfig(f"data.resolution {cfg.data.resolution} is not divisible by the tokenizer's downsample {f}")
    grid_hw = (cfg.data.resolution // f, cfg.data.resolution // f)
    train_u8, held_u8 = load_split(cfg.data, "train")[0], load_split(cfg.data, "heldout")[0]
    evaluator = metrics.build_evaluator(cfg, run, train_u8, held_u8)
    train_tok = tokenize(tok, train_u8, dev)
    held_tok = tokenize(tok, held_u8, dev)
    N, L = train_tok.shape
    K = tok.codebook_size

    seed_everything(cfg.seed)
    model = MaskGIT(cfg.model, K, L).to(dev)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and n != "pos"]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or n == "pos"]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(cfg.seed)   # batch order, mask ratios and positions
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
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        idx = torch.randint(N, (cfg.batch_size,), generator=gen)
        frac = mask_fraction(cfg.mask_schedule, torch.rand(cfg.batch_size, generator=gen))
        n_mask = torch.ceil(frac * L).long().clamp(1, L)
        mask = random_mask(n_mask, L, gen).to(dev)
        x = train_tok[idx.to(dev)]
        with run.autocast():
            logits = fwd(torch.where(mask, model.mask_id, x))
        ce = F.cross_entropy(logits.float().reshape(-1, K), x.reshape(-1), reduction="none",
                             label_smoothing=cfg.label_smoothing)
        loss = (ce * mask.flatten()).sum() / mask.sum()   # masked positions only
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        loss_acc, loss_n = loss_acc + loss.detach().float(), loss_n + 1

        row = {}
        if step % cfg.log_every == 0 or step == cfg.steps:
            last_loss = (loss_acc / loss_n).item()
            run.check_finite(step, loss=last_loss)
            row.update(loss=last_loss, lr=lr_at(cfg, step - 1))
            loss_acc, loss_n = torch.zeros((), device=dev), 0
        if step % cfg.eval_every == 0 or step == cfg.steps:
            last_eval, last_eval_step = evaluate(model, cfg, held_tok, held_u8, tok, evaluator, grid_hw, run), step
            run.check_finite(step, heldout_loss=last_eval[0]["heldout_loss"])
            row.update(last_eval[0])
        if row:
            run.log(step, **row)
        if cfg.sample_every and step % cfg.sample_every == 0:
            save_grids(*evaluate(model, cfg, held_tok, held_u8, tok, evaluator, grid_hw, run)[1:], run,
                       suffix=f"_step{step:06d}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            run.save_checkpoint(step, snapshot())
        if run.stop_requested:
            run.stop(step, snapshot())

    if last_eval_step != step:  # resumed from the final checkpoint
        last_eval = evaluate(model, cfg, held_tok, held_u8, tok, evaluator, grid_hw, run)
    final, sample_u8, inpaint_grid = last_eval
    save_grids(sample_u8, inpaint_grid, run)
    run.save_artifact({"kind": "maskgit", "config": cfg.model_dump(), "step": step, "vocab": K, "length": L,
                       "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}})
    run.write_summary({"steps": step, "loss": last_loss, **final, "diverged": False})
    return final


if __name__ == "__main__":
    sys.exit(main(train, Config))
