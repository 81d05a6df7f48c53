"""Fault scenarios: what the simulator should get wrong, and when.

Two kinds of faults:

* instance faults shape how an instance of an offer behaves (boot, SSH,
  preemption). They are set globally or per offer; a per-offer value wins.
  They are read live, so changing one affects instances already running.
* request faults are counters or deadlines on the HTTP API (429s, failed
  destroys, 404 on create); they are global.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field, fields


@dataclass
class InstanceFaults:
    boot_delay_s: float | None = None      # replaces the offer's boot delay
    stuck_loading: bool = False            # never leaves `loading`
    stuck_created: bool = False            # never leaves `created` (no error message)
    oci_failure: bool = False              # stays `created` with "OCI runtime create failed"
    ssh_refused_s: float = 0.0             # running, but sshd listens only N s later
    no_such_ask: bool = False              # every create on the offer fails (offer gone)
    preempt_after_s: float | None = None   # running N s -> `exited`, processes killed
    offline_after_s: float | None = None   # running N s -> `offline`, processes killed
    hostile_sftp: str | None = None        # an absolute folder: SFTP (from the next sshd start) serves names
    #                                        escaping into it, links, a FIFO, NUL and dot names (hostile_sftp.py)
    slow_sftp_read_s: float = 0.0          # every SFTP read of a file takes N s more (the slow server from the
    #                                        next sshd start, the delay live: clearing it makes reads fast again)
    create_answer_after_s: float = 0.0     # creates on the offer rent the instance, then answer N s late
    gone_once_rented: bool = False         # the offer leaves search (creates: no_such_ask) once one is rented
    destroy_fails: bool = False            # destroys of the offer's instances answer 500


@dataclass
class RequestFaults:
    rate_limit: int = 0                    # the next N API requests answer 429
    rate_limit_retry_after: float | None = None  # Retry-After header on those 429s
    create_no_such_ask: int = 0            # the next N creates answer 404/410 no_such_ask
    create_then_502: int = 0               # the next N creates rent the instance, then answer 502
    create_then_stall: int = 0             # the next N creates rent the instance, then answer create_stall_s late
    create_stall_s: float = 5.0            #   (a client with a shorter timeout sees a timeout)
    list_lag_s: float = 0.0                # a new instance shows in the instance list only this long after its create
    destroy_fail: int = 0                  # the next N destroys answer 500
    destroy_fail_for_s: float = 0.0        # destroys answer 500 for N s from when this is set
    bad_key_status: int = 401              # status for an unknown API key (Vast sometimes uses 404)
    api_down_s: float = 0.0                # the API closes every connection unanswered for N s from when this is set


INSTANCE_FAULT_NAMES = [f.name for f in fields(InstanceFaults)]
REQUEST_FAULT_NAMES = [f.name for f in fields(RequestFaults)]


def _convert(value, template_type: str):
    """A JSON or Python value converted to a fault field's declared type."""
    if value is None:
        if "None" in template_type:
            return None
        raise ValueError("this fault cannot be null")
    if template_type.startswith("bool"):
        if isinstance(value, str):
            return value.strip().lower() in ("true", "1", "yes", "on")
        return bool(value)
    if template_type.startswith("str"):
        return str(value)
    if template_type.startswith("int"):
        return int(value)
    return float(value)


@dataclass
class Faults:
    """All faults of one simulator. Not thread-safe: the simulator holds its lock."""

    instance: InstanceFaults = field(default_factory=InstanceFaults)
    per_offer: dict[int, dict] = field(default_factory=dict)
    requests: RequestFaults = field(default_factory=RequestFaults)
    destroy_fail_until: float = 0.0
    api_down_until: float = 0.0

    def set(self, offer_id: int | None = None, **changes) -> None:
        """Set faults by name; with ``offer_id`` only instance faults, for that offer."""
        allowed = INSTANCE_FAULT_NAMES if offer_id is not None else INSTANCE_FAULT_NAMES + REQUEST_FAULT_NAMES
        unknown = sorted(set(changes) - set(allowed))
        if unknown:
            scope = f"offer {offer_id}" if offer_id is not None else "global"
            raise ValueError(f"unknown {scope} fault(s) {unknown}; valid: {sorted(allowed)}")
        types = {f.name: str(f.type) for f in fields(InstanceFaults) + fields(RequestFaults)}
        converted = {name: _convert(value, types[name]) for name, value in changes.items()}
        if offer_id is not None:
            self.per_offer.setdefault(int(offer_id), {}).update(converted)
            return
        for name, value in converted.items():
            target = self.instance if name in INSTANCE_FAULT_NAMES else self.requests
            setattr(target, name, value)
        if "destroy_fail_for_s" in converted:
            self.destroy_fail_until = time.time() + converted["destroy_fail_for_s"]
        if "api_down_s" in converted:
            self.api_down_until = time.time() + converted["api_down_s"]

    def clear(self) -> None:
        self.instance = InstanceFaults()
        self.per_offer = {}
        self.requests = RequestFaults()
        self.destroy_fail_until = 0.0
        self.api_down_until = 0.0

    def api_down(self) -> bool:
        """Whether the API is down (answers nothing) right now."""
        return time.time() < self.api_down_until

    def for_offer(self, offer_id: int) -> InstanceFaults:
        """The instance faults that apply to instances of ``offer_id`` right now."""
        return dataclasses.replace(self.instance, **self.per_offer.get(int(offer_id), {}))

    def take_rate_limit(self) -> bool:
        """Whether this request is rate limited (uses up one of the next N)."""
        if self.requests.rate_limit > 0:
            self.requests.rate_limit -= 1
            return True
        return False

    def take_create_failure(self, offer_id: int) -> bool:
        """Whether this create fails with no_such_ask."""
        if self.for_offer(offer_id).no_such_ask:
            return True
        if self.requests.create_no_such_ask > 0:
            self.requests.create_no_such_ask -= 1
            return True
        return False

    def take_create_answer_fault(self) -> str | None:
        """How this (successful) create answers: '502', 'stall', or None for a normal answer."""
        if self.requests.create_then_502 > 0:
            self.requests.create_then_502 -= 1
            return "502"
        if self.requests.create_then_stall > 0:
            self.requests.create_then_stall -= 1
            return "stall"
        return None

    def take_destroy_failure(self) -> bool:
        """Whether this destroy fails with a 500."""
        if time.time() < self.destroy_fail_until:
            return True
        if self.requests.destroy_fail > 0:
            self.requests.destroy_fail -= 1
            return True
        return False

    def as_dict(self) -> dict:
        return {
            "instance": dataclasses.asdict(self.instance),
            "per_offer": {str(k): dict(v) for k, v in self.per_offer.items()},
            "requests": dataclasses.asdict(self.requests),
            "destroy_fail_until": self.destroy_fail_until,
            "api_down_until": self.api_down_until,
        }
