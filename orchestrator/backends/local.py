"""Run attempts on this machine's GPUs or CPUs (or an existing Ray cluster) through Ray.

Each attempt is a Ray task asking for the arm's CPUs and GPUs (fractions
allowed). The task starts the trainer as a child process in its own process
group, pinned with CUDA_VISIBLE_DEVICES, and streams events back to the
driver: the pid, new metrics.jsonl lines, the outcome. The driver is the only
writer of the ledger, so tasks on other nodes need no access to it.

Nor to the driver's files: a task on a node that does not see the arm run's
folder runs the trainer in a node-local folder, gets the upstream artifacts and
the checkpoint to resume from as Ray objects, and sends the checkpoint (when it
changes) and at the end every output back for the driver to write
(orchestrator/backends/transfer.py). A cluster the driver joins gets the code as
the job's runtime_env working_dir (transfer.code_runtime_env), so no node needs
the project at the driver's path. A task on another host than the driver's reads
that host's GPU health, memory and energy itself and sends them as events
(telemetry.gpu.NodeTelemetry), as a rented host does; on the driver's host the
scheduler reads them.

Stopping: the driver marks the attempt in a small `StopBoard` actor; the task
sees it within half a second, sends SIGTERM to the trainer's process group
(the trainer checkpoints and exits 143) and reports the outcome.

A Ray that dies under the run (its GCS or raylet killed, or the cluster's head
gone) is noticed within a second by `RayWatch`: every attempt in flight returns
`interrupted` at once instead of waiting for Ray's own timeouts, and `down`
says why, so the scheduler stops the run as interrupted without using up any
arm's retries. The trainers lose their Ray worker, get SIGTERM (PDEATHSIG) and
checkpoint.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import ray
from ray._private import ray_constants
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from orchestrator.backends import transfer
from orchestrator.backends.base import AttemptResult, AttemptSpec, Emit
from orchestrator.metrics_tail import JsonlTail, log_tail
from orchestrator.paths import REPO_ROOT
from orchestrator.procs import process_start_time
from orchestrator.telemetry.gpu import NodeTelemetry

EXIT_DIVERGED = 3                      # trainers/common.py: the trainer contract
STOP_GRACE_SECONDS = 120               # a trainer gets this long to checkpoint after SIGTERM
POLL_SECONDS = 1.0                     # metrics and stop requests; a trainer that exits is seen at once
CHECKPOINT_SHIP_SECONDS = 5.0          # a node without the driver's files sends a new checkpoint at most this often
NODE_HEALTH_SECONDS = 5.0              # a task on another host than the driver's sends its health this often
RAY_WATCH_SECONDS = 0.5                # how often the Ray under the run is checked for life
GCS_UNREACHABLE_CHECKS = 6             # a named cluster's head refusing this many checks in a row is gone


@ray.remote(num_cpus=0)
class StopBoard:
    """Which attempts the driver wants stopped."""

    def __init__(self):
        self.stopped: set[int] = set()

    def stop(self, attempt_id: int) -> None:
        self.stopped.add(attempt_id)

    def should_stop(self, attempt_id: int) -> bool:
        return attempt_id in self.stopped


def _die_with_parent() -> None:
    """In the trainer child: start a new session, and get SIGTERM if the Ray worker dies."""
    os.setsid()
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@contextmanager
def _loopback_only():
    """While Ray starts a node here, give it 127.0.0.1 as its address, so that every server it starts
    (GCS, raylet, workers, agents) listens on loopback only.

    Ray replaces a loopback node address with the machine's network address unless its cluster mode is
    off (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read once when Ray is imported), so the flag is switched
    off for the start alone: a cluster the user names later in this process is joined as usual.
    """
    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def _hardware(gpu_ids: list) -> str:
    if not gpu_ids:
        models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")]
        return f"cpu ({models[0]})" if models else "cpu"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i",
                              ",".join(str(g) for g in gpu_ids)], capture_output=True, text=True, timeout=10)
        names = sorted(set(out.stdout.split("\n")) - {""})
        return ", ".join(names) or "gpu"
    except (OSError, subprocess.SubprocessError):
        return "gpu"


def _attempt_task(spec: AttemptSpec, board, inputs: dict):
    """A Ray streaming task: run the trainer, yield events, end with {"kind": "result", ...}.

    Where the driver's arm run folder is visible (its mark reads back), the trainer works in it. Elsewhere it
    works in a node-local folder filled from `inputs` (Ray objects the driver put: upstream artifacts, and the
    checkpoint, metrics and log to resume from), and its outputs go back as {"kind": "files"} events.
    """
    shared = transfer.sees_mark(Path(spec.out_dir), inputs["mark"])
    workdir = None if shared else Path(tempfile.mkdtemp(prefix=f"armature-{spec.run_id}-{spec.attempt_id}-"))
    try:
        out = Path(spec.out_dir) if shared else _fill_workdir(workdir, spec, inputs)
        yield from _run_trainer(spec, board, out, ship=not shared, driver_host=inputs["driver_host"])
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def _fill_workdir(workdir: Path, spec: AttemptSpec, inputs: dict) -> Path:
    """The trainer's folder on a node without the driver's files: its config points at local upstream copies."""
    out = workdir / "out"
    out.mkdir()
    config = dict(spec.config)
    for dir_field, ref in inputs["upstream"].items():
        folder = workdir / "upstream" / dir_field
        folder.mkdir(parents=True)
        artifact = ray.get(ref)
        if artifact is not None:        # else the trainer says which artifact.pt is missing
            transfer.write_files(folder, [artifact])
        config[dir_field] = str(folder)
    transfer.write_files(out, ray.get(inputs["resume"]))
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return out


def _run_trainer(spec: AttemptSpec, board, out: Path, ship: bool, driver_host: str):
    gpu_ids = [str(g) for g in ray.get_gpu_ids()]
    # The code this task was imported from: on a cluster the driver joined, this node's copy of the job's
    # runtime_env working_dir (Ray puts it first on the path), else this checkout.
    code_dir = REPO_ROOT
    env = {**os.environ, **spec.env,
           "CUDA_VISIBLE_DEVICES": ",".join(gpu_ids),
           "OMP_NUM_THREADS": str(max(1, int(spec.cpus))),
           "PYTHONPATH": str(code_dir) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONUNBUFFERED": "1"}
    host = socket.gethostname()
    telemetry = NodeTelemetry(gpu_ids, spec.cpus, host) if host != driver_host else None
    with open(out / "log", "ab") as log:
        log.write(f"\n=== attempt {spec.attempt_id} on {host} at {time.ctime()} (code in {code_dir}) ===\n".encode())
        log.flush()
        child = subprocess.Popen(
            [sys.executable, "-m", f"trainers.{spec.trainer}", "--config", str(out / "config.json"), "--out", str(out)],
            cwd=code_dir, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent)
    yield {"kind": "attempt", "pid": child.pid, "pid_start_time": process_start_time(child.pid),
           "host": host, "ray_node": ray.get_runtime_context().get_node_id(),
           "hardware": _hardware(gpu_ids), "gpu_index": ",".join(gpu_ids) or None}
    yield {"kind": "state", "state": "running", "reason": None}

    metrics = JsonlTail(out / "metrics.jsonl")
    checkpoint = _CheckpointWatch(out)
    stop_sent_at = None
    health_sent_at = 0.0
    try:
        while True:
            try:
                code = child.wait(POLL_SECONDS)         # returns as soon as the trainer exits
            except subprocess.TimeoutExpired:
                code = None
            rows = metrics.read_new()
            if rows:
                yield {"kind": "metrics", "rows": rows}
            if code is not None:
                break
            if telemetry is not None and time.time() - health_sent_at >= NODE_HEALTH_SECONDS:
                health_sent_at = time.time()
                yield telemetry.health_event()
            if ship and checkpoint.changed(min_interval=CHECKPOINT_SHIP_SECONDS):
                yield {"kind": "files", "files": transfer.read_files(out, transfer.RESUME_FILES)}
            if stop_sent_at is None and ray.get(board.should_stop.remote(spec.attempt_id)):
                os.killpg(child.pid, signal.SIGTERM)
                stop_sent_at = time.time()
            elif stop_sent_at is not None and time.time() - stop_sent_at > STOP_GRACE_SECONDS:
                os.killpg(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:            # the task itself is being torn down: let the trainer checkpoint
            os.killpg(child.pid, signal.SIGTERM)
            try:
                child.wait(STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)

    if ship:
        yield {"kind": "files", "files": transfer.read_outputs(out)}
    if telemetry is not None and (energy := telemetry.energy_event()) is not None:
        yield energy
    end_step = metrics.last_step
    if code == 0:
        result = AttemptResult("succeeded", code, None, end_step)
    elif code == EXIT_DIVERGED:
        result = AttemptResult("diverged", code, "loss became NaN or inf", end_step)
    elif stop_sent_at is not None:
        result = AttemptResult("interrupted", code, "stopped", end_step)
    elif code == -signal.SIGKILL:           # not ours: the out-of-memory killer, or a person; retried from the checkpoint
        result = AttemptResult("lost", code, f"{_exit_reason(code)}, possibly the out-of-memory killer", end_step)
    else:
        result = AttemptResult("failed", code, f"{_exit_reason(code)}: {log_tail(out / 'log')}", end_step)
    yield {"kind": "result", "result": result}


class _CheckpointWatch:
    """Whether checkpoints/last.pt changed since it was last sent (sent no more often than asked)."""

    def __init__(self, out: Path):
        self.path = out / "checkpoints" / "last.pt"
        self.sent = self._stamp()           # a checkpoint the task was handed is on the driver already
        self.sent_at = 0.0

    def _stamp(self):
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def changed(self, min_interval: float) -> bool:
        if time.time() - self.sent_at < min_interval:
            return False
        stamp = self._stamp()
        if stamp is None or stamp == self.sent:
            return False
        self.sent, self.sent_at = stamp, time.time()
        return True


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "a signal"
        return f"trainer killed by {name} (signal {-code})"
    return f"trainer exited {code}"


class RayWatch:
    """Notices a dead Ray at once. For a Ray this process started: its GCS server or raylet has exited. For a
    cluster the user named: its head's GCS port refuses connections several checks in a row."""

    def __init__(self, started_here: bool, address: str | None):
        self.started_here = started_here
        self.address = address
        self.down: str | None = None
        self._refused = 0
        self._stop = threading.Event()
        threading.Thread(target=self._watch, daemon=True, name="ray-watch").start()

    def _watch(self) -> None:
        while self.down is None and not self._stop.wait(RAY_WATCH_SECONDS):
            self.down = self._check()

    def close(self) -> None:
        self._stop.set()

    def _check(self) -> str | None:
        if self.started_here:
            from ray._private import worker
            node = worker._global_node
            if node is None:
                return None
            for kind, process in node.dead_processes():
                if kind in (ray_constants.PROCESS_TYPE_GCS_SERVER, ray_constants.PROCESS_TYPE_RAYLET):
                    return f"the local Ray died ({kind} {_exit_reason(process.returncode).replace('trainer ', '')})"
            return None
        host, _, port = (self.address or "").rpartition(":")
        if not host or not port.isdigit():
            return None
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            self._refused = 0
        except OSError as exc:
            self._refused += 1
            if self._refused >= GCS_UNREACHABLE_CHECKS:
                return f"the Ray cluster at {self.address} stopped answering ({exc})"
        return None


