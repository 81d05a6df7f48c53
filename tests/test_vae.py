import json
import math

import pytest
import torch

from tests.trainer_helpers import (TINY_DATA, assert_bit_exact_resume, assert_outputs, judge_dir,  # noqa: F401
                                   rows)
from trainers import vae
from trainers.common import EXIT_DIVERGED, BadConfig, Run, main
from trainers.data import load_split, to_float

TINY = {"steps": 30, "batch_size": 16, "log_every": 1, "eval_every": 15, "checkpoint_every": 5, "width": 8,
        "eval_samples": 64}


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    return judge_dir(tmp_path_factory)


def cfg_of(enc, **over):
    return vae.Config.model_validate({**TINY, "data": TINY_DATA, "judge_dir": enc, **over})


def train(cfg, out):
    run = Run(cfg, out)
    final = vae.train(cfg, run)
    run.close()
    return final


def test_kl_known_values():
    mu, logvar = torch.zeros(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    assert torch.allclose(vae.kl_per_image(mu, logvar), torch.zeros(2))
    assert torch.allclose(vae.kl_per_image(mu + 1, logvar), torch.full((2,), 0.5 * 16))
    # KL(N(0, e) || N(0, 1)) = 0.5 (e - 1 - 1) per dimension
    assert torch.allclose(vae.kl_per_image(mu, logvar + 1), torch.full((2,), 0.5 * (torch.e - 2) * 16))


def test_subprocess_outputs_and_bit_exact_resume(tmp_path, enc):
    cfg = {**TINY, "beta_mode": "geco", "geco_rate": 0.05, "data": TINY_DATA, "judge_dir": enc}
    out = assert_bit_exact_resume("vae", cfg, tmp_path)
    summary = assert_outputs(out, vae, grids=("samples", "recon"))
    assert summary["beta"] != 1.0  # GECO moved beta (and its state resumed exactly)


def test_learns_and_autoencoder_api(tmp_path, enc):
    cfg = cfg_of(enc, steps=150, batch_size=32, width=16, log_every=10, eval_every=150, checkpoint_every=150)
    train(cfg, tmp_path)
    rs = rows(tmp_path)
    init, final = rs[0], rs[-1]
    assert final["recon_mse"] < 0.5 * init["recon_mse"]
    assert final["nelbo"] < 0.5 * init["nelbo"]
    losses = [r["loss"] for r in rs if "loss" in r]
    assert losses[-1] < 0.5 * losses[0]

    model = vae.load_autoencoder(tmp_path)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x = to_float(load_split(cfg.data, "heldout")[0][:5])
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (5, 4, 4, 4)
    assert model.decode(mu).shape == x.shape


def test_geco_update_follows_the_constraint():
    cfg = vae.Config(beta_mode="geco", geco_tolerance=0.02, geco_alpha=0.5, geco_rate=0.1)
    beta, c_ma = vae.geco_update(1.0, None, 0.06, cfg)      # C = 0.04: the moving average starts at C
    assert c_ma == pytest.approx(0.04) and beta == pytest.approx(math.exp(-0.1 * 0.04 / 0.02))
    beta2, c_ma = vae.geco_update(beta, c_ma, 0.0, cfg)     # C = -0.02: C_ma = 0.5 * 0.04 + 0.5 * -0.02
    assert c_ma == pytest.approx(0.01) and beta2 == pytest.approx(beta * math.exp(-0.1 * 0.01 / 0.02))
    assert vae.geco_update(1e-4, 1.0, 1.0, cfg)[0] == vae.BETA_RANGE[0]  # clipped


def test_geco_moves_beta_toward_the_reconstruction_constraint(tmp_path, enc):
    """A constraint the model misses (MSE above the tolerance) lowers beta, one it beats raises it."""
    runs = {}
    for start, tolerance in ((100.0, 0.01), (0.01, 0.5)):
        cfg = cfg_of(enc, steps=60, beta_mode="geco", beta=start, geco_tolerance=tolerance, geco_rate=0.05,
                     log_every=5, eval_every=1000, checkpoint_every=1000)
        train(cfg, tmp_path / str(start))
        runs[start] = [r for r in rows(tmp_path / str(start)) if "loss" in r]
    strict, loose = runs[100.0], runs[0.01]
    assert all(r["geco_constraint"] > 0 for r in strict) and strict[-1]["beta"] < 100.0 / 10
    assert all(r["geco_constraint"] < 0 for r in loose) and loose[-1]["beta"] > 0.01 * 2


def test_nelbo_is_the_negative_elbo_and_bounds_the_held_out_likelihood(tmp_path, enc):
    """nelbo is -ELBO with beta = 1 (Gaussian likelihood with its normaliser, computed here with
    torch.distributions), even for a model trained with beta 4, and lies above an importance-weighted
    estimate of -log p(x) / D (Burda et al. 2016)."""
    cfg = cfg_of(enc, steps=40, beta=4.0, eval_every=1000, checkpoint_every=1000)
    train(cfg, tmp_path)
    nelbo = json.loads((tmp_path / "summary.json").read_text())["nelbo"]
    model = vae.load_autoencoder(tmp_path)
    x = to_float(load_split(cfg.data, "heldout")[0])
    k = 64
    torch.manual_seed(0)
    with torch.no_grad():
        mu, logvar = model.encode(x)
        q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
        z = q.sample((k,))                                                  # [k, N, C, h, w]
        x_hat = model.decode(z.flatten(0, 1)).view(k, *x.shape)
        log_px = torch.distributions.Normal(x_hat, cfg.recon_sigma).log_prob(x).flatten(2).sum(2)
        log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).flatten(2).sum(2)
        log_w = log_px + log_pz - q.log_prob(z).flatten(2).sum(2)
        iwae_nll = -(torch.logsumexp(log_w, 0) - math.log(k)).mean().item() / x[0].numel()
        elbo_nll = -log_w.mean().item() / x[0].numel()
    assert nelbo == pytest.approx(elbo_nll, rel=0.02)
    assert iwae_nll < nelbo


