"""The code a run ran: git commit, and a hash of any uncommitted change."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from orchestrator.paths import REPO_ROOT


def _git(*args: str, cwd: Path = REPO_ROOT) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.decode(errors="replace") if out.returncode == 0 else None


def code_version(cwd: Path = REPO_ROOT) -> dict:
    """{"commit": sha or None, "dirty": bool, "diff_hash": sha256 of diff + untracked files, or None}."""
    commit = _git("rev-parse", "HEAD", cwd=cwd)
    if commit is None:
        return {"commit": None, "dirty": None, "diff_hash": None}
    diff = _git("diff", "HEAD", "--binary", cwd=cwd) or ""
    untracked = _git("ls-files", "--others", "--exclude-standard", cwd=cwd) or ""
    if not diff and not untracked:
        return {"commit": commit.strip(), "dirty": False, "diff_hash": None}
    digest = hashlib.sha256(diff.encode())
    for name in sorted(untracked.split()):
        digest.update(name.encode())
        try:
            digest.update((cwd / name).read_bytes())
        except OSError:
            pass
    return {"commit": commit.strip(), "dirty": True, "diff_hash": digest.hexdigest()[:16]}


def describe_code(commit: str | None, diff_hash: str | None) -> str:
    if commit is None:
        return "code outside any git checkout"
    short = f"commit {commit[:12]}"
    return f"{short} with uncommitted changes (diff {diff_hash})" if diff_hash else short


def code_change(recorded_commit: str | None, recorded_diff_hash: str | None, now: dict) -> str | None:
    """None when `now` (a code_version()) is the code a run recorded; else what changed, in words."""
    if (recorded_commit, recorded_diff_hash) == (now["commit"], now["diff_hash"]):
        return None
    return (f"the run started on {describe_code(recorded_commit, recorded_diff_hash)}; "
            f"the code is now {describe_code(now['commit'], now['diff_hash'])}")
