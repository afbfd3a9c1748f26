"""Where the bytes of a store live: a small object interface and its implementations.

Store logic only ever talks to a :class:`Backend`. Object names are relative,
'/'-separated paths made of ``[A-Za-z0-9._-]`` components (validated here, so a
crafted name can never reach outside the store). The contract, which every
implementation passes in ``tests/test_backend.py``:

- ``create(name)`` starts a new object; its bytes become visible under ``name``
  only at ``ObjectWriter.commit()`` (durable when the backend is durable); an
  aborted or crashed writer leaves at most a ``*.partial`` object behind.
- ``put(name, data)`` atomically creates or replaces a whole object.
- ``read(name, offset, length)`` returns exactly ``length`` bytes or raises
  :class:`CorruptionError` (short object); ``FileNotFoundError`` when missing.
- ``delete(name)`` is idempotent; ``list(prefix)`` returns sorted names.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import threading
from collections import OrderedDict
from typing import Protocol, runtime_checkable

from .errors import CorruptionError, InvalidStoreError, StorageError

_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
PARTIAL_SUFFIX = ".partial"
#: a durable writer starts flushing what it has written once this much is dirty, in a
#: background thread, so that the disk works while the caller goes on encoding and the
#: fsync at commit only waits for the tail (docs/benchmarks.md, "incremental save time")
EARLY_FLUSH_BYTES = 32 * 1024 * 1024


def check_name(name: str) -> str:
    """Validate an object name; raise :class:`InvalidStoreError` on anything unsafe."""
    parts = name.split("/")
    if not name or any(not _COMPONENT.fullmatch(p) or p in (".", "..") for p in parts):
        raise InvalidStoreError(f"invalid object name {name!r}")
    return name


def fsync_path(path: str) -> None:
    """fsync a file or a directory by path (a directory: the entries it holds)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ObjectWriter(Protocol):
    """Streaming writer of one new object."""

    def write(self, data: bytes | memoryview) -> None: ...
    def tell(self) -> int: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


@runtime_checkable
class Backend(Protocol):
    """Object storage used by a store (local directory, memory, object storage)."""

    durable: bool

    def create(self, name: str) -> ObjectWriter: ...
    def put(self, name: str, data: bytes) -> None: ...
    def read(self, name: str, offset: int = 0, length: int | None = None) -> bytes: ...
    def size(self, name: str) -> int: ...
    def exists(self, name: str) -> bool: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def delete(self, name: str) -> None: ...
    def sync(self) -> None: ...
    def close(self) -> None: ...


