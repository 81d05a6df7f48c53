"""Where state lives on disk: ARMATURE_HOME (default ./runs) holds the ledger and one folder per run."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def home() -> Path:
    return Path(os.environ.get("ARMATURE_HOME", "runs")).resolve()


def ledger_path() -> Path:
    return home() / "ledger.sqlite"


def run_dir(run_id: str) -> Path:
    return home() / run_id
