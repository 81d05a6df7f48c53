"""The `ssh:` section of an arms spec: machines you already have, reached over SSH.

    backend: ssh
    ssh:
      hosts:
        - {name: desk, address: 192.168.1.20, user: me, identity_file: ~/.ssh/id_ed25519, gpus: 1,
           python: /home/me/venv/bin/python}
        - {name: spare, address: spare.lan, port: 2222, user: me, gpus: 2, python: python3}

Arms are packed by GPU across the hosts (one arm per GPU; a host with `gpus: 0` runs `max_arms` arms on its
CPUs). Nothing is rented or billed; at the end every armature process on the hosts is stopped and the run's
scratch folder removed. Read top to bottom, these classes are the documentation of the section.
"""

from __future__ import annotations

import getpass
from pathlib import Path

from pydantic import BaseModel, Field, field_validator, model_validator

from orchestrator.backends.remote.settings import RuntimeSettings

HOST_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class SshHost(BaseModel, extra="forbid"):
    name: str = Field(pattern=HOST_NAME, max_length=64, description="how the ledger, logs and health name the host")
    address: str = Field(min_length=1, description="host name or IP address")
    port: int = Field(22, ge=1, le=65535)
    user: str = Field(default_factory=getpass.getuser, description="login user (default: yours here)")
    identity_file: str = Field("~/.ssh/id_ed25519", description="private key to log in with (no passphrase)")
    gpus: int = Field(0, ge=0, description="GPUs arms are packed onto (0: CPU only)")
    max_arms: int | None = Field(None, ge=1, description="most arms at once; None = one per GPU (1 without GPUs)")
    python: str = Field("python3", min_length=1,
                        description="interpreter on the host that has torch; the trainers' other requirements "
                                    "are checked and, when missing, pip-installed into a venv next to it")
    scratch_dir: str | None = Field(None, description="working folder (absolute or relative to the login home); "
                                                      "None = ssh.scratch_dir. Each run uses <it>/<run id>")

    @field_validator("identity_file")
    @classmethod
    def _expand(cls, value: str) -> str:
        return str(Path(value).expanduser())

    @property
    def arms_at_once(self) -> int:
        return self.max_arms or max(1, self.gpus)


class SshConfig(BaseModel, extra="forbid"):
    hosts: list[SshHost] = Field(min_length=1, description="the machines; at least one")
    scratch_dir: str = Field(".armature", description="default working folder on every host (see hosts[].scratch_dir)")

    # ---- talking to the hosts -------------------------------------------------------------------
    ssh_timeout_seconds: float = Field(20.0, gt=0, description="timeout of one SSH connect or command")
    ssh_retries: int = Field(3, ge=1, description="tries of one SSH operation on connection errors")
    install_timeout_seconds: float = Field(1200.0, gt=0, description="code deploy and dependency check/install")

    # ---- while an arm runs ------------------------------------------------------------------------
    poll_seconds: float = Field(10.0, gt=0, description="how often metrics, heartbeat and health are read")
    pull_checkpoints_every_minutes: float = Field(5.0, gt=0, description="checkpoint pull-back period (and at the end)")
    heartbeat_seconds: float = Field(10.0, gt=0, description="supervisor heartbeat period on the host")
    health_seconds: float = Field(10.0, gt=0, description="GPU health sampling (nvidia-smi) period on the host")
    heartbeat_timeout_seconds: float = Field(
        180.0, gt=0, description="no heartbeat (or no contact) this long = the host went away: its arms resume "
                                 "from their last pulled checkpoint on another host")
    stop_grace_seconds: float = Field(120.0, gt=0, description="a stopped trainer gets this long to checkpoint")
    rejoin_seconds: float = Field(30.0, gt=0, description="a host that went away is tried again this often; when it "
                                                          "answers, armature's leftovers there are stopped and it "
                                                          "takes arms again")

    # ---- safety net on the hosts ----------------------------------------------------------------
    orchestrator_silence_seconds: float = Field(
        1800.0, gt=0, description="dead-man switch: with no contact from the orchestrator this long, a host stops "
                                  "every armature process and removes the run's scratch folder")
    max_lifetime_hours: float = Field(168.0, gt=0, description="... or once armature has run there this long")

    @model_validator(mode="after")
    def _check(self) -> "SshConfig":
        names = [h.name for h in self.hosts]
        doubled = sorted({n for n in names if names.count(n) > 1})
        if doubled:
            raise ValueError(f"host names must be unique: {', '.join(doubled)} appear more than once")
        if self.heartbeat_timeout_seconds <= 2 * self.heartbeat_seconds:
            raise ValueError(f"heartbeat_timeout_seconds ({self.heartbeat_timeout_seconds}) must exceed twice "
                             f"heartbeat_seconds ({self.heartbeat_seconds})")
        if self.orchestrator_silence_seconds <= max(2 * self.poll_seconds, self.install_timeout_seconds):
            raise ValueError(f"orchestrator_silence_seconds ({self.orchestrator_silence_seconds}) must exceed twice "
                             f"poll_seconds and install_timeout_seconds, or a host cleans up while it is still used")
        return self

    def runtime(self, host: SshHost, run_id: str) -> RuntimeSettings:
        """The runtime settings for one host: its scratch folder for this run; silence = stop and clean."""
        return RuntimeSettings(
            remote_dir=f"{(host.scratch_dir or self.scratch_dir).rstrip('/')}/{run_id}",
            ssh_timeout_seconds=self.ssh_timeout_seconds, ssh_retries=self.ssh_retries,
            install_timeout_seconds=self.install_timeout_seconds, poll_seconds=self.poll_seconds,
            pull_checkpoints_every_minutes=self.pull_checkpoints_every_minutes,
            heartbeat_seconds=self.heartbeat_seconds, health_seconds=self.health_seconds,
            heartbeat_timeout_seconds=self.heartbeat_timeout_seconds, stop_grace_seconds=self.stop_grace_seconds,
            orchestrator_silence_seconds=self.orchestrator_silence_seconds,
            max_lifetime_hours=self.max_lifetime_hours, on_silence=("--on-silence", "clean"))
