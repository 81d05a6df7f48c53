"""The provider seam: what every place that rents or owns machines answers, and what each backend can do.

Two layers sit under `orchestrator/backends/`:

    provision.py   this file: the `Provider` interface, the `Host` it hands over, and each backend's
                   declared `Capabilities` (the rest of the orchestrator asks these, never a backend's name)
    remote/        the remote-host runtime: SSH, code deploy, the supervisor on the host, pull-back, health,
                   packing arms by GPU, the per-attempt watch. It takes a `Host` and `RuntimeSettings`.
    vast/          provider: rented Vast.ai instances (billing, budget, reap)
    ssh/           provider: machines the user already has, reached over SSH
    local.py       no provider: this machine's Ray (or a Ray cluster)

A provider, in the spirit of SkyPilot's sky/provision/:
    launch(request) -> handles        idempotent by label: asking twice gives the same machines
    wait_ready(handle, deadline, stop)  -> Host, once it answers SSH (host key pinned); LaunchCancelled
                                      as soon as `stop` (optional) is set
    query(handles) -> states          "pending" | "ready" | "gone" | "unknown" per handle
    terminate(handle, reason)         returns only when the provider confirms (rented: destroyed;
                                      owned: every armature process stopped and the scratch folder removed),
                                      raises otherwise; `reason` is what the ledger records
    list_ours(identity)               the handles this ledger owns at the provider
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Literal, Protocol

HostState = Literal["pending", "ready", "gone", "unknown"]


@dataclass(frozen=True)
class Capabilities:
    bills: bool                     # machines cost money by the hour: budgets, charges, cost lines
    rents_instances: bool           # machines are created and destroyed (ledger `instances`, reap)
    can_preempt: bool               # a machine may go away under a running arm
    runs_here: bool                 # attempts are processes of this machine's Ray (local pids, local GPUs)
    gpu_health_source: Literal["local", "host"]     # nvidia-smi read here, or on the host over SSH


CAPABILITIES: dict[str, Capabilities] = {
    "local": Capabilities(bills=False, rents_instances=False, can_preempt=False, runs_here=True,
                          gpu_health_source="local"),
    "vast": Capabilities(bills=True, rents_instances=True, can_preempt=True, runs_here=False,
                         gpu_health_source="host"),
    "ssh": Capabilities(bills=False, rents_instances=False, can_preempt=True, runs_here=False,
                        gpu_health_source="host"),
}
BACKEND_NAMES = tuple(CAPABILITIES)


def capabilities(backend: str | None) -> Capabilities:
    """What a backend (by the name the ledger records) can do; an unknown name is treated as rented."""
    return CAPABILITIES.get(backend or "", CAPABILITIES["vast"])


@dataclass(frozen=True)
class Host:
    """A machine a provider hands to the runtime."""
    name: str                       # label in the ledger, health samples and logs ("gpu-box", "vast-123")
    address: str
    port: int = 22
    user: str = "root"
    host_key: str | None = None     # "ssh-ed25519 AAAA...", pinned at first contact; None = not yet
    gpus: int = 0                   # GPUs arms are packed onto (0: CPU only, one arm at a time per slot)
    python: str | None = None       # interpreter with torch on the host; None = find one (python3)
    scratch_dir: str = "armature"   # working folder, relative to the login home


class LaunchCancelled(Exception):
    """wait_ready was asked to stop (its `stop` event set) before the machine answered."""


@dataclass(frozen=True)
class LaunchRequest:
    label: str                      # idempotency key: the same label never makes a second machine
    gpus: int = 1
    offer: dict | None = None       # rented: the offer to rent (vast: a search_offers row); owned: None
    onstart: str | None = None      # a shell script the machine runs when it boots (vast: the dead-man switch)
    reserved: str | None = None     # a handle the caller recorded beforehand (vast: the ledger row the budget
                                    # admitted under its lock); None: the provider records one
    extra: dict = field(default_factory=dict)


class Provider(Protocol):
    name: str
    capabilities: Capabilities

    def launch(self, request: LaunchRequest) -> list[str]: ...

    def wait_ready(self, handle: str, deadline: float, stop: threading.Event | None = None) -> Host: ...

    def query(self, handles: list[str]) -> dict[str, HostState]: ...

    def terminate(self, handle: str, reason: str = "") -> None: ...

    def list_ours(self, identity: str) -> list[str]: ...


# ---- each provider's section of an arms spec (`vast:`, `ssh:`), validated before any run -----------------

PROVIDER_SECTIONS = {"vast": ("orchestrator.backends.vast.config", "VastConfig"),
                     "ssh": ("orchestrator.backends.ssh.config", "SshConfig")}


def section_model(backend: str):
    """The pydantic model of a provider's spec section (imported only when asked for)."""
    import importlib

    module, name = PROVIDER_SECTIONS[backend]
    return getattr(importlib.import_module(module), name)
