"""Helpers for tests (and the bench) that scrape the exporter and query a real Prometheus.

- `build_demo_ledger(path)`: a ledger with a run whose arms are in several states, metrics rows,
  rented instances, remote GPU health (one GPU overheating) and watchdog events.
- `scrape(url)`, `samples(text)`, `value(text, name, **labels)`: read an exposition.
- `promtool(...)`, `PROMETHEUS`, `PROMTOOL`: the real binaries (None when not installed).
- `PrometheusServer`: a real Prometheus in a temporary folder scraping given targets every second.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.ledger import Ledger
from orchestrator.telemetry.gpu import GpuSample, parse_nvidia_smi_csv

REPO_ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
NO_PROMETHEUS_REASON = ("the prometheus/promtool binaries are not installed "
                        "(apt-get install -y --no-install-recommends prometheus)")


# ---- reading an exposition ---------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def scrape(url: str) -> str:
    return http_get(url)


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict
    value: float


def samples(text: str) -> list[Sample]:
    return [Sample(s.name, dict(s.labels), s.value)
            for family in text_string_to_metric_families(text) for s in family.samples]


def matching(text: str, name: str, **labels: str) -> list[Sample]:
    """Samples named `name` whose labels include the given ones."""
    return [s for s in samples(text)
            if s.name == name and all(s.labels.get(k) == str(v) for k, v in labels.items())]


def value(text: str, name: str, **labels: str) -> float | None:
    """The value of the one sample that matches, None when none does; more than one is an error."""
    found = matching(text, name, **labels)
    assert len(found) <= 1, f"{len(found)} samples of {name} match {labels}: {found}"
    return found[0].value if found else None


def promtool(*args: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=60, cwd=cwd)


# ---- a demo ledger ---------------------------------------------------------------------

HOT_HOST = "vast-30001"          # remote instance whose GPU 0 overheats
COOL_HOST = "vast-30002"         # remote instance with two healthy GPUs
NODE_HOST = "ray-node-1"         # a GPU box whose samples came through NVML (energy, ECC, XID readable)
STALE_HOST = "vast-29999"        # a sample too old to export

NVIDIA_SMI_HOT = "0, NVIDIA GeForce RTX 4090, GPU-5a1f0c1e-0000-4000-8000-000000000001, 91, 99, 23010, 24564, " \
                 "447.31, 2205, 0x0000000000000060\n"
NVIDIA_SMI_COOL = ("0, NVIDIA A100-SXM4-80GB, GPU-5a1f0c1e-0000-4000-8000-000000000002, 54, 87, 40211, 81920, "
                   "312.50, 1410, 0x0000000000000000\n"
                   "1, NVIDIA A100-SXM4-80GB, GPU-5a1f0c1e-0000-4000-8000-000000000003, [N/A], [N/A], 0, 81920, "
                   "[N/A], [N/A], [N/A]\n")


@dataclass
class DemoLedger:
    path: Path
    run_id: str
    old_run_id: str
    metric: str
    arm_run_ids: dict = field(default_factory=dict)     # (arm, seed) -> arm_runs.id
    instance_ids: dict = field(default_factory=dict)    # name -> instances.id
    now: float = 0.0


def build_demo_ledger(path: Path, now: float | None = None) -> DemoLedger:
    """A realistic ledger in several states at once; see the module docstring."""
    now = time.time() if now is None else now
    ledger = Ledger(path)
    demo = DemoLedger(Path(path), run_id="abl-demo", old_run_id="abl-old", metric="recon_mse", now=now)
    try:
        _old_run(ledger, demo)
        _current_run(ledger, demo, now)
    finally:
        ledger.close()
    return demo


def _run(ledger: Ledger, run_id: str, *, backend: str, budget: float | None) -> None:
    ledger.create_run(run_id, name=run_id, trainer="vqvae", backend=backend, spec_path="arms/demo.yaml",
                      metric="recon_mse", metric_mode="min", baseline="baseline", budget_dollars=budget,
                      git_commit="0" * 40, git_diff_hash=None)


def _arm_run(ledger: Ledger, demo: DemoLedger, run_id: str, arm: str, seed: int, total_steps: int = 100) -> int:
    arm_run_id = ledger.add_arm_run(run_id, arm=arm, seed=seed, kind="arm", config={"arm": arm, "seed": seed},
                                    config_hash=f"{arm}-{seed}", out_dir=f"runs/{run_id}/{arm}/seed{seed}",
                                    total_steps=total_steps, gpus=1, cpus=1, gpu_memory_gb=None)
    if run_id == demo.run_id:
        demo.arm_run_ids[(arm, seed)] = arm_run_id
    return arm_run_id


def _metrics(ledger: Ledger, arm_run_id: int, attempt_id: int | None, steps: range, start: float,
             seconds_per_step: float, loss: float = 0.5) -> None:
    rows = [{"step": step, "time": start + (step - steps.start) * seconds_per_step, "loss": loss - step * 1e-3,
             "recon_mse": 0.1 - step * 1e-4} for step in steps]
    ledger.record_metrics(arm_run_id, attempt_id, rows)


def _old_run(ledger: Ledger, demo: DemoLedger) -> None:
    _run(ledger, demo.old_run_id, backend="local", budget=None)
    arm_run_id = _arm_run(ledger, demo, demo.old_run_id, "baseline", 0)
    attempt = ledger.start_attempt(arm_run_id, backend="local", host="localhost", hardware="cpu")
    _metrics(ledger, arm_run_id, attempt, range(10, 101, 10), demo.now - 7200, 1.0)
    ledger.end_attempt(attempt, "succeeded", exit_code=0, end_step=100)
    ledger.transition(arm_run_id, "collecting")
    ledger.transition(arm_run_id, "succeeded")
    ledger.set_run_state(demo.old_run_id, "finished")


def _current_run(ledger: Ledger, demo: DemoLedger, now: float) -> None:
    run_id = demo.run_id
    _run(ledger, run_id, backend="vast", budget=10.0)

    # Instances: one serving a running arm, one alive with nothing on it, one destroyed.
    busy = ledger.add_instance(run_id=run_id, provider="vast", label=f"armature:{run_id}:1", offer_id="9001",
                               gpu_name="RTX 4090", num_gpus=1, dph_total=0.45)
    ledger.update_instance(busy, provider_instance_id="30001", state="ready", ready_at=now - 500,
                           created_at=now - 600)
    idle = ledger.add_instance(run_id=run_id, provider="vast", label=f"armature:{run_id}:2", offer_id="9002",
                               gpu_name="A100 SXM4", num_gpus=2, dph_total=1.60)
    ledger.update_instance(idle, provider_instance_id="30002", state="ready", ready_at=now - 200,
                           created_at=now - 300)
    gone = ledger.add_instance(run_id=run_id, provider="vast", label=f"armature:{run_id}:3", offer_id="9003",
                               gpu_name="RTX 3090", num_gpus=1, dph_total=0.25)
    ledger.update_instance(gone, provider_instance_id="30003", state="destroyed", created_at=now - 3000,
                           ready_at=now - 2900, destroyed_at=now - 1200)
    demo.instance_ids.update(busy=busy, idle=idle, gone=gone)

    # baseline/0 runs on the hot instance: 10 steps every 10 s.
    running = _arm_run(ledger, demo, run_id, "baseline", 0)
    for state in ("provisioning", "deploying", "running"):
        ledger.transition(running, state)
    attempt = ledger.start_attempt(running, backend="vast", host=HOT_HOST, hardware="RTX 4090", gpu_index="0",
                                   instance_id=busy)
    _metrics(ledger, running, attempt, range(10, 41, 10), now - 30, 1.0)

    # deep/0 runs on the Ray node after two watchdog restarts: 5 steps per 10 s on its third attempt.
    restarted = _arm_run(ledger, demo, run_id, "deep", 0, total_steps=200)
    ledger.transition(restarted, "running")
    for _ in range(2):
        first = ledger.start_attempt(restarted, backend="ray", host=NODE_HOST, hardware="A10", gpu_index="0")
        ledger.end_attempt(first, "interrupted", reason="watchdog: gpu_temperature")
        ledger.add_restart(restarted)
        ledger.event(run_id, "watchdog.breach", restarted, breach="gpu_temperature", value=90)
        ledger.event(run_id, "watchdog.restart", restarted)
    third = ledger.start_attempt(restarted, backend="ray", host=NODE_HOST, hardware="A10", gpu_index="0")
    _metrics(ledger, restarted, third, range(50, 71, 5), now - 40, 2.0)

    finished = _arm_run(ledger, demo, run_id, "baseline", 1)
    ledger.transition(finished, "collecting")
    ledger.transition(finished, "succeeded")
    _metrics(ledger, finished, None, range(10, 101, 10), now - 900, 1.0)
    _arm_run(ledger, demo, run_id, "wide", 0)                            # pending
    failed = _arm_run(ledger, demo, run_id, "wide", 1)
    ledger.transition(failed, "failed", reason="exit code 1")
    diverged = _arm_run(ledger, demo, run_id, "noaug", 0)
    ledger.record_metrics(diverged, None, [{"step": 5, "time": now - 100, "loss": math.nan}])
    ledger.transition(diverged, "diverged", reason="non-finite loss at step 5")
    ledger.event(run_id, "watchdog.pause", None)

    # GPU health: nvidia-smi output from the instances, an NVML sample from the Ray node, one stale host.
    ledger.record_health([s.to_dict() for s in parse_nvidia_smi_csv(NVIDIA_SMI_HOT, HOT_HOST, now - 2)],
                         run_id=run_id, arm="baseline")
    ledger.record_health([s.to_dict() for s in parse_nvidia_smi_csv(NVIDIA_SMI_COOL, COOL_HOST, now - 3)])
    nvml_sample = GpuSample(host=NODE_HOST, gpu="0", name="NVIDIA A10", uuid="GPU-5a1f0c1e-0000-4000-8000-00000000000a",
                            temperature_celsius=67.0, memory_used_bytes=12 * 2**30, memory_total_bytes=24 * 2**30,
                            utilization_ratio=0.93, power_watts=141.2, energy_joules=8.6e6, sm_clock_hz=1.695e9,
                            throttle_reasons=0x4, ecc_errors=0, xid_errors=0, at=now - 1)
    ledger.record_health([nvml_sample.to_dict()], run_id=run_id, arm="deep")
    stale = parse_nvidia_smi_csv(NVIDIA_SMI_COOL, STALE_HOST, now - 3600)
    ledger.record_health([s.to_dict() for s in stale])


# ---- a real Prometheus ----------------------------------------------------------------------

class PrometheusServer:
    """A Prometheus in `workdir` scraping `targets` (host:port) every second as job "armature"; or, given
    `scrape_configs`, scraping those (`targets` then lists the ones expected to answer)."""

    def __init__(self, workdir: Path, targets: list[str], rule_files: list[Path] = (), job: str = "armature",
                 scrape_configs: list[dict] | None = None):
        self.workdir = Path(workdir)
        self.targets = targets
        self.rule_files = [Path(p).resolve() for p in rule_files]
        self.job = job
        self.scrape_configs = scrape_configs or [{"job_name": job, "static_configs": [{"targets": targets}]}]
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> "PrometheusServer":
        assert PROMETHEUS, NO_PROMETHEUS_REASON
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": self.scrape_configs,
        }
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.log_path = self.workdir / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [PROMETHEUS, f"--config.file={config_path}", f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited {self.process.returncode}: {self.log_path.read_text()}")
            try:
                http_get(self.url + "/-/ready", timeout=1)
                return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"prometheus not ready after {timeout}s: {self.log_path.read_text()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> "PrometheusServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def api(self, path: str, **params: str | list[str]) -> dict:
        query = urllib.parse.urlencode(params, doseq=True)
        body = json.loads(http_get(f"{self.url}/api/v1/{path}?{query}"))
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """An instant query's result (a list of {metric, value}); a scalar or string comes back as one item."""
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def label_values(self, label: str, match: str | None = None) -> list[str]:
        if match is None:
            return self.api(f"label/{label}/values")
        return self.api(f"label/{label}/values", **{"match[]": match})

    def wait_for_scrapes(self, count: int = 3, timeout: float = 30) -> None:
        """Wait until every target has been scraped successfully `count` times."""
        expr = f'count_over_time(up{{job="{self.job}"}}[5m]) >= {count} and up{{job="{self.job}"}} == 1'
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.query(expr)) == len(self.targets):
                return
            time.sleep(0.5)
        raise TimeoutError(f"prometheus did not scrape {self.targets} {count} times in {timeout}s; "
                           f"up: {self.query('up')}; log: {self.log_path.read_text()[-2000:]}")
