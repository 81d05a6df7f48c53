"""The `armature` command line (also `python -m orchestrator`)."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from orchestrator import paths
from orchestrator.backends.provision import BACKEND_NAMES, capabilities
from orchestrator.errors import UserError, ledger_access_problem, ledger_error_message, os_error_message
from orchestrator.ledger import (ACTIVE_STATES, FINAL_STATES, RUN_FINAL_STATES, IllegalTransition, Ledger,
                                 RunClaimed, orchestrator_alive)

DEFAULT_EXPORTER_PORT = 9108
DEFAULT_ABLATION_METRICS_PORT = 9109
# A study's exporter takes the first free port of these (infra/prometheus/prometheus.yml scrapes them all),
# so up to four studies at once show in Prometheus without a --metrics-port each.
STUDY_METRICS_PORTS = range(DEFAULT_ABLATION_METRICS_PORT, DEFAULT_ABLATION_METRICS_PORT + 4)
EXIT_BROKEN_PIPE = 141          # what a shell reports for a command ended by SIGPIPE (128 + 13)
# Columns of text written to a file or a pipe: wide enough that no table column is cut or wrapped (a
# terminal keeps its own width; COLUMNS, when set, wins).
FILE_OUTPUT_WIDTH = 10_000
STDOUT_NAME = "standard output"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="armature", description="Ablation studies of small generative models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ablation", help="run every arm x seed of a spec")
    p.add_argument("arms", metavar="ARMS.yaml")
    p.add_argument("--backend", choices=BACKEND_NAMES, help="overrides the spec's backend")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override the spec with a dotted key, e.g. --set base.steps=2000 --set seeds=3")
    p.add_argument("--run-id", help="name the run (default <study>-<date>-<time>)")
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan; run nothing")
    p.add_argument("--yes", action="store_true", help="accept a large grid")
    p.add_argument("--ray-address", help="an existing Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--metrics-port", type=int, default=DEFAULT_ABLATION_METRICS_PORT,
                   help="Prometheus exporter of this run while it lasts (default: the first free of "
                        "9109-9112, which infra/prometheus/prometheus.yml scrapes; 0: any free port; -1: none)")
    p.add_argument("--allow-dirty", action="store_true", help="vast, ssh: ship uncommitted changes as a patch")
    p.set_defaults(func=cmd_ablation)

    p = sub.add_parser("validate", help="validate a spec and print the expanded plan")
    p.add_argument("arms", metavar="ARMS.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--yes", action="store_true")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("status", help="arms and their states; all runs when no id")
    p.add_argument("run_id", nargs="?")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table",
                   help="csv and json: one record per run (per arm run with a run id), unrounded")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("resume", help="continue what is unfinished, from the last checkpoints")
    p.add_argument("run_id")
    p.add_argument("--ray-address")
    p.add_argument("--metrics-port", type=int, default=DEFAULT_ABLATION_METRICS_PORT)
    p.add_argument("--allow-dirty", action="store_true")
    p.add_argument("--allow-code-change", action="store_true",
                   help="continue on code other than the run started with (recorded in the ledger and the report)")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("cancel", help="stop a run's arms and tear its instances down")
    p.add_argument("run_id")
    p.add_argument("--server-url", help="Vast API URL (default: the SDK's, or VAST_URL)")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("report", help="(re)write results.md, results.csv and plots/")
    p.add_argument("run_id")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("cost", help="what studies, arms and attempts cost, and the waste")
    p.add_argument("--run", help="one run")
    p.add_argument("--since", help="runs created on or after this date (YYYY-MM-DD)")
    p.add_argument("--until", help="runs created before this date (YYYY-MM-DD)")
    p.add_argument("--backend", choices=BACKEND_NAMES)
    p.add_argument("--format", choices=["table", "csv", "json", "markdown"], default="table")
    p.add_argument("--detail", action="store_true", help="one line per attempt and overhead")
    p.set_defaults(func=cmd_cost)

    p = sub.add_parser("reap", help="destroy this ledger's instances that no live run owns")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--instance", action="append", metavar="ID",
                   help="destroy this instance (provider id) whoever owns it; repeatable")
    p.add_argument("--server-url", help="Vast API URL (default: the SDK's, or VAST_URL)")
    p.set_defaults(func=cmd_reap)

    p = sub.add_parser("exporter", help="serve GPU health and ledger state to Prometheus")
    p.add_argument("--port", type=int, default=DEFAULT_EXPORTER_PORT)
    p.add_argument("--host", default="127.0.0.1")
    p.set_defaults(func=cmd_exporter)

    p = sub.add_parser("schema", help="print the JSON Schema of the arms YAML")
    p.set_defaults(func=cmd_schema)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Mistakes and an unusable environment (a read-only or full ARMATURE_HOME, a missing
    file) print one line and exit 2; a reader that closed the pipe (`| head`) ends the command quietly."""
    args = build_parser().parse_args(argv)
    stdout, sys.stdout = sys.stdout, _StdoutNamedInErrors(sys.stdout)
    try:
        return _run_command(args)
    finally:
        sys.stdout = stdout


