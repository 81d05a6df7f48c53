"""SSH to remote hosts (rented instances, machines of your own) with paramiko: a pinned host key, quoted commands, timeouts, retries.

Trust on first contact, then never again: the first connection to an
host records its host key (the caller stores it in the ledger: `instances.host_key`
for rented ones, an `ssh.host_key` event for hosts of your own); every later connection is made with that key and
paramiko's RejectPolicy, so a changed key raises `HostKeyChanged` instead of
talking to whoever answers. Nothing here ever adds keys automatically.

Every command runs with a timeout; `Connection.call` retries an operation
with backoff when the connection drops, reconnecting with the pinned key.
"""

from __future__ import annotations

import base64
import io
import os
import shlex
import socket
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

T = TypeVar("T")

DEFAULT_USER = "root"


class SshError(Exception):
    """An instance could not be reached or a command on it could not be run."""


class HostKeyChanged(SshError):
    """The instance offered a host key other than the one pinned at first contact."""


class CommandTimeout(SshError):
    """A remote command ran past its timeout (it was abandoned)."""


class ConnectionLost(SshError):
    """The connection closed under a command."""


class RefusedFile(Exception):
    """A file the instance offered that is not pulled: a link, a FIFO, a device, or one that grew in transit."""


# ---- what a rented host may send back ----------------------------------------------------------------

MAX_NAME_LENGTH = 200


def plain_name(name: object) -> bool:
    """Whether a name from a remote listing is safe to use as one local file name: a single path
    component, no leading dot (no `..`, no hidden files, no clash with our `.name.download` temps),
    no separators or control characters (NUL included), at most MAX_NAME_LENGTH characters."""
    return (isinstance(name, str) and 0 < len(name) <= MAX_NAME_LENGTH and not name.startswith(".")
            and "/" not in name and "\\" not in name and all(ord(c) >= 32 and c != "\x7f" for c in name))


def kind_of(mode: int | None) -> str:
    """'file', 'dir', 'link' or 'other' (FIFO, socket, device, unknown) from an st_mode."""
    mode = mode or 0
    if stat.S_ISLNK(mode):
        return "link"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    return "other"


@dataclass(frozen=True)
class RemoteEntry:
    name: str
    kind: str                  # kind_of(st_mode), from the listing: a link is a link, not its target
    size: int


# Errors after which reconnecting may help. HostKeyChanged is deliberately not one of them.
CONNECTION_ERRORS = (paramiko.SSHException, OSError, EOFError, socket.timeout, CommandTimeout, ConnectionLost)


# ---- keys ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KeyPair:
    private: paramiko.PKey
    public_line: str           # "ssh-ed25519 AAAA... comment", as Vast's ssh-key endpoints take it


