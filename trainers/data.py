"""
Built-in procedural dataset: one centred object per image (disc, square, triangle, ring, star, cross,
hexagon, crescent) with an outline and shading, drawn over a varied background (linear or radial
gradient, stripes, smooth noise), in one of several palettes, with random scale, rotation and small
offsets. Generated deterministically from DataConfig.seed and DataConfig.draw (a study's replicate k
sees draw k; draw 0 is the original data) with vectorised numpy; nothing is downloaded.
`load_split` also dispatches to the image-folder loader for `source == "folder"`.
"""

import functools
from typing import Literal

import numpy as np
import torch

from trainers.common import DataConfig

FAMILIES: list[str] = ["disc", "square", "triangle", "ring", "star", "cross", "hexagon", "crescent"]

# each palette: two background tones, an object fill, an outline (RGB in [0, 1])
PALETTES = np.array([
    [[0.93, 0.90, 0.82], [0.78, 0.72, 0.60], [0.80, 0.20, 0.15], [0.25, 0.08, 0.05]],  # paper / red
    [[0.10, 0.14, 0.28], [0.22, 0.32, 0.52], [0.98, 0.80, 0.25], [1.00, 0.97, 0.85]],  # night / gold
    [[0.70, 0.86, 0.72], [0.40, 0.62, 0.45], [0.35, 0.20, 0.55], [0.10, 0.05, 0.20]],  # meadow / violet
    [[0.20, 0.20, 0.22], [0.45, 0.45, 0.48], [0.20, 0.75, 0.90], [0.90, 0.98, 1.00]],  # slate / cyan
    [[0.98, 0.85, 0.70], [0.95, 0.60, 0.45], [0.10, 0.35, 0.40], [0.02, 0.12, 0.15]],  # peach / teal
    [[0.85, 0.88, 0.95], [0.60, 0.68, 0.85], [0.95, 0.45, 0.10], [0.35, 0.12, 0.02]],  # sky / orange
], dtype=np.float32)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return x.float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (clamped, rounded)."""
    return x.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


# -----------------------------------------------------------------------------
# shapes as (approximate) signed distances in object units: < 0 inside, boundary near radius 1

def _polygon(x, y, n, apothem=0.8):
    # max over the edge normals of a regular n-gon (first vertex pointing up)
    d = None
    for k in range(n):
        a = np.pi / 2 + np.pi / n + 2 * np.pi * k / n
        e = x * np.cos(a) + y * np.sin(a) - apothem
        d = e if d is None else np.maximum(d, e)
    return d


def _sdf(family, x, y):
    r = np.sqrt(x * x + y * y)
    if family == "disc":
        return r - 1.0
    if family == "square":
        return np.maximum(np.abs(x), np.abs(y)) - 0.8
    if family == "triangle":
        return _polygon(x, y + 0.15, 3, apothem=0.55) / 0.55 * 0.8
    if family == "ring":
        return np.abs(r - 0.7) - 0.3
    if family == "star":
        # 5-point star: radius alternates between 1.0 (tips) and 0.45 (notches) along the angle
        th = np.arctan2(y, x) - np.pi / 2
        tri = np.abs(((th * 5 / (2 * np.pi)) % 1.0) - 0.5) * 2.0  # 1 at tips, 0 in between
        return (r - (0.45 + 0.55 * tri)) * 0.8
    if family == "cross":
        arm_a = np.maximum(np.abs(x) - 0.3, np.abs(y) - 0.95)
        arm_b = np.maximum(np.abs(x) - 0.95, np.abs(y) - 0.3)
        return np.minimum(arm_a, arm_b)
    if family == "hexagon":
        return _polygon(x, y, 6, apothem=0.85)
    if family == "crescent":
        return np.maximum(r - 1.0, -(np.sqrt((x - 0.45) ** 2 + (y - 0.2) ** 2) - 0.75))
    raise ValueError(f"unknown family {family!r}")


def _smoothstep(t):
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _generate(n: int, res: int, seed: int, draw: int, split_id: int, chunk_id: int, family_ids: tuple[int, ...]):
    entropy = [seed % 2**63, split_id, res, chunk_id] + ([draw] if draw else [])  # draw 0: the original data
    rng = np.random.default_rng(entropy)
    fam = rng.choice(np.array(family_ids), size=n)
    pal = rng.integers(0, len(PALETTES), size=n)
    colors = PALETTES[pal] * rng.uniform(0.9, 1.1, size=(n, 4, 3)).astype(np.float32)  # per-image jitter
    radius = rng.uniform(0.28, 0.42, size=n) * res                  # object radius in pixels
    angle = rng.uniform(0, 2 * np.pi, size=n)
    offset = rng.uniform(-0.06, 0.06, size=(n, 2)) * res
    bg_kind = rng.integers(0, 4, size=n)
    bg_angle = rng.uniform(0, 2 * np.pi, size=n)
    bg_freq = rng.uniform(1.5, 4.0, size=n)
    coarse = rng.uniform(0, 1, size=(n, 5, 5)).astype(np.float32)    # control points of the smooth noise
    light = rng.uniform(0, 2 * np.pi, size=n)
    grain = rng.normal(0, 0.02, size=(n, res, res, 1)).astype(np.float32)

    # pixel centres in [-1, 1]
    c = (np.arange(res, dtype=np.float32) + 0.5) / res * 2 - 1
    gy, gx = np.meshgrid(c, c, indexing="ij")
    gx, gy = gx[None], gy[None]  # [1, R, R]

    # background blend factor t in [0, 1] per pixel
    def col(v):
        return v[:, None, None].astype(np.float32)
    proj = gx * col(np.cos(bg_angle)) + gy * col(np.sin(bg_angle))
    t_lin = (proj + 1.0) * 0.5
    t_rad = np.clip(np.sqrt((gx - 0.3 * col(np.cos(bg_angle))) ** 2 + (gy - 0.3 * col(np.sin(bg_angle))) ** 2) / 1.6, 0, 1)
    t_str = _smoothstep(np.sin(proj * np.pi * col(bg_freq)) * 2.0 + 0.5)
    # smooth noise: bilinear upsampling of a 5x5 grid of random values
    u = (gx + 1) * 0.5 * 4
    v = (gy + 1) * 0.5 * 4
    u0 = np.clip(np.floor(u).astype(int), 0, 3)
    v0 = np.clip(np.floor(v).astype(int), 0, 3)
    fu, fv = _smoothstep(u - u0), _smoothstep(v - v0)
    idx = np.arange(n)[:, None, None]
    t_noise = (coarse[idx, v0, u0] * (1 - fu) * (1 - fv) + coarse[idx, v0, u0 + 1] * fu * (1 - fv)
               + coarse[idx, v0 + 1, u0] * (1 - fu) * fv + coarse[idx, v0 + 1, u0 + 1] * fu * fv)
    t = np.choose(bg_kind[:, None, None], [t_lin, t_rad, t_str, t_noise]).astype(np.float32)
    bg = colors[:, None, None, 0] * (1 - t[..., None]) + colors[:, None, None, 1] * t[..., None]

    # object frame: translate, rotate, scale to unit radius (pixel units -> object units)
    px = gx * res / 2 - col(offset[:, 0])
    py = gy * res / 2 - col(offset[:, 1])
    ca, sa = col(np.cos(angle)), col(np.sin(angle))
    ox = (ca * px + sa * py) / col(radius)
    oy = (-sa * px + ca * py) / col(radius)
    d = np.zeros((n, res, res), dtype=np.float32)
    for f in set(fam.tolist()):
        sel = fam == f
        d[sel] = _sdf(FAMILIES[f], ox[sel], oy[sel])
    d_px = d * col(radius)  # signed distance in pixels: anti-aliased edges one pixel wide
    outline_w = max(1.0, res / 24)
    cover = np.clip(0.5 - d_px, 0, 1)[..., None]
    fill = np.clip(0.5 - (d_px + outline_w), 0, 1)[..., None]
    shade = (0.85 + 0.15 * (ox * col(np.cos(light)) + oy * col(np.sin(light))))[..., None]
    img = bg * (1 - cover) + colors[:, None, None, 3] * (cover - fill) + colors[:, None, None, 2] * shade * fill
    img = np.clip(img + grain, 0, 1)
    img = (img * 255 + 0.5).astype(np.uint8).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(img), fam.astype(np.int64)


@functools.lru_cache(maxsize=16)
def _procedural(n: int, res: int, seed: int, draw: int, split_id: int, family_ids: tuple[int, ...]):
    chunk = max(1, (1 << 22) // (res * res))  # bounds peak memory at 64 px
    parts = [_generate(min(chunk, n - i), res, seed, draw, split_id, i // chunk, family_ids)
             for i in range(0, n, chunk)]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(images), torch.from_numpy(labels)


def load_split(cfg: DataConfig, split: Literal["train", "heldout"]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 [N, 3, R, R] and labels int64 [N] (family index into FAMILIES; 0 for folder data)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if cfg.source == "folder":
        from trainers.imagefolder import load_folder
        return load_folder(cfg, split)
    names = cfg.families if cfg.families is not None else FAMILIES
    family_ids = tuple(sorted({FAMILIES.index(f) for f in names}))
    n = cfg.num_train if split == "train" else cfg.num_heldout
    images, labels = _procedural(n, cfg.resolution, cfg.seed, cfg.draw, 0 if split == "train" else 1, family_ids)
    return images.clone(), labels.clone()  # callers may modify their copy