class _LocalWriter:
    def __init__(self, backend: LocalBackend, name: str) -> None:
        self._backend = backend
        self.name = name
        self._final = backend.path(name)
        self._tmp = self._final + PARTIAL_SUFFIX
        backend.ensure_dir(os.path.dirname(self._final))
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        try:
            self._fd = os.open(self._tmp, flags, 0o644)
        except FileExistsError:
            # a writer killed mid-write left it; only the lock holder writes, so it is stale
            os.unlink(self._tmp)
            self._fd = os.open(self._tmp, flags, 0o644)
        self._pos = 0
        self._done = False
        self._flushed_to = 0
        self._flusher: threading.Thread | None = None
        self._flush_error: BaseException | None = None

    def write(self, data: bytes | memoryview) -> None:
        mv = memoryview(data).cast("B")
        while mv:
            n = os.write(self._fd, mv)
            mv = mv[n:]
            self._pos += n
        if self._backend.durable and self._pos - self._flushed_to >= EARLY_FLUSH_BYTES:
            self._flush_early()

    def _flush_early(self) -> None:
        """fsync in the background what is written so far (one flush at a time)."""
        if self._flusher is not None:
            if self._flusher.is_alive():
                return
            self._flusher.join()
            self._flusher = None
        if self._flush_error is not None:
            return  # _settle_flush reports it
        flushed_to = self._pos

        def flush() -> None:
            try:
                self._backend.fsync_fd(self._fd)
            except BaseException as exc:  # noqa: BLE001 - re-raised by _settle_flush
                self._flush_error = exc

        flusher = threading.Thread(target=flush, name="deltackpt-flush", daemon=True)
        try:
            flusher.start()
        except RuntimeError:
            return  # no thread to spare: the fsync at commit covers everything anyway
        self._flusher = flusher
        self._flushed_to = flushed_to

    def _wait_flush(self) -> None:
        # the fd must outlive a background fsync of it (a closed fd number is reused), so
        # an interrupt during the wait still waits before it propagates
        flusher = self._flusher
        if flusher is None:
            return
        try:
            flusher.join()
        except BaseException:
            flusher.join()
            raise
        finally:
            if not flusher.is_alive():
                self._flusher = None

    def _settle_flush(self) -> None:
        """Wait for a background flush; a failed one fails the backend (fsyncgate) and
        this object: on Linux, only one fsync of a file reports a write-back error."""
        self._wait_flush()
        if self._flush_error is not None:
            self._backend._fsync_failed(self._tmp, self._flush_error)
            raise self._flush_error

    def tell(self) -> int:
        return self._pos

    def commit(self) -> None:
        if self._done:
            raise ValueError("writer already finished")
        if os.path.lexists(self._final):
            self.abort()
            raise FileExistsError(errno.EEXIST, "object exists", self._final)
        try:
            self._settle_flush()
            if self._backend.durable:
                self._backend._fsync(self._fd, self._tmp)
        except BaseException:
            # its bytes may never reach the disk: never commit it (it is unreferenced)
            self._wait_flush()
            os.close(self._fd)
            self._done = True
            _unlink_quietly(self._tmp)
            raise
        os.close(self._fd)
        self._done = True
        os.rename(self._tmp, self._final)
        self._backend.mark_dir_dirty(os.path.dirname(self._final))

    def abort(self) -> None:
        if not self._done:
            self._done = True
            try:
                self._settle_flush()  # an aborted object's bytes do not matter; the disk's do
            except BaseException:  # noqa: BLE001 - recorded on the backend; abort goes on
                pass
            try:
                os.close(self._fd)
            finally:
                try:
                    os.unlink(self._tmp)
                except FileNotFoundError:
                    pass


