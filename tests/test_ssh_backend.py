"""`backend: ssh` against two real sshd hosts started here (each with its own port, host key and scratch folder):
host keys pinned in the ledger and a changed one refused; `armature ablation --backend ssh` packing two arms on
two hosts, one host disappearing mid-run (its sshd, supervisor and trainer killed by pid) and its arm resuming on
a host from its last pulled checkpoint; afterwards no armature process and no scratch folder on either host."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import paramiko
import pytest

from infra.vastsim.instances import (descendants, find_marked_pids, find_sshd, free_port, kill_marked_processes,
                                     sigkill)
from orchestrator.backends.remote.deploy import detached
from orchestrator.backends.remote.ssh import Connection, SshError
from orchestrator.backends.ssh.config import SshConfig
from orchestrator.backends.ssh.provider import HostRefused, SshHosts, pinned_key
from orchestrator.errors import SpecError
from orchestrator.ledger import Ledger
from orchestrator.paths import REPO_ROOT
from orchestrator.spec import load_plan
from tests.armature_helpers import armature, ledger, metric_steps, start_armature, tiny_spec, wait_for
from tests.test_vast_backend import ALLOW_DIRTY

pytestmark = pytest.mark.skipif(find_sshd() is None or os.geteuid() != 0,
                                reason="needs OpenSSH sshd and root (the hosts log in as this user)")

TOKEN = secrets.token_hex(6)
MARKER = "ARMATURE_SSH_TEST_HOST"


class SshdHost:
    """A real sshd on 127.0.0.1 with its own port and host key; every process it starts (sessions, the
    supervisor, the trainer) carries MARKER=<token>-<name> in its environment, so the test can find them."""

    def __init__(self, root: Path, name: str, client_public_key: str):
        self.name, self.dir = name, root / name
        self.dir.mkdir(parents=True)
        self.scratch = self.dir / "scratch"             # the host's ssh.hosts[].scratch_dir
        self.port = free_port()
        self.markers = {MARKER: f"{TOKEN}-{name}"}
        self.host_key = self.dir / "host_key"
        (self.dir / "authorized_keys").write_text(client_public_key + "\n")
        self.new_host_key()
        (self.dir / "sshd_config").write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {self.host_key}",
            f"PidFile {self.dir / 'sshd.pid'}", f"AuthorizedKeysFile {self.dir / 'authorized_keys'}",
            "StrictModes no", "UsePAM no", "PermitRootLogin prohibit-password", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "PrintMotd no", "Subsystem sftp internal-sftp",
            f"SetEnv {MARKER}={self.markers[MARKER]}", ""]))
        self.sshd: subprocess.Popen | None = None

    def new_host_key(self) -> None:
        for path in (self.host_key, self.host_key.with_suffix(".pub")):
            path.unlink(missing_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.host_key)], check=True)

    def start(self) -> "SshdHost":
        os.makedirs("/run/sshd", exist_ok=True)
        (self.dir / "sshd.pid").unlink(missing_ok=True)
        self.sshd = subprocess.Popen([find_sshd(), "-D", "-f", str(self.dir / "sshd_config"),
                                      "-E", str(self.dir / "sshd.log")], env={**os.environ, **self.markers},
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        wait_for(lambda: (self.dir / "sshd.pid").exists(), 10, f"sshd of {self.name}", interval=0.05)
        return self

    def disappear(self) -> int:
        """Kill sshd, its sessions and everything armature runs there (by pid), like a machine switched off."""
        killed = 0
        if self.sshd is not None:
            # the sessions of open connections too
            killed = len(sigkill([self.sshd.pid] + descendants(self.sshd.pid)))
            self.sshd.wait(10)
            self.sshd = None
        return killed + kill_marked_processes(self.markers)

    def armature_processes(self) -> list[str]:
        """Command lines of armature's processes (supervisor, watchdog, trainer) still alive on this host."""
        found = []
        for pid in find_marked_pids(self.markers):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "supervisor.py" in cmdline or "trainers." in cmdline:
                found.append(f"{pid}: {cmdline}")
        return found

    def entry(self, key: Path) -> dict:
        return {"name": self.name, "address": "127.0.0.1", "port": self.port, "user": "root",
                "identity_file": str(key), "python": sys.executable, "scratch_dir": str(self.scratch)}


