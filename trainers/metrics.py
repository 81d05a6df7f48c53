"""Sample-quality metrics that need no pretrained network.

Every image trainer gets its `Evaluator` from `build_evaluator(cfg, run, train_u8, heldout_u8)`.
Distribution metrics compare samples with the held-out split of the study's judge (trainers/judge.py,
one encoder per study and seed, shared by every arm); memorization compares them with the arm's own
training and held-out images. Lower is better unless marked (max):

  swd                  sliced Wasserstein distance (x1e3) between 7x7 patch descriptors of a Laplacian
                       pyramid, averaged over levels from R down to 8 px (>= 2 levels: 16 and 8 px at
                       16 px). As in Karras et al. 2018, each set's descriptors are normalised per
                       level and channel by that set's OWN mean and std, so SWD sees local structure
                       (edges, textures, shapes) but not global colour or brightness shifts; KID and
                       FID, on the judge's features, see those.
  kid_scratchenc       kernel inception distance (Binkowski et al. 2018, x1e3): the unbiased estimate
                       of MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3 on judge features. Unbiased
                       at any sample size: two samples of one distribution score ~0 (it can be < 0).
  fid_scratchenc       Frechet distance on judge features. nan when either set has no more samples
                       than feature dimensions (112 by default): the sample covariance is then
                       singular and the value meaningless; read KID there.
  precision/recall/density/coverage_scratchenc (max)
                       k-NN manifold metrics (Naeem et al. 2020) on judge features
  diversity_gap        |log(mean pairwise pixel distance of samples / same of real images)|:
                       0 = as diverse as the data; collapse and noise both score high
  memorized_fraction   share of samples whose nearest training image (pixels) is nearer than the
                       5th percentile of held-out-to-train nearest-neighbour distances: unseen real
                       images score ~0.05, copies of training images 1
  modes_covered (max)  share of procedural families the judge's classifier finds among the samples
  mode_kl              KL(histogram of predicted families || uniform)

Images are uint8 tensors [N, 3, R, R]. Nothing here touches the global RNG: all randomness comes
from seeded torch.Generators, so evaluating in the middle of training does not change the curve.
"""
import math
import sys

import numpy as np
import torch
import torch.nn.functional as F

from trainers import judge as judge_mod
from trainers.common import BadConfig
from trainers.data import load_split

DIRECTIONS = {
    "swd": "min",
    "fid_scratchenc": "min",
    "kid_scratchenc": "min",
    "precision_scratchenc": "max",
    "recall_scratchenc": "max",
    "density_scratchenc": "max",
    "coverage_scratchenc": "max",
    "diversity_gap": "min",
    "memorized_fraction": "min",
    "modes_covered": "max",
    "mode_kl": "min",
}
# Sample metrics a degenerate generator can flatter: what flatters each, and the guard metrics (of DIRECTIONS) an
# arm called better on it must not be worse on. A study may still rank arms by them; its report checks the guards.
KID_GUARD = ("kid_scratchenc",)
FLATTERED_BY = {
    "precision_scratchenc": ("mode collapse: a few faithful samples are all precise",
                             ("recall_scratchenc", "coverage_scratchenc")),
    "density_scratchenc": ("mode collapse onto the dense regions of the real data",
                           ("recall_scratchenc", "coverage_scratchenc")),
    "memorized_fraction": ("samples far from every training image, noise included (noise scores 0)", KID_GUARD),
    "swd": ("a global colour or brightness shift, which its per-set normalisation hides", KID_GUARD),
    "modes_covered": ("poor samples the judge still sorts into every family", KID_GUARD),
    "mode_kl": ("poor samples the judge still sorts into every family", KID_GUARD),
}
MEMORIZATION_QUANTILE = 0.05


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


def swd_levels(res, min_res=8, patch=7):
    """Sides of the pyramid levels SWD compares: R, R/2, ... down to max(min_res, patch)."""
    if res < 2 * max(min_res, patch):
        raise ValueError(f"SWD needs images of at least {2 * max(min_res, patch)} px for two pyramid levels, got {res}")
    return [res >> i for i in range(1 + int(math.log2(res / max(min_res, patch))))]


