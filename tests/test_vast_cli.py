"""The cloud path through the real CLI: `armature ablation --backend vast` against the simulator,
kill -9 of armature mid-run, `armature resume` adopting the live instance, and `reap` finding nothing;
`reap` in one ARMATURE_HOME leaving another's instances alone."""

import secrets
import time

import pytest

from infra.vastsim import Simulator
from infra.vastsim.instances import find_sshd
from orchestrator.backends.vast import make_client, provider
from orchestrator.ledger import Ledger
from tests.armature_helpers import TINY_VQVAE_BASE, armature, ledger, metric_steps, start_armature, tiny_spec, wait_for
from tests.test_vast_backend import ALLOW_DIRTY, OFFERS

pytestmark = pytest.mark.skipif(find_sshd() is None, reason="OpenSSH sshd is not installed")

API_KEY = "vk-" + secrets.token_hex(20)
SECOND_KEY = "vk-" + secrets.token_hex(20)      # a teammate's key on the same account


def spec(sim_url: str, steps: int = 300, extra: str = "") -> str:
    base = TINY_VQVAE_BASE.replace("steps: 20,", f"steps: {steps},").replace("eval_every: 10", "eval_every: 100")
    return f"""name: cloud
trainer: vqvae
metric: {{name: recon_mse, mode: min}}
base: {base}
resources: {{gpus: 1}}
backend: vast
vast:
  server_url: {sim_url}
  min_cuda: null
  disk_gb: 10
  max_instances: 1
  ready_deadline_seconds: 30
  status_poll_seconds: 0.2
  api_backoff_seconds: 0.05
  poll_seconds: 0.5
  pull_checkpoints_every_minutes: 0.02
  heartbeat_seconds: 0.5
  health_seconds: 0.5
  heartbeat_timeout_seconds: 30
  orchestrator_silence_seconds: 300
  install_timeout_seconds: 120
  destroy_deadline_seconds: 30
""" + extra


def test_kill_9_then_resume_adopts_the_instance_and_reap_finds_nothing(tmp_path):
    home = tmp_path / "home"
    with Simulator(tmp_path / "sim", api_key=API_KEY, offers=OFFERS).start() as sim:
        path = tiny_spec(tmp_path, spec(sim.url))
        extra = ["--allow-dirty"] if ALLOW_DIRTY else []
        proc = start_armature(home, "ablation", str(path), "--run-id", "c9", "--metrics-port", "-1", *extra,
                              log=tmp_path / "log", VAST_API_KEY=API_KEY)
        try:
            wait_for(lambda: (home / "ledger.sqlite").exists() and ledger(home).arm_runs("c9")
                     and (ledger(home).arm_runs("c9")[0]["last_step"] or 0) >= 40, 240, "the arm past step 40")
        finally:
            proc.kill()                                      # kill -9: no teardown, no handler
            proc.wait(30)
        assert len(sim.instances()) == 1, "the instance outlives the orchestrator"

        # The tree these tests run from may be edited meanwhile (a dirty checkout): resume on it regardless.
        changed = ["--allow-code-change"] if ALLOW_DIRTY else []
        result = armature(home, "resume", "c9", "--metrics-port", "-1", *extra, *changed, VAST_API_KEY=API_KEY)
        assert result.returncode == 0, result.stdout + result.stderr
        db = ledger(home)
        (arm_run,) = db.arm_runs("c9")
        assert arm_run["state"] == "succeeded"
        attempts = db.attempts(arm_run["id"])
        assert [a["state"] for a in attempts] == ["succeeded"], "the running attempt was adopted, not restarted"
        assert len(db.query("SELECT * FROM instances WHERE run_id='c9'")) == 1, "no second instance was rented"
        assert db.live_instances("c9") == []
        assert sim.instances() == []
        steps = metric_steps(home / "c9" / "base" / "seed0")
        assert steps == sorted(steps) and sorted(set(steps)) == list(range(5, 301, 5))

        reaped = armature(home, "reap", "--dry-run", "--server-url", sim.url, VAST_API_KEY=API_KEY)
        assert reaped.returncode == 0 and "no orphaned armature instances" in reaped.stdout
    dump = "\n".join(str(row) for table in ("runs", "arm_runs", "attempts", "events", "instances")
                     for row in db.query(f"SELECT * FROM {table}"))
    assert API_KEY not in dump and API_KEY not in (tmp_path / "log").read_text() + result.stdout + result.stderr


