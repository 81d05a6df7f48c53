"""One rented instance: its status machine and how the API shows it.

    null -> created -> loading -> running            over the offer's boot delay
    running -> stopped | exited (preempted) | offline  every process killed
    stopped | exited -> null -> ... -> running       on start (onstart runs again)
    running -> stopped, intended still running       outbid (an interruptible instance), disk kept;
                                                     it boots again when it wins its machine back

The GPU is billed only while `running` (billing_periods); storage for the whole
life (billing.py).

The simulator's clock calls ``advance`` every tick with the faults that apply
right now, under the simulator's lock.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from .faults import InstanceFaults
from .instances import InstanceHost, free_port

BOOTING = (None, "created", "loading")
OCI_FAILURE_MSG = ("Error response from daemon: failed to create task for container: "
                   "OCI runtime create failed: runc create failed: unable to start container process")
PREEMPTED_MSG = "preempted: the host reclaimed its GPUs (vastsim)"
OFFLINE_MSG = "host offline: no heartbeat (vastsim)"
OUTBID_MSG = "outbid: a higher bid or an on-demand rental took the machine (vastsim)"


@dataclass
class Instance:
    id: int
    offer: dict
    label: str | None
    image: str | None
    env: dict
    onstart: str | None
    disk_gb: float
    scoped_key: str
    host: InstanceHost
    log: logging.Logger
    created_at: float = field(default_factory=time.time)
    status: str | None = None
    intended: str = "running"
    status_msg: str = ""
    boot_started: float = 0.0
    running_since: float | None = None
    sshd_due_at: float = 0.0
    destroyed_at: float | None = None
    billing_periods: list = field(default_factory=list)  # [start, end|None]: GPU billed (while running)
    bid: float | None = None           # $/h bid of an interruptible instance; None: on-demand
    outbid: bool = False               # stopped by the bid market, waiting to win its machine back
    stopped_at: float | None = None    # the latest move to `stopped` (by the user or outbid)
    exited_at: float | None = None     # the latest move to `exited` (preempted)
    bytes_up: float = 0.0              # bandwidth used, billed at the offer's inet_*_cost $/GB
    bytes_down: float = 0.0

    @property
    def gpu_rate(self) -> float:
        """$/h of the GPU while running: the bid of an interruptible instance, else the offer's price."""
        return self.bid if self.bid is not None else self.offer["dph_total"]

    @property
    def live(self) -> bool:
        return self.destroyed_at is None

    # ---- transitions ------------------------------------------------------

    def set_status(self, status: str | None, msg: str = "") -> bool:
        if (self.status, self.status_msg) == (status, msg):
            return False
        self.status, self.status_msg = status, msg
        self.host.log(f"status {status} {msg}".rstrip())
        self.log.info("instance %s: %s %s", self.id, status, msg)
        return True

    def boot(self, at: float | None = None) -> None:
        """(Re)start the container (at ``at``, default now): back to null, GPU billing resumes."""
        self.intended = "running"
        self.boot_started = at if at is not None else time.time()
        self.running_since = None
        self.outbid = False
        self.set_status(None)

    def advance(self, faults: InstanceFaults) -> bool:
        """One clock step; True when something changed."""
        now = time.time()
        self.host.reap()
        self.host.hostile_sftp = faults.hostile_sftp
        if faults.slow_sftp_read_s != self.host.slow_sftp_read_s:
            self.host.set_sftp_read_delay(faults.slow_sftp_read_s)
        if self.status in BOOTING and self.intended == "running":
            return self._advance_boot(faults, now)
        if self.status != "running":
            return False
        changed = False
        if not self.host.sshd_running and now >= self.sshd_due_at:
            self.start_sshd()
            changed = True
        running_for = now - self.running_since
        if faults.preempt_after_s is not None and running_for >= faults.preempt_after_s:
            self.interrupt("exited", PREEMPTED_MSG)
            changed = True
        elif faults.offline_after_s is not None and running_for >= faults.offline_after_s:
            self.interrupt("offline", OFFLINE_MSG)
            changed = True
        return changed

    def _advance_boot(self, faults: InstanceFaults, now: float) -> bool:
        delay = faults.boot_delay_s if faults.boot_delay_s is not None else self.offer["boot_delay_s"]
        elapsed = now - self.boot_started
        if faults.oci_failure and elapsed >= 0.2 * delay:
            return self.set_status("created", OCI_FAILURE_MSG)
        if elapsed < 0.2 * delay:
            return self.set_status(None)
        if elapsed < 0.4 * delay or faults.stuck_created:
            return self.set_status("created")
        if elapsed < delay or faults.stuck_loading:
            return self.set_status("loading", f"Pulling {self.image or 'image'}")
        self.running_since = now
        self.billing_periods.append([now, None])
        self.sshd_due_at = now + faults.ssh_refused_s
        if faults.ssh_refused_s <= 0:
            self.start_sshd()  # listening before anyone sees `running`
        self.set_status("running", f"success, running {self.image or 'image'}")
        if self.onstart:
            self.host.log("running onstart")
            self.host.run_onstart(self.onstart)
        return True

    def start_sshd(self) -> None:
        for _ in range(3):
            if self.host.start_sshd():
                self.host.log(f"sshd listening on 127.0.0.1:{self.host.port}")
                return
            self.host.log(f"sshd could not listen on port {self.host.port}; trying another port")
            self.host.port = free_port()
        self.sshd_due_at = time.time() + 1.0
        self.log.error("instance %s: sshd failed to start, see %s", self.id, self.host.sim_dir / "sshd.log")

    def interrupt(self, status: str, msg: str) -> None:
        """Stopped, preempted (`exited`) or `offline`: every process dies, the GPU stops billing."""
        self.host.kill_all()
        self._end_billing()
        if status != "offline":
            self.intended = "stopped"
        if status == "stopped":
            self.stopped_at = time.time()
        elif status == "exited":
            self.exited_at = time.time()
        self.set_status(status, msg)

    def lose_bid(self) -> None:
        """Outbid: stopped with every process killed and the disk kept; the user still wants it running."""
        self.interrupt("stopped", OUTBID_MSG)
        self.intended = "running"
        self.outbid = True

    def destroy(self, reason: str) -> None:
        """Kill every process, stop billing, delete the disk."""
        self.host.kill_all()
        self._end_billing()
        self.destroyed_at = time.time()
        self.intended = self.status = "destroyed"
        self.log.info("instance %s destroyed (%s)", self.id, reason)
        self.host.remove_disk()

    def change_host_key(self) -> None:
        """A new host key; a listening sshd restarts on the same port."""
        was_listening = self.host.sshd_running
        self.host.stop_sshd()
        self.host.generate_host_key()
        self.host.log("host key changed")
        if was_listening:
            self.start_sshd()

    def _end_billing(self) -> None:
        if self.billing_periods and self.billing_periods[-1][1] is None:
            self.billing_periods[-1][1] = time.time()

    # ---- views ------------------------------------------------------------

    def record(self) -> dict:
        """What the state file and the billing rules see (never a key)."""
        return {
            "id": self.id, "offer_id": self.offer["id"], "machine_id": self.offer["machine_id"],
            "label": self.label, "image": self.image, "status": self.status, "intended": self.intended,
            "status_msg": self.status_msg, "ssh_port": self.host.port, "home": str(self.host.home),
            "created_at": self.created_at, "running_since": self.running_since,
            "destroyed_at": self.destroyed_at, "billing_periods": self.billing_periods,
            "dph_total": self.gpu_rate, "storage_cost": self.offer["storage_cost"],
            "disk_gb": self.disk_gb, "gpu_name": self.offer["gpu_name"], "num_gpus": self.offer["num_gpus"],
            "is_bid": self.bid is not None, "outbid": self.outbid,
            "stopped_at": self.stopped_at, "exited_at": self.exited_at,
            "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
            "inet_up_cost": self.offer["inet_up_cost"], "inet_down_cost": self.offer["inet_down_cost"],
        }

    def row(self) -> dict:
        """The instance as show instance(s) returns it."""
        offer, port = self.offer, self.host.port
        gpus = self.host.read_gpus()
        running = self.status == "running"
        return {
            "id": self.id, "machine_id": offer["machine_id"], "host_id": offer["host_id"],
            "actual_status": self.status, "intended_status": self.intended, "next_state": self.intended,
            "cur_state": "stopped" if self.status in ("stopped", "exited") else "running",
            "status_msg": self.status_msg, "label": self.label,
            "image_uuid": self.image, "image_runtype": "ssh", "image_args": [], "onstart": self.onstart,
            "gpu_name": offer["gpu_name"], "num_gpus": offer["num_gpus"], "gpu_ram": offer["gpu_ram"],
            "gpu_totalram": offer["gpu_total_ram"],
            "gpu_util": float(gpus[0]["utilization.gpu"]) if gpus else 0.0,
            "gpu_temp": float(max(g["temperature.gpu"] for g in gpus)) if gpus else 0.0,
            "vmem_usage": float(gpus[0]["memory.used"]) if gpus else 0.0,
            "cpu_cores": offer["cpu_cores"], "cpu_cores_effective": offer["cpu_cores_effective"],
            "cpu_ram": offer["cpu_ram"], "cpu_util": 0.0,
            "disk_space": self.disk_gb, "disk_usage": 0.0, "disk_util": 0.0,
            "ssh_host": "127.0.0.1", "ssh_port": port, "ssh_idx": "0",
            "public_ipaddr": "127.0.0.1", "local_ipaddrs": "127.0.0.1",
            "ports": {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(port)}]} if running else {},
            "direct_port_start": port, "direct_port_end": port, "machine_dir_ssh_port": port,
            "start_date": self.created_at, "end_date": self.created_at + offer["duration"],
            "uptime_mins": (time.time() - self.running_since) / 60.0 if running else None,
            "dph_total": self.gpu_rate, "dph_base": offer["dph_base"],
            "storage_cost": offer["storage_cost"], "inet_up": offer["inet_up"], "inet_down": offer["inet_down"],
            "inet_up_cost": offer["inet_up_cost"], "inet_down_cost": offer["inet_down_cost"],
            "reliability2": offer["reliability2"], "cuda_max_good": offer["cuda_max_good"],
            "driver_version": offer["driver_version"], "geolocation": offer["geolocation"],
            "verification": offer["verification"], "is_bid": self.bid is not None, "min_bid": offer["min_bid"],
            "extra_env": [[k, v] for k, v in self.env.items()],
        }