def _inputs(spec: AttemptSpec, out: Path) -> dict:
    """What the attempt's task reads where the driver's files are not: Ray objects it fetches only there."""
    upstream = {dir_field: ray.put(transfer.read_file(Path(folder), "", "artifact.pt"))
                for dir_field, folder in spec.upstream_dirs.items()}
    return {"mark": transfer.place_mark(out), "upstream": upstream, "driver_host": socket.gethostname(),
            "resume": ray.put(transfer.read_files(out, transfer.RESUME_FILES))}


class LocalBackend:
    """The `local` backend: this machine through a Ray it starts, or an existing Ray cluster."""

    name = "local"

    def __init__(self, ray_address: str | None = None, num_cpus: int | None = None):
        self.ray_address = ray_address or os.environ.get("RAY_ADDRESS")
        self.num_cpus = num_cpus
        self._board = None
        self._started_ray = False
        self._watch: RayWatch | None = None
        self._task = ray.remote(_attempt_task)

    @property
    def down(self) -> str | None:
        """Why the Ray under the run is gone, once it is (every attempt in flight then ends interrupted)."""
        return self._watch.down if self._watch is not None else None

    def start(self) -> None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if not ray.is_initialized():
            quiet = dict(logging_level=logging.ERROR, log_to_driver=False, include_dashboard=False,
                         configure_logging=True)
            if self.ray_address:
                ray.init(address=self.ray_address, runtime_env=transfer.code_runtime_env(), **quiet)
            else:
                # "local": a Ray of our own, even where another one runs (ray.init() alone would join it),
                # reachable from this machine only (unauthenticated, it would run anyone's code)
                with _loopback_only():
                    ray.init(address="local", num_cpus=self.num_cpus or os.cpu_count(), **quiet)
                self._started_ray = True
        # on the driver's own node: a board on a worker node would die with that node, and every attempt with it
        driver_node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self._board = StopBoard.options(scheduling_strategy=driver_node).remote()
        self._watch = RayWatch(self._started_ray, None if self._started_ray else ray.get_runtime_context().gcs_address)

    def resources(self) -> dict:
        return ray.cluster_resources()

    def never_fits(self, cpus: float, gpus: float) -> str | None:
        """Why no node of the Ray can ever hold one arm run of this size (None when one can). A Ray task runs
        on one node, so the largest node counts, not the cluster's sum."""
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        if any(node.get("CPU", 0) >= cpus and node.get("GPU", 0) >= gpus for node in nodes):
            return None
        largest = max(nodes, key=lambda node: (node.get("GPU", 0), node.get("CPU", 0)), default={})
        where = "this machine" if self._started_ray else f"the largest node of the Ray cluster at {self.ray_address}"
        return (f"each arm run asks for {cpus:g} CPUs and {gpus:g} GPUs (spec resources), but {where} has "
                f"{largest.get('CPU', 0):g} CPUs and {largest.get('GPU', 0):g} GPUs")

    def max_concurrent(self, cpus: float, gpus: float) -> int:
        """As many as the cluster's CPUs (and GPUs) hold, so no attempt waits inside Ray's queue."""
        resources = self.resources()
        slots = int(resources.get("CPU", 1) // cpus) or 1
        if gpus:
            slots = min(slots, int(resources.get("GPU", 0) // gpus) or 1)
        return slots

    def run_attempt(self, spec: AttemptSpec, emit: Emit, stop: threading.Event) -> AttemptResult:
        out = Path(spec.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        config = {**spec.config, **spec.upstream_dirs}
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        # max_retries=0: a task lost with its node ends this attempt; the scheduler retries the arm run as a new
        # attempt from the driver's copy of its checkpoint (Ray would rerun it from the inputs it was given)
        task = self._task.options(num_cpus=spec.cpus, num_gpus=spec.gpus, num_returns="streaming", max_retries=0)
        stream = task.remote(spec, self._board, _inputs(spec, out))
        done = threading.Event()
        threading.Thread(target=self._forward_stop, args=(spec.attempt_id, stop, done), daemon=True).start()
        result = AttemptResult("lost", None, "the Ray task ended without a result")
        unrecorded = None                   # why the driver could not take an event, once it could not
        try:
            for event in self._events(stream):
                if event["kind"] == "result":
                    result = event["result"]
                elif unrecorded is None or event["kind"] == "files":    # a stopped trainer's checkpoint too
                    try:
                        if event["kind"] == "files":
                            transfer.write_files(out, event["files"])
                        else:
                            emit(event)
                    except Exception as exc:
                        # The attempt cannot go on unrecorded. Stop its trainer (it checkpoints) and wait for the
                        # task to end, so the arm run's next attempt never runs beside it in the same folder.
                        unrecorded = unrecorded or f"{type(exc).__name__}: {str(exc)[:300]}"
                        ray.get(self._board.stop.remote(spec.attempt_id))
        except RayDown as exc:
            result = AttemptResult("interrupted", None, str(exc))
        except ray.exceptions.RayError as exc:
            if self.down:
                result = AttemptResult("interrupted", None, self.down)
            else:
                result = AttemptResult("lost", None, f"Ray task lost: {type(exc).__name__}: {str(exc)[:300]}")
        finally:
            done.set()
            (out / transfer.DRIVER_MARK).unlink(missing_ok=True)
        if unrecorded is not None:
            return AttemptResult("lost", result.exit_code, f"the orchestrator could not record an event of this "
                                 f"attempt ({unrecorded}); its trainer was stopped", result.end_step)
        return result

    def _events(self, stream):
        """The attempt task's events as they come; raises RayDown as soon as the Ray under the run is gone
        (a blocking read would wait for Ray's own timeouts, about a minute)."""
        while True:
            if stream.next_ready():
                try:
                    ref = next(stream)
                except StopIteration:
                    return
                yield ray.get(ref)
            elif stream.is_finished():
                return
            elif self.down:
                raise RayDown(self.down)
            else:
                time.sleep(0.1)

    def _forward_stop(self, attempt_id: int, stop: threading.Event, done: threading.Event) -> None:
        while not stop.wait(POLL_SECONDS):
            if done.is_set():
                return
        try:
            ray.get(self._board.stop.remote(attempt_id))
        except ray.exceptions.RayError:
            pass                    # Ray is shutting down: the trainer gets SIGTERM when its worker dies

    def shutdown(self) -> None:
        if self._watch is not None:
            self._watch.close()
        if self.down:
            # Ray's teardown, or ending its raylet, with the GCS gone can crash this process (SIGSEGV in Ray's
            # core worker): leave what is left of our Ray alone; its raylet ends by itself once it gives up on
            # the GCS, and the CLI leaves without Ray's exit handlers.
            return
        if self._started_ray and ray.is_initialized():
            ray.shutdown()


class RayDown(Exception):
    """The Ray under the run died while an attempt ran."""
