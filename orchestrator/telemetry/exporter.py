"""The Prometheus exporter: GPU health and the ledger's state, read afresh on every scrape.

Nothing runs in the background: each scrape reads the local GPUs through NVML,
the latest remote GPU samples from the ledger's gpu_health table, and the
ledger's runs, arm runs, attempts, instances and events with short read-only
queries. So the same exporter serves during an ablation and between runs, and
a missing NVML or a ledger that does not exist yet only shows as 0 in
`armature_nvml_up` / `armature_ledger_up`.

Runs exported: every running run and the RECENT_RUNS most recent ones. Two exporters can serve one ledger
side by side without a series twice (infra/prometheus/prometheus.yml scrapes both):
- a study's exporter (`armature ablation`, port 9109..9112; `only_run`) serves only its own run: the run's
  series, its arm runs, instances and the GPUs its attempts use (plus the exporter's own up/NVML series);
- the standalone exporter (`armature exporter`, port 9108; `skip_live_runs`) serves the rest: every run
  not driven by a live orchestrator on this host, the idle GPUs and the ledger-wide `armature_runs`.
  A run whose orchestrator lives shows only through that orchestrator's exporter (none with
  `--metrics-port -1`); once the orchestrator ends, the standalone exporter serves the run again.
An exporter built with neither serves everything (what tests and one-off scrapes use). State-like
series (`armature_arm_state`, `armature_run_state`, `armature_gpu_throttle_active`)
carry one series per thing, for its current state or each active reason, rather
than a 0 for every state it is not in: that keeps a scrape of a busy ledger small.
Every series is listed in METRICS below (name, type, labels).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import generate_latest, start_http_server
from prometheus_client.registry import Collector, CollectorRegistry

from orchestrator.errors import UserError
from orchestrator.ledger import RUN_STATES, Ledger, orchestrator_alive
from orchestrator.telemetry.gpu import GpuSample, LocalGpus, throttle_reasons_active

log = logging.getLogger(__name__)

DEFAULT_PORT = 9108
DEFAULT_ADDR = "127.0.0.1"
HEALTH_MAX_AGE_S = 120.0        # remote GPU samples older than this are not exported
RECENT_RUNS = 5                 # besides running runs, the most recent runs are exported too
STEP_RATE_WINDOW_ROWS = 20      # metrics rows the steps-per-second estimate looks back over
LOCAL_HOST_NAMES = ("localhost", "127.0.0.1")

GPU_LABELS = ("host", "gpu", "run", "arm")
ARM_LABELS = ("run", "arm", "seed")
INSTANCE_LABELS = ("run", "instance_id", "gpu_name")


@dataclass(frozen=True)
class MetricSpec:
    name: str                 # as exposed (counters end in _total, info metrics in _info)
    kind: str                 # gauge, counter or info
    help: str
    labels: tuple[str, ...] = ()


METRICS = {spec.name: spec for spec in [
    # exporter and sources
    MetricSpec("armature_exporter_scrape_duration_seconds", "gauge", "Time this scrape took to collect."),
    MetricSpec("armature_ledger_up", "gauge", "1 when the ledger could be read on this scrape."),
    MetricSpec("armature_nvml_up", "gauge", "1 when NVML reads the local GPUs."),
    MetricSpec("armature_nvml_unavailable_info", "info", "Why NVML cannot read local GPUs.", ("reason",)),
    # GPUs
    MetricSpec("armature_gpu_up", "gauge", "1 when GPU health is known for this host (local NVML or a fresh "
               "remote sample).", ("host",)),
    MetricSpec("armature_gpu_info", "info", "GPU model and UUID.", ("host", "gpu", "name", "uuid")),
    MetricSpec("armature_gpu_temperature_celsius", "gauge", "GPU core temperature.", GPU_LABELS),
    MetricSpec("armature_gpu_memory_used_bytes", "gauge", "GPU memory in use.", GPU_LABELS),
    MetricSpec("armature_gpu_memory_total_bytes", "gauge", "GPU memory in all.", GPU_LABELS),
    MetricSpec("armature_gpu_utilization_ratio", "gauge", "Fraction of time a kernel ran (0..1).", GPU_LABELS),
    MetricSpec("armature_gpu_power_watts", "gauge", "GPU power draw.", GPU_LABELS),
    MetricSpec("armature_gpu_energy_joules_total", "counter", "GPU energy used since the driver loaded.",
               GPU_LABELS),
    MetricSpec("armature_gpu_sm_clock_hertz", "gauge", "GPU SM clock.", GPU_LABELS),
    MetricSpec("armature_gpu_throttle_active", "gauge", "1 while the GPU clocks are held down for this reason "
               "(reasons not active have no series).",
               GPU_LABELS + ("reason",)),
    MetricSpec("armature_gpu_ecc_errors_total", "counter", "Volatile uncorrected ECC errors.", GPU_LABELS),
    MetricSpec("armature_gpu_xid_errors_total", "counter", "XID errors reported for this GPU.", GPU_LABELS),
    MetricSpec("armature_gpu_sample_timestamp_seconds", "gauge", "Unix time of the GPU sample.", GPU_LABELS),
    # runs
    MetricSpec("armature_runs", "gauge", "Runs in the ledger by state.", ("state",)),
    MetricSpec("armature_run_info", "info", "A run's name, trainer, backend and primary metric.",
               ("run", "name", "trainer", "backend", "metric")),
    MetricSpec("armature_run_state", "gauge", "1, labelled with the run's current state (one series per run).",
               ("run", "state")),
    MetricSpec("armature_run_budget_dollars", "gauge", "The run's budget.", ("run",)),
    MetricSpec("armature_run_spend_dollars", "gauge", "Money the run has spent so far.", ("run",)),
    MetricSpec("armature_run_burn_rate_dollars_per_hour", "gauge", "What the run spends per hour now.",
               ("run",)),
    MetricSpec("armature_watchdog_actions_total", "counter", "Watchdog events in the ledger by kind.",
               ("run", "action")),
    # arm runs
    MetricSpec("armature_arm_state", "gauge", "1, labelled with the arm run's current state (one series per arm run).",
               ARM_LABELS + ("state",)),
    MetricSpec("armature_arm_step", "gauge", "Last training step reported.", ARM_LABELS),
    MetricSpec("armature_arm_total_steps", "gauge", "Steps the arm run trains for.", ARM_LABELS),
    MetricSpec("armature_arm_progress_ratio", "gauge", "step / total steps.", ARM_LABELS),
    MetricSpec("armature_arm_steps_per_second", "gauge", "Training speed over the latest metrics rows.",
               ARM_LABELS),
    MetricSpec("armature_arm_eta_seconds", "gauge", "Estimated time to the last step.", ARM_LABELS),
    MetricSpec("armature_arm_last_progress_timestamp_seconds", "gauge",
               "Unix time of the newest metrics row, or of the current attempt's start when later.",
               ARM_LABELS),
    MetricSpec("armature_arm_primary_metric", "gauge", "Latest value of the run's primary metric.",
               ARM_LABELS + ("metric",)),
    MetricSpec("armature_arm_loss", "gauge", "Latest training loss.", ARM_LABELS),
    MetricSpec("armature_arm_restarts_total", "counter", "Restarts of the arm run from its checkpoint.",
               ARM_LABELS),
    # instances
    MetricSpec("armature_instance_alive", "gauge", "1 until the provider confirmed the instance destroyed.",
               INSTANCE_LABELS),
    MetricSpec("armature_instance_price_dollars_per_hour", "gauge", "Contracted price, storage included.",
               INSTANCE_LABELS),
    MetricSpec("armature_instance_age_seconds", "gauge", "Time since the instance was requested "
               "(to its destruction, once destroyed).", INSTANCE_LABELS),
    MetricSpec("armature_instance_active_attempts", "gauge", "Attempts of arm runs open on the instance.",
               INSTANCE_LABELS),
]}


class _Families:
    """The metric families of one scrape, created as their first sample arrives."""

    def __init__(self) -> None:
        self._families: dict[str, Metric] = {}

    def add(self, metric_name: str, value: float | None, /, **labels: Any) -> None:
        if value is None:
            return
        spec = METRICS[metric_name]
        family = self._families.get(metric_name)
        if family is None:
            family = self._families[metric_name] = _new_family(spec)
        label_values = [_label(labels.get(label)) for label in spec.labels]
        if spec.kind == "info":
            family.add_metric([], dict(zip(spec.labels, label_values)))
        else:
            family.add_metric(label_values, float(value))

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._families.values())


def _new_family(spec: MetricSpec) -> Metric:
    if spec.kind == "counter":
        return CounterMetricFamily(spec.name, spec.help, labels=list(spec.labels))
    if spec.kind == "info":
        return InfoMetricFamily(spec.name.removesuffix("_info"), spec.help)
    return GaugeMetricFamily(spec.name, spec.help, labels=list(spec.labels))


def _label(value: Any) -> str:
    return "" if value is None else str(value)


def _number(value: Any) -> float | None:
    """A metrics value as a float, or None for anything that is not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class ArmatureCollector(Collector):
    """Collects every armature series from NVML and the ledger, on each scrape."""

    def __init__(self, ledger_path: str | os.PathLike, host: str, local_gpus: LocalGpus, *,
                 health_max_age_s: float = HEALTH_MAX_AGE_S, recent_runs: int = RECENT_RUNS,
                 only_run: str | None = None, skip_live_runs: bool = False):
        self.ledger_path = Path(ledger_path)
        self.host = host
        self.local_gpus = local_gpus
        self.health_max_age_s = health_max_age_s
        self.recent_runs = recent_runs
        self.only_run = only_run                # a study's exporter: this run's series only
        self.skip_live_runs = skip_live_runs    # the standalone exporter: not the runs live studies serve
        self._live_runs: set[str] = set()       # runs driven by a live orchestrator, as of this scrape
        self._ledger: Ledger | None = None
        self._cost_error_logged = False

    def _serves(self, run_ids: str | None) -> bool:
        """Does this exporter serve series of this run (or of these comma-joined runs; "" or None: no run)?"""
        runs = [run for run in (run_ids or "").split(",") if run]
        if self.only_run is not None:
            return self.only_run in runs
        return not any(run in self._live_runs for run in runs)

    def collect(self) -> Iterable[Metric]:
        started = time.perf_counter()
        out = _Families()
        ledger = self._open_ledger()
        if ledger is not None:
            try:
                self._collect_ledger(out, ledger)
            except Exception:   # a scrape reports the failure as armature_ledger_up 0, never as an HTTP 500
                log.exception("exporter: reading the ledger %s failed", self.ledger_path)
                self._close_ledger()
                ledger = None
                out = _Families()   # drop the half-collected ledger series
        out.add("armature_ledger_up", 1 if ledger is not None else 0)
        self._collect_gpus(out, ledger)
        out.add("armature_exporter_scrape_duration_seconds", time.perf_counter() - started)
        return out

    def close(self) -> None:
        self._close_ledger()

    # ---- the ledger ----------------------------------------------------------

    def _open_ledger(self) -> Ledger | None:
        if self._ledger is None and self.ledger_path.exists():
            try:
                self._ledger = Ledger(self.ledger_path, create=False)
            except (UserError, sqlite3.Error) as exc:
                log.warning("exporter: cannot read the ledger %s: %s", self.ledger_path, exc)
        return self._ledger

    def _close_ledger(self) -> None:
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None

    def _collect_ledger(self, out: _Families, ledger: Ledger) -> None:
        if self.skip_live_runs:
            self._live_runs = {run["run_id"] for run in ledger.query("SELECT * FROM runs WHERE state = 'running'")
                               if orchestrator_alive(run)}
        if self.only_run is None:       # ledger-wide: served once, by the exporter that is not a study's
            counts = {state: 0 for state in RUN_STATES}
            for row in ledger.query("SELECT state, count(*) AS n FROM runs GROUP BY state"):
                counts[row["state"]] = row["n"]
            for state, n in counts.items():
                out.add("armature_runs", n, state=state)
        for row in ledger.query("SELECT run_id, kind, count(*) AS n FROM events WHERE kind LIKE 'watchdog.%'"
                                " GROUP BY run_id, kind"):
            if self._serves(row["run_id"]):
                out.add("armature_watchdog_actions_total", row["n"], run=row["run_id"],
                        action=row["kind"].removeprefix("watchdog."))

        if self.only_run is not None:
            runs = ledger.query("SELECT * FROM runs WHERE run_id = ?", (self.only_run,))
        else:
            runs = [run for run in ledger.query(
                "SELECT * FROM runs WHERE state = 'running'"
                " OR run_id IN (SELECT run_id FROM runs ORDER BY created_at DESC LIMIT ?) ORDER BY created_at",
                (self.recent_runs,)) if self._serves(run["run_id"])]
        if not runs:
            return
        self._collect_runs(out, ledger, runs)
        run_ids = [run["run_id"] for run in runs]
        self._collect_arm_runs(out, ledger, {run["run_id"]: run for run in runs}, run_ids)
        self._collect_instances(out, ledger, run_ids)

    def _collect_runs(self, out: _Families, ledger: Ledger, runs: list[dict]) -> None:
        cost = self._cost_functions()
        for run in runs:
            run_id = run["run_id"]
            out.add("armature_run_info", 1, run=run_id, name=run["name"], trainer=run["trainer"],
                    backend=run["backend"], metric=run["metric"])
            out.add("armature_run_state", 1, run=run_id, state=run["state"])
            out.add("armature_run_budget_dollars", run["budget_dollars"], run=run_id)
            if cost is not None:
                current_spend, burn_rate = cost
                out.add("armature_run_spend_dollars", _call_cost(current_spend, ledger, run_id), run=run_id)
                out.add("armature_run_burn_rate_dollars_per_hour", _call_cost(burn_rate, ledger, run_id),
                        run=run_id)

    def _cost_functions(self) -> tuple[Callable, Callable] | None:
        """orchestrator.cost's current_spend and burn_rate, imported on first use; None (logged once) without."""
        try:
            cost = importlib.import_module("orchestrator.cost")
            return cost.current_spend, cost.burn_rate
        except (ImportError, AttributeError) as exc:
            if not self._cost_error_logged:
                log.warning("exporter: no spend or burn rate series: %s", exc)
                self._cost_error_logged = True
            return None

    def _collect_arm_runs(self, out: _Families, ledger: Ledger, runs: dict[str, dict], run_ids: list[str]) -> None:
        marks = ",".join("?" * len(run_ids))
        arm_runs = ledger.query(
            "SELECT id, run_id, arm, seed, state, last_step, last_metrics_json, total_steps, restarts"
            f" FROM arm_runs WHERE run_id IN ({marks}) ORDER BY id", run_ids)
        attempt_starts = {row["arm_run_id"]: row["started_at"] for row in ledger.query(
            "SELECT a.arm_run_id, max(a.started_at) AS started_at FROM attempts a"
            f" JOIN arm_runs r ON a.arm_run_id = r.id WHERE r.run_id IN ({marks}) AND a.ended_at IS NULL"
            " GROUP BY a.arm_run_id", run_ids)}
        for arm_run in arm_runs:
            labels = {"run": arm_run["run_id"], "arm": arm_run["arm"], "seed": arm_run["seed"]}
            out.add("armature_arm_state", 1, state=arm_run["state"], **labels)
            step, total = arm_run["last_step"], arm_run["total_steps"]
            out.add("armature_arm_step", step, **labels)
            out.add("armature_arm_total_steps", total, **labels)
            if step is not None and total:
                out.add("armature_arm_progress_ratio", min(step / total, 1.0), **labels)
            out.add("armature_arm_restarts_total", arm_run["restarts"], **labels)

            last_metrics = json.loads(arm_run["last_metrics_json"] or "{}")
            out.add("armature_arm_loss", _number(last_metrics.get("loss")), **labels)
            metric = runs[arm_run["run_id"]]["metric"]
            if metric:
                out.add("armature_arm_primary_metric", _number(last_metrics.get(metric)), metric=metric, **labels)

            if arm_run["state"] != "running":
                continue
            rate, last_row_at = _step_rate(ledger, arm_run["id"])
            progress_at = max((t for t in (last_row_at, attempt_starts.get(arm_run["id"])) if t is not None),
                              default=None)
            out.add("armature_arm_last_progress_timestamp_seconds", progress_at, **labels)
            out.add("armature_arm_steps_per_second", rate, **labels)
            if rate and step is not None and total:
                out.add("armature_arm_eta_seconds", max(total - step, 0) / rate, **labels)

    def _collect_instances(self, out: _Families, ledger: Ledger, run_ids: list[str]) -> None:
        marks = ",".join("?" * len(run_ids))
        instances = ledger.query(
            "SELECT i.id, i.run_id, i.provider_instance_id, i.gpu_name, i.dph_total, i.state, i.created_at,"
            " i.destroyed_at, (SELECT count(*) FROM attempts a WHERE a.instance_id = i.id AND a.ended_at IS NULL)"
            " AS active_attempts FROM instances i"
            f" WHERE (i.destroyed_at IS NULL AND i.state != 'failed_create') OR i.run_id IN ({marks})"
            " ORDER BY i.id", run_ids)
        now = time.time()
        for instance in instances:
            if not self._serves(instance["run_id"]):
                continue
            labels = {"run": instance["run_id"], "gpu_name": instance["gpu_name"],
                      "instance_id": instance["provider_instance_id"] or f"ledger-{instance['id']}"}
            alive = instance["destroyed_at"] is None and instance["state"] != "failed_create"
            out.add("armature_instance_alive", 1 if alive else 0, **labels)
            out.add("armature_instance_price_dollars_per_hour", instance["dph_total"], **labels)
            end = now if alive else (instance["destroyed_at"] or instance["created_at"])
            out.add("armature_instance_age_seconds", max(end - instance["created_at"], 0.0), **labels)
            out.add("armature_instance_active_attempts", instance["active_attempts"], **labels)

    # ---- GPUs ----------------------------------------------------------------

    def _collect_gpus(self, out: _Families, ledger: Ledger | None) -> None:
        out.add("armature_nvml_up", 1 if self.local_gpus.available else 0)
        if not self.local_gpus.available:
            out.add("armature_nvml_unavailable_info", 1, reason=self.local_gpus.reason)

        local = self.local_gpus.read()
        assignments = self._local_assignments(ledger) if local and ledger is not None else {}
        served = [(sample, *assignments.get(sample.gpu, ("", ""))) for sample in local]
        served = [(sample, run, arm) for sample, run, arm in served if self._serves(run)]
        if served or self.only_run is None:
            out.add("armature_gpu_up", 1 if local else 0, host=self.host)
        for sample, run, arm in served:
            sample.host = self.host
            _add_gpu_sample(out, sample, run, arm)

        remote_hosts = set()
        for row in self._remote_health(ledger):
            if local and row["host"] == self.host:
                continue    # NVML is fresher than whatever was recorded for this host
            if not self._serves(row["run_id"]):
                continue
            try:
                sample = GpuSample.from_dict(json.loads(row["sample_json"]))
            except (ValueError, TypeError) as exc:
                log.warning("exporter: unreadable GPU sample for %s GPU %s: %s", row["host"], row["gpu"], exc)
                continue
            sample.host, sample.gpu = row["host"], row["gpu"]
            remote_hosts.add(row["host"])
            _add_gpu_sample(out, sample, row["run_id"], row["arm"])
        for host in sorted(remote_hosts - {self.host}):
            out.add("armature_gpu_up", 1, host=host)

    def _remote_health(self, ledger: Ledger | None) -> list[dict]:
        if ledger is None:
            return []
        try:
            return ledger.latest_health(max_age_s=self.health_max_age_s)
        except sqlite3.Error as exc:
            log.warning("exporter: reading GPU health from the ledger failed: %s", exc)
            return []

    def _local_assignments(self, ledger: Ledger) -> dict[str, tuple[str, str]]:
        """Local GPU index -> (run, arm) of the attempts open on it; packed arms are joined with commas."""
        try:
            rows = ledger.query(
                "SELECT a.gpu_index, a.host, r.run_id, r.arm FROM attempts a JOIN arm_runs r ON a.arm_run_id = r.id"
                " WHERE a.ended_at IS NULL AND a.instance_id IS NULL AND a.gpu_index IS NOT NULL ORDER BY a.id")
        except sqlite3.Error as exc:
            log.warning("exporter: reading attempts from the ledger failed: %s", exc)
            return {}
        runs: dict[str, list[str]] = {}
        arms: dict[str, list[str]] = {}
        for row in rows:
            if row["host"] not in (None, self.host, *LOCAL_HOST_NAMES):
                continue
            for index in str(row["gpu_index"]).split(","):
                index = index.strip()
                if not index:
                    continue
                for seen, value in ((runs, row["run_id"]), (arms, row["arm"])):
                    values = seen.setdefault(index, [])
                    if value not in values:
                        values.append(value)
        return {index: (",".join(runs[index]), ",".join(arms[index])) for index in runs}


