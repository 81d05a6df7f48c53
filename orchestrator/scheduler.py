"""Drive a run's arm runs to their ends through a backend.

The scheduler runs in the orchestrator's main thread. Each attempt runs in a
thread of its own inside `backend.run_attempt`; its events come back through
`_on_event` (ledger rows, progress, early stopping, the watchdog) and its
result through a queue. Every state change is committed to the ledger before
it is acted on.

With adaptive seeds (`seeds: {min, max}`), when every arm run has ended the
scheduler adds one more seed to the arms whose verdict is still open
(orchestrator/adaptive.py) and goes on; each decision is a `seeds.add` or
`seeds.done` event in the ledger, with its reason.

Stopping an attempt early always goes through its `stop` event with a reason:
  interrupt  Ctrl-C: the arm run goes back to pending; `armature resume` continues it
  cancel     `armature cancel`: the arm run ends cancelled
  pause      a PAUSE file: back to pending until the file is removed
  watchdog   a health breach: pending again after a cool-down, at most max_restarts times
  early_stop an early-stop rule fired: the arm run ends cancelled, with the rule as reason. A bound rule stops
             one arm run; `decided` and `halving` (orchestrator/early_stop.py) stop every run of an arm, at a look
             taken in the main loop, and a resumed run cancels the pending runs of arms stopped before
None of these uses up `max_attempts`: only attempts that end failed, lost or preempted do, and a preempted one
only until a later attempt of its arm run starts from a later step (`counted_failures`): an arm on interruptible
instances, outbid again and again, goes on while each attempt's work survives in a checkpoint. The watchdog's
cool-down waits on the GPUs of the host the stopped attempt ran on, as the ledger last recorded them.
"""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.adaptive import Round, arms_without_verdict, next_round, over_budget, round_values
from orchestrator.backends.base import AttemptResult, AttemptSpec, Backend
from orchestrator.backends.provision import capabilities
from orchestrator.cost.energy import RaplMeter
from orchestrator.early_stop import EarlyStopper
from orchestrator.ledger import FINAL_STATES, Ledger
from orchestrator.runs import add_replicate, stop_local_trainer
from orchestrator.spec import Study
from orchestrator.tensorboard import TensorBoardLog, changed_keys
from orchestrator.telemetry.gpu import GpuSample, LocalGpus, SmiGpus, host_memory_ratio
from orchestrator.telemetry.watchdog import Watchdog, pause_requested

TICK_SECONDS = 1.0                     # the loop also wakes at once when an attempt ends
FAILED_ATTEMPT_STATES = ("failed", "lost", "preempted")     # the attempt ends that use up max_attempts
HEALTH_FRESH_SECONDS = 30.0            # a host's GPU samples older than this no longer hold back a cool-down


def counted_failures(attempts: list[dict]) -> int:
    """How many of an arm run's ended attempts (in order) use up max_attempts: every failed or lost one, and every
    preempted one except those a later attempt continued past, logging its first step later than it did (the
    preemption cost time, not progress: its work survived in a checkpoint)."""
    counted = 0
    for i, attempt in enumerate(attempts):
        if attempt["state"] not in FAILED_ATTEMPT_STATES:
            continue
        if attempt["state"] == "preempted":
            started = attempt["start_step"] or 0
            if any((later["start_step"] or 0) > started for later in attempts[i + 1:]):
                continue
        counted += 1
    return counted


@dataclass
class Running:
    arm_run: dict
    attempt_id: int
    stop: threading.Event = field(default_factory=threading.Event)
    stop_reason: str | None = None
    stop_detail: str | None = None
    gpu_index: str | None = None
    host: str | None = None
    energy_start: float | None = None
    first_step: int | None = None         # the first step it logged

    def request_stop(self, reason: str, detail: str | None = None) -> None:
        if self.stop_reason is None:
            self.stop_reason, self.stop_detail = reason, detail
        self.stop.set()


