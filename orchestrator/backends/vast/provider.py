"""The provider layer for Vast.ai, in the shape every provider has (like SkyPilot's sky/provision/<cloud>/):

    launch(...)      rent one offer: ledger row first, then one create call, then (unless the answer was
                     a definite no) a bounded look-up by the create's unique label
    wait_ready(...)  the readiness state machine, ending in an SSH probe with the host key pinned
    query(...)       the provider's view of one instance (None when it is gone)
    terminate(...)   destroy, then confirm it is gone, retrying; only then is destroyed_at set
    list_ours(...)   instances whose label marks them as armature's

`VastInstances` is the same, bound to one run, behind the provider seam (provision.Provider): handles are
ledger instance row ids, as strings.

Labels: `armature:<ledger id>:<run id>:<attempt id>:<ledger instance row id>`, unique per create
try and owned by one ledger (Ledger.identity), so `reap` can tell this ledger's instances from
those of another ledger on the same account, and a create whose answer was lost is found again.

Everything Vast-specific (the SDK, its statuses, its error bodies) stays behind
these functions. Every API call goes through `call_api`, which retries
rate limits (429), server errors and dropped connections with backoff, on top
of the SDK's own short retry loop; except the create, which is never re-sent
after an answer that leaves open whether it rented something.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import requests

from orchestrator.backends.provision import CAPABILITIES, Host, HostState, LaunchCancelled, LaunchRequest
from orchestrator.backends.vast import offers as offer_rules
from orchestrator.backends.vast.config import VastConfig
from orchestrator.backends.remote.ssh import HostKeyChanged, KeyPair, Remote
from orchestrator.cost import decisions
from orchestrator.cost.reconcile import observe_instance
from orchestrator.errors import UserError
from orchestrator.ledger import Ledger

log = logging.getLogger(__name__)

PROVIDER = "vast"
LABEL_PREFIX = "armature:"
PENDING_STATUSES = (None, "created", "loading", "scheduling", "rebooting", "starting")
TERMINAL_STATUSES = ("exited", "offline", "unknown", "stopped", "frozen")
GONE_STATUSES = ("exited", "destroyed")          # after a successful DELETE
RETRYABLE_HTTP = (429, 500, 502, 503, 504)
OCI_FAILURE = "OCI runtime create failed"
OUTBID_EVENT = decisions.OUTBID                  # what was done about an outbid instance (outbid.py, wait_ready)


class ProviderError(Exception):
    """A Vast API call failed for good (after retries)."""

    def __init__(self, message: str, status: int | None = None, error: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.status, self.error, self.retry_after = status, error, retry_after


class OfferGone(ProviderError):
    """The offer was rented by someone else between search and create (404/410 no_such_ask)."""


class LaunchFailed(Exception):
    """One instance did not become usable; it has been destroyed (confirmed) when it existed."""


class DestroyUnconfirmed(Exception):
    """A destroy the provider did not confirm within its deadline (recorded in the ledger; `armature reap` sees it)."""


def instance_label(ledger_id: str, run_id: str, attempt_id: int) -> str:
    """`armature:<ledger id>:<run id>:<attempt id>`; `launch` appends `:<ledger row id>` (one per create try).
    Run ids and ledger ids never hold ':'."""
    return f"{LABEL_PREFIX}{ledger_id}:{run_id}:{attempt_id}"


@dataclass(frozen=True)
class LabelOwner:
    ledger_id: str | None      # None: a label from before ledger ids (`armature:<run>:<suffix>`) or malformed
    run_id: str | None


def owner_of_label(label: str | None) -> LabelOwner | None:
    """Who an `armature:` label says rented the instance; None for labels that are not armature's."""
    if not label or not label.startswith(LABEL_PREFIX):
        return None
    fields = label[len(LABEL_PREFIX):].split(":")
    if len(fields) == 4 and all(fields):
        return LabelOwner(fields[0], fields[1])
    return LabelOwner(None, fields[0] if len(fields) == 2 and fields[0] else None)


# ---- the client and retries --------------------------------------------------------------------

def make_client(server_url: str | None = None, api_key: str | None = None, retry: int = 3):
    """A VastAI client with the key from VAST_API_KEY or the SDK's key files; a missing key is a UserError."""
    from vastai import VastAI

    try:
        return VastAI(api_key=api_key, server_url=server_url, retry=retry)
    except RuntimeError as exc:
        raise UserError(
            "no Vast.ai API key: set VAST_API_KEY, or save the key to ~/.config/vastai/vast_api_key "
            "(create one at https://cloud.vast.ai/manage-keys/)") from exc


