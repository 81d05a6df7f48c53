"""Deploy the code to a remote host through git, and prepare the host to run arms.

The tree of the exact commit travels as a `git bundle` of one parentless commit
made from HEAD's tree (never the history: a secret committed once and deleted later
stays home), uploaded over SFTP and cloned on the instance. A working tree with
uncommitted changes is refused unless `allow_dirty`; then the changes travel too,
as `git diff HEAD --binary` (applied after the clone) plus a tar of the untracked,
not-ignored files, and their hash is recorded. No shipped file may hold a secret (a provider's API key).
Dependencies come from the project's own `requirements-trainer.txt`: when the image's python already has every
distribution it names (a stock PyTorch image plus a few, or the simulator),
nothing is installed; otherwise a venv with the system site-packages gets
`pip install -r` on top. An install failure fails the attempt with the log tail.

Remote layout (all under `<home>/<remote_dir>`, see `InstancePaths`; one such folder per host):
  supervisor.py            infra/remote/supervisor.py of this checkout
  code-<version>/          the clone (one folder per deployed version, never replaced under a running arm)
  python-<version>         the interpreter arms of that version run with
  last-contact             touched by every poll; the dead-man watchdog acts when it goes stale (a rented
                           instance destroys itself, a host of your own stops armature and removes this folder)
  work/a<attempt id>/      one attempt: config.json, out/, heartbeat, exit.json, logs
"""

from __future__ import annotations

import hashlib
import io
import os
import shlex
import shutil
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator.backends.remote.settings import RuntimeSettings
from orchestrator.backends.remote.ssh import Connection, Remote
from orchestrator.errors import UserError

SUPERVISOR = Path("infra") / "remote" / "supervisor.py"
REQUIREMENTS = "requirements-trainer.txt"


class DeployError(Exception):
    """The code or its dependencies could not be set up on the host (the message holds the log tail)."""


# ---- the code bundle (local) --------------------------------------------------------------------

@dataclass(frozen=True)
class CodeBundle:
    repo_root: Path
    commit: str                     # HEAD of the checkout: what the run records
    diff_hash: str | None           # sha256 of the shipped uncommitted changes; None for a clean tree
    bundle: Path                    # git bundle of `shipped`
    patch: Path | None              # git diff HEAD --binary
    untracked: Path | None          # tar of untracked, not ignored files
    shipped: str                    # the parentless commit holding `commit`'s tree, checked out on the instance

    @property
    def version(self) -> str:
        return self.commit[:12] + (f"-{self.diff_hash[:8]}" if self.diff_hash else "")


