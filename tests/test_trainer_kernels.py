"""Numerics settings the trainers share: deterministic kernels on request, random streams that refuse to be
restored onto the wrong device, and gradient penalties computed in fp32 under bf16 autocast."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from orchestrator.paths import REPO_ROOT
from trainers import progan
from trainers.common import Run, TrainerConfig, load_weights_only


class Tiny(TrainerConfig):
    steps: int = 1
    batch_size: int = 1
    lr: float = 1e-3
    eval_every: int = 1
    checkpoint_every: int = 1


def test_deterministic_turns_on_deterministic_algorithms_and_the_cublas_workspace():
    probe = ("import os, torch; from trainers.common import Run; from tests.test_trainer_kernels import Tiny; "
             "import tempfile; Run(Tiny(deterministic={flag}, device='cpu'), tempfile.mkdtemp()); "
             "print(torch.are_deterministic_algorithms_enabled(), os.environ.get('CUBLAS_WORKSPACE_CONFIG'))")
    for flag, expected in ((True, "True :4096:8"), (False, "False None")):
        out = subprocess.run([sys.executable, "-c", probe.format(flag=flag)], cwd=REPO_ROOT, capture_output=True,
                             text=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)}, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split("\n")[-2] == expected


def test_a_checkpoint_with_a_cuda_random_stream_is_not_silently_resumed_on_the_cpu(tmp_path):
    run = Run(Tiny(device="cpu"), tmp_path)
    run.save_checkpoint(1, {"w": torch.zeros(1)})
    state = load_weights_only(run.ckpt_path)
    assert "cuda" not in state["_rng"]          # a CPU run saves no GPU stream, even where a GPU is visible
    state["_rng"]["cuda"] = torch.zeros(16, dtype=torch.uint8)
    torch.save(state, run.ckpt_path)
    with pytest.raises(RuntimeError, match="written by a run on CUDA and this run is on the CPU"):
        Run(Tiny(device="cpu"), tmp_path).resume()


class Bf16OnCpu:
    """A run whose autocast is bf16 (on the CPU here), as a CUDA run's is by default."""

    def autocast(self):
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)


class Fp32:
    def autocast(self):
        return torch.autocast(device_type="cpu", enabled=False)


@pytest.mark.parametrize("loss,gamma", [("wgan_gp", 0.0), ("nonsaturating", 2.0)])
def test_gradient_penalties_are_computed_in_fp32_under_bf16_autocast(loss, gamma):
    torch.manual_seed(0)
    levels = progan.num_levels(16)
    D = progan.Discriminator(16, levels, 4)
    real, fake = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    cfg = progan.Config(loss=loss, r1_gamma=gamma)
    penalties = []
    for run in (Fp32(), Bf16OnCpu()):
        gen = torch.Generator().manual_seed(1)
        _, extra = progan.d_loss(cfg, D, D, real, fake, levels - 1, torch.tensor(1.0), gen, run)
        penalties.append(extra["penalty"].item())
    assert penalties[0] == penalties[1]      # under bf16 the penalty's own pass would differ in the 3rd digit