def api_key_of(client) -> str:
    """The account key the client holds (only for checking it never leaks; never log it)."""
    return client.client.api_key or ""


def _error_of(response: requests.Response | None) -> tuple[str | None, str]:
    if response is None:
        return None, ""
    try:
        body = response.json()
    except ValueError:
        return None, (response.text or "")[:200]
    if isinstance(body, dict):
        error = body.get("error") or body.get("detail")
        return (str(error) if error else None), str(body.get("msg") or body.get("detail") or body)[:200]
    return None, str(body)[:200]


def call_api(what: str, fn: Callable[..., Any], *args, deadline_s: float, backoff: float, **kwargs) -> Any:
    """fn(*args, **kwargs), retried with exponential backoff (to 60 s, or the Retry-After a 429 names) on 429,
    5xx and connection errors until `deadline_s` has passed: a rate limit or an outage is waited out
    however many answers it takes, and only an error that outlasts the deadline fails the call."""
    give_up_at = time.monotonic() + deadline_s
    delay = backoff
    tries = 0
    while True:
        tries += 1
        try:
            return fn(*args, **kwargs)
        except requests.HTTPError as exc:
            response = exc.response
            status = response.status_code if response is not None else None
            error, message = _error_of(response)
            wait = _retry_after(response)          # the server says when its rate limit refills
            if wait is None:
                wait, delay = delay, min(delay * 2, 60.0)
            if status in RETRYABLE_HTTP and error != "search_quota_exceeded" \
                    and time.monotonic() + wait < give_up_at:
                log.info("vast %s: HTTP %s, retrying in %.1fs", what, status, wait)
                time.sleep(wait)
                continue
            cls = OfferGone if status in (404, 410) and error == "no_such_ask" else ProviderError
            after = f" (still after {tries} tries in {deadline_s:g}s)" if status in RETRYABLE_HTTP else ""
            raise cls(f"vast {what}: HTTP {status} {error or ''} {message}".strip() + after, status, error,
                      _retry_after(response)) from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            if time.monotonic() + delay < give_up_at:
                log.info("vast %s: %s, retrying in %.1fs", what, type(exc).__name__, delay)
                time.sleep(delay)
                delay = min(delay * 2, 60.0)
                continue
            raise ProviderError(f"vast {what}: {type(exc).__name__} after {tries} tries in {deadline_s:g}s") from None


def _retry_after(response: requests.Response | None) -> float | None:
    """A Retry-After header in seconds (at most 60), or None."""
    try:
        return min(max(float(response.headers["Retry-After"]), 0.0), 60.0)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def _api(cfg: VastConfig) -> dict:
    return {"deadline_s": cfg.api_deadline_seconds, "backoff": cfg.api_backoff_seconds}


# ---- offers and keys ---------------------------------------------------------------------------

def search_offers(client, cfg: VastConfig) -> list[dict]:
    return call_api("search offers", client.search_offers, query=offer_rules.build_query(cfg),
                    type="bid" if cfg.interruptible else "on-demand", order=[["dph_total", "asc"]],
                    limit=cfg.offers_per_search, storage=cfg.disk_gb, no_default=True, **_api(cfg))


KEY_COMMENT = re.compile(r"\barmature-([0-9a-f]{12})-(\S+)$")


def key_comment(ledger_id: str, run_id: str) -> str:
    """The comment of a run's SSH key on the account: which ledger and run put it there."""
    return f"armature-{ledger_id}-{run_id}"


def owner_of_key(public_line: str) -> LabelOwner | None:
    """The ledger and run named by an account key's comment; None for keys armature did not add."""
    found = KEY_COMMENT.search(public_line.strip())
    return LabelOwner(found[1], found[2]) if found else None


def list_ssh_keys(client, cfg: VastConfig) -> list[dict]:
    """The account's SSH keys: dicts with `id` and `key` (the public line)."""
    return [{"id": e.get("id"), "key": str(e.get("key") or e.get("public_key") or "")}
            for e in call_api("list ssh keys", client.show_ssh_keys, **_api(cfg)) or [] if isinstance(e, dict)]


def _same_key(a: str, b: str) -> bool:
    return a.split()[:2] == b.split()[:2]