def _run_command(args) -> int:
    try:
        code = args.func(args) or 0
        sys.stdout.flush()              # a full disk or a closed pipe under stdout shows here, not at interpreter exit
        return code
    except UserError as exc:
        return _fail(str(exc))
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_BROKEN_PIPE
    except sqlite3.OperationalError as exc:
        if not ledger_access_problem(exc):
            raise
        return _fail(ledger_error_message(exc, paths.ledger_path(), paths.home()))
    except OSError as exc:
        if exc.filename == STDOUT_NAME:
            _discard_stdout()
        return _fail(os_error_message(exc))


def _fail(message: str) -> int:
    print(f"armature: error: {message}", file=sys.stderr)
    return 2


def _output_width() -> int | None:
    """The width to lay output out for: None (the terminal's) on a TTY or with COLUMNS set, else wide."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return None
    return FILE_OUTPUT_WIDTH


def _console() -> Console:
    return Console(width=_output_width())


class _StdoutNamedInErrors:
    """sys.stdout, whose write errors (a full disk under a redirect) name it: the OS names no file there."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as exc:
            exc.filename = exc.filename or STDOUT_NAME
            raise

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            exc.filename = exc.filename or STDOUT_NAME
            raise

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _discard_stdout() -> None:
    """Point stdout at /dev/null so that Python's own flush at exit does not fail a second time."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


# ---- ablation and resume ------------------------------------------------------------


def cmd_validate(args) -> int:
    from orchestrator.planview import print_plan
    from orchestrator.spec import load_plan

    plan = load_plan(args.arms, args.set, args.yes)
    print_plan(plan, _console())
    return 0


def cmd_ablation(args) -> int:
    from orchestrator.gitinfo import code_version
    from orchestrator.planview import estimate_event, print_plan
    from orchestrator.runs import check_run_id, create_run, new_run_id
    from orchestrator.spec import load_plan

    sets = args.set + ([f"backend={args.backend}"] if args.backend else [])
    plan = load_plan(args.arms, sets, args.yes)
    backend_name = plan.study.backend
    console = _console()
    print_plan(plan, console)
    if args.dry_run:
        return 0
    ledger = Ledger(paths.ledger_path())
    run_id = args.run_id or new_run_id(plan.study.name)
    run_dir = paths.run_dir(run_id)
    check_run_id(ledger, run_id, run_dir)

    backend = _make_backend(backend_name, plan.study, ledger, run_id, run_dir, args)
    backend.start()
    try:
        gpus = _arm_gpus(backend, plan.study)
        _check_fits(backend, plan.study, gpus, console)
        create_run(ledger, plan, run_id, run_dir, backend_name, code_version(), gpus)
        estimate_event(ledger, run_id, plan, gpus)
        console.print(f"run [bold]{run_id}[/bold]  ({run_dir})")
        state = _execute(ledger, run_id, plan.study, backend, run_dir, args, console)
    finally:
        backend.shutdown()
    return _exit_past_a_dead_ray(backend, _conclude(ledger, run_id, run_dir, state, backend, console))


def _run_study(run_dir: Path):
    """The study a run was started with (runs/<id>/spec.yaml, as resolved then)."""
    from orchestrator.spec import Study
    import yaml

    spec = yaml.safe_load((run_dir / "spec.yaml").read_text())
    return Study.model_validate({k: v for k, v in spec.items() if k not in ("source", "git")})


def cmd_resume(args) -> int:
    from orchestrator.runs import settle_orphans

    ledger = Ledger(paths.ledger_path(), create=False)
    run = ledger.get_run(args.run_id)
    if run["state"] in RUN_FINAL_STATES:
        raise UserError(f"run {args.run_id} is {run['state']}; nothing to resume")
    ledger.claim_run(args.run_id)           # atomic: a second `resume` of the run stops here
    try:
        code_event = _code_change_event(run, args.allow_code_change)
        run_dir = paths.run_dir(args.run_id)
        study = _run_study(run_dir)
        adopt = settle_orphans(ledger, args.run_id)
        backend = _make_backend(run["backend"], study, ledger, args.run_id, run_dir, args)
        backend.start()
    except BaseException:
        ledger.set_run_state(args.run_id, run["state"])      # hand the run back as it was
        raise
    if code_event:
        ledger.event(args.run_id, "run.code_change", **code_event)
    console = _console()
    try:
        state = _execute(ledger, args.run_id, study, backend, run_dir, args, console, adopt=adopt)
    finally:
        backend.shutdown()
    return _exit_past_a_dead_ray(backend, _conclude(ledger, args.run_id, run_dir, state, backend, console))


def _code_change_event(run: dict, allow_code_change: bool) -> dict | None:
    """Refuse to resume on other code than the run started with, unless allowed. Returns None for the same
    code, else the detail of the `run.code_change` event to record (the report shows its text)."""
    from orchestrator.gitinfo import code_change, code_version

    now = code_version()
    change = code_change(run["git_commit"], run["git_diff_hash"], now)
    if change is None:
        return None
    if not allow_code_change:
        raise UserError(f"run {run['run_id']}: {change}. Resuming would train its remaining arms on other code "
                        f"than the arms that already ran. Check out the run's code again, or pass "
                        f"--allow-code-change to go on with this code (recorded in the ledger and the report)")
    return dict(text=f"resumed on other code (--allow-code-change): {change}", from_commit=run["git_commit"],
                from_diff_hash=run["git_diff_hash"], to_commit=now["commit"], to_diff_hash=now["diff_hash"])


def _make_backend(name: str, study, ledger: Ledger, run_id: str, run_dir: Path, args):
    if name == "vast":
        from orchestrator.backends.vast.backend import VastBackend
        from orchestrator.backends.vast.config import VastConfig
        return VastBackend(ledger, run_id, run_dir, VastConfig.model_validate(study.vast),
                           study.budget.max_dollars, allow_dirty=args.allow_dirty)
    if name == "ssh":
        from orchestrator.backends.ssh.backend import SshBackend
        from orchestrator.backends.ssh.config import SshConfig
        return SshBackend(ledger, run_id, run_dir, SshConfig.model_validate(study.ssh), allow_dirty=args.allow_dirty)
    from orchestrator.backends.local import LocalBackend
    return LocalBackend(ray_address=args.ray_address or study.ray_address)


def _arm_gpus(backend, study) -> float:
    """GPUs per arm run after the memory guard; 0 where there is no GPU (the arms run on CPU)."""
    from orchestrator.runs import gpu_share
    from orchestrator.telemetry.gpu import local_gpus

    wanted = study.resources.gpus
    if not capabilities(backend.name).runs_here:
        return wanted
    if backend.resources().get("GPU", 0) == 0:
        return 0.0
    gpus = local_gpus()
    card = gpus.memory_total_bytes(0) if gpus.available else None
    return gpu_share(wanted, study.resources.gpu_memory_gb, card / 1e9 if card else None)


def _check_fits(backend, study, gpus: float, console: Console) -> None:
    """Refuse a study whose arm runs no node can hold, before anything is written; on a cluster the user
    named (which may grow), say what the arms wait for instead."""
    never_fits = getattr(backend, "never_fits", None)
    why = never_fits(study.resources.cpus, gpus) if never_fits else None
    if why is None:
        return
    if getattr(backend, "ray_address", None):
        console.print(f"[yellow]{why}: the arm runs wait until such a node joins the cluster[/yellow]")
        return
    raise UserError(f"{why}. Lower `resources.cpus`/`resources.gpus` in the spec (or --set resources.cpus=N), "
                    f"or run on a cluster with larger nodes (--ray-address)")


def _execute(ledger: Ledger, run_id: str, study, backend, run_dir: Path, args, console: Console,
             adopt: dict | None = None) -> str:
    """Drive the run's arm runs to their ends (or to Ctrl-C); returns the run's state."""
    from orchestrator.progress import Progress
    from orchestrator.scheduler import Scheduler
    from orchestrator.telemetry.gpu import local_gpus

    progress = Progress(study.metric.name, console, run_id=run_id)
    for arm_run in ledger.arm_runs(run_id):
        progress.add(arm_run["id"], arm_run["arm"], arm_run["seed"], arm_run["total_steps"], arm_run["state"],
                     arm_run["last_step"], metrics=json.loads(arm_run["last_metrics_json"] or "{}"))
    gpus = max((r["gpus"] for r in ledger.arm_runs(run_id)), default=0)
    gpu_reader = local_gpus()
    scheduler = Scheduler(ledger, run_id, study, backend, run_dir, progress=progress, local_gpus=gpu_reader,
                          max_concurrent=backend.max_concurrent(study.resources.cpus, gpus))
    scheduler.adopt = adopt or {}
    exporter = _start_exporter(args.metrics_port, run_id, console, gpu_reader)

    def on_sigint(signum, frame):
        if scheduler.interrupted:
            raise KeyboardInterrupt
        console.print("[yellow]stopping: trainers checkpoint and exit (Ctrl-C again to stop waiting)[/yellow]")
        scheduler.interrupt()

    previous = signal.signal(signal.SIGINT, on_sigint), signal.signal(signal.SIGTERM, on_sigint)
    progress.start()
    try:
        state = scheduler.run()
    finally:
        progress.stop()
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])
        if exporter is not None:
            exporter.stop()
    return state


def _conclude(ledger: Ledger, run_id: str, run_dir: Path, state: str, backend, console: Console) -> int:
    """After the backend has shut down (instances destroyed): billed charges, the report, the exit code."""
    from orchestrator.report import write_report

    if capabilities(backend.name).bills:
        import requests
        from orchestrator.cost import fetch_provider_charges
        try:
            fetch_provider_charges(backend.client, ledger, run_id)
        except requests.RequestException as exc:
            console.print(f"[yellow]could not fetch billed charges ({exc}); `armature cost` shows estimates[/yellow]")
    write_report(ledger, run_id, run_dir, console=console)
    if ledger.get_run(run_id)["state"] == "stopping":       # a destroy not confirmed: the instance may bill
        console.print(f"[red]run {run_id}: stopping: its instances are not confirmed destroyed; "
                      f"`armature resume {run_id}` finishes the teardown[/red]; results in {run_dir / 'results.md'}")
        return 1
    console.print(f"run {run_id}: {state}; results in {run_dir / 'results.md'}")
    if state == "interrupted":
        if getattr(backend, "down", None):
            console.print(f"[red]{backend.down}[/red]: no arm used up a retry")
        console.print(f"continue with: armature resume {run_id}")
        return 130
    from orchestrator.early_stop import stopped_arms
    decided = stopped_arms(ledger, run_id)       # arms stopped early on purpose (early_stop decided/halving)
    unfinished = [r for r in ledger.arm_runs(run_id) if r["state"] in ("failed", "cancelled")
                  and not (r["state"] == "cancelled" and r["arm"] in decided)]
    return 1 if unfinished and state == "finished" else 0


def _exit_past_a_dead_ray(backend, code: int) -> int:
    """After the run's Ray died under it, Ray's own teardown at interpreter exit can crash (SIGSEGV in its core
    worker, seen once in a few runs). Everything is recorded by now, so leave without that teardown."""
    if getattr(backend, "down", None):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _start_exporter(port: int, run_id: str, console: Console, gpu_reader):
    """This run's exporter (its series only; `armature exporter` serves the other runs) on `port`, or on the
    first free port of STUDY_METRICS_PORTS for the default one. None when -1 or when no port is free."""
    if port < 0:
        return None
    from orchestrator.telemetry.exporter import Exporter

    ports = STUDY_METRICS_PORTS if port == DEFAULT_ABLATION_METRICS_PORT else [port]
    for candidate in ports:
        exporter = Exporter(paths.ledger_path(), port=candidate, local_gpus=gpu_reader, only_run=run_id)
        try:
            exporter.start()
        except OSError as exc:
            error = exc
            continue
        console.print(f"metrics for Prometheus on http://127.0.0.1:{exporter.port}/metrics")
        return exporter
    where = f"ports {ports[0]}-{ports[-1]}" if len(ports) > 1 else f"port {port}"
    console.print(f"[yellow]metrics exporter not started on {where}: {error.strerror}; "
                  f"use --metrics-port[/yellow]")
    return None


# ---- reading the ledger -----------------------------------------------------------


def cmd_status(args) -> int:
    ledger = Ledger(paths.ledger_path(), create=False)
    if args.run_id is None:
        heading, records = "runs", [_run_record(ledger, run) for run in ledger.list_runs()]
    else:
        run = ledger.get_run(args.run_id)
        heading = f"{args.run_id}: {_run_state(run)}"
        records = [_arm_run_record(ledger, run, arm_run) for arm_run in ledger.arm_runs(args.run_id)]
    if args.format == "json":
        print(json.dumps(records if args.run_id is None else
                         {"run": args.run_id, "state": _run_state(run), "arm_runs": records}, indent=2))
    elif args.format == "csv":
        if records:
            writer = csv.DictWriter(sys.stdout, fieldnames=list(records[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(records)
    else:
        _print_status_table(heading, records, _console())
    return 0


def _run_record(ledger: Ledger, run: dict) -> dict:
    orchestrator_gone = _orchestrator_gone(run)
    states = [_arm_state(r["state"], orchestrator_gone) for r in ledger.arm_runs(run["run_id"], kind="arm")]
    return {"run": run["run_id"], "trainer": run["trainer"], "backend": run["backend"], "state": _run_state(run),
            "arm_runs": ", ".join(f"{states.count(s)} {s}" for s in sorted(set(states))),
            "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(run["created_at"]))}


def _arm_run_record(ledger: Ledger, run: dict, arm_run: dict) -> dict:
    value = json.loads(arm_run["last_metrics_json"] or "{}").get(run["metric"])
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        value = None                    # a diverged arm's NaN: not a number JSON can carry
    return {"run": run["run_id"], "arm": arm_run["arm"], "seed": arm_run["seed"],
            "state": _arm_state(arm_run["state"], _orchestrator_gone(run)), "step": arm_run["last_step"],
            "total_steps": arm_run["total_steps"], run["metric"] or "metric": value,
            "attempts": len(ledger.attempts(arm_run["id"])), "restarts": arm_run["restarts"],
            "reason": arm_run["reason"] or ""}


def _print_status_table(heading: str, records: list[dict], console: Console) -> None:
    """Runs (heading "runs") or one run's arm runs: the run id never cut, step as step/total, metrics to 4 digits."""
    if heading != "runs":
        console.print(heading, soft_wrap=True, markup=False, highlight=False)
        records = [{key: value for key, value in record.items() if key not in ("run", "total_steps")}
                   | {"step": f"{record['step'] or 0}/{record['total_steps'] or '?'}"} for record in records]
    table = Table(title="runs" if heading == "runs" else None)
    for key in (records[0] if records else {}):
        if key == "run":    # what every other command needs: never cut, even on a narrow terminal
            table.add_column(key, no_wrap=True, min_width=max(len(r["run"]) for r in records))
        else:
            table.add_column("arm runs" if key == "arm_runs" else key)
    for record in records:
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else "" if v is None else str(v) for v in record.values()))
    console.print(table)


