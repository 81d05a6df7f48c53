"""Watching one attempt on its host, from the supervisor's start to the pulled results and an outcome.

The watch knows no provider: what only the provider can say (is the host gone? is the budget
spent?) and do (give a host up) it asks its `HostOwner`, the backend. The loop polls the host
every `poll_seconds`: new metrics rows and GPU health become events, checkpoints are
pulled every few minutes. It ends when the supervisor reports the trainer's exit
(results are pulled, the outcome follows from the exit code), when `stop` is set or
the budget is spent (the trainer is SIGTERMed through the supervisor, checkpoints,
and is collected), or when the host is lost: gone at the provider, no heartbeat, or no contact for
`heartbeat_timeout_seconds` (outcome "preempted"; the owner gives the host up).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Protocol

from orchestrator.backends.base import AttemptResult, AttemptSpec, Emit
from orchestrator.backends.remote.attempt import News, RemoteAttempt, log_tail
from orchestrator.backends.remote.pool import PooledInstance
from orchestrator.backends.remote.settings import RuntimeSettings
from orchestrator.backends.remote.ssh import HostKeyChanged, SshError
from orchestrator.telemetry.gpu import NVIDIA_SMI_QUERY, parse_nvidia_smi_csv

EXIT_DIVERGED = 3          # trainers/common.py
EXIT_SIGTERM = 143
DRAIN_POLLS = 50           # at most this many extra polls to read what a finished trainer left


class HostOwner(Protocol):
    """What a watch asks of the backend that owns its host."""
    settings: RuntimeSettings

    def host_gone(self, instance: PooledInstance) -> str | None:
        """Why the host is gone for good (the provider says so), or None when it may still answer."""

    def stop_reason(self) -> str | None:
        """Why every arm must stop now (a spent budget), or None."""

    def silence_now(self) -> float | None:
        """The dead-man silence to write at each poll (what the budget still pays for), or None."""

    def lose_host(self, instance: PooledInstance, why: str) -> None:
        """Give up a host that failed an attempt: avoid it and take it out of service."""


class AttemptWatch:
    def __init__(self, owner: HostOwner, instance: PooledInstance, spec: AttemptSpec, gpus: list[int],
                 emit: Emit, stop: threading.Event):
        self.owner, self.cfg, self.instance = owner, owner.settings, instance
        self.spec, self.gpus, self.emit, self.stop = spec, gpus, emit, stop
        self.out_dir = Path(spec.out_dir)
        self.remote = RemoteAttempt(instance.conn, instance.paths, spec.attempt_id, self.out_dir, self.cfg)
        self.remote.silence_limit = owner.silence_now
        self.stop_reason: str | None = None
        self.adopting = False

    @property
    def last_step(self) -> int | None:
        return self.remote.last_step

    # ---- entry points ----

    def start_and_watch(self, code: str, python: str) -> AttemptResult:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        local_config = {**self.spec.config, **self.spec.upstream_dirs}
        (self.out_dir / "config.json").write_text(json.dumps(local_config, indent=2, sort_keys=True))
        with open(self.out_dir / "log", "a") as handle:
            handle.write(f"\n=== attempt {self.spec.attempt_id} on {self.instance.host_label} "
                         f"(GPU {','.join(map(str, self.gpus))}) at {time.ctime()} ===\n")
        self.remote.upload_inputs(self.spec.config, self.spec.upstream_dirs, self.spec.env)
        news = self.remote.start(code=code, python=python, trainer=self.spec.trainer, gpus=self.gpus,
                                 threads=max(1, int(self.spec.cpus)), health_command=self.health_command())
        self.announce(news)
        return self.watch(news)

    def adopt(self) -> AttemptResult:
        """Reattach to an attempt whose orchestrator died: keep watching, or collect, never start a second trainer."""
        self.adopting = True
        news = self.remote.poll()
        if news.exit is None and not news.alive:
            return AttemptResult("lost", reason=f"no supervisor is running for attempt {self.spec.attempt_id} on "
                                                f"{self.instance.host_label} and it left no exit status")
        self.announce(news)
        return self.watch(news)

    def health_command(self) -> list[str]:
        return list(NVIDIA_SMI_QUERY) + ["--id=" + ",".join(str(g) for g in self.gpus)]

    def announce(self, news: News) -> None:
        self.emit({"kind": "attempt", "host": self.instance.host_label, "hardware": self.instance.gpu_name,
                   "gpu_index": ",".join(str(g) for g in self.gpus), "pid": news.trainer_pid,
                   "instance_id": self.instance.ledger_id})
        self.emit({"kind": "state", "state": "running", "reason": None})

    # ---- the loop ----

    def watch(self, news: News) -> AttemptResult:
        last_contact = time.monotonic()
        next_pull = last_contact + self.cfg.pull_checkpoints_every_minutes * 60
        stop_sent_at: float | None = None
        while True:
            self.forward(news)
            if news.exit is not None:
                return self.finish(news)
            if not news.alive:
                gone = self.gone_soon()
                if gone:
                    return self.instance_lost(gone)
                return self.instance_lost("the supervisor died without an exit status", keep_instance=True)
            if news.heartbeat_at is not None and news.now - news.heartbeat_at > self.cfg.heartbeat_timeout_seconds:
                return self.instance_lost(f"no heartbeat for {news.now - news.heartbeat_at:.0f}s")
            now = time.monotonic()
            if stop_sent_at is None:
                reason = "stopped" if self.stop.is_set() else self.owner.stop_reason()
                if reason:
                    self.stop_reason = reason
                    self.remote.request_stop()
                    stop_sent_at = now
            elif now - stop_sent_at > self.cfg.stop_grace_seconds + 3 * self.cfg.poll_seconds:
                return self.finish(news, note="the trainer did not exit after SIGTERM")
            if now >= next_pull:
                self.remote.pull_checkpoint(news.checkpoint, self.catch_up)
                next_pull = now + self.cfg.pull_checkpoints_every_minutes * 60
            if stop_sent_at is None:
                self.stop.wait(self.cfg.poll_seconds)
            else:
                time.sleep(min(self.cfg.poll_seconds, 1.0))
            polled = self.poll(last_contact)
            if isinstance(polled, AttemptResult):
                return polled
            news, last_contact = polled, time.monotonic()

    def gone_soon(self) -> str | None:
        """Why the host is gone, asked a few times over a few polls: a provider reports a stopped or preempted
        instance some time after its processes died, and a dead supervisor alone is not a lost host."""
        deadline = time.monotonic() + 3 * self.cfg.poll_seconds
        while True:
            gone = self.owner.host_gone(self.instance)
            if gone or time.monotonic() >= deadline:
                return gone
            time.sleep(min(self.cfg.poll_seconds, 1.0))

    def poll(self, last_contact: float) -> News | AttemptResult:
        """The next news; on connection trouble ask the provider, and give up at a dead instance or a timeout."""
        while True:
            try:
                return self.remote.poll()
            except HostKeyChanged:
                raise
            except SshError as exc:
                gone = self.owner.host_gone(self.instance)
                if gone:
                    return self.instance_lost(gone)
                silent = time.monotonic() - last_contact
                if silent > self.cfg.heartbeat_timeout_seconds:
                    return self.instance_lost(f"no contact for {silent:.0f}s ({exc})")
                time.sleep(min(self.cfg.poll_seconds, 5.0))

    def catch_up(self) -> None:
        """Read and pass on what the instance has now (before a pulled checkpoint is accepted; see
        RemoteAttempt.pull_checkpoint). An exit it shows is read again by the next poll."""
        self.forward(self.remote.poll())

    def forward(self, news: News) -> None:
        if news.rows:
            self.emit({"kind": "metrics", "rows": news.rows})
        samples = []
        for record in news.health:
            samples += [s.to_dict() for s in parse_nvidia_smi_csv(record.get("csv", ""), self.instance.host_label,
                                                                   float(record.get("at") or time.time()))]
        if samples:
            self.emit({"kind": "health", "samples": samples})

    # ---- endings ----

    def finish(self, news: News, note: str | None = None) -> AttemptResult:
        self.emit({"kind": "state", "state": "collecting", "reason": None})
        for _ in range(DRAIN_POLLS):
            if not news.rows:
                break
            news = self.remote.poll()
            self.forward(news)
        self.remote.collect(news.checkpoint, self.catch_up)
        self.remote.remove()
        code = news.exit["exit_code"] if news.exit else None
        end_step = self.remote.last_step
        if code == 0:
            return AttemptResult("succeeded", code, None, end_step)
        if code == EXIT_DIVERGED:
            return AttemptResult("diverged", code, "loss became NaN or inf", end_step)
        if self.stop_reason is not None:
            reason = self.stop_reason + (f" ({note})" if note else "")
            outcome = "cancelled" if self.stop_reason.startswith("budget") else "interrupted"
            return AttemptResult(outcome, code, reason, end_step)
        if code == EXIT_SIGTERM:
            return AttemptResult("preempted", code, "the trainer was terminated (SIGTERM) without a stop request",
                                 end_step)
        return AttemptResult("failed", code, f"trainer exited {code}: {log_tail(self.out_dir / 'log')}", end_step)

    def instance_lost(self, why: str, keep_instance: bool = False) -> AttemptResult:
        """The attempt cannot go on: preempted (lost when adopting); a dead host is given up and avoided."""
        if not keep_instance:
            self.owner.lose_host(self.instance, why)
        outcome = "lost" if self.adopting or keep_instance else "preempted"
        return AttemptResult(outcome, None, why, self.remote.last_step)
