"""Atomic file writes: a temporary file in the same folder, then a rename, so readers never see half a file and an
interrupted write (Ctrl-C, a full disk) leaves the previous file or none, never a truncated one."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` writes the whole file to ``tmp``; it is flushed to the disk (fsync) and then replaces ``path``
    in one step, and the rename is made durable too. Every file r2unet writes goes through here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise naming(exc, path) from None
    finally:
        tmp.unlink(missing_ok=True)
    _fsync(path.parent)


def check_writable(path: str | Path) -> None:
    """Raise the OSError (naming ``path``) that writing ``path`` would meet, before slow work that ends in it."""
    path = Path(path)
    probe = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
    except OSError as exc:
        raise naming(exc, path) from None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass


def naming(exc: OSError, path: Path) -> OSError:
    """``exc`` with the file it was about (a full disk's error names none), and the free space when the disk is
    full."""
    if exc.filename and exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return exc
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT) and (free := free_space(path.parent)):
        reason += f" ({free})"
    return OSError(exc.errno, reason, str(path))


def free_space(folder: Path) -> str:
    """"N MiB free in FOLDER", for messages about a full disk ("" when the file system will not say)."""
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free in {folder}"
    except OSError:
        return ""


def append_line(path: str | Path, line: str) -> None:
    """Add one line to a log-like file (metrics.jsonl); a failure names the file."""
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as exc:
        raise naming(exc, Path(path)) from None


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary files of ``path`` left by writers that were killed (kill -9, power loss): the process that named
    one is gone from this host. Those of live processes (a concurrent writer) are left alone."""
    for stale in path.parent.glob(f".{path.name}.tmp*"):
        pid = stale.name.rsplit(".tmp", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            stale.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk; a file system that cannot (some network mounts
    refuse it for folders) is left as it is."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """``data`` written whole under ``path`` or not at all: one checked write (a short write on a full disk is an
    error, and the size on disk is compared), then ``atomic_write``'s fsync and rename. Encoders that write to a file
    descriptor themselves (Pillow's JPEG encoder) ignore a short write; encoding to memory first leaves them none."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
        if tmp.stat().st_size != len(data):
            raise OSError(errno.ENOSPC, f"only {tmp.stat().st_size} of {len(data)} bytes were written")

    atomic_write(path, write)


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


def encode_image(image: Any, suffix: str, **options) -> bytes:
    """A PIL image encoded in memory in the format its file suffix names (what ``atomic_save_image`` writes)."""
    buffer = io.BytesIO()
    image.save(buffer, format=IMAGE_FORMATS.get(suffix.lower(), suffix.lstrip(".").upper()), **options)
    return buffer.getvalue()


def atomic_save_image(image: Any, path: str | Path, **options) -> None:
    """``image.save(path, **options)`` for a PIL image (the format follows the suffix, as PIL's would), encoded in
    memory and written whole or not at all."""
    atomic_write_bytes(path, encode_image(image, Path(path).suffix, **options))


def is_whole_image(path: str | Path) -> bool:
    """A PNG or JPEG file that ends as one must (PNG's IEND chunk, JPEG's end-of-image marker): what a truncated
    write, or a kill before the rename in older versions, would lack. Read from the file's last bytes only."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 12))
            tail = f.read()
    except OSError:
        return False
    suffix = path.suffix.lower()
    if suffix == ".png":
        return tail.endswith(b"IEND\xaeB`\x82")
    if suffix in (".jpg", ".jpeg"):
        return tail.rstrip(b"\0").endswith(b"\xff\xd9")
    return size > 0


class FolderLock:
    """One writer per folder: ``acquire()`` creates ``<folder>/.lock`` (pid and host) or says who holds it.

    A lock left by a process that no longer runs on this host (``kill -9``, a crash) is taken over. ``release()``
    removes the lock, and the folder too when ``acquire`` created it and it is still empty."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / ".lock"
        self._created_folder = False
        self._held = False

    def acquire(self) -> str | None:
        """None when the lock is ours; otherwise a message naming the holder (nothing was changed)."""
        self._created_folder = not self.folder.exists()
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    holder = {}
                if holder.get("host") == me["host"] and not _pid_alive(holder.get("pid")):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                return (f"{self.folder} is in use by another r2unet process (pid {holder.get('pid', '?')} on "
                        f"{holder.get('host', '?')}); wait for it or stop it, or choose another folder (if that "
                        f"process is gone, delete {self.path})")
            except OSError as exc:  # a read-only file system, no permission
                return f"cannot write to {self.folder}: {exc.strerror or exc}"
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(me, f)
            except OSError as exc:  # a full disk
                self.path.unlink(missing_ok=True)
                return f"cannot write to {self.folder}: {naming(exc, self.path).strerror}"
            self._held = True
            return None
        return f"could not take {self.path}"

    def release(self) -> None:
        if not self._held:
            return
        self.path.unlink(missing_ok=True)
        self._held = False
        if self._created_folder:
            try:
                self.folder.rmdir()  # only if empty: a run that stopped before writing anything leaves nothing
            except OSError:
                pass


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True
