"""A fault-injecting file layer for the local backend: power loss, ENOSPC and EIO.

:class:`FaultOS` stands in for the ``os`` module of ``deltackpt.backend`` (install it
with :func:`install`). Every call still reaches the real filesystem, so the store
behaves exactly as usual, but each mutation under ``top`` (create, write, fsync,
rename, unlink, mkdir) is also appended to :attr:`FaultOS.ops`, and the k-th call
of a chosen kind can be made to fail with a chosen errno.

Power loss is then replayed from the log: :func:`model_at` applies ``ops[:k]`` to
an in-memory model that knows, for every file, the bytes its last successful
``fsync`` made durable and, for every directory, the entries its last ``fsync``
made durable. :func:`materialize` writes one possible post-crash disk from it:

- ``"durable"``: only what was fsynced survives (unsynced data and every create,
  rename and unlink whose directory was not fsynced are lost);
- ``"garble"``: all metadata survived but unsynced file bytes are random garbage
  (ext4 ``data=writeback`` after a crash);
- ``"random"``: per directory entry, the durable or the current version; per file,
  the durable bytes with the unsynced tail dropped, kept, garbled or cut short.

SQLite does its own I/O in C, which Python cannot intercept. The model relies on
SQLite's documented guarantee instead: with ``synchronous=FULL`` a transaction is
durable when ``COMMIT`` returns, and recovery never shows a partial one. So the
index files are snapshotted right after every commit (:meth:`FaultOS.sqlite_commit`,
hooked by :func:`install`) and a crash image gets the snapshot of the last commit
before the cut. Python-side ``fsync`` calls are not passed to the kernel by
default (the model decides what is durable; ``real_fsync=True`` passes them on).
"""

from __future__ import annotations

import errno as errno_mod
import os
import random
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

#: kinds of calls that can be made to fail
FAULT_KINDS = ("create", "write", "fsync", "mkdir", "rename")


@dataclass
class Fault:
    """Fail the ``k``-th call (1-based) of ``kind`` with ``errno``."""

    kind: str
    k: int
    errno: int = errno_mod.ENOSPC


