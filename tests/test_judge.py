import importlib
import json

import pytest
import torch

from tests.trainer_helpers import TINY_DATA, assert_bit_exact_resume, judge_dir
from trainers import judge as J
from trainers import metrics
from trainers.common import BadConfig, DataConfig, Run, TrainerConfig
from trainers.data import load_split

SMALL = {"steps": 40, "log_every": 1, "eval_every": 20, "checkpoint_every": 10, "data": TINY_DATA}
IMAGE_TRAINERS = ["dcgan", "progan", "diffusion", "latent_diffusion", "vae", "maskgit"]


def train_judge(out, **over):
    cfg = J.Config.model_validate({**SMALL, **over})
    run = Run(cfg, out)
    J.train(cfg, run)
    run.close()
    return out


def test_deterministic_and_loads_with_weights_only(tmp_path):
    a, b = train_judge(tmp_path / "a"), train_judge(tmp_path / "b")
    other = train_judge(tmp_path / "c", seed=1)
    sa, sb, sc = (torch.load(d / "artifact.pt", weights_only=True)["state_dict"] for d in (a, b, other))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["embed.weight"], sc["embed.weight"])
    judge = J.Judge(a)
    assert judge.families == list(range(8)) and judge.data == DataConfig(**TINY_DATA)
    images = load_split(judge.data, "heldout")[0]
    assert judge.encoder.features(images).shape == (len(images), 16 * 3 + 64)


def test_judge_trains_on_the_cpu_only():
    with pytest.raises(ValueError, match="CPU only"):
        J.Config(device="cuda")


def test_bit_exact_resume(tmp_path):
    assert_bit_exact_resume("judge", {**SMALL, "steps": 100}, tmp_path)


@pytest.mark.parametrize("name", IMAGE_TRAINERS)
def test_every_image_trainer_is_judged(name):
    module = importlib.import_module(f"trainers.{name}")
    assert issubclass(module.Config, J.JudgedConfig)
    assert module.UPSTREAM["judge"] == {"trainer": "judge", "dir_field": "judge_dir", "scope": "study"}
    assert module.Config().eval_samples >= 512
    assert set(metrics.DIRECTIONS) <= set(module.METRICS)
    assert J.SEED_RANDOMISES and J.UPSTREAM == {}


class Tiny(J.JudgedConfig):
    steps: int = 0
    batch_size: int = 1
    lr: float = 0.0
    eval_every: int = 1
    checkpoint_every: int = 1


def test_build_evaluator_trains_a_judge_on_the_runs_data_when_alone(tmp_path):
    data = {**TINY_DATA, "families": ["disc", "ring"]}
    cfg = Tiny.model_validate({"data": data, "judge": {"steps": 10}})
    run = Run(cfg, tmp_path)
    ev = metrics.build_evaluator(cfg, run, *(load_split(cfg.data, s)[0] for s in ("train", "heldout")))
    run.close()
    summary = json.loads((tmp_path / "upstream" / "judge" / "summary.json").read_text())
    assert summary["steps"] == 10
    assert ev.judge.data == cfg.data and ev.judge.families == [0, 3]
    assert torch.equal(ev.real, load_split(cfg.data, "heldout")[0])


def test_build_evaluator_uses_judge_dir_and_its_heldout(tmp_path_factory, tmp_path):
    folder = judge_dir(tmp_path_factory)
    cfg = Tiny.model_validate({"judge_dir": folder, "judge": {"data": TINY_DATA},
                               "data": {**TINY_DATA, "num_heldout": 32}})
    run = Run(cfg, tmp_path)
    train_u8, held_u8 = (load_split(cfg.data, s)[0] for s in ("train", "heldout"))
    ev = metrics.build_evaluator(cfg, run, train_u8, held_u8)
    assert not (tmp_path / "upstream").exists()
    assert len(ev.real) == TINY_DATA["num_heldout"]  # the judge's held-out split, not the run's
    bad = Tiny.model_validate({"judge_dir": folder, "data": {**TINY_DATA, "resolution": 32}})
    with pytest.raises(BadConfig, match="judge.data.resolution"):
        metrics.build_evaluator(bad, run, *(load_split(bad.data, s)[0] for s in ("train", "heldout")))
    with pytest.raises(BadConfig, match="judge_dir"):
        metrics.build_evaluator(Tiny(judge_dir=str(tmp_path / "nothing")), run, train_u8, held_u8)
    run.close()


def test_judged_config_checks_eval_samples():
    assert issubclass(J.JudgedConfig, TrainerConfig)
    with pytest.raises(ValueError, match="eval_samples"):
        Tiny(eval_samples=1)
