"""The `vast:` section of an arms spec: what to rent, how long to wait, when to give up.

Every field has a default that suits real Vast.ai; tests and the simulator
override the times to seconds. Read top to bottom, this class is the
documentation of the section.
"""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

from orchestrator.backends.remote.settings import RuntimeSettings


class VastConfig(BaseModel, extra="forbid"):
    # ---- which offers to rent (a Vast search query; see vast-api.md) -------------------------
    gpu_name: str | None = Field("RTX 4090", description="GPU model as Vast names it ('RTX 4090'); None = any")
    num_gpus: int = Field(1, ge=1, description="GPUs per instance; arms are packed one per GPU")
    min_gpu_memory_gb: float | None = Field(None, gt=0, description="minimum memory per GPU, GB")
    max_dollars_per_hour: float = Field(1.0, gt=0, description="the most an instance may cost, $/h all in")
    min_reliability: float = Field(0.98, ge=0, le=1, description="Vast's machine reliability score, 0..1")
    verified: bool = Field(True, description="only machines Vast has verified")
    min_cuda: float | None = Field(12.1, description="minimum CUDA version the host driver supports")
    min_download_mbps: float | None = Field(100.0, ge=0, description="minimum download bandwidth, Mb/s")
    disk_gb: float = Field(30.0, gt=0, description="disk to allocate per instance, GB")
    interruptible: bool = Field(False, description="rent as interruptible (a bid): cheaper, may be preempted")
    bid_markup: float = Field(1.25, ge=1, description="interruptible only: bid = offer's minimum bid x this, "
                                                      "at most max_dollars_per_hour; a higher bid or an on-demand "
                                                      "rental stops the instance (outbid = preempted)")
    outbid_wait_minutes: float | None = Field(
        None, gt=0, description="interruptible only: how long an outbid instance is expected to take to resume. "
                                "After an outbid the arm waits (at most this long) for its own instance when that is "
                                "expected to cost less than booting the best offer now and redoing the steps since "
                                "its last pulled checkpoint (offers.after_outbid); None = always move at once")
    offers_per_search: int = Field(20, ge=1, description="how many offers one search asks for")

    # ---- what runs on it ---------------------------------------------------------------------
    image: str = Field("pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime",
                       description="a stock PyTorch image; the project's requirements are pip-installed on top")
    server_url: str | None = Field(None, description="Vast API URL; None = the SDK's default (console.vast.ai)")
    remote_dir: str = Field("armature", description="working folder on the instance, relative to the login home")

    # ---- packing and reuse --------------------------------------------------------------------
    arms_per_instance: int | None = Field(
        None, ge=1, description="most arms one instance runs at once (each gets whole GPUs); None = one per GPU")
    max_instances: int = Field(4, ge=1, description="most instances rented at once (caps arms running at once)")
    keep_instances: bool = Field(True, description="keep a finished arm's instance for the next waiting arm")
    idle_destroy_seconds: float = Field(300.0, ge=0, description="destroy a kept instance idle this long")

    # ---- launching ------------------------------------------------------------------------------
    ready_deadline_seconds: float = Field(900.0, gt=0,
                                          description="an instance not answering SSH by then is destroyed")
    status_poll_seconds: float = Field(10.0, gt=0, description="how often readiness is checked")
    max_launch_tries: int = Field(4, ge=1, description="offers tried for one instance before giving up")
    create_timeout_seconds: float = Field(120.0, gt=0, description="how long one create request may take")
    create_lookup_seconds: float = Field(
        60.0, ge=0, description="after a create answered a timeout or 5xx, look for its instance by label this long")

    # ---- talking to the provider and the instance ---------------------------------------------
    api_deadline_seconds: float = Field(
        600.0, gt=0, description="one API call retries 429s, 5xx and dropped connections (with backoff) this long "
                                 "before it fails; a rate limit is waited out, not counted")
    api_backoff_seconds: float = Field(2.0, gt=0, description="first wait between API tries (doubles, to 60 s)")
    ssh_timeout_seconds: float = Field(30.0, gt=0, description="timeout of one SSH connect or command")
    ssh_retries: int = Field(4, ge=1, description="tries of one SSH operation on connection errors")
    install_timeout_seconds: float = Field(1200.0, gt=0, description="dependency install on the instance")

    # ---- while an arm runs ----------------------------------------------------------------------
    poll_seconds: float = Field(15.0, gt=0, description="how often metrics, heartbeat and health are read")
    pull_checkpoints_every_minutes: float = Field(10.0, gt=0,
                                                  description="checkpoint pull-back period (and at the end)")
    heartbeat_seconds: float = Field(10.0, gt=0, description="supervisor heartbeat period on the instance")
    health_seconds: float = Field(10.0, gt=0, description="GPU health sampling period on the instance")
    heartbeat_timeout_seconds: float = Field(300.0, gt=0,
                                             description="no heartbeat (or no contact) this long = preempted")
    idle_minutes: float | None = Field(
        30.0, gt=0, description="an instance whose GPUs stay under idle_gpu_percent this long while an arm is said "
                                "to run on it (or that holds no arm) is stopped and reported as waste; None = never")
    idle_gpu_percent: float = Field(5.0, ge=0, le=100, description="GPU utilisation under which a GPU counts as idle")
    stop_grace_seconds: float = Field(120.0, gt=0, description="a stopped trainer gets this long to checkpoint")

    # ---- safety nets on the instance -------------------------------------------------------------
    orchestrator_silence_seconds: float = Field(
        1500.0, gt=0, description="dead-man switch (armed at boot): the instance destroys itself after this long "
                                  "without contact from the orchestrator; less under a budget, what the "
                                  "remaining budget pays for (budget.py)")
    max_lifetime_hours: float = Field(72.0, gt=0, description="the instance destroys itself after this long")

    # ---- teardown and budget --------------------------------------------------------------------
    destroy_deadline_seconds: float = Field(900.0, gt=0,
                                            description="keep retrying a destroy until confirmed this long")
    expected_hours_per_instance: float = Field(
        2.0, gt=0, description="budget projection: a new instance is assumed to work this long after booting")
    checkpoint_pull_seconds: float = Field(
        120.0, ge=0, description="budget reserve: how long the last checkpoint pull of a stopped arm may take")
    destroy_seconds: float = Field(
        60.0, ge=0, description="budget reserve: how long a destroy takes to be confirmed")

    @model_validator(mode="after")
    def _check(self) -> "VastConfig":
        if self.heartbeat_timeout_seconds <= 2 * self.heartbeat_seconds:
            raise ValueError(f"heartbeat_timeout_seconds ({self.heartbeat_timeout_seconds}) must exceed twice "
                             f"heartbeat_seconds ({self.heartbeat_seconds})")
        if self.orchestrator_silence_seconds <= 2 * self.poll_seconds:
            raise ValueError(f"orchestrator_silence_seconds ({self.orchestrator_silence_seconds}) must exceed "
                             f"twice poll_seconds ({self.poll_seconds}), or the instance destroys itself "
                             "while the orchestrator is still polling it")
        if self.orchestrator_silence_seconds <= self.install_timeout_seconds:
            raise ValueError(f"orchestrator_silence_seconds ({self.orchestrator_silence_seconds}) must exceed "
                             f"install_timeout_seconds ({self.install_timeout_seconds}): nothing touches the "
                             "instance's last-contact file during a dependency install")
        if self.server_url is not None:
            self.server_url = self.server_url.rstrip("/")
        return self

    @property
    def max_arms_per_instance(self) -> int:
        return min(self.arms_per_instance or self.num_gpus, self.num_gpus)

    @property
    def runtime(self) -> RuntimeSettings:
        """What the remote-host runtime needs from this section; the dead-man switch destroys the instance."""
        return RuntimeSettings(
            remote_dir=self.remote_dir, ssh_timeout_seconds=self.ssh_timeout_seconds, ssh_retries=self.ssh_retries,
            install_timeout_seconds=self.install_timeout_seconds, poll_seconds=self.poll_seconds,
            pull_checkpoints_every_minutes=self.pull_checkpoints_every_minutes,
            heartbeat_seconds=self.heartbeat_seconds, health_seconds=self.health_seconds,
            heartbeat_timeout_seconds=self.heartbeat_timeout_seconds, stop_grace_seconds=self.stop_grace_seconds,
            orchestrator_silence_seconds=self.orchestrator_silence_seconds,
            max_lifetime_hours=self.max_lifetime_hours,
            on_silence=("--on-silence", "destroy") + (("--server-url", self.server_url) if self.server_url else ()))
