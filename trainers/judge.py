"""
The judge: the feature encoder that scores every arm of a study. A small conv net trained from
scratch on the training images to classify the procedural family (when there is more than one) and
to predict which of four rotations was applied (self-supervised, so unlabelled photographs work too).
Features = pooled stage-1, pooled stage-2 and the embedding, each group scaled to unit total variance
on the training set so low-level colour/texture statistics and the learned embedding weigh the same.

The orchestrator trains one judge per study and seed (UPSTREAM scope "study") and hands its folder to
every arm of that seed as `judge_dir`, so all arms of seed k are measured by the same network. Training
is single-threaded on the CPU with seeded generators: the same config gives the same weights on any
machine. A trainer run alone trains its judge into OUT/upstream/judge (see metrics.build_evaluator).
The artifact holds only tensors and plain containers (torch.load(weights_only=True) reads it).

    python -m trainers.judge --config config.json --out DIR
"""

import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import model_validator

from trainers.common import BadConfig, DataConfig, Run, TrainerConfig, main, seed_everything
from trainers.data import load_split

# -----------------------------------------------------------------------------
# config


class Config(TrainerConfig):
    steps: int = 300
    batch_size: int = 64
    lr: float = 2e-3
    log_every: int = 50
    eval_every: int = 300
    checkpoint_every: int = 100
    sample_every: int = 0
    device: str = "cpu"       # the judge always trains on the CPU, single-threaded (deterministic)
    width: int = 16           # channels of stage 1; stages 2 and 3 have 2x and 4x
    embed_dim: int = 64       # feature dim = width + 2 * width + embed_dim (112 by default)

    @model_validator(mode="after")
    def _check(self):
        if self.device != "cpu":
            raise ValueError(f"the judge trains on the CPU only (deterministic), got device {self.device!r}")
        if self.width < 1 or self.embed_dim < 1:
            raise ValueError("width and embed_dim must be >= 1")
        return self


class JudgedConfig(TrainerConfig):
    """Base of every image trainer's Config: its samples are scored by the study's judge."""
    judge: Config = Config()
    judge_dir: str | None = None   # a finished judge run; None = train one into OUT/upstream/judge
    eval_samples: int = 512        # samples scored per evaluation (KID/FID/SWD/PRDC, memorization)

    @model_validator(mode="after")
    def _check_judged(self):
        if self.eval_samples < 2:
            raise ValueError(f"eval_samples must be >= 2, got {self.eval_samples}")
        return self


METRICS = {"heldout_acc": "max", "rotation_acc": "max"}
UPSTREAM: dict = {}
SEED_RANDOMISES = ["encoder initialisation", "batch order, rotations and flips", "data draw (data.draw)"]
JUDGE_UPSTREAM = {"trainer": "judge", "dir_field": "judge_dir", "scope": "study"}  # the link image trainers declare

# -----------------------------------------------------------------------------
# model


def _to_unit(images_u8):
    return images_u8.float() / 255.0


