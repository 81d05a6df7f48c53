"""One attempt of an arm run on a remote host: inputs up, supervisor started, news polled, results pulled.

Remote work folder `work/a<attempt id>/` (see deploy.py for the instance layout):
  config.json, env.json          what the trainer gets
  out/                           the trainer's --out (metrics.jsonl, checkpoints/, samples/, summary.json, ...)
  upstream/<config key>/         artifacts of upstream runs, named in config.json by that key (tokenizer_dir)
  supervisor.pid, heartbeat, health.jsonl, exit.json, trainer.log, supervisor.log

Local side (the arm run's out_dir): metrics.jsonl grows as rows arrive (rows this
attempt re-logs after a resume replace the old ones), `log` gets the trainer's
output, checkpoints/last.pt is replaced atomically by pulls verified with sha256.
Nothing the host names can land outside out_dir: only regular files (checked on their own
SFTP attributes, links never followed) with plain names (ssh.plain_name) are pulled; a
pulled .pt is kept only when torch.load(weights_only=True) reads it, so what one host sends
cannot run code where it is unpickled later (another host, a resumed attempt).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from orchestrator.backends.remote.deploy import DeployError, InstancePaths, detached
from orchestrator.backends.remote.settings import RuntimeSettings
from orchestrator.backends.remote.ssh import Connection, RefusedFile, Remote, RemoteEntry, SshError, plain_name

RESULT_FILES = ("summary.json", "artifact.pt")

log = logging.getLogger(__name__)


class ChecksumMismatch(SshError):
    """A downloaded file's sha256 differs from the one computed on the instance."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def replace_atomically(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, final)


def weights_only_refusal(path: Path) -> str | None:
    """None when the trainers' own weights-only loader reads the file, else why not. A pulled .pt is
    unpickled later (a resumed attempt, an upstream artifact on other hosts): one that needs arbitrary
    unpickling could run the sending host's code there, so it is not kept."""
    from trainers.common import load_weights_only    # lazy: torch is imported only when a .pt is pulled

    try:
        load_weights_only(path)
    except Exception as exc:
        return f"{path.name} does not load with weights_only=True: {type(exc).__name__}: {str(exc)[:300]}"
    return None


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


class LocalMetrics:
    """The arm run's local metrics.jsonl, fed with rows as they arrive from the instance."""

    def __init__(self, path: Path):
        self.path = path
        self._started = False

    def add(self, rows: list[dict]) -> None:
        if not rows:
            return
        if not self._started:
            # This attempt's first rows: keep earlier attempts' rows before them, drop the ones it re-logs.
            self._started = True
            first = min(int(r["step"]) for r in rows)
            kept = []
            if self.path.exists():
                for line in self.path.read_text(errors="replace").splitlines():
                    try:
                        row = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] < first:
                        kept.append(line)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            replace_atomically(tmp, self.path)
        with open(self.path, "a") as handle:
            handle.write("".join(json.dumps(r) + "\n" for r in rows))


@dataclass
class News:
    """What one poll learned."""
    now: float
    alive: bool
    started: bool
    heartbeat_at: float | None
    trainer_pid: int | None
    exit: dict | None
    rows: list[dict]
    health: list[dict]
    checkpoint: dict | None


