"""The provider of machines you already have: nothing is rented, so "launch" finds a host, "terminate" cleans it.

    hosts = SshHosts(ledger, run_id, cfg, repo_root)
    hosts.launch(LaunchRequest(label))      the configured host names (they exist already; asking twice is the same)
    hosts.wait_ready(name, deadline, stop)  SSH answers with the pinned key: Host (the runtime then deploys);
                                            LaunchCancelled once `stop` is set while it does not answer
    hosts.query(names)                      "ready" or "gone" per host (a plain SSH command)
    hosts.terminate(name, reason)           every armature process of this run stopped, its scratch folder removed:
                                            returns only when the host confirms (raises otherwise)
    hosts.list_ours(identity)               hosts that still hold a scratch folder of this run

Host keys are pinned at first use and kept in the ledger (events `ssh.host_key`, one per address and port, across
runs): a host that later offers another key is refused.
"""

from __future__ import annotations

import json
import logging
import shlex
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paramiko

from orchestrator.backends.provision import CAPABILITIES, Host, HostState, LaunchCancelled, LaunchRequest
from orchestrator.backends.remote.deploy import InstancePaths, install_helper_and_watchdog, resolve_paths
from orchestrator.backends.remote.settings import RuntimeSettings
from orchestrator.backends.remote.ssh import Connection, HostKeyChanged, SshError
from orchestrator.backends.ssh.config import SshConfig, SshHost
from orchestrator.errors import UserError
from orchestrator.ledger import Ledger
from orchestrator.paths import REPO_ROOT

log = logging.getLogger(__name__)

PIN_EVENT = "ssh.host_key"


class HostRefused(Exception):
    """A host that must not be used: its host key changed, or it cannot be logged into."""


# ---- host keys in the ledger -------------------------------------------------------------------------

def endpoint(host: SshHost) -> str:
    return f"{host.address}:{host.port}"


def pinned_key(ledger: Ledger, host: SshHost) -> str | None:
    """The host key pinned for this address and port, by any run of this ledger; None before first use."""
    for row in ledger.query("SELECT detail_json FROM events WHERE kind=? ORDER BY id DESC", (PIN_EVENT,)):
        detail = json.loads(row["detail_json"])
        if detail.get("endpoint") == endpoint(host):
            return detail.get("host_key")
    return None


def pin_key(ledger: Ledger, run_id: str, host: SshHost, host_key: str) -> None:
    ledger.event(None, PIN_EVENT, endpoint=endpoint(host), host_key=host_key, name=host.name, first_run=run_id)


def unpin_command(ledger: Ledger, host: SshHost) -> str:
    return (f"sqlite3 {ledger.path} \"DELETE FROM events WHERE kind='{PIN_EVENT}' AND "
            f"json_extract(detail_json, '$.endpoint')='{endpoint(host)}'\"")


def load_identity(host: SshHost) -> paramiko.PKey:
    try:
        return paramiko.PKey.from_path(host.identity_file)
    except FileNotFoundError:
        raise UserError(f"ssh.hosts[{host.name}].identity_file: {host.identity_file} does not exist "
                        "(a private key without passphrase that the host accepts)") from None
    except (paramiko.SSHException, ValueError, OSError) as exc:
        raise UserError(f"ssh.hosts[{host.name}].identity_file: cannot read {host.identity_file} as a private "
                        f"key without passphrase: {exc}") from None


# ---- the provider ----------------------------------------------------------------------------------------

@dataclass
class Reached:
    """A host that answered: its connection, its folders, and the Host handed to the runtime."""
    host: Host
    conn: Connection
    paths: InstancePaths
    settings: RuntimeSettings