class LocalBackend:
    """Objects as files under a root directory.

    ``durable=True`` fsyncs every committed object and, at :meth:`sync`, every
    directory an object was added to or removed from (a rename is durable only
    once its directory is fsynced).
    """

    def __init__(self, root: str | os.PathLike, durable: bool = True, max_open: int = 64) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.durable = durable
        self._dirty_dirs: set[str] = set()
        self._fds: OrderedDict[str, int] = OrderedDict()
        #: reads in progress per cached fd: an fd evicted while a read uses it is closed by
        #: the last reader (closing it under the read would let the number be reused for
        #: another pack, and the read return that pack's bytes)
        self._readers: dict[int, int] = {}
        self._evicted: set[int] = set()
        self._lock = threading.Lock()
        self._max_open = max_open
        #: set by close(): a read that close() overtook must not cache a new fd
        self._closed = False
        #: directories whose entry in their parent this instance has made durable
        self._durable_dirs: set[str] = set()
        self._unconfirmed: set[str] = set()
        #: why this instance refuses to write (an fsync failed), or None
        self._failed: str | None = None

    # -- helpers -------------------------------------------------------------
    def path(self, name: str) -> str:
        return os.path.join(self.root, *check_name(name).split("/"))

    def fsync_fd(self, fd: int) -> None:
        os.fsync(fd)

    def _fsync(self, fd: int, what: str) -> None:
        try:
            self.fsync_fd(fd)
        except OSError as exc:
            self._fsync_failed(what, exc)
            raise

    def _fsync_failed(self, what: str, exc: BaseException) -> None:
        # After a failed fsync Linux may drop the dirty pages and report success on a
        # retry ("fsyncgate"): nothing written since the last good sync can be trusted
        # again, so this instance stops writing instead of retrying.
        if isinstance(exc, OSError):
            self._failed = f"fsync of {what} failed ({exc})"

    def _check_writable(self) -> None:
        if self._failed is not None:
            raise StorageError(f"{self.root}: refusing to write: an earlier {self._failed}; "
                               "data written since the last successful sync may be lost. "
                               "Check the disk, then reopen the store (gc removes the debris)")

    def ensure_dir(self, directory: str) -> None:
        """Create ``directory`` (under the root) and any missing parents.

        A new directory's own entry lives in its parent: each parent is marked
        dirty so that :meth:`sync` makes the whole path durable, not only the file.
        """
        d = os.path.abspath(directory)
        if d in self._durable_dirs:
            return
        self._confirm_entries(d)
        if os.path.isdir(directory):
            return
        missing = []
        d = os.path.abspath(directory)
        while not os.path.isdir(d) and d != self.root and os.path.dirname(d) != d:
            missing.append(d)
            d = os.path.dirname(d)
        for d in reversed(missing):
            try:
                os.mkdir(d)
            except FileExistsError:
                if not os.path.isdir(d):
                    raise
            self.mark_dir_dirty(os.path.dirname(d))

    def _confirm_entries(self, d: str) -> None:
        """Sync the entry of ``d`` and of its parents below the root at the next :meth:`sync`.

        A directory this instance finds already there may have been made by a process that
        died before it fsynced the parent; writing into it must not trust that entry.
        """
        if not self.durable or self.root == os.path.dirname(self.root):
            return  # the whole-filesystem backend (store creation) only syncs what it makes
        while d != self.root and d.startswith(self.root + os.sep) and \
                d not in self._durable_dirs:
            self.mark_dir_dirty(os.path.dirname(d))
            with self._lock:
                self._unconfirmed.add(d)
            d = os.path.dirname(d)

    def mark_dir_dirty(self, directory: str) -> None:
        with self._lock:
            self._dirty_dirs.add(directory)

    def _fd(self, name: str) -> int:
        """An fd of ``name`` from the cache, counted as in use until :meth:`_done`."""
        with self._lock:
            if self._closed:
                raise ValueError(f"{self.root}: the backend is closed")
            fd = self._fds.get(name)
            if fd is not None:
                self._fds.move_to_end(name)
                self._readers[fd] = self._readers.get(fd, 0) + 1
                return fd
        path = self.path(name)
        # O_NONBLOCK: opening a FIFO planted in a store must not wait for a writer forever
        flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            if exc.errno != errno.EMFILE:
                raise
            # the process's fd limit: give back the cached fds no read uses, then retry
            with self._lock:
                self._max_open = max(1, min(self._max_open, len(self._fds) // 2))
                self._evict_locked()
            fd = os.open(path, flags)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise CorruptionError(f"{path}: not a regular file; a store holds only files here")
        with self._lock:
            if self._closed:
                os.close(fd)
                raise ValueError(f"{self.root}: the backend is closed")
            if name in self._fds:  # another thread won the race
                os.close(fd)
                fd = self._fds[name]
            else:
                self._fds[name] = fd
            self._readers[fd] = self._readers.get(fd, 0) + 1
            self._evict_locked()
        return fd

    def _evict_locked(self) -> None:
        while len(self._fds) > self._max_open:
            _, old = self._fds.popitem(last=False)
            self._close_locked(old)

    def _close_locked(self, fd: int) -> None:
        if self._readers.get(fd):
            self._evicted.add(fd)  # the last reader closes it
        else:
            self._readers.pop(fd, None)
            os.close(fd)

    def _done(self, fd: int) -> None:
        with self._lock:
            n = self._readers.get(fd, 0) - 1
            if n > 0:
                self._readers[fd] = n
                return
            self._readers.pop(fd, None)
            if fd in self._evicted:
                self._evicted.discard(fd)
                os.close(fd)

    def _forget(self, name: str) -> None:
        with self._lock:
            fd = self._fds.pop(name, None)
            if fd is not None:
                self._close_locked(fd)

    # -- Backend -------------------------------------------------------------
    def create(self, name: str) -> _LocalWriter:
        self._check_writable()
        return _LocalWriter(self, name)

    def put(self, name: str, data: bytes) -> None:
        w = self.create(name)
        try:
            w.write(data)
            final = w._final
            # put replaces: remove the old object only after the new one is durable
            w._settle_flush()
            if self.durable:
                self._fsync(w._fd, w._tmp)
            w._done = True
            os.close(w._fd)
            try:
                os.replace(w._tmp, final)
            except BaseException:
                _unlink_quietly(w._tmp)
                raise
            self.mark_dir_dirty(os.path.dirname(final))
        except BaseException:
            if not w._done:
                w.abort()
            raise
        self._forget(name)

    def read(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        fd = self._fd(name)
        try:
            if length is None:
                length = os.fstat(fd).st_size - offset
            if offset < 0 or length < 0:
                raise CorruptionError(f"{name}: bad byte range {offset}+{length}")
            data = os.pread(fd, length, offset)
        finally:
            self._done(fd)
        if len(data) != length:
            raise CorruptionError(
                f"{name}: short read at offset {offset} ({len(data)} of {length} bytes; "
                "the object is truncated)"
            )
        return data

    def size(self, name: str) -> int:
        return os.stat(self.path(name), follow_symlinks=False).st_size

    def exists(self, name: str) -> bool:
        return os.path.lexists(self.path(name))

    def list(self, prefix: str = "") -> list[str]:
        out = []
        base = self.root
        for dirpath, _dirnames, filenames in os.walk(base):
            rel = os.path.relpath(dirpath, base)
            rel = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            for f in filenames:
                name = rel + f
                if name.startswith(prefix):
                    out.append(name)
        return sorted(out)

    def delete(self, name: str) -> None:
        self._check_writable()
        self._forget(name)
        path = self.path(name)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        self.mark_dir_dirty(os.path.dirname(path))

    def sync(self) -> None:
        self._check_writable()
        with self._lock:
            dirs, self._dirty_dirs = self._dirty_dirs, set()
        if not self.durable:
            return
        for d in sorted(dirs):
            try:
                fd = os.open(d, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                self._fsync(fd, d)
            finally:
                os.close(fd)
        with self._lock:
            done = {c for c in self._unconfirmed if os.path.dirname(c) in dirs}
            self._unconfirmed -= done
            self._durable_dirs |= done

    def close(self) -> None:
        with self._lock:
            self._closed = True
            fds, self._fds = list(self._fds.values()), OrderedDict()
            for fd in fds:
                self._close_locked(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class _MemoryWriter:
    def __init__(self, backend: MemoryBackend, name: str) -> None:
        self._backend = backend
        self.name = name
        self._buf = bytearray()
        self._done = False
        with backend._lock:
            backend._objects[name + PARTIAL_SUFFIX] = self._buf

    def write(self, data: bytes | memoryview) -> None:
        self._buf += data

    def tell(self) -> int:
        return len(self._buf)

    def commit(self) -> None:
        with self._backend._lock:
            if self.name in self._backend._objects:
                raise FileExistsError(errno.EEXIST, "object exists", self.name)
            self._backend._objects.pop(self.name + PARTIAL_SUFFIX, None)
            self._backend._objects[self.name] = bytes(self._buf)
        self._done = True

    def abort(self) -> None:
        with self._backend._lock:
            self._backend._objects.pop(self.name + PARTIAL_SUFFIX, None)
        self._done = True


class MemoryBackend:
    """Objects in a dict; for tests and for stores that need no disk."""

    def __init__(self) -> None:
        self.durable = True
        self._objects: dict[str, bytes | bytearray] = {}
        self._lock = threading.Lock()

    def create(self, name: str) -> _MemoryWriter:
        check_name(name)
        return _MemoryWriter(self, name)

    def put(self, name: str, data: bytes) -> None:
        check_name(name)
        with self._lock:
            self._objects[name] = bytes(data)

    def read(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        check_name(name)
        with self._lock:
            try:
                obj = self._objects[name]
            except KeyError:
                raise FileNotFoundError(errno.ENOENT, "no such object", name) from None
        if length is None:
            length = len(obj) - offset
        if offset < 0 or length < 0 or offset + length > len(obj):
            raise CorruptionError(f"{name}: short read at offset {offset} "
                                  f"({max(0, len(obj) - offset)} of {length} bytes)")
        return bytes(obj[offset:offset + length])

    def size(self, name: str) -> int:
        check_name(name)
        with self._lock:
            try:
                return len(self._objects[name])
            except KeyError:
                raise FileNotFoundError(errno.ENOENT, "no such object", name) from None

    def exists(self, name: str) -> bool:
        check_name(name)
        with self._lock:
            return name in self._objects

    def list(self, prefix: str = "") -> list[str]:
        with self._lock:
            return sorted(n for n in self._objects if n.startswith(prefix))

    def delete(self, name: str) -> None:
        check_name(name)
        with self._lock:
            self._objects.pop(name, None)

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass
