"""The `ssh` backend: arms on machines you already have, packed by GPU, on the same runtime as rented ones.

    backend = SshBackend(ledger, run_id, run_dir, cfg)
    backend.start()                          # code bundle; every host logged into (key pinned), cleaned, helper up
    backend.run_attempt(spec, emit, stop)    # from one scheduler thread per attempt
    backend.shutdown()                       # every armature process on every host stopped, scratch folders removed

The remote-host runtime (../remote/) does the work: deploy once per host and code version, the supervisor,
polling, pull-back of checkpoints and results. A host that goes away (no contact for
`heartbeat_timeout_seconds`) is taken out of service: its arms end `preempted` and the scheduler runs them again
on another host from their last pulled checkpoint. The host is tried again every `rejoin_seconds`; when it
answers, what armature left there is stopped and it takes arms again. Nothing is billed.
"""

from __future__ import annotations

import atexit
import logging
import math
import shutil
import threading
import time
from pathlib import Path

from orchestrator.backends.base import AttemptResult, AttemptSpec, Emit
from orchestrator.backends.remote.deploy import CodeBundle, DeployError, deploy_code, deploy_record, make_code_bundle
from orchestrator.backends.remote.pool import InstancePool, NoHostLeft, PoolClosed, PooledInstance
from orchestrator.backends.remote.ssh import SshError
from orchestrator.backends.remote.watch import AttemptWatch
from orchestrator.backends.ssh.config import SshConfig, SshHost
from orchestrator.backends.ssh.provider import HostRefused, SshHosts
from orchestrator.errors import UserError
from orchestrator.ledger import Ledger
from orchestrator.paths import REPO_ROOT

log = logging.getLogger(__name__)


