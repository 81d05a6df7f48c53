import json

import pytest
import torch

from tests.trainer_helpers import (TINY_DATA, assert_bit_exact_resume, assert_outputs, judge_dir,  # noqa: F401
                                   rows)
from trainers import latent_diffusion, vae
from trainers.common import EXIT_BAD_CONFIG, Run, load_artifact, main

TINY_VAE = {"steps": 60, "batch_size": 32, "width": 8, "log_every": 20, "eval_every": 60, "checkpoint_every": 60,
            "eval_samples": 32, "data": TINY_DATA}
TINY = {"steps": 20, "batch_size": 8, "log_every": 1, "eval_every": 10, "checkpoint_every": 5, "warmup_steps": 5,
        "unet": {"channels": 8}, "guidance_scale": 2.0, "sample_steps": 4, "eval_samples": 64,
        "autoencoder": TINY_VAE}


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    return judge_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory, enc):
    out = tmp_path_factory.mktemp("vae")
    cfg = latent_diffusion.Config.model_validate(cfg_dict(enc)).autoencoder  # exactly what the arms expect
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    run = Run(cfg, out)
    vae.train(cfg, run)
    run.close()
    torch.set_num_threads(prev)
    return str(out)


def cfg_dict(enc, **over):
    return {**TINY, "data": TINY_DATA, "judge_dir": enc, **over}


def test_config_defaults_and_upstream_link():
    cfg = latent_diffusion.Config.model_validate({"data": {"resolution": 32}, "autoencoder": {"steps": 5},
                                                  "unet": {"channels": 16}})
    assert cfg.autoencoder.data.resolution == 32          # follows data
    assert cfg.autoencoder.downsample == 2 and cfg.autoencoder.steps == 5
    assert cfg.unet.channel_mult == [1, 2] and cfg.unet.channels == 16
    assert latent_diffusion.Config.model_validate(cfg.model_dump()) == cfg
    with pytest.raises(ValueError):
        latent_diffusion.Config.model_validate({"data": {"resolution": 32}, "autoencoder": {"data": {"resolution": 16}}})
    from orchestrator.trainer_registry import load_trainer
    info = load_trainer("latent_diffusion")
    assert info.upstream["autoencoder"].trainer == "vae" and info.upstream["autoencoder"].dir_field == "autoencoder_dir"
    assert "fid_scratchenc" in info.metrics


def test_subprocess_outputs_and_bit_exact_resume(tmp_path, enc, vae_dir):
    out = assert_bit_exact_resume("latent_diffusion", cfg_dict(enc, autoencoder_dir=vae_dir), tmp_path)
    assert_outputs(out, latent_diffusion)
    art = load_artifact(out)
    assert art["kind"] == "latent_diffusion" and art["shape"] == (4, 8, 8) and art["latent_scale"] > 0


def test_standalone_trains_its_autoencoder(tmp_path, enc):
    cfg = latent_diffusion.Config.model_validate(cfg_dict(enc, steps=4, eval_every=100, autoencoder={
        **TINY_VAE, "steps": 5}))
    run = Run(cfg, tmp_path)
    latent_diffusion.train(cfg, run)
    run.close()
    up = tmp_path / "upstream" / "autoencoder"
    assert (up / "artifact.pt").exists() and json.loads((up / "summary.json").read_text())["steps"] == 5
    assert (tmp_path / "summary.json").exists()


def test_learns(tmp_path, enc, vae_dir):
    cfg = latent_diffusion.Config.model_validate(cfg_dict(
        enc, autoencoder_dir=vae_dir, steps=120, batch_size=32, log_every=10, eval_every=120, checkpoint_every=120,
        guidance_scale=1.0, unet={"channels": 16}))
    run = Run(cfg, tmp_path)
    latent_diffusion.train(cfg, run)
    run.close()
    rs = rows(tmp_path)
    losses = [r["loss"] for r in rs if "loss" in r]
    assert losses[-1] < 0.6 * losses[0]
    assert rs[-1]["kid_scratchenc"] < rs[0]["kid_scratchenc"]


def test_missing_autoencoder_is_a_config_error(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({**TINY, "autoencoder_dir": str(tmp_path / "nothing")}))
    assert main(latent_diffusion.train, latent_diffusion.Config,
                ["--config", str(cfg), "--out", str(tmp_path / "o")]) == EXIT_BAD_CONFIG