class FaultOS:
    """A proxy of the ``os`` module that records and optionally fails mutations under ``top``."""

    def __init__(self, top: str, fault: Fault | None = None, real_fsync: bool = False) -> None:
        self._os = os
        self.top = os.path.abspath(top)
        self.ops: list[tuple] = []
        self.calls: Counter[str] = Counter()
        self.fault = fault
        #: (kind, path, node id) of the injected failure, once it happened
        self.injected: tuple[str, str, int | None] | None = None
        self.real_fsync = real_fsync
        self._ids: dict[str, int] = {self.top: 0}
        self._next_id = 1
        self._fds: dict[int, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._os, name)

    # -- bookkeeping -----------------------------------------------------------
    def _rel(self, path: str) -> str | None:
        p = os.path.abspath(path)
        if p == self.top:
            return ""
        if p.startswith(self.top + os.sep):
            return p[len(self.top) + 1:]
        return None

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def _maybe_fail(self, kind: str, path: str, node: int | None) -> None:
        self.calls[kind] += 1
        f = self.fault
        if f is not None and f.kind == kind and self.calls[kind] == f.k:
            self.injected = (kind, path, node)
            self.ops.append(("failed", kind, node, path))
            raise OSError(f.errno, os.strerror(f.errno), path)

    def mark(self, *what: Any) -> None:
        """Record a fact for the oracle (e.g. ``mark("saved", 3)`` after save returned)."""
        self.ops.append(("mark", *what))

    def sqlite_commit(self, db_path: str) -> None:
        """Snapshot the index files: SQLite (synchronous=FULL) made this commit durable."""
        rel = self._rel(db_path)
        if rel is None:
            return
        files = {}
        for suffix in ("", "-wal"):
            try:
                with open(db_path + suffix, "rb") as f:
                    files[os.path.basename(db_path) + suffix] = f.read()
            except FileNotFoundError:
                pass
        self.ops.append(("sqlite", os.path.dirname(rel), files))

    # -- the intercepted calls ---------------------------------------------------
    def open(self, path: str, flags: int, mode: int = 0o777, *, dir_fd: Any = None) -> int:
        p = os.path.abspath(path)
        rel = self._rel(p)
        creating = bool(flags & os.O_CREAT) and rel is not None and p not in self._ids
        if creating:
            self._maybe_fail("create", p, None)
        fd = self._os.open(path, flags, mode)
        if rel is not None:
            if creating:
                node = self._ids[p] = self._new_id()
                self.ops.append(("create", rel, node))
            node = self._ids.get(p)
            if node is None:  # there before the log began: tracked from now on
                node = self._ids[p] = self._new_id()
            self._fds[fd] = node
        return fd

    def write(self, fd: int, data: Any) -> int:
        node = self._fds.get(fd)
        if node is None:
            return self._os.write(fd, data)
        self._maybe_fail("write", f"fd {fd}", node)
        pos = self._os.lseek(fd, 0, os.SEEK_CUR)
        n = self._os.write(fd, data)
        self.ops.append(("write", node, pos, bytes(memoryview(data).cast("B")[:n])))
        return n

    def fsync(self, fd: int) -> None:
        node = self._fds.get(fd)
        if node is None:
            self._os.fsync(fd)
            return
        self._maybe_fail("fsync", f"fd {fd}", node)
        if self.real_fsync:
            self._os.fsync(fd)
        self.ops.append(("fsync", node))

    def close(self, fd: int) -> None:
        self._fds.pop(fd, None)
        self._os.close(fd)

    def mkdir(self, path: str, mode: int = 0o777, *, dir_fd: Any = None) -> None:
        p = os.path.abspath(path)
        rel = self._rel(p) or None  # top itself counts as existing and durable
        if rel is not None:
            self._maybe_fail("mkdir", p, None)
        self._os.mkdir(path, mode)
        if rel is not None:
            node = self._ids[p] = self._new_id()
            self.ops.append(("mkdir", rel, node))

    def _move(self, src: str, dst: str, fn: Any) -> None:
        s, d = os.path.abspath(src), os.path.abspath(dst)
        srel, drel = self._rel(s), self._rel(d)
        node = self._ids.get(s)
        if srel is not None:
            self._maybe_fail("rename", d, node)
        fn(src, dst)
        if srel is not None and drel is not None and node is not None:
            del self._ids[s]
            self._ids[d] = node
            self.ops.append(("rename", srel, drel, node))

    def rename(self, src: str, dst: str) -> None:
        self._move(src, dst, self._os.rename)

    def replace(self, src: str, dst: str) -> None:
        self._move(src, dst, self._os.replace)

    def unlink(self, path: str, *, dir_fd: Any = None) -> None:
        p = os.path.abspath(path)
        self._os.unlink(path)
        rel = self._rel(p)
        if rel is not None and self._ids.pop(p, None) is not None:
            self.ops.append(("unlink", rel))

    remove = unlink

    # -- queries over the log ------------------------------------------------------
    def cut_points(self) -> list[int]:
        """Every place a power cut is tested: before each fsync, after each SQLite commit,
        and at the end of the log."""
        cuts = set()
        for i, op in enumerate(self.ops):
            if op[0] == "fsync":
                cuts.add(i)
            elif op[0] == "sqlite":
                cuts.add(i + 1)
        cuts.add(len(self.ops))
        return sorted(cuts)

    def marks(self, k: int) -> list[tuple]:
        return [op[1:] for op in self.ops[:k] if op[0] == "mark"]


@contextmanager
def install(monkeypatch: Any, top: str, fault: Fault | None = None, real_fsync: bool = False):
    """Put a :class:`FaultOS` under ``deltackpt.backend`` and snapshot the index at commits."""
    import deltackpt.backend
    import deltackpt.index

    os.makedirs(top, exist_ok=True)
    fos = FaultOS(top, fault, real_fsync)
    monkeypatch.setattr(deltackpt.backend, "os", fos)
    original = deltackpt.index.Index.write

    @contextmanager
    def write(self):  # type: ignore[no-untyped-def]
        with original(self) as conn:
            yield conn
        fos.sqlite_commit(self.path)

    monkeypatch.setattr(deltackpt.index.Index, "write", write)
    try:
        yield fos
    finally:
        monkeypatch.undo()