@pytest.fixture
def client_key(tmp_path) -> Path:
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


@pytest.fixture
def hosts(tmp_path, client_key):
    made = [SshdHost(tmp_path / "hosts", name, client_key.with_suffix(".pub").read_text().strip()).start()
            for name in ("a", "b")]
    yield made
    for host in made:
        host.disappear()


def fast_section(hosts: list[SshdHost], key: Path) -> dict:
    return {"hosts": [h.entry(key) for h in hosts], "ssh_timeout_seconds": 5, "ssh_retries": 2,
            "install_timeout_seconds": 120, "poll_seconds": 0.5, "pull_checkpoints_every_minutes": 0.02,
            "heartbeat_seconds": 0.5, "health_seconds": 5, "heartbeat_timeout_seconds": 6, "stop_grace_seconds": 10,
            "rejoin_seconds": 1, "orchestrator_silence_seconds": 300}


def test_host_keys_are_pinned_in_the_ledger_and_a_changed_key_is_refused(tmp_path, hosts, client_key):
    host = hosts[0]
    db = Ledger(tmp_path / "ledger.sqlite")
    cfg = SshConfig.model_validate(fast_section([host], client_key))
    provider = SshHosts(db, "r1", cfg, REPO_ROOT)
    first = provider.reach(cfg.hosts[0], time.monotonic() + 10)
    pinned = pinned_key(db, cfg.hosts[0])
    assert pinned and first.host.host_key == pinned
    assert pinned.split()[1] == host.host_key.with_suffix(".pub").read_text().split()[1]
    assert Path(first.paths.base) == host.scratch / "r1" and (host.scratch / "r1" / "supervisor.py").exists()
    assert provider.query(["a"]) == {"a": "ready"}
    assert provider.list_ours("") == ["a"]
    first.conn.close()
    provider.terminate("a")
    assert not host.scratch.exists() and host.armature_processes() == []

    host.disappear()
    host.new_host_key()                                 # the machine was replaced, or someone is in the middle
    host.start()
    with pytest.raises(HostRefused, match=r"host a: host key of 127.0.0.1:\d+ changed.*forget the old key"):
        SshHosts(db, "r2", cfg, REPO_ROOT).reach(cfg.hosts[0], time.monotonic() + 10)
    assert pinned_key(db, cfg.hosts[0]) == pinned, "the old pin stays until the user removes it"
    assert not host.scratch.exists(), "nothing was run on the refused host"

    host.disappear()
    with pytest.raises(SshError):                       # not there at all: unreachable, not refused
        SshHosts(db, "r3", cfg, REPO_ROOT).reach(cfg.hosts[0], time.monotonic())


def test_a_command_whose_connection_drops_fails_at_once_as_a_lost_connection(hosts, client_key):
    """sshd killed under a running command (a stopped, outbid or vanished host): the command ends as a lost
    connection when the connection drops, not at its timeout (the read loop used to spin a core until then)."""
    host = hosts[0]
    conn = Connection("127.0.0.1", host.port, paramiko.PKey.from_path(client_key), None, timeout=5, retries=1)
    assert conn.run("echo reached").stdout.strip() == "reached"
    started = time.monotonic()
    switch_off = threading.Timer(1.0, host.disappear)
    switch_off.start()
    with pytest.raises(SshError, match="ConnectionLost: the connection closed while running"):
        conn.run(["bash", "-s"], stdin=b"sleep 60\n", timeout=30, retries=1)
    assert time.monotonic() - started < 15, "seen when the connection dropped, not at the command's timeout"
    switch_off.join()             # the connection drops while disappear() still runs: let it end before teardown
    conn.close()


