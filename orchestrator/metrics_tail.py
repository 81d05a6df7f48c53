"""Follow a growing metrics.jsonl: return only the complete lines written since the last read."""

from __future__ import annotations

import json
import os
from pathlib import Path


class JsonlTail:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset = 0
        self.inode: int | None = None
        self.last_step: int | None = None

    def read_new(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                inode, size = os.fstat(f.fileno()).st_ino, f.seek(0, 2)
                # A resumed trainer replaces the file (atomically, a new inode) with the rows up to its checkpoint,
                # which may already be as long as what was read before: start over on a new file or a shorter one.
                if inode != self.inode or size < self.offset:
                    self.inode, self.offset = inode, 0
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        return self.feed(data)

    def feed(self, data: bytes) -> list[dict]:
        """Parse bytes that follow the current offset (a remote reader hands them over itself)."""
        end = data.rfind(b"\n") + 1             # a partly written last line waits for the next read
        rows = []
        for line in data[:end].splitlines():
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and "step" in row:
                    rows.append(row)
        self.offset += end
        if rows:
            self.last_step = int(rows[-1]["step"])
        return rows


def log_tail(path: Path, lines: int = 12, max_chars: int = 1500) -> str:
    """The end of a log, for a failure reason."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    tail = "\n".join(text.rstrip().splitlines()[-lines:])
    return tail[-max_chars:]
