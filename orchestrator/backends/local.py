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
(orchestrator/backends/transfer.py).

Stopping: the driver marks the attempt in a small `StopBoard` actor; the task
sees it within half a second, sends SIGTERM to the trainer's process group
(the trainer checkpoints and exits 143) and reports the outcome.
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

from orchestrator.backends import transfer
from orchestrator.backends.base import AttemptResult, AttemptSpec, Emit
from orchestrator.metrics_tail import JsonlTail, log_tail
from orchestrator.paths import REPO_ROOT
from orchestrator.procs import process_start_time

EXIT_DIVERGED = 3                      # trainers/common.py: the trainer contract
STOP_GRACE_SECONDS = 120               # a trainer gets this long to checkpoint after SIGTERM
POLL_SECONDS = 1.0                     # metrics and stop requests; a trainer that exits is seen at once
CHECKPOINT_SHIP_SECONDS = 5.0          # a node without the driver's files sends a new checkpoint at most this often


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
        yield from _run_trainer(spec, board, out, ship=not shared)
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


def _run_trainer(spec: AttemptSpec, board, out: Path, ship: bool):
    gpu_ids = [str(g) for g in ray.get_gpu_ids()]
    env = {**os.environ, **spec.env,
           "CUDA_VISIBLE_DEVICES": ",".join(gpu_ids),
           "OMP_NUM_THREADS": str(max(1, int(spec.cpus))),
           "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONUNBUFFERED": "1"}
    with open(out / "log", "ab") as log:
        log.write(f"\n=== attempt {spec.attempt_id} on {socket.gethostname()} at {time.ctime()} ===\n".encode())
        log.flush()
        child = subprocess.Popen(
            [sys.executable, "-m", f"trainers.{spec.trainer}", "--config", str(out / "config.json"), "--out", str(out)],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent)
    yield {"kind": "attempt", "pid": child.pid, "pid_start_time": process_start_time(child.pid),
           "host": socket.gethostname(), "ray_node": ray.get_runtime_context().get_node_id(),
           "hardware": _hardware(gpu_ids), "gpu_index": ",".join(gpu_ids) or None}
    yield {"kind": "state", "state": "running", "reason": None}

    metrics = JsonlTail(out / "metrics.jsonl")
    checkpoint = _CheckpointWatch(out)
    stop_sent_at = None
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


def _inputs(spec: AttemptSpec, out: Path) -> dict:
    """What the attempt's task reads where the driver's files are not: Ray objects it fetches only there."""
    upstream = {dir_field: ray.put(transfer.read_file(Path(folder), "", "artifact.pt"))
                for dir_field, folder in spec.upstream_dirs.items()}
    return {"mark": transfer.place_mark(out), "upstream": upstream,
            "resume": ray.put(transfer.read_files(out, transfer.RESUME_FILES))}


class LocalBackend:
    """The `local` backend: this machine through a Ray it starts, or an existing Ray cluster."""

    name = "local"

    def __init__(self, ray_address: str | None = None, num_cpus: int | None = None):
        self.ray_address = ray_address or os.environ.get("RAY_ADDRESS")
        self.num_cpus = num_cpus
        self._board = None
        self._started_ray = False
        self._task = ray.remote(_attempt_task)

    def start(self) -> None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if not ray.is_initialized():
            quiet = dict(logging_level=logging.ERROR, log_to_driver=False, include_dashboard=False,
                         configure_logging=True)
            if self.ray_address:
                ray.init(address=self.ray_address, **quiet)
            else:
                # "local": a Ray of our own, even where another one runs (ray.init() alone would join it),
                # reachable from this machine only (unauthenticated, it would run anyone's code)
                with _loopback_only():
                    ray.init(address="local", num_cpus=self.num_cpus or os.cpu_count(), **quiet)
                self._started_ray = True
        self._board = StopBoard.remote()

    def resources(self) -> dict:
        return ray.cluster_resources()

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
        task = self._task.options(num_cpus=spec.cpus, num_gpus=spec.gpus, num_returns="streaming")
        stream = task.remote(spec, self._board, _inputs(spec, out))
        done = threading.Event()
        threading.Thread(target=self._forward_stop, args=(spec.attempt_id, stop, done), daemon=True).start()
        result = AttemptResult("lost", None, "the Ray task ended without a result")
        unrecorded = None                   # why the driver could not take an event, once it could not
        try:
            for ref in stream:
                event = ray.get(ref)
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
        except ray.exceptions.RayError as exc:
            result = AttemptResult("lost", None, f"Ray task lost: {type(exc).__name__}: {str(exc)[:300]}")
        finally:
            done.set()
            (out / transfer.DRIVER_MARK).unlink(missing_ok=True)
        if unrecorded is not None:
            return AttemptResult("lost", result.exit_code, f"the orchestrator could not record an event of this "
                                 f"attempt ({unrecorded}); its trainer was stopped", result.end_step)
        return result

    def _forward_stop(self, attempt_id: int, stop: threading.Event, done: threading.Event) -> None:
        while not stop.wait(POLL_SECONDS):
            if done.is_set():
                return
        try:
            ray.get(self._board.stop.remote(attempt_id))
        except ray.exceptions.RayError:
            pass                    # Ray is shutting down: the trainer gets SIGTERM when its worker dies

    def shutdown(self) -> None:
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
