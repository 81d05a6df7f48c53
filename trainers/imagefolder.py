"""Image-folder data source (`data.source: folder`): a user's camera roll as a training set.

Scans `data.path` recursively for jpg/jpeg/png/webp/bmp, decodes each file once
(EXIF orientation applied; grayscale, palette, 16-bit and RGBA converted, alpha
composited on white), centre-crops to a square and resizes to `data.resolution`.
Unreadable files are skipped and reported on stderr. Optional curation filters:
`drop_grayscale` (channels nearly equal) and `centered_only` (a simple
figure-ground test: the object that stands out from the border colour must sit
near the centre). The result is cached as .npz in `data.cache_dir` (default
`<path>/.armature-cache`), keyed by the file list with sizes and mtimes, the
resolution and the filters, so later runs do not decode again. The train/held-out
split is a hash of each file's relative path (salted by `data.draw` for draws other
than 0, so each replicate of a study holds out a different subset), so it is stable
when files are added.
"""
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from trainers.common import BadConfig, DataConfig

SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
CACHE_VERSION = 1
GRAY_MAX_CHROMA = 12      # grayscale: 99% of pixels have max-min channel spread <= this (0..255)
SALIENCY_RES = 32         # the figure-ground test runs on a 32x32 view of the crop
CENTER_MAX_OFFSET = 0.15  # centroid of the salient mass within 15% of the side from the centre
CENTER_MIN_CONTRAST = 1.3  # centre region at least 1.3x as salient as the border ring

_reported = set()


def scan(root: Path) -> list[tuple[str, int, int]]:
    """(relative posix path, size, mtime_ns) of every image file under root, skipping hidden dirs."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if Path(name).suffix.lower() in SUFFIXES and not name.startswith("."):
                p = Path(dirpath) / name
                st = p.stat()
                found.append((p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return sorted(found)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(im, dtype=np.float32)
        a = a * (255.0 / (65535.0 if a.max() > 255 else 255.0))
        im = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA")  # keeps palette transparency as alpha
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    return im.convert("RGB")


def _decode(path: Path, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (uint8 [R,R,3] centre crop, uint8 [32,32,3] view of the same crop for the filters)."""
    with Image.open(path) as im:
        want = max(2 * resolution, 2 * SALIENCY_RES)
        im.draft("RGB", (want, want))  # JPEG: decode at a reduced scale that still covers `want`
        im = ImageOps.exif_transpose(im)
        im = _to_rgb(im)
        w, h = im.size
        side = min(w, h)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        out = im.resize((resolution, resolution), Image.LANCZOS, box=box, reducing_gap=3.0)
        view = im.resize((SALIENCY_RES, SALIENCY_RES), Image.BOX, box=box)
        return np.asarray(out, dtype=np.uint8), np.asarray(view, dtype=np.uint8)


def is_grayscale(view: np.ndarray) -> bool:
    """Channels (nearly) equal; a percentile, not the mean, so that a mostly dark
    colour photograph (a night sky) still counts as colour."""
    a = view.astype(np.int16)
    return float(np.percentile(a.max(axis=-1) - a.min(axis=-1), 99)) <= GRAY_MAX_CHROMA