def test_a_silent_orchestrator_leaves_no_armature_process_or_folder_on_the_host(tmp_path, hosts, client_key):
    """The dead-man switch of a host of your own: no contact for orchestrator_silence_seconds and the watchdog
    stops the supervisor and its trainer, removes the run's scratch folder, and exits."""
    host = hosts[0]
    section = dict(fast_section([host], client_key), install_timeout_seconds=1, orchestrator_silence_seconds=3)
    cfg = SshConfig.model_validate(section)
    reached = SshHosts(Ledger(tmp_path / "ledger.sqlite"), "quiet", cfg, REPO_ROOT).reach(
        cfg.hosts[0], time.monotonic() + 10)
    code = tmp_path / "code"
    (code / "trainers").mkdir(parents=True)
    (code / "trainers" / "__init__.py").write_text("")
    (code / "trainers" / "sleepy.py").write_text("import time\ntime.sleep(600)\n")
    work = reached.paths.work(1)
    reached.conn.run(["mkdir", "-p", work], check=True)
    reached.conn.run(detached(work, [sys.executable, reached.paths.supervisor, "run", "--workdir", work, "--code",
                                     str(code), "--python", sys.executable, "--trainer", "sleepy", "--gpus", ""],
                              work + "/supervisor.log"), check=True)
    reached.conn.close()
    running = wait_for(lambda: len(host.armature_processes()) == 3 and host.armature_processes(), 10,
                       "watchdog, supervisor and trainer")
    assert any("trainers.sleepy" in line for line in running)
    wait_for(lambda: not host.armature_processes() and not Path(reached.paths.base).exists(), 20,
             "the dead-man switch to stop armature and remove its folder")


def test_the_ssh_section_is_checked_before_any_run(tmp_path):
    path = tiny_spec(tmp_path, "name: s\ntrainer: vqvae\nmetric: {name: recon_mse, mode: min}\nbackend: ssh\n"
                               "ssh:\n  hosts:\n    - {name: a, address: h, gpus: -1}\n")
    with pytest.raises(SpecError, match=r"ssh\.hosts\.0\.gpus"):
        load_plan(str(path))
    path = tiny_spec(tmp_path, "name: s\ntrainer: vqvae\nmetric: {name: recon_mse, mode: min}\nbackend: ssh\n")
    with pytest.raises(SpecError, match=r"ssh.*hosts"):
        load_plan(str(path))