def _orchestrator_gone(run: dict) -> bool:
    """Is the run recorded as `running` on this host while the orchestrator recorded for it is dead?
    (An orchestrator on another host cannot be checked from here: its run stays `running`.)"""
    return (run["state"] == "running" and run["orchestrator_host"] == os.uname().nodename
            and not orchestrator_alive(run))


def _run_state(run: dict) -> str:
    if _orchestrator_gone(run):
        return f"interrupted (orchestrator not running; armature resume {run['run_id']})"
    if run["state"] == "running" and run["orchestrator_host"] != os.uname().nodename:
        return f"running (orchestrator pid {run['orchestrator_pid']} on {run['orchestrator_host']})"
    return run["state"]


def _arm_state(state: str, orchestrator_gone: bool) -> str:
    """An arm run left in an active state by a dead orchestrator is interrupted: `resume` continues it."""
    return "interrupted" if orchestrator_gone and state in ACTIVE_STATES else state


def cmd_cancel(args) -> int:
    from orchestrator.runs import settle_orphans

    ledger = Ledger(paths.ledger_path(), create=False)
    run = ledger.get_run(args.run_id)
    if run["state"] in RUN_FINAL_STATES:
        print(f"run {args.run_id} is already {run['state']}")
        return 0
    ledger.request_cancel(args.run_id)
    if not _wait_or_claim(ledger, args.run_id):
        print(f"run {args.run_id}: {ledger.get_run(args.run_id)['state']}")
        return 0
    settle_orphans(ledger, args.run_id)
    for attempt in ledger.open_attempts(args.run_id):      # attempts on rented instances
        ledger.end_attempt(attempt["id"], "cancelled", reason="run cancelled")
    for arm_run in ledger.arm_runs(args.run_id):
        if arm_run["state"] not in FINAL_STATES:
            ledger.transition(arm_run["id"], "cancelled", "run cancelled")
    ledger.set_run_state(args.run_id, "cancelled")
    if capabilities(run["backend"]).rents_instances:
        _teardown_instances(ledger, args.run_id, args.server_url)
    elif not capabilities(run["backend"]).runs_here:
        _clean_own_hosts(ledger, args.run_id)
    print(f"run {args.run_id}: cancelled")
    return 0


