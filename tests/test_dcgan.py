import json

import pytest

from tests.trainer_helpers import TINY_DATA, assert_bit_exact_resume, assert_outputs, judge_dir, rows  # noqa: F401
from trainers import dcgan
from trainers.common import EXIT_BAD_CONFIG, Run, main

TINY = {"steps": 30, "batch_size": 16, "log_every": 1, "eval_every": 15, "checkpoint_every": 10,
        "g_width": 16, "d_width": 16, "latent_dim": 32, "eval_samples": 64}


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    return judge_dir(tmp_path_factory)


def test_subprocess_outputs_and_bit_exact_resume(tmp_path, enc):
    out = assert_bit_exact_resume("dcgan", {**TINY, "data": TINY_DATA, "judge_dir": enc}, tmp_path)
    summary = assert_outputs(out, dcgan)
    assert summary["steps"] == TINY["steps"]
    assert (out / "checkpoints" / "last.pt").exists()


def test_learns(tmp_path, enc):
    cfg = dcgan.Config.model_validate({**TINY, "steps": 200, "batch_size": 32, "g_width": 32, "d_width": 32,
                                       "log_every": 10, "eval_every": 200, "checkpoint_every": 200,
                                       "eval_samples": 128, "data": TINY_DATA, "judge_dir": enc})
    run = Run(cfg, tmp_path)
    dcgan.train(cfg, run)
    run.close()
    rs = rows(tmp_path)
    init, final = rs[0], [r for r in rs if "swd" in r][-1]
    assert init["step"] == 0 and final["step"] == 200
    # the untrained generator makes flat grey blobs; after 200 steps samples are image-like
    assert final["kid_scratchenc"] < 0.2 * init["kid_scratchenc"]
    assert final["coverage_scratchenc"] > init["coverage_scratchenc"] + 0.1
    assert final["diversity_gap"] < 0.5 * init["diversity_gap"]
    d_losses = [r["loss_d"] for r in rs if "loss_d" in r]
    assert min(d_losses) < 0.9 * d_losses[0]  # the discriminator learned to separate at some point


def test_summary_averages_the_last_evaluations(tmp_path, enc):
    cfg = dcgan.Config.model_validate({**TINY, "steps": 8, "eval_every": 3, "eval_average": 2, "eval_average_every": 2,
                                       "eval_samples": 32, "data": TINY_DATA, "judge_dir": enc})
    run = Run(cfg, tmp_path)
    dcgan.train(cfg, run)
    run.close()
    summary = json.loads((tmp_path / "summary.json").read_text())
    evals = {r["step"]: r for r in rows(tmp_path) if "swd" in r}
    assert sorted(evals) == [0, 3, 6, 8] and summary["eval_steps_averaged"] == [6, 8]
    for k in ("swd", "kid_scratchenc", "coverage_scratchenc"):
        assert summary[k] == pytest.approx((evals[6][k] + evals[8][k]) / 2)
    assert summary["swd"] != evals[8]["swd"]  # not just the last draw
    assert dcgan.averaged_eval_steps(dcgan.Config(steps=600)) == [540, 570, 600]


def test_resolution_must_be_power_of_two(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({**TINY, "data": {**TINY_DATA, "resolution": 24}}))
    assert main(dcgan.train, dcgan.Config, ["--config", str(cfg), "--out", str(tmp_path / "o")]) == EXIT_BAD_CONFIG
