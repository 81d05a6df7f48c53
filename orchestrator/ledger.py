"""The ledger: every run, arm run, attempt, instance and charge, in SQLite (WAL).

The ledger is the single source of truth. A state change is committed here
before it is acted on, so a killed orchestrator loses nothing `resume` cannot
pick up, and no rented instance is ever forgotten.

Several armature processes may share one ledger (an ablation, `status`,
`cancel`, the exporter): SQLite in WAL mode with a busy timeout serialises
their writes; every write is one short `BEGIN IMMEDIATE` transaction.
This module knows nothing of Ray, SSH or Vast.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from orchestrator.errors import UserError
from orchestrator.procs import command_line, process_start_time, same_process_alive

SCHEMA_VERSION = 1

# Arm run states (DESIGN.md). `pending` also covers an arm run whose attempt
# was interrupted (Ctrl-C) and that `resume` will continue.
ACTIVE_STATES = ("provisioning", "deploying", "running", "collecting")
FINAL_STATES = ("succeeded", "failed", "diverged", "cancelled")
ARM_STATES = ("pending",) + ACTIVE_STATES + FINAL_STATES
FAILURE_ENDS = ("failed", "diverged", "cancelled")


def _arm_moves(state: str) -> tuple[str, ...]:
    """Where an arm run may go from `state`: forward through the active states (a local attempt skips
    provisioning and deploying; repeating a state re-records it), back to pending for a retry or a resume,
    to a failure end from anywhere unfinished, to succeeded only once collected; never out of a final state."""
    if state in FINAL_STATES:
        return ()
    forward = ACTIVE_STATES[ACTIVE_STATES.index(state):] if state in ACTIVE_STATES else ACTIVE_STATES
    collected = ("succeeded",) if state == "collecting" else ()
    return ("pending",) + forward + collected + FAILURE_ENDS


ARM_MOVES = {state: _arm_moves(state) for state in ARM_STATES}

# Run states. `running` -> `running` is a driver claiming the run again (resume, or the scheduler after the CLI).
# `stopping`: the run has ended (finished or cancelled, kept in runs.final_state) but instances it rented are
# not confirmed destroyed yet; the last confirmed destroy moves it to its final state (update_instance), and
# `resume` claims it again to finish the teardown.
RUN_STATES = ("running", "stopping", "interrupted", "finished", "failed", "cancelled")
RUN_FINAL_STATES = ("finished", "cancelled")
RUN_MOVES = {
    "running": ("running", "stopping", "interrupted", "finished", "failed", "cancelled"),
    "stopping": ("running", "stopping", "finished", "cancelled"),
    "interrupted": ("running", "cancelled"),
    "failed": ("running", "cancelled"),
    "finished": (),
    "cancelled": (),
}
LIVE_INSTANCE_SQL = "destroyed_at IS NULL AND state != 'failed_create'"


class LedgerError(UserError):
    """A change the ledger refuses; nothing was written."""


class IllegalTransition(LedgerError):
    """A state change the arm run or run state machine does not allow."""


class RunClaimed(LedgerError):
    """Another live orchestrator drives the run."""


def _check_move(what: str, moves: dict, from_state: str, to_state: str) -> None:
    if to_state not in moves:
        raise IllegalTransition(f"{what}: unknown state {to_state!r}; states are {', '.join(moves)}")
    if to_state not in moves[from_state]:
        allowed = ", ".join(moves[from_state]) or "nothing: it is a final state"
        raise IllegalTransition(f"{what}: {from_state} -> {to_state} is not a legal move "
                                f"(from {from_state}: {allowed})")


def orchestrator_alive(run: dict) -> bool:
    """Is the process recorded as driving this run still alive (on this host)?"""
    pid = run["orchestrator_pid"]
    if run["state"] not in ("running", "stopping") or not pid or run["orchestrator_host"] != os.uname().nodename:
        return False
    if pid == os.getpid():
        return True
    if run.get("orchestrator_start_time"):
        return same_process_alive(pid, run["orchestrator_start_time"])
    # a row from before start times were recorded: the pid must still be an armature process
    cmdline = command_line(pid)
    return "armature" in cmdline or "orchestrator" in cmdline


SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    trainer TEXT NOT NULL,
    backend TEXT NOT NULL,
    spec_path TEXT,
    state TEXT NOT NULL,
    metric TEXT,
    metric_mode TEXT,
    baseline TEXT,
    budget_dollars REAL,
    git_commit TEXT,
    git_diff_hash TEXT,
    orchestrator_host TEXT,
    orchestrator_pid INTEGER,
    orchestrator_start_time TEXT,              -- /proc start time of orchestrator_pid (a pid may be reused)
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    ended_at REAL
);
CREATE TABLE IF NOT EXISTS arm_runs (
    id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    arm TEXT NOT NULL,
    seed INTEGER NOT NULL,
    trainer TEXT NOT NULL,                     -- module under trainers/ (upstream runs differ from the run's)
    kind TEXT NOT NULL DEFAULT 'arm',          -- 'arm' or 'upstream'
    upstream_ids TEXT NOT NULL DEFAULT '{}',   -- JSON {config key for its folder: arm_runs.id} waited for
    config_json TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    out_dir TEXT NOT NULL,
    total_steps INTEGER,
    gpus REAL NOT NULL DEFAULT 0,
    cpus REAL NOT NULL DEFAULT 1,
    gpu_memory_gb REAL,
    state TEXT NOT NULL,
    reason TEXT,
    last_step INTEGER,
    last_metrics_json TEXT,
    summary_json TEXT,                         -- the trainer's summary.json once it succeeded
    restarts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    ended_at REAL,
    UNIQUE (run_id, arm, seed)
);
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY,
    arm_run_id INTEGER NOT NULL REFERENCES arm_runs(id),
    n INTEGER NOT NULL,                -- 1, 2, ... per arm run
    state TEXT NOT NULL,               -- running, succeeded, failed, diverged, interrupted, preempted, lost, cancelled
    backend TEXT NOT NULL,
    host TEXT,
    ray_node TEXT,                     -- Ray node id (local backend), e.g. to tell two nodes on one host apart
    hardware TEXT,                     -- GPU model, or 'cpu (<model>)'
    gpu_index TEXT,                    -- CUDA_VISIBLE_DEVICES given to the trainer
    pid INTEGER,
    pid_start_time TEXT,               -- /proc start time, to tell a live trainer from a reused pid
    instance_id INTEGER REFERENCES instances(id),
    start_step INTEGER,                -- the first step it logged (after a resume: past the checkpoint's)
    end_step INTEGER,
    exit_code INTEGER,
    reason TEXT,
    energy_joules REAL,                -- NVML energy counter delta (local GPUs)
    started_at REAL NOT NULL,
    ended_at REAL
);
CREATE TABLE IF NOT EXISTS transitions (
    id INTEGER PRIMARY KEY,
    arm_run_id INTEGER NOT NULL REFERENCES arm_runs(id),
    attempt_id INTEGER,
    from_state TEXT,
    to_state TEXT NOT NULL,
    reason TEXT,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS metrics (
    arm_run_id INTEGER NOT NULL REFERENCES arm_runs(id),
    step INTEGER NOT NULL,
    attempt_id INTEGER,
    at REAL,
    data_json TEXT NOT NULL,
    PRIMARY KEY (arm_run_id, step)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    run_id TEXT,
    arm_run_id INTEGER,
    kind TEXT NOT NULL,                -- e.g. watchdog.breach, budget.stop, instance.destroy_retry
    detail_json TEXT NOT NULL DEFAULT '{}',
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS instances (
    id INTEGER PRIMARY KEY,
    run_id TEXT REFERENCES runs(run_id),
    provider TEXT NOT NULL,            -- 'vast'
    provider_instance_id TEXT,         -- set once create answered
    label TEXT NOT NULL,               -- armature:<run_id>:<attempt>
    offer_id TEXT,
    machine_id TEXT,
    gpu_name TEXT,
    num_gpus INTEGER,
    dph_total REAL,                    -- contracted $/h at rent time, storage included
    state TEXT NOT NULL,               -- creating, booting, ready, destroying, destroyed, failed
    ssh_host TEXT,
    ssh_port INTEGER,
    host_key TEXT,                     -- pinned at first contact
    reason TEXT,
    created_at REAL NOT NULL,          -- create requested
    ready_at REAL,
    destroy_requested_at REAL,
    destroyed_at REAL                  -- destruction confirmed by the provider
);
CREATE TABLE IF NOT EXISTS charges (
    id INTEGER PRIMARY KEY,
    instance_id INTEGER REFERENCES instances(id),
    run_id TEXT,
    source TEXT NOT NULL,              -- 'provider' (billed) or 'estimate'
    amount_dollars REAL NOT NULL,
    period_start REAL,
    period_end REAL,
    detail_json TEXT NOT NULL DEFAULT '{}',
    recorded_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS gpu_health (
    host TEXT NOT NULL,
    gpu TEXT NOT NULL,
    run_id TEXT,
    arm TEXT,
    sample_json TEXT NOT NULL,         -- orchestrator.telemetry.gpu.GpuSample as a dict
    at REAL NOT NULL,
    PRIMARY KEY (host, gpu)
);
CREATE INDEX IF NOT EXISTS arm_runs_by_run ON arm_runs(run_id);
CREATE INDEX IF NOT EXISTS attempts_by_arm_run ON attempts(arm_run_id);
CREATE INDEX IF NOT EXISTS transitions_by_arm_run ON transitions(arm_run_id);
CREATE INDEX IF NOT EXISTS events_by_run ON events(run_id);
CREATE INDEX IF NOT EXISTS instances_by_run ON instances(run_id);
"""

