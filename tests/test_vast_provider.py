"""The vast provider layer, deploy rules, reap and the dead-man switch, against the simulator (no trainer)."""

from __future__ import annotations

import secrets
import subprocess
import threading
import time

import pytest

from infra.vastsim import Simulator
from infra.vastsim.instances import find_sshd
from orchestrator.backends.vast import VastBackend, VastConfig, make_client, provider, reap
from orchestrator.backends.vast.deploy import install_helper_and_watchdog, make_code_bundle, resolve_paths
from orchestrator.backends.vast.offers import build_query, rank
from orchestrator.backends.vast.ssh import Connection, HostKeyChanged, load_or_create_keypair
from orchestrator.errors import UserError
from orchestrator.ledger import Ledger
from orchestrator.paths import REPO_ROOT

pytestmark = pytest.mark.skipif(find_sshd() is None, reason="OpenSSH sshd is not installed")

API_KEY = "vk-" + secrets.token_hex(20)
OFFERS = [{"id": 4001, "machine_id": 801, "gpu_name": "RTX 4090", "num_gpus": 1, "dph_total": 0.2,
           "reliability2": 0.99, "boot_delay_s": 0.3},
          {"id": 4002, "machine_id": 802, "gpu_name": "RTX 4090", "num_gpus": 1, "dph_total": 0.3,
           "reliability2": 0.99, "boot_delay_s": 0.3}]


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    simulator = Simulator(tmp_path_factory.mktemp("vastsim"), api_key=API_KEY, offers=OFFERS).start()
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


def test_backend_refuses_a_dirty_tree_and_a_shipped_secret(tmp_path, sim, monkeypatch):
    monkeypatch.setenv("VAST_API_KEY", API_KEY)
    repo = git_repo(tmp_path / "repo", dirty=True)
    backend = VastBackend(Ledger(tmp_path / "l.sqlite"), "r", tmp_path / "run", config(sim), None, repo_root=repo)
    with pytest.raises(UserError, match="uncommitted changes"):
        backend.start()
    (repo / "settings.env").write_text(f"VAST_API_KEY={API_KEY}\n")
    with pytest.raises(UserError, match="settings.env contains the Vast API key"):
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
    cfg = config(sim, api_retries=2)
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
    cfg = config(sim)
    instance_id = ledger.add_instance(run_id="r", provider="vast", label="armature:r:never")
    assert provider.terminate(client, ledger, cfg, instance_id, reason="test")
    assert ledger.instance(instance_id)["state"] == "failed_create"
    assert ledger.live_instances("r") == []


def test_dead_man_switch_destroys_a_silent_or_too_old_instance(client, ledger, sim, tmp_path):
    silent_cfg = config(sim, orchestrator_silence_seconds=2.0)
    old_cfg = config(sim, orchestrator_silence_seconds=600, max_lifetime_hours=2.5 / 3600)
    silent_id, _, silent = rent(client, ledger, silent_cfg, tmp_path, 4001, "armature:r:silent")
    old_id, _, old = rent(client, ledger, old_cfg, tmp_path, 4002, "armature:r:old")
    for cfg, conn in ((silent_cfg, silent), (old_cfg, old)):
        paths = conn.call(lambda remote: resolve_paths(remote, cfg))
        install_helper_and_watchdog(conn, paths, cfg, REPO_ROOT)
        conn.close()                                  # the orchestrator goes quiet
    provider_ids = [int(ledger.instance(i)["provider_instance_id"]) for i in (silent_id, old_id)]
    wait_for(lambda: all(sim.show_instance(p) is None for p in provider_ids), 30, "the watchdogs to destroy")
    for instance_id in (silent_id, old_id):
        assert provider.terminate(client, ledger, silent_cfg, instance_id, reason="confirm")
        assert ledger.instance(instance_id)["destroyed_at"] is not None


def test_reap_destroys_orphans_and_dry_run_does_not(client, ledger, sim):
    cfg = config(sim)
    ledger.set_run_state("r", "running", claim=True)            # a live run: this process drives it
    ledger.create_run("dead", name="d", trainer="vqvae", backend="vast", spec_path=None, metric=None,
                      metric_mode=None, baseline=None, budget_dollars=None, git_commit=None, git_diff_hash=None)
    ledger.set_run_state("dead", "failed")
    live = client.create_instance(4001, image="img", disk=10, label="armature:r:1")["new_contract"]
    ghost = client.create_instance(4001, image="img", disk=10, label="armature:ghost-run:7")["new_contract"]
    dead = client.create_instance(4002, image="img", disk=10, label="armature:dead:3")["new_contract"]
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
