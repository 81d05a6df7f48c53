"""The exporter over real HTTP, on a ledger built through the Ledger API; `promtool check metrics` on the scrape."""

import json
import socket
import time
import urllib.error

import pytest

from orchestrator.ledger import Ledger
from orchestrator.telemetry.exporter import METRICS, Exporter
from orchestrator.telemetry.gpu import GpuSample, LocalGpus
from tests.prom_helpers import (
    COOL_HOST, HOT_HOST, NODE_HOST, NO_PROMETHEUS_REASON, PROMTOOL, STALE_HOST, build_demo_ledger, matching, promtool,
    samples, scrape, value,
)

EXPORTER_HOST = "orchestrator-box"


class NoNvml:
    """What LocalGpus looks like on a machine without NVML (this one)."""
    available = False
    reason = "NVML Shared Library Not Found"

    def read(self):
        return []


class StandInGpus:
    """Local GPUs as NVML would report them, for the run/arm labelling of local GPUs."""
    available = True
    reason = ""

    def __init__(self, host, count=2):
        self.host, self.count = host, count

    def read(self):
        return [GpuSample(host=self.host, gpu=str(i), name="NVIDIA RTX A6000", uuid=f"GPU-local-{i}",
                          temperature_celsius=50.0 + i, memory_used_bytes=2**30, memory_total_bytes=48 * 2**30,
                          utilization_ratio=0.5, power_watts=100.0, energy_joules=1000.0 * (i + 1),
                          sm_clock_hz=1.8e9, throttle_reasons=0, ecc_errors=0, at=time.time())
                for i in range(self.count)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo_ledger(tmp_path_factory.mktemp("ledger") / "ledger.sqlite")


@pytest.fixture(scope="module")
def scraped(demo):
    exporter = Exporter(demo.path, host=EXPORTER_HOST, port=0, local_gpus=NoNvml()).start()
    try:
        yield scrape(exporter.url)
    finally:
        exporter.stop()


def test_serves_on_a_free_port_and_stops(demo):
    exporter = Exporter(demo.path, port=0, local_gpus=NoNvml())
    exporter.start()
    port = exporter.port
    assert port > 0 and exporter.url == f"http://127.0.0.1:{port}/metrics"
    assert "armature_ledger_up 1.0" in scrape(exporter.url)
    exporter.stop()
    with pytest.raises(urllib.error.URLError):
        scrape(f"http://127.0.0.1:{port}/metrics")
    with socket.socket() as sock:       # nothing listens there any more
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))


def test_promtool_check_metrics_passes(scraped):
    if not PROMTOOL:
        pytest.skip(NO_PROMETHEUS_REASON)
    result = promtool("check", "metrics", stdin=scraped)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_every_series_is_declared_and_documented(scraped):
    families = {s.name.removesuffix("_total") for s in samples(scraped)}
    declared = {name.removesuffix("_total") for name in METRICS}
    assert families <= declared
    assert all(name.startswith("armature_") for name in METRICS)
    for spec in METRICS.values():
        assert spec.help.endswith("."), spec.name
        assert (spec.kind == "counter") == spec.name.endswith("_total"), spec.name


def test_remote_gpu_series(scraped, demo):
    hot = dict(host=HOT_HOST, gpu="0", run=demo.run_id, arm="baseline")
    assert value(scraped, "armature_gpu_temperature_celsius", **hot) == 91.0
    assert value(scraped, "armature_gpu_memory_used_bytes", **hot) == 23010 * 2**20
    assert value(scraped, "armature_gpu_memory_total_bytes", **hot) == 24564 * 2**20
    assert value(scraped, "armature_gpu_utilization_ratio", **hot) == pytest.approx(0.99)
    assert value(scraped, "armature_gpu_power_watts", **hot) == pytest.approx(447.31)
    assert value(scraped, "armature_gpu_sm_clock_hertz", **hot) == pytest.approx(2.205e9)
    throttled = {s.labels["reason"]: s.value for s in matching(scraped, "armature_gpu_throttle_active", **hot)}
    assert throttled == {"sw_thermal_slowdown": 1, "hw_thermal_slowdown": 1}
    assert not matching(scraped, "armature_gpu_throttle_active", host=COOL_HOST)
    assert value(scraped, "armature_gpu_info", host=HOT_HOST, gpu="0") == 1
    assert matching(scraped, "armature_gpu_info", host=HOT_HOST)[0].labels["name"] == "NVIDIA GeForce RTX 4090"

    # A GPU with no arm on it has empty run/arm labels; unreadable fields are simply absent.
    assert value(scraped, "armature_gpu_temperature_celsius", host=COOL_HOST, gpu="0", run="", arm="") == 54.0
    assert value(scraped, "armature_gpu_temperature_celsius", host=COOL_HOST, gpu="1") is None
    assert value(scraped, "armature_gpu_memory_total_bytes", host=COOL_HOST, gpu="1") == 81920 * 2**20

    # Fields only NVML reads arrive through the ledger too.
    node = dict(host=NODE_HOST, gpu="0", run=demo.run_id, arm="deep")
    assert value(scraped, "armature_gpu_energy_joules_total", **node) == 8.6e6
    assert value(scraped, "armature_gpu_ecc_errors_total", **node) == 0
    assert value(scraped, "armature_gpu_xid_errors_total", **node) == 0

    # Stale samples are not exported; every host with fresh samples is up.
    assert not matching(scraped, "armature_gpu_temperature_celsius", host=STALE_HOST)
    for host in (HOT_HOST, COOL_HOST, NODE_HOST):
        assert value(scraped, "armature_gpu_up", host=host) == 1
    assert value(scraped, "armature_gpu_up", host=STALE_HOST) is None