def _wait_or_claim(ledger: Ledger, run_id: str) -> bool:
    """After a cancel request: wait while a live orchestrator acts on it. Returns False once the run has
    ended, True once this process holds the run (its orchestrator stopped without ending it, or is dead)."""
    told = False
    while True:
        run = ledger.get_run(run_id)
        if run["state"] in RUN_FINAL_STATES:
            return False
        if orchestrator_alive(run):
            if not told:
                print(f"asked the orchestrator (pid {run['orchestrator_pid']}) to cancel {run_id}; waiting")
                told = True
            time.sleep(0.5)
            continue
        try:
            ledger.claim_run(run_id)
            return True
        except (RunClaimed, IllegalTransition):
            continue                # a resume took it meanwhile (it sees the request), or the run just ended


def _clean_own_hosts(ledger: Ledger, run_id: str) -> None:
    """A cancelled run on machines of your own whose orchestrator died: stop its processes on every host and remove
    its scratch folders now, rather than when their dead-man switch fires."""
    import yaml

    from orchestrator.backends.ssh.config import SshConfig
    from orchestrator.backends.ssh.provider import clean_hosts

    try:
        cfg = SshConfig.model_validate(_run_study(paths.run_dir(run_id)).ssh)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        print(f"cannot read the hosts of run {run_id} ({exc}); each host's dead-man switch stops armature there")
        return
    for host, problem in clean_hosts(ledger, run_id, cfg):
        print(f"host {host}: " + (f"armature stopped and its scratch folder removed" if problem is None else
                                  f"NOT cleaned ({problem}); its dead-man switch does so after "
                                  f"{cfg.orchestrator_silence_seconds:.0f}s without contact"))


