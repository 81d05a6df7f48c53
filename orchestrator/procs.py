"""Processes on this machine, told apart by pid and kernel start time (a pid alone may be reused)."""

from __future__ import annotations

from pathlib import Path


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of a pid (field 22 of /proc/pid/stat); None if no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def same_process_alive(pid: int, start_time: str | None) -> bool:
    """Is `pid` alive and, when `start_time` is known, still the process that was recorded?"""
    current = process_start_time(pid)
    return current is not None and (start_time is None or current == start_time)


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