def load_or_create_keypair(path: Path, comment: str) -> KeyPair:
    """The run's ed25519 key at `path` (mode 0600), generated on first use."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        private = Ed25519PrivateKey.generate()
        pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        os.replace(tmp, path)
    key = paramiko.Ed25519Key.from_private_key(io.StringIO(path.read_text()))
    return KeyPair(key, f"{key.get_name()} {key.get_base64()} {comment}")


def format_host_key(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.get_base64()}"


def parse_host_key(text: str) -> paramiko.PKey:
    name, blob = text.split()[:2]
    return paramiko.PKey.from_type_string(name, base64.b64decode(blob))


def _known_hosts_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


class _PinAtFirstContact(paramiko.MissingHostKeyPolicy):
    """Used only when no key is pinned yet: remember the offered key, so the caller can pin it."""

    def __init__(self) -> None:
        self.seen: paramiko.PKey | None = None

    def missing_host_key(self, client, hostname, key):
        self.seen = key


# ---- one connection --------------------------------------------------------------------------------

@dataclass
class CommandResult:
    exit_code: int
    stdout: str
    stderr: str

    def tail(self, lines: int = 20) -> str:
        text = (self.stdout + ("\n" if self.stdout and self.stderr else "") + self.stderr).strip()
        return "\n".join(text.splitlines()[-lines:])


class Remote:
    """An open SSH connection to one instance (not thread-safe; `Connection` serialises use)."""

    def __init__(self, client: paramiko.SSHClient, host_key: str, timeout: float):
        self._client = client
        self._sftp: paramiko.SFTPClient | None = None
        self.host_key = host_key
        self.timeout = timeout

    @classmethod
    def connect(cls, host: str, port: int, key: paramiko.PKey, pinned_host_key: str | None,
                timeout: float, user: str = DEFAULT_USER) -> "Remote":
        client = paramiko.SSHClient()
        first_contact = _PinAtFirstContact()
        if pinned_host_key:
            pinned = parse_host_key(pinned_host_key)
            client.get_host_keys().add(_known_hosts_name(host, port), pinned.get_name(), pinned)
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
        else:
            client.set_missing_host_key_policy(first_contact)
        try:
            client.connect(host, port=port, username=user, pkey=key, timeout=timeout, banner_timeout=timeout,
                           auth_timeout=timeout, channel_timeout=timeout, allow_agent=False, look_for_keys=False)
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise HostKeyChanged(
                f"host key of {host}:{port} changed: pinned {exc.expected_key.get_fingerprint().hex()}, "
                f"offered {exc.key.get_fingerprint().hex()} ({exc.key.get_name()}); refusing to connect "
                "(the instance was replaced, or someone is in the middle)") from None
        except BaseException:
            client.close()
            raise
        if pinned_host_key:
            host_key = pinned_host_key
        else:
            offered = first_contact.seen or client.get_transport().get_remote_server_key()
            host_key = format_host_key(offered)
        return cls(client, host_key, timeout)

    def close(self) -> None:
        try:
            if self._sftp is not None:
                self._sftp.close()
        finally:
            self._sftp = None
            self._client.close()

    @property
    def alive(self) -> bool:
        transport = self._client.get_transport()
        return transport is not None and transport.is_active()

    # ---- commands ----

    def run(self, command: str | Sequence[str], timeout: float | None = None, stdin: bytes | None = None,
            check: bool = False) -> CommandResult:
        """Run a command; a sequence is quoted with shlex (a string must be quoted by its caller)."""
        text = command if isinstance(command, str) else shlex.join(command)
        limit = timeout or self.timeout
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise ConnectionLost("connection closed")
        channel = transport.open_session(timeout=self.timeout)
        try:
            channel.settimeout(limit)
            channel.exec_command(text)
            if stdin is not None:
                channel.sendall(stdin)
            channel.shutdown_write()
            out, err = bytearray(), bytearray()
            deadline = time.monotonic() + limit
            while True:
                if channel.recv_ready():
                    out += channel.recv(1 << 16)
                elif channel.recv_stderr_ready():
                    err += channel.recv_stderr(1 << 16)
                elif channel.exit_status_ready() and channel.eof_received:
                    break
                elif channel.closed:
                    # Closed without EOF: done if an exit status came first, else the connection dropped under the
                    # command (sshd killed: a stopped, outbid or vanished host). Without this the loop spun
                    # (status_event stays set) until the command's timeout and reported a timeout.
                    if channel.exit_status != -1:
                        break
                    raise ConnectionLost(f"the connection closed while running: {text[:120]}")
                elif time.monotonic() > deadline:
                    raise CommandTimeout(f"remote command ran past {limit:.0f}s: {text[:120]}")
                else:
                    channel.status_event.wait(0.02)
            result = CommandResult(channel.recv_exit_status(), out.decode(errors="replace"),
                                   err.decode(errors="replace"))
        finally:
            channel.close()
        if check and result.exit_code != 0:
            raise SshError(f"remote command failed (exit {result.exit_code}): {text[:200]}\n{result.tail()}")
        return result

    # ---- files ----

    @property
    def sftp(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            self._sftp = self._client.open_sftp()
            self._sftp.get_channel().settimeout(self.timeout)
        return self._sftp

    def put_file(self, local: Path, remote: str) -> None:
        """Upload to `remote` through a temp name and a rename, so a reader never sees half a file."""
        tmp = remote + ".part"
        self.sftp.put(str(local), tmp)
        self.sftp.posix_rename(tmp, remote)

    def put_bytes(self, data: bytes, remote: str) -> None:
        tmp = remote + ".part"
        with self.sftp.open(tmp, "wb") as handle:
            handle.write(data)
        self.sftp.posix_rename(tmp, remote)

    def get_file(self, remote: str, local: Path) -> None:
        """Download a regular file (never a link, FIFO or device: checked with lstat) to a new local file.

        The host cannot make it grow past the size it announced, and `local` is created without
        following a link; the caller builds `local` from names it checked (see `plain_name`).
        """
        attrs = self.sftp.lstat(remote)
        if not stat.S_ISREG(attrs.st_mode or 0):
            raise RefusedFile(f"{remote} on the instance is not a regular file ({kind_of(attrs.st_mode)})")
        size = attrs.st_size or 0
        local = Path(local)
        local.unlink(missing_ok=True)
        fd = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as out, self.sftp.open(remote, "rb") as source:
            source.prefetch(size)
            copied = 0
            while True:
                block = source.read(min(1 << 20, size + 1 - copied))
                if not block:
                    break
                copied += len(block)
                if copied > size:
                    local.unlink(missing_ok=True)
                    raise RefusedFile(f"{remote} on the instance grew past the {size} bytes it announced")
                out.write(block)

    def list_dir(self, remote: str) -> list[RemoteEntry]:
        """The entries of a remote folder, typed from their own attributes (links are not followed);
        [] when the folder does not exist. Names are the host's: check them with `plain_name`."""
        try:
            return [RemoteEntry(e.filename, kind_of(e.st_mode), e.st_size or 0) for e in self.sftp.listdir_attr(remote)]
        except FileNotFoundError:
            return []


