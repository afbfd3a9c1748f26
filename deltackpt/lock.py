"""The single-writer lock of a local store.

An advisory ``flock`` on ``<store>/lock``: the kernel drops it when the holding
process dies, so a lock left by a killed writer needs no recovery step. The
holder's pid and host are written into the file for the error message only.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time

from .errors import StoreLockedError


class WriterLock:
    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, timeout: float = 0.0) -> None:
        """Take the lock, waiting up to ``timeout`` seconds; StoreLockedError if held."""
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise StoreLockedError(
                        f"{os.path.dirname(self.path)}: another writer holds the store lock"
                        f"{f' ({holder})' if holder else ''}; wait for it to finish, or open "
                        "the store with lock_timeout=SECONDS to wait"
                    ) from None
                time.sleep(0.05)
            except BaseException:  # e.g. ENOLCK on a filesystem without flock
                os.close(fd)
                raise
        try:
            # who holds it, for the message of the next writer: best effort (a full disk
            # must not leave the lock taken by a writer that failed to become one)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        except OSError:
            pass
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass  # the holder's text only; the lock itself must go
            finally:
                try:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                finally:
                    os.close(fd)


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""