def _teardown_instances(ledger: Ledger, run_id: str, server_url: str | None) -> None:
    from orchestrator.backends.vast.provider import make_client
    from orchestrator.backends.vast.reap import reap

    for entry in reap(make_client(server_url), ledger, only_run=run_id):
        if entry["foreign"]:
            continue
        print(f"destroyed instance {entry['provider_instance_id']} ({entry['label']}): "
              f"{'confirmed' if entry['destroyed'] else 'NOT confirmed; run `armature reap`'}")


def cmd_report(args) -> int:
    from orchestrator.report import write_report

    ledger = Ledger(paths.ledger_path(), create=False)
    ledger.get_run(args.run_id)
    written = write_report(ledger, args.run_id, paths.run_dir(args.run_id), console=_console())
    print(f"wrote {written}")
    return 0


def cmd_cost(args) -> int:
    from orchestrator.cost import cost_command

    if not paths.ledger_path().exists():
        raise UserError(f"{paths.ledger_path()}: no ledger yet; nothing has run with ARMATURE_HOME={paths.home()}")
    ledger = Ledger(paths.ledger_path(), create=False)
    print(cost_command(ledger, run=args.run, since=args.since, until=args.until, backend=args.backend,
                       fmt=args.format, detail=args.detail, console_width=_output_width()), end="")
    return 0


