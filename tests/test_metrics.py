"""Known-answer tests of the sample metrics on the procedural data at 16 px: every distribution metric
must rank uniform noise and a +30 brightness shift below a fresh real sample, and memorized_fraction
must find copies of training images."""
import math

import numpy as np
import pytest
import torch

from trainers import judge as J
from trainers import metrics as M
from trainers.common import DataConfig, Run
from trainers.data import load_split

FAMILIES = 8
DATA = DataConfig(resolution=16, num_train=1024, num_heldout=256)


@pytest.fixture(scope="module")
def data():
    tr, _ = load_split(DATA, "train")
    ho, _ = load_split(DATA, "heldout")
    # a fresh real sample: the same distribution, other images (another generation seed)
    fresh = load_split(DataConfig(resolution=16, num_train=1, num_heldout=512, seed=77), "heldout")[0]
    return tr, ho, fresh


@pytest.fixture(scope="module")
def evaluator(data, tmp_path_factory):
    tr, ho, _ = data
    cfg = J.Config(steps=200, data=DATA)
    out = tmp_path_factory.mktemp("judge")
    run = Run(cfg, out)
    J.train(cfg, run)
    run.close()
    return M.Evaluator(J.Judge(out), ho, tr, ho)


@pytest.fixture(scope="module")
def scores(evaluator, data):
    """Evaluator results for a fresh real sample and for the corrupted versions of it."""
    tr, _, fresh = data
    copies = fresh.clone()
    k = int(0.3 * len(fresh))
    copies[:k] = tr[torch.randperm(len(tr), generator=torch.Generator().manual_seed(5))[:k]]
    sets = {
        "fresh": fresh,
        "noise": torch.randint(0, 256, fresh.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(2)),
        "bright": (fresh.int() + 30).clamp(0, 255).to(torch.uint8),
        "copies30": copies,
    }
    return {name: evaluator(images) for name, images in sets.items()}


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


def test_frechet_is_nan_on_a_singular_covariance():
    f = torch.randn(300, 16, generator=torch.Generator().manual_seed(1))
    assert M.frechet_distance(f, f) == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(M.frechet_distance(f[:16], f))   # 16 samples of 16 dims: singular
    assert math.isnan(M.frechet_distance(f, f[:10]))
    assert not math.isnan(M.frechet_distance(f[:17], f))


def test_prdc_hand_computed():
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]])
    fake = torch.tensor([[0.5], [10.0]])
    r = M.prdc(real, fake, k=1)
    # real 1-NN radii are all 1: only fake 0.5 lands in balls (of reals 0 and 1)
    assert r["precision"] == pytest.approx(0.5)
    assert r["density"] == pytest.approx(1.0)      # 2 balls / (k=1 * 2 fakes)
    assert r["coverage"] == pytest.approx(0.4)     # reals 0 and 1 have a fake within their radius
    assert r["recall"] == pytest.approx(1.0)       # fake radii are 9.5: every real is inside one


