"""The `vast` backend: arms on rented Vast.ai instances, packed one per GPU, instances reused, teardown confirmed.

    backend = VastBackend(ledger, run_id, run_dir, cfg, budget_dollars)
    backend.start()                                     # API client, SSH key, code bundle, instances of a resumed run
    backend.run_attempt(spec, emit, stop)               # from one scheduler thread per attempt
    backend.shutdown()                                  # every instance destroyed and confirmed (also atexit)

An attempt claims GPUs from the pool (pool.py), launching an instance when none
has room (provider.py: cheapest reliable offer, readiness deadline, a bounded
number of offers), deploys the code once per instance (deploy.py), then runs and
watches the trainer (watch.py). Instances are labelled `armature:<ledger id>:<run_id>:<id
of the attempt that launched it>:<ledger row id>` (provider.py); one reused for later arms
keeps that first label.
"""

from __future__ import annotations

import atexit
import logging
import math
import shlex
import shutil
import threading
import time
from pathlib import Path

from orchestrator.backends.base import AttemptResult, AttemptSpec, Emit
from orchestrator.backends.vast import offers as offer_rules
from orchestrator.backends.vast import provider
from orchestrator.backends.vast.config import VastConfig
from orchestrator.backends.remote.deploy import (CodeBundle, DeployError, deploy_code, deploy_record,
                                                 install_helper_and_watchdog, make_code_bundle, resolve_paths)
from orchestrator.backends.remote.pool import InstancePool, PoolClosed, PooledInstance
from orchestrator.backends.remote.ssh import Connection, HostKeyChanged, KeyPair, SshError, load_or_create_keypair
from orchestrator.backends.remote.watch import AttemptWatch
from orchestrator.backends.vast.boot import boot_watchdog_onstart
from orchestrator.backends.vast.reap import reap_keys
from orchestrator.backends.vast.budget import Budget, BudgetRefused
from orchestrator.errors import UserError
from orchestrator.ledger import Ledger
from orchestrator.paths import REPO_ROOT
from orchestrator.telemetry.gpu import NVIDIA_SMI_QUERY, parse_nvidia_smi_csv

log = logging.getLogger(__name__)