def register_ssh_key(client, cfg: VastConfig, public_line: str) -> int | None:
    """Put a public key on the whole account (every later instance gets it); its key id. Runs never do this
    (their key is attached to each instance, see launch); older armature versions did, and reap_keys removes
    what they left."""
    for entry in list_ssh_keys(client, cfg):
        if _same_key(entry["key"], public_line):
            return entry["id"]
    created = call_api("add ssh key", client.create_ssh_key, public_line, **_api(cfg))
    if isinstance(created, dict):
        return created.get("id") or (created.get("key") or {}).get("id")
    return None


def remove_ssh_key(client, cfg: VastConfig, key_id: int) -> None:
    call_api("delete ssh key", client.delete_ssh_key, key_id, **_api(cfg))


# ---- launch ------------------------------------------------------------------------------------------

def record_intent(ledger: Ledger, *, run_id: str, offer: dict, label: str, cfg: VastConfig | None = None) -> int:
    """The ledger row of an instance about to be rented from `offer` (written before the provider is asked):
    the $/h its rental is billed while running (the bid when interruptible, offers.contract_rate), and with
    `cfg` its disk and the offer's storage price ($/GB/month), billed for every second it exists."""
    rate = float(offer["dph_total"]) if cfg is None else offer_rules.contract_rate(offer, cfg)
    instance_id = ledger.add_instance(
        run_id=run_id, provider=PROVIDER, label=label, offer_id=str(offer["id"]),
        machine_id=str(offer.get("machine_id")), gpu_name=offer.get("gpu_name"), num_gpus=offer.get("num_gpus"),
        dph_total=rate)
    if cfg is not None:
        storage_cost = offer.get("storage_cost")
        ledger.update_instance(instance_id, disk_gb=cfg.disk_gb, interruptible=int(cfg.interruptible),
                               storage_cost=None if storage_cost is None else float(storage_cost))
    return instance_id


def launch(client, ledger: Ledger, cfg: VastConfig, *, run_id: str, offer: dict, label: str,
           public_key: str, env: dict[str, str], onstart: str | None = None, instance_id: int | None = None) -> int:
    """Rent `offer`; returns the ledger id of the instance (its row exists before the provider is asked:
    `instance_id` when the caller wrote it with record_intent, e.g. under the budget's lock).
    `onstart`: the instance's start command (a shell script), e.g. the boot dead-man switch.
    `public_key` is attached to this instance only (POST /instances/{id}/ssh/); an instance it cannot be
    attached to is destroyed and LaunchFailed raised.

    The instance is labelled `label:<ledger row id>`, unique to this try. The create is sent once
    (the SDK's own retries off: a re-sent create can rent twice); after any answer that is not a
    definite no (a timeout, a 5xx, a dropped connection, an answer without an id) the instance is
    looked up by that label until cfg.create_lookup_seconds, and recorded (and used) when found.
    """
    if instance_id is None:
        instance_id = record_intent(ledger, run_id=run_id, offer=offer, label=label, cfg=cfg)
    label = f"{label}:{instance_id}"
    ledger.update_instance(instance_id, label=label)
    try:
        answer = _create_once(client, cfg, offer, label, env, onstart)
        provider_id = answer.get("new_contract") if isinstance(answer, dict) else None
        if not provider_id:
            raise ProviderError(f"vast create instance: answer without an instance id: {answer!r}"[:300])
        ledger.update_instance(instance_id, provider_instance_id=str(provider_id), state="booting")
    except ProviderError as exc:
        provider_id = _settle_failed_create(client, ledger, cfg, instance_id, label, exc)
    try:    # the run's key on this instance only: never on the account, so a kill -9 leaves no key behind
        call_api("attach ssh key", client.attach_ssh, int(provider_id), public_key, **_api(cfg))
    except ProviderError as exc:
        terminate(client, ledger, cfg, instance_id, reason=f"could not attach the ssh key: {exc}"[:300])
        raise LaunchFailed(f"instance {provider_id}: could not attach the run's ssh key: {exc}") from None
    return instance_id


