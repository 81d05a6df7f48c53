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
from orchestrator.backends.provision import LaunchRequest
from orchestrator.backends.vast import offers as offer_rules
from orchestrator.backends.vast import outbid, provider
from orchestrator.backends.vast.idle import ArmActivity, IdleWatch, record_idle_waste
from orchestrator.cost import decisions
from orchestrator.cost.reconcile import observe_instance
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
        self.provider: provider.VastInstances | None = None     # the provider seam, once the client exists
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
        self.activity = ArmActivity()                    # what each attempt's events said (idle GPUs, outbids)
        self.idle_watch = IdleWatch.from_config(cfg)
        self._resumed_after_outbid: set[int] = set()     # ledger ids of instances kept for the next attempt
        self._seen_running: dict[int, float] = {}         # ledger id -> when a poll last saw it running
        self._listed_at = -math.inf                       # monotonic time of the last list of the run's instances
        self._observe_lock = threading.Lock()

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
        self.provider = provider.VastInstances(self.client, self.ledger, self.cfg, self.run_id)
        self.bundle = make_code_bundle(self.repo_root, self.run_dir / ".vast" / "deploy", self.allow_dirty,
                                       secrets=(provider.api_key_of(self.client),))
        self.key = load_or_create_keypair(self.run_dir / ".vast" / "id_ed25519",
                                          comment=provider.key_comment(self.ledger.identity(), self.run_id))
        self.provider.key = self.key
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
            self._terminate(row["id"], reason="run finished")
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
        self.activity.begin(spec.attempt_id, spec.arm, spec.out_dir, spec.config.get("steps"))

        def noted(event: dict) -> None:
            self.activity.note(spec.attempt_id, event)
            emit(event)

        try:
            if spec.adopt:
                return self._adopt_attempt(spec, noted, stop)
            return self._run_new_attempt(spec, noted, stop)
        except PoolClosed as exc:
            return AttemptResult("interrupted", reason=str(exc))
        except Exception as exc:            # a bug or an unforeseen provider answer: report, never raise
            log.exception("vast attempt %s failed", spec.attempt_id)
            return AttemptResult("failed", reason=f"vast backend error: {type(exc).__name__}: {exc}"[:500])
        finally:
            self.activity.end(spec.attempt_id)

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
            # A deploy step that failed on an instance outbid meanwhile (its processes killed) is the outbid's doing
            if self.cfg.interruptible and outbid.is_outbid(self._row_after_lost_contact(instance)):
                return self._outbid_ended(instance, exc, watch)
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
        """An instance we cannot talk to (deploying, starting or watching a trainer). Outbid (interruptible):
        waited for or moved from, as when a running trainer notices it (_after_outbid; kept in the pool when it
        resumed, else destroyed); gone or dying: destroyed; both end the attempt preempted (lost when adopting, as
        watch.instance_lost has it: the orchestrator was not there to see what the host did). Else destroyed,
        lost."""
        if isinstance(exc, HostKeyChanged):
            self.ledger.event(self.run_id, "instance.host_key_changed", instance_id=instance.ledger_id,
                              detail=str(exc))
            self.retire(instance, str(exc))
            return AttemptResult("lost", reason=str(exc), end_step=watch.last_step if watch else None)
        info = self._row_after_lost_contact(instance)
        end_step = watch.last_step if watch else None
        if self.cfg.interruptible and outbid.is_outbid(info):
            return self._outbid_ended(instance, exc, watch, adopting)
        status = "unknown-to-us" if info is _UNKNOWN else "gone" if info is None else str(info.get("actual_status"))
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
        """Rent an instance, walking one search's ranking (offers.RankedOffers): a create refused, an instance
        stuck loading, a container that cannot start or SSH that never answers moves on to the next offer of the
        same list, its machine excluded for the rest of the run (an `offer.excluded` event). An offer gone
        between search and create (404) is searched for again once; gone a second time, it counts as refused."""
        failures: list[str] = []
        gone_once: set[str] = set()
        label = provider.instance_label(self.ledger.identity(), self.run_id, spec.attempt_id)
        ranked: offer_rules.RankedOffers | None = None
        for _ in range(self.cfg.max_launch_tries):
            if stop.is_set() or self._closing.is_set():
                raise provider.LaunchCancelled("stopped before an instance was rented")
            if ranked is None:
                found = offer_rules.rank(provider.search_offers(self.client, self.cfg), set(), cfg=self.cfg)
                ranked = offer_rules.RankedOffers(found, self.excluded_machines)
            # Offers another attempt is renting right now go last, not away (404 tells); picked and marked under
            # one lock, or concurrent launches all pick the cheapest offer.
            with self._lock:
                candidates = ranked.remaining()
                if not candidates:
                    raise provider.LaunchFailed("no offer matches the vast: query" + _tried(failures))
                refusal = {str(o["id"]): self.budget.launch_refusal(offer_rules.contract_rate(o, self.cfg))
                           for o in candidates}
                affordable = [o for o in candidates if refusal[str(o["id"])] is None]
                if not affordable:
                    raise BudgetRefused(refusal[str(candidates[0]["id"])] or "budget: no offer fits under the cap")
                offer = next((o for o in affordable if str(o["id"]) not in self._offers_in_flight), affordable[0])
                self._offers_in_flight.add(str(offer["id"]))
            try:
                self._launch_offer(instance, offer, label, stop)
                return
            except provider.OfferGone as exc:
                failures.append(f"offer {offer['id']}: gone ({exc.status})")
                if str(offer["id"]) in gone_once:
                    self._offer_failed(ranked, offer, f"create refused twice: {exc}")
                else:
                    gone_once.add(str(offer["id"]))
                    ranked = None                                  # search again
            except provider.LaunchFailed as exc:
                failures.append(str(exc))
                self._offer_failed(ranked, offer, str(exc))
            except provider.ProviderError as exc:
                if not provider.definite_no(exc):                  # the API itself is failing: no offer helps
                    raise
                failures.append(f"offer {offer['id']}: {exc}")
                self._offer_failed(ranked, offer, f"create refused: {exc}")
            finally:
                with self._lock:
                    self._offers_in_flight.discard(str(offer["id"]))
        raise provider.LaunchFailed(f"{self.cfg.max_launch_tries} offers tried" + _tried(failures))

    def _offer_failed(self, ranked: offer_rules.RankedOffers, offer: dict, reason: str) -> None:
        with self._lock:
            ranked.failed(offer, reason, self.ledger, self.run_id)

    def _launch_offer(self, instance: PooledInstance, offer: dict, label: str, stop: threading.Event) -> None:
        rate = offer_rules.contract_rate(offer, self.cfg)         # the bid when interruptible
        ledger_id, silence = self.budget.admit(rate, lambda: provider.record_intent(
            self.ledger, run_id=self.run_id, offer=offer, label=label, cfg=self.cfg))
        [handle] = self.provider.launch(LaunchRequest(label, gpus=self.cfg.num_gpus, offer=offer,
                                                      reserved=str(ledger_id),
                                                      onstart=boot_watchdog_onstart(self.cfg, silence)))
        ledger_id = int(handle)
        self.ledger.event(self.run_id, "instance.dead_man_switch", instance_id=ledger_id,
                          silence_seconds=round(silence, 1))
        row = self.ledger.instance(ledger_id)
        instance.ledger_id, instance.provider_id = ledger_id, row["provider_instance_id"]
        instance.machine_id, instance.gpu_name = str(offer.get("machine_id")), offer.get("gpu_name")
        try:
            host = self.provider.wait_ready(handle, time.monotonic() + self.cfg.ready_deadline_seconds, stop)
            if instance.state == "retired" or self._closing.is_set():
                raise provider.LaunchCancelled("the backend shut down while the instance booted")
            instance.conn = self._connection(host.address, host.port, host.host_key)
            instance.paths = instance.conn.call(lambda remote: resolve_paths(remote, self.settings))
            install_helper_and_watchdog(instance.conn, instance.paths, self.settings, self.repo_root, silence)
        except provider.LaunchFailed as exc:
            self._terminate(ledger_id, reason=str(exc))
            raise
        except BaseException as exc:
            self._terminate(ledger_id, reason=f"launch aborted: {exc}")
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

    def _poll_provider(self, instance: PooledInstance):
        """The provider's row of an instance (None when gone), its status moves recorded for the bill
        (cost.reconcile.observe_instance); _UNKNOWN when the API cannot be asked."""
        if instance.ledger_id is None:
            return _UNKNOWN
        try:
            info = self.provider.describe(str(instance.ledger_id))
        except provider.ProviderError:
            return _UNKNOWN
        self.observe(instance.ledger_id, info)
        return info

    def observe(self, ledger_id: int, info: dict | None) -> None:
        """Record what a polled show-instance row says about billing (cost.reconcile.observe_instance). Nothing
        dates a stop, an outbid, an exit or a disappearance: it is put halfway between the last time the instance
        was seen running (by a poll: the polling loop lists the run's instances every few seconds; or by an
        attempt reading news off it) and now."""
        now = time.time()
        with self._observe_lock:          # attempt threads and the polling loop: one status move recorded once
            if info is not None and info.get("actual_status") == "running":
                self._seen_running[ledger_id] = now
                observe_instance(self.ledger, ledger_id, info, now)
                return
            seen = max([t for t in (self._seen_running.get(ledger_id), self.activity.last_contact(ledger_id))
                        if t is not None], default=None)
            observe_instance(self.ledger, ledger_id, info, now if seen is None else (seen + now) / 2)

    def _observe_all(self) -> None:
        """One list call for the run's live instances, each observed (their status moves dated within a period),
        at most every vast.status_poll_seconds; given up after a short deadline (the polling loop must go on)."""
        if time.monotonic() - self._listed_at < self.cfg.status_poll_seconds:
            return
        self._listed_at = time.monotonic()
        ours = {r["provider_instance_id"]: r["id"] for r in self.ledger.live_instances(self.run_id)
                if r["provider_instance_id"]}
        if not ours:
            return
        try:
            listed = self.provider.run_rows(api_deadline_seconds=min(self.cfg.api_deadline_seconds, 30.0))
        except provider.ProviderError as exc:
            log.warning("listing the run's instances failed: %s", exc)
            return
        for info in listed:
            if str(info.get("id")) in ours:
                self.observe(ours[str(info["id"])], info)

    # ---- what the remote-host runtime asks (remote.watch.HostOwner) ----

    def host_gone(self, instance: PooledInstance) -> str | None:
        info = self._row_after_lost_contact(instance)
        if info is _UNKNOWN:
            return None
        if outbid.is_outbid(info):
            return self._after_outbid(instance, "run")
        status = "gone" if info is None else str(info.get("actual_status"))
        if status == "gone" or status in provider.TERMINAL_STATUSES:
            return f"instance {instance.provider_id} is {status}"
        return None

    def _row_after_lost_contact(self, instance: PooledInstance):
        """_poll_provider, for an instance whose processes stopped answering: an outbid kills them before the
        status says so, so a running interruptible instance is looked at once more before they count as lost."""
        info = self._poll_provider(instance)
        if self.cfg.interruptible and isinstance(info, dict) and info.get("actual_status") == "running":
            self._closing.wait(self.cfg.status_poll_seconds)
            info = self._poll_provider(instance)
        return info

    def _outbid_ended(self, instance: PooledInstance, exc: Exception, watch, adopting: bool = False) -> AttemptResult:
        """The attempt on an instance found outbid after `exc`: waited for or moved from (_after_outbid), ended
        preempted (lost when adopting)."""
        # "run" once a trainer started on it (its attempt said which instance): what decide weighs redoing
        during = "run" if adopting or self.activity.on_instance(instance.ledger_id) else "deploy"
        why = self._after_outbid(instance, during)
        self.lose_host(instance, why)
        return AttemptResult("lost" if adopting else "preempted", reason=f"{why} ({exc})"[:500],
                             end_step=watch.last_step if watch else None)

    def _after_outbid(self, instance: PooledInstance, during: str) -> str:
        """An outbid instance (`during` deploy or run): wait for it to resume or move on (outbid.decide); why the
        attempt on it ended. A resumed instance stays in the pool (neither lose_host nor _release gives it up)
        for the next attempt of the arm."""
        choice = outbid.decide(self, instance, during)
        if choice.action == "wait":
            waited = outbid.wait_for_resume(self, instance)
            if waited is not None:
                self._resumed_after_outbid.add(instance.ledger_id)
                self.ledger.event(self.run_id, decisions.RESUMED, instance_id=instance.ledger_id,
                                  waited_seconds=round(waited, 1))
                return (f"instance {instance.provider_id} was outbid and resumed after {waited:.0f}s: the arm "
                        f"continues on it from its last pulled checkpoint")
            return (f"instance {instance.provider_id} was outbid and did not resume within "
                    f"{self.cfg.outbid_wait_minutes:g} min")
        return (f"instance {instance.provider_id} was outbid: moving on (expected ${choice.move_dollars:.4f}"
                + ("" if choice.wait_dollars is None else f" against ${choice.wait_dollars:.4f} waiting") + ")")

    def stop_reason(self) -> str | None:
        return self.budget.exhausted()

    def silence_now(self) -> float | None:
        return self.budget.silence_now()

    def lose_host(self, instance: PooledInstance, why: str) -> None:
        if instance.ledger_id in self._resumed_after_outbid:      # back after an outbid: kept for the next attempt
            return
        self.exclude_machine(instance)
        self.retire(instance, why)

    def exclude_machine(self, instance: PooledInstance) -> None:
        if instance.machine_id:
            with self._lock:
                self.excluded_machines.add(instance.machine_id)

    def _release(self, instance: PooledInstance, attempt_id: int) -> None:
        idle = self.pool.release(instance, attempt_id)
        resumed = instance.ledger_id in self._resumed_after_outbid     # kept for the arm's next attempt
        self._resumed_after_outbid.discard(instance.ledger_id)
        if idle and not self.cfg.keep_instances and not resumed:
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
            self._terminate(instance.ledger_id, reason=reason)

    def _terminate(self, ledger_id: int, reason: str) -> None:
        """Destroy an instance, confirmed; one the provider does not confirm is left to `armature reap` (the
        ledger has its destroy_unconfirmed event and no destroyed_at)."""
        try:
            self.provider.terminate(str(ledger_id), reason=reason)
        except provider.DestroyUnconfirmed:
            pass            # logged, and recorded as `instance.destroy_unconfirmed`, by provider.terminate

    def _destroy_idle_instances(self) -> None:
        """Destroy instances idle too long; keep the dead-man switch of the others quiet (nothing polls them), and
        sample their GPUs (nothing else does once their attempts ended)."""
        period = max(0.5, min(5.0, self.cfg.idle_destroy_seconds / 4, self.cfg.health_seconds))
        last_keepalive = time.monotonic()
        while not self._closing.wait(period):
            self._observe_all()
            self._stop_idle_gpus(self._sample_idle_gpus())
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

    def _sample_idle_gpus(self) -> dict[int, list[float]]:
        """GPU samples of idle instances into the ledger, as attempts stream them: the watchdog's cool-down after
        it stopped an attempt reads the host's samples, and that attempt has ended (scheduler._cooled). Returns
        each sampled instance's GPU utilisation (%) by ledger id."""
        utilisation: dict[int, list[float]] = {}
        for instance in self.pool.idle():
            try:
                result = instance.conn.run(NVIDIA_SMI_QUERY, timeout=self.cfg.ssh_timeout_seconds, retries=1)
            except SshError as exc:
                log.warning("instance %s: GPU sample failed: %s", instance.provider_id, exc)
                continue
            if result.exit_code == 0:
                samples = parse_nvidia_smi_csv(result.stdout, instance.host_label, time.time())
                self.ledger.record_health([s.to_dict() for s in samples], self.run_id)
                utilisation[instance.ledger_id] = [100.0 * s.utilization_ratio for s in samples
                                                   if s.utilization_ratio is not None]
        return utilisation

    def _stop_idle_gpus(self, idle_utilisation: dict[int, list[float]]) -> None:
        """Destroy instances whose GPUs stayed under vast.idle_gpu_percent for vast.idle_minutes while every arm
        on them was said to run (or that held none), reported as waste (idle.py). An attempt on one ends
        preempted (its host is gone) and is retried from its last pulled checkpoint."""
        if self.cfg.idle_minutes is None:
            return
        now = time.time()
        seen = {ledger_id: (utils, None, None) for ledger_id, utils in idle_utilisation.items()}
        seen.update(self.activity.by_instance())
        for ledger_id, (utils, arm_state, arm) in seen.items():
            idle_seconds = self.idle_watch.observe(ledger_id, utils, arm_state, now)
            if idle_seconds is None:
                continue
            self.idle_watch.forget(ledger_id)
            instance = self.pool.find(ledger_id)
            if instance is None:
                continue
            row = self.ledger.instance(ledger_id)
            record_idle_waste(self.ledger, self.run_id, ledger_id, idle_seconds, row["dph_total"] if row else None,
                              arm)
            try:
                self.retire(instance, f"GPUs under {self.cfg.idle_gpu_percent:g}% for {idle_seconds / 60:.1f} min")
            except Exception:
                log.exception("stopping idle instance %s failed", instance.provider_id)

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
                    info = self.provider.describe(str(row["id"]))
                    self.observe(row["id"], info)
                    status = None if info is None else info.get("actual_status")
                except provider.ProviderError:
                    status = "unknown-to-us"
            if status != "running":
                self._terminate(row["id"], reason=f"found {status or row['state']} when the run resumed")
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
                self._terminate(row["id"], reason=f"unreachable: {exc}")
                continue
            self.pool.adopt(instance)
            self.ledger.event(self.run_id, "instance.adopted", instance_id=row["id"],
                              provider_instance_id=row["provider_instance_id"], attempts=sorted(instance.holders))


_UNKNOWN = object()      # the provider could not be asked


def _tried(failures: list[str]) -> str:
    return ("; tried: " + "; ".join(failures)) if failures else ""
