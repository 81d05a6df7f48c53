"""How the remote-host runtime talks to a host and watches its arms: timeouts, periods, the dead-man switch.

A provider builds one from its own section of the spec (`VastConfig.runtime`, `SshConfig.runtime`); the
runtime reads nothing else, so it knows no provider.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RuntimeSettings:
    remote_dir: str = "armature"                     # scratch folder on the host, relative to the login home
    ssh_timeout_seconds: float = 30.0                # one SSH connect or command
    ssh_retries: int = 4                             # tries of one SSH operation on connection errors
    install_timeout_seconds: float = 1200.0          # code deploy and dependency install
    poll_seconds: float = 15.0                       # metrics, heartbeat and health are read this often
    pull_checkpoints_every_minutes: float = 10.0     # checkpoint pull-back period (and at the end)
    heartbeat_seconds: float = 10.0                  # supervisor heartbeat period on the host
    health_seconds: float = 10.0                     # GPU health sampling period on the host
    heartbeat_timeout_seconds: float = 300.0         # no heartbeat (or no contact) this long = host lost
    stop_grace_seconds: float = 120.0                # a stopped trainer gets this long to checkpoint
    orchestrator_silence_seconds: float = 1500.0     # the host's dead-man switch fires after this silence
    max_lifetime_hours: float = 72.0                 # ... or after this long
    on_silence: tuple[str, ...] = ("--on-silence", "destroy")   # what the switch does (supervisor.py watchdog
                                                                # arguments): destroy a rented instance, or
                                                                # stop armature and clean the scratch folder
