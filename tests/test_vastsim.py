"""The Vast simulator against the real vastai SDK, real sshd and real paramiko."""

import io
import json
import secrets
import subprocess
import time

import paramiko
import pytest
import requests
import vastai

from infra.vastsim import Simulator
from infra.vastsim.instances import find_marked_pids, find_sshd, sigkill, wait_dead

pytestmark = pytest.mark.skipif(
    find_sshd() is None, reason="OpenSSH sshd is not installed (apt-get install -y openssh-server)")

API_KEY = "test-" + secrets.token_hex(12)          # generated: a literal would sit in the deployed repo
OFFERS = [
    {"id": 1, "machine_id": 11, "gpu_name": "RTX 4090", "num_gpus": 1, "gpu_ram": 24564,
     "dph_total": 0.40, "reliability2": 0.99, "boot_delay_s": 0.5},
    {"id": 2, "machine_id": 12, "gpu_name": "RTX 4090", "num_gpus": 1, "gpu_ram": 24564,
     "dph_total": 0.30, "reliability2": 0.97, "boot_delay_s": 0.2},
    {"id": 3, "machine_id": 13, "gpu_name": "RTX 3090", "num_gpus": 2, "dph_total": 0.35, "boot_delay_s": 0.2},
    {"id": 4, "machine_id": 14, "gpu_name": "A100 SXM4", "num_gpus": 4, "gpu_ram": 81920,
     "dph_total": 4.0, "boot_delay_s": 0.2},
    {"id": 5, "machine_id": 15, "gpu_name": "RTX 4090", "num_gpus": 1, "dph_total": 0.10,
     "verified": False, "boot_delay_s": 0.2},
]


# ---- fixtures and helpers ----------------------------------------------------

@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    simulator = Simulator(tmp_path_factory.mktemp("vastsim"), api_key=API_KEY, offers=OFFERS).start()
    yield simulator
    simulator.stop()


@pytest.fixture(scope="module")
def keypair(tmp_path_factory):
    path = tmp_path_factory.mktemp("sshkey") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return paramiko.Ed25519Key.from_private_key_file(str(path)), path.with_suffix(".pub").read_text().strip()


@pytest.fixture
def vast(sim):
    yield vastai.VastAI(api_key=API_KEY, server_url=sim.url)
    sim.clear_faults()
    for row in sim.instances():
        sim.destroy_instance(row["id"])


