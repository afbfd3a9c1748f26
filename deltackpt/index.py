"""The SQLite index: steps, their entries and block lists, blocks, packs.

The index is the commit point of a store: a step exists exactly when its row in
``steps`` is committed. The schema below is normative (docs/format.md, "Index");
changes are named migrations applied in order on open.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import sqlite_utils

from .errors import CorruptionError, FormatVersionError

#: SQLite's primary result codes for a damaged file: SQLITE_CORRUPT, SQLITE_NOTADB
_CORRUPT_CODES = (11, 26)


def is_corruption(exc: sqlite3.Error) -> bool:
    """Whether ``exc`` is SQLite reporting a damaged database file."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in _CORRUPT_CODES:
        return True
    if code is None and type(exc) is sqlite3.DatabaseError:
        return True  # Python 3.10 exposes no error codes
    # deltackpt only queries its own schema: a table or column it made that is gone means
    # a damaged schema record, not a programming error
    return isinstance(exc, sqlite3.OperationalError) and str(exc).startswith(
        ("no such table", "no such column", "malformed database schema",
         "Could not decode to UTF-8"))  # a flipped bit in a TEXT value

SCHEMA_VERSION = 2

SCHEMA_V1 = """
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE packs (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE blocks (
    id BLOB PRIMARY KEY,            -- 16-byte block id
    pack_id INTEGER NOT NULL REFERENCES packs(id),
    offset INTEGER NOT NULL,        -- of the frame within the pack
    length INTEGER NOT NULL,        -- of the frame
    raw_len INTEGER NOT NULL,
    codec TEXT NOT NULL,            -- informational, e.g. 'xor>group4>zstd1'
    base BLOB,                      -- id of the delta base block, NULL for a keyframe
    depth INTEGER NOT NULL,         -- delta chain length to a keyframe (0 = keyframe)
    first_step INTEGER NOT NULL     -- the step whose save wrote this block
) WITHOUT ROWID;
CREATE INDEX blocks_pack ON blocks(pack_id);
CREATE INDEX blocks_first_step ON blocks(first_step);
CREATE TABLE steps (
    step INTEGER PRIMARY KEY,
    created_at REAL NOT NULL,
    metrics TEXT NOT NULL,          -- JSON object
    tags TEXT NOT NULL,             -- JSON array of str
    note TEXT,
    tree TEXT NOT NULL,             -- JSON state tree (deltackpt/flatten.py)
    logical_bytes INTEGER NOT NULL,
    written_bytes INTEGER NOT NULL,
    new_chunks INTEGER NOT NULL,
    total_chunks INTEGER NOT NULL,
    parent INTEGER,                 -- step whose blocks served as delta bases
    manifest TEXT NOT NULL          -- object name of the step's manifest
);
CREATE TABLE entries (
    step INTEGER NOT NULL REFERENCES steps(step) ON DELETE CASCADE,
    idx INTEGER NOT NULL,           -- entry index referenced by the tree
    path TEXT NOT NULL,
    kind TEXT NOT NULL,             -- tensor | parameter | ndarray | bytes
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,            -- JSON array of int
    nbytes INTEGER NOT NULL,
    block_size INTEGER NOT NULL,
    blocks BLOB NOT NULL,           -- concatenated 16-byte block ids, in order
    PRIMARY KEY (step, idx)
) WITHOUT ROWID;
CREATE INDEX entries_path ON entries(path, step);
"""

#: schema 2: per-step summaries for stats and what-if (deltackpt/summaries.py)
MIGRATION_V1_V2 = """
ALTER TABLE blocks ADD COLUMN seq INTEGER;  -- small integer name of the block, unique
CREATE UNIQUE INDEX blocks_seq ON blocks(seq);
CREATE TABLE step_stats (
    step INTEGER PRIMARY KEY REFERENCES steps(step) ON DELETE CASCADE,
    components TEXT NOT NULL,       -- JSON {component: [logical_bytes, written_bytes]}
    new_raw_bytes INTEGER NOT NULL, -- raw bytes of the blocks counted in written_bytes
    refs BLOB NOT NULL              -- distinct blocks.seq referenced, ascending, u64 LE
);
CREATE TRIGGER blocks_need_seq BEFORE INSERT ON blocks WHEN NEW.seq IS NULL
BEGIN SELECT RAISE(ABORT, 'blocks.seq is required by index schema 2: upgrade deltackpt'); END;
CREATE TRIGGER entries_void_summary AFTER DELETE ON entries
BEGIN DELETE FROM step_stats WHERE step = OLD.step; END;
"""

#: migrations[v] upgrades a schema at version v to v + 1: DDL, then the data step (if any)
MIGRATIONS: dict[int, str] = {1: MIGRATION_V1_V2}


def _migrate_data(conn: sqlite3.Connection, version: int) -> None:
    if version == 1:
        from .summaries import migrate_v1

        migrate_v1(conn)


