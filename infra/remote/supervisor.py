#!/usr/bin/env python3
"""The armature helper that runs ON a remote host: a rented instance or a machine of your own (Python
standard library only).

Subcommands (the orchestrator calls them over SSH; paths are on the instance):

  run        supervise one trainer: start `python -m trainers.<name> --config W/config.json --out W/out`
             with CUDA_VISIBLE_DEVICES, write W/heartbeat every few seconds, append nvidia-smi samples to
             W/health.jsonl, forward SIGTERM to the trainer, write W/exit.json when it ends. Started
             detached (setsid nohup), so a dropped SSH connection loses nothing.
  poll       one JSON line of news: new complete metrics lines from a byte offset, new health samples,
             heartbeat, exit status, checkpoint size; touches the instance's last-contact file.
  stop       SIGTERM the supervisor of a work folder (it forwards it; the trainer checkpoints).
  snapshot   hard-link a checkpoint (a consistent copy even if the trainer replaces it) and print its sha256.
  digest     print the sha256 and size of a file.
  watchdog   the dead-man switch, when the orchestrator has not touched the last-contact file for a while or
             the host has run armature past its maximum lifetime: `--on-silence destroy` destroys this rented
             instance (with the instance-scoped CONTAINER_API_KEY, never the account key); `--on-silence
             clean` (a host of your own) stops every armature process and removes the scratch folder.
  cleanup    stop every armature process under a scratch folder (watchdog, supervisors, trainers), then
             remove the folder: the end of a run on a host of your own.
  has-requirements  exit 0 when every distribution a requirements file names is installed.
"""

import argparse
import ctypes
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

DEFAULT_SERVER_URL = "https://console.vast.ai"


# ---- small helpers ---------------------------------------------------------------------------------

