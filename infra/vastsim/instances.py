"""The machine side of a simulated instance: its disk, its sshd, its processes.

Each instance is a directory (its "disk", also HOME of its SSH sessions) with

    bin/nvidia-smi, bin/python, bin/python3   first on PATH
    .ssh/authorized_keys                      sshd's AuthorizedKeysFile
    .vastsim/                                 sshd_config, host key, pid file, logs, gpu.json

and a real `sshd -D -f .vastsim/sshd_config` on 127.0.0.1. Every process of the
instance (sshd, SSH sessions, onstart, anything they start, even detached with
setsid/nohup) carries VASTSIM_SIM=<simulator token> and VASTSIM_INSTANCE=<id>
in its environment; that is how they are found and killed. A process that
clears its environment (env -i) escapes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

SSHD_START_TIMEOUT_S = 5.0
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
FAKE_NVIDIA_SMI = Path(__file__).with_name("fake_nvidia_smi.py")
HOSTILE_SFTP = Path(__file__).with_name("hostile_sftp.py")

# Friendly scenario names -> nvidia-smi query fields in gpu.json.
GPU_VALUE_NAMES = {
    "temperature": "temperature.gpu",
    "utilization": "utilization.gpu",
    "memory_used": "memory.used",
    "memory_total": "memory.total",
    "power": "power.draw",
    "power_limit": "power.limit",
    "sm_clock": "clocks.sm",
    "throttle_reasons": "clocks_throttle_reasons.active",
}

# sshd starts every session in the passwd home (/root), while on a Vast
# container HOME and the starting directory are the same. bash started by sshd
# for a command (`ssh host CMD`, paramiko exec_command) reads ~/.bashrc, and
# HOME is the instance dir, so this file moves the session there. The marker
# makes only the session's first shell change directory.
BASHRC_SCRIPT = """\
# vastsim: start SSH sessions in the instance's home, like a Vast container (cwd = HOME).
if [ -z "${VASTSIM_STARTED_IN_HOME:-}" ]; then
    export VASTSIM_STARTED_IN_HOME=1
    cd "$HOME" 2>/dev/null || true
fi
"""

# Read by interactive login shells, after /etc/profile has reset PATH.
BASH_PROFILE_SCRIPT = """\
export PATH="$HOME/bin:$PATH"
[ -f "$HOME/.bashrc" ] && . "$HOME/.bashrc"
"""


def find_sshd() -> str | None:
    """Absolute path of the sshd binary (sshd refuses to run from a relative path)."""
    return shutil.which("sshd") or next(
        (p for p in ("/usr/sbin/sshd", "/usr/local/sbin/sshd") if os.access(p, os.X_OK)), None)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def find_marked_pids(markers: dict[str, str]) -> list[int]:
    """Pids of processes whose environment holds every NAME=VALUE in ``markers``."""
    needles = {f"{name}={value}".encode() for name, value in markers.items()}
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        if needles <= set(_environ(int(entry.name)).split(b"\0")):
            found.append(int(entry.name))
    return found


PF_KTHREAD = 0x00200000         # /proc/<pid>/stat flags: a kernel thread, which has no environment


def _stat_fields(pid: int | str) -> list[str] | None:
    """/proc/<pid>/stat after "pid (comm)": [state, ppid, pgrp, session, tty, tpgid, flags, ...]; None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _environ(pid: int, attempts: int = 25) -> bytes:
    """The environment of `pid` (b"" if gone). A process in the middle of an exec (a detached `setsid nohup cmd`
    just started) reads as empty until the kernel has laid out its new stack: read again rather than miss it."""
    for _ in range(attempts):
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                environ = handle.read()
        except OSError:
            return b""
        if environ:
            return environ
        fields = _stat_fields(pid)
        if fields is None or fields[0] in ("Z", "X") or int(fields[6]) & PF_KTHREAD:
            return b""                                  # gone, a zombie or a kernel thread: empty for good
        time.sleep(0.002)
    return b""


def kill_marked_processes(markers: dict[str, str], rounds: int = 50) -> int:
    """SIGKILL every marked process, again until none is left (they may fork meanwhile), and wait until each has
    died: a process already past reading its environment may still be exiting."""
    killed: set[int] = set()
    for _ in range(rounds):
        pids = find_marked_pids(markers)
        if not pids:
            break
        killed.update(sigkill(pids))
        time.sleep(0.02)
    wait_dead(killed)
    return len(killed)


def sigkill(pids) -> list[int]:
    """SIGKILL each of `pids`; the ones that were still there to kill."""
    killed = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue                    # already gone
        killed.append(pid)
    return killed