def _create_once(client, cfg: VastConfig, offer: dict, label: str, env: dict[str, str], onstart: str | None) -> dict:
    """One create request (re-sent only after a rate limit, which rents nothing, until the API deadline), with
    the SDK's retries off."""
    once = make_client(client.client.server_url, api_key=api_key_of(client), retry=1)
    once.client.timeout = cfg.create_timeout_seconds
    give_up_at = time.monotonic() + cfg.api_deadline_seconds
    delay = cfg.api_backoff_seconds
    while True:
        try:
            return call_api("create instance", once.create_instance, int(offer["id"]), image=cfg.image,
                            disk=cfg.disk_gb, env=env, label=label, onstart_cmd=onstart, cancel_unavail=True,
                            ssh=True, direct=True, price=offer_rules.bid_price(offer, cfg), deadline_s=0,
                            backoff=delay)
        except ProviderError as exc:
            wait = exc.retry_after
            if wait is None:
                wait, delay = delay, min(delay * 2, 60.0)
            if exc.status != 429 or time.monotonic() + wait >= give_up_at:
                raise
            time.sleep(wait)


def definite_no(exc: ProviderError) -> bool:
    """Whether a failed create certainly rented nothing: a 4xx answer (not 408, a timeout)."""
    return exc.status is not None and 400 <= exc.status < 500 and exc.status != 408


def _settle_failed_create(client, ledger: Ledger, cfg: VastConfig, instance_id: int, label: str,
                          exc: ProviderError) -> str:
    """A create that failed: look for its label (once after a definite no, else until the look-up deadline).

    Found: recorded, and its provider id returned (the launch goes on with it). Not found: the row is
    `failed_create` after a definite no, else `create_unknown` (still live: teardown checks the label
    again); OfferGone / ProviderError (definite no) or LaunchFailed is raised.
    """
    definite = definite_no(exc)
    deadline = time.monotonic() + (0 if definite else cfg.create_lookup_seconds)
    while True:
        try:
            found = find_by_label(client, cfg, label)
        except ProviderError:
            found = []
        if found:
            provider_id = record_found(client, ledger, cfg, instance_id, found, reason=f"create answered: {exc}")
            ledger.event(ledger.instance(instance_id)["run_id"], "instance.found_by_label", instance_id=instance_id,
                         provider_instance_id=provider_id, label=label, create_error=str(exc)[:300])
            return provider_id
        if time.monotonic() >= deadline:
            break
        time.sleep(min(cfg.status_poll_seconds, max(0.0, deadline - time.monotonic())))
    if definite:
        ledger.update_instance(instance_id, state="failed_create", reason=str(exc)[:300])
        raise exc
    ledger.update_instance(instance_id, state="create_unknown", reason=str(exc)[:300])
    raise LaunchFailed(f"create of offer {ledger.instance(instance_id)['offer_id']} answered {exc}; no instance "
                       f"labelled {label} appeared within {cfg.create_lookup_seconds:g}s (teardown checks again)")


def find_by_label(client, cfg: VastConfig, label: str) -> list[dict]:
    """Live instances carrying exactly `label`."""
    return [i for i in list_ours(client, cfg, label) if i.get("label") == label
            and i.get("actual_status") not in GONE_STATUSES]


def record_found(client, ledger: Ledger, cfg: VastConfig, instance_id: int, found: list[dict], reason: str) -> str:
    """Record the first of the instances found by a row's label on that row; any more (a create the SDK or a
    proxy sent twice) get rows of their own and are destroyed. The first one's provider id."""
    row = ledger.instance(instance_id)
    first, *extra = sorted(found, key=lambda i: int(i["id"]))
    ledger.update_instance(instance_id, provider_instance_id=str(first["id"]), state="booting")
    for info in extra:
        twin = ledger.add_instance(run_id=row["run_id"], provider=PROVIDER, label=row["label"],
                                   offer_id=row["offer_id"], machine_id=str(info.get("machine_id")),
                                   gpu_name=info.get("gpu_name"), num_gpus=info.get("num_gpus"),
                                   dph_total=info.get("dph_total"))
        ledger.update_instance(twin, provider_instance_id=str(info["id"]), state="booting")
        terminate(client, ledger, cfg, twin, reason=f"a second instance for one create ({reason})"[:300])
    return str(first["id"])


# ---- readiness -------------------------------------------------------------------------------------

def ssh_endpoints(info: dict) -> list[tuple[str, int]]:
    """Where SSH answers: direct (public ip + mapped 22) first, then Vast's proxy; [] while unknown."""
    endpoints = []
    ports = info.get("ports") or {}
    mapped = ports.get("22/tcp") if isinstance(ports, dict) else None
    if info.get("public_ipaddr") and mapped:
        try:
            endpoints.append((str(info["public_ipaddr"]).strip(), int(mapped[0]["HostPort"])))
        except (KeyError, IndexError, TypeError, ValueError):
            pass
    if info.get("ssh_host") and info.get("ssh_port"):
        endpoints.append((str(info["ssh_host"]).strip(), int(info["ssh_port"])))
    return list(dict.fromkeys(endpoints))


