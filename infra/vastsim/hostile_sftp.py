"""A hostile host's SFTP server (the `hostile_sftp` fault): SFTP v3 over stdin/stdout, run by sshd as
the `sftp` subsystem of an instance instead of OpenSSH's internal-sftp.

It serves the instance's real files (reads, writes, renames, listings: what a client needs) and,
like a compromised host, adds to every directory listing entries no honest filesystem has:

    ./../../..<target>/dotdot-escape.txt   a name that climbs out of any local folder (even as ".<name>")
    /<target>/absolute-escape.txt          an absolute name
    linked.png                             a symbolic link (to a file outside the instance)
    fifo.png                               a FIFO
    .hidden.png, nul<NUL>byte.png, a 300-character name

Opening (or stat-ing) any of them serves PAYLOAD, as if the host followed its own link; lstat of
the link says it is a link. `target` is the folder the escapes aim at (the fault's value).

    python hostile_sftp.py --root HOME --target /abs/folder

With `--read-delay-file PATH` (the `slow_sftp_read_s` fault; without --target an honest host) every read
of a real file takes as many seconds more as PATH says (read at each read: the simulator changes it live),
and `--busy-marker PATH` exists while a delayed read is under way (so a test can tell a pull-back is in
progress).

    python hostile_sftp.py --root HOME --read-delay-file D --busy-marker HOME/.vastsim/sftp-reading
"""

from __future__ import annotations

import argparse
import os
import stat
import struct
import sys
import time

PAYLOAD = b"written by a hostile host\n"

# Packet types and status codes of SFTP version 3 (draft-ietf-secsh-filexfer-02).
INIT, VERSION, OPEN, CLOSE, READ, WRITE, LSTAT, FSTAT, SETSTAT, FSETSTAT = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
OPENDIR, READDIR, REMOVE, MKDIR, RMDIR, REALPATH, STAT, RENAME, READLINK, SYMLINK = range(11, 21)
STATUS, HANDLE, DATA, NAME, ATTRS, EXTENDED = 101, 102, 103, 104, 105, 200
OK, EOF, NO_SUCH_FILE, PERMISSION_DENIED, FAILURE, OP_UNSUPPORTED = 0, 1, 2, 3, 4, 8
ATTR_SIZE, ATTR_UIDGID, ATTR_PERMISSIONS, ATTR_ACMODTIME = 1, 2, 4, 8
READ_FLAG, WRITE_FLAG, APPEND_FLAG, CREAT_FLAG, TRUNC_FLAG, EXCL_FLAG = 1, 2, 4, 8, 0x10, 0x20


def hostile_entries(target: str) -> list[tuple[str, int]]:
    """(name, st_mode) of what the host adds to every listing."""
    regular, inside = stat.S_IFREG | 0o644, target.strip("/")
    return [("./" + "../" * 40 + f"{inside}/dotdot-escape.txt", regular),
            (f"/{inside}/absolute-escape.txt", regular),
            ("linked.png", stat.S_IFLNK | 0o777),
            ("fifo.png", stat.S_IFIFO | 0o644),
            (".hidden.png", regular),
            ("nul\0byte.png", regular),
            ("x" * 296 + ".png", regular)]


