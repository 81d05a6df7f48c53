"""Sample-quality metrics that need no pretrained network.

Every trainer evaluates its samples with the same `Evaluator`:

  swd                  ProGAN's sliced Wasserstein distance on 7x7 patches of a
                       Laplacian pyramid (x1e3, averaged over levels)
  fid_scratchenc       Frechet distance on features of a small encoder trained
                       from scratch on the run's own training images
  precision/recall/density/coverage_scratchenc
                       k-NN manifold metrics (Naeem et al. 2020) on those features
  diversity            mean pairwise pixel distance of samples / same for real images
  memorization_nn_ratio  median NN distance sample->train / held-out->train
                       (<1: samples sit closer to training images than unseen
                       real images do, i.e. copying)
  modes_covered        fraction of procedural families the encoder's classifier
                       finds among the samples
  mode_kl              KL(histogram of predicted families || uniform)

Images are uint8 tensors [N, 3, R, R]. Nothing here touches the global RNG:
all randomness comes from seeded torch.Generators, so evaluating in the middle
of training does not change the training curve.
"""
import hashlib
import math
import os
import tempfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DIRECTIONS = {
    "swd": "min",
    "fid_scratchenc": "min",
    "precision_scratchenc": "max",
    "recall_scratchenc": "max",
    "density_scratchenc": "max",
    "coverage_scratchenc": "max",
    "diversity": "max",
    "memorization_nn_ratio": "max",
    "modes_covered": "max",
    "mode_kl": "min",
}


def _to_float(images):
    assert images.dtype == torch.uint8 and images.dim() == 4 and images.shape[1] == 3, \
        f"expected uint8 [N,3,R,R], got {images.dtype} {tuple(images.shape)}"
    return images.float() / 255.0


# ---------------------------------------------------------------------------
# Sliced Wasserstein distance (Karras et al. 2018, appendix D)

def _binomial_kernel(device):
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], device=device)
    k = torch.outer(k, k)
    return (k / k.sum()).expand(3, 1, 5, 5)


def _blur(x, k):
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k, groups=3)


def laplacian_pyramid(x, num_levels):
    """x float [N,3,R,R] -> [band-pass at R, R/2, ..., low-pass residual]."""
    k = _binomial_kernel(x.device)
    levels = []
    for _ in range(num_levels - 1):
        down = _blur(x, k)[:, :, ::2, ::2]
        up = torch.zeros_like(x)
        up[:, :, ::2, ::2] = down * 4  # zero-stuffing keeps 1/4 of the mass
        levels.append(x - _blur(up, k))
        x = down
    levels.append(x)
    return levels


def _patches(level, image_idx, gen, per_image, size=7):
    n, c, h, w = level.shape
    count = len(image_idx) * per_image
    ys = torch.randint(0, h - size + 1, (count,), generator=gen).to(level.device)
    xs = torch.randint(0, w - size + 1, (count,), generator=gen).to(level.device)
    img = image_idx.repeat_interleave(per_image).to(level.device)
    r = torch.arange(size, device=level.device)
    hw = level.permute(0, 2, 3, 1)
    patches = hw[img[:, None, None], ys[:, None, None] + r[None, :, None], xs[:, None, None] + r[None, None, :]]
    return patches.reshape(count, size * size, c)


def _sliced_wasserstein(a, b, gen, repeats, dirs):
    total = 0.0
    for _ in range(repeats):
        d = torch.randn(a.shape[1], dirs, generator=gen).to(a.device)
        d = d / d.norm(dim=0, keepdim=True)
        # numpy's SIMD sort is ~40x faster than torch's on CPU
        pa = np.sort((a @ d).T.float().cpu().numpy(), axis=1)
        pb = np.sort((b @ d).T.float().cpu().numpy(), axis=1)
        total += float(np.abs(pa - pb).mean())
    return total / repeats


