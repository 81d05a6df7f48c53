"""Moving an attempt's files (and the code) between the driver and a Ray node that does not share its filesystem.

An attempt's files travel as Ray objects, never as paths: the driver hands the node what the trainer
reads (upstream artifacts, and the arm run's last checkpoint, metrics and log to resume from), and the
node sends back what the trainer writes (the checkpoint whenever it changes, and at the end the summary,
samples, log, metrics and artifact). The driver writes what comes back into the arm run's folder,
each file atomically and only after its sha256 matches, under a plain name in one of a few fixed places.

The code reaches the nodes of a cluster the driver joins through Ray's `runtime_env`: this checkout's
tree (what the driver itself runs) as the job's `working_dir`, without the virtualenv, runs and git
history. Each node unpacks it once and starts the attempt tasks, and so the trainers, inside it.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from pathlib import Path

from orchestrator import paths

# the places inside an attempt folder a file may come back to ("" is the folder itself)
PLACES = ("", "checkpoints", "samples")
PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}$")

CHECKPOINT = ("checkpoints", "last.pt")
RESUME_FILES = (CHECKPOINT, ("", "metrics.jsonl"), ("", "log"))          # read in this order: metrics are
                                                                         # fsynced before a checkpoint is written
FINAL_FILES = (("", "summary.json"), ("", "artifact.pt"), ("", "metrics.jsonl"), ("", "log"), CHECKPOINT)

DRIVER_MARK = ".driver-mark"            # a nonce the driver leaves in the arm run folder for one attempt


# never shipped to the nodes, besides what .gitignore names (Ray honours it): gitignore-style patterns
CODE_EXCLUDES = [".git", ".venv", "venv", "runs", ".pytest_cache", ".cache", "build", "*.egg-info",
                 "__pycache__", "*.pyc"]


def code_runtime_env() -> dict:
    """The runtime_env that brings this checkout's code to every node of a cluster the driver joins."""
    excludes = list(CODE_EXCLUDES)
    home = paths.home()
    if home.is_relative_to(paths.REPO_ROOT) and home != paths.REPO_ROOT and home.name != "runs":
        excludes.append("/" + home.relative_to(paths.REPO_ROOT).as_posix())     # ARMATURE_HOME inside the tree
    return {"working_dir": str(paths.REPO_ROOT), "excludes": excludes}


class BadTransfer(Exception):
    """A file sent back that may not be written where it asks to go."""


def check_place(place: str, name: str) -> None:
    if place not in PLACES:
        raise BadTransfer(f"refused a file sent back into {place!r}: allowed places are {PLACES}")
    if not PLAIN_NAME.match(name) or ".." in name:
        raise BadTransfer(f"refused a file sent back as {name!r}: names must be plain (letters, digits, '._-', "
                          "no '/' or '..', not starting with '.')")


def read_file(folder: Path, place: str, name: str) -> dict | None:
    """A regular file (not a link) of `folder` as a transfer entry, or None when there is none."""
    path = Path(folder, place, name)
    if path.is_symlink() or not path.is_file():
        return None
    data = path.read_bytes()
    return {"place": place, "name": name, "data": data, "sha256": hashlib.sha256(data).hexdigest()}


def read_files(folder: Path, which) -> list[dict]:
    return [entry for place, name in which if (entry := read_file(folder, place, name)) is not None]


def read_outputs(folder: Path) -> list[dict]:
    """Everything a finished (or stopped) trainer leaves that the driver keeps."""
    samples = sorted(p.name for p in (folder / "samples").glob("*") if PLAIN_NAME.match(p.name)) \
        if (folder / "samples").is_dir() else []
    return read_files(folder, FINAL_FILES + tuple(("samples", name) for name in samples))


def write_files(folder: Path, entries: list[dict]) -> None:
    """Writes entries into `folder` (the driver's arm run folder), each atomically after its checksum."""
    for entry in entries:
        check_place(entry["place"], entry["name"])
        if hashlib.sha256(entry["data"]).hexdigest() != entry["sha256"]:
            raise BadTransfer(f"{entry['place']}/{entry['name']} came back damaged (sha256 differs)")
    for entry in entries:
        atomic_write(Path(folder, entry["place"], entry["name"]), entry["data"])


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def place_mark(out_dir: Path) -> str:
    """Leaves a fresh nonce in `out_dir`; a node that reads it back shares the driver's filesystem."""
    nonce = uuid.uuid4().hex
    atomic_write(out_dir / DRIVER_MARK, nonce.encode())
    return nonce


def sees_mark(out_dir: Path, nonce: str) -> bool:
    try:
        return (out_dir / DRIVER_MARK).read_text() == nonce
    except OSError:
        return False
