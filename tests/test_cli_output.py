"""The command line's output for pipes, files and unusable folders: full width when not a terminal, one line
and exit 2 instead of a traceback (read-only home or run folder, a full disk, a ledger that is a folder),
a quiet end on a closed pipe, `status` as csv/json and telling a dead orchestrator from a live one; the
study exporter's port range; `make monitor` without docker compose. No Ray."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from rich.console import Console

from orchestrator.cli import DEFAULT_ABLATION_METRICS_PORT, EXIT_BROKEN_PIPE, STUDY_METRICS_PORTS, _start_exporter
from orchestrator.ledger import Ledger
from orchestrator.paths import REPO_ROOT
from orchestrator.progress import Progress
from orchestrator.telemetry.gpu import LocalGpus
from tests.armature_helpers import armature, armature_env
from tests.prom_helpers import free_port
from tests.test_report import ARMS, RUN_ID, build_study

LONG_RUN_ID = "maskgit-20261130-002345-with-a-long-tail-0123456789"


def assert_one_line_error(result: subprocess.CompletedProcess, *expected: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("armature: error: "), result.stderr
    for text in expected:
        assert text in lines[0], (text, lines[0])


@contextmanager
def unwritable(folder: Path):
    """Make `folder` refuse new files, also for root (chmod alone does not stop root: chattr +i does)."""
    folder.chmod(0o555)
    immutable = False
    if os.geteuid() == 0:
        chattr = shutil.which("chattr")
        immutable = bool(chattr) and subprocess.run([chattr, "+i", str(folder)], capture_output=True).returncode == 0
        if not immutable:
            folder.chmod(0o755)
            pytest.skip("running as root and chattr +i is not available: cannot make a folder read-only")
    try:
        yield folder
    finally:
        if immutable:
            subprocess.run([shutil.which("chattr"), "-i", str(folder)], check=True)
        folder.chmod(0o755)


def cpu_study(home: Path) -> Path:
    """A finished CPU-only study (the report has a CPU-h column) in `home`; returns its run folder."""
    ledger, run_dir = build_study(home, hardware={arm: "cpu" for arm in ARMS}, gpus=0)
    ledger.close()
    return run_dir


def run_left_by(home: Path, run_id: str, pid_source: str) -> None:
    """A run in state `running` whose recorded orchestrator is the process that `pid_source` describes."""
    script = ("import sys; from orchestrator.ledger import Ledger\n"
              "Ledger(sys.argv[1]).create_run(sys.argv[2], name='study', trainer='vqvae', backend='local',"
              " spec_path=None, metric='recon_mse', metric_mode='min', baseline=None, budget_dollars=None,"
              " git_commit=None, git_diff_hash=None)\n")
    if pid_source == "dead":          # the orchestrator that created the run is killed with SIGKILL
        script += "print('claimed', flush=True); import time; time.sleep(600)\n"
        orchestrator = subprocess.Popen([sys.executable, "-c", script, str(home / "ledger.sqlite"), run_id],
                                        cwd=REPO_ROOT, env=armature_env(home), stdout=subprocess.PIPE, text=True)
        try:
            assert orchestrator.stdout.readline().strip() == "claimed"
        finally:
            orchestrator.kill()
            orchestrator.wait()
    else:                             # this test process plays the live orchestrator
        Ledger(home / "ledger.sqlite").create_run(
            run_id, name="study", trainer="vqvae", backend="local", spec_path=None, metric="recon_mse",
            metric_mode="min", baseline=None, budget_dollars=None, git_commit=None, git_diff_hash=None)


# ---- pipes and files ----------------------------------------------------------------------------


def test_a_closed_pipe_ends_the_command_quietly():
    read_end, write_end = os.pipe()
    os.close(read_end)                # the reader has gone before the first byte, as `| head` does later
    try:
        result = subprocess.run([sys.executable, "-m", "orchestrator", "schema"], cwd=REPO_ROOT, stdout=write_end,
                                stderr=subprocess.PIPE, text=True, timeout=60, env=armature_env(REPO_ROOT / "runs"))
    finally:
        os.close(write_end)
    assert result.returncode == EXIT_BROKEN_PIPE
    assert result.stderr == ""


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full on this system")
def test_output_to_a_full_disk_is_one_line_not_a_traceback():
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "orchestrator", "schema"], cwd=REPO_ROOT, stdout=full,
                                stderr=subprocess.PIPE, text=True, timeout=60, env=armature_env(REPO_ROOT / "runs"))
    assert_one_line_error(result, "standard output", "No space left on device", "free some space there")


def test_report_piped_to_a_file_keeps_every_column(tmp_path):
    cpu_study(tmp_path)
    result = armature(tmp_path, "report", RUN_ID, timeout=120)
    assert result.returncode == 0, result.stderr
    header = next(line for line in result.stdout.splitlines() if "Arm" in line)
    for column in ("Seeds", "codebook_usage", "Verdict", "p (Holm)", "CPU-h", "Hardware"):
        assert column in header, (column, header)
    assert all(len(line) <= 1000 for line in result.stdout.splitlines())   # laid out, not one endless line


def test_status_prints_whole_run_ids_when_piped(tmp_path):
    run_left_by(tmp_path, LONG_RUN_ID, "dead")
    result = armature(tmp_path, "status", timeout=60)
    assert result.returncode == 0, result.stderr
    assert LONG_RUN_ID in result.stdout
    assert "…" not in result.stdout


def test_status_as_csv_and_json_for_scripts(tmp_path):
    cpu_study(tmp_path)
    run_left_by(tmp_path, "study-dead", "dead")
    runs = json.loads(armature(tmp_path, "status", "--format", "json", timeout=60).stdout)
    assert {run["run"]: run["state"] for run in runs} == {
        RUN_ID: "finished", "study-dead": "interrupted (orchestrator not running; armature resume study-dead)"}

    one = json.loads(armature(tmp_path, "status", RUN_ID, "--format", "json", timeout=60).stdout)
    assert one["run"] == RUN_ID and one["state"] == "finished"
    by_seed = {(r["arm"], r["seed"]): r for r in one["arm_runs"]}
    assert by_seed[("baseline", 1)]["recon_mse"] == pytest.approx(0.12)
    assert by_seed[("wide", 1)]["state"] == "diverged" and by_seed[("wide", 1)]["step"] == 40

    rows = list(csv.DictReader(armature(tmp_path, "status", RUN_ID, "--format", "csv", timeout=60).stdout.splitlines()))
    assert [(r["arm"], r["seed"], r["state"]) for r in rows] == [
        (r["arm"], str(r["seed"]), r["state"]) for r in one["arm_runs"]]
    assert rows[1]["total_steps"] == "50" and rows[1]["run"] == RUN_ID


# ---- a dead orchestrator ------------------------------------------------------------------------------


def test_status_of_a_run_whose_orchestrator_died_says_interrupted_and_how_to_resume(tmp_path):
    run_left_by(tmp_path, "study-dead", "dead")
    run_left_by(tmp_path, "study-alive", "this test")
    expected = "interrupted (orchestrator not running; armature resume study-dead)"

    one = armature(tmp_path, "status", "study-dead", timeout=60)
    assert one.returncode == 0, one.stderr
    assert expected in one.stdout
    every = armature(tmp_path, "status", timeout=60)
    dead_line = next(line for line in every.stdout.splitlines() if "study-dead" in line)
    alive_line = next(line for line in every.stdout.splitlines() if "study-alive" in line)
    assert expected in dead_line
    assert " running " in alive_line and "interrupted" not in alive_line


# ---- folders armature cannot use ----------------------------------------------------------------


def test_a_ledger_that_cannot_be_opened_is_one_line_naming_it(tmp_path):
    (tmp_path / "ledger.sqlite").mkdir()          # sqlite: "unable to open database file"
    result = armature(tmp_path, "status", timeout=60)
    assert_one_line_error(result, str(tmp_path / "ledger.sqlite"), "unable to open database file",
                          "ARMATURE_HOME", "this user can write")


def test_a_home_below_a_file_is_one_line_naming_it(tmp_path):
    (tmp_path / "a-file").write_text("")
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: tiny\ntrainer: vqvae\narms: [{name: baseline}]\nseeds: 1\n"
                    "metric: {name: recon_mse, mode: min}\n")
    result = armature(tmp_path / "a-file" / "home", "ablation", str(spec), "--metrics-port", "-1", timeout=60)
    assert_one_line_error(result, str(tmp_path / "a-file" / "home"), "expected a folder")


def test_read_only_home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    cpu_study(home)
    with unwritable(home):
        result = armature(home, "status", RUN_ID, timeout=60)
    assert_one_line_error(result, str(home / "ledger.sqlite"), "ARMATURE_HOME", "this user can write")


def test_report_on_a_read_only_run_folder(tmp_path):
    run_dir = cpu_study(tmp_path)
    with unwritable(run_dir):
        result = armature(tmp_path, "report", RUN_ID, timeout=120)
    assert_one_line_error(result, str(run_dir), "armature needs to write here")


# ---- the study's exporter port and `make monitor` -------------------------------------------------------


def test_a_study_exporter_takes_the_next_port_that_prometheus_scrapes_when_9109_is_busy(tmp_path, monkeypatch):
    monkeypatch.setenv("ARMATURE_HOME", str(tmp_path))
    taken = []
    for port in STUDY_METRICS_PORTS[:-1]:           # leave only the last port of the range free (if it is)
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            sock.close()                            # taken by someone else already: just as good
            continue
        taken.append(sock)
    try:
        exporter = _start_exporter(DEFAULT_ABLATION_METRICS_PORT, "r1", Console(file=io.StringIO()),
                                   LocalGpus(host="box"))
        if exporter is None:
            pytest.skip(f"port {STUDY_METRICS_PORTS[-1]} is taken on this machine")
        exporter.stop()
        assert exporter.port == STUDY_METRICS_PORTS[-1]
        assert exporter.collector.only_run == "r1"
    finally:
        for sock in taken:
            sock.close()


def make_monitor(tmp_path: Path, **env: str) -> subprocess.Popen:
    """`make monitor` on a machine whose docker has no compose plugin (a stub docker that fails)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text("#!/bin/sh\necho \"docker: 'compose' is not a docker command.\" >&2\nexit 1\n")
    (bin_dir / "docker").chmod(0o755)
    environment = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", **env}
    return subprocess.Popen(["make", "-s", "monitor"], cwd=REPO_ROOT, env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.skipif(not shutil.which("make"), reason="no make")
def test_make_monitor_without_compose_or_prometheus_says_what_to_install(tmp_path):
    proc = make_monitor(tmp_path, PROMETHEUS="no-such-prometheus-binary")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert ("docker compose plugin not found: install docker-compose-plugin, or run Prometheus with "
            "infra/prometheus/prometheus.yml yourself") in out
    assert "unknown shorthand flag" not in out


@pytest.mark.skipif(not (shutil.which("make") and shutil.which("prometheus")), reason="no make or prometheus")
def test_make_monitor_without_compose_runs_the_local_prometheus_on_the_shipped_config(tmp_path):
    port = free_port()
    proc = make_monitor(tmp_path, PROMETHEUS_PORT=str(port), PROMETHEUS_DATA=str(tmp_path / "data"))
    try:
        deadline, config = time.monotonic() + 30, ""
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/status/config", timeout=1) as reply:
                    config = reply.read().decode()
                break
            except OSError:
                time.sleep(0.3)
        assert "127.0.0.1:9109" in config and "127.0.0.1:9108" in config, config or "prometheus did not start"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert "docker compose plugin not found" in out and f"http://127.0.0.1:{port}" in out


# ---- the live view ------------------------------------------------------------------------------


def live_view(heartbeat_s: float = 60.0):
    log = io.StringIO()
    progress = Progress("recon_mse", Console(file=log, width=200, force_terminal=False), run_id="vae-20261130-0040",
                        heartbeat_s=heartbeat_s)
    # arm run 1 finished before a resume: its last metrics come from the ledger
    progress.add(1, "baseline", 0, 50, "succeeded", 50, metrics={"recon_mse": 0.125, "loss": 0.5})
    progress.add(2, "wide", 0, 100)
    return progress, log


def test_live_view_shows_the_run_its_progress_and_each_arms_loss_and_speed():
    progress, _ = live_view()
    progress.update(2, state="running")
    progress.update(2, rows=[{"step": 10, "loss": 2.5, "recon_mse": 0.75}])
    time.sleep(0.3)
    progress.update(2, rows=[{"step": 20, "loss": 1.25, "recon_mse": 0.625}])
    screen = Console(width=200, record=True, file=io.StringIO())
    screen.print(progress._view())
    text = screen.export_text()
    header = text.splitlines()[0]
    assert "vae-20261130-0040: elapsed 0m00s" in header and "1/2 arm runs done, 1 running" in header
    assert "steps 70/150 (47%)" in header and "ETA" in header
    assert "━" in text                                           # the overall progress bar
    baseline = next(line for line in text.splitlines() if "baseline" in line)
    wide = next(line for line in text.splitlines() if "wide" in line)
    assert "0.5" in baseline and "0.125" in baseline              # finished before the resume: values kept
    assert "1.25" in wide and "0.625" in wide and "20/100" in wide
    assert "steps/s" in text and "m" in wide.split("│")[-2]      # a speed and an ETA for the running arm


def test_without_a_terminal_the_live_view_prints_a_heartbeat():
    progress, log = live_view(heartbeat_s=0.1)
    progress.start()
    try:
        time.sleep(0.45)
    finally:
        progress.stop()
    beats = [line for line in log.getvalue().splitlines() if "vae-20261130-0040: elapsed" in line]
    assert len(beats) >= 2, log.getvalue()
    assert "1/2 arm runs done, 0 running" in beats[0]
