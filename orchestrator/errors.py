"""Errors a user can fix. The CLI prints their message (no traceback) and exits non-zero."""

import errno


class UserError(Exception):
    """A mistake in the user's input or environment: the message says what and where."""


class SpecError(UserError):
    """An invalid arms spec: the message names the file, the field or line, and what was expected."""


# sqlite3.OperationalError texts that mean the ledger file (or its folder) cannot be used, not a bug
LEDGER_ACCESS_ERRORS = ("unable to open database file", "attempt to write a readonly database",
                        "readonly database", "disk i/o error", "database or disk is full", "database is locked")


def ledger_access_problem(exc: Exception) -> bool:
    """Is this sqlite error about reaching the ledger file (permissions, space, locks) rather than a bug?"""
    return any(text in str(exc).lower() for text in LEDGER_ACCESS_ERRORS)


def ledger_error_message(exc: Exception, ledger_path, home) -> str:
    return (f"{ledger_path}: cannot use the ledger ({exc}). ARMATURE_HOME ({home}) must be a folder this user "
            f"can write, on a disk with free space (SQLite keeps -wal and -shm files beside the ledger); "
            f"fix its permissions or point ARMATURE_HOME at another folder")


def os_error_message(exc: OSError) -> str:
    """One line for a failed file operation: the path, what went wrong and what armature expected."""
    reason = exc.strerror or str(exc)
    if exc.filename is None:            # e.g. a write to an open file: the OS does not say which
        path, reason = reason, "while writing armature's files"
    else:
        path = exc.filename
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"{path}: {reason}: armature needs to write here; make it writable, or set ARMATURE_HOME "
                f"to a writable folder")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{path}: {reason}: free some space there, or set ARMATURE_HOME to a disk with room"
    if exc.errno == errno.ENOTDIR:
        return f"{path}: {reason}: expected a folder, found a file on the way; move that file aside"
    if exc.errno == errno.EISDIR:
        return f"{path}: {reason}: expected a file, found a folder; move that folder aside"
    if exc.errno == errno.EEXIST:
        return f"{path}: {reason}: expected a folder, found something else there; move it aside"
    return f"{path}: {reason}"
