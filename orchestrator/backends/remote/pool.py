"""The run's hosts (rented instances, or machines of your own), shared by its attempts: packing arms onto
GPUs, and reuse.

An attempt `claim`s GPUs: on a ready instance with room (the fullest first, so
arms pack densely), else on an instance another attempt is launching (it waits
for it), else it gets a new `launching` instance and becomes its launcher. An
attempt that ends `release`s its GPUs; an instance nobody holds is idle, and is
kept for the next claim (keep_instances) until it has been idle too long. A pool of fixed hosts
(`InstancePool(provider, grows=False)`) never asks for a new one: claims wait for room, and fail with
`NoHostLeft` once every host is gone.

Each instance has one `Connection` whose lock makes it the single owner of the
instance's SSH traffic, and a `prepare_lock` so one deploy runs at a time.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field

from orchestrator.backends.remote.deploy import InstancePaths
from orchestrator.backends.remote.ssh import Connection

_serial = itertools.count(1)


class PoolClosed(Exception):
    """The backend is shutting down: no new claims."""


class NoHostLeft(Exception):
    """A pool of fixed hosts has none left that could run the claim."""


@dataclass(eq=False)
class PooledInstance:
    num_gpus: int
    max_arms: int
    provider: str = ""                        # names the host in labels: "<provider>-<provider_id>"
    state: str = "launching"                  # launching -> ready -> retired (or failed)
    serial: int = field(default_factory=lambda: next(_serial))
    ledger_id: int | None = None
    provider_id: str | None = None
    machine_id: str | None = None
    gpu_name: str | None = None
    conn: Connection | None = None
    paths: InstancePaths | None = None
    holders: dict[int, list[int]] = field(default_factory=dict)    # attempt id -> its GPU indices
    idle_since: float | None = None
    failure: str | None = None
    deployed: dict[str, tuple[str, str]] = field(default_factory=dict)   # code version -> (code dir, python)
    ready: threading.Event = field(default_factory=threading.Event)
    prepare_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def host_label(self) -> str:
        return f"{self.provider}-{self.provider_id}"

    def free_gpus(self) -> list[int]:
        used = {g for gpus in self.holders.values() for g in gpus}
        return [g for g in range(self.num_gpus) if g not in used]

    def has_room(self, gpus: int) -> bool:
        return (self.state in ("launching", "ready") and len(self.holders) < self.max_arms
                and len(self.free_gpus()) >= gpus)


class InstancePool:
    def __init__(self, provider: str, grows: bool = True) -> None:
        self.provider, self.grows = provider, grows
        self._cond = threading.Condition()
        self._instances: list[PooledInstance] = []
        self.closed = False

    def claim(self, attempt_id: int, gpus: int, num_gpus: int, max_arms: int, max_instances: int | None = None,
              stop: threading.Event | None = None) -> tuple[PooledInstance, list[int], bool] | None:
        """GPUs for an attempt: (instance, GPU indices, whether the caller must launch the instance).

        A new instance is only started while fewer than `max_instances` are launching or ready; else the
        claim waits for room on one of them (None when `stop` is set meanwhile)."""
        with self._cond:
            while True:
                if self.closed:
                    raise PoolClosed(f"the {self.provider} backend is shutting down")
                rooms = [i for i in self._instances if i.has_room(gpus)]
                rooms.sort(key=lambda i: (i.state != "ready", -len(i.holders), i.serial))
                if not self.grows:
                    if rooms:
                        is_new = False
                        break
                    if not any(i.num_gpus >= gpus for i in self._instances):
                        raise NoHostLeft(f"no {self.provider} host left with {gpus} GPU(s)")
                    if stop is not None and stop.is_set():
                        return None
                    self._cond.wait(0.5)
                    continue
                is_new = not rooms
                if not is_new or max_instances is None or len(self._instances) < max_instances:
                    break
                if stop is not None and stop.is_set():
                    return None
                self._cond.wait(0.5)
            if is_new:
                instance = PooledInstance(num_gpus=num_gpus, max_arms=max_arms, provider=self.provider)
                self._instances.append(instance)
            else:
                instance = rooms[0]
            taken = instance.free_gpus()[:gpus]
            instance.holders[attempt_id] = taken
            instance.idle_since = None
            return instance, taken, is_new

    def adopt(self, instance: PooledInstance) -> PooledInstance:
        """Add an instance found in the ledger (ready, possibly with attempts that are still running)."""
        with self._cond:
            for known in self._instances:
                if known is instance or (instance.ledger_id is not None and known.ledger_id == instance.ledger_id):
                    return known
            instance.provider = instance.provider or self.provider
            instance.state = "ready"
            instance.ready.set()
            instance.idle_since = None if instance.holders else time.monotonic()
            self._instances.append(instance)
            return instance

    def hold(self, instance: PooledInstance, attempt_id: int, gpus: list[int]) -> list[int]:
        """Let an adopted attempt hold its GPUs (the ones reserved for it, else the ledger's); its GPUs."""
        with self._cond:
            held = instance.holders.setdefault(attempt_id, gpus)
            instance.idle_since = None
            return held

    def find(self, ledger_id: int) -> PooledInstance | None:
        with self._cond:
            return next((i for i in self._instances if i.ledger_id == ledger_id), None)

    def mark_ready(self, instance: PooledInstance) -> None:
        with self._cond:
            instance.state = "ready"
            instance.ready.set()
            self._cond.notify_all()

    def mark_failed(self, instance: PooledInstance, reason: str) -> None:
        with self._cond:
            instance.state, instance.failure = "failed", reason
            if instance in self._instances:
                self._instances.remove(instance)
            instance.ready.set()
            self._cond.notify_all()

    def release(self, instance: PooledInstance, attempt_id: int) -> bool:
        """Give an attempt's GPUs back; True when the instance is now idle (nobody holds it)."""
        with self._cond:
            instance.holders.pop(attempt_id, None)
            self._cond.notify_all()
            if instance.holders:
                return False
            instance.idle_since = time.monotonic()
            return instance.state == "ready"

    def retire(self, instance: PooledInstance) -> bool:
        """Take an instance out of service (to be destroyed); True for the one caller that retired it."""
        with self._cond:
            if instance.state == "retired":
                return False
            instance.state = "retired"
            if instance in self._instances:
                self._instances.remove(instance)
            instance.ready.set()
            self._cond.notify_all()
            return True

    def retire_idle(self, idle_seconds: float) -> list[PooledInstance]:
        """Retire the ready instances nobody has held for `idle_seconds`."""
        now = time.monotonic()
        with self._cond:
            idle = [i for i in self._instances if i.state == "ready" and not i.holders
                    and i.idle_since is not None and now - i.idle_since >= idle_seconds]
            for instance in idle:
                instance.state = "retired"
                self._instances.remove(instance)
            self._cond.notify_all()
            return idle

    def idle(self) -> list[PooledInstance]:
        with self._cond:
            return [i for i in self._instances if i.state == "ready" and not i.holders and i.conn is not None]

    def close(self) -> list[PooledInstance]:
        """No more claims; every instance is retired and returned (for destruction)."""
        with self._cond:
            self.closed = True
            instances, self._instances = self._instances, []
            for instance in instances:
                instance.state = "retired"
                instance.ready.set()
            self._cond.notify_all()
            return instances