class RemoteAttempt:
    def __init__(self, conn: Connection, paths: InstancePaths, attempt_id: int, out_dir: Path,
                 settings: RuntimeSettings):
        self.conn, self.paths, self.settings = conn, paths, settings
        self.work = paths.work(attempt_id)
        self.out_dir = Path(out_dir)
        self.metrics = LocalMetrics(self.out_dir / "metrics.jsonl")
        self.metrics_offset = self.health_offset = self.log_offset = 0
        self.pulled_checkpoint: dict | None = None
        self.last_step: int | None = None
        self.silence_limit: Callable[[], float | None] = lambda: None    # the dead-man silence to set at each poll

    def helper(self, *args: str) -> list[str]:
        return [self.paths.python, self.paths.supervisor, *args]

    # ---- before the trainer starts ----

    def upload_inputs(self, config: dict, upstream_dirs: dict[str, str], env: dict[str, str]) -> dict:
        """Upload the resume checkpoint, upstream artifacts, config.json and env.json; the remote config."""
        config = dict(config)
        local_checkpoint = self.out_dir / "checkpoints" / "last.pt"
        remote_checkpoint = f"{self.work}/out/checkpoints/last.pt"

        def upload(remote: Remote) -> None:
            remote.run(["mkdir", "-p", f"{self.work}/out/checkpoints", f"{self.work}/upstream"], check=True)
            if local_checkpoint.exists():
                remote.put_file(local_checkpoint, remote_checkpoint)
                answer = json.loads(remote.run(self.helper("digest", "--path", remote_checkpoint), check=True).stdout)
                if answer.get("sha256") != sha256_file(local_checkpoint):
                    raise ChecksumMismatch(f"uploaded checkpoint differs from {local_checkpoint}")
            for config_key, folder in upstream_dirs.items():
                target = f"{self.work}/upstream/{config_key}"
                remote.run(["mkdir", "-p", target], check=True)
                for path in sorted(Path(folder).iterdir()):
                    if path.is_file():
                        remote.put_file(path, f"{target}/{path.name}")
                config[config_key] = target
            remote.put_bytes(json.dumps(config, indent=2, sort_keys=True).encode(), f"{self.work}/config.json")
            remote.put_bytes(json.dumps(env).encode(), f"{self.work}/env.json")

        self.conn.call(upload)
        return config

    def start(self, *, code: str, python: str, trainer: str, gpus: list[int], threads: int,
              health_command: list[str]) -> News:
        """Start the supervisor detached (setsid nohup) and wait for its first heartbeat."""
        argv = self.helper(
            "run", "--workdir", self.work, "--code", code, "--python", python, "--trainer", trainer,
            "--gpus", ",".join(str(g) for g in gpus), "--threads", str(threads),
            "--heartbeat-seconds", f"{self.settings.heartbeat_seconds:g}", "--health-seconds",
            f"{self.settings.health_seconds:g}", "--health-command", json.dumps(health_command),
            "--stop-grace-seconds", f"{self.settings.stop_grace_seconds:g}", "--env-file", f"{self.work}/env.json")
        self.conn.run(detached(self.work, argv, self.work + "/supervisor.log"), check=True)
        deadline = time.monotonic() + max(30.0, self.settings.ssh_timeout_seconds)
        rows: list[dict] = []
        health: list[dict] = []
        while True:
            news = self.poll()
            rows, health = rows + news.rows, health + news.health
            if news.heartbeat_at is not None or news.exit is not None:
                news.rows, news.health = rows, health
                return news
            if time.monotonic() > deadline:
                tail = self.conn.run(["tail", "-n", "20", f"{self.work}/supervisor.log"]).stdout
                raise DeployError(f"the supervisor did not start in {self.work}:\n{tail}")
            time.sleep(0.3)

    # ---- while it runs ----

    def poll(self) -> News:
        argv = self.helper("poll", "--workdir", self.work, "--metrics-offset", str(self.metrics_offset),
                           "--health-offset", str(self.health_offset), "--log-offset", str(self.log_offset),
                           "--contact-file", self.paths.contact)
        silence = self.silence_limit()
        if silence is not None:
            argv += ["--silence-seconds", f"{silence:.0f}"]
        result = self.conn.run(argv, check=True)
        answer = json.loads(result.stdout.strip().splitlines()[-1])
        rows = []
        for line in answer["metrics"].splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
        self.metrics.add(rows)
        if rows:
            self.last_step = max(r["step"] for r in rows)
        if answer["log"]:
            with open(self.out_dir / "log", "a") as handle:
                handle.write(answer["log"])
        self.metrics_offset, self.health_offset = answer["metrics_offset"], answer["health_offset"]
        self.log_offset = answer["log_offset"]
        heartbeat = answer.get("heartbeat") or {}
        return News(now=answer["now"], alive=answer["supervisor_alive"], started=answer["started"],
                    heartbeat_at=heartbeat.get("at"), trainer_pid=heartbeat.get("trainer_pid"),
                    exit=answer.get("exit"), rows=rows, health=answer["health"],
                    checkpoint=answer.get("checkpoint"))

    def request_stop(self) -> None:
        """SIGTERM through the supervisor: the trainer checkpoints and exits 143."""
        self.conn.run(self.helper("stop", "--workdir", self.work), check=True)

    def pull_checkpoint(self, state: dict | None, catch_up: Callable[[], None] | None = None) -> bool:
        """Pull checkpoints/last.pt when it changed since the last pull; verified by sha256, written atomically.

        `catch_up()` runs after the snapshot is taken and before it replaces the local last.pt: it must read
        (and pass on) every metrics row the instance has by then, which holds every row up to the checkpoint's
        step (the trainer makes its rows durable before it checkpoints). Without it, a pulled checkpoint could
        be newer than the rows read, and an attempt that dies before its next poll would resume after rows
        nobody read: a gap in the curve."""
        if state is None or state == self.pulled_checkpoint:
            return False
        local_dir = self.out_dir / "checkpoints"
        local_dir.mkdir(parents=True, exist_ok=True)
        tmp = local_dir / ".last.pt.download"
        snapshot = f"{self.work}/pull/last.pt"

        def pull(remote: Remote) -> bool:
            answer = json.loads(remote.run(self.helper(
                "snapshot", "--src", f"{self.work}/out/checkpoints/last.pt", "--dst", snapshot), check=True).stdout)
            if not answer.get("exists"):
                return False
            try:
                remote.get_file(snapshot, tmp)
            except RefusedFile as exc:
                log.warning("checkpoint of %s not pulled: %s", self.work, exc)
                return False
            if sha256_file(tmp) != answer["sha256"]:
                tmp.unlink(missing_ok=True)
                raise ChecksumMismatch(f"checkpoint of {self.work} changed in transit (sha256 mismatch)")
            refusal = weights_only_refusal(tmp)
            if refusal:
                tmp.unlink(missing_ok=True)
                log.warning("checkpoint of %s not kept: %s", self.work, refusal)
                return False
            return True

        if not self.conn.call(pull):
            return False
        if catch_up is not None:
            catch_up()
        replace_atomically(tmp, local_dir / "last.pt")
        self.pulled_checkpoint = state
        return True

    # ---- at the end ----

    def collect(self, checkpoint_state: dict | None, catch_up: Callable[[], None] | None = None) -> None:
        """Pull everything the trainer left: checkpoint (verified), summary.json, artifact.pt, samples/."""
        self.pull_checkpoint(checkpoint_state, catch_up)

        def pull(remote: Remote) -> list[str]:
            refused: list[str] = []
            entries = {e.name: e for e in remote.list_dir(f"{self.work}/out")}
            wanted = [entries[name] for name in RESULT_FILES if name in entries]
            self._pull_files(remote, f"{self.work}/out", wanted, self.out_dir, refused)
            if "samples" in entries and entries["samples"].kind == "dir":
                samples = self.out_dir / "samples"
                samples.mkdir(exist_ok=True)
                self._pull_files(remote, f"{self.work}/out/samples",
                                 remote.list_dir(f"{self.work}/out/samples"), samples, refused)
            return refused

        refused = self.conn.call(pull)
        if refused:
            log.warning("instance files of %s not pulled (only plain regular files are): %s", self.work,
                        "; ".join(refused[:10])[:1000])

    @staticmethod
    def _pull_files(remote: Remote, folder: str, entries: list[RemoteEntry], local_dir: Path,
                    refused: list[str]) -> None:
        """Pull the plain-named regular files among `entries` of remote `folder` into `local_dir`."""
        for entry in entries:
            if not plain_name(entry.name) or entry.kind != "file":
                refused.append(f"{entry.name[:80]!r} ({entry.kind})")
                continue
            tmp = local_dir / f".{entry.name}.download"
            try:
                remote.get_file(f"{folder}/{entry.name}", tmp)
            except RefusedFile as exc:
                refused.append(str(exc)[:200])
                continue
            refusal = weights_only_refusal(tmp) if entry.name.endswith(".pt") else None
            if refusal:
                tmp.unlink(missing_ok=True)
                refused.append(refusal)
                continue
            replace_atomically(tmp, local_dir / entry.name)

    def remove(self) -> None:
        """Delete the work folder (the instance may run more arms; its disk is not unlimited)."""
        self.conn.run(["rm", "-rf", self.work])
