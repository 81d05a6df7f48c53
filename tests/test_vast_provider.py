"""The vast provider layer, deploy rules, reap and the dead-man switch, against the simulator (no trainer)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import threading
import time

import pytest

from infra.vastsim import Simulator
from infra.vastsim.instances import find_sshd
from orchestrator.backends.vast import VastBackend, VastConfig, make_client, provider, reap
from orchestrator.backends.remote.attempt import RemoteAttempt
from orchestrator.backends.vast.reap import reap_keys
from orchestrator.backends.remote.deploy import install_helper_and_watchdog, make_code_bundle, resolve_paths
from orchestrator.backends.vast.boot import boot_watchdog_onstart
from orchestrator.backends.vast.offers import build_query, rank
from orchestrator.backends.remote.ssh import Connection, HostKeyChanged, load_or_create_keypair
from orchestrator.errors import UserError
from orchestrator.ledger import Ledger
from orchestrator.paths import REPO_ROOT

pytestmark = pytest.mark.skipif(find_sshd() is None, reason="OpenSSH sshd is not installed")

API_KEY = "vk-" + secrets.token_hex(20)
SECOND_KEY = "vk-" + secrets.token_hex(20)      # another key of the same account (a teammate's)
OFFERS = [{"id": 4001, "machine_id": 801, "gpu_name": "RTX 4090", "num_gpus": 1, "dph_total": 0.2,
           "reliability2": 0.99, "boot_delay_s": 0.3},
          {"id": 4002, "machine_id": 802, "gpu_name": "RTX 4090", "num_gpus": 1, "dph_total": 0.3,
           "reliability2": 0.99, "boot_delay_s": 0.3}]


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    simulator = Simulator(tmp_path_factory.mktemp("vastsim"), api_key=API_KEY, offers=OFFERS,
                          extra_api_keys=(SECOND_KEY,)).start()
    yield simulator
    simulator.stop()


@pytest.fixture
def client(sim, monkeypatch):
    monkeypatch.setenv("VAST_API_KEY", API_KEY)
    yield make_client(sim.url)
    sim.clear_faults()
    for row in sim.instances():
        sim.destroy_instance(row["id"])


@pytest.fixture
def ledger(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.create_run("r", name="r", trainer="vqvae", backend="vast", spec_path=None, metric=None, metric_mode=None,
                      baseline=None, budget_dollars=None, git_commit=None, git_diff_hash=None)
    return ledger


def config(sim, **overrides) -> VastConfig:
    values = dict(server_url=sim.url, min_cuda=None, disk_gb=10, status_poll_seconds=0.1, api_backoff_seconds=0.05,
                  ready_deadline_seconds=20, ssh_timeout_seconds=10, poll_seconds=0.2, destroy_deadline_seconds=20,
                  install_timeout_seconds=1)
    values.update(overrides)
    return VastConfig(**values)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def rent(client, ledger, cfg, tmp_path, offer_id: int, label: str):
    key = load_or_create_keypair(tmp_path / "id_ed25519", "test")
    provider.register_ssh_key(client, cfg, key.public_line)
    offer = next(o for o in provider.search_offers(client, cfg) if o["id"] == offer_id)
    instance_id = provider.launch(client, ledger, cfg, run_id="r", offer=offer, label=label,
                                  public_key=key.public_line, env={})
    host, port, host_key = provider.wait_ready(client, ledger, cfg, instance_id, key, threading.Event())
    return instance_id, key, Connection(host, port, key.private, host_key, timeout=10, retries=2)


# ---- offers ----------------------------------------------------------------------------------------

def test_offer_query_sends_numbers_as_strings():
    query = build_query(VastConfig(gpu_name="RTX_4090", num_gpus=2, min_reliability=0.98, max_dollars_per_hour=0.5,
                                   min_gpu_memory_gb=24, min_cuda=12.1))
    assert query["gpu_name"] == {"eq": "RTX 4090"}
    assert query["num_gpus"] == {"eq": "2"}
    assert query["reliability"] == {"gte": "0.98"}
    assert query["dph_total"] == {"lte": "0.5"}
    assert query["gpu_ram"] == {"gte": "24000"}
    assert query["cuda_max_good"] == {"gte": "12.1"}
    assert query["verified"] == {"eq": True} and query["rentable"] == {"eq": True}


def test_offers_ranked_by_price_per_reliable_hour_without_failed_machines():
    offers = [{"id": 1, "machine_id": 10, "dph_total": 0.30, "reliability2": 0.99},
              {"id": 2, "machine_id": 20, "dph_total": 0.28, "reliability2": 0.80},
              {"id": 3, "machine_id": 30, "dph_total": 0.25, "reliability2": 0.99}]
    assert [o["id"] for o in rank(offers, set())] == [3, 1, 2]
    assert [o["id"] for o in rank(offers, {"30"})] == [1, 2]
    assert [o["id"] for o in rank(offers, set(), {"1"})] == [3, 2]


# ---- deploy rules -------------------------------------------------------------------------------------

def git_repo(path, dirty: bool):
    path.mkdir()
    for args in (["init", "-q"], ["config", "user.email", "t@t"], ["config", "user.name", "t"]):
        subprocess.run(["git", "-C", str(path), *args], check=True)
    (path / "a.py").write_text("x = 1\n")
    subprocess.run(["git", "-C", str(path), "add", "a.py"], check=True)
    subprocess.run(["git", "-C", str(path), "commit", "-q", "-m", "one"], check=True)
    if dirty:
        (path / "a.py").write_text("x = 2\n")
        (path / "new.py").write_text("y = 3\n")
    return path


def test_dirty_tree_is_refused_unless_allowed(tmp_path):
    repo = git_repo(tmp_path / "repo", dirty=True)
    with pytest.raises(UserError, match="uncommitted changes.*a.py"):
        make_code_bundle(repo, tmp_path / "out", allow_dirty=False)
    bundle = make_code_bundle(repo, tmp_path / "out", allow_dirty=True)
    assert bundle.diff_hash and bundle.patch.read_bytes().count(b"x = 2") == 1
    assert bundle.untracked is not None and bundle.version.endswith(bundle.diff_hash[:8])
    clean = make_code_bundle(git_repo(tmp_path / "clean", dirty=False), tmp_path / "out2", allow_dirty=False)
    assert clean.diff_hash is None and clean.patch is None and clean.bundle.stat().st_size > 0


def test_deploy_ships_the_tree_at_the_commit_not_its_history(tmp_path):
    repo = git_repo(tmp_path / "repo", dirty=False)
    git = lambda *args: subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                                       text=True).stdout.strip()
    (repo / "secret.txt").write_text("token-once-committed\n")
    git("add", "secret.txt")
    git("commit", "-q", "-m", "oops")
    secret_blob = git("rev-parse", "HEAD:secret.txt")
    git("rm", "-q", "secret.txt")
    git("commit", "-q", "-m", "remove the secret")
    refs_before = git("for-each-ref")

    bundle = make_code_bundle(repo, tmp_path / "out", allow_dirty=False)
    assert bundle.commit == git("rev-parse", "HEAD") and git("for-each-ref") == refs_before
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(bundle.bundle), str(clone)], check=True, capture_output=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "-q", "--detach", bundle.shipped], check=True)
    shipped = subprocess.run(["git", "-C", str(clone), "rev-list", "--all", "--objects"], check=True,
                             capture_output=True, text=True).stdout
    assert len(subprocess.run(["git", "-C", str(clone), "rev-list", "--all"], capture_output=True,
                              text=True).stdout.split()) == 1
    assert secret_blob not in shipped
    assert subprocess.run(["git", "-C", str(clone), "cat-file", "-e", secret_blob]).returncode != 0
    assert sorted(p.name for p in clone.iterdir() if p.name != ".git") == ["a.py"]
    assert git("rev-parse", "HEAD^{tree}") == subprocess.run(
        ["git", "-C", str(clone), "rev-parse", "HEAD^{tree}"], capture_output=True, text=True).stdout.strip()


def test_backend_refuses_a_dirty_tree_and_a_shipped_secret(tmp_path, sim, monkeypatch):
    monkeypatch.setenv("VAST_API_KEY", API_KEY)
    repo = git_repo(tmp_path / "repo", dirty=True)
    backend = VastBackend(Ledger(tmp_path / "l.sqlite"), "r", tmp_path / "run", config(sim), None, repo_root=repo)
    with pytest.raises(UserError, match="uncommitted changes"):
        backend.start()
    (repo / "settings.env").write_text(f"VAST_API_KEY={API_KEY}\n")
    with pytest.raises(UserError, match="settings.env contains the provider's API key"):
        make_code_bundle(repo, tmp_path / "out", allow_dirty=True, secrets=(API_KEY,))
    # Committed with the key, then edited (not committed) without it: HEAD's tree would still ship it.
    subprocess.run(["git", "-C", str(repo), "add", "settings.env"], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "k"],
                   check=True)
    (repo / "settings.env").write_text("VAST_API_KEY=\n")
    with pytest.raises(UserError, match="settings.env at HEAD contains the provider's API key"):
        make_code_bundle(repo, tmp_path / "out", allow_dirty=True, secrets=(API_KEY,))


def test_missing_api_key_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.delenv("VAST_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    with pytest.raises(UserError, match="no Vast.ai API key: set VAST_API_KEY"):
        make_client("http://127.0.0.1:9")


# ---- SSH, teardown, dead-man switch, reap ------------------------------------------------------------------

def test_host_key_pinned_then_a_changed_key_is_refused(client, ledger, sim, tmp_path):
    cfg = config(sim)
    instance_id, key, conn = rent(client, ledger, cfg, tmp_path, 4001, "armature:r:1")
    row = ledger.instance(instance_id)
    assert conn.run(["echo", "it's quoted; $HOME"], check=True).stdout == "it's quoted; $HOME\n"
    conn.close()
    sim.change_host_key(int(row["provider_instance_id"]))
    pinned = Connection(row["ssh_host"], row["ssh_port"], key.private, row["host_key"], timeout=10, retries=3)
    with pytest.raises(HostKeyChanged, match="changed.*refusing to connect"):
        pinned.run(["true"])
    assert provider.terminate(client, ledger, cfg, instance_id, reason="test")
    assert ledger.instance(instance_id)["destroyed_at"] is not None


def test_teardown_retries_until_the_destroy_is_confirmed(client, ledger, sim, tmp_path):
    cfg = config(sim, api_deadline_seconds=2)
    key = load_or_create_keypair(tmp_path / "id_ed25519", "test")
    offer = next(o for o in provider.search_offers(client, cfg) if o["id"] == 4002)
    instance_id = provider.launch(client, ledger, cfg, run_id="r", offer=offer, label="armature:r:2",
                                  public_key=key.public_line, env={})
    sim.set_faults(destroy_fail_for_s=1.5)
    assert provider.terminate(client, ledger, cfg, instance_id, reason="test")
    assert len(ledger.events("r", "instance.destroy_retry")) >= 1
    row = ledger.instance(instance_id)
    assert row["state"] == "destroyed" and sim.show_instance(int(row["provider_instance_id"])) is None


def test_create_that_never_answered_is_settled_by_label(client, ledger, sim):
    cfg = config(sim, create_timeout_seconds=1.0, create_lookup_seconds=2.0)   # "not found" proves nothing before
    instance_id = ledger.add_instance(run_id="r", provider="vast", label="armature:r:never")
    assert provider.terminate(client, ledger, cfg, instance_id, reason="test")
    assert ledger.instance(instance_id)["state"] == "failed_create"
    assert ledger.live_instances("r") == []
    # A create whose answer was lost, sent twice (as the SDK's own retry would): a live row until both are found
    # by the label, recorded and destroyed.
    twice = ledger.add_instance(run_id="r", provider="vast", label="armature:r:twice")
    ledger.update_instance(twice, state="create_unknown")
    rented = [client.create_instance(4001, image="img", disk=10, label="armature:r:twice")["new_contract"]
              for _ in range(2)]
    assert [r["id"] for r in ledger.live_instances("r")] == [twice]
    assert provider.terminate(client, ledger, cfg, twice, reason="test")
    assert all(sim.show_instance(i) is None for i in rented)
    recorded = ledger.query("SELECT * FROM instances WHERE label='armature:r:twice'")
    assert sorted(r["provider_instance_id"] for r in recorded) == sorted(map(str, rented))
    assert all(r["destroyed_at"] is not None for r in recorded) and ledger.live_instances("r") == []


def test_a_create_whose_answer_is_lost_is_found_by_label_and_recorded_once(client, ledger, sim, tmp_path):
    """The create rents the instance, then answers 502, or answers after the client gave up; the list lags."""
    cfg = config(sim, create_timeout_seconds=1.0, create_lookup_seconds=10)
    key = load_or_create_keypair(tmp_path / "id_ed25519", "test")
    offer = next(o for o in provider.search_offers(client, cfg) if o["id"] == 4001)
    launched, earlier = [], {i["id"] for i in sim.instances(include_destroyed=True)}
    for faults in ({"create_then_502": 1}, {"create_then_stall": 1, "create_stall_s": 2.5}):
        sim.set_faults(list_lag_s=1.0, **faults)
        launched.append(provider.launch(client, ledger, cfg, run_id="r", offer=offer, label="armature:r:1",
                                        public_key=key.public_line, env={}))
    rented = [i for i in sim.instances(include_destroyed=True) if i["id"] not in earlier]
    rows = [ledger.instance(i) for i in launched]
    assert sorted(str(r["id"]) for r in rented) == sorted(r["provider_instance_id"] for r in rows)
    assert [r["state"] for r in rows] == ["booting", "booting"]
    assert {r["label"] for r in rented} == {r["label"] for r in rows} == {f"armature:r:1:{i}" for i in launched}
    assert len(ledger.events("r", "instance.found_by_label")) == 2
    for instance_id in launched:
        assert provider.terminate(client, ledger, cfg, instance_id, reason="test")
    assert sim.instances() == [] and ledger.live_instances("r") == []


def test_dead_man_switch_destroys_a_silent_or_too_old_instance(client, ledger, sim, tmp_path):
    silent_cfg = config(sim, orchestrator_silence_seconds=2.0)
    old_cfg = config(sim, orchestrator_silence_seconds=600, max_lifetime_hours=2.5 / 3600)
    silent_id, _, silent = rent(client, ledger, silent_cfg, tmp_path, 4001, "armature:r:silent")
    old_id, _, old = rent(client, ledger, old_cfg, tmp_path, 4002, "armature:r:old")
    for cfg, conn in ((silent_cfg, silent), (old_cfg, old)):
        paths = conn.call(lambda remote: resolve_paths(remote, cfg.runtime))
        install_helper_and_watchdog(conn, paths, cfg.runtime, REPO_ROOT)
        conn.close()                                  # the orchestrator goes quiet
    provider_ids = [int(ledger.instance(i)["provider_instance_id"]) for i in (silent_id, old_id)]
    wait_for(lambda: all(sim.show_instance(p) is None for p in provider_ids), 30, "the watchdogs to destroy")
    for instance_id in (silent_id, old_id):
        assert provider.terminate(client, ledger, silent_cfg, instance_id, reason="confirm")
        assert ledger.instance(instance_id)["destroyed_at"] is not None


def test_each_contact_can_shorten_the_dead_man_silence(client, ledger, sim, tmp_path):
    """Armed for 600 s, both switches (boot's and the supervisor's) obey the shorter silence the orchestrator's
    last poll wrote (what the remaining budget pays for): an orphan then bills seconds, not ten minutes."""
    cfg = config(sim, orchestrator_silence_seconds=600)
    key = load_or_create_keypair(tmp_path / "id_ed25519", "test")
    provider.register_ssh_key(client, cfg, key.public_line)
    offer = next(o for o in provider.search_offers(client, cfg) if o["id"] == 4001)
    for with_supervisor in (False, True):
        instance_id = provider.launch(client, ledger, cfg, run_id="r", offer=offer,
                                      label=f"armature:r:s{int(with_supervisor)}", public_key=key.public_line,
                                      env={}, onstart=boot_watchdog_onstart(cfg))
        host, port, host_key = provider.wait_ready(client, ledger, cfg, instance_id, key, threading.Event())
        conn = Connection(host, port, key.private, host_key, timeout=10, retries=2)
        paths = conn.call(lambda remote: resolve_paths(remote, cfg.runtime))
        if with_supervisor:
            install_helper_and_watchdog(conn, paths, cfg.runtime, REPO_ROOT)
        else:                                          # only the boot switch watches: the helper alone
            conn.run(["mkdir", "-p", f"{paths.base}/work"], check=True)
            conn.call(lambda remote: remote.put_file(REPO_ROOT / "infra" / "remote" / "supervisor.py",
                                                     paths.supervisor))
        conn.run(["python3", paths.supervisor, "poll", "--workdir", f"{paths.base}/work", "--contact-file",
                  paths.contact, "--silence-seconds", "2"], check=True)
        conn.close()
        provider_id = int(ledger.instance(instance_id)["provider_instance_id"])
        wait_for(lambda: sim.show_instance(provider_id) is None, 20, "the switch to destroy the instance")
        assert provider.terminate(client, ledger, cfg, instance_id, reason="confirm")


def test_dead_man_switch_is_armed_at_boot_before_anyone_reaches_the_instance(client, ledger, sim, tmp_path):
    """An orchestrator killed while its instance boots never SSHes in: the start command destroys it."""
    cfg = config(sim, orchestrator_silence_seconds=1.5)
    key = load_or_create_keypair(tmp_path / "id_ed25519", "test")
    offer = next(o for o in provider.search_offers(client, cfg) if o["id"] == 4002)
    instance_id = provider.launch(client, ledger, cfg, run_id="r", offer=offer, label="armature:r:boot",
                                  public_key=key.public_line, env={}, onstart=boot_watchdog_onstart(cfg))
    provider_id = int(ledger.instance(instance_id)["provider_instance_id"])
    assert API_KEY not in sim.show_instance(provider_id)["onstart"]
    wait_for(lambda: sim.show_instance(provider_id) is None, 30, "the boot watchdog to destroy the instance")
    assert provider.terminate(client, ledger, cfg, instance_id, reason="confirm")
    assert ledger.instance(instance_id)["destroyed_at"] is not None


def label_of(ledger, run_id: str, attempt: int) -> str:
    return provider.instance_label(ledger.identity(), run_id, attempt) + ":1"


def test_reap_destroys_orphans_and_dry_run_does_not(client, ledger, sim):
    cfg = config(sim)
    ledger.set_run_state("r", "running", claim=True)            # a live run: this process drives it
    ledger.create_run("dead", name="d", trainer="vqvae", backend="vast", spec_path=None, metric=None,
                      metric_mode=None, baseline=None, budget_dollars=None, git_commit=None, git_diff_hash=None)
    ledger.set_run_state("dead", "failed")
    live = client.create_instance(4001, image="img", disk=10, label=label_of(ledger, "r", 1))["new_contract"]
    ghost = client.create_instance(4001, image="img", disk=10, label=label_of(ledger, "ghost-run", 7))["new_contract"]
    dead = client.create_instance(4002, image="img", disk=10, label=label_of(ledger, "dead", 3))["new_contract"]
    other = client.create_instance(4002, image="img", disk=10, label="someone-else")["new_contract"]

    listed = reap(client, ledger, dry_run=True, cfg=cfg)
    assert sorted(int(e["provider_instance_id"]) for e in listed) == sorted([ghost, dead])
    assert all(e["destroyed"] is None for e in listed)
    assert all(sim.show_instance(i) is not None for i in (live, ghost, dead, other))

    reaped = reap(client, ledger, cfg=cfg)
    assert {int(e["provider_instance_id"]): e["destroyed"] for e in reaped} == {ghost: True, dead: True}
    assert sim.show_instance(ghost) is None and sim.show_instance(dead) is None
    assert sim.show_instance(live) is not None and sim.show_instance(other) is not None
    reasons = {e["run_id"]: e["reason"] for e in reaped}
    assert "not in the ledger" in reasons["ghost-run"] and "is failed" in reasons["dead"]
    recorded = ledger.query("SELECT * FROM instances WHERE provider_instance_id IN (?, ?)", (str(ghost), str(dead)))
    assert len(recorded) == 2 and all(r["destroyed_at"] is not None for r in recorded)


def test_reap_leaves_another_ledgers_instances_alone_unless_named(client, ledger, sim, tmp_path):
    """Two ledgers (two ARMATURE_HOMEs, two people) on one account, each with its own API key."""
    cfg = config(sim)
    theirs = Ledger(tmp_path / "their-home" / "ledger.sqlite")
    assert theirs.identity() != ledger.identity() and ledger.identity() == Ledger(ledger.path).identity()
    theirs.create_run("r", name="r", trainer="vqvae", backend="vast", spec_path=None, metric=None, metric_mode=None,
                      baseline=None, budget_dollars=None, git_commit=None, git_diff_hash=None)
    their_client = make_client(sim.url, api_key=SECOND_KEY)
    their_live = their_client.create_instance(4001, image="img", disk=10, label=label_of(theirs, "r", 1))
    their_live = their_live["new_contract"]
    old_format = client.create_instance(4001, image="img", disk=10, label="armature:r:2")["new_contract"]
    ledger.set_run_state("r", "failed")                                   # our run of the same name is over
    ours = client.create_instance(4002, image="img", disk=10, label=label_of(ledger, "r", 3))["new_contract"]

    reaped = {int(e["provider_instance_id"]): e for e in reap(client, ledger, cfg=cfg)}
    assert reaped[ours]["destroyed"] is True and not reaped[ours]["foreign"]
    for foreign in (their_live, old_format):
        assert reaped[foreign]["foreign"] and reaped[foreign]["destroyed"] is None
        assert sim.show_instance(foreign) is not None
    assert theirs.identity() in reaped[their_live]["reason"]
    (seen_by_them,) = reap(their_client, theirs, dry_run=True, cfg=cfg)    # their run is live: only the old label
    assert seen_by_them["provider_instance_id"] == str(old_format) and seen_by_them["foreign"]

    (named,) = reap(client, ledger, cfg=cfg, instances={str(their_live)})
    assert named["destroyed"] is True and named["reason"].startswith("named by the user")
    assert sim.show_instance(their_live) is None and sim.show_instance(old_format) is not None


def test_reap_removes_account_keys_left_by_runs_that_died(client, ledger, sim, tmp_path):
    """A kill -9 skips the removal of the run's key from the account; reap (and the next start) removes it."""
    cfg = config(sim)
    ledger.create_run("crashed", name="c", trainer="vqvae", backend="vast", spec_path=None, metric=None,
                      metric_mode=None, baseline=None, budget_dollars=None, git_commit=None, git_diff_hash=None)
    gone = subprocess.Popen(["true"])
    gone.wait()                                                             # a pid that is no longer alive
    with ledger.write() as db:
        db.execute("UPDATE runs SET orchestrator_pid=?, orchestrator_start_time=NULL WHERE run_id='crashed'",
                   (gone.pid,))
    theirs = Ledger(tmp_path / "their-home" / "ledger.sqlite")
    owners = [(ledger, "r"), (ledger, "crashed"), (theirs, "crashed")]
    for n, (owner, run_id) in enumerate(owners):
        key = load_or_create_keypair(tmp_path / f"key{n}", provider.key_comment(owner.identity(), run_id))
        provider.register_ssh_key(client, cfg, key.public_line)

    assert [k["removed"] for k in reap_keys(client, ledger, dry_run=True, cfg=cfg)] == [False]
    (removed,) = reap_keys(client, ledger, cfg=cfg)
    assert removed["run_id"] == "crashed" and "dead" in removed["reason"] and removed["removed"]
    left = [provider.owner_of_key(k["key"]) for k in provider.list_ssh_keys(client, cfg)]
    assert provider.LabelOwner(ledger.identity(), "r") in left                          # live: kept
    assert provider.LabelOwner(theirs.identity(), "crashed") in left                    # another ledger's: kept
    assert provider.LabelOwner(ledger.identity(), "crashed") not in left