class Reader:
    def __init__(self, data: bytes):
        self.data, self.at = data, 0

    def take(self, n: int) -> bytes:
        chunk = self.data[self.at:self.at + n]
        self.at += n
        return chunk

    def u32(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack(">Q", self.take(8))[0]

    def string(self) -> bytes:
        return self.take(self.u32())

    def attrs(self) -> dict:
        flags, found = self.u32(), {}
        if flags & ATTR_SIZE:
            found["size"] = self.u64()
        if flags & ATTR_UIDGID:
            found["uid"], found["gid"] = self.u32(), self.u32()
        if flags & ATTR_PERMISSIONS:
            found["mode"] = self.u32()
        if flags & ATTR_ACMODTIME:
            found["times"] = (self.u32(), self.u32())
        return found


def pack_string(data: bytes | str) -> bytes:
    data = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    return struct.pack(">I", len(data)) + data


def pack_attrs(mode: int, size: int, mtime: int = 0) -> bytes:
    return struct.pack(">IQIII", ATTR_SIZE | ATTR_PERMISSIONS | ATTR_ACMODTIME, size, mode, mtime, mtime)


def attrs_of(info: os.stat_result) -> bytes:
    return pack_attrs(info.st_mode, info.st_size, int(info.st_mtime))


class Server:
    def __init__(self, root: str, target: str | None, read_delay_file: str | None = None,
                 busy_marker: str | None = None):
        self.root = root
        self.hostile = hostile_entries(target) if target else []
        self.read_delay_file, self.busy_marker = read_delay_file, busy_marker
        self.handles: dict[bytes, object] = {}
        self.next_handle = 0

    # ---- paths and the hostile names ----

    def local(self, path: bytes) -> str:
        text = path.decode("utf-8", "surrogateescape")
        return text if text.startswith("/") else os.path.join(self.root, text or ".")

    def hostile_mode(self, path: str) -> int | None:
        for name, mode in self.hostile:
            if path.endswith("/" + name) or path == name:
                return mode
        return None

    def new_handle(self, value) -> bytes:
        self.next_handle += 1
        handle = str(self.next_handle).encode()
        self.handles[handle] = value
        return handle

    # ---- replies ----

    @staticmethod
    def status(request_id: int, code: int, message: str = "") -> bytes:
        return struct.pack(">BII", STATUS, request_id, code) + pack_string(message) + pack_string("")

    def error(self, request_id: int, exc: OSError) -> bytes:
        code = {2: NO_SUCH_FILE, 13: PERMISSION_DENIED, 1: PERMISSION_DENIED}.get(exc.errno or 0, FAILURE)
        return self.status(request_id, code, exc.strerror or str(exc))

    # ---- requests ----

    def handle(self, kind: int, body: Reader) -> bytes:
        if kind == INIT:
            return struct.pack(">BI", VERSION, 3) + pack_string("posix-rename@openssh.com") + pack_string("1")
        request_id = body.u32()
        try:
            return self.dispatch(kind, request_id, body)
        except OSError as exc:
            return self.error(request_id, exc)
        except Exception as exc:                 # a malformed request: answer, keep serving
            return self.status(request_id, FAILURE, f"{type(exc).__name__}: {exc}")

    def dispatch(self, kind: int, request_id: int, body: Reader) -> bytes:
        if kind in (OPEN, OPENDIR, LSTAT, STAT, REALPATH, REMOVE, MKDIR, RMDIR, SETSTAT, READLINK):
            path = self.local(body.string())
            mode = self.hostile_mode(path)
            if mode is not None:
                return self.hostile_request(kind, request_id, mode)
        if kind == OPEN:
            flags, _ = body.u32(), body.attrs()
            os_flags = {READ_FLAG: os.O_RDONLY, WRITE_FLAG: os.O_WRONLY}.get(flags & 3, os.O_RDWR)
            os_flags |= (os.O_CREAT if flags & CREAT_FLAG else 0) | (os.O_TRUNC if flags & TRUNC_FLAG else 0)
            os_flags |= (os.O_EXCL if flags & EXCL_FLAG else 0) | (os.O_APPEND if flags & APPEND_FLAG else 0)
            return self.handle_reply(request_id, os.open(path, os_flags, 0o644))
        if kind == OPENDIR:
            names = sorted(os.listdir(path))
            return self.handle_reply(request_id, {"dir": path, "names": names, "hostile_sent": False})
        if kind in (LSTAT, STAT):
            info = os.lstat(path) if kind == LSTAT else os.stat(path)
            return struct.pack(">BI", ATTRS, request_id) + attrs_of(info)
        if kind == REALPATH:
            entry = pack_string(os.path.normpath(path)) + pack_string("") + pack_attrs(stat.S_IFDIR | 0o755, 0)
            return struct.pack(">BII", NAME, request_id, 1) + entry
        if kind == REMOVE:
            os.unlink(path)
        elif kind == MKDIR:
            os.mkdir(path)
        elif kind == RMDIR:
            os.rmdir(path)
        elif kind == SETSTAT:
            self.set_attrs(path, body.attrs())
        elif kind in (CLOSE, READ, WRITE, FSTAT, FSETSTAT, READDIR):
            return self.handle_request(kind, request_id, body)
        elif kind == RENAME or kind == EXTENDED:
            if kind == EXTENDED and body.string() != b"posix-rename@openssh.com":
                return self.status(request_id, OP_UNSUPPORTED, "unsupported extension")
            old, new = self.local(body.string()), self.local(body.string())
            os.replace(old, new)
        else:
            return self.status(request_id, OP_UNSUPPORTED, "unsupported")
        return self.status(request_id, OK)

    def handle_reply(self, request_id: int, value) -> bytes:
        return struct.pack(">BI", HANDLE, request_id) + pack_string(self.new_handle(value))

    def handle_request(self, kind: int, request_id: int, body: Reader) -> bytes:
        key = body.string()
        value = self.handles.get(key)
        if value is None:
            return self.status(request_id, FAILURE, "bad handle")
        if kind == CLOSE:
            del self.handles[key]
            if isinstance(value, int):
                os.close(value)
            return self.status(request_id, OK)
        if kind == READDIR:
            return self.read_dir(request_id, value)
        if isinstance(value, bytes):                          # a hostile file, opened
            if kind == READ:
                offset, length = body.u64(), body.u32()
                chunk = value[offset:offset + length]
                return (struct.pack(">BI", DATA, request_id) + pack_string(chunk)) if chunk else \
                    self.status(request_id, EOF)
            if kind == FSTAT:
                return struct.pack(">BI", ATTRS, request_id) + pack_attrs(stat.S_IFREG | 0o644, len(value))
            return self.status(request_id, PERMISSION_DENIED, "read only")
        if kind == READ:
            offset, length = body.u64(), body.u32()
            self.slow_down()
            chunk = os.pread(value, length, offset)
            return (struct.pack(">BI", DATA, request_id) + pack_string(chunk)) if chunk else \
                self.status(request_id, EOF)
        if kind == WRITE:
            offset, data = body.u64(), body.string()
            os.pwrite(value, data, offset)
        elif kind == FSTAT:
            return struct.pack(">BI", ATTRS, request_id) + attrs_of(os.fstat(value))
        elif kind == FSETSTAT:
            body.attrs()
        return self.status(request_id, OK)

    def slow_down(self) -> None:
        """The `slow_sftp_read_s` fault: a read that takes the seconds the delay file says, the busy marker there
        meanwhile."""
        try:
            with open(self.read_delay_file or "") as handle:
                delay = float(handle.read().strip() or 0)
        except (OSError, ValueError):
            delay = 0.0
        if delay <= 0:
            return
        if self.busy_marker:
            open(self.busy_marker, "w").close()
        try:
            time.sleep(delay)
        finally:
            if self.busy_marker:
                os.unlink(self.busy_marker)

    def read_dir(self, request_id: int, listing: dict) -> bytes:
        entries = []
        for name in listing["names"][:100]:
            try:
                info = os.lstat(os.path.join(listing["dir"], name))
            except OSError:
                continue
            entries.append(pack_string(name) + pack_string(name) + attrs_of(info))
        listing["names"] = listing["names"][100:]
        if not listing["names"] and not listing["hostile_sent"]:
            listing["hostile_sent"] = True
            for name, mode in self.hostile:
                size = len(PAYLOAD) if stat.S_ISREG(mode) else 0
                entries.append(pack_string(name) + pack_string(name) + pack_attrs(mode, size))
        if not entries:
            return self.status(request_id, EOF)
        return struct.pack(">BII", NAME, request_id, len(entries)) + b"".join(entries)

    def hostile_request(self, kind: int, request_id: int, mode: int) -> bytes:
        """What the host answers about one of its made-up entries: it follows its own links."""
        if kind == LSTAT:
            return struct.pack(">BI", ATTRS, request_id) + pack_attrs(mode, len(PAYLOAD))
        if kind in (STAT, OPEN):
            if kind == STAT:
                return struct.pack(">BI", ATTRS, request_id) + pack_attrs(stat.S_IFREG | 0o644, len(PAYLOAD))
            return self.handle_reply(request_id, PAYLOAD)
        return self.status(request_id, PERMISSION_DENIED, "no")

    @staticmethod
    def set_attrs(path: str, attrs: dict) -> None:
        if "mode" in attrs:
            os.chmod(path, attrs["mode"] & 0o7777)
        if "times" in attrs:
            os.utime(path, attrs["times"])


def read_exactly(stream, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="the instance's home: relative paths start here")
    parser.add_argument("--target", help="the absolute folder the escaping names aim at (none: no hostile names)")
    parser.add_argument("--read-delay-file", help="a file holding the seconds every read of a real file takes")
    parser.add_argument("--busy-marker", help="a file that exists while a delayed read is under way")
    args = parser.parse_args(argv)
    server = Server(args.root, args.target, args.read_delay_file, args.busy_marker)
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    while True:
        header = read_exactly(source, 4)
        if header is None:
            return 0
        packet = read_exactly(source, struct.unpack(">I", header)[0])
        if packet is None:
            return 0
        reply = server.handle(packet[0], Reader(packet[1:]))
        sink.write(struct.pack(">I", len(reply)) + reply)
        sink.flush()


if __name__ == "__main__":
    sys.exit(main())
