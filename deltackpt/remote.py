"""Stores in object storage: ``deltackpt.open("s3://bucket/prefix")`` and other fsspec URLs.

A remote store holds exactly the objects of a local store (docs/format.md §4–§11) under a
prefix: ``deltackpt.json``, ``packs/…``, ``manifests/…``, plus ``lease.json`` while a writer
holds the lease. The **manifests are the source of truth**: a step is committed once its
manifest object exists (packs are written first). Each process keeps a local SQLite index
(same schema, §13) as a *cache* under ``cache_dir`` (default
``$XDG_CACHE_HOME/deltackpt/<hash of URL>/``) and brings it up to date from the object
listing on open, when it becomes the writer, on :meth:`RemoteStore.refresh`, and when a
load finds a pack gone. docs/object-storage.md is the user's guide.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import socket
import sqlite3
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .errors import (
    CorruptionError,
    DeltackptError,
    FormatVersionError,
    InvalidStoreError,
    StorageError,
    StoreLockedError,
)
from .fsspec_backend import (
    DEFAULT_CONCURRENCY,
    DEFAULT_PART_SIZE,
    DEFAULT_READAHEAD,
    ConditionFailedError,
    FsspecBackend,
)
from .hashing import unpack_ids
from .index import chunked
from .packs import MANIFEST_PREFIX, PACK_PREFIX, decode_manifest, manifest_name, scan_pack
from .reindex import (
    CACHE_MANIFESTS_SQL,
    CacheChanged,
    ReindexResult,
    ingest_partial,
    is_partial,
    rebuild_into,
    record_manifest_etags,
)
from .store import (
    CONFIG_NAME,
    INDEX_NAME,
    IndexDisagreesError,
    Store,
    StoreConfig,
    _new_config,
    existing_config,
)

LEASE_NAME = "lease.json"
#: times a refresh starts over when another process commits to the shared cache meanwhile
_REFRESH_ATTEMPTS = 8
DEFAULT_LEASE_TTL = 60.0
#: packs of a remote store rotate at this size (a local store's: 512 MiB), so that each is
#: one PUT sent in the background while the save encodes the next (docs/object-storage.md)
DEFAULT_REMOTE_PACK_SIZE = 16 * 1024 * 1024
#: URL schemes handed to fsspec (``memory://`` alone stays deltackpt's MemoryBackend)
_URL = re.compile(r"^([a-z][a-z0-9+.-]*)://(.*)$", re.IGNORECASE)  # schemes ignore case


def is_remote_url(path: Any) -> bool:
    """True for ``s3://…``, ``gs://…``, ``fsspec+memory://…`` etc.; False for local paths
    and for ``memory://`` (the in-process MemoryBackend)."""
    if not isinstance(path, str):
        return False
    m = _URL.match(path)
    return bool(m) and m.group(1).lower() not in ("memory", "file")


def normalize_url(url: str) -> str:
    """``url`` with its scheme in lower case (``S3://b/x`` is ``s3://b/x``)."""
    m = _URL.match(url)
    return f"{m.group(1).lower()}://{m.group(2)}" if m else url