class Connection:
    """The way to one host: connects lazily with the pinned key, one user at a time, with retries."""

    def __init__(self, host: str, port: int, key: paramiko.PKey, pinned_host_key: str | None, *,
                 timeout: float, retries: int, on_pin: Callable[[str], None] | None = None,
                 user: str = DEFAULT_USER):
        self.host, self.port, self.user = host, port, user
        self.key = key
        self.pinned_host_key = pinned_host_key
        self.timeout = timeout
        self.retries = retries
        self.on_pin = on_pin
        self.lock = threading.RLock()       # the owner of this instance's connection, one at a time
        self._remote: Remote | None = None

    def _ensure(self) -> Remote:
        if self._remote is not None and self._remote.alive:
            return self._remote
        self._drop()
        remote = Remote.connect(self.host, self.port, self.key, self.pinned_host_key, self.timeout, self.user)
        if not self.pinned_host_key:
            self.pinned_host_key = remote.host_key
            if self.on_pin:
                self.on_pin(remote.host_key)
        self._remote = remote
        return remote

    def _drop(self) -> None:
        if self._remote is not None:
            try:
                self._remote.close()
            except Exception:
                pass
            self._remote = None

    def call(self, operation: Callable[[Remote], T], retries: int | None = None) -> T:
        """Run operation(remote); on a connection error reconnect and retry, with backoff."""
        tries = retries or self.retries
        delay = 0.5
        with self.lock:
            for attempt in range(1, tries + 1):
                try:
                    return operation(self._ensure())
                except HostKeyChanged:
                    self._drop()
                    raise
                except CONNECTION_ERRORS as exc:
                    self._drop()
                    if attempt == tries:
                        raise SshError(f"{self.host}:{self.port}: {type(exc).__name__}: {exc}"
                                       f" (after {tries} tries)") from exc
                    time.sleep(delay)
                    delay = min(delay * 2, 10.0)
        raise AssertionError("unreachable")

    def run(self, command: str | Sequence[str], timeout: float | None = None, stdin: bytes | None = None,
            check: bool = False, retries: int | None = None) -> CommandResult:
        return self.call(lambda remote: remote.run(command, timeout=timeout, stdin=stdin, check=check), retries)

    def close(self) -> None:
        with self.lock:
            self._drop()
