"""One writer per run directory: an advisory lock file holding the writer's pid and host.

``mtlcv train`` (and ``--resume``, ``compare``) takes ``DIR/.lock`` before writing anything into
``DIR``; a second process asking for the same directory is refused with one line naming the
holder (pid, host, command, since when). The lock is an ``fcntl.flock`` on that file, which the
kernel releases when the holder dies, even by SIGKILL, so a lock file left behind by a killed
run is *stale* and is taken over (with a note) by the next process. On systems or file systems
without ``flock`` the pid is checked instead: a lock of this host whose pid no longer runs is
stale; a lock of another host is trusted until the file is removed by hand.

Example:
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> with RunLock(d):
    ...     try:
    ...         RunLock(d).acquire()
    ...     except RunLocked as e:
    ...         print("refused")
    refused
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from ..errors import MtlcvError

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"


class RunLocked(MtlcvError):
    """Another live process writes this run directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def read_holder(folder: str | Path) -> dict[str, Any] | None:
    """The holder recorded in ``folder``'s lock file, or None (no file, unreadable)."""
    try:
        data = json.loads((Path(folder) / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process"
    since = holder.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "?"
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')!r} "
        f"({holder.get('command', '?')}, since {when})"
    )


class RunLock:
    """The lock of one run directory; use as a context manager or ``acquire``/``release``.

    Args:
        folder: the run (or grid) directory; created when missing.
        command: what the holder does, for the refusal message of another process.
    """

    def __init__(self, folder: str | Path, command: str = "mtlcv train") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = command
        self._fd: int | None = None
        #: the holder whose stale lock this one replaced (None: there was none)
        self.replaced: dict[str, Any] | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        if self._fd is not None:
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if not self._lock(fd):
                    holder = read_holder(self.folder)
                    raise RunLocked(
                        f"run directory {str(self.folder)!r} is in use by {describe(holder)}; "
                        "wait for it to finish, or choose another --out"
                    )
                # the file may have been unlinked by a releasing holder between open and lock
                if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                    os.close(fd)
                    continue
            except FileNotFoundError:
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                raise
            break
        previous = read_holder(self.folder)
        if previous and previous.get("pid") is not None:
            self.replaced = previous
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": self.command,
            "since": time.time(),
        }
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def _lock(self, fd: int) -> bool:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True  # the kernel's word: nobody holds it (a dead holder's lock is gone)
            except BlockingIOError:
                return False
            except OSError:  # a file system without flock: fall back to the pid check
                pass
        return self._pid_free()

    def _pid_free(self) -> bool:
        holder = read_holder(self.folder)
        if not holder or holder.get("pid") in (None, os.getpid()):
            return True
        if holder.get("host") != socket.gethostname():
            return False  # another host's lock: its pid cannot be checked from here
        return not _alive(int(holder["pid"]))

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.unlink(self.path)  # while still holding the lock: nobody can take it half-way
        except OSError:
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            self.release()
        except Exception:  # noqa: BLE001
            pass


def stale_note(lock: RunLock) -> str | None:
    """A line to log when ``lock`` replaced a stale lock, else None."""
    if lock.replaced is None:
        return None
    return (
        f"note: took over the stale lock of {describe(lock.replaced)} in {str(lock.folder)!r} "
        "(that process no longer runs)"
    )


__all__ = ["LOCK_NAME", "RunLock", "RunLocked", "describe", "read_holder", "stale_note"]
