import json

import pytest
import torch

from tests.trainer_helpers import (TINY_DATA, assert_bit_exact_resume, assert_outputs, encoder_cache,  # noqa: F401
                                   rows)
from trainers import vae
from trainers.common import EXIT_DIVERGED, BadConfig, Run, main
from trainers.data import load_split, to_float

TINY = {"steps": 30, "batch_size": 16, "log_every": 1, "eval_every": 15, "checkpoint_every": 5, "width": 8,
        "eval_samples": 64}


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    return encoder_cache(tmp_path_factory)


def cfg_of(enc, **over):
    return vae.Config.model_validate({**TINY, "data": {**TINY_DATA, "cache_dir": enc}, **over})


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
    cfg = {**TINY, "beta_mode": "adaptive", "beta_every": 4, "data": {**TINY_DATA, "cache_dir": enc}}
    out = assert_bit_exact_resume("vae", cfg, tmp_path)
    summary = assert_outputs(out, vae, grids=("samples", "recon"))
    assert summary["beta"] != 1.0  # adaptive beta moved (and its state resumed exactly)


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


def test_adaptive_beta_converges_from_both_sides(tmp_path, enc):
    betas = {}
    for start in (0.01, 100.0):
        cfg = cfg_of(enc, steps=80, beta_mode="adaptive", beta=start, beta_every=4, log_every=4,
                     eval_every=1000, checkpoint_every=1000)
        train(cfg, tmp_path / str(start))
        betas[start] = [r["beta"] for r in rows(tmp_path / str(start)) if "loss" in r]
    low, high = betas[0.01], betas[100.0]
    assert low[-1] > 10 * low[0] and high[-1] < high[0] / 10
    assert max(low[-1], high[-1]) / min(low[-1], high[-1]) < 4  # the same balance point from both sides


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
    cfg.write_text(json.dumps({**TINY, "lr": 1e6, "eval_every": 100, "data": {**TINY_DATA, "cache_dir": enc}}))
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