def _git(repo: Path, *args: str, binary: bool = False, env: dict[str, str] | None = None) -> str | bytes:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, timeout=120,
                          env=None if env is None else {**os.environ, **env})
    if done.returncode != 0:
        raise UserError(f"git {' '.join(args)} failed in {repo}: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout if binary else done.stdout.decode()


def make_code_bundle(repo_root: Path, dest: Path, allow_dirty: bool, secrets: tuple[str, ...] = ()) -> CodeBundle:
    """Bundle HEAD (and, with allow_dirty, the uncommitted changes) into `dest`.

    Refuses when a file that would be shipped contains one of `secrets` (the account API key).
    """
    repo_root, dest = Path(repo_root), Path(dest)
    if not (repo_root / ".git").exists():
        raise UserError(f"{repo_root} is not a git checkout: remote hosts get the code through git")
    commit = _git(repo_root, "rev-parse", "HEAD").strip()
    changed = [line[3:] for line in _git(repo_root, "status", "--porcelain", "--untracked-files=all").splitlines()]
    if changed and not allow_dirty:
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        raise UserError(f"the working tree has uncommitted changes ({shown}); remote hosts run exactly commit "
                        f"{commit[:12]}: commit them, or allow dirty deploys to ship them as a patch")
    _refuse_secrets(repo_root, secrets)
    dest.mkdir(parents=True, exist_ok=True)
    bundle = dest / "code.bundle"
    shipped = _bundle_tree(repo_root, commit, dest / "ship.git", bundle)
    patch = untracked = diff_hash = None
    if changed:
        diff = _git(repo_root, "diff", "HEAD", "--binary", binary=True)
        names = [n for n in _git(repo_root, "ls-files", "--others", "--exclude-standard", "-z").split("\0") if n]
        digest = hashlib.sha256(diff)
        if diff:
            patch = dest / "changes.patch"
            patch.write_bytes(diff)
        if names:
            untracked = dest / "untracked.tar"
            with tarfile.open(untracked, "w") as tar:
                for name in sorted(names):
                    path = repo_root / name
                    if path.is_file():
                        tar.add(path, arcname=name, recursive=False)
                        digest.update(name.encode() + b"\0" + path.read_bytes())
        diff_hash = digest.hexdigest()
    return CodeBundle(repo_root, commit, diff_hash, bundle, patch, untracked, shipped)


# A fixed author and date: the same tree always gives the same shipped commit.
SHIP_IDENTITY = {"GIT_AUTHOR_NAME": "armature", "GIT_AUTHOR_EMAIL": "armature@localhost",
                 "GIT_AUTHOR_DATE": "1970-01-01T00:00:00Z", "GIT_COMMITTER_NAME": "armature",
                 "GIT_COMMITTER_EMAIL": "armature@localhost", "GIT_COMMITTER_DATE": "1970-01-01T00:00:00Z"}


def _bundle_tree(repo_root: Path, commit: str, scratch: Path, bundle: Path) -> str:
    """Bundle one parentless commit of `commit`'s tree; its id. Made in a scratch bare repository that
    borrows the checkout's objects (git alternates), so the checkout gains no ref and no object."""
    objects = Path(_git(repo_root, "rev-parse", "--path-format=absolute", "--git-common-dir").strip()) / "objects"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        _git(repo_root, "init", "-q", "--bare", str(scratch))
        (scratch / "objects" / "info" / "alternates").write_text(f"{objects}\n")
        tree = _git(repo_root, "rev-parse", f"{commit}^{{tree}}").strip()
        shipped = _git(scratch, "commit-tree", tree, "-m", f"armature deploy of {commit}", env=SHIP_IDENTITY).strip()
        _git(scratch, "update-ref", "refs/heads/deploy", shipped)
        _git(scratch, "symbolic-ref", "HEAD", "refs/heads/deploy")
        _git(scratch, "bundle", "create", "-q", str(bundle), "HEAD")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return shipped


def _refuse_secrets(repo_root: Path, secrets: tuple[str, ...]) -> None:
    """No file git would ship may contain a secret: HEAD's tree (the bundle), and the tracked or untracked,
    not ignored files of the working tree (the patch and the tar)."""
    needles = [s.encode() for s in secrets if s]
    if not needles:
        return
    with tarfile.open(fileobj=io.BytesIO(_git(repo_root, "archive", "--format=tar", "HEAD", binary=True))) as tar:
        for member in tar:
            handle = tar.extractfile(member) if member.isfile() and member.size < 50 << 20 else None
            if handle is not None and any(n in handle.read() for n in needles):
                raise UserError(f"{member.name} at HEAD contains the provider's API key; it would be shipped to "
                                "remote machines. Commit the file without the key first")
    listed = _git(repo_root, "ls-files", "--cached", "--others", "--exclude-standard", "-z").split("\0")
    for name in filter(None, listed):
        path = repo_root / name
        try:
            if path.is_file() and path.stat().st_size < 50 << 20:
                data = path.read_bytes()
                if any(n in data for n in needles):
                    raise UserError(f"{name} contains the provider's API key; it would be shipped to remote machines. "
                                    "Remove the key from the file (or git-ignore the file)")
        except OSError:
            continue


# ---- remote layout ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class InstancePaths:
    base: str                       # absolute folder on the host
    python: str = "python3"         # runs supervisor.py there (standard library only)

    @property
    def supervisor(self) -> str:
        return f"{self.base}/supervisor.py"

    @property
    def contact(self) -> str:
        return f"{self.base}/last-contact"

    def code(self, version: str) -> str:
        return f"{self.base}/code-{version}"

    def python_file(self, version: str) -> str:
        return f"{self.base}/python-{version}"

    def work(self, attempt_id: int) -> str:
        return f"{self.base}/work/a{attempt_id}"


def resolve_paths(remote: Remote, settings: RuntimeSettings, python: str | None = None) -> InstancePaths:
    home = remote.run('printf %s "$HOME"', check=True).stdout.strip() or "/root"
    if settings.remote_dir.startswith("/"):
        return InstancePaths(settings.remote_dir.rstrip("/"), python or "python3")
    return InstancePaths(f"{home.rstrip('/')}/{settings.remote_dir.strip('/')}", python or "python3")


def detached(cwd: str, argv: list[str], log: str) -> str:
    """A shell command starting argv in its own session, immune to the SSH connection closing.

    Only the setsid command is backgrounded (not a subshell holding the channel open), with every
    standard stream redirected, so the SSH command returns at once.
    """
    q = shlex.quote
    return f"cd {q(cwd)} || exit 1; setsid nohup {shlex.join(argv)} >> {q(log)} 2>&1 < /dev/null &"


# ---- preparing a host -----------------------------------------------------------------------------

def install_helper_and_watchdog(conn: Connection, paths: InstancePaths, settings: RuntimeSettings, repo_root: Path,
                                silence_seconds: float | None = None) -> None:
    """Upload the supervisor and start the dead-man watchdog (idempotent; first thing after SSH answers).
    `silence_seconds`: the host's own silence (a budget may shorten it); default the configured one."""
    silence = settings.orchestrator_silence_seconds if silence_seconds is None else silence_seconds
    watchdog = [
        paths.python, paths.supervisor, "watchdog", "--contact-file", paths.contact,
        "--pid-file", f"{paths.base}/watchdog.pid", "--log", f"{paths.base}/watchdog.log",
        "--silence-seconds", f"{silence:g}",
        "--max-lifetime-seconds", f"{settings.max_lifetime_hours * 3600:g}",
        "--check-seconds", f"{min(5.0, silence / 4):g}", *settings.on_silence,
    ]

    def install(remote: Remote) -> None:
        remote.run(["mkdir", "-p", paths.base, f"{paths.base}/work"], check=True)
        remote.put_file(repo_root / SUPERVISOR, paths.supervisor)
        remote.run(["touch", paths.contact], check=True)
        remote.run(detached(paths.base, watchdog, paths.base + "/watchdog.out"), check=True)

    conn.call(install)


def deploy_code(conn: Connection, paths: InstancePaths, bundle: CodeBundle, settings: RuntimeSettings,
                python: str | None = None) -> tuple[str, str]:
    """Clone the bundle (+ changes) into code-<version> and install dependencies; (code dir, python).

    Idempotent: a version already deployed (its python-<version> file exists) is reused. `python`: the
    host's interpreter with torch (hosts of your own); None = the image's python3 (rented instances).
    """
    code, python_file = paths.code(bundle.version), paths.python_file(bundle.version)
    q = shlex.quote

    def existing(remote: Remote) -> str | None:
        result = remote.run(f"cat {q(python_file)} 2>/dev/null")
        return result.stdout.strip() or None

    deployed = conn.call(existing)
    if deployed:
        return code, deployed
    base_python = q(python or "python3")
    upload = f"{paths.base}/upload-{bundle.version}"

    def push(remote: Remote) -> None:
        remote.run(["mkdir", "-p", upload], check=True)
        remote.put_file(bundle.bundle, f"{upload}/code.bundle")
        if bundle.patch:
            remote.put_file(bundle.patch, f"{upload}/changes.patch")
        if bundle.untracked:
            remote.put_file(bundle.untracked, f"{upload}/untracked.tar")

    conn.call(push)
    steps = [
        "set -e",
        "command -v git >/dev/null 2>&1 || { apt-get update -qq && "
        "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends git; }",
        f"rm -rf {q(code)}.tmp",
        f"git clone -q {q(upload + '/code.bundle')} {q(code + '.tmp')}",
        f"git -C {q(code + '.tmp')} checkout -q --detach {q(bundle.shipped)}",
    ]
    if bundle.patch:
        steps.append(f"git -C {q(code + '.tmp')} apply --binary --whitespace=nowarn {q(upload + '/changes.patch')}")
    if bundle.untracked:
        steps.append(f"tar -xf {q(upload + '/untracked.tar')} -C {q(code + '.tmp')}")
    steps += [f"rm -rf {q(code)}", f"mv {q(code + '.tmp')} {q(code)}", f"rm -rf {q(upload)}"]
    _run_script(conn, "deploy the code", steps, settings.install_timeout_seconds)

    venv = f"{paths.base}/venv"
    check = f"{base_python} {q(paths.supervisor)} has-requirements --requirements {q(code + '/' + REQUIREMENTS)}"
    install = [
        "set -e",
        f"cd {q(code)}",
        f"if [ -f {q(REQUIREMENTS)} ] && ! {check}; then",
        f"  {base_python} -m venv --system-site-packages {q(venv)}",
        f"  {q(venv + '/bin/pip')} install --disable-pip-version-check -q -r {q(REQUIREMENTS)}",
        f"  echo {q(venv + '/bin/python')} > {q(python_file)}.tmp",
        "else",
        f"  command -v {base_python} > {q(python_file)}.tmp",
        "fi",
        f"mv {q(python_file)}.tmp {q(python_file)}",
        f"cat {q(python_file)}",
    ]
    result = _run_script(conn, "install dependencies", install, settings.install_timeout_seconds)
    return code, result.strip().splitlines()[-1]


def _run_script(conn: Connection, what: str, steps: list[str], timeout: float) -> str:
    script = "\n".join(steps) + "\n"
    started = time.monotonic()
    result = conn.run(["bash", "-s"], stdin=script.encode(), timeout=timeout, retries=2)
    if result.exit_code != 0:
        raise DeployError(f"{what} failed on the host (exit {result.exit_code}, "
                          f"{time.monotonic() - started:.0f}s):\n{result.tail(25)}")
    return result.stdout


def deploy_record(bundle: CodeBundle, python: str) -> dict:
    """What the ledger event `instance.deploy` records about a deploy."""
    return {"commit": bundle.commit, "shipped_commit": bundle.shipped, "diff_hash": bundle.diff_hash,
            "version": bundle.version, "python": python}