class SshHosts:
    name = "ssh"
    capabilities = CAPABILITIES["ssh"]

    def __init__(self, ledger: Ledger, run_id: str, cfg: SshConfig, repo_root: Path):
        self.ledger, self.run_id, self.cfg, self.repo_root = ledger, run_id, cfg, Path(repo_root)
        self.hosts = {h.name: h for h in cfg.hosts}
        self._keys: dict[str, paramiko.PKey] = {}
        self._lock = threading.Lock()

    def key_of(self, host: SshHost) -> paramiko.PKey:
        with self._lock:
            if host.name not in self._keys:
                self._keys[host.name] = load_identity(host)
            return self._keys[host.name]

    def connection(self, host: SshHost) -> Connection:
        return Connection(host.address, host.port, self.key_of(host), pinned_key(self.ledger, host),
                          timeout=self.cfg.ssh_timeout_seconds, retries=self.cfg.ssh_retries, user=host.user,
                          on_pin=lambda key: pin_key(self.ledger, self.run_id, host, key))

    # ---- the seam ----

    def launch(self, request: LaunchRequest) -> list[str]:
        return list(self.hosts)

    def wait_ready(self, handle: str, deadline: float, stop: threading.Event | None = None) -> Host:
        return self.reach(self.hosts[handle], deadline, stop).host

    def reach(self, host: SshHost, deadline: float, stop: threading.Event | None = None) -> Reached:
        """Log in (pinning the host key at first use), stop what an earlier orchestrator of this run left there,
        and install the supervisor and its dead-man switch. Raises HostRefused for a changed key or a refused
        login, SshError while it does not answer by `deadline`, LaunchCancelled once `stop` is set."""
        stop = stop or threading.Event()
        settings = self.cfg.runtime(host, self.run_id)
        while True:
            conn = self.connection(host)
            try:
                paths = conn.call(lambda remote: resolve_paths(remote, settings, host.python))
                self._cleanup(conn, paths)
                install_helper_and_watchdog(conn, paths, settings, self.repo_root)
                return Reached(Host(name=host.name, address=host.address, port=host.port, user=host.user,
                                    host_key=conn.pinned_host_key, gpus=host.gpus, python=host.python,
                                    scratch_dir=paths.base), conn, paths, settings)
            except HostKeyChanged as exc:
                conn.close()
                self.ledger.event(self.run_id, "ssh.host_key_changed", host=host.name, detail=str(exc))
                raise HostRefused(f"host {host.name}: {exc}. If you reinstalled that machine, forget the old key "
                                  f"with: {unpin_command(self.ledger, host)}") from None
            except SshError as exc:
                conn.close()
                if isinstance(exc.__cause__, paramiko.AuthenticationException):
                    raise HostRefused(f"host {host.name}: {host.user}@{endpoint(host)} refused the key "
                                      f"{host.identity_file}") from None
                if time.monotonic() >= deadline:
                    raise
                if stop.wait(min(2.0, max(0.0, deadline - time.monotonic()))):
                    raise LaunchCancelled(f"stopped while host {host.name} did not answer: {exc}") from None

    def query(self, handles: list[str]) -> dict[str, HostState]:
        states: dict[str, HostState] = {}
        for name in handles:
            conn = self.connection(self.hosts[name])
            try:
                conn.run(["true"], check=True, retries=1)
                states[name] = "ready"
            except HostKeyChanged:
                states[name] = "unknown"
            except SshError:
                states[name] = "gone"
            finally:
                conn.close()
        return states

    def terminate(self, handle: str, reason: str = "") -> None:
        host = self.hosts[handle]
        settings = self.cfg.runtime(host, self.run_id)
        conn = self.connection(host)
        try:
            paths = conn.call(lambda remote: resolve_paths(remote, settings, host.python))
            self._cleanup(conn, paths)
        finally:
            conn.close()

    def list_ours(self, identity: str) -> list[str]:
        ours = []
        for name, host in self.hosts.items():
            settings = self.cfg.runtime(host, self.run_id)
            conn = self.connection(host)
            try:
                paths = conn.call(lambda remote: resolve_paths(remote, settings, host.python))
                if conn.run(["test", "-d", paths.base]).exit_code == 0:
                    ours.append(name)
            except SshError:
                continue
            finally:
                conn.close()
        return ours

    # ---- cleaning a host ----

    def clean(self, name: str) -> str | None:
        """terminate(), for a caller that goes on: None once the host confirmed it, else why not."""
        try:
            self.terminate(name)
        except HostKeyChanged as exc:
            return f"{exc}; nothing was run on it"
        except (SshError, OSError, UserError) as exc:
            return str(exc)
        self.ledger.event(self.run_id, "ssh.cleaned", host=name)
        return None

    def _cleanup(self, conn: Connection, paths: InstancePaths) -> None:
        """Stop every armature process of this run on the host and remove its scratch folder (and the parent
        folder when that is left empty); confirmed by the host, else SshError."""
        q = shlex.quote
        base, parent = q(paths.base), q(str(Path(paths.base).parent))
        script = (f"if [ -f {q(paths.supervisor)} ]; then {q(paths.python)} {q(paths.supervisor)} cleanup "
                  f"--base {base} --grace-seconds {self.cfg.stop_grace_seconds:g} >/dev/null; fi; "
                  f"rm -rf {base}; rmdir {parent} 2>/dev/null; test ! -e {base}")
        result = conn.run(["sh", "-c", script], timeout=self.cfg.stop_grace_seconds + 30)
        if result.exit_code != 0:
            raise SshError(f"could not clean {paths.base} on {conn.host}:{conn.port}: {result.tail(5)}")


def clean_hosts(ledger: Ledger, run_id: str, cfg: SshConfig) -> list[tuple[str, str | None]]:
    """Stop a run's armature processes on each of its hosts and remove their scratch folders: (host, None when
    done, else why not)."""
    hosts = SshHosts(ledger, run_id, cfg, REPO_ROOT)
    return [(host.name, hosts.clean(host.name)) for host in cfg.hosts]