class Scheduler:
    def __init__(self, ledger: Ledger, run_id: str, study: Study, backend: Backend, run_dir: Path,
                 progress=None, local_gpus: LocalGpus | SmiGpus | None = None, max_concurrent: int | None = None):
        self.ledger = ledger
        self.run_id = run_id
        self.study = study
        self.backend = backend
        self.runs_here = capabilities(backend.name).runs_here     # trainers are this machine's processes
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.local_gpus = local_gpus
        self.max_concurrent = max_concurrent
        self.watchdog = Watchdog(study.watchdog)
        self.tensorboard = TensorBoardLog(self.run_dir, changed_keys(study))   # runs/<id>/tensorboard
        self.cpu_energy = RaplMeter()                     # CPU attempts' energy where the host exposes RAPL
        self.host = local_gpus.host if local_gpus is not None else socket.gethostname()    # the local samples' host
        self.running: dict[int, Running] = {}            # arm_run_id -> attempt in flight
        self.results: queue.Queue = queue.Queue()
        self._wake = threading.Event()                    # set when an attempt ends, so the loop reacts at once
        self.not_before: dict[int, float] = {}           # arm_run_id -> earliest restart (watchdog cool-down)
        self.cool_host: dict[int, str | None] = {}       # arm_run_id -> the host whose GPUs must cool first
        self.adopt: dict[int, dict] = {}                 # arm_run_id -> open attempt to reattach (resume)
        self.interrupted = False
        self.cancelled = False
        self._last_watchdog = 0.0
        self._seeds_settled = not study.adaptive          # adaptive seeds: no further round will be added
        self.early_stopper = EarlyStopper.for_run(ledger, run_id, study.early_stop, study.metric.name,
                                                  study.metric.mode, study.baseline)

    # ---- the loop ---------------------------------------------------------------

    def interrupt(self) -> None:
        """Ctrl-C: stop every attempt (they checkpoint), leave their arm runs pending for resume."""
        self.interrupted = True

    def run(self) -> str:
        self.ledger.set_run_state(self.run_id, "running", claim=True)
        while True:
            self._check_backend_alive()
            if self.interrupted:
                self._stop_all("interrupt")
            elif not self.cancelled and self.ledger.cancel_requested(self.run_id):
                self.cancelled = True
                self.ledger.event(self.run_id, "run.cancel")
            if self.cancelled:
                self._stop_all("cancel")
            self._drain_results()
            self._check_pauses()
            self._check_watchdog()
            arm_runs = self.ledger.arm_runs(self.run_id)
            if not (self.interrupted or self.cancelled):
                self._fail_orphans_of_failed_upstreams(arm_runs)
                if self._stop_decided_arms(arm_runs):
                    arm_runs = self.ledger.arm_runs(self.run_id)
                self._launch_ready(arm_runs)
            unfinished = any(r["state"] not in FINAL_STATES for r in arm_runs)   # at worst a tick stale
            stopping = self.interrupted or self.cancelled
            if not self.running and not unfinished and not stopping and self._add_seed_round(arm_runs):
                continue
            if not self.running and (stopping or not unfinished):
                break
            self._wake.wait(TICK_SECONDS)
            self._wake.clear()
        return self._finish()

    def _backend_down(self) -> str | None:
        """Why the backend's machinery (a local Ray) is gone, once it is."""
        return getattr(self.backend, "down", None)

    def _check_backend_alive(self) -> None:
        """A dead Ray stops the run as interrupted: its attempts were not the arms' fault, so none uses up a
        retry, and `armature resume` continues from the checkpoints."""
        down = self._backend_down()
        if down and not self.interrupted:
            self.interrupted = True
            self.ledger.event(self.run_id, "backend.down", reason=down)
            if self.progress is not None:
                self.progress.note(f"{down}: stopping; `armature resume {self.run_id}` continues the run")

    def _finish(self) -> str:
        if self.cancelled:
            for arm_run in self.ledger.arm_runs(self.run_id):
                if arm_run["state"] not in FINAL_STATES:
                    self.ledger.transition(arm_run["id"], "cancelled", "run cancelled")
                    self._show(arm_run["id"], state="cancelled")
            state = "cancelled"
        elif self.interrupted:
            state = "interrupted"
        else:
            states = {r["state"] for r in self.ledger.arm_runs(self.run_id)}
            state = "finished" if states <= set(FINAL_STATES) else "interrupted"
        self.ledger.set_run_state(self.run_id, state)
        self.tensorboard.close()
        return state

    def _add_seed_round(self, arm_runs: list[dict]) -> bool:
        """Adaptive seeds, once every arm run has ended: one more seed for the arms whose verdict is open.
        Returns whether arm runs were added."""
        if self._seeds_settled:
            return False
        stopped = set(self.early_stopper.stopped) if self.early_stopper is not None else set()
        no_verdict, why = arms_without_verdict(arm_runs, self.study.metric.name, self.study.baseline)
        values, planned = round_values(arm_runs, self.study.metric.name, exclude=stopped | no_verdict)
        step = next_round(values, planned, self.study.baseline, self.study.metric.mode, self.study.max_seeds)
        if no_verdict:
            step.reason += f"; {why}"
        if self.study.budget.max_dollars is not None:
            from orchestrator.cost.model import current_spend
            finished = sum(1 for r in arm_runs if r["kind"] == "arm")
            why_not = over_budget(step, current_spend(self.ledger, self.run_id), finished,
                                  self.study.budget.max_dollars)
            step = Round(None, why_not) if why_not else step
        if step.seed is None:
            self._seeds_settled = True
            self.ledger.event(self.run_id, "seeds.done", reason=step.reason)
            return False
        new_ids = add_replicate(self.ledger, self.run_id, self.run_dir, step.arms, step.seed)
        self.ledger.event(self.run_id, "seeds.add", seed=step.seed, arms=step.arms, reason=step.reason)
        if self.progress is not None:
            for arm_run in map(self.ledger.arm_run, new_ids):
                self.progress.add(arm_run["id"], arm_run["arm"], arm_run["seed"], arm_run["total_steps"])
        return True

    def _stop_all(self, reason: str) -> None:
        for running in self.running.values():
            running.request_stop(reason)

    # ---- launching ------------------------------------------------------------------

    def _ready(self, arm_runs: list[dict]) -> list[dict]:
        by_id = {r["id"]: r for r in arm_runs}
        now = time.time()
        ready = []
        for arm_run in arm_runs:
            if arm_run["state"] != "pending" or arm_run["id"] in self.running:
                continue
            if self.not_before.get(arm_run["id"], 0) > now or self._paused(arm_run):
                continue
            upstream_ids = json.loads(arm_run["upstream_ids"]).values()
            if all(by_id[u]["state"] == "succeeded" for u in upstream_ids):
                ready.append(arm_run)
        # Adopted attempts first: their trainers run already, unwatched until launched (the dead-man switch).
        ready.sort(key=lambda r: (r["id"] not in self.adopt, r["kind"] != "upstream", r["id"]))
        return ready

    def _launch_ready(self, arm_runs: list[dict]) -> None:
        for arm_run in self._ready(arm_runs):
            if self.max_concurrent is not None and len(self.running) >= self.max_concurrent:
                return
            if arm_run["id"] in self.not_before and not self._cooled(self.cool_host.get(arm_run["id"])):
                continue
            self._launch(arm_run)

    def _launch(self, arm_run: dict) -> None:
        adopted = self.adopt.pop(arm_run["id"], None)
        if adopted:
            attempt_id = adopted["id"]
        else:
            attempt_id = self.ledger.start_attempt(arm_run["id"], backend=self.backend.name)
        self.not_before.pop(arm_run["id"], None)
        self.cool_host.pop(arm_run["id"], None)
        if not self.runs_here:     # a local attempt reports `running` once Ray has started it
            self.ledger.transition(arm_run["id"], "provisioning", None, attempt_id)
            self._show(arm_run["id"], state="provisioning")
        running = Running(arm_run, attempt_id)
        self.running[arm_run["id"]] = running
        upstream_dirs = {dir_field: self.ledger.arm_run(upstream_id)["out_dir"]
                         for dir_field, upstream_id in json.loads(arm_run["upstream_ids"]).items()}
        config = json.loads(arm_run["config_json"])
        spec = AttemptSpec(
            run_id=self.run_id, arm_run_id=arm_run["id"], attempt_id=attempt_id, arm=arm_run["arm"],
            seed=arm_run["seed"], trainer=arm_run["trainer"], config=config, out_dir=arm_run["out_dir"],
            gpus=arm_run["gpus"], cpus=arm_run["cpus"], gpu_memory_gb=arm_run["gpu_memory_gb"],
            upstream_dirs=upstream_dirs, adopt=adopted is not None)
        thread = threading.Thread(target=self._attempt_thread, args=(running, spec), daemon=True,
                                  name=f"attempt-{attempt_id}")
        thread.start()

    def _attempt_thread(self, running: Running, spec: AttemptSpec) -> None:
        try:
            result = self.backend.run_attempt(spec, lambda event: self._on_event(running, event), running.stop)
        except Exception as exc:  # a backend bug must not take the run down with it
            result = AttemptResult("lost", None, f"{type(exc).__name__}: {exc}")
            if self.runs_here:    # nor leave its trainer running beside the next attempt's
                if stop_local_trainer(self._attempt_row(spec.arm_run_id, spec.attempt_id)):
                    result.reason += "; its trainer was stopped with SIGTERM (checkpointed)"
        self.results.put((running, result))
        self._wake.set()

    # ---- events from attempts ------------------------------------------------------

    def _first_new_step(self, arm_run_id: int, rows: list[dict]) -> int | None:
        """The first of these rows an earlier attempt did not log: a resumed trainer's metrics file starts with the
        rows up to its checkpoint, re-read as they were (same step, same time)."""
        logged = self.ledger.metric_times(arm_run_id, [row["step"] for row in rows if "step" in row])
        for row in rows:
            if "step" in row and (int(row["step"]) not in logged or logged[int(row["step"])] != row.get("time")):
                return int(row["step"])
        return None

    def _on_event(self, running: Running, event: dict) -> None:
        arm_run_id = running.arm_run["id"]
        kind = event["kind"]
        if kind == "metrics":
            if running.first_step is None:      # the attempt's start_step: where it continued (counted_failures)
                recorded = self._attempt_row(arm_run_id, running.attempt_id)["start_step"]   # adopted: known
                running.first_step = recorded if recorded is not None else self._first_new_step(arm_run_id,
                                                                                               event["rows"])
                if recorded is None and running.first_step is not None:
                    self.ledger.update_attempt(running.attempt_id, start_step=running.first_step)
            self.ledger.record_metrics(arm_run_id, running.attempt_id, event["rows"])
            self.tensorboard.metrics(running.arm_run, event["rows"])
            self._show(arm_run_id, rows=event["rows"])
            self._check_early_stop(running, event["rows"])
        elif kind == "state":
            if self.ledger.arm_run(arm_run_id)["state"] != event["state"]:
                self.ledger.transition(arm_run_id, event["state"], event.get("reason"), running.attempt_id)
            self._show(arm_run_id, state=event["state"])
        elif kind == "attempt":
            fields = {k: v for k, v in event.items() if k != "kind"}
            self.ledger.update_attempt(running.attempt_id, **fields)
            running.gpu_index = fields.get("gpu_index")
            running.host = fields.get("host")
            running.energy_start = self._energy(running)
            self._show(arm_run_id, hardware=fields.get("hardware"))
        elif kind == "health":
            samples = event["samples"]
            self.ledger.record_health(samples, self.run_id, running.arm_run["arm"])
            breach = self.watchdog.check([GpuSample.from_dict(s) for s in samples], event.get("host_memory_ratio"),
                                         host=event.get("host", ""))
            if breach:
                self._watchdog_stop(running, breach.message)
        elif kind == "energy":        # read where the attempt ran (another host than this one)
            self.ledger.update_attempt(running.attempt_id, energy_joules=event["joules"])
        elif kind == "event":
            detail = {k: v for k, v in event.items() if k not in ("kind", "event")}
            self.ledger.event(self.run_id, event["event"], arm_run_id, **detail)

    def _stop_decided_arms(self, arm_runs: list[dict]) -> bool:
        """Take the early-stop looks and rungs the arms have reached; stop every unfinished run of an arm stopped
        now or before (a resumed run included). Returns whether a pending arm run was cancelled."""
        if self.early_stopper is None:
            return False
        self.early_stopper.check(arm_runs)
        cancelled = False
        for arm_run in arm_runs:
            reason = self.early_stopper.stopped.get(arm_run["arm"])
            if reason is None or arm_run["kind"] != "arm" or arm_run["state"] in FINAL_STATES:
                continue
            running = self.running.get(arm_run["id"])
            if running is not None:
                running.request_stop("early_stop", reason)
            elif arm_run["state"] == "pending" and arm_run["id"] not in self.adopt:   # adopted: launched, then stopped
                self.ledger.transition(arm_run["id"], "cancelled", reason)
                self._show(arm_run["id"], state="cancelled", reason=reason)
                cancelled = True
        return cancelled

    def _check_early_stop(self, running: Running, rows: list[dict]) -> None:
        for rule in self.study.early_stop.rules:
            for row in rows:
                value = row.get(rule.metric)
                if value is None or row["step"] < rule.after_step:
                    continue
                if (rule.above is not None and value > rule.above) or (rule.below is not None and value < rule.below):
                    bound = f"above {rule.above}" if rule.above is not None and value > rule.above else \
                        f"below {rule.below}"
                    running.request_stop("early_stop", f"early stop: {rule.metric}={value:.4g} {bound} "
                                                       f"at step {row['step']}")
                    return

    # ---- results ---------------------------------------------------------------------

    def _drain_results(self) -> None:
        while True:
            try:
                running, result = self.results.get_nowait()
            except queue.Empty:
                return
            self._settle(running, result)

    def _settle(self, running: Running, result: AttemptResult) -> None:
        arm_run_id = running.arm_run["id"]
        del self.running[arm_run_id]
        energy = self._energy(running)
        if energy is not None and running.energy_start is not None:
            self.ledger.update_attempt(running.attempt_id, energy_joules=energy - running.energy_start)
        down = self._backend_down()
        if down and result.outcome in ("lost", "interrupted") and running.stop_reason in (None, "interrupt"):
            running.stop_reason, running.stop_detail = "interrupt", down
            result.outcome = "interrupted"
            if result.end_step is None:         # the task's own report died with Ray: the ledger's last step
                result.end_step = self.ledger.arm_run(arm_run_id)["last_step"]
        reason = running.stop_detail or result.reason
        attempt_state = result.outcome
        if result.outcome == "interrupted" and running.stop_reason:
            attempt_state = "interrupted" if running.stop_reason != "cancel" else "cancelled"
        self.ledger.end_attempt(running.attempt_id, attempt_state, exit_code=result.exit_code,
                                reason=reason, end_step=result.end_step)

        state, why = self._next_state(running, result)
        summary = None
        if state == "succeeded":
            self.ledger.transition(arm_run_id, "collecting", None, running.attempt_id)
            summary = _read_summary(Path(running.arm_run["out_dir"]))
            if summary:
                self.ledger.set_summary(arm_run_id, summary)
        self.ledger.transition(arm_run_id, state, why, running.attempt_id)
        self.tensorboard.ended(running.arm_run, state, summary, result.end_step)
        self._show(arm_run_id, state=state, reason=why)

    def _next_state(self, running: Running, result: AttemptResult) -> tuple[str, str | None]:
        arm_run_id = running.arm_run["id"]
        outcome, stop = result.outcome, running.stop_reason
        if outcome in ("succeeded", "diverged", "failed"):
            return outcome, result.reason
        if outcome == "cancelled":
            return "cancelled", result.reason
        if stop == "cancel":
            return "cancelled", "run cancelled"
        if stop == "early_stop":
            return "cancelled", running.stop_detail
        if stop == "interrupt":
            where = "before its first step" if result.end_step is None else f"at step {result.end_step}"
            cause = f"{running.stop_detail}: " if running.stop_detail else ""
            return "pending", f"{cause}interrupted {where}; `armature resume {self.run_id}` continues"
        if stop == "pause":
            return "pending", "paused (PAUSE file)"
        if stop == "watchdog":
            restarts = self.ledger.add_restart(arm_run_id)
            if not self.watchdog.restart_allowed(restarts - 1):
                return "failed", f"{running.stop_detail}; gave up after {restarts - 1} restarts"
            self.not_before[arm_run_id] = time.time() + self.study.watchdog.cooldown_seconds
            self.cool_host[arm_run_id] = self._attempt_row(arm_run_id, running.attempt_id)["host"]
            return "pending", f"{running.stop_detail}; restart {restarts} after cool-down"
        # this attempt failed; max_attempts counts failures only, not pauses, interrupts, watchdog stops or
        # attempts closed because the orchestrator died
        earlier = [a for a in self.ledger.attempts(arm_run_id) if a["id"] != running.attempt_id]
        failures = 1 + counted_failures(earlier)
        if failures >= self.study.max_attempts:
            return "failed", f"{failures} failed attempts (max_attempts {self.study.max_attempts}); " \
                             f"last: {outcome}: {result.reason}"
        return "pending", f"{outcome}: {result.reason}; retrying from the last checkpoint"

    def _attempt_row(self, arm_run_id: int, attempt_id: int) -> dict:
        return next(a for a in self.ledger.attempts(arm_run_id) if a["id"] == attempt_id)

    def _fail_orphans_of_failed_upstreams(self, arm_runs: list[dict]) -> None:
        by_id = {r["id"]: r for r in arm_runs}
        for arm_run in arm_runs:
            if arm_run["state"] != "pending":
                continue
            for upstream_id in json.loads(arm_run["upstream_ids"]).values():
                upstream = by_id[upstream_id]
                if upstream["state"] in FINAL_STATES and upstream["state"] != "succeeded":
                    why = f"upstream {upstream['arm']} {upstream['state']}"
                    self.ledger.transition(arm_run["id"], "failed", why)
                    self._show(arm_run["id"], state="failed", reason=why)
                    break

    # ---- pause and watchdog -----------------------------------------------------------

    def _paused(self, arm_run: dict) -> bool:
        return pause_requested(self.run_dir, Path(arm_run["out_dir"]))

    def _check_pauses(self) -> None:
        for running in self.running.values():
            if running.stop_reason is None and self._paused(running.arm_run):
                self.ledger.event(self.run_id, "pause", running.arm_run["id"])
                running.request_stop("pause")

    def _local_samples(self) -> list:
        if self.local_gpus is None or not self.local_gpus.available:
            return []
        return self.local_gpus.read()

    def _cooled(self, host: str | None) -> bool:
        """Have the GPUs of the host a watchdog-stopped attempt ran on cooled down? Read from the host's latest
        samples in the ledger (this machine's, recorded by `_check_watchdog`; a rented one's, streamed by its
        attempts); with none fresh there is nothing to wait for."""
        max_age = max(HEALTH_FRESH_SECONDS, 3 * self.study.watchdog.poll_seconds)
        samples = [GpuSample.from_dict(json.loads(row["sample_json"]))
                   for row in self.ledger.latest_health(max_age_s=max_age) if row["host"] == host]
        return self.watchdog.cooled(samples)

    def _check_watchdog(self) -> None:
        if not self.study.watchdog.enabled or not self.runs_here:
            return
        now = time.time()
        if now - self._last_watchdog < self.study.watchdog.poll_seconds:
            return
        self._last_watchdog = now
        samples = self._local_samples()
        self.ledger.record_health([sample.to_dict() for sample in samples], self.run_id)
        breach = self.watchdog.check(samples, host_memory_ratio(), host=self.host)
        if breach is None:
            return
        for running in list(self.running.values()):
            # a CPU arm shares the machine with an overheating GPU: it stops too; an arm on another node does not
            on_gpu = breach.gpu is None or not running.gpu_index or breach.gpu in running.gpu_index.split(",")
            on_host = running.host is None or running.host == breach.host
            if running.stop_reason is None and on_gpu and on_host:
                self._watchdog_stop(running, breach.message)

    def _watchdog_stop(self, running: Running, message: str) -> None:
        if running.stop_reason is not None:
            return
        self.ledger.event(self.run_id, "watchdog.breach", running.arm_run["id"], message=message)
        running.request_stop("watchdog", f"watchdog: {message}")

    def _energy(self, running: Running) -> float | None:
        """The energy counter (joules) of what a local attempt uses, if readable: NVML for its GPUs; for a CPU
        attempt on this machine, its share of the CPU packages' RAPL counters (orchestrator/cost/energy.py).
        An attempt on another host (a node of a Ray cluster) reports its own in an "energy" event."""
        if not self.runs_here or running.host not in (None, socket.gethostname()):
            return None
        if not running.gpu_index:
            return self.cpu_energy.attributed_joules(running.arm_run["cpus"])
        readings = {s.gpu: s.energy_joules for s in self._local_samples()}
        values = [readings.get(index) for index in running.gpu_index.split(",")]
        return sum(values) if values and all(v is not None for v in values) else None

    def _show(self, arm_run_id: int, **fields) -> None:
        if self.progress is not None:
            self.progress.update(arm_run_id, **fields)


def _read_summary(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