def cmd_reap(args) -> int:
    from orchestrator.backends.vast.provider import make_client
    from orchestrator.backends.vast.reap import reap, reap_keys

    client, ledger = make_client(args.server_url), Ledger(paths.ledger_path())
    found = reap(client, ledger, dry_run=args.dry_run, instances=set(args.instance) if args.instance else None)
    if not any(args.instance or not entry["foreign"] for entry in found):
        print("no orphaned armature instances")
    for entry in found:
        outcome = {None: "would destroy", True: "destroyed (confirmed)", False: "destroy NOT confirmed"}
        if entry["foreign"] and not args.instance:
            print(f"not this ledger's, left alone: instance {entry['provider_instance_id']} {entry['label']} "
                  f"({entry['status']}): {entry['reason']}; `armature reap --instance "
                  f"{entry['provider_instance_id']}` destroys it")
            continue
        print(f"{outcome[entry['destroyed']]}: instance {entry['provider_instance_id']} {entry['label']} "
              f"({entry['status']}, ${entry['dph_total'] or 0:.3f}/h): {entry['reason']}")
    if not args.instance:
        for key in reap_keys(client, ledger, dry_run=args.dry_run):
            print(f"{'removed' if key['removed'] else 'would remove'}: SSH key {key['key_id']} of run "
                  f"{key['run_id']} from the account: {key['reason']}")
    return 1 if any(entry["destroyed"] is False for entry in found) else 0


def cmd_exporter(args) -> int:
    from orchestrator.telemetry.exporter import Exporter
    from orchestrator.telemetry.gpu import local_gpus

    exporter = Exporter(paths.ledger_path(), addr=args.host, port=args.port, local_gpus=local_gpus(),
                        skip_live_runs=True)       # a live study's run is served by that study's exporter
    try:
        exporter.start()
    except OSError as exc:
        raise UserError(f"cannot serve on {args.host}:{args.port}: {exc.strerror}; another exporter may be "
                        f"running there already, or pick another port with --port") from None
    print(f"serving http://{args.host}:{exporter.port}/metrics (Ctrl-C stops)", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        exporter.stop()
    return 0


def cmd_schema(args) -> int:
    from orchestrator.spec import json_schema
    print(json.dumps(json_schema(), indent=2))
    return 0