class ScratchEncoder(nn.Module):
    def __init__(self, num_classes, width=16, embed_dim=64):
        super().__init__()
        c1, c2, c3 = width, 2 * width, 4 * width

        def stage(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.stage1, self.stage2, self.stage3 = stage(3, c1), stage(c1, c2), stage(c2, c3)
        self.embed = nn.Linear(c3 * 4, embed_dim)
        self.cls_head = nn.Linear(embed_dim, num_classes)
        self.rot_head = nn.Linear(embed_dim, 4)
        self.register_buffer("group_scale", torch.ones(3))

    def trunk(self, x):
        h1 = self.stage1(x * 2 - 1)
        h2 = self.stage2(h1)
        h3 = self.stage3(h2)
        e = F.relu(self.embed(F.adaptive_avg_pool2d(h3, 2).flatten(1)))
        return [h1.mean((2, 3)), h2.mean((2, 3)), e]

    def forward(self, x):
        e = self.trunk(x)[-1]
        return self.cls_head(e), self.rot_head(e)

    @torch.no_grad()
    def features(self, images_u8, batch=256):
        """uint8 [N, 3, R, R] -> float [N, width * 3 + embed_dim] on the CPU."""
        dev = self.group_scale.device
        out = [torch.cat([g / s for g, s in zip(self.trunk(_to_unit(b.to(dev))), self.group_scale)], 1)
               for b in images_u8.split(batch)]
        return torch.cat(out).float().cpu()

    @torch.no_grad()
    def predict(self, images_u8, families, batch=256):
        """Most likely family among `families` (the head also has logits for absent ones)."""
        dev = self.group_scale.device
        fam = torch.as_tensor(sorted(set(int(f) for f in families)), device=dev)
        out = [fam[self(_to_unit(b.to(dev)))[0][:, fam].argmax(1)].cpu() for b in images_u8.split(batch)]
        return torch.cat(out)


def augment(images_u8, idx, gen):
    """Random horizontal flip, then one of four rotations; returns (images in [0, 1], rotation ids)."""
    n = len(idx)
    rot = torch.randint(0, 4, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    x = _to_unit(images_u8[idx])
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    for r in range(1, 4):
        x[rot == r] = torch.rot90(x[rot == r], r, dims=(2, 3))
    return x, rot


@torch.no_grad()
def evaluate(model, images_u8, labels, families, gen):
    model.eval()
    x, rot = augment(images_u8, torch.arange(len(images_u8)), gen)
    rot_pred = torch.cat([model(b)[1].argmax(1) for b in x.split(256)])
    out = {"rotation_acc": (rot_pred == rot).float().mean().item(), "heldout_acc": float("nan")}
    if len(families) > 1:
        out["heldout_acc"] = (model.predict(images_u8, families) == labels).float().mean().item()
    model.train()
    return out


# -----------------------------------------------------------------------------
# training


def train(cfg: Config, run: Run):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same sums in the same order on every machine
    try:
        return _train(cfg, run)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: Config, run: Run):
    images, labels = load_split(cfg.data, "train")
    held, held_labels = load_split(cfg.data, "heldout")
    families = sorted(set(labels.tolist()))
    num_classes = max(families) + 1
    multi_class = len(families) > 1
    seed_everything(cfg.seed)  # (trainers that train their judge first seed again after it)
    model = ScratchEncoder(num_classes, cfg.width, cfg.embed_dim)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)   # batch order, flips and rotations
    step, last = 0, {}

    state = run.resume()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        step, last = state["step"], state["last"]

    def snapshot():
        return {"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(), "last": last}

    while step < cfg.steps:
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=gen)
        x, rot = augment(images, idx, gen)
        cls_logits, rot_logits = model(x)
        loss = F.cross_entropy(rot_logits, rot)
        if multi_class:
            loss = loss + F.cross_entropy(cls_logits, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        row = {}
        if step % cfg.log_every == 0 or step == cfg.steps:
            run.check_finite(step, loss=loss.item())
            row["loss"] = loss.item()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            last = evaluate(model, held, held_labels, families, torch.Generator().manual_seed(cfg.seed + 1))
            row.update(last)
        if row:
            run.log(step, **row)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            run.save_checkpoint(step, snapshot())
        if run.stop_requested:
            run.stop(step, snapshot())

    model.eval()
    with torch.no_grad():  # scale each feature group to unit total variance on (up to) 1024 training images
        sub = images[torch.randperm(len(images), generator=gen)[:1024]]
        groups = [torch.cat(g) for g in zip(*[model.trunk(_to_unit(b)) for b in sub.split(256)])]
        scale = torch.stack([(g - g.mean(0)).pow(2).sum(1).mean().sqrt().clamp(min=1e-6) for g in groups])
        model.group_scale.copy_(scale)
    run.save_artifact({"kind": "judge", "config": cfg.model_dump(), "step": step, "num_classes": num_classes,
                       "families": families, "heldout_acc": last.get("heldout_acc", float("nan")),
                       "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}})
    run.write_summary({"steps": step, **last, "feature_dim": cfg.width * 3 + cfg.embed_dim, "diverged": False})
    return last


# -----------------------------------------------------------------------------
# loading


class Judge:
    """A finished judge run: the frozen encoder, the families it knows and its config's data."""

    def __init__(self, folder, device="cpu"):
        path = Path(folder) / "artifact.pt"
        if not path.exists():
            raise BadConfig(f"judge_dir: no artifact.pt in {folder}")
        art = torch.load(path, map_location="cpu", weights_only=True)
        if art.get("kind") != "judge":
            raise BadConfig(f"{path} is not a judge artifact (kind={art.get('kind')!r})")
        self.config = Config.model_validate(art["config"])
        self.families = list(art["families"])
        self.heldout_acc = art["heldout_acc"]
        self.encoder = ScratchEncoder(art["num_classes"], self.config.width, self.config.embed_dim)
        self.encoder.load_state_dict(art["state_dict"])
        self.encoder.to(device).eval().requires_grad_(False)

    @property
    def data(self) -> DataConfig:
        return self.config.data


if __name__ == "__main__":
    sys.exit(main(train, Config))
