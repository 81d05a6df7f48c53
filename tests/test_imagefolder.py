import shutil
from pathlib import Path

import numpy as np
import pytest
import skimage
import sklearn.datasets
import torch
from PIL import Image

from trainers import imagefolder
from trainers.common import BadConfig, DataConfig
from trainers.data import load_split

SKIMAGE = Path(skimage.__file__).parent / "data"
SKLEARN = Path(sklearn.datasets.__file__).parent / "images"

# real photographs: (source, destination inside the folder); sizes differ, camera.png is grayscale,
# horse.png is a real RGBA silhouette
REAL = [
    (SKIMAGE / "astronaut.png", "2019/astronaut.png"),
    (SKIMAGE / "coffee.png", "2019/coffee.png"),
    (SKIMAGE / "chelsea.png", "2020/pets/chelsea.png"),
    (SKIMAGE / "camera.png", "2020/camera.png"),
    (SKIMAGE / "rocket.jpg", "2021/rocket.jpg"),
    (SKIMAGE / "horse.png", "2021/horse.png"),
    (SKLEARN / "china.jpg", "2021/trip/china.JPG"),
    (SKLEARN / "flower.jpg", "flower.jpeg"),
]
GRAYSCALE = {"2020/camera.png", "2021/horse.png"}  # horse: black on transparent -> black on white


def make_roll(root: Path) -> int:
    for src, dst in REAL:
        (root / dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, root / dst)
    # RGBA with a transparent background: a red square in the middle
    a = np.zeros((60, 80, 4), np.uint8)
    a[20:40, 30:50] = (220, 30, 30, 255)
    Image.fromarray(a, "RGBA").save(root / "sticker.png")
    # other formats of real photographs
    Image.open(SKIMAGE / "chelsea.png").save(root / "2020/pets/chelsea.bmp")
    Image.open(SKIMAGE / "coffee.png").save(root / "2019/coffee.webp")
    # corrupt files: garbage bytes with an image suffix, and a truncated JPEG
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 10)
    data = (SKLEARN / "china.jpg").read_bytes()
    (root / "2021/truncated.jpg").write_bytes(data[: len(data) // 3])
    (root / "notes.txt").write_text("not an image, ignored")
    return len(REAL) + 3  # decodable images


def cfg_for(root, **kw):
    return DataConfig(source="folder", path=str(root), resolution=24, heldout_fraction=0.25, **kw)


@pytest.fixture
def roll(tmp_path):
    root = tmp_path / "roll"
    root.mkdir()
    n = make_roll(root)
    imagefolder._reported.clear()
    return root, n


def test_loads_real_photos(roll, capsys):
    root, n = roll
    cfg = cfg_for(root)
    tr, tl = load_split(cfg, "train")
    ho, hl = load_split(cfg, "heldout")
    assert len(tr) + len(ho) == n and len(tr) > 0 and len(ho) > 0
    for x, y in ((tr, tl), (ho, hl)):
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 24, 24)
        assert y.dtype == torch.int64 and (y == 0).all() and len(y) == len(x)
    err = capsys.readouterr().err
    assert "skipped 2 corrupt files" in err
    assert "broken.jpg" in err and "truncated.jpg" in err
    # the split is deterministic and disjoint
    tr2, _ = load_split(cfg, "train")
    assert torch.equal(tr, tr2)
    assert not any(torch.equal(a, b) for a in tr for b in ho)


def test_rgba_composited_on_white(roll):
    root, _ = roll
    rgb, _ = imagefolder._decode(root / "sticker.png", 24)
    assert (rgb[0, 0] == 255).all() and (rgb[-1, -1] == 255).all()  # transparent -> white
    assert rgb[12, 12, 0] > 180 and rgb[12, 12, 1] < 80              # the red square survives
    rgb, _ = imagefolder._decode(root / "2020/camera.png", 24)       # grayscale -> 3 equal channels
    assert rgb.shape == (24, 24, 3) and (rgb[..., 0] == rgb[..., 2]).all()


def test_cache_skips_decoding(roll, monkeypatch):
    root, n = roll
    cfg = cfg_for(root)
    calls = []
    real_decode = imagefolder._decode
    monkeypatch.setattr(imagefolder, "_decode", lambda p, r: calls.append(p) or real_decode(p, r))
    first, _ = load_split(cfg, "train")
    assert len(calls) == n + 2  # every candidate file, corrupt ones included
    assert len(list((root / ".armature-cache").glob("imagefolder-*.npz"))) == 1
    calls.clear()
    second, _ = load_split(cfg, "train")
    load_split(cfg, "heldout")
    assert calls == [] and torch.equal(first, second)
    # a changed file invalidates the cache; so does another resolution
    shutil.copy(SKIMAGE / "chelsea.png", root / "2019/coffee.png")
    load_split(cfg, "train")
    assert len(calls) == n + 2


def test_cache_dir_option(roll, tmp_path):
    root, _ = roll
    cache = tmp_path / "cache"
    load_split(cfg_for(root, cache_dir=str(cache)), "train")
    assert len(list(cache.glob("imagefolder-*.npz"))) == 1
    assert not (root / ".armature-cache").exists()


def test_drop_grayscale(roll):
    root, n = roll
    cfg = cfg_for(root, drop_grayscale=True)
    total = len(load_split(cfg, "train")[0]) + len(load_split(cfg, "heldout")[0])
    assert total == n - len(GRAYSCALE)


def test_centered_only(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    yy, xx = np.mgrid[0:64, 0:64]
    for name, (cy, cx) in {"middle": (32, 32), "corner": (12, 12), "edge": (32, 54)}.items():
        img = np.full((64, 64, 3), (40, 90, 160), np.uint8)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 100] = (250, 200, 30)
        Image.fromarray(img).save(root / f"{name}.png")
    for src, dst in REAL:
        shutil.copy(src, root / Path(dst).name)
    kept = {p for p, _, _ in imagefolder.scan(root)
            if imagefolder.is_centered(imagefolder._decode(root / p, 16)[1])}
    assert {"middle.png", "coffee.png", "chelsea.png", "flower.jpeg"} <= kept
    assert not kept & {"corner.png", "edge.png", "china.JPG", "astronaut.png", "camera.png"}
    cfg = DataConfig(source="folder", path=str(root), resolution=16, centered_only=True)
    assert len(load_split(cfg, "train")[0]) + len(load_split(cfg, "heldout")[0]) == len(kept)


def test_heldout_split_by_path_hash():
    paths = [f"img_{i:04d}.jpg" for i in range(2000)]
    mask = imagefolder.heldout_mask(paths, 0.1)
    assert 0.08 < mask.mean() < 0.12
    # adding files does not move existing ones between splits
    more = imagefolder.heldout_mask(paths + [f"new_{i}.jpg" for i in range(50)], 0.1)
    assert (more[:2000] == mask).all()
    # tiny folders keep both splits non-empty
    assert imagefolder.heldout_mask(["a.jpg", "b.jpg"], 0.01).sum() == 1


def test_bad_paths(tmp_path):
    with pytest.raises(BadConfig):
        load_split(DataConfig(source="folder", path=str(tmp_path / "missing")), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadConfig):
        load_split(DataConfig(source="folder", path=str(tmp_path / "empty")), "train")
