"""Helpers for tests that drive the real `armature` command line and read the real ledger."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from orchestrator.ledger import Ledger
from orchestrator.paths import REPO_ROOT

# A VQ-VAE small enough that an arm run takes a few seconds on one CPU core.
TINY_VQVAE_BASE = ("{steps: 20, eval_every: 10, checkpoint_every: 10, log_every: 5, batch_size: 16, "
                   "data.num_train: 128, data.num_heldout: 32}")
# A MaskGIT over that tokenizer, as the `base:` lines of a spec (two-space indent).
TINY_MASKGIT_BASE = (f"  steps: 10\n  eval_every: 10\n  log_every: 5\n  batch_size: 16\n  eval_samples: 8\n"
                     f"  num_inpaint: 8\n  model.dim: 32\n  data: {{num_train: 128, num_heldout: 32}}\n"
                     f"  tokenizer: {TINY_VQVAE_BASE}\n")


def tiny_spec(tmp_path: Path, body: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


def armature_env(home: Path, **extra: str) -> dict:
    env = {**os.environ, "ARMATURE_HOME": str(home), "PYTHONPATH": str(REPO_ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    for name in ("COLUMNS", "LINES"):     # pytest-xdist workers export 80x24; a user's shell does not
        env.pop(name, None)
    env.update(extra)
    return env


def armature(home: Path, *args: str, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=REPO_ROOT, env=armature_env(home, **env),
                          capture_output=True, text=True, timeout=timeout)


def start_armature(home: Path, *args: str, log: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator", *args], cwd=REPO_ROOT,
                            env=armature_env(home, **env), stdout=open(log, "w"), stderr=subprocess.STDOUT)


def ledger(home: Path) -> Ledger:
    return Ledger(home / "ledger.sqlite", create=False)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.3):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def metric_steps(out_dir: Path) -> list[int]:
    import json
    return [json.loads(line)["step"] for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def run_ledger(path: Path, run_id: str, trainer: str = "maskgit", backend: str = "vast") -> Ledger:
    """A ledger at `path` holding one bare run (no spec, metric, budget or commit), for tests of one backend."""
    opened = Ledger(path)
    opened.create_run(run_id, name=run_id, trainer=trainer, backend=backend, spec_path=None, metric=None,
                      metric_mode=None, baseline=None, budget_dollars=None, git_commit=None, git_diff_hash=None)
    return opened


@contextlib.contextmanager
def vast_simulator(root: Path, api_key: str, offers: list[dict], export_key: bool = False, **options):
    """A started Vast simulator with these offers (the test is skipped where OpenSSH sshd is missing: its
    instances run one); with `export_key`, VAST_API_KEY is `api_key` while it runs, as the backend reads it."""
    import pytest

    from infra.vastsim import Simulator
    from infra.vastsim.instances import find_sshd

    if find_sshd() is None:
        pytest.skip("OpenSSH sshd is not installed (the simulator's instances run one)")
    previous = os.environ.get("VAST_API_KEY")
    if export_key:
        os.environ["VAST_API_KEY"] = api_key
    try:
        with Simulator(root, api_key=api_key, offers=offers, **options) as simulator:
            yield simulator
    finally:
        if export_key and previous is None:
            os.environ.pop("VAST_API_KEY", None)
        elif export_key:
            os.environ["VAST_API_KEY"] = previous
