import math

import numpy as np
import pytest
import torch

from trainers import metrics as M
from trainers.common import DataConfig
from trainers.data import load_split

FAMILIES = 8


@pytest.fixture(scope="module")
def data():
    cfg = DataConfig(resolution=16, num_train=1024, num_heldout=256)
    tr, tl = load_split(cfg, "train")
    ho, hl = load_split(cfg, "heldout")
    return tr, tl, ho, hl


@pytest.fixture(scope="module")
def evaluator(data, tmp_path_factory):
    tr, tl, ho, hl = data
    return M.Evaluator(tr, tl, ho, hl, cache_dir=str(tmp_path_factory.mktemp("enc")))


def test_frechet_known_answer():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    b = torch.randn(6, 6, generator=g, dtype=torch.float64)
    s_a, s_b = a @ a.T + 0.1 * torch.eye(6), b @ b.T + 0.1 * torch.eye(6)  # do not commute
    mu_a, mu_b = torch.zeros(6), torch.arange(6.0)
    # tr((S_a S_b)^1/2) = sum of square roots of the (real, positive) eigenvalues of S_a S_b
    ev = np.linalg.eigvals((s_a @ s_b).numpy()).real
    expected = float((mu_b ** 2).sum() + s_a.trace() + s_b.trace() - 2 * np.sqrt(ev).sum())
    assert M.frechet_from_moments(mu_a, s_a, mu_b, s_b) == pytest.approx(expected, rel=1e-9)
    assert M.frechet_from_moments(mu_b, s_b, mu_b, s_b) == pytest.approx(0.0, abs=1e-9)


def test_prdc_hand_computed():
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]])
    fake = torch.tensor([[0.5], [10.0]])
    r = M.prdc(real, fake, k=1)
    # real 1-NN radii are all 1: only fake 0.5 lands in balls (of reals 0 and 1)
    assert r["precision"] == pytest.approx(0.5)
    assert r["density"] == pytest.approx(1.0)      # 2 balls / (k=1 * 2 fakes)
    assert r["coverage"] == pytest.approx(0.4)     # reals 0 and 1 have a fake within their radius
    assert r["recall"] == pytest.approx(1.0)       # fake radii are 9.5: every real is inside one


def test_identical_sets(data):
    _, _, ho, _ = data
    assert M.swd(ho, ho) == pytest.approx(0.0, abs=1e-6)
    f = torch.randn(200, 16, generator=torch.Generator().manual_seed(1))
    assert M.frechet_distance(f, f) == pytest.approx(0.0, abs=1e-6)
    r = M.prdc(f, f)
    assert r["precision"] == 1.0 and r["recall"] == 1.0 and r["coverage"] == 1.0


def test_evaluator_on_real_heldout_is_perfect(evaluator, data):
    _, _, ho, _ = data
    r = evaluator(ho)
    assert r["swd"] == pytest.approx(0.0, abs=1e-6)
    assert r["fid_scratchenc"] == pytest.approx(0.0, abs=1e-4)
    assert r["precision_scratchenc"] == 1.0 and r["recall_scratchenc"] == 1.0
    assert r["coverage_scratchenc"] == 1.0
    assert r["diversity"] == pytest.approx(1.0)
    assert r["memorization_nn_ratio"] == pytest.approx(1.0)
    assert r["modes_covered"] == 1.0 and r["mode_kl"] < 0.1
    assert set(M.DIRECTIONS) <= set(r)
    assert r["scratchenc_acc"] > 0.6  # the encoder learned the families


def test_disjoint_and_shifted_sets_score_badly(evaluator, data):
    tr, _, ho, _ = data
    base = evaluator(tr[:256])  # real but different images: the noise floor of each metric
    noise = evaluator(torch.randint(0, 256, ho.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(2)))
    shifted = evaluator((ho.int() + 80).clamp(0, 255).to(torch.uint8))
    for bad in (noise, shifted):
        assert bad["swd"] > 3 * base["swd"]
        assert bad["fid_scratchenc"] > 10 * base["fid_scratchenc"]
        assert bad["recall_scratchenc"] < 0.3 and bad["coverage_scratchenc"] < 0.3
        assert bad["density_scratchenc"] < 0.3
    assert noise["precision_scratchenc"] < 0.6  # precision alone is fooled by outlier reals (Naeem et al.)
    assert base["precision_scratchenc"] > 0.9 and base["recall_scratchenc"] > 0.9


def test_collapsed_generator(evaluator, data):
    _, _, ho, _ = data
    r = evaluator(ho[:1].repeat(256, 1, 1, 1))
    assert r["diversity"] == pytest.approx(0.0, abs=1e-3)
    assert r["recall_scratchenc"] < 0.02
    assert r["coverage_scratchenc"] < 0.1
    assert r["modes_covered"] == pytest.approx(1 / FAMILIES)
    assert r["mode_kl"] == pytest.approx(math.log(FAMILIES))


def test_memorization_ratio(evaluator, data):
    tr, _, _, _ = data
    assert evaluator(tr[:256])["memorization_nn_ratio"] == 0.0  # copies of training images


def test_mode_histogram():
    pred = torch.tensor([0, 0, 3, 3])
    r = M.mode_histogram_metrics(pred, [0, 1, 3, 5])
    assert r["modes_covered"] == 0.5
    assert r["mode_kl"] == pytest.approx(math.log(2))  # two of four families, evenly


def test_deterministic_and_leaves_global_rng_alone(evaluator, data):
    tr, _, _, _ = data
    state = torch.get_rng_state()
    a, b = evaluator(tr[:128]), evaluator(tr[:128])
    assert a == b
    assert torch.equal(state, torch.get_rng_state())


def test_encoder_cached_on_disk(data, tmp_path, monkeypatch):
    tr, tl, _, _ = data
    tr, tl = tr[:256], tl[:256]
    monkeypatch.setattr(M, "ENCODER_STEPS", 20)
    enc = M.get_scratch_encoder(tr, tl, cache_dir=str(tmp_path))
    assert len(list(tmp_path.glob("scratchenc-*.pt"))) == 1
    monkeypatch.setattr(M, "_ENCODERS", {})  # a fresh process

    def no_training(*a, **k):
        raise AssertionError("encoder retrained despite the cache")
    monkeypatch.setattr(M, "train_scratch_encoder", no_training)
    again = M.get_scratch_encoder(tr, tl, cache_dir=str(tmp_path))
    assert torch.equal(enc.features(tr[:32]), again.features(tr[:32]))


def test_pyramid_reconstructs():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    levels = M.laplacian_pyramid(x, 3)
    assert [lv.shape[-1] for lv in levels] == [32, 16, 8]
    k = M._binomial_kernel(x.device)
    y = levels[-1]
    for band in reversed(levels[:-1]):
        up = torch.zeros_like(band)
        up[:, :, ::2, ::2] = y * 4
        y = band + M._blur(up, k)
    assert torch.allclose(y, x, atol=1e-5)