class Index:
    """One SQLite connection to a store's index, serialised by a lock.

    Reads run in their own transaction (:meth:`read`), so a reader sees a
    consistent snapshot while a writer commits; the writer's commit is the
    ``with index.write():`` block.
    """

    def __init__(self, path: str, durable: bool = True, readonly: bool = False) -> None:
        self.path = path
        if path != ":memory:" and os.path.exists(path) and not os.path.isfile(path):
            # SQLite fails on a FIFO or directory with a bare "disk I/O error"
            root = os.path.dirname(os.path.abspath(path))
            raise CorruptionError(f"{path}: the index is not a regular file; rebuild it with "
                                  f"`deltackpt reindex {root}`")
        self.lock = threading.RLock()
        self._durable, self._readonly = durable, readonly
        #: connections to index files that `deltackpt reindex` replaced, closed on close()
        self._retired: list[sqlite3.Connection] = []
        try:
            with self.guard():
                self._connect(path, durable, readonly)
        except BaseException:
            if hasattr(self, "conn"):
                self.conn.close()
            raise
        self._identity = self._file_identity()

    def _file_identity(self) -> tuple[int, int] | None:
        if self.path == ":memory:":
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def _follow_replacement(self) -> None:
        """Reconnect when the index file was replaced since it was opened (``deltackpt
        reindex`` renames the old file aside): a connection to the old file would read
        stale steps and commit where no reader looks, and a gc planned from it would delete
        what the new index holds. Called with ``self.lock`` held."""
        if self._identity is None or self.conn.in_transaction:
            return
        now = self._file_identity()
        if now is None or now == self._identity:
            return  # missing: reindex is between its two renames; keep the old one meanwhile
        old, old_db = self.conn, self.db
        try:
            self._connect(self.path, self._durable, self._readonly)
            self.check_version()
        except BaseException:
            if self.conn is not old:
                self.conn.close()
            self.conn, self.db = old, old_db  # still on the old file: the next call retries
            raise
        self._identity = now
        self._retired.append(old)

    def _connect(self, path: str, durable: bool, readonly: bool) -> None:
        uri = path != ":memory:"
        target = f"file:{path}?mode=ro" if readonly and uri else path
        self.conn = sqlite3.connect(target, uri=readonly and uri, check_same_thread=False,
                                    isolation_level=None, timeout=60.0)
        self.db = sqlite_utils.Database(self.conn)
        self.conn.execute("PRAGMA busy_timeout = 60000")
        if path != ":memory:" and not readonly:
            self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
        self.conn.execute("PRAGMA foreign_keys = ON")

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Raise SQLite's "malformed"/"not a database" errors as :class:`CorruptionError`
        naming the index file and the way out (``deltackpt reindex``)."""
        try:
            yield
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
            # sqlite3 raises UnicodeDecodeError when a damaged schema garbles its own message
            if isinstance(exc, sqlite3.DatabaseError) and not is_corruption(exc):
                raise
            root = os.path.dirname(os.path.abspath(self.path))
            raise CorruptionError(
                f"{self.path}: the index is damaged ({exc}); the packs and manifests hold "
                f"every committed step: rebuild it with `deltackpt reindex {root}`") from exc

    # -- schema ---------------------------------------------------------------
    def schema_version(self) -> int:
        with self.lock, self.guard():
            if "meta" not in self.db.table_names():
                return 0
            row = self.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            return int(row[0]) if row else 0

    def create_or_migrate(self, meta: dict[str, str]) -> None:
        """Create the schema on a new index, or migrate an older one, in one transaction."""
        with self.write():
            version = self.schema_version()
            if version == 0:
                for stmt in _statements(SCHEMA_V1):
                    self.conn.execute(stmt)
                version = 1
                for k, v in meta.items():
                    self.conn.execute("INSERT INTO meta(key, value) VALUES (?, ?)", (k, v))
            if version > SCHEMA_VERSION:
                raise FormatVersionError(
                    f"{self.path}: index schema version {version} is newer than this "
                    f"deltackpt supports ({SCHEMA_VERSION}); upgrade deltackpt"
                )
            while version < SCHEMA_VERSION:
                for stmt in _statements(MIGRATIONS[version]):
                    self.conn.execute(stmt)
                _migrate_data(self.conn, version)
                version += 1
            self.conn.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)",
                (str(version),),
            )

    def check_version(self) -> None:
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise FormatVersionError(
                f"{self.path}: index schema version {version} is newer than this deltackpt "
                f"supports ({SCHEMA_VERSION}); upgrade deltackpt"
            )

    # -- transactions ---------------------------------------------------------
    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """An IMMEDIATE transaction: committed on success, rolled back on error."""
        with self.lock, self.guard():
            self._follow_replacement()
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            try:
                self.conn.execute("COMMIT")
            except BaseException:
                # a failed COMMIT (disk full, I/O error) may leave the transaction open, and
                # every later BEGIN would then fail: roll back what SQLite has not already
                if self.conn.in_transaction:
                    try:
                        self.conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                raise

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: a consistent snapshot of the index."""
        with self.lock, self.guard():
            self._follow_replacement()
            self.conn.execute("BEGIN")
            try:
                yield self.conn
            finally:
                self.conn.execute("COMMIT")

    def query(self, sql: str, params: Iterable = ()) -> list[tuple]:
        with self.lock, self.guard():
            self._follow_replacement()
            return self.conn.execute(sql, tuple(params)).fetchall()

    def close(self) -> None:
        with self.lock:
            self.conn.close()
            for conn in self._retired:
                conn.close()
            self._retired.clear()


def _statements(script: str) -> list[str]:
    out, buf = [], []
    for line in script.splitlines():
        line = line.split("--", 1)[0].rstrip()
        if not line:
            continue
        buf.append(line)
        if line.endswith(";"):
            out.append("\n".join(buf))
            buf = []
    return out


def chunked(items: list, size: int = 500) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