# ---- what a rented host sends back ----------------------------------------------------------------------

class RunsCode:
    """A pickle that runs a command when unpickled (what a hostile host would put in a .pt)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pull_back_takes_only_plain_regular_files_from_a_hostile_host(client, ledger, sim, tmp_path):
    """A host whose SFTP listing names files outside the attempt folder, links, a FIFO, NUL and dot names,
    and whose artifact.pt runs code when unpickled; a second attempt's honest artifact still comes back."""
    import numpy as np
    import torch

    outside = tmp_path / "outside"                       # where the escaping names aim
    outside.mkdir()
    secret = tmp_path / "secret-on-the-host.txt"         # what a link on the host points at
    secret.write_text("not yours\n")
    torch.save({"state_dict": {"w": torch.zeros(2)}, "pwn": RunsCode(tmp_path / "pwned")}, tmp_path / "evil.pt")
    torch.save({"state_dict": {"w": torch.ones(2)}, "config": {"steps": 1}, "shape": (1, 2),
                "_rng": {"numpy": np.random.get_state(), "torch": torch.get_rng_state()}}, tmp_path / "good.pt")
    sim.set_faults(offer_id=4001, hostile_sftp=str(outside))
    cfg = config(sim)
    _, _, conn = rent(client, ledger, cfg, tmp_path, 4001, "armature:r:hostile")
    paths = conn.call(lambda remote: resolve_paths(remote, cfg.runtime))
    hostile, honest = paths.work(7), paths.work(8)
    conn.run(f"mkdir -p {hostile}/out/samples {honest}/out && echo '{{\"steps\": 1}}' > {hostile}/out/summary.json"
             f" && printf png > {hostile}/out/samples/a.png && ln -s {secret} {hostile}/out/samples/real-link.png",
             check=True)
    conn.call(lambda remote: remote.put_file(tmp_path / "evil.pt", f"{hostile}/out/artifact.pt"))
    conn.call(lambda remote: remote.put_file(tmp_path / "good.pt", f"{honest}/out/artifact.pt"))
    out_dir, honest_dir = tmp_path / "run" / "arm" / "seed0", tmp_path / "run" / "arm" / "seed1"
    out_dir.mkdir(parents=True)
    honest_dir.mkdir(parents=True)

    RemoteAttempt(conn, paths, 7, out_dir, cfg.runtime).collect(None)
    RemoteAttempt(conn, paths, 8, honest_dir, cfg.runtime).collect(None)
    conn.close()

    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in (out_dir / "samples").iterdir()) == ["a.png"]
    assert sorted(p.name for p in out_dir.iterdir()) == ["samples", "summary.json"]        # no artifact.pt
    assert json.loads((out_dir / "summary.json").read_text()) == {"steps": 1}
    assert (honest_dir / "artifact.pt").read_bytes() == (tmp_path / "good.pt").read_bytes()
    assert not (tmp_path / "pwned").exists()
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert b"hostile host" not in path.read_bytes() and b"not yours" not in path.read_bytes(), path