def test_kid_matches_its_definition():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(7, 3, generator=g).double(), torch.randn(5, 3, generator=g).double() + 0.5

    def k(x, y):
        return (float(x @ y) / 3 + 1) ** 3
    within_a = sum(k(a[i], a[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    within_b = sum(k(b[i], b[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    across = sum(k(a[i], b[j]) for i in range(7) for j in range(5)) / 35
    assert M.kid(a, b) == pytest.approx(within_a + within_b - 2 * across, rel=1e-9)
    assert math.isnan(M.kid(a[:1], b))


def test_kid_is_unbiased():
    """Over many pairs of small samples of one distribution KID averages to 0 (within its standard
    error); the biased (V-statistic) estimate, which keeps the diagonal, is clearly positive."""
    g = torch.Generator().manual_seed(4)
    unbiased, biased = [], []
    for _ in range(300):
        a, b = torch.randn(10, 4, generator=g).double(), torch.randn(12, 4, generator=g).double()
        unbiased.append(M.kid(a, b))
        kxx, kyy, kxy = ((a @ a.T) / 4 + 1) ** 3, ((b @ b.T) / 4 + 1) ** 3, ((a @ b.T) / 4 + 1) ** 3
        biased.append((kxx.mean() + kyy.mean() - 2 * kxy.mean()).item())
    se = np.std(unbiased) / math.sqrt(len(unbiased))
    assert abs(np.mean(unbiased)) < 3 * se
    assert np.mean(biased) > 10 * se


def test_identical_sets(data):
    _, ho, _ = data
    assert M.swd(ho, ho) == pytest.approx(0.0, abs=1e-6)
    f = torch.randn(200, 16, generator=torch.Generator().manual_seed(1))
    r = M.prdc(f, f)
    assert r["precision"] == 1.0 and r["recall"] == 1.0 and r["coverage"] == 1.0


@pytest.mark.parametrize("metric", ["swd", "fid_scratchenc", "kid_scratchenc", "diversity_gap"])
@pytest.mark.parametrize("corruption", ["noise", "bright"])
def test_corruptions_score_worse_than_a_fresh_real_sample(scores, metric, corruption):
    assert M.DIRECTIONS[metric] == "min"
    assert scores[corruption][metric] > scores["fresh"][metric]
    if corruption == "noise":  # not a near tie: noise is far from the data on every metric
        assert scores["noise"][metric] > 4 * abs(scores["fresh"][metric]) + 1e-3


def test_manifold_metrics_rank_noise_below_real(scores):
    fresh, noise = scores["fresh"], scores["noise"]
    for m in ("precision", "recall", "density", "coverage"):
        assert fresh[f"{m}_scratchenc"] > 0.9
    for m in ("recall", "density", "coverage"):
        assert noise[f"{m}_scratchenc"] < 0.3
    assert noise["precision_scratchenc"] < 0.7  # precision alone is fooled by outlier reals (Naeem et al.)


def test_kid_of_two_real_samples_is_near_zero(scores):
    assert abs(scores["fresh"]["kid_scratchenc"]) < 0.05 * scores["bright"]["kid_scratchenc"]
    assert abs(scores["fresh"]["kid_scratchenc"]) < 2.0


def test_memorized_fraction_catches_copies(scores, evaluator, data):
    tr, _, _ = data
    assert scores["fresh"]["memorized_fraction"] < 0.12          # unseen real images: ~0.05
    assert scores["copies30"]["memorized_fraction"] >= 0.29       # the 30% copies, plus ~0.05 of the rest
    assert scores["noise"]["memorized_fraction"] == 0.0
    assert evaluator(tr[:256])["memorized_fraction"] == 1.0


def test_swd_hides_a_global_shift_that_kid_sees(evaluator, data):
    """SWD normalises each set by its own statistics (Karras et al. 2018): a brightness shift that
    clips nothing leaves it at 0. KID, on the judge's features, sees the shift."""
    _, ho, _ = data
    dim = (ho.int() * 200 // 255).to(torch.uint8)
    shifted = dim + 40
    assert M.swd(dim, shifted) < 1e-3 * M.swd(dim, ho[torch.randperm(len(ho), generator=torch.Generator().manual_seed(0))])
    assert M.kid(evaluator.judge.encoder.features(dim), evaluator.judge.encoder.features(shifted)) > 0.01


def test_collapsed_generator(evaluator, data):
    _, ho, _ = data
    r = evaluator(ho[:1].repeat(256, 1, 1, 1))
    assert r["precision_scratchenc"] >= 0.9, "mode collapse flatters precision (FLATTERED_BY says so)"
    assert "recall_scratchenc" in M.FLATTERED_BY["precision_scratchenc"][1]
    assert r["diversity_gap"] == math.inf
    assert r["recall_scratchenc"] < 0.02
    assert r["coverage_scratchenc"] < 0.1
    assert r["modes_covered"] == pytest.approx(1 / FAMILIES)
    assert r["mode_kl"] == pytest.approx(math.log(FAMILIES))
    assert set(M.DIRECTIONS) <= set(r)


def test_mode_histogram():
    pred = torch.tensor([0, 0, 3, 3])
    r = M.mode_histogram_metrics(pred, [0, 1, 3, 5])
    assert r["modes_covered"] == 0.5
    assert r["mode_kl"] == pytest.approx(math.log(2))  # two of four families, evenly


def test_deterministic_and_leaves_global_rng_alone(evaluator, data):
    tr, _, _ = data
    state = torch.get_rng_state()
    a, b = evaluator(tr[:128]), evaluator(tr[:128])
    assert a == b
    assert torch.equal(state, torch.get_rng_state())


def test_swd_compares_at_least_two_levels():
    assert M.swd_levels(16) == [16, 8]
    assert M.swd_levels(64) == [64, 32, 16, 8]
    with pytest.raises(ValueError, match="two pyramid levels"):
        M.swd_levels(8)


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