def swd(real, fake, seed=0, per_image=128, repeats=4, dirs=128, min_res=8, patch=7):
    """Sliced Wasserstein distance x1e3 between two uint8 image sets, averaged over the levels of a
    Laplacian pyramid from R down to min_res (R=16 -> levels 16 and 8). Each set's patch descriptors
    are normalised per level and channel by the set's own mean and std (Karras et al. 2018)."""
    a, b = _to_float(real), _to_float(fake)
    res = a.shape[-1]
    assert b.shape[-1] == res, "real and fake resolutions differ"
    num_levels = len(swd_levels(res, min_res, patch))
    n = min(len(a), len(b))
    dists = []
    for level, (la, lb) in enumerate(zip(laplacian_pyramid(a, num_levels), laplacian_pyramid(b, num_levels))):
        descs = []
        for lv in (la, lb):
            # the same seed for both sets: identical inputs give identical descriptors
            g = torch.Generator().manual_seed(seed * 1000 + level)
            idx = torch.randperm(len(lv), generator=g)[:n]
            positions = (lv.shape[-2] - patch + 1) * (lv.shape[-1] - patch + 1)
            d = _patches(lv, idx, g, min(per_image, positions), patch)
            d = (d - d.mean(dim=(0, 1), keepdim=True)) / d.std(dim=(0, 1), keepdim=True).clamp(min=1e-8)
            descs.append(d.flatten(1))
        g = torch.Generator().manual_seed(seed * 1000 + 500 + level)
        dists.append(_sliced_wasserstein(descs[0], descs[1], g, repeats, dirs))
    return 1e3 * sum(dists) / len(dists)


# ---------------------------------------------------------------------------
# Feature-space metrics