def query(client, cfg: VastConfig, provider_instance_id: str | int) -> dict | None:
    return call_api("show instance", client.show_instance, int(provider_instance_id), **_api(cfg))


def wait_ready(client, ledger: Ledger, cfg: VastConfig, instance_id: int, key: KeyPair,
               stop: threading.Event, deadline: float | None = None) -> tuple[str, int, str]:
    """Wait until the instance runs and answers SSH; returns (host, port, pinned host key).

    Pending: null, created, loading. Terminal: exited, offline, unknown (and stopped, frozen),
    or "OCI runtime create failed" in status_msg; an outbid (stopped, still intended to run) too, recorded as
    an `instance.outbid` event (move, during boot). SSH is probed directly, not inferred from a
    status: the key can land after the instance says running. Raises LaunchFailed at a terminal
    status or past `deadline` (time.monotonic(); default cfg.ready_deadline_seconds from now),
    LaunchCancelled when `stop` is set.
    """
    row = ledger.instance(instance_id)
    provider_id = row["provider_instance_id"]
    started = time.monotonic()
    deadline = started + cfg.ready_deadline_seconds if deadline is None else deadline
    last = "no status yet"
    while True:
        if stop.is_set():
            raise LaunchCancelled(f"stopped while instance {provider_id} was booting")
        try:
            info = query(client, cfg, provider_id)
        except ProviderError as exc:
            info, last = {}, str(exc)
        if info is None:
            raise LaunchFailed(f"instance {provider_id} vanished while booting (last: {last})")
        if info:
            observe_instance(ledger, instance_id, info)      # the GPU bills from `running` on (cost.reconcile)
        status, message = info.get("actual_status"), str(info.get("status_msg") or "")
        if info:
            last = f"status {status}" + (f" ({message[:160]})" if message else "")
        if OCI_FAILURE in message:
            raise LaunchFailed(f"instance {provider_id} cannot start its container: {message[:200]}")
        if is_outbid(info):         # nothing has run on it yet: the next offer costs only its boot
            record_outbid(ledger, row["run_id"], instance_id, provider_id, action="move", during="boot",
                          own_rate=row["dph_total"])
            raise LaunchFailed(f"instance {provider_id} was outbid while booting: {message[:200]}")
        if status in TERMINAL_STATUSES:
            raise LaunchFailed(f"instance {provider_id} went {status} while booting: {message[:200]}")
        if status == "running":
            for host, port in ssh_endpoints(info):
                probe = _probe_ssh(host, port, key, cfg)
                if isinstance(probe, str) and not probe.startswith("!"):
                    ledger.update_instance(instance_id, ssh_host=host, ssh_port=port, host_key=probe,
                                           state="ready", ready_at=time.time())
                    return host, port, probe
                if isinstance(probe, str):
                    last = f"running, SSH not answering yet: {probe[1:]}"
        if time.monotonic() > deadline:
            raise LaunchFailed(f"instance {provider_id} not ready after {deadline - started:.0f}s ({last})")
        stop.wait(cfg.status_poll_seconds)


def is_outbid(info: dict | None) -> bool:
    """Stopped by the bid market (an interruptible instance): processes killed, disk kept, may run again."""
    return bool(info) and info.get("actual_status") == "stopped" and info.get("intended_status") == "running"


def record_outbid(ledger: Ledger, run_id: str | None, instance_id: int, provider_instance_id: str | None, *,
                  action: str, during: str, own_rate: float | None, best_rate: float | None = None,
                  wait_dollars: float | None = None, move_dollars: float | None = None) -> None:
    """The `instance.outbid` event: `action` wait|move, `during` boot|deploy|run, the expected dollars of each
    action (None: not weighed) and the $/h of the instance and of the best offer at the time."""
    ledger.event(run_id, OUTBID_EVENT, instance_id=instance_id, provider_instance_id=provider_instance_id,
                 action=action, during=during, wait_dollars=wait_dollars, move_dollars=move_dollars,
                 own_rate=own_rate, best_rate=best_rate)