def default_cache_dir(url: str) -> str:
    """``$XDG_CACHE_HOME/deltackpt/<sha256(url)[:16]>`` (``~/.cache`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "deltackpt", hashlib.sha256(url.encode()).hexdigest()[:16])


def backend_for_url(url: str, *, storage_options: dict[str, Any] | None = None,
                    filesystem: Any = None, part_size: int = DEFAULT_PART_SIZE,
                    max_concurrency: int = DEFAULT_CONCURRENCY,
                    readahead: int = DEFAULT_READAHEAD) -> FsspecBackend:
    """The :class:`FsspecBackend` of a store URL. ``fsspec+PROTO://path`` names any fsspec
    protocol (``fsspec+memory://bucket/x`` is fsspec's in-memory filesystem)."""
    url = normalize_url(url)
    m = _URL.match(url)
    if not m or not is_remote_url(url):
        raise InvalidStoreError(f"{url}: not an object-storage URL")
    scheme, rest = m.group(1), m.group(2).strip("/")
    proto = scheme[len("fsspec+"):] if scheme.startswith("fsspec+") else scheme
    if not rest:
        raise InvalidStoreError(f"{url}: the URL names no bucket or path")
    if proto in ("file", "local") and filesystem is None:
        # the object-store backend assumes flat keys (no directories to create, listings
        # relative to a bucket): a local directory is a local store, with its own backend
        raise InvalidStoreError(f"{url}: a local directory is opened by its path "
                                f"(deltackpt.open('/{rest}')), not through fsspec")
    if filesystem is None:
        try:
            import fsspec
        except ImportError:
            raise InvalidStoreError(f"{url}: object storage needs fsspec: pip install "
                                    "'deltackpt[s3]'") from None
        try:
            filesystem = fsspec.filesystem(proto, **(storage_options or {}))
        except (ImportError, ValueError) as exc:
            raise InvalidStoreError(f"{url}: no fsspec filesystem for {proto!r}: {exc} "
                                    "(for s3:// install 'deltackpt[s3]')") from None
    return FsspecBackend(filesystem, rest, url=f"{scheme}://{rest}", part_size=part_size,
                         max_concurrency=max_concurrency, readahead=readahead)


# -- the writer lease ------------------------------------------------------------------
class Lease:
    """Exclusive right to mutate a remote store: the object ``lease.json``.

    Taken with a conditional create (``If-None-Match: *``); an expired lease is taken over
    with a compare-and-swap on its ETag (``If-Match``), renewed the same way by a
    background thread every ``ttl / 3`` seconds, and deleted (``If-Match``) on release.
    Each manifest write or delete first checks the lease is still ours and not about to
    expire. What this does not give (docs/object-storage.md): fencing — a writer frozen for
    longer than ``ttl`` between that check and its request can still write once.
    """

    def __init__(self, backend: FsspecBackend, ttl: float = DEFAULT_LEASE_TTL,
                 on_acquire: Any = None) -> None:
        if ttl < 3:
            raise ValueError("lease_ttl must be at least 3 seconds")
        self.backend = backend
        self.ttl = float(ttl)
        self.owner = uuid.uuid4().hex
        self.acquired_at: float | None = None
        self._on_acquire = on_acquire
        self._etag: str | None = None
        self._expires = 0.0
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def held(self) -> bool:
        return self.acquired_at is not None and self._lost is None

    def _body(self, now: float) -> bytes:
        return json.dumps({"owner": self.owner, "host": socket.gethostname(),
                           "pid": os.getpid(), "acquired_at": self.acquired_at or now,
                           "expires_at": now + self.ttl}).encode()

    def acquire(self, timeout: float = 0.0) -> None:
        """Take the lease, waiting up to ``timeout`` seconds; :class:`StoreLockedError`
        naming the holder when another live writer has it."""
        if self.held:
            return
        self.release()  # a lost lease: forget it before trying again
        deadline = time.monotonic() + timeout
        while True:
            now = time.time()
            try:
                etag = self.backend.put_if_absent(LEASE_NAME, self._body(now))
                break
            except FileExistsError:
                pass
            try:
                data, old = self.backend.read_tagged(LEASE_NAME)
            except FileNotFoundError:
                continue  # released in between: try again
            holder = _parse_lease(data)
            if holder.get("expires_at", 0.0) < now:
                try:
                    etag = self.backend.put_if_match(LEASE_NAME, self._body(now), old)
                    break
                except ConditionFailedError:
                    continue  # someone else took it over first
            if time.monotonic() >= deadline:
                left = holder.get("expires_at", 0.0) - now
                raise StoreLockedError(
                    f"{self.backend.url}: another writer holds the lease "
                    f"({holder.get('host', '?')} pid {holder.get('pid', '?')}, "
                    f"expires in {left:.0f} s unless renewed); wait for it to finish, or open "
                    "the store with lock_timeout=SECONDS (Python) to wait")
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
        with self._lock:
            self._etag, self._expires, self._lost = etag, now + self.ttl, None
            self.acquired_at = now
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, daemon=True,
                                        name="deltackpt-lease")
        self._thread.start()
        if self._on_acquire is not None:
            try:
                self._on_acquire()
            except BaseException:
                self.release()
                raise

    def _renew(self) -> None:
        with self._lock:
            if self._lost is not None or self.acquired_at is None:
                return
            now = time.time()
            try:
                self._etag = self.backend.put_if_match(LEASE_NAME, self._body(now), self._etag)
                self._expires = now + self.ttl
            except ConditionFailedError:
                self._lost = "another writer took the lease over (it had expired)"
            except OSError as exc:
                if time.time() >= self._expires:
                    self._lost = f"it expired while renewal failed ({exc})"

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            self._renew()
            if self._lost is not None:
                return

    def check(self) -> None:
        """Raise :class:`StoreLockedError` unless the lease is ours for at least a third of
        its ttl (renewing now when the background renewal is late)."""
        if self.acquired_at is None:
            raise StoreLockedError(f"{self.backend.url}: writing without the writer lease")
        if self._lost is None and time.time() > self._expires - self.ttl / 3:
            self._renew()
        if self._lost is not None:
            raise StoreLockedError(f"{self.backend.url}: the writer lease was lost: "
                                   f"{self._lost}; nothing more is committed by this writer")
        if time.time() > self._expires - self.ttl / 3:
            raise StoreLockedError(f"{self.backend.url}: the writer lease cannot be renewed; "
                                   "refusing to commit")

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours. Idempotent."""
        self._stop.set()
        t, self._thread = self._thread, None
        if t is not None and t is not threading.current_thread():
            t.join()
        with self._lock:
            held, etag, lost = self.acquired_at is not None, self._etag, self._lost
            self.acquired_at, self._etag = None, None
        if held and lost is None:
            try:
                # no ETags off S3 (gs://, az://, fsspec+memory://): delete the lease only
                # while it still names this owner (check-then-delete, as its creation)
                if etag is not None or _parse_lease(
                        self.backend.read(LEASE_NAME)).get("owner") == self.owner:
                    self.backend.delete_if_match(LEASE_NAME, etag)
            except (ConditionFailedError, OSError):
                pass  # taken over or unreachable: it expires on its own


def _parse_lease(data: bytes) -> dict[str, Any]:
    try:
        info = json.loads(data)
        if isinstance(info, dict) and isinstance(info.get("expires_at"), (int, float)):
            return info
    except ValueError:
        pass
    return {"expires_at": 0.0}  # unreadable: treat as expired rather than lock forever


# -- the local cache ---------------------------------------------------------------------
_SCAN_SCHEMA = """
CREATE TABLE IF NOT EXISTS scanned (name TEXT PRIMARY KEY, size INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS frames (
    pack TEXT NOT NULL, offset INTEGER NOT NULL, id BLOB NOT NULL, length INTEGER NOT NULL,
    raw_len INTEGER NOT NULL, codec TEXT NOT NULL, base BLOB, PRIMARY KEY (pack, offset)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS manifests (name TEXT PRIMARY KEY, etag TEXT, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS written (
    pack TEXT PRIMARY KEY, step INTEGER NOT NULL, owner TEXT NOT NULL
);
"""


class _ScanCache:
    """Frame headers of scanned packs (packs are immutable, so a scan never goes stale)
    and manifest bytes by ETag; a file of its own beside the index cache."""

    def __init__(self, path: str) -> None:
        self.lock = threading.Lock()
        try:
            self.conn = self._open(path)
        except sqlite3.DatabaseError:
            # a cache of what packs hold, nothing else: a damaged one is set aside and
            # refilled by the next scans (as a damaged index cache is rebuilt)
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(path + suffix, f"{path}{suffix}.broken-{int(time.time())}")
            self.conn = self._open(path)

    @staticmethod
    def _open(path: str) -> sqlite3.Connection:
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                               timeout=60.0)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.executescript(_SCAN_SCHEMA)
        except BaseException:
            conn.close()
            raise
        return conn

    def get(self, names: list[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        with self.lock:
            for name in names:
                row = self.conn.execute("SELECT size FROM scanned WHERE name=?",
                                        (name,)).fetchone()
                if row is not None:
                    out[name] = (row[0], [tuple(r) for r in self.conn.execute(
                        "SELECT id, offset, length, raw_len, codec, base FROM frames "
                        "WHERE pack=? ORDER BY offset", (name,))])
        return out

    def put(self, name: str, size: int, frames: list[tuple]) -> None:
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("INSERT OR REPLACE INTO scanned(name, size) VALUES (?, ?)",
                              (name, size))
            self.conn.executemany(
                "INSERT OR REPLACE INTO frames(pack, offset, id, length, raw_len, codec, base) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(name, off, bid, ln, raw, cd, base) for bid, off, ln, raw, cd, base in frames])
            self.conn.execute("COMMIT")

    def forget_missing(self, present: set[str]) -> None:
        with self.lock:
            gone = [r[0] for r in self.conn.execute("SELECT name FROM scanned")
                    if r[0] not in present]
            for name in gone:
                self.conn.execute("DELETE FROM frames WHERE pack=?", (name,))
                self.conn.execute("DELETE FROM scanned WHERE name=?", (name,))
                self.conn.execute("DELETE FROM written WHERE pack=?", (name,))

    def put_written(self, step: int, owner: str, packs: dict[str, tuple[int, list[tuple]]],
                    ) -> None:
        """Record the packs ``owner`` (a DCP rank's index file) wrote for ``step``, with their
        frames, replacing what it recorded for ``step`` before (a failed attempt): no scan
        reads them back, and :meth:`RemoteStore.catch_up_for_rank` locates the rank's
        blocks of ``step`` from them once the step is committed."""
        for name, (size, frames) in packs.items():
            self.put(name, size, frames)
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                self.conn.execute("DELETE FROM written WHERE step=? AND owner=?", (step, owner))
                self.conn.executemany(
                    "INSERT OR REPLACE INTO written(pack, step, owner) VALUES (?, ?, ?)",
                    [(name, step, owner) for name in packs])
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    def written_frames(self, step: int, owner: str,
                       ) -> tuple[dict[bytes, tuple], dict[str, int]]:
        """Frames of the packs ``owner`` recorded for ``step``, id -> (pack, offset,
        frame_len, raw_len, codec, base), and those packs' sizes."""
        with self.lock:
            names = [r[0] for r in self.conn.execute(
                "SELECT pack FROM written WHERE step=? AND owner=? ORDER BY rowid",
                (step, owner))]
        found = self.get(names)
        frames: dict[bytes, tuple] = {}
        sizes: dict[str, int] = {}
        for name in names:
            if name in found:
                size, listed = found[name]
                sizes[name] = size
                for bid, off, ln, raw, codec, base in listed:
                    frames[bid] = (name, off, ln, raw, codec, base)
        return frames, sizes

    def forget_written_before(self, step: int, owner: str) -> None:
        with self.lock:
            self.conn.execute("DELETE FROM written WHERE step < ? AND owner=?", (step, owner))

    def manifest(self, name: str, etag: str | None) -> bytes | None:
        if etag is None:
            return None
        with self.lock:
            row = self.conn.execute("SELECT etag, data FROM manifests WHERE name=?",
                                    (name,)).fetchone()
        return row[1] if row is not None and row[0] == etag else None

    def put_manifest(self, name: str, etag: str | None, data: bytes) -> None:
        if etag is not None:
            with self.lock:
                self.conn.execute("INSERT OR REPLACE INTO manifests(name, etag, data) "
                                  "VALUES (?, ?, ?)", (name, etag, data))

    def close(self) -> None:
        with self.lock:
            self.conn.close()


class _Listed:
    """A backend whose ``list`` answers from one listing taken at the start of a refresh."""

    def __init__(self, backend: FsspecBackend, listing: dict[str, dict[str, Any]]) -> None:
        self._backend = backend
        self._listing = listing

    def list(self, prefix: str = "") -> list[str]:
        return [n for n in self._listing if n.startswith(prefix)]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)


class _HeaderReads:
    """What :func:`scan_pack` reads through: exact ranged GETs of frame headers, switching
    to readahead windows only in packs of small frames (many headers per window)."""

    def __init__(self, backend: FsspecBackend) -> None:
        self._backend = backend
        self._last: dict[str, int] = {}
        self._lock = threading.Lock()

    def read(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        with self._lock:
            prev = self._last.get(name)
            self._last[name] = offset
        small = prev is not None and 0 < offset - prev <= 256 * 1024
        return self._backend.read(name, offset, length, window=small)

    def size(self, name: str) -> int:
        return self._backend.size(name)


class RemoteStore(Store):
    """A :class:`~deltackpt.store.Store` whose objects are in object storage and whose
    index is a local cache kept in step with the store's manifests. Same API."""

    def __init__(self, backend: FsspecBackend, config: StoreConfig, cache_dir: str, *,
                 threads: int | None = None, lock_timeout: float = 0.0,
                 lease_ttl: float = DEFAULT_LEASE_TTL, base_cache_bytes: int = 1 << 30,
                 pack_size: int = DEFAULT_REMOTE_PACK_SIZE, scan_threads: int = 16,
                 catch_up_on_open: bool = True, cache_index: str = INDEX_NAME) -> None:
        os.makedirs(cache_dir, exist_ok=True)
        source = os.path.join(cache_dir, "source.txt")
        try:
            with open(source, encoding="utf-8") as f:
                mirrored = f.read().strip()
        except (FileNotFoundError, UnicodeDecodeError):
            mirrored = ""
        if mirrored and mirrored != backend.url:
            # without ETags a cache cannot tell two stores' same-named manifests apart
            raise InvalidStoreError(f"{backend.url}: cache_dir {cache_dir} is the cache of "
                                    f"{mirrored}; give each store a cache_dir of its own")
        with open(source, "w", encoding="utf-8") as f:
            f.write(backend.url + "\n")  # which store this cache mirrors
        self.cache_dir = cache_dir
        #: the cache's index file in ``cache_dir`` (a DCP rank has one of its own)
        self.cache_index = cache_index
        self._scans = _ScanCache(os.path.join(cache_dir, "scans.sqlite"))
        self._scan_threads = scan_threads
        index_path = os.path.join(cache_dir, cache_index)
        kw = dict(lock_path=None, threads=threads, lock_timeout=lock_timeout,
                  location=backend.url, pack_size=pack_size, base_cache_bytes=base_cache_bytes)
        try:
            super().__init__(backend, index_path, config, **kw)  # type: ignore[arg-type]
        except CorruptionError:
            # a damaged cache is only a cache: start it afresh (refresh rebuilds it below)
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(index_path + suffix):
                    os.unlink(index_path + suffix)
            super().__init__(backend, index_path, config, **kw)  # type: ignore[arg-type]
        if not self._index.query("SELECT 1 FROM sqlite_master WHERE name='cache_manifests'"):
            with self._index.write() as conn:
                conn.execute(CACHE_MANIFESTS_SQL)
        self.backend: FsspecBackend = backend
        self.lease = Lease(backend, lease_ttl, on_acquire=lambda: self.refresh(check_packs=True))
        self._lock = self.lease  # type: ignore[assignment]  # Store takes it like its flock
        backend.before_commit = self.lease.check
        #: what the last :meth:`refresh` did: "none", "incremental" or "rebuild"
        self.last_refresh = "none"
        self._gc_version: int | None = None
        if not catch_up_on_open:
            return  # a DCP rank: catch_up_for_rank or refresh before it writes
        try:
            self.refresh(check_packs=False)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the lease (if held), the cache and worker threads. Idempotent."""
        with self._mutex:
            if self._closed:
                return
            super().close()
            self._scans.close()

    # -- cache maintenance --------------------------------------------------------------
    def refresh(self, check_packs: bool = True) -> ReindexResult:
        """Bring the local index cache up to date with the store's manifests.

        One LIST of ``manifests/`` when no step was added or deleted and ``check_packs`` is
        False (opening a store: a pack removed by another writer's repack is noticed when a
        load misses it); the writer also lists ``packs/`` when it takes the lease, since its
        gc must know every pack. New manifests are added incrementally (new packs are
        scanned, in parallel, once: scans are cached); when steps were deleted, packs
        removed or an incremental update cannot place a block, the cache is rebuilt in
        place from cached scans and manifests.
        """
        with self._mutex:
            self._check_open()
            return self._refresh(check_packs)

    def _refresh(self, check_packs: bool, rebuild: bool = False) -> ReindexResult:
        """:meth:`refresh`; ``rebuild`` rebuilds the cache whatever the listing shows."""
        with self._mutex:
            # another process sharing this cache may commit to it between this listing and
            # the rebuild's commit (a writer's save, thin or gc): the rebuild then writes
            # nothing and starts over, or it would put back what that process replaced
            for _ in range(_REFRESH_ATTEMPTS):
                try:
                    return self._refresh_once(
                        check_packs, self._index.query("PRAGMA data_version")[0][0],
                        rebuild)
                except CacheChanged:
                    continue
            raise StoreLockedError(f"{self.location}: the cache in {self.cache_dir} kept "
                                   "changing under this refresh (other processes sharing it "
                                   "are writing); try again, or give this process a "
                                   "cache_dir of its own")

    def _refresh_once(self, check_packs: bool, version: int,
                      rebuild: bool = False) -> ReindexResult:
        """One try of :meth:`refresh`; ``version``: the cache's ``PRAGMA data_version``
        before listing (a commit from another connection since makes it raise
        :class:`CacheChanged`, writing nothing)."""
        with self._mutex:
            listing = self.backend.list_info(MANIFEST_PREFIX)
            if rebuild or is_partial(self._index) or self._manifests_changed(listing):
                # a DCP rank's catch-ups located only its own blocks, or a manifest this
                # cache holds was rewritten (thin) or its step saved anew: rebuild
                listing.update(self.backend.list_info(PACK_PREFIX))
                self._scans.forget_missing({n for n in listing if n.startswith(PACK_PREFIX)})
                return self._rebuild(_Listed(self.backend, listing), listing, version)
            remote_manifests = {n for n in listing if n.endswith(".manifest")}
            have_manifests = {r[0] for r in self._index.query("SELECT manifest FROM steps")}
            result = ReindexResult()
            if remote_manifests == have_manifests and not check_packs:
                self.last_refresh = "none"
                return result
            listing.update(self.backend.list_info(PACK_PREFIX))
            remote_packs = {n for n in listing if n.startswith(PACK_PREFIX)
                            and n.endswith(".pack")}
            have_packs = {r[0] for r in self._index.query("SELECT name FROM packs")}
            if remote_manifests == have_manifests and have_packs <= remote_packs:
                self.last_refresh = "none"
                return result
            listed = _Listed(self.backend, listing)
            self._scans.forget_missing(remote_packs)
            if have_manifests <= remote_manifests and have_packs <= remote_packs:
                rebuild_into(self._index, listed, result, scan_many=self._scan_many,  # type: ignore[arg-type]
                             read_manifest=lambda n: self._manifest(n, listing),
                             incremental=True, manifest_etags=_etags(listing),
                             expect_version=version)
                if not result.steps_lost:
                    # the base cache stays: it is keyed by block id, and a block's bytes
                    # never change (a DCP rank keeps the bases of its own last save)
                    self.last_refresh = "incremental"
                    return result
            return self._rebuild(listed, listing, version)

    def _manifests_changed(self, listing: dict[str, dict[str, Any]],
                           names: list[str] | None = None) -> bool:
        """Whether a manifest of a step this cache holds is listed with an ETag other than
        the one the cache took it in with, or with one the cache never recorded (a cache of
        an older version): rewritten by a ``thin``, or its step deleted and saved anew.
        With ``names``, only those manifests are compared."""
        recorded = dict(self._index.query("SELECT name, etag FROM cache_manifests"))
        held = {r[0] for r in self._index.query("SELECT manifest FROM steps")}
        for name in held if names is None else held & set(names):
            now = listing.get(name, {}).get("etag")
            if now is not None and recorded.get(name) != now:
                return True
        return False

    _index_shared = True

    def _may_delete_leftovers(self) -> bool:
        # another process sharing this cache committed during the gc (a rebuild from a
        # listing taken mid-gc may not name what this gc just committed): leave leftovers
        # to the next gc rather than trust it
        return self._index.query("PRAGMA data_version")[0][0] == self._gc_version

    def _manifest_written(self, conn: Any, manifest: str) -> None:
        # the ETag the PUT returned, recorded with the rows in one transaction: if that
        # transaction fails the record is not made, and the next refresh rebuilds
        with self.backend._count_lock:
            etag = self.backend.put_etags.pop(manifest, None)
        record_manifest_etags(conn, {manifest: etag})

    def catch_up_for_rank(self, parent: int | None, paths: list[str]) -> bool:
        """Catch up just enough for a DCP rank to write ``paths`` of the step after ``parent``,
        without reading other ranks' packs (docs/dcp.md, "scoped catch-up"): one LIST and
        the parent's manifest; this rank's blocks of the parent are located from the packs it
        recorded writing (:meth:`record_rank_write`); rows of steps deleted since are dropped.

        True when that suffices: the rank then takes as stored only blocks the parent
        references (``Store._write_new_blocks(dedup_step=parent)``), live while the parent
        is. False — the first save, another writer's steps in between, a changed sharding,
        the keyframe policy (whose bases are chain roots the parent does not reference) —
        and the caller catches up in full with :meth:`refresh`. Leaves the index partial:
        only the rank's own writer may use it, and any :meth:`refresh` rebuilds it. Use it
        on a cache index of the rank's own (``cache_index``), never a shared one.
        """
        delta = self.config.delta
        if parent is None or (delta.enabled and delta.policy != "chain"):
            return False
        with self._mutex:
            self._check_open()
            listing = self.backend.list_info(MANIFEST_PREFIX)
            remote = {n for n in listing if n.endswith(".manifest")}
            have = dict(self._index.query("SELECT manifest, step FROM steps"))
            name = manifest_name(parent)
            new = remote - have.keys()
            # only the parent's rows matter here: the rank dedups against them alone
            if name not in remote or new - {name} or have.get(name, parent) != parent or \
                    self._manifests_changed(listing, [name]):
                return False
            gone = [step for m, step in have.items() if m not in remote]
            if new or gone:
                frames, sizes = self._scans.written_frames(parent, self.cache_index)
                try:
                    manifest = decode_manifest(self._manifest(name, listing), name) \
                        if new else None
                    ingest_partial(self._index, name, manifest, frames, sizes, gone,
                                   own_paths=set(paths),
                                   etag=listing[name].get("etag") if new else None)
                except (CorruptionError, FormatVersionError, FileNotFoundError):
                    return False
            ids: set[bytes] = set()
            for batch in chunked(sorted(set(paths)), 500):
                marks = ",".join("?" * len(batch))
                for (blob,) in self._index.query(
                        f"SELECT blocks FROM entries WHERE step=? AND path IN ({marks})",
                        (parent, *batch)):
                    ids.update(unpack_ids(blob))
            with self._index.read() as conn:
                located = self._locate(conn, ids)
            if any(b not in located for b in ids) or any(
                    loc.base is not None and loc.base not in located
                    for loc in located.values()):
                return False
            self._scans.forget_written_before(parent, self.cache_index)
            self.last_refresh = "scoped"
            return True

    def record_rank_write(self, step: int, packs: list[tuple[str, int]],
                          new_blocks: dict[bytes, tuple]) -> None:
        """Remember the packs a DCP rank wrote for ``step`` (durable, not yet committed) and
        their frames, for its next :meth:`catch_up_for_rank`."""
        by_pack: dict[str, tuple[int, list[tuple]]] = {n: (size, []) for n, size in packs}
        for bid, (pack, off, ln, raw, codec, base, _depth) in new_blocks.items():
            by_pack[pack][1].append((bid, off, ln, raw, codec, base))
        self._scans.put_written(step, self.cache_index, by_pack)

    def rebuild_cache(self) -> ReindexResult:
        """Rebuild the local index cache from every manifest and pack of the store (what
        ``deltackpt reindex URL`` runs; the store itself is not written). Pack headers
        already scanned are taken from the scan cache.

        Holds the writer lease, as a local reindex holds the writer lock: a writer
        sharing this cache would otherwise commit a step into the gap between the listing
        and the rebuild, lose it from the cache, and its gc would then delete it."""
        with self._mutex:
            self._check_open()
            self._become_writer()
            listing = self.backend.list_info(MANIFEST_PREFIX)
            listing.update(self.backend.list_info(PACK_PREFIX))
            self._scans.forget_missing({n for n in listing if n.startswith(PACK_PREFIX)})
            return self._rebuild(_Listed(self.backend, listing), listing)

    def _rebuild(self, listed: _Listed, listing: dict[str, dict[str, Any]],
                 version: int | None = None) -> ReindexResult:
        result = ReindexResult()
        rebuild_into(self._index, listed, result, scan_many=self._scan_many,  # type: ignore[arg-type]
                     read_manifest=lambda n: self._manifest(n, listing), replace=True,
                     manifest_etags=_etags(listing), expect_version=version)
        self.last_refresh = "rebuild"
        self._base_cache.clear()
        self._delta_hints.clear()
        return result

    def _manifest(self, name: str, listing: dict[str, dict[str, Any]]) -> bytes:
        etag = listing.get(name, {}).get("etag")
        data = self._scans.manifest(name, etag)
        if data is None:
            data = self.backend.read(name)
            self._scans.put_manifest(name, etag, data)
        return data

    def _scan_many(self, names: list[str]) -> dict[str, Any]:
        out = self._scans.get(names)
        todo = [n for n in names if n not in out]

        reader = _HeaderReads(self.backend)

        def scan(name: str) -> tuple[str, Any]:
            try:
                frames = [(info.block_id, off, info.frame_len, info.raw_len, info.codec,
                           info.base_id) for info, off in scan_pack(reader, name)]
                size = self.backend.size(name)
            except CorruptionError as exc:
                return name, exc
            except FileNotFoundError:
                return name, None  # deleted since the listing
            self._scans.put(name, size, frames)
            return name, (size, frames)

        if todo:
            with ThreadPoolExecutor(min(self._scan_threads, len(todo)),
                                    thread_name_prefix="deltackpt-scan") as pool:
                for name, found in pool.map(scan, todo):
                    if found is not None:
                        out[name] = found
        return out

    def _record_own_packs(self, step: int) -> None:
        """A save's packs hold exactly that step's new blocks: remember them as scanned so
        that a later rebuild of this cache never reads their headers back."""
        rows = self._index.query(
            "SELECT p.name, p.size, b.id, b.offset, b.length, b.raw_len, b.codec, b.base "
            "FROM blocks b JOIN packs p ON p.id = b.pack_id WHERE b.first_step=? "
            "ORDER BY p.name, b.offset", (step,))
        packs: dict[str, tuple[int, list[tuple]]] = {}
        for name, size, bid, off, ln, raw, cd, base in rows:
            packs.setdefault(name, (size, []))[1].append((bid, off, ln, raw, cd, base))
        for name, (size, frames) in packs.items():
            self._scans.put(name, size, frames)

    # -- Store overrides -----------------------------------------------------------------
    def save(self, state: Any, step: int, metrics: dict[str, Any] | None = None,
             tags: Any = None, note: str | None = None) -> Any:
        result = super().save(state, step, metrics=metrics, tags=tags, note=note)
        self._record_own_packs(result.step)
        return result

    save.__doc__ = Store.save.__doc__

    def gc(self, repack_threshold: float = 0.5, progress: Any = None) -> Any:
        """:meth:`Store.gc`, then abort multipart uploads a crashed writer left unfinished
        (begun before this writer took the lease: nobody else can be writing)."""
        with self._mutex:
            self._check_open()
            # gc deletes what the index does not reference: the cache must name every
            # committed manifest first (another process sharing it may have rebuilt it).
            # Taking the lease refreshes it; a lease already held needs an explicit one.
            if self.lease.held:
                self.refresh(check_packs=True)
            else:
                self._become_writer()
            self._gc_version = self._index.query("PRAGMA data_version")[0][0]
        result = super().gc(repack_threshold, progress)
        started = self.lease.acquired_at
        if started is not None:
            aborted = self.backend.abort_uploads(PACK_PREFIX, started)
            result = dataclasses.replace(result,
                                         objects_deleted=result.objects_deleted + aborted)
        return result

    def _caught_up(self) -> bool:
        # another writer's delete or gc shows in the listing, not in this cache until it
        # refreshes (verify, diff, iter_entries and export plan again when it changed).
        # A refresh that lost steps found damage (a pack gone that a manifest needs), not
        # someone else's change, and a refresh that fails must not replace the report of
        # what the caller found: neither is a catch-up
        try:
            result = self.refresh(check_packs=True)
        except (OSError, DeltackptError):
            return False
        return self.last_refresh != "none" and not result.steps_lost

    def _load_once(self, step: int | None, map_location: Any, select: Any) -> Any:
        try:
            return super()._load_once(step, map_location, select)
        except FileNotFoundError:
            # another writer's gc removed a pack: catch up and re-plan (a rebuilt cache
            # may number its packs as before, so Store.load's own check could miss it)
            self.refresh(check_packs=True)
            if self.last_refresh == "none":
                raise
            return super()._load_once(step, map_location, select)
        except IndexDisagreesError:
            # the manifest is the truth and this index only a cache of it, which missed a
            # rewrite its listing could not show (a store without ETags): rebuild, re-plan
            self._refresh(check_packs=True, rebuild=True)
            return super()._load_once(step, map_location, select)


def _etags(listing: dict[str, dict[str, Any]]) -> dict[str, str | None]:
    return {n: v.get("etag") for n, v in listing.items() if n.startswith(MANIFEST_PREFIX)}


def open_remote(target: str | FsspecBackend, *, block_size: int | None = None,
                hash: str | None = None, level: int | None = None,  # noqa: A002
                delta: Any = None, threads: int | None = None, lock_timeout: float = 0.0,
                create: bool = True, base_cache_bytes: int = 1 << 30,
                fsync: bool = True, cache_dir: str | os.PathLike | None = None,
                storage_options: dict[str, Any] | None = None, filesystem: Any = None,
                lease_ttl: float = DEFAULT_LEASE_TTL, part_size: int = DEFAULT_PART_SIZE,
                max_concurrency: int = DEFAULT_CONCURRENCY,
                pack_size: int = DEFAULT_REMOTE_PACK_SIZE,
                readahead: int = DEFAULT_READAHEAD,
                catch_up_on_open: bool = True, cache_index: str = INDEX_NAME) -> RemoteStore:
    """Open (creating if missing) the store at an object-storage URL or
    :class:`FsspecBackend`; see :func:`deltackpt.open` and docs/object-storage.md.
    ``fsync`` is accepted for symmetry: a committed object is always durable.
    ``catch_up_on_open=False`` skips the cache's catch-up and ``cache_index`` names the
    cache's index file (a DCP rank: an index of its own, which it catches up before it
    writes)."""
    if isinstance(target, FsspecBackend):
        backend = target
    else:
        backend = backend_for_url(target, storage_options=storage_options,
                                  filesystem=filesystem, part_size=part_size,
                                  max_concurrency=max_concurrency, readahead=readahead)
    url = backend.url
    try:
        raw: bytes | None = backend.read(CONFIG_NAME)
    except FileNotFoundError:
        raw = None
    except PermissionError as exc:  # the filesystem's message names no URL
        raise StorageError(f"{url}: access denied: {exc}") from exc
    if raw is None:
        if not create:
            raise InvalidStoreError(f"{url}: no deltackpt store here (or its bucket does not "
                                    "exist or cannot be listed)")
        try:
            if backend.list(PACK_PREFIX) or backend.list(MANIFEST_PREFIX):
                raise InvalidStoreError(f"{url}: packs or manifests exist but no "
                                        f"{CONFIG_NAME}; refusing to create a store over them")
            cfg = _new_config(block_size, hash, level, delta)
            try:
                backend.put_if_absent(CONFIG_NAME,
                                      json.dumps(cfg.to_json(), indent=2).encode() + b"\n")
            except FileExistsError:  # another process created it first: use theirs
                raw = backend.read(CONFIG_NAME)
        except (FileNotFoundError, PermissionError) as exc:  # no bucket, no rights
            raise StorageError(f"{url}: cannot create a store here: {exc}") from exc
    if raw is not None:
        cfg = existing_config(raw, url, block_size, hash, level, delta)
    cache = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir(url)
    return RemoteStore(backend, cfg, cache, threads=threads, lock_timeout=lock_timeout,
                       lease_ttl=lease_ttl, base_cache_bytes=base_cache_bytes,
                       pack_size=pack_size, catch_up_on_open=catch_up_on_open,
                       cache_index=cache_index)