def frechet_distance(feat_a, feat_b):
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2); nan when either set has no more rows
    than columns (singular covariance). tr((S_a S_b)^1/2) = tr((S_a^1/2 S_b S_a^1/2)^1/2), whose
    argument is symmetric PSD, so both roots come from eigh (no scipy)."""
    a, b = feat_a.double(), feat_b.double()
    if min(len(a), len(b)) <= a.shape[1]:
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


def _poly_kernel_sum(a, b, block=2048):
    """Sum over all pairs of (a_i . b_j / d + 1)^3, in blocks so memory stays bounded."""
    d = a.shape[1]
    return sum(((x @ y.T) / d + 1).pow(3).sum().item() for x in a.split(block) for y in b.split(block))


def kid(feat_a, feat_b):
    """Unbiased MMD^2 (Binkowski et al. 2018) with the cubic polynomial kernel k(x, y) = (x.y/d + 1)^3:
    mean of k over distinct pairs within a + same within b - 2 mean of k over pairs across. Raw units
    (the Evaluator reports it x1e3); nan with fewer than two rows in either set."""
    a, b = feat_a.double(), feat_b.double()
    m, n, d = len(a), len(b), a.shape[1]
    if m < 2 or n < 2:
        return float("nan")
    diag_a = (a.pow(2).sum(1) / d + 1).pow(3).sum().item()
    diag_b = (b.pow(2).sum(1) / d + 1).pow(3).sum().item()
    within_a = (_poly_kernel_sum(a, a) - diag_a) / (m * (m - 1))
    within_b = (_poly_kernel_sum(b, b) - diag_b) / (n * (n - 1))
    return within_a + within_b - 2 * _poly_kernel_sum(a, b) / (m * n)


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


# ---------------------------------------------------------------------------
# Pixel-space metrics: diversity and memorization

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


def diversity_gap(sample_px, real_diversity):
    """|log(mean pairwise distance of the samples / that of real images)|; inf for a fully collapsed set."""
    div = mean_pairwise_distance(sample_px)
    if real_diversity <= 0:
        return float("nan")
    return abs(math.log(div / real_diversity)) if div > 0 else float("inf")


def nn_distance(queries, reference, chunk=1024):
    """Distance of each query row to its nearest reference row."""
    out = []
    for q in queries.split(chunk):
        out.append(torch.cat([torch.cdist(q, r) for r in reference.split(8192)], dim=1).min(dim=1).values)
    return torch.cat(out)


def memorization_threshold(heldout_px, train_px, quantile=MEMORIZATION_QUANTILE):
    """The `quantile` of held-out-to-train nearest-neighbour distances: closer than this is 'copied'."""
    return torch.quantile(nn_distance(heldout_px, train_px).double(), quantile).item()


def memorized_fraction(sample_px, train_px, threshold):
    """Share of samples at most `threshold` from their nearest training image."""
    return (nn_distance(sample_px, train_px) <= threshold).double().mean().item()


def mode_histogram_metrics(pred, families):
    """pred: predicted family per sample; families: the families present in the data."""
    fam = torch.as_tensor(sorted(set(int(f) for f in families)))
    counts = (pred[:, None] == fam[None, :]).sum(0).double()
    p = counts / counts.sum().clamp(min=1)
    nz = p > 0
    kl = (p[nz] * (p[nz] * len(fam)).log()).sum().item()
    return {"modes_covered": nz.double().mean().item(), "mode_kl": kl}


# ---------------------------------------------------------------------------

class Evaluator:
    """Scores samples: distribution metrics against `real_images` (the judge's held-out split) on the
    judge's features, memorization against the arm's `train_images` with the threshold set by the
    arm's `heldout_images`. Real-side statistics are computed once; a call on samples is cheap.
    `seed` fixes the SWD patches and projections; trainers leave it at 0."""

    def __init__(self, judge, real_images, train_images, heldout_images, seed=0, device="cpu"):
        self.judge, self.seed, self.device = judge, seed, device
        self.real = real_images
        self.real_feat = judge.encoder.features(real_images)
        self.real_div = mean_pairwise_distance(_pixels(real_images).to(device))
        self.train_px = _pixels(train_images).to(device)
        self.memo_threshold = memorization_threshold(_pixels(heldout_images).to(device), self.train_px)
        self._warned = False

    def __call__(self, samples):
        feat = self.judge.encoder.features(samples)
        px = _pixels(samples).to(self.device)
        out = {"swd": swd(self.real, samples, seed=self.seed),
               "fid_scratchenc": frechet_distance(self.real_feat, feat),
               "kid_scratchenc": 1e3 * kid(self.real_feat, feat)}
        if math.isnan(out["fid_scratchenc"]) and not self._warned:
            self._warned = True
            print(f"warning: fid_scratchenc is nan: {len(feat)} samples and {len(self.real_feat)} real images "
                  f"for {feat.shape[1]} feature dims (FID needs more of both); read kid_scratchenc",
                  file=sys.stderr, flush=True)
        out.update({f"{k}_scratchenc": v for k, v in prdc(self.real_feat, feat).items()})
        out["diversity_gap"] = diversity_gap(px, self.real_div)
        out["memorized_fraction"] = memorized_fraction(px, self.train_px, self.memo_threshold)
        out.update(mode_histogram_metrics(self.judge.encoder.predict(samples, self.judge.families),
                                          self.judge.families))
        if len(self.judge.families) > 1:
            out["scratchenc_acc"] = self.judge.heldout_acc  # the judge's family accuracy on held-out images
        return out


def build_evaluator(cfg, run, train_u8, heldout_u8) -> Evaluator:
    """The one way a trainer gets its Evaluator. `cfg` is a judge.JudgedConfig; the judge comes from
    cfg.judge_dir, else it is trained into OUT/upstream/judge on the trainer's own data (cfg.data)."""
    judge_cfg = cfg.judge if cfg.judge_dir is not None else cfg.judge.model_copy(update={"data": cfg.data})
    folder = run.upstream("judge", judge_cfg, cfg.judge_dir, judge_mod.train)
    judge = judge_mod.Judge(folder, run.device)
    real = load_split(judge.data, "heldout")[0]
    if real.shape[1:] != heldout_u8.shape[1:]:
        raise BadConfig(f"judge_dir: the judge's held-out images are {tuple(real.shape[1:])}, "
                                  f"this run's are {tuple(heldout_u8.shape[1:])} (judge.data.resolution differs)")
    return Evaluator(judge, real, train_u8, heldout_u8, device=run.device)