def swd(real, fake, seed=0, per_image=128, repeats=4, dirs=128, min_res=16):
    """Sliced Wasserstein distance x1e3 between two uint8 image sets, averaged over
    pyramid levels from R down to min(min_res, R). Patch descriptors of both sets
    are normalised per level and channel with the *real* set's mean/std (ProGAN
    normalises each set by its own statistics, which hides global colour shifts)."""
    a, b = _to_float(real), _to_float(fake)
    res = a.shape[-1]
    assert b.shape[-1] == res, "real and fake resolutions differ"
    assert res >= 8, "SWD needs images of at least 8x8 (7x7 patches)"
    num_levels = 1 + int(math.log2(res // min(min_res, res)))
    n = min(len(a), len(b))
    pyr_a, pyr_b = laplacian_pyramid(a, num_levels), laplacian_pyramid(b, num_levels)
    dists = []
    for level, (la, lb) in enumerate(zip(pyr_a, pyr_b)):
        # the same seed for both sets: identical inputs give identical descriptors
        descs = []
        for lv in (la, lb):
            g = torch.Generator().manual_seed(seed * 1000 + level)
            idx = torch.randperm(len(lv), generator=g)[:n]
            descs.append(_patches(lv, idx, g, per_image))
        mean = descs[0].mean(dim=(0, 1), keepdim=True)
        std = descs[0].std(dim=(0, 1), keepdim=True).clamp(min=1e-8)
        da, db = [((d - mean) / std).flatten(1) for d in descs]
        g = torch.Generator().manual_seed(seed * 1000 + 500 + level)
        dists.append(_sliced_wasserstein(da, db, g, repeats, dirs))
    return 1e3 * sum(dists) / len(dists)


# ---------------------------------------------------------------------------
# Feature-space metrics

def frechet_distance(feat_a, feat_b):
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2).
    tr((S_a S_b)^1/2) = tr((S_a^1/2 S_b S_a^1/2)^1/2), whose argument is symmetric
    PSD, so both roots come from eigh (no scipy)."""
    a, b = feat_a.double(), feat_b.double()
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    return frechet_from_moments(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))


def frechet_from_moments(mu_a, s_a, mu_b, s_b):
    mu_a, s_a, mu_b, s_b = (torch.as_tensor(t, dtype=torch.float64) for t in (mu_a, s_a, mu_b, s_b))
    w, v = torch.linalg.eigh(s_a)
    s_a_half = (v * w.clamp(min=0).sqrt()) @ v.T
    m = s_a_half @ s_b @ s_a_half
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    d = (mu_a - mu_b).pow(2).sum() + s_a.trace() + s_b.trace() - 2 * tr_sqrt
    return max(d.item(), 0.0)


def _kth_nn_radius(x, k):
    """Distance of each row to its k-th nearest other row."""
    d = torch.cdist(x, x)
    return d.topk(k + 1, dim=1, largest=False).values[:, k]  # index 0 is the row itself


def prdc(real_feat, fake_feat, k=5):
    """Precision, recall, density, coverage (Naeem et al. 2020) with k-NN balls."""
    real, fake = real_feat.float(), fake_feat.float()
    if len(real) < 2 or len(fake) < 2:
        return dict.fromkeys(("precision", "recall", "density", "coverage"), float("nan"))
    k = min(k, len(real) - 1, len(fake) - 1)
    r_real = _kth_nn_radius(real, k)
    r_fake = _kth_nn_radius(fake, k)
    d = torch.cdist(real, fake)  # [N_real, N_fake]
    inside_real = d <= r_real[:, None]  # fake j inside the ball of real i
    return {
        "precision": inside_real.any(dim=0).float().mean().item(),
        "recall": (d <= r_fake[None, :]).any(dim=1).float().mean().item(),
        "density": inside_real.sum(dim=0).float().mean().item() / k,
        "coverage": (d.min(dim=1).values <= r_real).float().mean().item(),
    }


def _pixels(images, res=32):
    """Images as flat float vectors, area-downsampled to at most res x res."""
    x = _to_float(images)
    if x.shape[-1] > res:
        x = F.adaptive_avg_pool2d(x, res)
    return x.flatten(1)


def mean_pairwise_distance(x):
    if len(x) < 2:
        return 0.0
    d = torch.cdist(x, x)
    return (d.sum() / (len(x) * (len(x) - 1))).item()


def nn_distance(queries, reference, chunk=1024):
    """Distance of each query row to its nearest reference row."""
    out = []
    for q in queries.split(chunk):
        out.append(torch.cat([torch.cdist(q, r) for r in reference.split(8192)], dim=1).min(dim=1).values)
    return torch.cat(out)


def mode_histogram_metrics(pred, families):
    """pred: predicted family per sample; families: the families present in the data."""
    fam = torch.as_tensor(sorted(set(int(f) for f in families)))
    counts = (pred[:, None] == fam[None, :]).sum(0).double()
    p = counts / counts.sum().clamp(min=1)
    nz = p > 0
    kl = (p[nz] * (p[nz] * len(fam)).log()).sum().item()
    return {"modes_covered": nz.double().mean().item(), "mode_kl": kl}


# ---------------------------------------------------------------------------
# The scratch encoder: a small conv net trained on the run's own training images
# to classify the procedural family (when there is more than one) and to predict
# which of four rotations was applied (self-supervised; works on unlabelled
# photographs too). Features = pooled stage-1, pooled stage-2 and the embedding,
# each group scaled to unit total variance on the training set so low-level
# colour/texture statistics and the learned embedding weigh the same.

class ScratchEncoder(nn.Module):
    def __init__(self, num_classes, width=16, embed_dim=128):
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

    def raw_features(self, x):
        return torch.cat([g / s for g, s in zip(self.trunk(x), self.group_scale)], dim=1)

    @torch.no_grad()
    def features(self, images, batch=256):
        dev = self.group_scale.device
        return torch.cat([self.raw_features(_to_float(b.to(dev))).float().cpu() for b in images.split(batch)])

    @torch.no_grad()
    def predict(self, images, families, batch=256):
        """Most likely family among `families` (the head also has logits for absent ones)."""
        dev = self.group_scale.device
        fam = torch.as_tensor(sorted(set(int(f) for f in families)), device=dev)
        out = [fam[self(_to_float(b.to(dev)))[0][:, fam].argmax(1)].cpu() for b in images.split(batch)]
        return torch.cat(out)


ENCODER_STEPS = 300
ENCODER_BATCH = 64
ENCODER_LR = 2e-3


def train_scratch_encoder(images, labels, seed=0, device="cpu", steps=None, batch=None):
    steps, batch = steps or ENCODER_STEPS, batch or ENCODER_BATCH
    num_classes = int(labels.max()) + 1 if len(labels) else 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ScratchEncoder(num_classes)
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=ENCODER_LR)
    gen = torch.Generator().manual_seed(seed)
    multi_class = len(torch.unique(labels)) > 1
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        rot = torch.randint(0, 4, (batch,), generator=gen)
        flip = torch.rand(batch, generator=gen) < 0.5
        x = _to_float(images[idx])
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        for r in range(1, 4):
            x[rot == r] = torch.rot90(x[rot == r], r, dims=(2, 3))
        x = x.to(device)
        cls_logits, rot_logits = model(x)
        loss = F.cross_entropy(rot_logits, rot.to(device))
        if multi_class:
            loss = loss + F.cross_entropy(cls_logits, labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        sub = images[torch.randperm(len(images), generator=gen)[:1024]]
        groups = [torch.cat(g) for g in zip(*[model.trunk(_to_float(b.to(device))) for b in sub.split(256)])]
        scale = torch.stack([(g - g.mean(0)).pow(2).sum(1).mean().sqrt().clamp(min=1e-6) for g in groups])
        model.group_scale.copy_(scale)
    return model


_ENCODERS = {}


def _dataset_key(images, labels, seed):
    h = hashlib.sha1()
    h.update(repr((tuple(images.shape), ENCODER_STEPS, ENCODER_BATCH, ENCODER_LR, seed, "bn-w16-v1")).encode())
    h.update(images.contiguous().numpy().tobytes())
    h.update(labels.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def get_scratch_encoder(images, labels, cache_dir=None, seed=0, device="cpu"):
    """The scratch encoder for this training set: trained once per process and,
    with cache_dir, once per directory (scratchenc-<hash of the data>.pt)."""
    key = _dataset_key(images, labels, seed)
    if key in _ENCODERS:
        return _ENCODERS[key].to(device)
    path = os.path.join(cache_dir, f"scratchenc-{key}.pt") if cache_dir else None
    if path and os.path.exists(path):
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model = ScratchEncoder(blob["num_classes"])
        model.load_state_dict(blob["state"])
        model.eval()
    else:
        model = train_scratch_encoder(images, labels, seed=seed, device=device).cpu()
        if path:
            os.makedirs(cache_dir, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".scratchenc-")
            with os.fdopen(fd, "wb") as f:
                torch.save({"num_classes": model.cls_head.out_features, "state": model.state_dict()}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    _ENCODERS[key] = model
    return model.to(device)


# ---------------------------------------------------------------------------

class Evaluator:
    """Scores generated samples against the held-out real images (distribution
    metrics) and the training images (memorization). Real-side statistics are
    computed once; calling it on samples is cheap. `seed` fixes the encoder and
    the SWD projections; trainers leave it at 0 so that every arm and replicate
    of a study is measured with the same encoder."""

    def __init__(self, train_images, train_labels, heldout_images, heldout_labels=None,
                 cache_dir=None, seed=0, device="cpu"):
        self.seed = seed
        self.real = heldout_images
        self.families = sorted(set(train_labels.tolist()))
        self.encoder = get_scratch_encoder(train_images, train_labels, cache_dir, seed, device)
        self.real_feat = self.encoder.features(heldout_images)
        self.device = device
        self.train_px = _pixels(train_images).to(device)
        self.real_px = _pixels(heldout_images).to(device)
        self.real_nn = nn_distance(self.real_px, self.train_px).median().item()
        self.real_div = mean_pairwise_distance(self.real_px)
        self.encoder_acc = None
        if heldout_labels is not None and len(self.families) > 1:
            pred = self.encoder.predict(heldout_images, self.families)
            self.encoder_acc = (pred == heldout_labels).float().mean().item()

    def __call__(self, samples):
        feat = self.encoder.features(samples)
        px = _pixels(samples).to(self.device)
        out = {"swd": swd(self.real, samples, seed=self.seed),
               "fid_scratchenc": frechet_distance(self.real_feat, feat)}
        out.update({f"{k}_scratchenc": v for k, v in prdc(self.real_feat, feat).items()})
        # 1: as diverse as the data; 0: a collapsed generator
        out["diversity"] = mean_pairwise_distance(px) / self.real_div if self.real_div > 0 else float("nan")
        sample_nn = nn_distance(px, self.train_px).median().item()
        out["memorization_nn_ratio"] = sample_nn / self.real_nn if self.real_nn > 0 else float("nan")
        out.update(mode_histogram_metrics(self.encoder.predict(samples, self.families), self.families))
        if self.encoder_acc is not None:
            out["scratchenc_acc"] = self.encoder_acc
        return out