def _add_gpu_sample(out: _Families, sample: GpuSample, run: str | None, arm: str | None) -> None:
    labels = {"host": sample.host, "gpu": sample.gpu, "run": run, "arm": arm}
    out.add("armature_gpu_info", 1, host=sample.host, gpu=sample.gpu, name=sample.name, uuid=sample.uuid)
    for metric_name, field_value in (
            ("armature_gpu_temperature_celsius", sample.temperature_celsius),
            ("armature_gpu_memory_used_bytes", sample.memory_used_bytes),
            ("armature_gpu_memory_total_bytes", sample.memory_total_bytes),
            ("armature_gpu_utilization_ratio", sample.utilization_ratio),
            ("armature_gpu_power_watts", sample.power_watts),
            ("armature_gpu_energy_joules_total", sample.energy_joules),
            ("armature_gpu_sm_clock_hertz", sample.sm_clock_hz),
            ("armature_gpu_ecc_errors_total", sample.ecc_errors),
            ("armature_gpu_xid_errors_total", sample.xid_errors),
            ("armature_gpu_sample_timestamp_seconds", sample.at or None)):
        out.add(metric_name, _number(field_value), **labels)
    if isinstance(sample.throttle_reasons, int):
        for reason, active in throttle_reasons_active(sample.throttle_reasons).items():
            if active:
                out.add("armature_gpu_throttle_active", 1, reason=reason, **labels)