def test_fixed_beta_stays(tmp_path, enc):
    train(cfg_of(enc, steps=10, beta=4.0, eval_every=100), tmp_path)
    assert {r["beta"] for r in rows(tmp_path) if "loss" in r} == {4.0}


def test_wrong_artifact_kind(tmp_path):
    torch.save({"kind": "vqvae"}, tmp_path / "artifact.pt")
    with pytest.raises(BadConfig):
        vae.load_autoencoder(tmp_path)


def test_config_checks():
    with pytest.raises(ValueError):
        vae.Config(downsample=3)
    with pytest.raises(ValueError):
        vae.Config.model_validate({"downsample": 32, "data": {"resolution": 16}})


def test_absurd_lr_diverges(tmp_path, enc):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({**TINY, "lr": 1e6, "eval_every": 100, "data": TINY_DATA, "judge_dir": enc}))
    assert main(vae.train, vae.Config, ["--config", str(cfg), "--out", str(tmp_path / "o")]) == EXIT_DIVERGED
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["diverged"] is True


def test_trains_on_a_folder_of_photographs(tmp_path):
    import shutil
    from pathlib import Path

    import skimage
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("astronaut.png", "coffee.png", "chelsea.png", "camera.png", "rocket.jpg", "motorcycle_left.png"):
        shutil.copy(Path(skimage.__file__).parent / "data" / name, photos / name)
    cfg = vae.Config.model_validate({**TINY, "steps": 4, "eval_every": 100, "eval_samples": 8, "data": {
        "source": "folder", "path": str(photos), "resolution": 16, "heldout_fraction": 0.3}})
    train(cfg, tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["modes_covered"] == 1.0  # photographs: a single "family"