def write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_json(path):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def process_matches(pid, *needles):
    """Whether pid is alive and its command line holds every needle (a reused pid does not count)."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            cmdline = handle.read().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError):
        return False
    try:
        with open("/proc/%d/stat" % pid) as handle:
            if handle.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
    except (OSError, IndexError):
        return False
    return all(needle in cmdline for needle in needles)


def pid_from(path):
    try:
        with open(path) as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return None


def supervisor_alive(workdir):
    pid = pid_from(os.path.join(workdir, "supervisor.pid"))
    return pid is not None and process_matches(pid, "supervisor.py", "run", workdir)


def touch(path):
    with open(path, "a"):
        pass
    os.utime(path, None)


def silence_limit(contact_file, configured):
    """The dead-man silence in force: the configured one, or less when the orchestrator's last contact wrote a
    shorter one into the contact file (what the run's remaining budget pays for)."""
    try:
        with open(contact_file) as handle:
            written = float(handle.read(64).strip() or "inf")
    except (OSError, ValueError):
        return configured
    return min(configured, written) if written > 0 else configured


def die_with_parent():
    """In the trainer child: own process group, and SIGTERM when the supervisor dies."""
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


# ---- run ---------------------------------------------------------------------------------------------

class Supervisor:
    def __init__(self, args):
        self.args = args
        self.workdir = os.path.abspath(args.workdir)
        self.trainer = None
        self.stop_requested_at = None
        self.last_health = 0.0

    def path(self, name):
        return os.path.join(self.workdir, name)

    def on_sigterm(self, signum, frame):
        if self.stop_requested_at is None:
            self.stop_requested_at = time.time()
            write_atomic(self.path("stop-requested"), str(self.stop_requested_at))
            if self.trainer is not None and self.trainer.poll() is None:
                try:
                    os.killpg(self.trainer.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def heartbeat(self):
        write_atomic(self.path("heartbeat"), json.dumps({"at": time.time(), "trainer_pid": self.trainer.pid}))

    def sample_health(self):
        command = json.loads(self.args.health_command) if self.args.health_command else []
        if not command:
            return
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return                      # no nvidia-smi on this machine: no samples
        if done.returncode == 0 and done.stdout.strip():
            with open(self.path("health.jsonl"), "a") as handle:
                handle.write(json.dumps({"at": time.time(), "csv": done.stdout}) + "\n")

    def start_trainer(self):
        env = dict(os.environ)
        env.pop("CONTAINER_API_KEY", None)     # the trainer has no business destroying the instance
        if self.args.env_file and os.path.exists(self.args.env_file):
            with open(self.args.env_file) as handle:
                env.update({str(k): str(v) for k, v in json.load(handle).items()})
        env["CUDA_VISIBLE_DEVICES"] = self.args.gpus
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = self.args.code + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        if self.args.threads:
            env["OMP_NUM_THREADS"] = str(self.args.threads)
        log = open(self.path("trainer.log"), "ab")
        command = [self.args.python, "-m", "trainers." + self.args.trainer,
                   "--config", self.path("config.json"), "--out", self.path("out")]
        self.trainer = subprocess.Popen(command, cwd=self.args.code, env=env, stdin=subprocess.DEVNULL,
                                        stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        log.close()
        write_atomic(self.path("trainer.pid"), str(self.trainer.pid))

    def run(self):
        if supervisor_alive(self.workdir) or os.path.exists(self.path("exit.json")):
            print("a supervisor already ran in " + self.workdir, file=sys.stderr)
            return 1
        write_atomic(self.path("supervisor.pid"), str(os.getpid()))
        signal.signal(signal.SIGTERM, self.on_sigterm)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self.start_trainer()
        self.heartbeat()
        next_beat = time.time() + self.args.heartbeat_seconds
        while True:
            code = self.trainer.poll()
            if code is not None:
                break
            now = time.time()
            if now >= next_beat:
                self.heartbeat()
                next_beat = now + self.args.heartbeat_seconds
            if now - self.last_health >= self.args.health_seconds:
                self.last_health = now
                self.sample_health()
            if self.stop_requested_at is not None and now - self.stop_requested_at > self.args.stop_grace_seconds:
                try:
                    os.killpg(self.trainer.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        exit_code = code if code >= 0 else 128 - code
        self.heartbeat()
        write_atomic(self.path("exit.json"), json.dumps({
            "exit_code": exit_code, "ended_at": time.time(), "stopped": self.stop_requested_at is not None}))
        return 0


# ---- poll, stop, snapshot, digest ---------------------------------------------------------------------------

def read_from(path, offset, limit, whole_lines=True):
    """(text from offset, new offset), cut after the last complete line unless whole_lines is False;
    restarts at 0 if the file shrank (a resumed trainer truncates its metrics)."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return "", 0
    if size < offset:
        offset = 0
    with open(path, "rb") as handle:
        handle.seek(offset)
        data = handle.read(limit)
    if whole_lines:
        data = data[:data.rfind(b"\n") + 1]
    return data.decode(errors="replace"), offset + len(data)


def cmd_poll(args):
    workdir = os.path.abspath(args.workdir)
    if args.contact_file and args.silence_seconds:
        write_atomic(args.contact_file, "%g\n" % args.silence_seconds)      # a fresh mtime too: the contact
    elif args.contact_file:
        touch(args.contact_file)
    # Exit status first: when it is there, the trainer has ended, so the reads below see all it wrote.
    alive = supervisor_alive(workdir)
    ended = read_json(os.path.join(workdir, "exit.json"))
    metrics, metrics_offset = read_from(os.path.join(workdir, "out", "metrics.jsonl"),
                                                  args.metrics_offset, 4 << 20)
    health_text, health_offset = read_from(os.path.join(workdir, "health.jsonl"),
                                                     args.health_offset, 1 << 20)
    log_text, log_offset = read_from(os.path.join(workdir, "trainer.log"), args.log_offset, 1 << 20,
                                     whole_lines=False)
    health = []
    for line in health_text.splitlines():
        try:
            health.append(json.loads(line))
        except ValueError:
            pass
    checkpoint = os.path.join(workdir, "out", "checkpoints", "last.pt")
    try:
        info = os.stat(checkpoint)
        checkpoint_state = {"size": info.st_size, "mtime": info.st_mtime}
    except OSError:
        checkpoint_state = None
    print(json.dumps({
        "now": time.time(),
        "supervisor_alive": alive,
        "started": os.path.exists(os.path.join(workdir, "supervisor.pid")),
        "heartbeat": read_json(os.path.join(workdir, "heartbeat")),
        "exit": ended,
        "metrics": metrics, "metrics_offset": metrics_offset,
        "health": health, "health_offset": health_offset,
        "log": log_text, "log_offset": log_offset,
        "checkpoint": checkpoint_state,
    }))
    return 0


def cmd_stop(args):
    workdir = os.path.abspath(args.workdir)
    pid = pid_from(os.path.join(workdir, "supervisor.pid"))
    if pid is not None and supervisor_alive(workdir):
        os.kill(pid, signal.SIGTERM)
        print(json.dumps({"signalled": pid}))
    else:
        print(json.dumps({"signalled": None}))
    return 0


def cmd_snapshot(args):
    if not os.path.exists(args.src):
        print(json.dumps({"exists": False}))
        return 0
    os.makedirs(os.path.dirname(args.dst), exist_ok=True)
    tmp = args.dst + ".tmp"
    if os.path.exists(tmp):
        os.unlink(tmp)
    os.link(args.src, tmp)          # the trainer replaces last.pt by rename: this inode stays whole
    os.replace(tmp, args.dst)
    print(json.dumps({"exists": True, "sha256": sha256_of(args.dst), "size": os.path.getsize(args.dst)}))
    return 0


def cmd_digest(args):
    if not os.path.exists(args.path):
        print(json.dumps({"exists": False}))
        return 0
    print(json.dumps({"exists": True, "sha256": sha256_of(args.path), "size": os.path.getsize(args.path)}))
    return 0


# ---- watchdog (dead-man switch) ----------------------------------------------------------------------

def container_credentials():
    """CONTAINER_ID and CONTAINER_API_KEY from this environment, else from the container's first process."""
    found = {name: os.environ.get(name) for name in ("CONTAINER_ID", "CONTAINER_API_KEY")}
    if not all(found.values()):
        try:
            with open("/proc/1/environ", "rb") as handle:
                for item in handle.read().split(b"\0"):
                    name, _, value = item.decode(errors="replace").partition("=")
                    if name in found and not found[name]:
                        found[name] = value
        except OSError:
            pass
    return found["CONTAINER_ID"], found["CONTAINER_API_KEY"]


def destroy_self(server_url, log):
    """DELETE this instance through the API with its instance-scoped key; True once the API agreed."""
    container_id, key = container_credentials()
    if not container_id or not key:
        log("cannot destroy this instance: CONTAINER_ID / CONTAINER_API_KEY not set")
        return False
    url = "%s/api/v0/instances/%s/" % (server_url.rstrip("/"), re.sub(r"[^0-9A-Za-z_-]", "", container_id))
    request = urllib.request.Request(url, data=b"{}", method="DELETE", headers={
        "Authorization": "Bearer " + key, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            log("destroy requested: HTTP %d" % response.status)
            return True
    except urllib.error.HTTPError as exc:
        log("destroy refused: HTTP %d" % exc.code)
        return exc.code == 404                 # already gone
    except (urllib.error.URLError, OSError) as exc:
        log("destroy failed: %s" % exc)
        return False


def cmd_watchdog(args):
    pid_file = args.pid_file
    existing = pid_from(pid_file)
    if existing is not None and existing != os.getpid() and process_matches(existing, "supervisor.py", "watchdog"):
        print("watchdog already running as pid %d" % existing)
        return 0
    write_atomic(pid_file, str(os.getpid()))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    server_url = args.server_url or os.environ.get("VAST_SERVER_URL") or DEFAULT_SERVER_URL
    started = time.time()
    touch(args.contact_file)

    def log(message):
        with open(args.log, "a") as handle:
            handle.write("%s watchdog: %s\n" % (time.strftime("%Y-%m-%dT%H:%M:%S"), message))

    log("watching %s (silence limit %.0fs, lifetime limit %.0fs)"
        % (args.contact_file, args.silence_seconds, args.max_lifetime_seconds))
    reason = None
    while True:
        now = time.time()
        try:
            silence = now - os.path.getmtime(args.contact_file)
        except OSError:
            silence = now - started
        limit = silence_limit(args.contact_file, args.silence_seconds)
        if silence > limit:
            reason = "no contact from the orchestrator for %.0fs (limit %.0fs)" % (silence, limit)
        elif now - started > args.max_lifetime_seconds:
            reason = "maximum lifetime of %.0fs reached" % args.max_lifetime_seconds
        if reason and args.on_silence == "clean":
            log(reason + ": stopping armature and removing its folder")
            stop_armature(os.path.dirname(os.path.abspath(args.contact_file)), 10.0, lambda message: None)
            return 0
        if reason:
            log(reason + ": destroying this instance")
            if destroy_self(server_url, log):
                return 0
            time.sleep(min(30.0, max(1.0, args.check_seconds)))
            continue
        time.sleep(args.check_seconds)


# ---- stopping everything (hosts of your own) --------------------------------------------------------------

def armature_processes(base):
    """(pid, kind) of the live armature processes of a scratch folder: its watchdog, and every attempt's
    supervisor and trainer (a pid counts only while its command line still names what it was)."""
    found = []
    watchdog = pid_from(os.path.join(base, "watchdog.pid"))
    if watchdog is not None and watchdog != os.getpid() and process_matches(watchdog, "supervisor.py", "watchdog"):
        found.append((watchdog, "watchdog"))
    work = os.path.join(base, "work")
    for name in sorted(os.listdir(work)) if os.path.isdir(work) else []:
        folder = os.path.join(work, name)
        trainer = pid_from(os.path.join(folder, "trainer.pid"))
        if trainer is not None and process_matches(trainer, "trainers.", folder):
            found.append((trainer, "trainer"))
        supervisor = pid_from(os.path.join(folder, "supervisor.pid"))
        if supervisor is not None and supervisor_alive(folder):
            found.append((supervisor, "supervisor"))
    return found


def stop_armature(base, grace_seconds, log):
    """SIGTERM every armature process of `base` (a trainer's whole process group), SIGKILL what is left after
    `grace_seconds`, then remove `base`. Returns the pids that were running."""
    running = armature_processes(base)
    for signum in (signal.SIGTERM, signal.SIGKILL):
        for pid, kind in running:
            if signum == signal.SIGKILL and not process_matches(pid):
                continue                    # ended on SIGTERM (its pid may already be someone else's)
            try:
                if kind == "trainer":
                    os.killpg(pid, signum)
                else:
                    os.kill(pid, signum)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.time() + (grace_seconds if signum == signal.SIGTERM else 5.0)
        while time.time() < deadline and any(process_matches(pid) for pid, _ in running):
            time.sleep(0.1)
    shutil.rmtree(base, ignore_errors=True)
    log("stopped %s and removed %s" % (", ".join("%s %d" % (k, p) for p, k in running) or "nothing", base))
    return [pid for pid, _ in running]


def cmd_cleanup(args):
    base = os.path.abspath(args.base)
    stopped = stop_armature(base, args.grace_seconds, lambda message: None)
    print(json.dumps({"stopped": stopped, "removed": not os.path.exists(base)}))
    return 0


# ---- requirements ----------------------------------------------------------------------------------------

def cmd_has_requirements(args):
    from importlib import metadata
    missing = []
    with open(args.requirements) as handle:
        for line in handle:
            line = line.split("#", 1)[0].strip()
            if not line or line.startswith("-"):
                continue
            name = re.split(r"[\s<>=!~;\[@]", line, maxsplit=1)[0]
            try:
                metadata.version(name)
            except metadata.PackageNotFoundError:
                missing.append(name)
    if missing:
        print("missing: " + " ".join(missing))
        return 1
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run")
    run.add_argument("--workdir", required=True)
    run.add_argument("--code", required=True, help="the deployed repository (cwd and PYTHONPATH of the trainer)")
    run.add_argument("--python", required=True)
    run.add_argument("--trainer", required=True)
    run.add_argument("--gpus", required=True, help="CUDA_VISIBLE_DEVICES for the trainer")
    run.add_argument("--threads", type=int, default=0)
    run.add_argument("--heartbeat-seconds", type=float, default=10.0)
    run.add_argument("--health-seconds", type=float, default=10.0)
    run.add_argument("--health-command", default="", help="JSON argument list, e.g. nvidia-smi --query-gpu=...")
    run.add_argument("--stop-grace-seconds", type=float, default=120.0)
    run.add_argument("--env-file", default="", help="JSON object of extra environment for the trainer")

    poll = sub.add_parser("poll")
    poll.add_argument("--workdir", required=True)
    poll.add_argument("--metrics-offset", type=int, default=0)
    poll.add_argument("--health-offset", type=int, default=0)
    poll.add_argument("--log-offset", type=int, default=0)
    poll.add_argument("--contact-file", default="")
    poll.add_argument("--silence-seconds", type=float, default=0.0,
                      help="the dead-man silence from now on (written into the contact file; 0 = unchanged)")

    stop = sub.add_parser("stop")
    stop.add_argument("--workdir", required=True)

    snapshot = sub.add_parser("snapshot")
    snapshot.add_argument("--src", required=True)
    snapshot.add_argument("--dst", required=True)

    digest = sub.add_parser("digest")
    digest.add_argument("--path", required=True)

    watchdog = sub.add_parser("watchdog")
    watchdog.add_argument("--contact-file", required=True)
    watchdog.add_argument("--pid-file", required=True)
    watchdog.add_argument("--log", required=True)
    watchdog.add_argument("--silence-seconds", type=float, required=True)
    watchdog.add_argument("--max-lifetime-seconds", type=float, required=True)
    watchdog.add_argument("--check-seconds", type=float, default=5.0)
    watchdog.add_argument("--server-url", default="")
    watchdog.add_argument("--on-silence", choices=["destroy", "clean"], default="destroy",
                          help="destroy this rented instance, or stop armature and remove its folder (own hosts)")

    cleanup = sub.add_parser("cleanup")
    cleanup.add_argument("--base", required=True, help="the scratch folder: stop what runs from it, then remove it")
    cleanup.add_argument("--grace-seconds", type=float, default=10.0)

    requirements = sub.add_parser("has-requirements")
    requirements.add_argument("--requirements", required=True)

    args = parser.parse_args(argv)
    if args.command == "run":
        return Supervisor(args).run()
    handlers = {"poll": cmd_poll, "stop": cmd_stop, "snapshot": cmd_snapshot, "digest": cmd_digest,
                "watchdog": cmd_watchdog, "has-requirements": cmd_has_requirements,
                "cleanup": cmd_cleanup}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