class SshBackend:
    name = "ssh"

    def __init__(self, ledger: Ledger, run_id: str, run_dir: str | Path, cfg: SshConfig, allow_dirty: bool = False,
                 repo_root: str | Path = REPO_ROOT):
        self.ledger, self.run_id, self.run_dir, self.cfg = ledger, run_id, Path(run_dir), cfg
        self.allow_dirty, self.repo_root = allow_dirty, Path(repo_root)
        self.provider = SshHosts(ledger, run_id, cfg, self.repo_root)
        self.settings = cfg.runtime(cfg.hosts[0], run_id)       # the timings (folders are per host)
        self.pool = InstancePool("ssh", grows=False)
        self.bundle: CodeBundle | None = None
        self.away: dict[str, str] = {}          # host name -> why it is out of service (tried again later)
        self.refused: dict[str, str] = {}       # host name -> why it is never used in this run
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._rejoin_thread: threading.Thread | None = None
        self._started = self._shut_down = False

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self.bundle = make_code_bundle(self.repo_root, self.deploy_dir, self.allow_dirty)
        self._started = True
        atexit.register(self.shutdown)
        threads = [threading.Thread(target=self._join, args=(host, self.cfg.ssh_timeout_seconds), daemon=True)
                   for host in self.cfg.hosts]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if not self.pool.idle():
            problems = "; ".join(f"{name}: {why}" for name, why in {**self.refused, **self.away}.items())
            self.shutdown()
            raise UserError(f"no ssh host could be used: {problems}")
        self.ledger.event(self.run_id, "ssh.start", commit=self.bundle.commit, diff_hash=self.bundle.diff_hash,
                          hosts=[i.provider_id for i in self.pool.idle()], away=self.away, refused=self.refused)
        self._rejoin_thread = threading.Thread(target=self._rejoin_away_hosts, name="ssh-rejoin", daemon=True)
        self._rejoin_thread.start()

    @property
    def deploy_dir(self) -> Path:
        return self.run_dir / ".ssh" / "deploy"

    def _join(self, host: SshHost, wait_seconds: float) -> bool:
        """Bring a host into service; False (and noted as away or refused) when it cannot be."""
        try:
            reached = self.provider.reach(host, time.monotonic() + wait_seconds)
        except HostRefused as exc:
            log.error("%s", exc)
            with self._lock:
                self.refused[host.name] = str(exc)
                self.away.pop(host.name, None)
            return False
        except (SshError, OSError) as exc:
            with self._lock:
                self.away[host.name] = f"unreachable: {exc}"[:300]
            return False
        if self._closing.is_set():
            reached.conn.close()
            return False
        instance = PooledInstance(num_gpus=host.gpus, max_arms=host.arms_at_once, provider="ssh",
                                  provider_id=host.name, gpu_name=None, conn=reached.conn, paths=reached.paths)
        with self._lock:
            self.away.pop(host.name, None)
        self.pool.adopt(instance)
        self.ledger.event(self.run_id, "ssh.host_ready", host=host.name, scratch=reached.paths.base,
                          host_key=reached.host.host_key)
        return True

    def shutdown(self) -> None:
        """Stop every armature process of this run on every host and remove its scratch folders, confirmed."""
        with self._lock:
            if self._shut_down or not self._started:
                return
            self._shut_down = True
        self._closing.set()
        for instance in self.pool.close():
            if instance.conn is not None:
                instance.conn.close()
        for host in self.cfg.hosts:
            if host.name in self.refused:
                continue
            problem = self.provider.clean(host.name)
            if problem is not None:
                log.warning("host %s: could not stop armature and remove its scratch folder (%s); its dead-man "
                            "switch does so after %.0fs without contact", host.name, problem,
                            self.cfg.orchestrator_silence_seconds)
                self.ledger.event(self.run_id, "ssh.clean_failed", host=host.name, detail=problem[:500])
        shutil.rmtree(self.deploy_dir, ignore_errors=True)
        atexit.unregister(self.shutdown)

    # ---- attempts ------------------------------------------------------------------------------

    def max_concurrent(self, cpus: float, gpus: float) -> int:
        return sum(host.arms_at_once for host in self.cfg.hosts)

    def run_attempt(self, spec: AttemptSpec, emit: Emit, stop: threading.Event) -> AttemptResult:
        if spec.adopt:
            return AttemptResult("interrupted", reason="the orchestrator died; this run's processes on the hosts "
                                                       "were stopped when it resumed (it goes on from the last "
                                                       "pulled checkpoint)")
        try:
            return self._run(spec, emit, stop)
        except PoolClosed as exc:
            return AttemptResult("interrupted", reason=str(exc))
        except Exception as exc:            # a bug or an unforeseen answer: report, never raise
            log.exception("ssh attempt %s failed", spec.attempt_id)
            return AttemptResult("failed", reason=f"ssh backend error: {type(exc).__name__}: {exc}"[:500])

    def _run(self, spec: AttemptSpec, emit: Emit, stop: threading.Event) -> AttemptResult:
        most = max(host.gpus for host in self.cfg.hosts)
        wanted = math.ceil(spec.gpus) if most else 0        # no host has a GPU: the arms run on CPUs (as local)
        if wanted > most:
            return AttemptResult("failed", reason=f"the arm asks for {spec.gpus:g} GPUs; the largest ssh host has "
                                                  f"{most} (set resources.gpus, or ssh.hosts[].gpus)")
        emit({"kind": "state", "state": "provisioning", "reason": None})
        claimed = self._claim(spec.attempt_id, wanted, stop)
        if isinstance(claimed, AttemptResult):
            return claimed
        instance, gpus = claimed
        watch = None
        try:
            emit({"kind": "state", "state": "deploying", "reason": None})
            code, python = self._prepare(instance)
            if stop.is_set():
                return AttemptResult("interrupted", reason="stopped before the trainer started")
            watch = AttemptWatch(self, instance, spec, gpus, emit, stop)
            return watch.start_and_watch(code, python)
        except DeployError as exc:
            return AttemptResult("failed", reason=f"host {instance.provider_id}: {exc}"[:2000])
        except SshError as exc:
            self.lose_host(instance, f"unreachable: {exc}")
            return AttemptResult("preempted", reason=f"host {instance.provider_id} went away: {exc}"[:500],
                                 end_step=watch.last_step if watch else None)
        finally:
            self.pool.release(instance, spec.attempt_id)

    def _claim(self, attempt_id: int, wanted: int, stop: threading.Event):
        """A host with room; while every host is away, wait `heartbeat_timeout_seconds` for one to come back."""
        waited_since = None
        while True:
            try:
                claimed = self.pool.claim(attempt_id, wanted, 0, 0, None, stop)
            except NoHostLeft as exc:
                waited_since = waited_since or time.monotonic()
                if time.monotonic() - waited_since > self.cfg.heartbeat_timeout_seconds:
                    with self._lock:
                        why = "; ".join(f"{name}: {reason}" for name, reason in self.away.items())
                    return AttemptResult("lost", reason=f"{exc}: {why}"[:500])
                if stop.wait(min(1.0, self.cfg.rejoin_seconds)):
                    return AttemptResult("interrupted", reason="stopped while waiting for a host")
                continue
            if claimed is None:
                return AttemptResult("interrupted", reason="stopped while waiting for a host")
            instance, gpus, _ = claimed
            return instance, gpus

    def _prepare(self, instance: PooledInstance) -> tuple[str, str]:
        """Deploy this run's code version on the host once (other attempts wait for it)."""
        host = self.provider.hosts[instance.provider_id]
        with instance.prepare_lock:
            version = self.bundle.version
            if version not in instance.deployed:
                code, python = deploy_code(instance.conn, instance.paths, self.bundle, self.settings, host.python)
                instance.deployed[version] = (code, python)
                self.ledger.event(self.run_id, "ssh.deploy", host=host.name, **deploy_record(self.bundle, python))
            return instance.deployed[version]

    # ---- what the remote-host runtime asks (remote.watch.HostOwner) ----

    def host_gone(self, instance: PooledInstance) -> str | None:
        return None             # no provider can tell: a host is gone when it stays silent (heartbeat timeout)

    def stop_reason(self) -> str | None:
        return None             # nothing is billed: no budget stops an arm

    def silence_now(self) -> float | None:
        return None

    def lose_host(self, instance: PooledInstance, why: str) -> None:
        if not self.pool.retire(instance):
            return
        if instance.conn is not None:
            instance.conn.close()
        with self._lock:
            self.away[instance.provider_id] = why[:300]
        self.ledger.event(self.run_id, "ssh.host_lost", host=instance.provider_id, reason=why[:500])
        log.warning("ssh host %s went away (%s); its arms resume on other hosts", instance.provider_id, why)

    def _rejoin_away_hosts(self) -> None:
        while not self._closing.wait(self.cfg.rejoin_seconds):
            with self._lock:
                away = [self.provider.hosts[name] for name in self.away]
            for host in away:
                if self._closing.is_set():
                    return
                if self._join(host, 0.0):
                    log.warning("ssh host %s is back", host.name)