def _call_cost(function: Callable, ledger: Ledger, run_id: str) -> float | None:
    try:
        return _number(function(ledger, run_id))
    except sqlite3.Error:
        raise
    except Exception as exc:
        log.warning("exporter: %s(%s) failed: %s", getattr(function, "__qualname__", function), run_id, exc)
        return None


def _step_rate(ledger: Ledger, arm_run_id: int) -> tuple[float | None, float | None]:
    """(steps per second over the newest metrics rows of the latest attempt, time of the newest row)."""
    rows = [row for row in ledger.query(
        "SELECT step, at, attempt_id FROM metrics WHERE arm_run_id=? ORDER BY step DESC LIMIT ?",
        (arm_run_id, STEP_RATE_WINDOW_ROWS)) if row["at"] is not None]
    if not rows:
        return None, None
    newest = rows[0]
    same_attempt = [row for row in rows if row["attempt_id"] == newest["attempt_id"]]
    oldest = same_attempt[-1]
    seconds = newest["at"] - oldest["at"]
    if seconds <= 0 or newest["step"] <= oldest["step"]:
        return None, newest["at"]
    rate = (newest["step"] - oldest["step"]) / seconds
    return (rate if math.isfinite(rate) else None), newest["at"]


class Exporter:
    """Serves the armature series over HTTP (`start()` / `stop()`); nothing is read between scrapes."""

    def __init__(self, ledger_path: str | os.PathLike, host: str | None = None, port: int = DEFAULT_PORT,
                 local_gpus: LocalGpus | None = None, *, addr: str = DEFAULT_ADDR,
                 health_max_age_s: float = HEALTH_MAX_AGE_S, recent_runs: int = RECENT_RUNS,
                 only_run: str | None = None, skip_live_runs: bool = False):
        self.host = host or socket.gethostname()
        self.port = port
        self.addr = addr
        self.local_gpus = local_gpus if local_gpus is not None else LocalGpus(host=self.host)
        self.collector = ArmatureCollector(ledger_path, self.host, self.local_gpus,
                                           health_max_age_s=health_max_age_s, recent_runs=recent_runs,
                                           only_run=only_run, skip_live_runs=skip_live_runs)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self._server: Any = None
        self._thread: Any = None

    def start(self) -> "Exporter":
        """Listen on addr:port (port 0 picks a free one; `.port` tells which) in a daemon thread."""
        if self._server is None:
            self._server, self._thread = start_http_server(self.port, addr=self.addr, registry=self.registry)
            self.port = self._server.server_address[1]
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = self._thread = None
        self.collector.close()

    @property
    def url(self) -> str:
        return f"http://{self.addr}:{self.port}/metrics"

    def scrape_text(self) -> str:
        """One scrape without HTTP: the exposition text."""
        return generate_latest(self.registry).decode()

    def __enter__(self) -> "Exporter":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