def wait_dead(pids, timeout: float = 10.0) -> None:
    """Wait (at most `timeout`) until none of `pids` runs: gone, or a zombie waiting for its parent."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            fields = _stat_fields(pid)
            if fields is None or fields[0] in ("Z", "X"):
                break
            time.sleep(0.01)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...), from /proc (sshd's retitled session processes
    hide the markers of their environment, so they are found by parentage)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (fields := _stat_fields(entry.name)) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _sshd_config_value(value: str) -> str:
    if "\n" in value or "\r" in value:
        raise ValueError("environment values cannot contain newlines")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _gpu_display_name(gpu_name: str) -> str:
    if gpu_name.startswith(("RTX", "GTX")):
        return f"NVIDIA GeForce {gpu_name}"
    return gpu_name if gpu_name.startswith("NVIDIA") else f"NVIDIA {gpu_name}"


class InstanceHost:
    """Disk, sshd and processes of one instance."""

    def __init__(self, home: Path, markers: dict[str, str], port: int, python: str):
        self.home = Path(home)
        self.sim_dir = self.home / ".vastsim"
        self.markers = dict(markers)
        self.port = port
        self.python = python
        self.sshd: subprocess.Popen | None = None
        self.onstart: subprocess.Popen | None = None
        self.session_env: dict[str, str] = {}
        self.hostile_sftp: str | None = None      # the fault of that name, applied at the next sshd start
        self.slow_sftp_read_s: float = 0.0        # likewise (its value is read live, see set_sftp_read_delay)

    # ---- disk -------------------------------------------------------------

    @property
    def authorized_keys(self) -> Path:
        return self.home / ".ssh" / "authorized_keys"

    @property
    def host_key(self) -> Path:
        return self.sim_dir / "ssh_host_ed25519_key"

    @property
    def container_log(self) -> Path:
        return self.sim_dir / "container.log"

    @property
    def gpu_state(self) -> Path:
        return self.sim_dir / "gpu.json"

    def prepare(self, session_env: dict[str, str], ssh_keys: list[str], gpu_name: str,
                num_gpus: int, gpu_ram_mb: int, driver_version: str) -> None:
        """Create the disk: bin/, keys, host key, sshd config, GPU scenario file."""
        for directory in (self.home / "bin", self.home / ".ssh", self.sim_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.session_env = dict(session_env)
        self._install_bin()
        (self.home / ".bashrc").write_text(BASHRC_SCRIPT)
        (self.home / ".bash_profile").write_text(BASH_PROFILE_SCRIPT)
        self.authorized_keys.write_text("".join(k.strip() + "\n" for k in ssh_keys))
        self.generate_host_key()
        self._write_sshd_config()
        seed = self.markers.get("VASTSIM_INSTANCE", "0")
        gpus = [{
            "index": i,
            "name": _gpu_display_name(gpu_name),
            "uuid": "GPU-" + str(uuid.uuid5(uuid.NAMESPACE_OID, f"vastsim-{seed}-{i}")),
            "temperature.gpu": 38,
            "utilization.gpu": 0,
            "utilization.memory": 0,
            "memory.used": 0,
            "memory.total": int(gpu_ram_mb),
            "power.draw": 24.5,
            "power.limit": 450.0,
            "clocks.sm": 210,
            "clocks.max.sm": 2520,
            "clocks_throttle_reasons.active": "0x0000000000000000",
            "fan.speed": 30,
            "pstate": "P8",
            "driver_version": driver_version,
        } for i in range(num_gpus)]
        self._write_gpus(gpus)

    def _install_bin(self) -> None:
        bin_dir = self.home / "bin"
        smi = bin_dir / "nvidia-smi"
        smi.write_text(f"#!{sys.executable}\n" + FAKE_NVIDIA_SMI.read_text())
        # Wrappers, not symlinks: a symlinked venv python loses its venv.
        for name in ("python", "python3"):
            (bin_dir / name).write_text(f'#!/bin/sh\nexec "{self.python}" "$@"\n')
        for path in (smi, bin_dir / "python", bin_dir / "python3"):
            path.chmod(0o755)

    def _write_sshd_config(self) -> None:
        set_env = " ".join(f"{name}={_sshd_config_value(value)}" for name, value in self.session_env.items())
        (self.sim_dir / "sshd_config").write_text("\n".join([
            f"Port {self.port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {self.host_key}",
            f"PidFile {self.sim_dir / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            "StrictModes no",
            "UsePAM no",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "X11Forwarding no",
            "PrintMotd no",
            "PermitUserEnvironment no",
            "LogLevel INFO",
            f"Subsystem sftp {self._sftp_subsystem()}",
            f"SetEnv {set_env}",
            "",
        ]))

    @property
    def sftp_busy_marker(self) -> Path:
        return self.sim_dir / "sftp-reading"

    def set_sftp_read_delay(self, seconds: float) -> None:
        """The `slow_sftp_read_s` fault: sshd uses the slow server from its next start; the delay applies live."""
        self.slow_sftp_read_s = seconds
        delay_file = self.sim_dir / "sftp-read-delay"
        if delay_file.exists() or seconds > 0:
            delay_file.write_text(f"{seconds:g}\n")

    def _sftp_subsystem(self) -> str:
        if self.hostile_sftp or self.slow_sftp_read_s > 0:
            target = f" --target {self.hostile_sftp}" if self.hostile_sftp else ""
            slow = (f" --read-delay-file {self.sim_dir / 'sftp-read-delay'} --busy-marker {self.sftp_busy_marker}"
                    if self.slow_sftp_read_s > 0 else "")
            return f"{self.python} {HOSTILE_SFTP} --root {self.home}{target}{slow}"
        return f"internal-sftp -d {self.home}"

    def generate_host_key(self) -> None:
        for path in (self.host_key, self.host_key.with_suffix(".pub")):
            path.unlink(missing_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "vastsim-host",
                        "-f", str(self.host_key)], check=True, stdin=subprocess.DEVNULL)

    def add_authorized_key(self, key: str) -> bool:
        """Append a public key to authorized_keys; False when it was already there."""
        key = key.strip()
        present = self.authorized_keys.read_text().splitlines() if self.authorized_keys.exists() else []
        if key in present:
            return False
        with self.authorized_keys.open("a") as handle:
            handle.write(key + "\n")
        return True

    def log(self, line: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        with self.container_log.open("a") as handle:
            handle.write(f"{stamp} vastsim: {line}\n")

    def read_log(self) -> str:
        return self.container_log.read_text(errors="replace") if self.container_log.exists() else ""

    def remove_disk(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)

    # ---- GPU scenario -----------------------------------------------------

    def _write_gpus(self, gpus: list[dict]) -> None:
        tmp = self.gpu_state.with_suffix(".tmp")
        tmp.write_text(json.dumps({"gpus": gpus}, indent=1))
        os.replace(tmp, self.gpu_state)

    def read_gpus(self) -> list[dict]:
        try:
            return json.loads(self.gpu_state.read_text())["gpus"]
        except (OSError, ValueError, KeyError):
            return []

    def set_gpu_values(self, gpu: int | None = None, **values) -> list[dict]:
        """Change scenario values (see GPU_VALUE_NAMES) of one GPU, or all when gpu is None."""
        unknown = sorted(set(values) - set(GPU_VALUE_NAMES))
        if unknown:
            raise ValueError(f"unknown GPU value(s) {unknown}; valid: {sorted(GPU_VALUE_NAMES)}")
        gpus = self.read_gpus()
        targets = [g for g in gpus if gpu is None or g["index"] == int(gpu)]
        if not targets:
            raise ValueError(f"no GPU {gpu} on this instance")
        for target in targets:
            for name, value in values.items():
                field = GPU_VALUE_NAMES[name]
                if name == "throttle_reasons":
                    value = value if isinstance(value, str) else f"0x{int(value):016x}"
                elif name in ("power", "power_limit"):
                    value = float(value)
                else:
                    value = int(value)
                target[field] = value
        self._write_gpus(gpus)
        return gpus

    # ---- processes --------------------------------------------------------

    def process_env(self) -> dict[str, str]:
        """Environment for processes the simulator starts on the instance (never its own)."""
        return dict(self.session_env, LANG="C.UTF-8")

    @property
    def sshd_running(self) -> bool:
        return self.sshd is not None and self.sshd.poll() is None

    def start_sshd(self) -> bool:
        """Start sshd and wait until it listens (it writes its pid file after binding)."""
        os.makedirs("/run/sshd", exist_ok=True)
        pid_file = self.sim_dir / "sshd.pid"
        pid_file.unlink(missing_ok=True)
        if "VAST_TCP_PORT_22" in self.session_env:
            self.session_env["VAST_TCP_PORT_22"] = str(self.port)
        self._write_sshd_config()
        self.sshd = subprocess.Popen(
            [find_sshd() or "/usr/sbin/sshd", "-D", "-f", str(self.sim_dir / "sshd_config"),
             "-E", str(self.sim_dir / "sshd.log")],
            env=self.process_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + SSHD_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.sshd.poll() is not None:
                return False
            if pid_file.exists() and pid_file.read_text().strip():
                return True
            time.sleep(0.01)
        self.stop_sshd()
        return False

    def stop_sshd(self) -> None:
        """Kill the listening sshd (open sessions are left alone)."""
        if self.sshd is not None:
            if self.sshd.poll() is None:
                self.sshd.kill()
            self.sshd.wait()
            self.sshd = None

    def run_onstart(self, script: str) -> None:
        """Run the onstart script detached, in the home directory, output to the container log."""
        path = self.sim_dir / "onstart.sh"
        path.write_text(script if script.endswith("\n") else script + "\n")
        with self.container_log.open("a") as log:
            self.onstart = subprocess.Popen(
                ["bash", str(path)], cwd=self.home, env=self.process_env(),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)

    def reap(self) -> None:
        """Collect an onstart script that has ended (no zombies)."""
        if self.onstart is not None and self.onstart.poll() is not None:
            self.onstart = None

    def pids(self) -> list[int]:
        return find_marked_pids(self.markers)

    def kill_all(self) -> int:
        """SIGKILL sshd, its open sessions (the container stops: connections drop) and every process of the
        instance."""
        sessions = descendants(self.sshd.pid) if self.sshd_running else []
        self.stop_sshd()
        sigkill(sessions)
        wait_dead(sessions)
        killed = kill_marked_processes(self.markers) + len(sessions)
        if self.onstart is not None:
            if self.onstart.poll() is None:
                self.onstart.kill()
            self.onstart.wait()
            self.onstart = None
        return killed
