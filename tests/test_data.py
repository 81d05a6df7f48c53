import time

import pytest
import torch
from pydantic import ValidationError

from trainers.common import DataConfig
from trainers.data import FAMILIES, _procedural, load_split, to_float, to_uint8




def test_shapes_dtypes_and_families():
    cfg = DataConfig()
    x, y = load_split(cfg, "train")
    assert x.shape == (2048, 3, 16, 16) and x.dtype == torch.uint8
    assert y.shape == (2048,) and y.dtype == torch.int64
    assert set(y.tolist()) == set(range(len(FAMILIES)))
    xh, yh = load_split(cfg, "heldout")
    assert xh.shape == (256, 3, 16, 16) and yh.shape == (256,)
    assert len(FAMILIES) >= 6


def test_deterministic_and_cached_copies():
    cfg = DataConfig(num_train=300, num_heldout=50, seed=7)
    a, la = load_split(cfg, "train")
    _procedural.cache_clear()
    b, lb = load_split(cfg, "train")
    assert torch.equal(a, b) and torch.equal(la, lb)
    a[:] = 0  # callers get their own copy
    assert not torch.equal(load_split(cfg, "train")[0], a)
    c, _ = load_split(DataConfig(num_train=300, num_heldout=50, seed=8), "train")
    assert not torch.equal(b, c)


def test_train_heldout_disjoint():
    cfg = DataConfig(num_train=512, num_heldout=128)
    tr = load_split(cfg, "train")[0].flatten(1)
    he = load_split(cfg, "heldout")[0].flatten(1)
    same = (tr[:, None, :] == he[None, :, :]).all(-1)
    assert not same.any()
    # and the images are not degenerate copies of each other within a split
    assert torch.unique(tr, dim=0).shape[0] == tr.shape[0]


def test_figure_ground_contrast():
    # centre pixels (object) differ from corner pixels (background) on most images
    x = load_split(DataConfig(num_train=256, resolution=32), "train")[0].float()
    centre = x[:, :, 14:18, 14:18].mean((2, 3))
    corner = x[:, :, :3, :3].mean((2, 3))
    assert ((centre - corner).abs().sum(1) > 40).float().mean() > 0.8
    assert x.std() > 30


@pytest.mark.parametrize("res", [16, 24, 32, 64])
def test_resolutions(res):
    x, _ = load_split(DataConfig(resolution=res, num_train=64, num_heldout=8), "train")
    assert x.shape == (64, 3, res, res)


def test_family_subset_keeps_global_labels():
    x, y = load_split(DataConfig(families=["ring", "star"], num_train=200), "train")
    assert set(y.tolist()) == {FAMILIES.index("ring"), FAMILIES.index("star")}


def test_config_validation():
    with pytest.raises(ValidationError, match="resolution"):
        DataConfig(resolution=8)
    with pytest.raises(ValidationError, match="families"):
        DataConfig(families=["disc", "nope"])
    with pytest.raises(ValidationError):
        DataConfig(sorce="procedural")
    with pytest.raises(ValidationError, match="path"):
        DataConfig(source="folder")


def test_float_roundtrip():
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    f = to_float(x)
    assert f.dtype == torch.float32 and f.min() >= -1 and f.max() <= 1
    assert torch.equal(to_uint8(f), x)
    assert to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]


def test_generation_speed():
    _procedural.cache_clear()
    t = time.process_time()
    load_split(DataConfig(seed=99), "train")
    assert time.process_time() - t < 2.0  # well under a second on an idle core