def test_without_nvml_the_exporter_says_so(scraped):
    assert value(scraped, "armature_nvml_up") == 0
    assert value(scraped, "armature_gpu_up", host=EXPORTER_HOST) == 0
    (info,) = matching(scraped, "armature_nvml_unavailable_info")
    assert info.labels == {"reason": "NVML Shared Library Not Found"} and info.value == 1


def test_arm_run_series(scraped, demo):
    run = demo.run_id
    states = {(s.labels["arm"], s.labels["seed"]): s.labels["state"]
              for s in matching(scraped, "armature_arm_state", run=run) if s.value == 1}
    assert states == {("baseline", "0"): "running", ("deep", "0"): "running", ("baseline", "1"): "succeeded",
                      ("wide", "0"): "pending", ("wide", "1"): "failed", ("noaug", "0"): "diverged"}
    assert len(matching(scraped, "armature_arm_state", run=run, arm="wide", seed="0")) == 1

    baseline = dict(run=run, arm="baseline", seed="0")
    assert value(scraped, "armature_arm_step", **baseline) == 40
    assert value(scraped, "armature_arm_total_steps", **baseline) == 100
    assert value(scraped, "armature_arm_progress_ratio", **baseline) == pytest.approx(0.4)
    assert value(scraped, "armature_arm_steps_per_second", **baseline) == pytest.approx(1.0)
    assert value(scraped, "armature_arm_eta_seconds", **baseline) == pytest.approx(60.0)
    assert value(scraped, "armature_arm_loss", **baseline) == pytest.approx(0.5 - 40e-3)
    assert value(scraped, "armature_arm_primary_metric", metric="recon_mse", **baseline) == pytest.approx(0.096)
    assert value(scraped, "armature_arm_last_progress_timestamp_seconds", **baseline) == pytest.approx(demo.now)

    # The restarted arm's speed comes from its current attempt only (5 steps per 10 s).
    deep = dict(run=run, arm="deep", seed="0")
    assert value(scraped, "armature_arm_steps_per_second", **deep) == pytest.approx(0.5)
    assert value(scraped, "armature_arm_eta_seconds", **deep) == pytest.approx((200 - 70) / 0.5)
    assert value(scraped, "armature_arm_restarts_total", **deep) == 2

    # Finished arms keep state, step and metrics but no speed; a NaN loss is exported as NaN.
    assert value(scraped, "armature_arm_step", run=run, arm="baseline", seed="1") == 100
    assert value(scraped, "armature_arm_steps_per_second", run=run, arm="baseline", seed="1") is None
    assert value(scraped, "armature_arm_loss", run=run, arm="noaug", seed="0") != \
        value(scraped, "armature_arm_loss", run=run, arm="noaug", seed="0")
    assert value(scraped, "armature_arm_step", run=run, arm="wide", seed="0") is None


def test_run_and_instance_series(scraped, demo):
    run = demo.run_id
    assert value(scraped, "armature_runs", state="running") == 1
    assert value(scraped, "armature_runs", state="finished") == 1
    assert value(scraped, "armature_runs", state="failed") == 0
    assert value(scraped, "armature_run_state", run=run, state="running") == 1
    assert value(scraped, "armature_run_state", run=demo.old_run_id, state="finished") == 1
    assert len(matching(scraped, "armature_run_state", run=run)) == 1
    assert value(scraped, "armature_run_info", run=run, backend="vast", metric="recon_mse", trainer="vqvae") == 1
    assert value(scraped, "armature_run_budget_dollars", run=run) == 10.0
    assert value(scraped, "armature_run_budget_dollars", run=demo.old_run_id) is None
    assert value(scraped, "armature_watchdog_actions_total", run=run, action="breach") == 2
    assert value(scraped, "armature_watchdog_actions_total", run=run, action="restart") == 2
    assert value(scraped, "armature_watchdog_actions_total", run=run, action="pause") == 1

    busy = dict(run=run, instance_id="30001", gpu_name="RTX 4090")
    assert value(scraped, "armature_instance_alive", **busy) == 1
    assert value(scraped, "armature_instance_price_dollars_per_hour", **busy) == 0.45
    assert value(scraped, "armature_instance_age_seconds", **busy) == pytest.approx(600, abs=30)
    assert value(scraped, "armature_instance_active_attempts", **busy) == 1
    assert value(scraped, "armature_instance_active_attempts", run=run, instance_id="30002") == 0
    assert value(scraped, "armature_instance_alive", run=run, instance_id="30003") == 0
    assert value(scraped, "armature_instance_age_seconds", run=run, instance_id="30003") == pytest.approx(1800)