# ---- an API that rate limits or stops answering ------------------------------------------------------

def test_rate_limits_and_outages_are_waited_out_until_the_deadline(client, ledger, sim, tmp_path):
    """30 answers of 429 (more than the old fixed count of 18 requests) are waited out by one call, the create
    included; an API that drops every connection for a while too. Only an outage past the deadline fails."""
    cfg = config(sim)
    sim.set_faults(rate_limit=30, rate_limit_retry_after=0.02)
    assert provider.list_ssh_keys(client, cfg) is not None
    assert sim.state()["faults"]["requests"]["rate_limit"] == 0
    key = load_or_create_keypair(tmp_path / "id_ed25519", "test")
    offer = next(o for o in provider.search_offers(client, cfg) if o["id"] == 4001)
    sim.set_faults(rate_limit=30)                   # Retry-After as before: the create waits as long
    instance_id = provider.launch(client, ledger, cfg, run_id="r", offer=offer, label="armature:r:limited",
                                  public_key=key.public_line, env={})
    assert ledger.instance(instance_id)["provider_instance_id"] is not None
    sim.set_faults(api_down_s=1.0)
    started = time.monotonic()
    assert provider.terminate(client, ledger, cfg, instance_id, reason="test")
    assert time.monotonic() - started >= 0.9
    sim.set_faults(api_down_s=30)
    with pytest.raises(provider.ProviderError, match=r"ConnectionError after \d+ tries in 0.5s"):
        provider.list_ssh_keys(client, config(sim, api_deadline_seconds=0.5))