class VastBackend:
    name = "vast"

    def __init__(self, ledger: Ledger, run_id: str, run_dir: str | Path, cfg: VastConfig,
                 budget_dollars: float | None, allow_dirty: bool = False, repo_root: str | Path = REPO_ROOT):
        self.ledger, self.run_id, self.run_dir, self.cfg = ledger, run_id, Path(run_dir), cfg
        self.budget = Budget(ledger, run_id, budget_dollars, cfg)
        self.allow_dirty, self.repo_root = allow_dirty, Path(repo_root)
        self.client = None
        self.key: KeyPair | None = None
        self.bundle: CodeBundle | None = None
        self.pool = InstancePool("vast")
        self.settings = cfg.runtime                # what the remote-host runtime reads
        self.excluded_machines: set[str] = set()
        self._offers_in_flight: set[str] = set()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._idle_thread: threading.Thread | None = None
        self._shut_down = False

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Ready to run attempts. A failure leaves nothing behind for a run the ledger does not have yet (so the
        same command can simply run again) and the run as it was for one it has (so `resume` works); an API that
        does not answer within its deadline is reported as such, without a traceback."""
        try:
            self._start()
        except BaseException as exc:
            self._undo_start()
            if isinstance(exc, provider.ProviderError):
                again = (f"`armature resume {self.run_id}` tries again" if self._run_recorded()
                         else "nothing was rented or recorded; run the same command again")
                raise UserError(f"the Vast API did not answer while starting run {self.run_id}: {exc}; "
                                f"{again}") from None
            raise

    def _run_recorded(self) -> bool:
        return self.ledger.query_one("SELECT 1 AS x FROM runs WHERE run_id=?", (self.run_id,)) is not None

    def _undo_start(self) -> None:
        """After a failed start: no trace of a run not yet created."""
        self._closing.set()
        shutil.rmtree(self.run_dir / ".vast" / "deploy", ignore_errors=True)
        if not self._run_recorded():
            shutil.rmtree(self.run_dir / ".vast", ignore_errors=True)
            try:
                self.run_dir.rmdir()                  # only when empty: never anything the user put there
            except OSError:
                pass

    def _start(self) -> None:
        self.client = provider.make_client(self.cfg.server_url)
        self.bundle = make_code_bundle(self.repo_root, self.run_dir / ".vast" / "deploy", self.allow_dirty,
                                       secrets=(provider.api_key_of(self.client),))
        self.key = load_or_create_keypair(self.run_dir / ".vast" / "id_ed25519",
                                          comment=provider.key_comment(self.ledger.identity(), self.run_id))
        # The key is attached to each instance (provider.launch), never to the account; account keys left by
        # older versions' runs that crashed go now.
        reap_keys(self.client, self.ledger, cfg=self.cfg, starting_run=self.run_id)
        self.ledger.event(self.run_id, "vast.start", commit=self.bundle.commit, diff_hash=self.bundle.diff_hash)
        atexit.register(self.shutdown)
        self._adopt_ledger_instances()
        self._idle_thread = threading.Thread(target=self._destroy_idle_instances, name="vast-idle", daemon=True)
        self._idle_thread.start()

    def shutdown(self) -> None:
        """Destroy every instance of this backend, confirmed."""
        with self._lock:
            if self._shut_down or self.client is None:
                return
            self._shut_down = True
        self._closing.set()
        instances = self.pool.close()
        threads = [threading.Thread(target=self._destroy, args=(i, "run finished"), daemon=True)
                   for i in instances]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        leftovers = self.ledger.live_instances(self.run_id)
        for row in leftovers:           # launched by an attempt that has not noticed the shutdown yet
            provider.terminate(self.client, self.ledger, self.cfg, row["id"], reason="run finished")
        shutil.rmtree(self.run_dir / ".vast" / "deploy", ignore_errors=True)
        if not self.ledger.live_instances(self.run_id):     # nothing left to reach: the run's key can go
            (self.run_dir / ".vast" / "id_ed25519").unlink(missing_ok=True)
        atexit.unregister(self.shutdown)

    # ---- attempts ------------------------------------------------------------------------------

    def max_concurrent(self, cpus: float, gpus: float) -> int:
        """Attempts at once: as many as `max_instances` instances hold. The pool counts the instances
        themselves (an arm that finds none with room waits while max_instances are rented)."""
        return self.cfg.max_instances * self.cfg.max_arms_per_instance

    def run_attempt(self, spec: AttemptSpec, emit: Emit, stop: threading.Event) -> AttemptResult:
        try:
            if spec.adopt:
                return self._adopt_attempt(spec, emit, stop)
            return self._run_new_attempt(spec, emit, stop)
        except PoolClosed as exc:
            return AttemptResult("interrupted", reason=str(exc))
        except Exception as exc:            # a bug or an unforeseen provider answer: report, never raise
            log.exception("vast attempt %s failed", spec.attempt_id)
            return AttemptResult("failed", reason=f"vast backend error: {type(exc).__name__}: {exc}"[:500])

    def _run_new_attempt(self, spec: AttemptSpec, emit: Emit, stop: threading.Event) -> AttemptResult:
        wanted = max(1, math.ceil(spec.gpus))
        if wanted > self.cfg.num_gpus:
            return AttemptResult("failed", reason=f"the arm asks for {spec.gpus:g} GPUs; vast.num_gpus is "
                                                  f"{self.cfg.num_gpus} (raise it)")
        emit({"kind": "state", "state": "provisioning", "reason": None})
        obtained = self._obtain(spec, wanted, stop)
        if isinstance(obtained, AttemptResult):
            return obtained
        instance, gpus = obtained
        watch = None
        try:
            emit({"kind": "state", "state": "deploying", "reason": None})
            code, python = self._prepare(instance)
            if stop.is_set():
                return AttemptResult("interrupted", reason="stopped before the trainer started")
            watch = AttemptWatch(self, instance, spec, gpus, emit, stop)
            return watch.start_and_watch(code, python)
        except DeployError as exc:
            self.retire(instance, f"deploy failed: {exc}")
            return AttemptResult("failed", reason=str(exc)[:2000])
        except SshError as exc:
            return self.classify_ssh_failure(instance, exc, watch)
        except BaseException as exc:
            # Unforeseen: the trainer's state is unknown, so its instance must not run anything else.
            self.retire(instance, f"attempt {spec.attempt_id} ended by {type(exc).__name__}")
            raise
        finally:
            self._release(instance, spec.attempt_id)

    def _adopt_attempt(self, spec: AttemptSpec, emit: Emit, stop: threading.Event) -> AttemptResult:
        row = self.ledger.query_one("SELECT instance_id, gpu_index, pid FROM attempts WHERE id=?", (spec.attempt_id,))
        # The orchestrator died before the attempt's trainer started (its instance booting, destroyed at start):
        # nothing of the arm was lost, and the orchestrator's death must not use up max_attempts.
        if row is None or row["instance_id"] is None:
            return AttemptResult("interrupted", reason="the orchestrator stopped before this attempt had an instance")
        instance = self.pool.find(row["instance_id"])
        if instance is None and row["pid"] is None:
            return AttemptResult("interrupted", reason=f"the orchestrator stopped before its trainer started; its "
                                                       f"instance (ledger id {row['instance_id']}) is gone")
        if instance is None:
            return AttemptResult("lost", reason=f"its instance (ledger id {row['instance_id']}) is gone")
        gpus = self.pool.hold(instance, spec.attempt_id,
                              [int(g) for g in (row["gpu_index"] or "0").split(",") if g.strip()])
        watch = AttemptWatch(self, instance, spec, gpus, emit, stop)
        try:
            return watch.adopt()
        except SshError as exc:
            return self.classify_ssh_failure(instance, exc, watch, adopting=True)
        finally:
            self._release(instance, spec.attempt_id)

    def classify_ssh_failure(self, instance: PooledInstance, exc: SshError, watch, adopting: bool = False):
        """An instance we cannot talk to is destroyed: gone or dying = preempted (lost when adopting), else lost."""
        if isinstance(exc, HostKeyChanged):
            self.ledger.event(self.run_id, "instance.host_key_changed", instance_id=instance.ledger_id,
                              detail=str(exc))
            self.retire(instance, str(exc))
            return AttemptResult("lost", reason=str(exc), end_step=watch.last_step if watch else None)
        status = self.provider_status(instance)
        end_step = watch.last_step if watch else None
        if status in ("gone",) + provider.TERMINAL_STATUSES:
            self.exclude_machine(instance)
            self.retire(instance, f"instance {instance.provider_id} is {status}")
            outcome = "lost" if adopting else "preempted"
            return AttemptResult(outcome, reason=f"instance {instance.provider_id} is {status}: {exc}"[:500],
                                 end_step=end_step)
        self.exclude_machine(instance)
        self.retire(instance, f"unreachable over SSH: {exc}")
        return AttemptResult("lost", reason=f"instance {instance.provider_id} unreachable: {exc}"[:500],
                             end_step=end_step)

    # ---- getting an instance -------------------------------------------------------------------

    def _obtain(self, spec: AttemptSpec, wanted: int, stop: threading.Event):
        max_arms = self.cfg.max_arms_per_instance
        spent = self.budget.exhausted()
        if spent:
            return AttemptResult("cancelled", reason=spent)
        for _ in range(self.cfg.max_launch_tries):
            claimed = self.pool.claim(spec.attempt_id, wanted, self.cfg.num_gpus, max_arms, self.cfg.max_instances,
                                      stop)
            if claimed is None:
                return AttemptResult("interrupted", reason="stopped while waiting for an instance")
            instance, gpus, must_launch = claimed
            if must_launch:
                try:
                    self._launch(instance, spec, stop)
                except BudgetRefused as exc:
                    self.pool.mark_failed(instance, str(exc))
                    return AttemptResult("cancelled", reason=str(exc))
                except provider.LaunchCancelled as exc:
                    self.pool.mark_failed(instance, str(exc))
                    return AttemptResult("interrupted", reason=str(exc))
                except (provider.LaunchFailed, provider.ProviderError, SshError) as exc:
                    self.pool.mark_failed(instance, str(exc))
                    return AttemptResult("failed", reason=f"no instance could be rented: {exc}"[:2000])
                except BaseException as exc:
                    self.pool.mark_failed(instance, repr(exc))
                    raise
                self.pool.mark_ready(instance)
                return instance, gpus
            while not instance.ready.wait(0.5):
                if stop.is_set():
                    break
            if instance.state == "ready" and not stop.is_set():
                return instance, gpus
            self.pool.release(instance, spec.attempt_id)
            if stop.is_set():
                return AttemptResult("interrupted", reason="stopped while waiting for an instance")
        return AttemptResult("failed", reason=f"no instance became available after {self.cfg.max_launch_tries} tries")

    def _launch(self, instance: PooledInstance, spec: AttemptSpec, stop: threading.Event) -> None:
        failures: list[str] = []
        label = provider.instance_label(self.ledger.identity(), self.run_id, spec.attempt_id)
        for _ in range(self.cfg.max_launch_tries):
            if stop.is_set() or self._closing.is_set():
                raise provider.LaunchCancelled("stopped before an instance was rented")
            found = provider.search_offers(self.client, self.cfg)
            # Offers another attempt is renting right now go last, not away (404 tells); picked and marked under
            # one lock, or concurrent launches all pick the cheapest offer.
            with self._lock:
                excluded = set(self.excluded_machines)
                ranked = offer_rules.rank(found, excluded, set(self._offers_in_flight)) or offer_rules.rank(
                    found, excluded)
                if not ranked:
                    raise provider.LaunchFailed("no offer matches the vast: query" + _tried(failures))
                affordable = [o for o in ranked if self.budget.launch_refusal(float(o["dph_total"])) is None]
                if not affordable:
                    raise BudgetRefused(self.budget.launch_refusal(float(ranked[0]["dph_total"]))
                                        or "budget: no offer fits under the cap")
                offer = affordable[0]
                self._offers_in_flight.add(str(offer["id"]))
            try:
                self._launch_offer(instance, offer, label, stop)
                return
            except provider.OfferGone as exc:
                failures.append(f"offer {offer['id']}: gone ({exc.status})")
            except provider.LaunchFailed as exc:
                failures.append(str(exc))
                with self._lock:
                    self.excluded_machines.add(str(offer.get("machine_id")))
            finally:
                with self._lock:
                    self._offers_in_flight.discard(str(offer["id"]))
        raise provider.LaunchFailed(f"{self.cfg.max_launch_tries} offers tried" + _tried(failures))

    def _launch_offer(self, instance: PooledInstance, offer: dict, label: str, stop: threading.Event) -> None:
        env = {"VAST_SERVER_URL": self.cfg.server_url} if self.cfg.server_url else {}
        ledger_id, silence = self.budget.admit(float(offer["dph_total"]), lambda: provider.record_intent(
            self.ledger, run_id=self.run_id, offer=offer, label=label))
        ledger_id = provider.launch(self.client, self.ledger, self.cfg, run_id=self.run_id, offer=offer, label=label,
                                    public_key=self.key.public_line, env=env, instance_id=ledger_id,
                                    onstart=boot_watchdog_onstart(self.cfg, silence))
        self.ledger.event(self.run_id, "instance.dead_man_switch", instance_id=ledger_id,
                          silence_seconds=round(silence, 1))
        row = self.ledger.instance(ledger_id)
        instance.ledger_id, instance.provider_id = ledger_id, row["provider_instance_id"]
        instance.machine_id, instance.gpu_name = str(offer.get("machine_id")), offer.get("gpu_name")
        try:
            host, port, host_key = provider.wait_ready(self.client, self.ledger, self.cfg, ledger_id, self.key, stop)
            if instance.state == "retired" or self._closing.is_set():
                raise provider.LaunchCancelled("the backend shut down while the instance booted")
            instance.conn = self._connection(host, port, host_key)
            instance.paths = instance.conn.call(lambda remote: resolve_paths(remote, self.settings))
            install_helper_and_watchdog(instance.conn, instance.paths, self.settings, self.repo_root, silence)
        except provider.LaunchFailed as exc:
            provider.terminate(self.client, self.ledger, self.cfg, ledger_id, reason=str(exc))
            raise
        except BaseException as exc:
            provider.terminate(self.client, self.ledger, self.cfg, ledger_id, reason=f"launch aborted: {exc}")
            if isinstance(exc, SshError):
                raise provider.LaunchFailed(f"instance {instance.provider_id}: {exc}") from exc
            raise

    def _connection(self, host: str, port: int, host_key: str) -> Connection:
        return Connection(host, port, self.key.private, host_key, timeout=self.cfg.ssh_timeout_seconds,
                          retries=self.cfg.ssh_retries)

    def _prepare(self, instance: PooledInstance) -> tuple[str, str]:
        """Deploy this run's code version on the instance once (other attempts wait for it)."""
        with instance.prepare_lock:
            version = self.bundle.version
            if version not in instance.deployed:
                code, python = deploy_code(instance.conn, instance.paths, self.bundle, self.settings)
                instance.deployed[version] = (code, python)
                self.ledger.event(self.run_id, "instance.deploy", instance_id=instance.ledger_id,
                                  provider_instance_id=instance.provider_id, **deploy_record(self.bundle, python))
            return instance.deployed[version]

    # ---- giving instances back -------------------------------------------------------------------

    def provider_status(self, instance: PooledInstance) -> str:
        """'gone', the provider's actual_status, or 'unknown-to-us' when the API cannot be asked."""
        try:
            info = provider.query(self.client, self.cfg, instance.provider_id)
        except provider.ProviderError:
            return "unknown-to-us"
        return "gone" if info is None else str(info.get("actual_status"))

    # ---- what the remote-host runtime asks (remote.watch.HostOwner) ----

    def host_gone(self, instance: PooledInstance) -> str | None:
        status = self.provider_status(instance)
        if status == "gone" or status in provider.TERMINAL_STATUSES:
            return f"instance {instance.provider_id} is {status}"
        return None

    def stop_reason(self) -> str | None:
        return self.budget.exhausted()

    def silence_now(self) -> float | None:
        return self.budget.silence_now()

    def lose_host(self, instance: PooledInstance, why: str) -> None:
        self.exclude_machine(instance)
        self.retire(instance, why)

    def exclude_machine(self, instance: PooledInstance) -> None:
        if instance.machine_id:
            with self._lock:
                self.excluded_machines.add(instance.machine_id)

    def _release(self, instance: PooledInstance, attempt_id: int) -> None:
        idle = self.pool.release(instance, attempt_id)
        if idle and not self.cfg.keep_instances:
            self.retire(instance, "arm finished (keep_instances is off)")
        elif idle and self.budget.exhausted():          # nothing more may run on it: stop paying for it now
            self.retire(instance, "the budget is spent")

    def retire(self, instance: PooledInstance, reason: str) -> None:
        if self.pool.retire(instance):
            self._destroy(instance, reason)

    def _destroy(self, instance: PooledInstance, reason: str) -> None:
        if instance.conn is not None:
            instance.conn.close()
        if instance.ledger_id is not None:
            provider.terminate(self.client, self.ledger, self.cfg, instance.ledger_id, reason=reason)

    def _destroy_idle_instances(self) -> None:
        """Destroy instances idle too long; keep the dead-man switch of the others quiet (nothing polls them), and
        sample their GPUs (nothing else does once their attempts ended)."""
        period = max(0.5, min(5.0, self.cfg.idle_destroy_seconds / 4, self.cfg.health_seconds))
        last_keepalive = time.monotonic()
        while not self._closing.wait(period):
            self._sample_idle_gpus()
            for instance in self.pool.retire_idle(self.cfg.idle_destroy_seconds):
                try:
                    self._destroy(instance, f"idle for {self.cfg.idle_destroy_seconds:g}s")
                except Exception:
                    log.exception("destroying idle instance %s failed", instance.provider_id)
            # The silence in force may be the shorter one the budget set at the last poll (budget.silence_now).
            silence = min(self.cfg.orchestrator_silence_seconds, self.budget.silence_now() or math.inf)
            if time.monotonic() - last_keepalive >= min(silence / 3, 300.0):
                last_keepalive = time.monotonic()
                for instance in self.pool.idle():
                    try:
                        instance.conn.run(["sh", "-c", f"echo {silence:.0f} > {shlex.quote(instance.paths.contact)}"])
                    except SshError as exc:
                        log.warning("instance %s: keep-alive failed: %s", instance.provider_id, exc)

    def _sample_idle_gpus(self) -> None:
        """GPU samples of idle instances into the ledger, as attempts stream them: the watchdog's cool-down after
        it stopped an attempt reads the host's samples, and that attempt has ended (scheduler._cooled)."""
        for instance in self.pool.idle():
            try:
                result = instance.conn.run(NVIDIA_SMI_QUERY, timeout=self.cfg.ssh_timeout_seconds, retries=1)
            except SshError as exc:
                log.warning("instance %s: GPU sample failed: %s", instance.provider_id, exc)
                continue
            if result.exit_code == 0:
                samples = parse_nvidia_smi_csv(result.stdout, instance.host_label, time.time())
                self.ledger.record_health([s.to_dict() for s in samples], self.run_id)

    # ---- a resumed run: its instances from the ledger -------------------------------------------------

    def _adopt_ledger_instances(self) -> None:
        """Instances this run rented before its orchestrator died: keep the usable ones, destroy the rest."""
        holders: dict[int, dict[int, list[int]]] = {}
        for attempt in self.ledger.open_attempts(self.run_id):
            if attempt["instance_id"] is not None:
                gpus = [int(g) for g in (attempt["gpu_index"] or "0").split(",") if g.strip()]
                holders.setdefault(attempt["instance_id"], {})[attempt["id"]] = gpus
        for row in self.ledger.live_instances(self.run_id):
            usable = row["provider_instance_id"] and row["host_key"] and row["ssh_host"] and row["state"] == "ready"
            status = None
            if usable:
                try:
                    info = provider.query(self.client, self.cfg, row["provider_instance_id"])
                    status = None if info is None else info.get("actual_status")
                except provider.ProviderError:
                    status = "unknown-to-us"
            if status != "running":
                provider.terminate(self.client, self.ledger, self.cfg, row["id"],
                                   reason=f"found {status or row['state']} when the run resumed")
                continue
            num_gpus = row["num_gpus"] or self.cfg.num_gpus
            instance = PooledInstance(num_gpus=num_gpus, max_arms=min(self.cfg.arms_per_instance or num_gpus, num_gpus),
                                      ledger_id=row["id"], provider_id=row["provider_instance_id"],
                                      machine_id=row["machine_id"], gpu_name=row["gpu_name"],
                                      holders=holders.get(row["id"], {}))
            instance.conn = self._connection(row["ssh_host"], row["ssh_port"], row["host_key"])
            try:
                instance.paths = instance.conn.call(lambda remote: resolve_paths(remote, self.settings))
                install_helper_and_watchdog(instance.conn, instance.paths, self.settings, self.repo_root)
            except SshError as exc:
                instance.conn.close()
                provider.terminate(self.client, self.ledger, self.cfg, row["id"], reason=f"unreachable: {exc}")
                continue
            self.pool.adopt(instance)
            self.ledger.event(self.run_id, "instance.adopted", instance_id=row["id"],
                              provider_instance_id=row["provider_instance_id"], attempts=sorted(instance.holders))


def _tried(failures: list[str]) -> str:
    return ("; tried: " + "; ".join(failures)) if failures else ""