def centering(view: np.ndarray) -> tuple[float, float]:
    """Figure-ground test on a small RGB view. Saliency = colour distance from the
    median colour of the border ring (the background model); returns the offset of
    the saliency centroid from the centre (fraction of the side) and the ratio of
    mean saliency in the central half to that in the border ring."""
    a = view.astype(np.float32)
    n = a.shape[0]
    ring = max(1, n // 8)
    border = np.ones((n, n), bool)
    border[ring:-ring, ring:-ring] = False
    bg = np.median(a[border], axis=0)
    sal = np.sqrt(((a - bg) ** 2).sum(-1))
    mass = np.clip(sal - np.percentile(sal[border], 75), 0, None)
    if mass.sum() <= 1e-6:
        return 1.0, 0.0
    c = np.arange(n) + 0.5
    cy = (mass.sum(1) * c).sum() / mass.sum()
    cx = (mass.sum(0) * c).sum() / mass.sum()
    offset = float(np.hypot(cy - n / 2, cx - n / 2) / n)
    q = n // 4
    contrast = float(sal[q:n - q, q:n - q].mean() / (sal[border].mean() + 1.0))
    return offset, contrast


def is_centered(view: np.ndarray) -> bool:
    offset, contrast = centering(view)
    return offset < CENTER_MAX_OFFSET and contrast > CENTER_MIN_CONTRAST


def _build(root: Path, files, cfg: DataConfig):
    images, paths, skipped = [], [], []
    dropped = {"grayscale": 0, "not_centered": 0}
    for rel, _, _ in files:
        try:
            rgb, view = _decode(root / rel, cfg.resolution)
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
            skipped.append(f"{rel} ({type(e).__name__})")
            continue
        if cfg.drop_grayscale and is_grayscale(view):
            dropped["grayscale"] += 1
            continue
        if cfg.centered_only and not is_centered(view):
            dropped["not_centered"] += 1
            continue
        images.append(rgb.transpose(2, 0, 1))
        paths.append(rel)
    r = cfg.resolution
    arr = np.stack(images) if images else np.zeros((0, 3, r, r), np.uint8)
    return arr, paths, skipped, dropped


def _save_cache(path: Path, arr, paths, skipped, dropped):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, images=arr, paths=np.array(paths, dtype=str), skipped=np.array(skipped, dtype=str),
                 dropped=np.array(json.dumps(dropped)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load_cache(path: Path):
    with np.load(path, allow_pickle=False) as z:
        return z["images"], z["paths"].tolist(), z["skipped"].tolist(), json.loads(str(z["dropped"]))


def heldout_mask(paths: list[str], fraction: float, draw: int = 0) -> np.ndarray:
    """Held-out iff the hash of the relative path (prefixed by the draw, for draws
    other than 0), read as a number in [0, 1), is below `fraction`; with two or more
    images both splits are kept non-empty."""
    keys = paths if draw == 0 else [f"{draw}:{p}" for p in paths]
    u = np.array([int(hashlib.sha1(k.encode()).hexdigest()[:12], 16) / 16 ** 12 for k in keys])
    mask = u < fraction
    if len(paths) >= 2 and not mask.any():
        mask[np.argmin(u)] = True
    if len(paths) >= 2 and mask.all():
        mask[np.argmax(u)] = False
    return mask


def load_folder(cfg: DataConfig, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 [N, 3, R, R] of one split and int64 zeros [N] (photographs carry no family)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    root = Path(cfg.path or "").expanduser()
    if not cfg.path or not root.is_dir():
        raise BadConfig(f"data.path {cfg.path!r} is not a directory")
    files = scan(root)
    if not files:
        raise BadConfig(f"no {'/'.join(sorted(s[1:] for s in SUFFIXES))} images under {root}")

    key_src = json.dumps([CACHE_VERSION, files, cfg.resolution, cfg.drop_grayscale, cfg.centered_only])
    key = hashlib.sha1(key_src.encode()).hexdigest()[:20]
    cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else root / ".armature-cache"
    cache = cache_dir / f"imagefolder-{key}.npz"
    if cache.exists():
        arr, paths, skipped, dropped = _load_cache(cache)
    else:
        arr, paths, skipped, dropped = _build(root, files, cfg)
        try:
            _save_cache(cache, arr, paths, skipped, dropped)
        except OSError as e:
            print(f"imagefolder: could not write cache {cache}: {e}", file=sys.stderr)

    if key not in _reported:
        _reported.add(key)
        if skipped:
            shown = ", ".join(skipped[:10]) + (f", ... ({len(skipped) - 10} more)" if len(skipped) > 10 else "")
            print(f"imagefolder: skipped {len(skipped)} corrupt files: {shown}", file=sys.stderr)
        print(f"imagefolder: {len(paths)} images from {root} (dropped {dropped['grayscale']} grayscale, "
              f"{dropped['not_centered']} not centred)", file=sys.stderr)
    if not paths:
        raise BadConfig(f"no usable images under {root} after decoding and filtering")

    mask = heldout_mask(paths, cfg.heldout_fraction, cfg.draw)
    sel = mask if split == "heldout" else ~mask
    images = torch.from_numpy(np.ascontiguousarray(arr[sel]))
    return images, torch.zeros(len(images), dtype=torch.int64)