def test_ablation_on_two_hosts_survives_one_going_away(tmp_path, hosts, client_key):
    a, b = hosts
    home = tmp_path / "home"
    section = json.dumps(fast_section(hosts, client_key))
    path = tiny_spec(tmp_path, f"""name: mine
trainer: vqvae
metric: {{name: recon_mse, mode: min}}
base: {{steps: 400, eval_every: 400, checkpoint_every: 20, log_every: 10, batch_size: 16,
        data.num_train: 128, data.num_heldout: 32}}
arms:
  - name: base
  - name: small
    set: {{model.codebook_size: 32}}
resources: {{gpus: 0}}
ssh: {section}
""")
    extra = ["--allow-dirty"] if ALLOW_DIRTY else []
    proc = start_armature(home, "ablation", str(path), "--backend", "ssh", "--run-id", "own", "--metrics-port",
                          "-1", *extra, log=tmp_path / "log")
    try:
        def b_mid_run():
            if not (home / "ledger.sqlite").exists():
                return None
            row = ledger(home).query_one(
                "SELECT r.arm, r.last_step FROM attempts t JOIN arm_runs r ON r.id = t.arm_run_id "
                "WHERE r.run_id='own' AND t.host='ssh-b' AND t.ended_at IS NULL")
            if row and (row["last_step"] or 0) >= 40 and (home / "own" / row["arm"] / "seed0" / "checkpoints" /
                                                           "last.pt").exists():
                return row["arm"]
            return None

        arm_on_b = wait_for(b_mid_run, 120, "an arm on host b past step 40 with a pulled checkpoint")
        assert b.disappear() >= 3, "sshd, the supervisor and the trainer of host b were running"
        wait_for(lambda: ledger(home).query_one(
            "SELECT 1 AS x FROM attempts t JOIN arm_runs r ON r.id = t.arm_run_id WHERE r.run_id='own' "
            "AND t.host='ssh-b' AND t.state='preempted'"), 60, "the attempt on b to end preempted")
        wait_for(lambda: ledger(home).query_one(
            "SELECT 1 AS x FROM attempts t JOIN arm_runs r ON r.id = t.arm_run_id WHERE r.run_id='own' AND r.arm=? "
            "AND t.host='ssh-a' AND t.ended_at IS NULL", (arm_on_b,)), 120, f"arm {arm_on_b} to resume on host a")
        b.start()                                       # back after a reboot: armature's leftovers are cleaned
        assert proc.wait(180) == 0, (tmp_path / "log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)

    db = ledger(home)
    arm_runs = {r["arm"]: r for r in db.arm_runs("own")}
    assert {arm: r["state"] for arm, r in arm_runs.items()} == {"base": "succeeded", "small": "succeeded"}
    hosts_used = {t["host"] for r in arm_runs.values() for t in db.attempts(r["id"])}
    assert hosts_used == {"ssh-a", "ssh-b"}, "the arms were spread over both hosts"
    attempts = db.attempts(arm_runs[arm_on_b]["id"])
    assert [(t["host"], t["state"]) for t in attempts] == [("ssh-b", "preempted"), ("ssh-a", "succeeded")]
    resumed = db.query("SELECT MIN(step) AS first FROM metrics WHERE attempt_id=?", (attempts[-1]["id"],))[0]
    assert resumed["first"] > 20, "the retry resumed from the pulled checkpoint, not from step 0"
    steps = metric_steps(home / "own" / arm_on_b / "seed0")
    assert steps == sorted(set(steps)) and steps[-1] == 400
    assert (home / "own" / arm_on_b / "seed0" / "summary.json").exists()
    assert "results.md" in os.listdir(home / "own")
    assert db.query("SELECT * FROM instances") == [] and db.query("SELECT * FROM charges") == [], "nothing billed"

    for host in hosts:
        assert host.armature_processes() == [], f"armature still runs on host {host.name}"
        assert not host.scratch.exists(), f"scratch folder left on host {host.name}"


def test_cancel_after_the_orchestrator_died_stops_armature_on_the_hosts_at_once(tmp_path, hosts, client_key):
    """`armature cancel` of a run whose orchestrator was killed -9: the hosts' supervisors and trainers are stopped
    and the scratch folders removed now, not when the dead-man switch fires (300 s here)."""
    a = hosts[0]
    home = tmp_path / "home"
    path = tiny_spec(tmp_path, f"""name: gone
trainer: vqvae
metric: {{name: recon_mse, mode: min}}
base: {{steps: 100000, eval_every: 100000, checkpoint_every: 50, log_every: 10, batch_size: 16,
        data.num_train: 128, data.num_heldout: 32}}
arms:
  - name: base
resources: {{gpus: 0}}
ssh: {json.dumps(fast_section([a], client_key))}
""")
    extra = ["--allow-dirty"] if ALLOW_DIRTY else []
    proc = start_armature(home, "ablation", str(path), "--backend", "ssh", "--run-id", "gone", "--metrics-port",
                          "-1", *extra, log=tmp_path / "log")
    try:
        wait_for(lambda: any("trainers.vqvae" in line for line in a.armature_processes()), 120,
                 "the trainer on host a")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert a.armature_processes(), "the orchestrator's death leaves the host's supervisor and trainer running"

    result = armature(home, "cancel", "gone", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "host a: armature stopped and its scratch folder removed" in result.stdout, result.stdout
    assert a.armature_processes() == [] and not a.scratch.exists()
    db = ledger(home)
    assert db.get_run("gone")["state"] == "cancelled"
    assert [t["state"] for r in db.arm_runs("gone") for t in db.attempts(r["id"])] == ["cancelled"]