def test_reap_in_one_home_never_destroys_another_homes_instance(tmp_path):
    with Simulator(tmp_path / "sim", api_key=API_KEY, offers=OFFERS, extra_api_keys=(SECOND_KEY,)).start() as sim:
        theirs = Ledger(tmp_path / "their-home" / "ledger.sqlite")
        theirs.create_run("study", name="study", trainer="vqvae", backend="vast", spec_path=None, metric=None,
                          metric_mode=None, baseline=None, budget_dollars=None, git_commit=None, git_diff_hash=None)
        label = provider.instance_label(theirs.identity(), "study", 1) + ":1"
        their_instance = make_client(sim.url, api_key=SECOND_KEY).create_instance(
            3001, image="img", disk=10, label=label)["new_contract"]
        mine = tmp_path / "my-home"

        listed = armature(mine, "reap", "--server-url", sim.url, VAST_API_KEY=API_KEY)
        assert listed.returncode == 0, listed.stdout + listed.stderr
        assert "no orphaned armature instances" in listed.stdout
        assert f"not this ledger's, left alone: instance {their_instance}" in listed.stdout
        assert sim.show_instance(their_instance) is not None

        named = armature(mine, "reap", "--instance", str(their_instance), "--server-url", sim.url,
                         VAST_API_KEY=API_KEY)
        assert named.returncode == 0, named.stdout + named.stderr
        assert f"destroyed (confirmed): instance {their_instance}" in named.stdout
        assert sim.show_instance(their_instance) is None


def test_an_api_that_stops_answering_at_the_start_leaves_no_half_made_run(tmp_path):
    """The API drops every connection for longer than the deadline (waiting out shorter outages and any number of
    429s is test_vast_provider's): a clear error, no traceback, and no trace of the run id, so the same command
    can simply run again (it used to say the run exists, while `resume` said it was unknown)."""
    home = tmp_path / "home"
    extra = ["--allow-dirty"] if ALLOW_DIRTY else []
    with Simulator(tmp_path / "sim", api_key=API_KEY, offers=OFFERS).start() as sim:
        path = tiny_spec(tmp_path, spec(sim.url, steps=20, extra="  api_deadline_seconds: 1\n"))
        sim.set_faults(api_down_s=120)
        failed = armature(home, "ablation", str(path), "--run-id", "hasty", "--metrics-port", "-1", *extra,
                          VAST_API_KEY=API_KEY)
        assert failed.returncode == 2, failed.stdout + failed.stderr
        assert "Traceback" not in failed.stderr
        assert "armature: error: the Vast API did not answer while starting run hasty" in failed.stderr
        assert "run the same command again" in failed.stderr
        assert not (home / "hasty").exists()
        assert not (home / "ledger.sqlite").exists() or not Ledger(home / "ledger.sqlite").list_runs()
        assert sim.instances() == []


def test_status_says_stopping_until_teardown_is_confirmed_and_resume_finishes_a_killed_teardown(tmp_path):
    """Destroys fail: the arm is done but its instance lives, so the run is `stopping`, never `finished` (it used
    to say finished while the instance billed). kill -9 then: `resume` finishes the teardown (it used to say
    "nothing to resume")."""
    home = tmp_path / "home"
    extra = ["--allow-dirty"] if ALLOW_DIRTY else []
    with Simulator(tmp_path / "sim", api_key=API_KEY, offers=OFFERS).start() as sim:
        body = spec(sim.url, steps=20).replace("destroy_deadline_seconds: 30", "destroy_deadline_seconds: 600")
        path = tiny_spec(tmp_path, body)
        sim.set_faults(destroy_fail=1_000_000)
        proc = start_armature(home, "ablation", str(path), "--run-id", "td", "--metrics-port", "-1", *extra,
                              log=tmp_path / "log", VAST_API_KEY=API_KEY)
        try:
            wait_for(lambda: (home / "ledger.sqlite").exists() and ledger(home).query_one(
                "SELECT 1 AS x FROM instances WHERE run_id='td' AND state='destroying'"), 240, "a destroy")
            time.sleep(1)
            run = ledger(home).get_run("td")
            assert run["state"] == "stopping" and run["final_state"] == "finished"
            status = armature(home, "status", VAST_API_KEY=API_KEY)
            assert "stopping" in status.stdout and "finished" not in status.stdout, status.stdout
        finally:
            proc.kill()                                      # kill -9 during the teardown
            proc.wait(30)
        assert len(sim.instances()) == 1 and ledger(home).get_run("td")["state"] == "stopping"

        sim.clear_faults()
        changed = ["--allow-code-change"] if ALLOW_DIRTY else []
        resumed = armature(home, "resume", "td", "--metrics-port", "-1", *extra, *changed, VAST_API_KEY=API_KEY)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert sim.instances() == []
        assert ledger(home).get_run("td")["state"] == "finished" and ledger(home).live_instances("td") == []