def test_vast_instances_answer_the_provider_seam(client, ledger, sim, tmp_path):
    """The Vast provider through the same interface as every provider (orchestrator/backends/provision.py)."""
    from orchestrator.backends import provision
    cfg = config(sim)
    key = load_or_create_keypair(tmp_path / "id_ed25519", "test")
    seam = provider.VastInstances(client, ledger, cfg, "r", key)
    assert seam.name == "vast" and seam.capabilities.bills and seam.capabilities.rents_instances
    offer = next(o for o in provider.search_offers(client, cfg) if o["id"] == 4001)
    label = provider.instance_label(ledger.identity(), "r", 1)
    [handle] = seam.launch(provision.LaunchRequest(label, offer=offer))
    assert seam.query([handle])[handle] in ("pending", "ready")
    host = seam.wait_ready(handle, time.monotonic() + 20)
    assert host.host_key and host.port and host.name.startswith("vast-")
    assert seam.query([handle]) == {handle: "ready"}
    assert handle in seam.list_ours(ledger.identity())
    seam.terminate(handle, reason="check")
    assert ledger.instance(int(handle))["destroyed_at"] is not None
    assert seam.query([handle]) == {handle: "gone"} and handle not in seam.list_ours(ledger.identity())
    other = next(o for o in provider.search_offers(client, cfg) if o["id"] == 4002)
    [second] = seam.launch(provision.LaunchRequest(provider.instance_label(ledger.identity(), "r", 2), offer=other))
    stop = threading.Event()
    stop.set()
    with pytest.raises(provision.LaunchCancelled):
        seam.wait_ready(second, time.monotonic() + 20, stop)
    seam.terminate(second, reason="check")
    assert sim.instances() == []
