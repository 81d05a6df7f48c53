"""What every backend implements, and the events an attempt reports while it runs.

The scheduler calls `Backend.run_attempt(spec, emit, stop)` in a thread of its
own for every attempt. The call blocks until the attempt has ended and reports
progress through `emit(event)`; the scheduler turns events into ledger rows,
progress lines and metrics. Setting `stop` asks the attempt to end early: the
trainer gets SIGTERM, checkpoints, and (remotely) the checkpoint is pulled back.

Events are plain dicts with a "kind":
  {"kind": "state", "state": "provisioning"|"deploying"|"running"|"collecting", "reason": str|None}
  {"kind": "attempt", <attempts-table columns>: host, hardware, gpu_index, pid, pid_start_time, instance_id}
  {"kind": "metrics", "rows": [ {"step": int, "time": float, ...}, ... ]}     # new metrics.jsonl lines
  {"kind": "health", "samples": [GpuSample as dict, ...]}                     # GPU health where the arm runs
      optional "host": str, "host_memory_ratio": float                        # that host's memory in use (0..1)
  {"kind": "energy", "joules": float}          # the attempt's energy, read on another host than the driver's
  {"kind": "event", "event": "watchdog.breach"|..., **detail}                  # a ledger event
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol

Emit = Callable[[dict], None]

Outcome = Literal["succeeded", "failed", "diverged", "interrupted", "preempted", "lost", "cancelled"]


@dataclass
class AttemptSpec:
    """Everything needed to run one attempt of one arm run."""
    run_id: str
    arm_run_id: int
    attempt_id: int
    arm: str
    seed: int
    trainer: str                       # module name under trainers/
    config: dict                       # the trainer's resolved config, without upstream dirs
    out_dir: str                       # local folder of this arm run (checkpoints/last.pt here = resume point)
    gpus: float = 0.0                  # GPUs wanted (fractions allowed)
    cpus: float = 1.0
    gpu_memory_gb: float | None = None
    upstream_dirs: dict[str, str] = field(default_factory=dict)  # config key to set (e.g. tokenizer_dir) -> local
                                                                 # folder of that upstream run (artifact.pt inside)
    env: dict[str, str] = field(default_factory=dict)            # extra environment for the trainer
    adopt: bool = False                # the attempt row exists from an orchestrator that died: reattach if alive


@dataclass
class AttemptResult:
    outcome: Outcome
    exit_code: int | None = None
    reason: str | None = None
    end_step: int | None = None


class Backend(Protocol):
    name: str

    def start(self) -> None:
        """Acquire what the backend needs for a run (a Ray runtime, an API client)."""

    def max_concurrent(self, cpus: float, gpus: float) -> int | None:
        """How many attempts of this size can run at once (None: no limit known)."""

    def run_attempt(self, spec: AttemptSpec, emit: Emit, stop: threading.Event) -> AttemptResult:
        """Run one attempt to its end; blocks. Must return (not raise) for trainer failures."""

    def shutdown(self) -> None:
        """Release everything, confirmed (for rented instances: destroyed and confirmed gone)."""