# Columns added to a schema version after ledgers of that version existed; added in place (older armatures
# name their columns, so they keep working on the upgraded file).
ADDED_COLUMNS = (("runs", "orchestrator_start_time", "TEXT"), ("runs", "final_state", "TEXT"),
                 # the bill's inputs (cost/reconcile.py): the latest stop / exit the provider reported (each
                 # move is also an `instance.status` event), the disk and its $/GB/month, a bid rental
                 ("instances", "stopped_at", "REAL"), ("instances", "exited_at", "REAL"),
                 ("instances", "disk_gb", "REAL"), ("instances", "storage_cost", "REAL"),
                 ("instances", "interruptible", "INTEGER"),
                 # the provider's own start of the rental (Vast's start_date), from which it bills storage
                 ("instances", "provider_started_at", "REAL"))


def _row_dict(cursor: sqlite3.Cursor, row: tuple) -> dict:
    return {col[0]: value for col, value in zip(cursor.description, row)}


class Ledger:
    """One SQLite file; safe to share between threads of one process and between processes."""

    def __init__(self, path: str | os.PathLike, create: bool = True):
        self.path = Path(path)
        if not self.path.exists() and not create:
            raise UserError(f"{self.path}: no ledger here yet (nothing has run with this ARMATURE_HOME)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.row_factory = _row_dict
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=30000")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def identity(self) -> str:
        """This ledger's random id, made once and kept in `meta`: what it rents is labelled with it, so two
        ledgers on one cloud account (two ARMATURE_HOMEs, two people) can tell their instances apart."""
        row = self.query_one("SELECT value FROM meta WHERE key='ledger_id'")
        if row is not None:
            return row["value"]
        with self.write() as db:
            row = db.execute("SELECT value FROM meta WHERE key='ledger_id'").fetchone()
            if row is not None:
                return row["value"]
            value = secrets.token_hex(6)
            db.execute("INSERT INTO meta(key, value) VALUES ('ledger_id', ?)", (value,))
            return value

    def _migrate(self) -> None:
        with self.write() as db:
            has_meta = db.execute("SELECT name FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
            tables = db.execute("SELECT count(*) AS n FROM sqlite_master WHERE type='table'").fetchone()["n"]
            if not has_meta and tables:
                raise UserError(f"{self.path}: not an armature ledger (no schema version); move it aside")
            if has_meta:
                row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                version = int(row["value"]) if row else 0
                if version > SCHEMA_VERSION:
                    raise UserError(
                        f"{self.path}: ledger schema version {version} is newer than this armature "
                        f"understands ({SCHEMA_VERSION}); upgrade armature")
                if version < SCHEMA_VERSION:
                    raise UserError(
                        f"{self.path}: ledger schema version {version} was written by an older armature "
                        f"(this one needs {SCHEMA_VERSION}); move it aside or point ARMATURE_HOME elsewhere")
            # Every statement is IF NOT EXISTS: an existing ledger gains tables added since it was made.
            # executescript() would commit mid-transaction: run the statements one by one.
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            for table, column, decl in ADDED_COLUMNS:
                if column not in {c["name"] for c in db.execute(f"PRAGMA table_info({table})").fetchall()}:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
            if not has_meta:
                db.execute("INSERT INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT), committed before returning."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")

    def query(self, sql: str, params: Iterable[Any] = ()) -> list[dict]:
        with self._lock:
            return self._db.execute(sql, tuple(params)).fetchall()

    def query_one(self, sql: str, params: Iterable[Any] = ()) -> dict | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    # ---- runs ---------------------------------------------------------------

    def create_run(self, run_id: str, *, name: str, trainer: str, backend: str, spec_path: str | None,
                   metric: str | None, metric_mode: str | None, baseline: str | None,
                   budget_dollars: float | None, git_commit: str | None, git_diff_hash: str | None) -> None:
        """Add a run, claimed by this process (state running)."""
        now = time.time()
        with self.write() as db:
            if db.execute("SELECT 1 FROM runs WHERE run_id=?", (run_id,)).fetchone():
                raise LedgerError(f"run {run_id!r} exists already in {self.path}; "
                                  f"`armature resume {run_id}` continues it")
            db.execute(
                "INSERT INTO runs(run_id, name, trainer, backend, spec_path, state, metric, metric_mode, baseline,"
                " budget_dollars, git_commit, git_diff_hash, orchestrator_host, orchestrator_pid,"
                " orchestrator_start_time, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, name, trainer, backend, spec_path, metric, metric_mode, baseline, budget_dollars,
                 git_commit, git_diff_hash, os.uname().nodename, os.getpid(), process_start_time(os.getpid()),
                 now, now))

    def get_run(self, run_id: str) -> dict:
        row = self.query_one("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        if row is None:
            known = [r["run_id"] for r in self.query("SELECT run_id FROM runs ORDER BY created_at DESC LIMIT 5")]
            hint = f"; recent runs: {', '.join(known)}" if known else "; the ledger has no runs yet"
            raise UserError(f"unknown run id {run_id!r} in {self.path}{hint}")
        return row

    def list_runs(self) -> list[dict]:
        return self.query("SELECT * FROM runs ORDER BY created_at")

    def _run_row(self, db: sqlite3.Connection, run_id: str) -> dict:
        row = db.execute("SELECT * FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return row if row is not None else self.get_run(run_id)      # get_run raises the clear error

    def set_run_state(self, run_id: str, state: str, *, claim: bool = False) -> None:
        """Move a run to a new state (legal moves only); `claim=True` is `claim_run` (state running).

        A run that stops without ending (interrupted, failed) drops a pending cancel request: it was
        meant for that drive, and `armature cancel` finishes the job itself once the driver is gone.
        A run that ends (finished, cancelled) while instances it rented are not confirmed destroyed is
        `stopping` until they are (`armature status` never says finished while one may bill).
        """
        if claim:
            assert state == "running", state
            self.claim_run(run_id)
            return
        now = time.time()
        with self.write() as db:
            row = self._run_row(db, run_id)
            _check_move(f"run {run_id}", RUN_MOVES, row["state"], state)
            final_state = None
            if state in RUN_FINAL_STATES and db.execute(
                    f"SELECT 1 FROM instances WHERE run_id=? AND {LIVE_INSTANCE_SQL} LIMIT 1", (run_id,)).fetchone():
                state, final_state = "stopping", state
            ended = now if state in ("finished", "failed", "cancelled") else None
            cancel = 0 if state in ("interrupted", "failed") else row["cancel_requested"]
            db.execute("UPDATE runs SET state=?, final_state=?, updated_at=?, ended_at=?, cancel_requested=?"
                       " WHERE run_id=?", (state, final_state, now, ended, cancel, run_id))

    def _end_stopped_run(self, db: sqlite3.Connection, instance_id: int) -> None:
        """A `stopping` run whose last live instance this was moves to its final state."""
        owner = db.execute("SELECT run_id FROM instances WHERE id=?", (instance_id,)).fetchone()
        if owner is None or owner["run_id"] is None:
            return
        run = db.execute("SELECT state, final_state FROM runs WHERE run_id=?", (owner["run_id"],)).fetchone()
        if run is None or run["state"] != "stopping" or db.execute(
                f"SELECT 1 FROM instances WHERE run_id=? AND {LIVE_INSTANCE_SQL} LIMIT 1",
                (owner["run_id"],)).fetchone():
            return
        now = time.time()
        db.execute("UPDATE runs SET state=?, final_state=NULL, updated_at=?, ended_at=? WHERE run_id=?",
                   (run["final_state"] or "finished", now, now, owner["run_id"]))

    def claim_run(self, run_id: str) -> None:
        """Record this process as the one driving the run (state running), in one write transaction.

        Refused (RunClaimed) while another live process drives it, so two `resume`s cannot both launch
        its arms; refused (IllegalTransition) for a finished or cancelled run. A cancel requested
        before the claim stays requested.
        """
        me = os.getpid()
        with self.write() as db:
            row = self._run_row(db, run_id)
            if row["orchestrator_pid"] != me and orchestrator_alive(row):
                raise RunClaimed(f"run {run_id} is being driven by pid {row['orchestrator_pid']} on "
                                 f"{row['orchestrator_host']}; `armature cancel {run_id}` stops it")
            _check_move(f"run {run_id}", RUN_MOVES, row["state"], "running")
            db.execute("UPDATE runs SET state='running', final_state=NULL, updated_at=?, ended_at=NULL,"
                       " orchestrator_host=?,"
                       " orchestrator_pid=?, orchestrator_start_time=? WHERE run_id=?",
                       (time.time(), os.uname().nodename, me, process_start_time(me), run_id))

    def request_cancel(self, run_id: str) -> None:
        with self.write() as db:
            db.execute("UPDATE runs SET cancel_requested=1, updated_at=? WHERE run_id=?", (time.time(), run_id))

    def cancel_requested(self, run_id: str) -> bool:
        row = self.query_one("SELECT cancel_requested FROM runs WHERE run_id=?", (run_id,))
        return bool(row and row["cancel_requested"])

    # ---- arm runs -----------------------------------------------------------

    def add_arm_run(self, run_id: str, *, arm: str, seed: int, kind: str, config: dict, config_hash: str,
                    out_dir: str, total_steps: int | None, gpus: float, cpus: float,
                    gpu_memory_gb: float | None, upstream_ids: dict[str, int] | None = None,
                    trainer: str | None = None) -> int:
        """Plan an arm run; `trainer` defaults to the run's trainer (upstream runs name their own)."""
        now = time.time()
        with self.write() as db:
            if trainer is None:
                trainer = db.execute("SELECT trainer FROM runs WHERE run_id=?", (run_id,)).fetchone()["trainer"]
            cur = db.execute(
                "INSERT INTO arm_runs(run_id, arm, seed, trainer, kind, upstream_ids, config_json, config_hash, out_dir,"
                " total_steps, gpus, cpus, gpu_memory_gb, state, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
                (run_id, arm, seed, trainer, kind, json.dumps(upstream_ids or {}), json.dumps(config, sort_keys=True),
                 config_hash, out_dir, total_steps, gpus, cpus, gpu_memory_gb, now, now))
            arm_run_id = cur.lastrowid
            db.execute("INSERT INTO transitions(arm_run_id, from_state, to_state, reason, at)"
                       " VALUES (?, NULL, 'pending', 'planned', ?)", (arm_run_id, now))
        return arm_run_id

    def arm_runs(self, run_id: str, kind: str | None = None) -> list[dict]:
        if kind:
            return self.query("SELECT * FROM arm_runs WHERE run_id=? AND kind=? ORDER BY id", (run_id, kind))
        return self.query("SELECT * FROM arm_runs WHERE run_id=? ORDER BY id", (run_id,))

    def arm_run(self, arm_run_id: int) -> dict:
        return self.query_one("SELECT * FROM arm_runs WHERE id=?", (arm_run_id,))

    def transition(self, arm_run_id: int, to_state: str, reason: str | None = None,
                   attempt_id: int | None = None) -> None:
        """Move an arm run to a new state and record the transition, in one transaction.

        Only the moves in ARM_MOVES are allowed; any other raises IllegalTransition and writes nothing.
        """
        now = time.time()
        with self.write() as db:
            row = db.execute("SELECT state, arm, seed FROM arm_runs WHERE id=?", (arm_run_id,)).fetchone()
            if row is None:
                raise LedgerError(f"no arm run {arm_run_id} in {self.path}")
            _check_move(f"arm run {arm_run_id} ({row['arm']} seed {row['seed']})", ARM_MOVES, row["state"],
                        to_state)
            db.execute("UPDATE arm_runs SET state=?, reason=?, updated_at=?, ended_at=? WHERE id=?",
                       (to_state, reason, now, now if to_state in FINAL_STATES else None, arm_run_id))
            db.execute("INSERT INTO transitions(arm_run_id, attempt_id, from_state, to_state, reason, at)"
                       " VALUES (?, ?, ?, ?, ?, ?)", (arm_run_id, attempt_id, row["state"], to_state, reason, now))

    def transitions(self, arm_run_id: int) -> list[dict]:
        return self.query("SELECT * FROM transitions WHERE arm_run_id=? ORDER BY id", (arm_run_id,))

    def add_restart(self, arm_run_id: int) -> int:
        with self.write() as db:
            db.execute("UPDATE arm_runs SET restarts = restarts + 1 WHERE id=?", (arm_run_id,))
            return db.execute("SELECT restarts FROM arm_runs WHERE id=?", (arm_run_id,)).fetchone()["restarts"]

    # ---- attempts -----------------------------------------------------------

    def start_attempt(self, arm_run_id: int, *, backend: str, host: str | None = None,
                      hardware: str | None = None, gpu_index: str | None = None,
                      instance_id: int | None = None, start_step: int | None = None) -> int:
        now = time.time()
        with self.write() as db:
            n = db.execute("SELECT count(*) AS n FROM attempts WHERE arm_run_id=?", (arm_run_id,)).fetchone()["n"] + 1
            cur = db.execute(
                "INSERT INTO attempts(arm_run_id, n, state, backend, host, hardware, gpu_index, instance_id,"
                " start_step, started_at) VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?, ?)",
                (arm_run_id, n, backend, host, hardware, gpu_index, instance_id, start_step, now))
            return cur.lastrowid

    def update_attempt(self, attempt_id: int, **fields: Any) -> None:
        if not fields:
            return
        cols = ", ".join(f"{k}=?" for k in fields)
        with self.write() as db:
            db.execute(f"UPDATE attempts SET {cols} WHERE id=?", (*fields.values(), attempt_id))

    def end_attempt(self, attempt_id: int, state: str, *, exit_code: int | None = None,
                    reason: str | None = None, end_step: int | None = None) -> None:
        with self.write() as db:
            db.execute("UPDATE attempts SET state=?, exit_code=?, reason=?, end_step=?, ended_at=? WHERE id=?",
                       (state, exit_code, reason, end_step, time.time(), attempt_id))

    def attempts(self, arm_run_id: int) -> list[dict]:
        return self.query("SELECT * FROM attempts WHERE arm_run_id=? ORDER BY n", (arm_run_id,))

    def open_attempts(self, run_id: str) -> list[dict]:
        return self.query("SELECT a.* FROM attempts a JOIN arm_runs r ON a.arm_run_id = r.id"
                          " WHERE r.run_id=? AND a.ended_at IS NULL ORDER BY a.id", (run_id,))

    # ---- metrics ------------------------------------------------------------

    def record_metrics(self, arm_run_id: int, attempt_id: int | None, rows: list[dict]) -> None:
        """Store metric rows (one per step; a re-emitted step after a resume replaces the old one)."""
        if not rows:
            return
        last = rows[-1]
        with self.write() as db:
            db.executemany(
                "INSERT OR REPLACE INTO metrics(arm_run_id, step, attempt_id, at, data_json) VALUES (?, ?, ?, ?, ?)",
                [(arm_run_id, int(r["step"]), attempt_id, r.get("time"), json.dumps(r)) for r in rows])
            prev = db.execute("SELECT last_metrics_json FROM arm_runs WHERE id=?", (arm_run_id,)).fetchone()
            merged = json.loads(prev["last_metrics_json"] or "{}")
            for r in rows:
                merged.update({k: v for k, v in r.items() if v is not None})
            db.execute("UPDATE arm_runs SET last_step=?, last_metrics_json=?, updated_at=? WHERE id=?",
                       (int(last["step"]), json.dumps(merged), time.time(), arm_run_id))

    def set_summary(self, arm_run_id: int, summary: dict) -> None:
        with self.write() as db:
            db.execute("UPDATE arm_runs SET summary_json=?, updated_at=? WHERE id=?",
                       (json.dumps(summary), time.time(), arm_run_id))

    def metric_times(self, arm_run_id: int, steps: list[int]) -> dict[int, float | None]:
        """step -> the `time` of its recorded row, for those of `steps` an arm run has recorded."""
        found: dict[int, float | None] = {}
        wanted = sorted({int(s) for s in steps})
        for i in range(0, len(wanted), 500):
            chunk = wanted[i:i + 500]
            for row in self.query(f"SELECT step, data_json FROM metrics"
                                  f" WHERE arm_run_id=? AND step IN ({', '.join('?' for _ in chunk)})",
                                  (arm_run_id, *chunk)):
                found[row["step"]] = json.loads(row["data_json"]).get("time")   # Python's exact float parse
        return found

    def metric_rows(self, arm_run_id: int) -> list[dict]:
        return [json.loads(r["data_json"]) for r in
                self.query("SELECT data_json FROM metrics WHERE arm_run_id=? ORDER BY step", (arm_run_id,))]

    # ---- events -------------------------------------------------------------

    def event(self, run_id: str | None, kind: str, arm_run_id: int | None = None, **detail: Any) -> None:
        with self.write() as db:
            db.execute("INSERT INTO events(run_id, arm_run_id, kind, detail_json, at) VALUES (?, ?, ?, ?, ?)",
                       (run_id, arm_run_id, kind, json.dumps(detail, default=str), time.time()))

    def events(self, run_id: str, kind_prefix: str = "") -> list[dict]:
        return self.query("SELECT * FROM events WHERE run_id=? AND kind LIKE ? ORDER BY id",
                          (run_id, kind_prefix + "%"))

    # ---- GPU health (latest sample per host and GPU, for the exporter and the watchdog) ----

    def record_health(self, samples: list[dict], run_id: str | None = None, arm: str | None = None) -> None:
        if not samples:
            return
        with self.write() as db:
            db.executemany(
                "INSERT OR REPLACE INTO gpu_health(host, gpu, run_id, arm, sample_json, at) VALUES (?, ?, ?, ?, ?, ?)",
                [(s["host"], str(s["gpu"]), run_id, arm, json.dumps(s), s.get("at") or time.time())
                 for s in samples])

    def latest_health(self, max_age_s: float | None = None) -> list[dict]:
        rows = self.query("SELECT * FROM gpu_health ORDER BY host, gpu")
        if max_age_s is not None:
            rows = [r for r in rows if r["at"] >= time.time() - max_age_s]
        return rows

    # ---- instances and charges ---------------------------------------------

    def add_instance(self, *, run_id: str | None, provider: str, label: str, offer_id: str | None = None,
                     machine_id: str | None = None, gpu_name: str | None = None, num_gpus: int | None = None,
                     dph_total: float | None = None) -> int:
        """Record the intent to rent, before the provider is asked (so a crash cannot forget it)."""
        with self.write() as db:
            cur = db.execute(
                "INSERT INTO instances(run_id, provider, label, offer_id, machine_id, gpu_name, num_gpus, dph_total,"
                " state, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'creating', ?)",
                (run_id, provider, label, offer_id, machine_id, gpu_name, num_gpus, dph_total, time.time()))
            return cur.lastrowid

    def update_instance(self, instance_id: int, **fields: Any) -> None:
        if not fields:
            return
        cols = ", ".join(f"{k}=?" for k in fields)
        with self.write() as db:
            db.execute(f"UPDATE instances SET {cols} WHERE id=?", (*fields.values(), instance_id))
            if "destroyed_at" in fields or "state" in fields:
                self._end_stopped_run(db, instance_id)

    def instance(self, instance_id: int) -> dict | None:
        return self.query_one("SELECT * FROM instances WHERE id=?", (instance_id,))

    def live_instances(self, run_id: str | None = None) -> list[dict]:
        """Instances not confirmed destroyed (including ones whose create may have happened)."""
        sql = f"SELECT * FROM instances WHERE {LIVE_INSTANCE_SQL}"
        if run_id is None:
            return self.query(sql + " ORDER BY id")
        return self.query(sql + " AND run_id=? ORDER BY id", (run_id,))

    def add_charge(self, *, instance_id: int | None, run_id: str | None, source: str, amount_dollars: float,
                   period_start: float | None = None, period_end: float | None = None, **detail: Any) -> int:
        with self.write() as db:
            cur = db.execute(
                "INSERT INTO charges(instance_id, run_id, source, amount_dollars, period_start, period_end,"
                " detail_json, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (instance_id, run_id, source, amount_dollars, period_start, period_end,
                 json.dumps(detail, default=str), time.time()))
            return cur.lastrowid