def wait_for(predicate, timeout=10.0, interval=0.02, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def wait_status(vast, instance_id, status, timeout=10.0):
    return wait_for(lambda: (row := vast.show_instance(instance_id)) and row["actual_status"] == status and row,
                    timeout, what=f"instance {instance_id} {status}")


def launch(vast, keypair, offer_id=2, **create_args):
    instance_id = vast.create_instance(offer_id, image="pytorch/pytorch", disk=10, **create_args)["new_contract"]
    vast.attach_ssh(instance_id, keypair[1])
    return instance_id, wait_status(vast, instance_id, "running")


def connect(port, keypair, pinned=None):
    """SSH as root; without ``pinned`` accept and return the host key, else RejectPolicy on ``pinned``."""
    client = paramiko.SSHClient()
    if pinned is None:
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    else:
        for hostname, keys in pinned.items():
            for key_type, key in keys.items():
                client.get_host_keys().add(hostname, key_type, key)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect("127.0.0.1", port=port, username="root", pkey=keypair[0],
                   allow_agent=False, look_for_keys=False, timeout=5)
    return client


def ssh_answers(port, keypair):
    try:
        connect(port, keypair).close()
        return True
    except paramiko.ssh_exception.NoValidConnectionsError:
        return False


def run(client, command):
    _, stdout, stderr = client.exec_command(command, timeout=10)
    out, err = stdout.read().decode(), stderr.read().decode()
    assert stdout.channel.recv_exit_status() == 0, err
    return out


def process_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def http_error(excinfo):
    response = excinfo.value.response
    return response.status_code, response.json()


# ---- offers ------------------------------------------------------------------

def test_search_offers_filters_orders_and_limits(vast):
    found = vast.search_offers("gpu_name=RTX_4090 num_gpus=1 reliability>0.98 dph<0.5")
    assert [o["id"] for o in found] == [1]
    cheapest_first = vast.search_offers("gpu_name=RTX_4090 num_gpus=1", order="dph_total")
    assert [o["id"] for o in cheapest_first] == [2, 1]  # offer 5 is unverified
    assert [o["id"] for o in vast.search_offers("gpu_name=RTX_4090", order="dph_total", limit=1)] == [2]
    assert [o["id"] for o in vast.search_offers("num_gpus>=2", order="-dph_total")] == [4, 3]
    assert {o["id"] for o in vast.search_offers("gpu_name in [RTX_3090,A100_SXM4]")} == {3, 4}
    assert [o["id"] for o in vast.search_offers("verified=any gpu_name=RTX_4090", order="dph")] == [5, 2, 1]
    offer = found[0]
    assert offer["gpu_ram"] == 24564 and offer["dph_total"] == 0.40 and "boot_delay_s" not in offer


# ---- the main path -------------------------------------------------------------

def test_instance_lifecycle_ssh_sftp_detached_process_destroy_and_charge(sim, vast, keypair):
    created_before = time.time()
    instance_id = vast.create_instance(
        1, image="pytorch/pytorch", disk=20, label="armature:test:arm0", env={"ARM": "a0", "-p 8080:8080": "1"},
        onstart_cmd="echo onstart-ran; pwd > onstart_cwd", cancel_unavail=True)["new_contract"]
    created_after = time.time()
    vast.attach_ssh(instance_id, keypair[1])

    seen = []
    wait_for(lambda: seen.append(vast.show_instance(instance_id)["actual_status"]) or seen[-1] == "running",
             what="running")
    running_seen = time.time()
    assert seen[0] is None and "loading" in seen
    row = vast.show_instance(instance_id)
    assert row["label"] == "armature:test:arm0" and row["intended_status"] == "running"
    assert row["ssh_host"] == "127.0.0.1" and row["public_ipaddr"] == "127.0.0.1"
    assert row["ports"]["22/tcp"][0]["HostPort"] == str(row["ssh_port"])
    assert row["extra_env"] == {"ARM": "a0"} and row["duration"] >= 0
    assert [r["id"] for r in vast.show_instances()] == [instance_id]

    first = connect(row["ssh_port"], keypair)
    pinned = first.get_host_keys()
    first.close()
    client = connect(row["ssh_port"], keypair, pinned=pinned)
    home = str(sim.instance_home(instance_id))
    lines = run(client, 'echo $HOME; pwd; echo $CONTAINER_ID $ARM $VAST_CONTAINERLABEL; which python').split()
    assert lines == [home, home, str(instance_id), "a0", f"C.{instance_id}", f"{home}/bin/python"]
    smi = run(client, "nvidia-smi --query-gpu=index,name,temperature.gpu,memory.total,"
                      "clocks_throttle_reasons.active --format=csv,noheader,nounits")
    assert smi.strip() == "0, NVIDIA GeForce RTX 4090, 38, 24564, 0x0000000000000000"
    assert run(client, "nvidia-smi -L").startswith("GPU 0: NVIDIA GeForce RTX 4090 (UUID: GPU-")

    sftp = client.open_sftp()
    sftp.putfo(io.BytesIO(b"checkpoint bytes"), "ckpt.bin")
    assert run(client, "cat ckpt.bin") == "checkpoint bytes"
    assert sftp.open(f"{home}/onstart_cwd").read().decode().strip() == home
    sftp.close()
    assert "onstart-ran" in vast.logs(instance_id, tail="100")

    detached = int(run(client, "setsid nohup sleep 1000 > /dev/null 2>&1 < /dev/null & echo $!"))
    client.close()
    assert process_alive(detached) and detached in sim.instance_pids(instance_id)

    destroy_started = time.time()
    assert vast.destroy_instance(instance_id) == {"success": True}
    destroyed = time.time()
    assert not process_alive(detached) and sim.instance_pids(instance_id) == []
    assert vast.show_instance(instance_id) is None
    assert vast.show_instances() == []

    charges = vast.show_invoices_v1(charges=True, limit=100)
    line = next(r for r in charges["results"] if r["metadata"]["instance_id"] == instance_id)
    gpu_seconds = line["metadata"]["gpu_seconds"]
    # the GPU is billed while running (not while loading), storage from the create request
    assert destroy_started - running_seen - 0.01 <= gpu_seconds <= destroyed - created_after + 0.01
    assert line["metadata"]["storage_seconds"] >= destroy_started - created_after
    storage = 20 * 0.15 * line["metadata"]["storage_seconds"] / (30 * 24 * 3600)
    assert line["amount"] == pytest.approx(0.40 * gpu_seconds / 3600 + storage, rel=1e-4)
    assert line["type"] == "instance" and line["metadata"]["label"] == "armature:test:arm0"


def test_a_detached_process_is_found_even_in_the_middle_of_its_exec():
    """`setsid nohup cmd &` returns its pid while the process may still be exec'ing, when /proc/<pid>/environ
    reads empty for a moment: the marked-process search must not miss it (a kill would let it escape)."""
    missed, started = [], []
    try:
        for i in range(60):
            marker = {"VASTSIM_EXEC_RACE": f"{secrets.token_hex(4)}-{i}"}
            pid = int(subprocess.run(["bash", "-c", "setsid nohup sleep 60 >/dev/null 2>&1 </dev/null & echo $!"],
                                     env={"PATH": "/usr/bin:/bin", **marker}, capture_output=True, text=True,
                                     check=True).stdout)
            started.append(pid)
            if pid not in find_marked_pids(marker):
                missed.append(pid)
    finally:
        wait_dead(sigkill(started))
    assert missed == [], f"{len(missed)} of {len(started)} just-started processes were not found"


def test_label_stop_start_and_paged_listing(sim, vast, keypair):
    first, row = launch(vast, keypair)
    second = vast.create_instance(3, image="x", label="second")["new_contract"]
    assert vast.label_instance(first, "renamed") == {"success": True}
    page = vast.show_instances_v1({"order_by": [{"col": "id", "dir": "asc"}], "limit": 1})
    assert [r["id"] for r in page["instances"]] == [first] and page["total_instances"] == 2
    rest = vast.show_instances_v1({"order_by": [{"col": "id", "dir": "asc"}], "limit": 1,
                                   "after_token": page["next_token"]})
    assert [r["id"] for r in rest["instances"]] == [second] and rest["next_token"] is None
    assert [r["label"] for r in vast.show_instances()] == ["renamed", "second"]

    client = connect(row["ssh_port"], keypair)
    detached = int(run(client, "echo kept > kept.txt; setsid nohup sleep 1000 > /dev/null 2>&1 < /dev/null & echo $!"))
    client.close()
    vast.stop_instance(first)
    row = vast.show_instance(first)
    assert (row["actual_status"], row["intended_status"]) == ("stopped", "stopped")
    assert not process_alive(detached) and not ssh_answers(row["ssh_port"], keypair)
    vast.start_instance(first)
    row = wait_status(vast, first, "running")
    wait_for(lambda: ssh_answers(row["ssh_port"], keypair), timeout=5, what="sshd after start")
    client = connect(row["ssh_port"], keypair)
    assert run(client, "cat kept.txt") == "kept\n"  # a stop keeps the disk
    client.close()


# ---- errors, limits and keys ---------------------------------------------------

def test_gone_offer_raises_no_such_ask(sim, vast):
    sim.set_faults(create_no_such_ask=1)
    with pytest.raises(requests.HTTPError) as excinfo:
        vast.create_instance(2, image="x")
    assert http_error(excinfo) == (404, {"success": False, "error": "no_such_ask",
                                         "msg": "Offer 2 is no longer available."})
    sim.set_faults(offer_id=3, no_such_ask=True)
    with pytest.raises(requests.HTTPError) as excinfo:
        vast.create_instance(3, image="x", cancel_unavail=True)
    assert http_error(excinfo)[0] == 410
    with pytest.raises(requests.HTTPError) as excinfo:
        vast.create_instance(999, image="x")
    assert http_error(excinfo)[1]["error"] == "no_such_ask"
    assert vast.create_instance(2, image="x")["success"] is True  # the fault was used up


def test_create_that_rents_then_answers_502_or_too_late_and_a_lagging_list(sim, vast):
    sim.set_faults(create_then_502=1, list_lag_s=0.5)
    once = vastai.VastAI(api_key=API_KEY, server_url=sim.url, retry=1)
    with pytest.raises(requests.HTTPError) as excinfo:
        once.create_instance(2, image="x", label="lost")
    assert http_error(excinfo)[0] == 502
    assert vast.show_instances() == []                                   # the list lags behind the create
    (row,) = wait_for(vast.show_instances, what="the rented instance in the list")
    assert row["label"] == "lost"

    sim.set_faults(create_then_502=1, list_lag_s=0)
    vast.create_instance(2, image="x", label="twice")                    # the SDK re-sends after a 502
    assert [r["label"] for r in vast.show_instances()].count("twice") == 2

    sim.set_faults(create_then_stall=1, create_stall_s=1.0)
    once.client.timeout = 0.3
    with pytest.raises(requests.Timeout):
        once.create_instance(2, image="x", label="late")
    assert "late" in [r["label"] for r in vast.show_instances()]


def test_rate_limit_is_retried_by_the_sdk(sim, vast):
    sim.set_faults(rate_limit=2, rate_limit_retry_after=0.01)
    assert vast.show_user()["credit"] <= 100.0
    sim.set_faults(rate_limit=1)
    impatient = vastai.VastAI(api_key=API_KEY, server_url=sim.url, retry=1)
    with pytest.raises(requests.HTTPError) as excinfo:
        impatient.show_instances()
    assert http_error(excinfo)[0] == 429 and http_error(excinfo)[1]["error"] == "rate_limit_exceeded"
    assert excinfo.value.response.headers["Retry-After"] == "0.01"


def test_wrong_account_key_is_rejected(sim, vast):
    with pytest.raises(requests.HTTPError) as excinfo:
        vastai.VastAI(api_key="not-the-key", server_url=sim.url).show_instances()
    assert http_error(excinfo)[0] == 401 and http_error(excinfo)[1]["error"] == "invalid_api_key"
    sim.set_faults(bad_key_status=404)
    with pytest.raises(requests.HTTPError) as excinfo:
        vastai.VastAI(api_key="not-the-key", server_url=sim.url).search_offers("num_gpus=1")
    assert http_error(excinfo)[0] == 404


def test_instance_scoped_key_only_reaches_its_instance(sim, vast, keypair):
    mine, row = launch(vast, keypair)
    other, _ = launch(vast, keypair, offer_id=3)
    client = connect(row["ssh_port"], keypair)
    scoped_key = run(client, "echo $CONTAINER_API_KEY").strip()
    scoped = vastai.VastAI(api_key=scoped_key, server_url=sim.url)
    assert scoped.show_instance(mine)["id"] == mine
    for call in (lambda: scoped.show_instance(other), lambda: scoped.destroy_instance(other),
                 scoped.show_instances, lambda: scoped.create_instance(2, image="x")):
        with pytest.raises(requests.HTTPError) as excinfo:
            call()
        assert http_error(excinfo)[0] == 403
    self_destroy = ("python3 -c \"import os, urllib.request as u; print(u.urlopen(u.Request("
                    "os.environ['VAST_SERVER_URL'] + '/api/v0/instances/' + os.environ['CONTAINER_ID'] + '/',"
                    " method='DELETE', headers={'Authorization': 'Bearer ' + os.environ['CONTAINER_API_KEY']}))"
                    ".read().decode())\"")
    _, stdout, _ = client.exec_command(self_destroy, timeout=10)
    stdout.channel.recv_exit_status()  # the destroy kills this very session, as on Vast
    client.close()
    wait_for(lambda: vast.show_instance(mine) is None, what="self-destroy")
    assert vast.show_instance(other)["id"] == other


# ---- faults ------------------------------------------------------------------

def test_preemption_exits_the_instance_and_kills_its_processes(sim, vast, keypair):
    sim.set_faults(offer_id=2, preempt_after_s=1.5)
    instance_id, row = launch(vast, keypair)
    client = connect(row["ssh_port"], keypair)
    detached = int(run(client, "setsid nohup sleep 1000 > /dev/null 2>&1 < /dev/null & echo $!"))
    client.close()
    row = wait_status(vast, instance_id, "exited")
    assert "preempted" in row["status_msg"]
    assert not process_alive(detached) and sim.instance_pids(instance_id) == []
    with pytest.raises(paramiko.ssh_exception.NoValidConnectionsError):
        connect(row["ssh_port"], keypair)


def test_changed_host_key_is_detected_by_reject_policy(sim, vast, keypair):
    instance_id, row = launch(vast, keypair)
    first = connect(row["ssh_port"], keypair)
    pinned = first.get_host_keys()
    first.close()
    connect(row["ssh_port"], keypair, pinned=pinned).close()
    requests.post(f"{sim.url}/_sim/instances/{instance_id}/host_key",
                  headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10).raise_for_status()
    with pytest.raises(paramiko.BadHostKeyException):
        connect(row["ssh_port"], keypair, pinned=pinned)


def test_overheating_gpu_shows_in_nvidia_smi_live(sim, vast, keypair):
    instance_id, row = launch(vast, keypair, offer_id=4)
    client = connect(row["ssh_port"], keypair)
    query = ("nvidia-smi --query-gpu=index,temperature.gpu,utilization.gpu,memory.used,power.draw,clocks.sm,"
             "clocks_throttle_reasons.active --format=csv,noheader,nounits")
    assert len(run(client, query).splitlines()) == 4
    response = requests.post(f"{sim.url}/_sim/instances/{instance_id}/gpu",
                             headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10,
                             json={"gpu": 2, "temperature": 92, "utilization": 100, "memory_used": 80000,
                                   "power": 398.5, "sm_clock": 1100, "throttle_reasons": 0x40})
    response.raise_for_status()
    hot = run(client, query).splitlines()[2]
    assert hot == "2, 92, 100, 80000, 398.50, 1100, 0x0000000000000040"
    assert run(client, query).splitlines()[0].split(", ")[1] == "38"
    client.close()


def test_slow_ssh_stuck_loading_oci_failure_offline_and_failing_destroy(sim, vast, keypair):
    sim.set_faults(offer_id=2, ssh_refused_s=1.0)
    refused_id, row = launch(vast, keypair)
    with pytest.raises(paramiko.ssh_exception.NoValidConnectionsError):
        connect(row["ssh_port"], keypair)
    refused_since = time.monotonic()
    wait_for(lambda: ssh_answers(row["ssh_port"], keypair), timeout=5, what="sshd after the refusal")
    assert time.monotonic() - refused_since > 0.5

    sim.set_faults(offer_id=3, stuck_loading=True)
    sim.set_faults(offer_id=4, oci_failure=True)
    stuck = vast.create_instance(3, image="x")["new_contract"]
    broken = vast.create_instance(4, image="x")["new_contract"]
    time.sleep(0.8)
    assert vast.show_instance(stuck)["actual_status"] == "loading"
    assert vast.show_instance(broken)["actual_status"] == "created"
    assert "OCI runtime create failed" in vast.show_instance(broken)["status_msg"]
    sim.set_faults(offer_id=3, stuck_loading=False)
    wait_status(vast, stuck, "running")

    sim.go_offline(stuck)
    assert vast.show_instance(stuck)["actual_status"] == "offline"

    sim.set_faults(destroy_fail=1)
    with pytest.raises(requests.HTTPError) as excinfo:
        vast.destroy_instance(refused_id)
    assert http_error(excinfo) == (500, {"success": False, "error": "server_error",
                                         "msg": "Internal error while destroying the instance; try again."})
    assert vast.show_instance(refused_id)["actual_status"] == "running"
    vast.destroy_instance(refused_id)
    assert vast.show_instance(refused_id) is None


def test_control_endpoint_sets_faults_and_reports_state(sim, vast):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    response = requests.post(f"{sim.url}/_sim/faults", json={"offer_id": 2, "boot_delay_s": 30}, headers=auth,
                             timeout=10)
    assert response.json()["faults"]["per_offer"] == {"2": {"boot_delay_s": 30.0}}
    bad = requests.post(f"{sim.url}/_sim/faults", json={"explode": True}, headers=auth, timeout=10)
    assert bad.status_code == 400 and "explode" in bad.json()["msg"]
    assert requests.get(f"{sim.url}/_sim/state", timeout=10).status_code == 401
    state = requests.get(f"{sim.url}/_sim/state", headers=auth, timeout=10).json()
    assert {o["id"] for o in state["offers"]} == {1, 2, 3, 4, 5}
    assert API_KEY not in json.dumps(state)


# ---- shutdown ------------------------------------------------------------------

def test_stop_destroys_everything_and_never_writes_the_key(tmp_path, keypair):
    own = Simulator(tmp_path, api_key=API_KEY, offers=OFFERS).start()
    try:
        vast = vastai.VastAI(api_key=API_KEY, server_url=own.url)
        vast.create_ssh_key(keypair[1])  # account key: lands in new instances
        instance_id, row = launch(vast, keypair)
        client = connect(row["ssh_port"], keypair)
        detached = int(run(client, "setsid nohup sleep 1000 > /dev/null 2>&1 < /dev/null & echo $!"))
        client.close()
        assert vast.show_user()["credit"] < 100.0
    finally:
        own.stop()
    assert not process_alive(detached) and own.instance_pids(instance_id) == []
    state = json.loads((tmp_path / "vastsim-state.json").read_text())
    assert state["instances"][0]["destroyed_at"] is not None and state["simulator"]["running"] is False
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert API_KEY.encode() not in path.read_bytes(), path