# -- the power-loss model ---------------------------------------------------------------
@dataclass
class _Node:
    kind: str  # "d" | "f"
    data: bytearray = field(default_factory=bytearray)
    durable_data: bytes = b""
    entries: dict[str, int] = field(default_factory=dict)
    durable_entries: dict[str, int] = field(default_factory=dict)


@dataclass
class Model:
    """What the page cache holds (current) and what is durable, after ``ops[:k]``."""

    nodes: dict[int, _Node]
    sqlite: tuple[str, dict[str, bytes]] | None

    def _lookup(self, rel: str) -> tuple[_Node, str]:
        parts = rel.split(os.sep)
        node = self.nodes[0]
        for p in parts[:-1]:
            node = self.nodes[node.entries[p]]
        return node, parts[-1]


def model_at(ops: list[tuple], k: int) -> Model:
    """Replay ``ops[:k]``: the state of the disk when power is cut before op ``k``."""
    m = Model({0: _Node("d")}, None)
    for op in ops[:k]:
        kind = op[0]
        if kind in ("create", "mkdir"):
            _, rel, node = op
            m.nodes[node] = _Node("f" if kind == "create" else "d")
            parent, name = m._lookup(rel)
            parent.entries[name] = node
        elif kind == "write":
            _, node, pos, data = op
            buf = m.nodes[node].data
            if len(buf) < pos:
                buf.extend(bytes(pos - len(buf)))
            buf[pos:pos + len(data)] = data
        elif kind == "fsync":
            n = m.nodes.get(op[1])
            if n is None:
                continue  # a file or directory that predates the log
            if n.kind == "f":
                n.durable_data = bytes(n.data)
            else:
                n.durable_entries = dict(n.entries)
        elif kind == "rename":
            _, srel, drel, node = op
            sp, sname = m._lookup(srel)
            dp, dname = m._lookup(drel)
            sp.entries.pop(sname, None)
            dp.entries[dname] = node
        elif kind == "unlink":
            parent, name = m._lookup(op[1])
            parent.entries.pop(name, None)
        elif kind == "sqlite":
            m.sqlite = (op[1], op[2])
    return m


MODES = ("durable", "garble", "random")


def _content(n: _Node, mode: str, rng: random.Random) -> bytes:
    durable, current = n.durable_data, bytes(n.data)
    if current == durable or not current.startswith(durable):
        # nothing unsynced, or rewritten in place (never done by the store): keep the durable copy
        return durable if mode != "garble" or current == durable else current
    tail = len(current) - len(durable)
    garbage = bytes(rng.getrandbits(8) for _ in range(min(tail, 4096))) * (tail // 4096 + 1)
    if mode == "durable":
        return durable
    if mode == "garble":
        return durable + garbage[:tail]
    choice = rng.randrange(4)
    if choice == 0:
        return durable
    if choice == 1:
        return current
    if choice == 2:
        return durable + garbage[:tail]
    return current[:len(durable) + rng.randrange(tail)]


def materialize(m: Model, dest: str, mode: str, rng: random.Random) -> None:
    """Write one post-power-loss image of ``top`` into the (empty) directory ``dest``."""
    os.makedirs(dest, exist_ok=True)

    def entries_of(n: _Node) -> dict[str, int]:
        if mode == "durable":
            return n.durable_entries
        if mode == "garble":
            return n.entries
        out = {}
        for name in sorted(set(n.entries) | set(n.durable_entries)):
            node = (n.entries if rng.random() < 0.5 else n.durable_entries).get(name)
            if node is not None:
                out[name] = node
        return out

    def build(n: _Node, path: str) -> None:
        for name, node in entries_of(n).items():
            child = m.nodes[node]
            target = os.path.join(path, name)
            if child.kind == "d":
                os.mkdir(target)
                build(child, target)
            else:
                with open(target, "wb") as f:
                    f.write(_content(child, mode, rng))

    build(m.nodes[0], dest)
    if m.sqlite is not None:
        where, files = m.sqlite
        root = os.path.join(dest, where)
        # SQLite made its files' directory entries durable (it fsyncs the directory when it
        # creates the WAL); their directory is the store root, which must therefore exist
        assert os.path.isdir(root), f"SQLite committed but the store root {where!r} is lost"
        for name, data in files.items():
            with open(os.path.join(root, name), "wb") as f:
                f.write(data)