def _probe_ssh(host: str, port: int, key: KeyPair, cfg: VastConfig) -> str:
    """The host key when SSH answers a command, else '!' + why not."""
    timeout = min(cfg.ssh_timeout_seconds, 15.0)
    try:
        remote = Remote.connect(host, port, key.private, None, timeout)
    except HostKeyChanged as exc:          # cannot happen without a pinned key; kept for clarity
        return "!" + str(exc)
    except Exception as exc:               # refused, reset, auth not yet possible, banner timeout ...
        return f"!{type(exc).__name__}: {exc}"[:200]
    try:
        result = remote.run(["true"], timeout=timeout)
        return remote.host_key if result.exit_code == 0 else f"!probe command exited {result.exit_code}"
    except Exception as exc:
        return f"!{type(exc).__name__}: {exc}"[:200]
    finally:
        remote.close()


# ---- teardown ---------------------------------------------------------------------------------------

def is_gone(info: dict | None) -> bool:
    return info is None or info.get("actual_status") in GONE_STATUSES


def terminate(client, ledger: Ledger, cfg: VastConfig, instance_id: int, reason: str) -> bool:
    """Destroy an instance and confirm it is gone; True once confirmed (destroyed_at set).

    Never assumes: the DELETE is retried until it succeeds, then the instance is queried
    until the provider no longer shows it (or shows it exited/destroyed), with backoff, for
    up to cfg.destroy_deadline_seconds. An unconfirmed destroy leaves destroyed_at empty (so
    `armature reap` and cost reports still see the instance) and records an event.
    """
    row = ledger.instance(instance_id)
    if row is None or row["destroyed_at"] is not None or row["state"] == "failed_create":
        return True
    run_id, provider_id = row["run_id"], row["provider_instance_id"]
    if provider_id is None:
        # The create never answered (its orchestrator may have died while it was sent), or answered an error:
        # anything it rented carries the row's label, and shows in the list at the latest once the create has
        # timed out and the list has caught up (create_lookup_seconds); until then, not found proves nothing.
        settled_at = row["created_at"] + cfg.create_timeout_seconds + cfg.create_lookup_seconds
        while True:
            try:
                matches = find_by_label(client, cfg, row["label"])
            except ProviderError as exc:
                ledger.event(run_id, "instance.destroy_unconfirmed", instance_id=instance_id, label=row["label"],
                             error=str(exc)[:300])
                log.error("instance row %s: cannot look its label up (%s); run `armature reap`", instance_id, exc)
                return False
            if matches or time.time() >= settled_at:
                break
            time.sleep(cfg.status_poll_seconds)
        if not matches:
            ledger.update_instance(instance_id, state="failed_create", reason=(row["reason"] or reason)[:300])
            return True
        provider_id = record_found(client, ledger, cfg, instance_id, matches, reason=reason)
    ledger.update_instance(instance_id, state="destroying", destroy_requested_at=time.time(),
                           reason=(row["reason"] or reason)[:300])
    deadline = time.monotonic() + cfg.destroy_deadline_seconds
    delay = cfg.api_backoff_seconds
    delete_accepted = False
    tries = 0
    while True:
        tries += 1
        try:
            if not delete_accepted:
                asked_at = time.time()
                try:
                    call_api("destroy instance", client.destroy_instance, int(provider_id), deadline_s=0,
                             backoff=delay)          # one try: this loop retries (and records each failure)
                except ProviderError as exc:
                    if exc.status != 404:
                        raise
                delete_accepted = True
                observe_instance(ledger, instance_id, None, asked_at)    # the GPU stops billing at the DELETE
            if is_gone(query(client, cfg, provider_id)):
                ledger.update_instance(instance_id, state="destroyed", destroyed_at=time.time())
                ledger.event(run_id, "instance.destroyed", instance_id=instance_id,
                             provider_instance_id=provider_id, reason=reason, tries=tries)
                return True
        except ProviderError as exc:
            ledger.event(run_id, "instance.destroy_retry", instance_id=instance_id,
                         provider_instance_id=provider_id, error=str(exc)[:300], tries=tries)
        if time.monotonic() > deadline:
            ledger.event(run_id, "instance.destroy_unconfirmed", instance_id=instance_id,
                         provider_instance_id=provider_id, tries=tries)
            log.error("instance %s: destroy NOT confirmed after %d tries; run `armature reap`", provider_id, tries)
            return False
        time.sleep(delay)
        delay = min(delay * 2, 30.0)


def list_ours(client, cfg: VastConfig, label_prefix: str = LABEL_PREFIX) -> list[dict]:
    """Live instances of the account whose label starts with `label_prefix`."""
    rows = call_api("show instances", client.show_instances, **_api(cfg)) or []
    return [r for r in rows if str(r.get("label") or "").startswith(label_prefix)]


# ---- behind the provider seam --------------------------------------------------------------------------

class VastInstances:
    """provision.Provider over the functions above, bound to one run: its client, ledger, config and SSH key.
    A handle is the ledger row id of an instance (a string). Besides the seam, `describe` and `run_rows` hand
    over the provider's own rows: billing (cost.reconcile) and outbids read fields no HostState carries."""

    name = PROVIDER
    capabilities = CAPABILITIES["vast"]

    def __init__(self, client, ledger: Ledger, cfg: VastConfig, run_id: str, key: KeyPair | None = None):
        self.client, self.ledger, self.cfg, self.run_id, self.key = client, ledger, cfg, run_id, key

    def launch(self, request: LaunchRequest) -> list[str]:
        """Rent `request.offer` (launch above), labelled `request.label:<row id>`, with the run's key attached;
        `request.reserved`: the row the caller recorded with record_intent."""
        if request.offer is None:
            raise ValueError("a Vast launch needs request.offer (a search_offers row)")
        env = {"VAST_SERVER_URL": self.cfg.server_url} if self.cfg.server_url else {}
        instance_id = launch(self.client, self.ledger, self.cfg, run_id=self.run_id, offer=request.offer,
                             label=request.label, public_key=self.key.public_line, env=env, onstart=request.onstart,
                             instance_id=None if request.reserved is None else int(request.reserved))
        return [str(instance_id)]

    def wait_ready(self, handle: str, deadline: float, stop: threading.Event | None = None) -> Host:
        host, port, host_key = wait_ready(self.client, self.ledger, self.cfg, int(handle), self.key,
                                          stop or threading.Event(), deadline)
        row = self.ledger.instance(int(handle))
        return Host(name=f"{PROVIDER}-{row['provider_instance_id']}", address=host, port=port, host_key=host_key,
                    gpus=row["num_gpus"] or self.cfg.num_gpus)

    def describe(self, handle: str) -> dict | None:
        """The provider's row of an instance (None when it is gone); ProviderError when the API cannot be asked."""
        row = self.ledger.instance(int(handle))
        if row is None or row["provider_instance_id"] is None:
            return None
        return query(self.client, self.cfg, row["provider_instance_id"])

    def query(self, handles: list[str]) -> dict[str, HostState]:
        states: dict[str, HostState] = {}
        for handle in handles:
            try:
                info = self.describe(handle)
            except ProviderError:
                states[handle] = "unknown"
                continue
            status = None if info is None else info.get("actual_status")
            if is_gone(info):
                states[handle] = "gone"
            elif status == "running":
                states[handle] = "ready"
            elif status in PENDING_STATUSES or info.get("intended_status") == "running":   # booting, or outbid
                states[handle] = "pending"
            else:
                states[handle] = "gone" if status in TERMINAL_STATUSES else "unknown"
        return states

    def terminate(self, handle: str, reason: str = "") -> None:
        """Destroyed and confirmed (terminate above), else DestroyUnconfirmed (already in the ledger)."""
        if not terminate(self.client, self.ledger, self.cfg, int(handle), reason=reason):
            raise DestroyUnconfirmed(f"instance row {handle}: destroy not confirmed; run `armature reap`")

    def run_rows(self, api_deadline_seconds: float | None = None) -> list[dict]:
        """The provider's rows of this run's live instances (one list call)."""
        cfg = self.cfg if api_deadline_seconds is None else \
            self.cfg.model_copy(update={"api_deadline_seconds": api_deadline_seconds})
        return list_ours(self.client, cfg, f"{LABEL_PREFIX}{self.ledger.identity()}:{self.run_id}:")

    def list_ours(self, identity: str) -> list[str]:
        """Handles (ledger row ids) of the live instances whose label names ledger `identity`."""
        handles = []
        for info in list_ours(self.client, self.cfg, f"{LABEL_PREFIX}{identity}:"):
            fields = str(info.get("label"))[len(LABEL_PREFIX):].split(":")
            if len(fields) == 4 and fields[3].isdigit() and info.get("actual_status") not in GONE_STATUSES:
                handles.append(fields[3])
        return handles