def test_spend_and_burn_rate_come_from_the_cost_model(scraped, demo):
    from orchestrator import cost
    ledger = Ledger(demo.path, create=False)
    try:
        spend = cost.current_spend(ledger, demo.run_id)
        assert value(scraped, "armature_run_spend_dollars", run=demo.run_id) == pytest.approx(spend, rel=0.05)
        assert value(scraped, "armature_run_burn_rate_dollars_per_hour", run=demo.run_id) == \
            pytest.approx(cost.burn_rate(ledger, demo.run_id))
    finally:
        ledger.close()
    assert value(scraped, "armature_run_burn_rate_dollars_per_hour", run=demo.run_id) == pytest.approx(0.45 + 1.60)


def test_no_ledger_yet_then_a_ledger(tmp_path):
    path = tmp_path / "runs" / "ledger.sqlite"
    with Exporter(path, port=0, local_gpus=NoNvml()) as exporter:
        text = scrape(exporter.url)
        assert value(text, "armature_ledger_up") == 0
        assert value(text, "armature_nvml_up") == 0
        assert not path.exists()                   # scraping never creates the ledger
        Ledger(path).close()
        text = scrape(exporter.url)
        assert value(text, "armature_ledger_up") == 1
        assert value(text, "armature_runs", state="running") == 0


def test_a_file_that_is_not_a_ledger_is_reported_not_fatal(tmp_path):
    path = tmp_path / "ledger.sqlite"
    path.write_text("not a database")
    with Exporter(path, port=0, local_gpus=NoNvml()) as exporter:
        assert value(scrape(exporter.url), "armature_ledger_up") == 0


def test_local_gpus_are_labelled_with_the_arms_running_on_them(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.create_run("r1", name="r1", trainer="vqvae", backend="local", spec_path=None, metric="loss",
                      metric_mode="min", baseline=None, budget_dollars=None, git_commit=None, git_diff_hash=None)
    ids = [ledger.add_arm_run("r1", arm=arm, seed=0, kind="arm", config={}, config_hash=arm, out_dir=arm,
                              total_steps=10, gpus=0.5, cpus=1, gpu_memory_gb=None) for arm in ("a", "b", "c")]
    ledger.start_attempt(ids[0], backend="local", host=EXPORTER_HOST, gpu_index="0")
    ledger.start_attempt(ids[1], backend="local", host=EXPORTER_HOST, gpu_index="0")      # packed on GPU 0
    ended = ledger.start_attempt(ids[2], backend="local", host=EXPORTER_HOST, gpu_index="1")
    ledger.end_attempt(ended, "succeeded")
    # A stale recording for this host is superseded by NVML.
    ledger.record_health([{"host": EXPORTER_HOST, "gpu": "0", "name": "old", "temperature_celsius": 99.0,
                           "at": time.time()}], run_id="r0", arm="old")
    ledger.close()

    with Exporter(tmp_path / "ledger.sqlite", host=EXPORTER_HOST, port=0,
                  local_gpus=StandInGpus(EXPORTER_HOST)) as exporter:
        text = scrape(exporter.url)
    assert value(text, "armature_nvml_up") == 1
    assert value(text, "armature_gpu_up", host=EXPORTER_HOST) == 1
    assert not matching(text, "armature_nvml_unavailable_info")
    assert value(text, "armature_gpu_temperature_celsius", host=EXPORTER_HOST, gpu="0", run="r1", arm="a,b") == 50
    assert value(text, "armature_gpu_temperature_celsius", host=EXPORTER_HOST, gpu="1", run="", arm="") == 51
    assert value(text, "armature_gpu_energy_joules_total", host=EXPORTER_HOST, gpu="1") == 2000
    assert len(matching(text, "armature_gpu_temperature_celsius")) == 2


def test_a_malformed_health_sample_is_skipped(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    with ledger.write() as db:
        db.execute("INSERT INTO gpu_health(host, gpu, sample_json, at) VALUES ('bad', '0', '{not json', ?)",
                   (time.time(),))
    ledger.record_health([{"host": "good", "gpu": "0", "name": "x", "temperature_celsius": "hot",
                           "power_watts": 10.0, "at": time.time()}])
    ledger.close()
    with Exporter(tmp_path / "ledger.sqlite", port=0, local_gpus=NoNvml()) as exporter:
        text = scrape(exporter.url)
    assert value(text, "armature_ledger_up") == 1
    assert value(text, "armature_gpu_power_watts", host="good", gpu="0") == 10.0
    assert value(text, "armature_gpu_temperature_celsius", host="good") is None
    assert not matching(text, "armature_gpu_power_watts", host="bad")


def test_real_local_gpus_never_break_a_scrape(tmp_path):
    """With the real NVML reader (unavailable on CPU machines) the exporter serves all the same."""
    gpus = LocalGpus()
    with Exporter(tmp_path / "ledger.sqlite", port=0, local_gpus=gpus) as exporter:
        text = scrape(exporter.url)
    assert value(text, "armature_nvml_up") == (1 if gpus.available else 0)
    assert json.dumps(value(text, "armature_exporter_scrape_duration_seconds"))
