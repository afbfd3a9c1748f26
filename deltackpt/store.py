"""The store: save and load whole training states, step by step.

Save: flatten → hash blocks (thread pool) → dedup against the index → encode new
blocks (thread pool) → append frames to packs → fsync packs → write the step
manifest → one SQLite transaction (the commit point). Load: plan from the index
in one read transaction → read frames → decode in parallel straight into the
output tensors → rebuild the tree. docs/architecture.md walks through both.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import sqlite3
import stat
import threading
import time
import urllib.parse
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import codec as codec_mod
from . import summaries
from .backend import PARTIAL_SUFFIX, Backend, LocalBackend, MemoryBackend
from .codec import DELTA_SUB, CodecConfig, FrameInfo
from .delta import MAX_CHAIN_HOPS, DeltaConfig
from .dtypes import dtype_info
from .errors import (
    CorruptionError,
    DeltackptError,
    FormatVersionError,
    InvalidInputError,
    InvalidStoreError,
    StepExistsError,
    StepNotFoundError,
    StorageError,
    StoreClosedError,
    UnsupportedValueError,
)
from .faults import crash_point
from .flatten import (
    Leaf,
    check_text,
    entry_indices,
    entry_nodes,
    flatten,
    select_tree,
    unflatten,
)
from .hashing import DEFAULT_BLOCK_SIZE, HASHES, ID_SIZE, block_id, block_spans, unpack_ids
from .index import SCHEMA_VERSION, Index, chunked
from .lock import WriterLock
from .packs import (
    MANIFEST_PREFIX,
    MANIFEST_VERSION,
    MAX_FRAME_HEADER,
    PACK_MAGIC,
    PACK_PREFIX,
    PackWriter,
    decode_manifest,
    encode_manifest,
    manifest_name,
    pack_frame_bytes,
    read_pack_index,
)
from .results import EntryInfo, GcResult, SaveResult, StepInfo, VerifyResult
from .tensors import empty_output, finish_output, leaf_bytes, move, output_bytes

FORMAT_NAME = "deltackpt"
FORMAT_VERSION = 1
CONFIG_NAME = "deltackpt.json"
INDEX_NAME = "index.sqlite"
LOCK_NAME = "lock"
#: hashing work is handed to threads in slices of this many bytes
_HASH_SLICE = 64 * 1024 * 1024


def _default_threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


@dataclass
class StoreConfig:
    """Settings fixed when a store is created (recorded in ``deltackpt.json``)."""

    block_size: int = DEFAULT_BLOCK_SIZE
    hash: str = "xxh3_128"
    codec: CodecConfig = field(default_factory=CodecConfig)
    delta: DeltaConfig = field(default_factory=DeltaConfig)

    def to_json(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "block_size": self.block_size,
            "hash": self.hash,
            "codec": self.codec.to_json(),
            "delta": self.delta.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict, where: str) -> StoreConfig:
        if data.get("format") != FORMAT_NAME:
            raise InvalidStoreError(f"{where}: not a deltackpt store")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
            raise FormatVersionError(
                f"{where}: store format version {version!r} is not supported by this "
                f"deltackpt (reads version {FORMAT_VERSION}); upgrade deltackpt"
            )
        cfg = cls(
            block_size=int(data["block_size"]),
            hash=str(data["hash"]),
            codec=CodecConfig.from_json(data.get("codec", {})),
            delta=DeltaConfig.from_json(data.get("delta", {})),
        )
        cfg.validate(where)
        return cfg

    def validate(self, where: str = "store") -> None:
        if self.hash not in HASHES:
            raise InvalidStoreError(f"{where}: unknown block hash {self.hash!r}")
        if not 4096 <= self.block_size <= codec_mod.MAX_BLOCK_BYTES:
            raise InvalidStoreError(
                f"{where}: block_size {self.block_size} outside [4096, "
                f"{codec_mod.MAX_BLOCK_BYTES}]"
            )


@dataclass
class _EntryPlan:
    leaf: Leaf
    data: np.ndarray  # flat uint8 view of the leaf's bytes
    width: int
    spans: list[tuple[int, int]]
    ids: list[bytes] = field(default_factory=list)


@dataclass(frozen=True)
class _Location:
    pack: str
    offset: int
    length: int
    raw_len: int
    base: bytes | None
    depth: int


def _storage_errors(what: str, step_arg: int | None = None):
    """Raise OS and SQLite errors of a mutation as :class:`StorageError` naming the store,
    the operation and the step (the original error is chained)."""

    def wrap(fn):
        @functools.wraps(fn)
        def call(self: Store, *args: Any, **kwargs: Any) -> Any:
            try:
                return fn(self, *args, **kwargs)
            except DeltackptError:
                raise
            except (OSError, sqlite3.Error) as exc:
                step = kwargs.get("step") if step_arg is None or len(args) <= step_arg \
                    else args[step_arg]
                label = f"{what} of step {step}" if step is not None else what
                msg = (f"{self.location}: {label} failed: {exc}"
                       + ("; nothing was committed" if what == "save" and step is not None
                          and not _committed(self, step) else ""))
                raise StorageError.caused_by(msg, exc) from exc
        return call
    return wrap


def _committed(store: Store, step: Any) -> bool:
    try:
        return step in store
    except (sqlite3.Error, DeltackptError):
        return True  # unknown: claim nothing


_PACKS_SQL = "SELECT COUNT(*), MAX(id), SUM(size) FROM packs"

#: what changes when a writer commits a save, delete, thin or gc: verify compares it before
#: and after reading objects that a concurrent delete or gc may remove
_CHANGES_SQL = ("SELECT (SELECT COUNT(*) FROM steps), (SELECT TOTAL(step) FROM steps), "
                "(SELECT COUNT(*) FROM packs), (SELECT MAX(id) FROM packs), "
                "(SELECT TOTAL(size) FROM packs), (SELECT COUNT(*) FROM entries)")


class Store:
    """A deltackpt store. Make one with :func:`deltackpt.open`.

    Thread-safe: saves, deletes and gc are serialised; loads may run beside them (and
    plan again when a gc moved what they were about to read). Closing releases the
    writer lock, the index and the worker threads; a call that close() overtakes raises
    :class:`StoreClosedError`.
    """

    def __init__(
        self,
        backend: Backend,
        index_path: str,
        config: StoreConfig,
        lock_path: str | None = None,
        threads: int | None = None,
        lock_timeout: float = 0.0,
        location: str = "<store>",
        pack_size: int = 512 * 1024 * 1024,
        base_cache_bytes: int = 1 << 30,
    ) -> None:
        self.backend = backend
        self.config = config
        self.location = location
        try:
            self._index = Index(index_path, durable=backend.durable)
        except sqlite3.Error as exc:
            # e.g. "attempt to write a readonly database": SQLite names no file. Opening
            # creates index.sqlite-wal/-shm beside it, readers too (format.md §18)
            raise StorageError(f"{location}: cannot open the index {index_path}: {exc} (SQLite "
                               "creates its -wal and -shm files beside it, even to read: the "
                               "store's directory must be writable and have free space)") from exc
        self._index.check_version()
        self._lock = WriterLock(lock_path) if lock_path else None
        # opening an up-to-date index writes nothing: readers must not queue behind a writer
        if self._index.schema_version() != SCHEMA_VERSION:
            # creating or migrating the schema under the writer lock: a writer of an older
            # deltackpt must not commit into a schema it does not know (format.md §17)
            if self._lock is not None:
                self._lock.acquire(lock_timeout)
            try:
                self._index.create_or_migrate({
                    "format_version": str(FORMAT_VERSION),
                    "created_at": repr(time.time()),
                })
            finally:
                if self._lock is not None:
                    self._lock.release()
        self._lock_timeout = lock_timeout
        self._mutex = threading.RLock()
        self._threads = threads or _default_threads()
        self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="deltackpt")
        self._pack_size = pack_size
        self._closed = False
        #: raw bytes of the blocks the next save will use as delta bases
        self._base_cache: dict[bytes, np.ndarray] = {}
        self._base_cache_limit = base_cache_bytes
        #: per block position (entry path, offset): delta frame size / standalone frame
        #: size the last time both were tried, so that a position whose delta clearly
        #: wins is not encoded twice on every save
        self._delta_hints: dict[tuple[str, int], float] = {}

    # -- lifecycle ------------------------------------------------------------
    def close(self) -> None:
        """Release the writer lock, worker threads and files. Idempotent."""
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            self._pool.shutdown(wait=True)
            self._index.close()
            self.backend.close()
            if self._lock is not None:
                self._lock.release()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<deltackpt.Store {self.location!r}>"

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"{self.location}: the store is closed")

    def _packs_state(self, sql: str = _PACKS_SQL) -> tuple:
        """What changes when a gc adds, rewrites or removes packs (``sql``: or also, as
        ``_CHANGES_SQL``, steps and entries); see :meth:`_worth_replanning`."""
        return tuple(self._index.query(sql)[0])

    def _worth_replanning(self, packs_before: tuple, sql: str = _PACKS_SQL) -> bool:
        """After a read found an object gone or damaged: whether a fresh plan may read
        something else (``sql``'s state changed since ``packs_before``, or a remote cache
        caught up with another writer). False means the damage is real: report it at once."""
        return self._packs_state(sql) != packs_before or self._caught_up()

    def _caught_up(self) -> bool:
        """After a read found an object gone and the index shows no change: bring this
        store's view up to date and say whether it changed (a local index is always
        current; a remote store's cache catches up with the listing)."""
        return False

    @contextlib.contextmanager
    def _closing_race(self) -> Iterator[None]:
        """Reads take no lock: one that close() overtook (its pool shut down, its index
        or files closed under it) raises StoreClosedError, not what that left behind."""
        try:
            yield
        except Exception as exc:
            if self._closed and not isinstance(exc, StoreClosedError):
                raise StoreClosedError(f"{self.location}: the store was closed during the "
                                       "call") from exc
            raise

    def _become_writer(self) -> None:
        # callers hold _mutex, as close() does: a store closed while they waited for it
        # must not take the writer lock back (nothing would release it)
        self._check_open()
        if self._lock is not None and not self._lock.held:
            self._lock.acquire(self._lock_timeout)

    def _release_writer(self) -> None:
        """Give the writer lock (a remote store's lease) back; the next write takes it
        again (and catches up with what other writers committed meanwhile)."""
        with self._mutex:
            if self._lock is not None and self._lock.held:
                self._lock.release()

    # -- queries --------------------------------------------------------------
    def steps(self) -> list[int]:
        """All committed steps, ascending."""
        self._check_open()
        return [r[0] for r in self._index.query("SELECT step FROM steps ORDER BY step")]

    def latest(self) -> int | None:
        """The newest committed step, or None for an empty store."""
        self._check_open()
        row = self._index.query("SELECT MAX(step) FROM steps")
        return row[0][0] if row else None

    def __contains__(self, step: object) -> bool:
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            return False
        step = int(step)
        return bool(self._index.query("SELECT 1 FROM steps WHERE step=?", (step,)))

    def info(self, step: int) -> StepInfo:
        """Metadata of a committed step; StepNotFoundError when absent."""
        self._check_open()
        rows = self._index.query(
            "SELECT step, created_at, metrics, tags, note, logical_bytes, written_bytes, "
            "new_chunks, total_chunks, parent, (SELECT COUNT(*) FROM entries e "
            "WHERE e.step = s.step) FROM steps s WHERE step=?",
            (self._step_arg(step),),
        )
        if not rows:
            raise self._not_found(step)
        return _step_info(rows[0])

    def log(self) -> list[StepInfo]:
        """Metadata of every step, ascending."""
        self._check_open()
        rows = self._index.query(
            "SELECT s.step, created_at, metrics, tags, note, logical_bytes, written_bytes, "
            "new_chunks, total_chunks, parent, COUNT(e.idx) FROM steps s "
            "LEFT JOIN entries e ON e.step = s.step GROUP BY s.step ORDER BY s.step"
        )
        return [_step_info(r) for r in rows]

    def entries(self, step: int) -> list[EntryInfo]:
        """The array leaves of a step with dtype, shape and size (no data read)."""
        self._check_open()
        step = self._step_arg(step)
        with self._index.read() as conn:
            if not conn.execute("SELECT 1 FROM steps WHERE step=?", (step,)).fetchone():
                raise self._not_found(step)
            rows = conn.execute(
                "SELECT path, kind, dtype, shape, nbytes, length(blocks) FROM entries "
                "WHERE step=? ORDER BY idx", (step,)).fetchall()
        return [EntryInfo(p, k, d, tuple(json.loads(s)), n, b // ID_SIZE)
                for p, k, d, s, n, b in rows]

    def _step_arg(self, step: Any) -> int:
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise TypeError(f"step must be an int, not {type(step).__name__}")
        if not -(2**63) <= step < 2**63:
            raise InvalidInputError(f"step {step} does not fit in 64 bits")
        return int(step)

    def _step_record_args(self, step: Any, metrics: Any, tags: Any,
                          note: Any) -> tuple[int, str, list[str]]:
        """Check what a new step records (save and commit_external): the step number,
        metrics as JSON, tags as a list."""
        step = self._step_arg(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        metrics_json = _metrics_json(metrics)
        tags_list = _tags_list(tags)
        if note is not None and not isinstance(note, str):
            raise TypeError("note must be a str or None")
        if note is not None:
            check_text(note, "the note")
        return step, metrics_json, tags_list

    def _not_found(self, step: int) -> StepNotFoundError:
        have = self.steps()
        hint = (f"; committed steps: {_short_list(have)}" if have else "; the store is empty")
        return StepNotFoundError(f"{self.location}: step {step} not found{hint}")

    # -- save -----------------------------------------------------------------
    @_storage_errors("save", step_arg=1)
    def save(
        self,
        state: Any,
        step: int,
        metrics: dict[str, Any] | None = None,
        tags: Sequence[str] | None = None,
        note: str | None = None,
    ) -> SaveResult:
        """Store ``state`` as ``step`` and return what it cost.

        Everything is validated before a byte is written: unsupported values raise
        :class:`UnsupportedValueError` naming their path, an existing step
        :class:`StepExistsError`. The step becomes visible atomically when the
        call returns; a crash before that leaves only garbage for :meth:`gc`.
        """
        self._check_open()
        t0 = time.perf_counter()
        step, metrics_json, tags_list = self._step_record_args(step, metrics, tags, note)
        tree, leaves = flatten(state)
        tree_json = json.dumps(tree, separators=(",", ":"), allow_nan=False)
        crash_point("save:after-flatten")
        with self._mutex:
            self._check_open()
            self._become_writer()
            if step in self:
                raise StepExistsError(f"{self.location}: step {step} already exists; "
                                      "delete it first or save under another step")
            manifest = self._free_manifest_name(step)
            parent = self._parent_of(step)
            generation = self._delta_generation()
            plans = self._plan_entries(leaves)
            self._hash_all(plans)
            crash_point("save:after-hash")
            writer = PackWriter(self.backend, self._pack_size)
            try:
                new_blocks, written = self._write_new_blocks(plans, step, parent, writer,
                                                             generation)
                packs = writer.finish()
                self.backend.sync()
            except BaseException:
                writer.abort()
                raise
            crash_point("save:after-packs")
            created = time.time()
            payload = {
                "manifest_version": MANIFEST_VERSION,
                "step": step,
                "created_at": created,
                "metrics": json.loads(metrics_json),
                "tags": tags_list,
                "note": note,
                "parent": parent,
                "generation": generation,
                "tree": tree,
                "entries": [_entry_manifest(p) for p in plans],
            }
            self.backend.put(manifest, encode_manifest(payload))
            self.backend.sync()
            crash_point("save:after-manifest")
            logical = sum(p.data.nbytes for p in plans)
            total = sum(len(p.ids) for p in plans)
            with self._index.write() as conn:
                self._commit_step_rows(
                    conn, step, manifest, created, (metrics_json, tags_list, note, tree_json),
                    packs, new_blocks,
                    [(step, p.leaf.index, p.leaf.path, p.leaf.kind, p.leaf.dtype,
                      json.dumps(list(p.leaf.shape)), p.data.nbytes,
                      p.spans[0][1] if p.spans else 0, b"".join(p.ids)) for p in plans],
                    written, parent, generation)
                crash_point("save:before-commit")
            crash_point("save:after-commit")
            self._refresh_after_commit(plans, new_blocks, step)
            return SaveResult(step, logical, written, len(new_blocks), total,
                              time.perf_counter() - t0)

    def _free_manifest_name(self, step: int) -> str:
        """The manifest name of ``step``, refused when the index lists it for another
        step (a renamed manifest that reindex recovered): writing it would replace that
        step's only record."""
        name = manifest_name(step)
        rows = self._index.query("SELECT step FROM steps WHERE manifest = ?", (name,))
        if rows and rows[0][0] != step:
            raise InvalidStoreError(
                f"{self.location}: step {step}: its manifest name {name} holds step "
                f"{rows[0][0]} (a renamed file); rename it to {manifest_name(rows[0][0])} "
                f"and run `deltackpt reindex {self.location}` before saving step {step}")
        return name

    def _delta_generation(self) -> int:
        """The generation the next save takes: the clock of staggered keyframes."""
        return summaries.delta_generation(self._index)

    def _manifest_generation(self, manifest: str) -> int | None:
        """The generation ``manifest`` records, or None (absent, unreadable)."""
        try:
            payload = decode_manifest(_read_current(self.backend, manifest), manifest)
        except (OSError, FormatVersionError, InvalidStoreError, CorruptionError):
            return None
        return summaries.parse_generation(payload.get("generation"))

    def _dense_chains(self, parent: int, parent_ids: list[bytes],
                      bases: _BaseSource) -> set[bytes]:
        """Among ``parent_ids`` (blocks of step ``parent``), those whose position changed at
        every save since its keyframe: the chain's keyframe was written ``depth`` saves
        before ``parent`` (by the commit history in the index, which outlives deleted
        steps). Only these are cut at a keyframe slot; a position that changes now and then
        has its own phase, and a cut would only add keyframes."""
        generations = summaries.step_generations(self._index)
        if parent not in generations:
            return set()
        roots: dict[bytes, tuple[bytes, int]] = {}
        for pid in parent_ids:
            loc = bases.location(pid)
            if loc is not None:
                roots[pid] = (bases.root(pid), generations[parent] - loc.depth)
        first: dict[bytes, int] = {}
        for batch in chunked(list({r for r, _ in roots.values()}), 500):
            marks = ",".join("?" * len(batch))
            first.update(self._index.query(
                f"SELECT id, first_step FROM blocks WHERE id IN ({marks})", batch))
        return {pid for pid, (root, when) in roots.items()
                if root in first and generations.get(first[root]) == when}

    def _parent_of(self, step: int) -> int | None:
        """The committed step whose blocks serve as delta bases for ``step``."""
        row = self._index.query("SELECT MAX(step) FROM steps WHERE step < ?", (step,))
        if row and row[0][0] is not None:
            return row[0][0]
        return self.latest()

    def _refresh_after_commit(self, plans: list[_EntryPlan], new_blocks: dict,
                              step: int) -> None:
        """:meth:`_refresh_base_cache` once ``step``'s blocks are durable: a failure there
        (MemoryError, say) must not fail a save whose data is safe, so it warns instead."""
        try:
            self._refresh_base_cache(plans, new_blocks)
        except Exception as exc:  # noqa: BLE001 - the cache is only a speed-up
            self._base_cache = {}
            warnings.warn(f"{self.location}: step {step}: keeping the blocks just written as "
                          f"delta bases failed ({exc!r}); the next save decodes its bases "
                          "from the packs", RuntimeWarning, stacklevel=3)

    def _refresh_base_cache(self, plans: list[_EntryPlan], new_blocks: dict) -> None:
        """Keep the raw bytes the next save's deltas will be computed against.

        Chain policy: every block of this step. Keyframe policy: the keyframe of
        every position. Bounded by ``base_cache_bytes``; what does not fit is
        decoded from the packs when needed.
        """
        if not self.config.delta.enabled or self._base_cache_limit <= 0:
            self._base_cache = {}
            return
        keyframe_policy = self.config.delta.policy == "keyframe"
        targets: list[tuple[bytes, bytes, _EntryPlan, int, int]] = []
        for p in plans:
            for (a, b), bid in zip(p.spans, p.ids):
                target = bid
                if keyframe_policy:
                    info = new_blocks.get(bid)
                    if info is not None and info[5] is not None:
                        target = info[5]  # the keyframe this block was encoded against
                targets.append((target, bid, p, a, b))
        old = self._base_cache
        # until the copies below are done, buffers of ``old`` may hold other blocks' bytes:
        # if anything fails on the way, the next save decodes its bases from the packs
        self._base_cache = {}
        wanted = {t[0] for t in targets}
        # buffers of blocks that leave the cache are reused for those that enter it:
        # fresh allocations would page-fault on every save
        spare: dict[int, list[np.ndarray]] = {}
        for bid, arr in old.items():
            if bid not in wanted:
                spare.setdefault(arr.nbytes, []).append(arr)
        fresh: dict[bytes, np.ndarray] = {}
        copies: list[tuple[np.ndarray, np.ndarray]] = []
        used = 0
        for target, bid, p, a, b in targets:
            if target in fresh:
                continue
            if used + (b - a) > self._base_cache_limit:
                break
            if target in old:
                fresh[target] = old[target]
            elif target == bid:
                pool = spare.get(b - a)
                buf = pool.pop() if pool else np.empty(b - a, dtype=np.uint8)
                copies.append((buf, p.data[a:b]))
                fresh[target] = buf
            else:
                continue
            used += b - a
        # the copy is on the save's critical path (~1/10 of a fully changed save): spread
        # it over the pool, whose threads are idle now (numpy copies release the GIL)
        _run_sliced(self._pool if self._threads > 1 else None, copies,
                    lambda part: [np.copyto(dst, src) for dst, src in part])
        self._base_cache = fresh

    def _plan_entries(self, leaves: list[Leaf]) -> list[_EntryPlan]:
        plans = []
        for leaf in leaves:
            info = dtype_info(leaf.kind, leaf.dtype)
            data = leaf_bytes(leaf)
            if data.nbytes != leaf.nbytes:
                raise UnsupportedValueError(f"'{leaf.path}': byte view has {data.nbytes} bytes, "
                                            f"expected {leaf.nbytes}")
            spans = list(block_spans(data.nbytes, self.config.block_size, info.itemsize))
            plans.append(_EntryPlan(leaf, data, info.group_width, spans))
        return plans

    def _hash_all(self, plans: list[_EntryPlan]) -> None:
        hash_name = self.config.hash

        def hash_slice(job: tuple[np.ndarray, list[tuple[int, int]]]) -> list[bytes]:
            data, spans = job
            return [block_id(data[a:b], hash_name) for a, b in spans]

        jobs: list[tuple[int, tuple[np.ndarray, list[tuple[int, int]]]]] = []
        for i, p in enumerate(plans):
            start = 0
            while start < len(p.spans):
                end = start
                size = 0
                while end < len(p.spans) and (size < _HASH_SLICE or end == start):
                    size += p.spans[end][1] - p.spans[end][0]
                    end += 1
                jobs.append((i, (p.data, p.spans[start:end])))
                start = end
        if len(jobs) <= 1 or self._threads == 1:
            results = [hash_slice(j) for _, j in jobs]
        else:
            results = list(self._pool.map(hash_slice, [j for _, j in jobs]))
        for (i, _), ids in zip(jobs, results):
            plans[i].ids.extend(ids)

    def _known_blocks(self, ids: Iterable[bytes]) -> set[bytes]:
        found: set[bytes] = set()
        ids = list(ids)
        for batch in chunked(ids, 500):
            marks = ",".join("?" * len(batch))
            found.update(r[0] for r in self._index.query(
                f"SELECT id FROM blocks WHERE id IN ({marks})", batch))
        return found

    def _referenced_by(self, step: int, ids: set[bytes]) -> set[bytes]:
        """Those of ``ids`` that entries of ``step`` reference."""
        found: set[bytes] = set()
        for (blob,) in self._index.query("SELECT blocks FROM entries WHERE step=?", (step,)):
            found.update(ids.intersection(unpack_ids(blob)))
        return found

    def _write_new_blocks(self, plans: list[_EntryPlan], step: int, parent: int | None,
                          writer: PackWriter, generation: int = 0,
                          dedup_step: int | None = None,
                          ) -> tuple[dict[bytes, tuple], int]:
        """Encode and write the blocks of ``plans`` the store lacks; returns (id -> location
        of each block written, bytes written). ``dedup_step``: take as stored only the
        blocks that step references, not every block of the index (a DCP rank whose cache
        is partial)."""
        all_ids = {bid for p in plans for bid in p.ids}
        known = self._known_blocks(all_ids) if dedup_step is None else \
            self._referenced_by(dedup_step, all_ids)
        bases = self._delta_bases(plans, parent) if self.config.delta.enabled else {}
        delta = self.config.delta
        todo: list[tuple[bytes, np.ndarray, int, bytes | None, int, tuple[str, int], bool]] = []
        seen = set(known)
        for p in plans:
            for k, ((a, b), bid) in enumerate(zip(p.spans, p.ids)):
                if bid in seen:
                    continue
                seen.add(bid)
                parent_id = bases.get((p.leaf.index, a))
                slot = parent_id is not None and delta.keyframe_slot(generation, p.leaf.path, k)
                todo.append((bid, p.data[a:b], p.width, parent_id, delta.mode_for(p.leaf.path),
                             (p.leaf.path, a), slot))
        base_source = _BaseSource(self, [t[3] for t in todo if t[3] is not None])
        at_slot = [t[3] for t in todo if t[6]]
        if at_slot:
            assert parent is not None
            dense = self._dense_chains(parent, at_slot, base_source)  # type: ignore[arg-type]
            todo = [t if not t[6] or t[3] in dense else t[:6] + (False,) for t in todo]
        cfg = self.config
        hints = self._delta_hints

        def encode(job: tuple[bytes, np.ndarray, int, bytes | None, int, tuple[str, int], bool]):
            bid, raw, width, base_id, mode, position, slot = job
            return _encode_block(bid, raw, width, cfg, base_id, base_source, mode,
                                 hints, position, slot)

        new_blocks: dict[bytes, tuple] = {}
        written = 0
        window: deque[tuple[bytes, int, Future]] = deque()
        limit = 2 * self._threads + 2
        n_done = 0

        def drain_one() -> None:
            nonlocal written, n_done
            bid, raw_len, fut = window.popleft()
            parts, codec_name, base_id, depth = fut.result()
            pack, off, length = writer.add(parts)
            written += length
            new_blocks[bid] = (pack, off, length, raw_len, codec_name, base_id, depth)
            n_done += 1
            if n_done == 1:
                crash_point("save:mid-write")

        try:
            for job in todo:
                window.append((job[0], job[1].nbytes, self._pool.submit(encode, job)))
                if len(window) >= limit:
                    drain_one()
            while window:
                drain_one()
        finally:
            for _, _, fut in window:
                fut.cancel()
            base_source.clear()
        return new_blocks, written

    def _delta_bases(self, plans: list[_EntryPlan], parent: int | None) -> dict:
        """(entry index, block start) -> parent block id at the same position."""
        if parent is None:
            return {}
        rows = self._index.query(
            "SELECT path, kind, dtype, shape, block_size, blocks FROM entries WHERE step=?",
            (parent,))
        by_path = {r[0]: r for r in rows}
        out: dict[tuple[int, int], bytes] = {}
        for p in plans:
            r = by_path.get(p.leaf.path)
            if r is None or not p.spans:
                continue
            _, kind, dtype, shape, bsize, blob = r
            if (kind, dtype) != (p.leaf.kind, p.leaf.dtype) or \
                    tuple(json.loads(shape)) != p.leaf.shape or bsize != p.spans[0][1]:
                continue
            parent_ids = unpack_ids(blob)
            for (a, _b), bid, pid in zip(p.spans, p.ids, parent_ids):
                if bid != pid:
                    out[(p.leaf.index, a)] = pid
        return out

    # -- load -----------------------------------------------------------------
    def load(
        self,
        step: int | None = None,
        map_location: Any = None,
        select: Sequence[str] | str | None = None,
    ) -> Any:
        """Rebuild the state saved as ``step`` (default: the latest), bit for bit.

        ``map_location`` works like ``torch.load``'s (a device, a string, a dict
        mapping saved to target devices, or a callable ``f(tensor, saved_device)``);
        by default tensors go back to the device they were saved from.
        ``select`` restores only the named subtrees (paths joined by '/') and
        reads only their blocks.
        """
        self._check_open()
        with self._closing_race():
            return self._load_retrying(step, map_location, select)

    def _load_retrying(self, step: int | None, map_location: Any,
                       select: Sequence[str] | str | None) -> Any:
        if isinstance(select, str):
            select = [select]
        for attempt in range(3):
            packs_before = self._packs_state()
            try:
                return self._load_once(step, map_location, select)
            except (FileNotFoundError, CorruptionError) as exc:
                # a concurrent gc may have rewritten a pack we planned to read:
                # re-plan from the index; the step may be gone, or still damaged
                if step is not None and step not in self:
                    raise self._not_found(step) from None
                # no pack came or went since the plan: the damage is real, do not wait
                # (a remote store's _load_once has caught up with the listing already)
                if attempt == 2 or self._packs_state() == packs_before:
                    if isinstance(exc, FileNotFoundError):
                        what = f"step {step}" if step is not None else "the latest step"
                        raise CorruptionError(f"{self.location}: {what}: a pack the index "
                                              f"names is missing: {exc.filename or exc} (if "
                                              "the index is damaged, `deltackpt reindex "
                                              f"{self.location}` rebuilds it)") from exc
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    def _load_once(self, step: int | None, map_location: Any, select: Sequence[str] | None):
        with self._index.read() as conn:
            if step is None:
                row = conn.execute("SELECT MAX(step) FROM steps").fetchone()
                if row[0] is None:
                    raise StepNotFoundError(f"{self.location}: the store has no steps")
                step = int(row[0])
            step = self._step_arg(step)
            row = conn.execute("SELECT tree, manifest FROM steps WHERE step=?",
                               (step,)).fetchone()
            if row is None:
                raise self._not_found(step)
            rows = conn.execute(
                "SELECT idx, path, kind, dtype, shape, nbytes, block_size, blocks "
                "FROM entries WHERE step=?", (step,)).fetchall()
            self._check_index_rows(step, row[0], row[1], rows)
            with _index_damage(self, step):
                tree = json.loads(row[0])
                if select:
                    try:
                        tree = select_tree(tree, list(select))
                    except KeyError as exc:
                        raise PathNotFoundError(f"{self.location}: step {step} has no path "
                                                f"{exc.args[0]}") from None
                wanted = entry_indices(tree)
                attrs_of = dict(entry_nodes(tree))
            by_idx = {r[0]: r for r in rows}
            missing = [i for i in wanted if i not in by_idx]
            if missing:
                raise CorruptionError(f"{self.location}: step {step}: index lacks entries "
                                      f"{missing[:5]} referenced by its tree; rebuild it with "
                                      f"`deltackpt reindex {self.location}`")
            needed_ids = set()
            with _index_damage(self, step):
                for i in wanted:
                    needed_ids.update(unpack_ids(by_idx[i][7]))
            locations = self._locate(conn, needed_ids)
        outputs: dict[int, Any] = {}
        tasks: list[tuple[bytes, np.ndarray, str]] = []
        devices: dict[int, str] = {}
        for i in wanted:
            _, path, kind, dtype, shape_s, nbytes, bsize, blob = by_idx[i]
            label = f"{self.location}: step {step}, entry '{path}'"
            # everything an index row claims is checked before anything is allocated for it
            shape = _checked_shape(kind, dtype, shape_s, nbytes, label)
            ids = unpack_ids(blob)
            spans = []
            pos = 0
            for bid in ids:
                loc = locations.get(bid)
                if loc is None:
                    raise CorruptionError(f"{label}: block {bid.hex()[:12]} missing from the "
                                          "index")
                _check_location(loc, f"{label}: block {bid.hex()[:12]}")
                spans.append((bid, pos, pos + loc.raw_len))
                pos += loc.raw_len
            if pos != nbytes:
                raise CorruptionError(f"{label}: blocks hold {pos} bytes, entry has {nbytes}")
            out = empty_output(kind, dtype, shape, where=label)
            view = output_bytes(out)
            tasks.extend((bid, view[a:b], f"step {step}, entry '{path}'") for bid, a, b in spans)
            outputs[i] = out
            devices[i] = attrs_of.get(i, {}).get("device", "cpu")
        self._decode_blocks(tasks, locations)
        values = {}
        for i, out in outputs.items():
            _, path, kind = by_idx[i][:3]
            value = finish_output(kind, out, attrs_of.get(i, {}),
                                  f"{self.location}: step {step}, entry '{path}'")
            values[i] = move(value, map_location, devices[i])
        with _index_damage(self, step):
            return unflatten(tree, values)

    def _locate(self, conn, ids: Iterable[bytes]) -> dict[bytes, _Location]:
        """Locations of blocks and, transitively, of their delta bases."""
        out: dict[bytes, _Location] = {}
        todo = list(set(ids))
        while todo:
            nxt = set()
            for batch in chunked(todo, 500):
                marks = ",".join("?" * len(batch))
                for bid, pack, off, ln, raw, base, depth in conn.execute(
                        "SELECT b.id, p.name, b.offset, b.length, b.raw_len, b.base, b.depth "
                        f"FROM blocks b JOIN packs p ON p.id = b.pack_id WHERE b.id IN ({marks})",
                        batch):
                    out[bid] = _Location(pack, off, ln, raw, base, depth)
                    if base is not None and base not in out:
                        nxt.add(base)
            todo = [b for b in nxt if b not in out]
            if any(b not in out for b in todo) and not todo:
                break
        return out

    def _decode_blocks(self, tasks: list[tuple[bytes, np.ndarray, str]],
                       locations: dict[bytes, _Location]) -> None:
        decoder = _Decoder(self, locations, [t[0] for t in tasks])
        if len(tasks) <= 1 or self._threads == 1:
            for t in tasks:
                decoder.decode_to(*t)
            return
        # hand out work in order of pack offset: sequential reads, warm caches
        order = sorted(tasks, key=lambda t: (locations[t[0]].pack, locations[t[0]].offset))
        futures = [self._pool.submit(decoder.decode_to, *t) for t in order]
        wait_all(futures)

    def _check_index_rows(self, step: int, tree_text: Any, manifest: Any,
                          rows: list[tuple]) -> None:
        """Refuse index rows of ``step`` that its checksummed manifest contradicts.

        SQLite keeps no checksums: a flipped bit in a row reads back as another valid value
        (a renamed key, a different shape). A missing or damaged manifest cannot vouch for
        the rows, which are then used as they are (``verify`` reports the manifest).
        """
        try:
            payload = decode_manifest(_read_current(self.backend, manifest), manifest)
        except (OSError, FormatVersionError, InvalidStoreError, TypeError):
            return
        why = _index_disagrees(payload, step, tree_text, rows)
        if why is not None:
            raise IndexDisagreesError(
                f"{self._index.path}: step {step}: the index disagrees with manifest "
                f"{manifest} ({why}); the index is damaged: rebuild it with "
                f"`deltackpt reindex {self.location}`")

    def read_frame(self, bid: bytes, loc: _Location, where: str) -> bytes:
        label = f"{self.location}: {where}, block {bid.hex()[:12]}"
        _check_location(loc, label)
        try:
            return self.backend.read(loc.pack, loc.offset, loc.length)
        except FileNotFoundError:
            raise
        except CorruptionError as exc:
            raise CorruptionError(f"{label}: {exc}") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CorruptionError(f"{label}: {loc.pack} is a symbolic link; a store never "
                                      "holds one and deltackpt does not follow it") from None
            # EIO, EMFILE...: name the store, block and pack (verify lists it as a problem)
            raise StorageError.caused_by(
                f"{label}: reading {loc.pack} failed: {exc.strerror or exc}", exc) from exc

    # -- verify ---------------------------------------------------------------
    def verify(self, step: int | None = None, progress: Any = None) -> VerifyResult:
        """Re-read and re-hash every block of ``step`` (default: all steps).

        ``progress``: an object with tqdm's ``total`` and ``update(n)`` (raw bytes checked).

        Each block is decoded once, through its whole delta chain; problems name
        the step, entry and short block id. Never raises for damage it finds. Beside a
        writer, a pass whose plan a delete or gc outdated (a manifest or pack gone in the
        meantime) is run again from a fresh plan (3 passes at most), so that only damage
        is reported.
        """
        self._check_open()
        with self._closing_race():
            for attempt in range(3):
                before = self._packs_state(_CHANGES_SQL)
                result = self._verify_once(step, progress if attempt == 0 else None)
                if result.ok or attempt == 2 or not self._worth_replanning(before, _CHANGES_SQL):
                    return result
        raise AssertionError("unreachable")

    def _verify_once(self, step: int | None, progress: Any) -> VerifyResult:
        result = VerifyResult()
        with self._index.read() as conn:
            if step is not None:
                step = self._step_arg(step)
                rows = conn.execute("SELECT step, manifest, tree FROM steps WHERE step=?",
                                    (step,)).fetchall()
                if not rows:
                    raise self._not_found(step)
            else:
                rows = conn.execute("SELECT step, manifest, tree FROM steps "
                                    "ORDER BY step").fetchall()
            users: dict[bytes, list[tuple[int, str]]] = {}
            entry_rows: dict[int, list[tuple]] = {}
            for s, _, _ in rows:
                entry_rows[s] = conn.execute(
                    "SELECT idx, path, kind, dtype, shape, nbytes, block_size, blocks "
                    "FROM entries WHERE step=? ORDER BY idx", (s,)).fetchall()
                for _i, path, _k, _d, _sh, _n, _bs, blob in entry_rows[s]:
                    try:
                        ids = unpack_ids(blob)
                    except ValueError:
                        result.problems.append(f"step {s}, entry '{path}': malformed block list")
                        continue
                    for bid in ids:
                        users.setdefault(bid, []).append((s, path))
            locations = self._locate(conn, users.keys())
            packs = conn.execute("SELECT name, size FROM packs").fetchall()
        damaged: set[int] = set()
        result.steps_checked = len(rows)
        for s, manifest, tree_text in rows:
            try:
                payload = decode_manifest(_read_current(self.backend, manifest), manifest)
                if payload.get("step") != s:
                    raise CorruptionError(f"{manifest}: names step {payload.get('step')}")
            except (OSError, FormatVersionError, InvalidStoreError, TypeError) as exc:
                result.problems.append(f"step {s}: manifest {manifest}: {exc}")
                damaged.add(s)
                continue
            why = _index_disagrees(payload, s, tree_text, entry_rows[s])
            if why is not None:
                result.problems.append(
                    f"step {s}: the index ({self._index.path}) disagrees with manifest "
                    f"{manifest}: {why}; rebuild it with `deltackpt reindex {self.location}`")
                damaged.add(s)
        # a pack whose magic or size changed is damaged even where no frame read shows it
        bad_packs = {}
        for name, size in packs:
            try:
                if not isinstance(name, str):
                    raise InvalidStoreError(f"invalid object name {name!r}")
                actual = self.backend.size(name)
                ok = actual == size and self.backend.read(name, 0, len(PACK_MAGIC)) == PACK_MAGIC
                why = f"{actual} bytes, the index recorded {size}" if actual != size \
                    else "bad magic"
            except (OSError, InvalidStoreError, TypeError) as exc:
                ok, why = False, str(exc)
            if ok:
                why = self._pack_index_problem(
                    name, size, [(b, loc) for b, loc in locations.items() if loc.pack == name])
                ok = why is None
            if not ok:
                bad_packs[name] = why
        if bad_packs:
            # blocks it still holds intact decode below; only those that do not damage steps
            steps_of: dict[str, set[int]] = {}
            for bid, who in users.items():
                loc = locations.get(bid)
                if loc is not None and loc.pack in bad_packs:
                    steps_of.setdefault(loc.pack, set()).update(s for s, _ in who)
            for name, why in sorted(bad_packs.items()):
                result.problems.append(f"pack {name} (blocks of steps "
                                       f"{_short_list(sorted(steps_of.get(name, ())))}): {why}")
        for bid, who in users.items():
            if bid not in locations:
                for s, path in who:
                    result.problems.append(f"step {s}, entry '{path}': block "
                                           f"{bid.hex()[:12]} missing from the index")
                    damaged.add(s)
        checkable = [b for b in users if b in locations]
        # every block hop by hop: verify names the damaged frame and checks each id
        decoder = _Decoder(self, locations, checkable, fold_runs=False)

        def check(bid: bytes) -> str | None:
            loc = locations[bid]
            try:
                _check_location(loc, f"block {bid.hex()[:12]}")
                scratch = np.empty(loc.raw_len, dtype=np.uint8)
                decoder.decode_to(bid, scratch, "verify")
            except (CorruptionError, FileNotFoundError, DeltackptError) as exc:
                return str(exc)
            return None

        if progress is not None:
            progress.total = sum(locations[b].raw_len for b in checkable)
        for bid, err in zip(checkable, self._pool.map(check, checkable)):
            if progress is not None:
                progress.update(locations[bid].raw_len)
            result.blocks_checked += 1
            result.bytes_checked += locations[bid].raw_len
            if err is not None:
                for s, path in users[bid]:
                    result.problems.append(f"step {s}, entry '{path}': block "
                                           f"{bid.hex()[:12]}: {err}")
                    damaged.add(s)
        result.damaged_steps = sorted(damaged)
        return result

    def _pack_index_problem(self, name: str, size: int,
                            located: list[tuple[bytes, _Location]]) -> str | None:
        """Why the pack index of ``name`` is damaged, or None. A pack without one (older
        writers) must end with its last frame; one with one must list every frame the
        index locates in it. Loads never read it; reindex falls back to the frames."""
        try:
            listed = read_pack_index(self.backend, name, size)
            if listed is not None:
                frames = {(off, info.frame_len): info.block_id for info, off in listed}
                for bid, loc in located:
                    if frames.get((loc.offset, loc.length)) != bid:
                        return (f"its pack index does not list block {bid.hex()[:12]} at "
                                f"{loc.offset}+{loc.length}")
                return None
            # no valid pack index: walk the frames past the last one the index knows
            end = max((loc.offset + loc.length for _, loc in located), default=len(PACK_MAGIC))
            while end < size:
                head = self.backend.read(name, end, min(MAX_FRAME_HEADER, size - end))
                info = codec_mod.parse_header(head, f"{name}@{end}")
                end += info.frame_len
        except (CorruptionError, OSError):
            end = -1
        if end != size:
            return "damaged pack index (reindex falls back to reading every frame header)"
        return None

    # -- delete / gc ----------------------------------------------------------
    @_storage_errors("delete", step_arg=0)
    def delete(self, step: int) -> None:
        """Remove a step from the index (and its manifest). Space returns at :meth:`gc`.

        Never breaks another step: blocks it shares, and delta bases of live
        blocks, stay until no live step needs them.
        """
        self._check_open()
        step = self._step_arg(step)
        with self._mutex:
            self._become_writer()
            with self._index.write() as conn:
                row = conn.execute("SELECT manifest FROM steps WHERE step=?", (step,)).fetchone()
                if row is None:
                    raise self._not_found(step)
                conn.execute("DELETE FROM entries WHERE step=?", (step,))
                conn.execute("DELETE FROM steps WHERE step=?", (step,))
                crash_point("delete:before-commit")
            crash_point("delete:after-commit")
            self.backend.delete(row[0])
            self.backend.sync()
            if not self._index_shared:
                return
            with self._index.write() as conn:
                # a process sharing this index (a remote store's cache) may have added the
                # step back from its still-listed manifest in between: remove it again
                conn.execute("DELETE FROM entries WHERE step=? AND step IN "
                             "(SELECT step FROM steps WHERE manifest=?)", (step, row[0]))
                conn.execute("DELETE FROM steps WHERE step=? AND manifest=?", (step, row[0]))

    @_storage_errors("thin", step_arg=0)
    def thin(self, step: int, keep: Sequence[str] | str) -> int:
        """Keep only the subtrees ``keep`` of ``step`` (e.g. ``["model"]``); drop the rest.

        The step stays loadable (with just those subtrees); the space of what was
        dropped returns at :meth:`gc`. Returns the number of entries removed.
        """
        self._check_open()
        step = self._step_arg(step)
        keep = [keep] if isinstance(keep, str) else list(keep)
        with self._mutex:
            self._become_writer()
            with self._index.read() as conn:
                row = conn.execute("SELECT tree, metrics, tags, note, created_at, parent, "
                                   "manifest FROM steps WHERE step=?", (step,)).fetchone()
                if row is None:
                    raise self._not_found(step)
                tree_json, metrics, tags, note, created, parent, manifest = row
                try:
                    tree = select_tree(json.loads(tree_json), keep)
                except KeyError as exc:
                    raise PathNotFoundError(f"{self.location}: step {step} has no path "
                                            f"{exc.args[0]}") from None
                kept = set(entry_indices(tree))
                rows = conn.execute(
                    "SELECT idx, path, kind, dtype, shape, nbytes, block_size, blocks "
                    "FROM entries WHERE step=? ORDER BY idx", (step,)).fetchall()
            gone = [r[0] for r in rows if r[0] not in kept]
            if not gone and tree == json.loads(tree_json):
                return 0
            payload = {
                "manifest_version": MANIFEST_VERSION, "step": step, "created_at": created,
                "metrics": json.loads(metrics), "tags": json.loads(tags), "note": note,
                "parent": parent, "tree": tree,
                "entries": [{"idx": i, "path": p, "kind": k, "dtype": d, "shape": json.loads(s),
                             "nbytes": n, "block_size": bs, "blocks": bl.hex()}
                            for i, p, k, d, s, n, bs, bl in rows if i in kept],
            }
            generation = self._manifest_generation(manifest)
            if generation is not None:  # the keyframe clock a rebuilt index goes on from
                payload["generation"] = generation
            # the manifest first: a crash between the two leaves a thinned manifest for a
            # full index row, which only ever loses what the caller asked to drop
            self.backend.put(manifest, encode_manifest(payload))
            self.backend.sync()
            crash_point("thin:after-manifest")
            with self._index.write() as conn:
                self._manifest_written(conn, manifest)
                for batch in chunked(gone, 500):
                    marks = ",".join("?" * len(batch))
                    conn.execute(f"DELETE FROM entries WHERE step=? AND idx IN ({marks})",
                                 [step, *batch])
                conn.execute(
                    "UPDATE steps SET tree=?, logical_bytes=(SELECT COALESCE(SUM(nbytes), 0) "
                    "FROM entries WHERE step=?) WHERE step=?",
                    (json.dumps(tree, separators=(",", ":")), step, step))
                summaries.record(conn, [step])
                crash_point("thin:before-commit")
            crash_point("thin:after-commit")
            return len(gone)

    def best(self, metric: str, mode: str = "min") -> int | None:
        """The step with the best value of ``metric`` (``"min"`` or ``"max"``).

        Steps without the metric, or with a NaN/non-numeric value, never win; ties
        go to the latest step. None when no step has the metric.
        """
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', not {mode!r}")
        best_step, best_value = None, None
        for info in self.log():
            v = info.metrics.get(metric)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
                continue
            if best_value is None or (v <= best_value if mode == "min" else v >= best_value):
                best_step, best_value = info.step, v
        return best_step

    def prune(self, policy: Any, protect: Iterable[int] = ()) -> tuple[list[int], list[int]]:
        """Apply a retention policy or one rule (see :mod:`deltackpt.retention`): delete
        and thin steps, then gc. Returns (deleted, thinned)."""
        from .retention import prune

        return prune(self, policy, protect)

    def live_blocks(self) -> set[bytes]:
        """Ids of every block a committed step needs, delta bases included."""
        live: set[bytes] = set()
        with self._index.read() as conn:
            for (blob,) in conn.execute("SELECT blocks FROM entries"):
                live.update(unpack_ids(blob))
            frontier = list(live)
            while frontier:
                nxt = []
                for batch in chunked(frontier, 500):
                    marks = ",".join("?" * len(batch))
                    for (base,) in conn.execute(
                            f"SELECT base FROM blocks WHERE id IN ({marks}) AND base IS NOT NULL",
                            batch):
                        if base not in live:
                            live.add(base)
                            nxt.append(base)
                frontier = nxt
        return live

    @_storage_errors("gc")
    def gc(self, repack_threshold: float = 0.5, progress: Any = None) -> GcResult:
        """Reclaim the space of deleted steps and of crashed saves.

        Removes blocks no live step needs, deletes packs with no live block,
        rewrites packs whose live fraction is below ``repack_threshold`` (new pack
        first, index switch in one transaction, old pack last), and deletes
        leftover objects (unreferenced packs and manifests, ``*.partial``).
        """
        self._check_open()
        with self._mutex:
            self._become_writer()
            live = self.live_blocks()
            rows = self._index.query(
                "SELECT b.id, b.pack_id, b.length, p.name, p.size FROM blocks b "
                "JOIN packs p ON p.id = b.pack_id")
            packs: dict[int, dict] = {}
            dead: list[bytes] = []
            for bid, pid, length, name, size in rows:
                pk = packs.setdefault(pid, {"name": name, "size": size, "live": 0, "blocks": []})
                if bid in live:
                    pk["live"] += length
                    pk["blocks"].append(bid)
                else:
                    dead.append(bid)
            for pid, name, size in self._index.query("SELECT id, name, size FROM packs"):
                packs.setdefault(pid, {"name": name, "size": size, "live": 0, "blocks": []})
            crash_point("gc:after-scan")
            freed = 0
            empty = [pid for pid, pk in packs.items() if pk["live"] == 0]
            # a pack's own bytes (magic, pack index, footer) are no waste: counted, a
            # threshold near 1 would rewrite fully live packs at every gc
            sparse = [pid for pid, pk in packs.items()
                      if pk["live"] and pk["live"] < repack_threshold * pk["size"]
                      and pk["live"] < pack_frame_bytes(self.backend, pk["name"], pk["size"])]
            with self._index.write() as conn:
                for batch in chunked(dead, 500):
                    marks = ",".join("?" * len(batch))
                    conn.execute(f"DELETE FROM blocks WHERE id IN ({marks})", batch)
                for pid in empty:
                    conn.execute("DELETE FROM packs WHERE id=?", (pid,))
            crash_point("gc:after-index-commit")
            self._repack_written = 0
            if progress is not None:  # tqdm-like: frame bytes copied by the repack
                progress.total = sum(packs[pid]["live"] for pid in sparse)
            rewritten = self._repack(sparse, packs, progress) if sparse else []
            freed -= self._repack_written
            doomed = [packs[pid]["name"] for pid in empty] + rewritten
            for i, name in enumerate(doomed):
                freed += packs_size(self.backend, name)
                self.backend.delete(name)
                if i == 0:
                    crash_point("gc:mid-delete")
            # leftovers: objects the index does not reference (never the packs this gc just
            # wrote, whatever the index says by now)
            written_now = self._repack_new if sparse else set()
            known_packs = {r[0] for r in self._index.query("SELECT name FROM packs")}
            known_manifests = {r[0] for r in self._index.query("SELECT manifest FROM steps")}
            leftovers = 0
            names = self.backend.list(PACK_PREFIX) + self.backend.list(MANIFEST_PREFIX) \
                if self._may_delete_leftovers() else []
            for name in names:
                base = name[:-len(PARTIAL_SUFFIX)] if name.endswith(PARTIAL_SUFFIX) else None
                if base is None and (name in known_packs or name in known_manifests
                                     or name in written_now):
                    continue
                freed += packs_size(self.backend, name)
                self.backend.delete(name)
                leftovers += 1
            self.backend.sync()
            crash_point("gc:after-delete")
            return GcResult(freed, len(dead), len(empty) + len(rewritten), len(rewritten),
                            leftovers)

    def _repack(self, pids: list[int], packs: dict[int, dict],
                progress: Any = None) -> list[str]:
        """Copy the live frames of sparse packs into new packs; returns the old names."""
        moves: list[tuple[bytes, str, int, int]] = []
        writer = PackWriter(self.backend, self._pack_size)
        try:
            for pid in pids:
                name = packs[pid]["name"]
                locs = self._index.query(
                    "SELECT id, offset, length FROM blocks WHERE pack_id=? ORDER BY offset",
                    (pid,))
                live = set(packs[pid]["blocks"])
                for bid, off, ln in locs:
                    if bid not in live:
                        continue
                    frame = self.backend.read(name, off, ln)
                    info = codec_mod.parse_header(frame, f"{name}@{off}")
                    if info.block_id != bid:
                        raise CorruptionError(f"{self.location}: {name}@{off}: frame holds block "
                                              f"{info.block_id.hex()[:12]}, index says "
                                              f"{bid.hex()[:12]}; run verify")
                    pack, new_off, new_len = writer.add([frame])
                    moves.append((bid, pack, new_off, new_len))
                    if progress is not None:
                        progress.update(ln)
                    if len(moves) == 1:
                        crash_point("gc:mid-repack-write")
            new_packs = writer.finish()
            self._repack_written = sum(size for _, size in new_packs)
            self._repack_new = {name for name, _ in new_packs}
            self.backend.sync()
        except BaseException:
            writer.abort()
            raise
        crash_point("gc:after-repack-write")
        now = time.time()
        with self._index.write() as conn:
            ids = {}
            for name, size in new_packs:
                ids[name] = conn.execute("INSERT INTO packs(name, size, created_at) "
                                         "VALUES (?, ?, ?)", (name, size, now)).lastrowid
            conn.executemany("UPDATE blocks SET pack_id=?, offset=?, length=? WHERE id=?",
                             [(ids[p], o, ln, bid) for bid, p, o, ln in moves])
            for pid in pids:
                conn.execute("DELETE FROM packs WHERE id=?", (pid,))
        crash_point("gc:after-repack-commit")
        return [packs[pid]["name"] for pid in pids]

    # -- sizes ------------------------------------------------------------------
    def stored_bytes(self) -> int:
        """Bytes of all packs the index references."""
        row = self._index.query("SELECT COALESCE(SUM(size), 0) FROM packs")
        return int(row[0][0])

    # -- steps whose frames other processes wrote (deltackpt.dcp) ---------------
    def commit_external(
        self,
        step: int,
        tree: Any,
        entries: Sequence[dict[str, Any]],
        blocks: dict[bytes, tuple[str, int, int, int, str, bytes | None, int]],
        packs: Sequence[tuple[str, int]],
        parent: int | None,
        metrics: dict[str, Any] | None = None,
        tags: Sequence[str] | None = None,
        note: str | None = None,
        generation: int | None = None,
    ) -> SaveResult:
        """Commit a step whose frames other processes appended to packs of this store.

        ``entries``: one dict per entry (``idx, path, kind, dtype, shape, nbytes,
        block_size, blocks`` = the concatenated ids), in ``idx`` order; ``blocks``:
        the new blocks, id -> (pack, offset, length, raw_len, codec, base, depth) as
        :meth:`save` records them; ``packs``: ``[(name, size)]`` holding them, already
        durable. Every new frame header, pack size, block reference and entry size is
        checked before the manifest and the one transaction that make the step
        visible, so a lying or crashed writer yields an error, never a bad step.
        ``generation``: the keyframe clock the writers encoded with (default: the index's).
        """
        self._check_open()
        if generation is not None and (not isinstance(generation, int)
                                       or summaries.parse_generation(generation) is None):
            raise ValueError(f"generation must be an int in [0, 2**62), got {generation!r}")
        t0 = time.perf_counter()
        step, metrics_json, tags_list = self._step_record_args(step, metrics, tags, note)
        where = f"{self.location}: step {step}"
        tree_json = json.dumps(tree, separators=(",", ":"), allow_nan=False)
        by_idx = {int(e["idx"]): e for e in entries}
        if len(by_idx) != len(entries) or sorted(entry_indices(tree)) != sorted(by_idx):
            raise CorruptionError(f"{where}: the tree and the entries name different indices")
        with self._mutex:
            self._check_open()
            self._become_writer()
            if step in self:
                raise StepExistsError(f"{where} already exists; delete it first or save "
                                      "under another step")
            sizes = {str(n): int(s) for n, s in packs}
            for name, size in sizes.items():
                try:
                    actual = self.backend.size(name)
                except FileNotFoundError:
                    raise CorruptionError(f"{where}: pack {name} is missing") from None
                if actual != size:
                    raise CorruptionError(f"{where}: pack {name} has {actual} bytes, its "
                                          f"writer reported {size}")
            # the frame headers, from each pack's index (one read per pack, not one per
            # frame: a ranged GET each on object storage); a frame the index does not list
            # (a pack without one) is read where it lies
            listed: dict[tuple[str, int], FrameInfo] = {}
            items = list(sizes.items())
            if len(items) > 1 and self._threads > 1:  # object storage: GETs in parallel
                found = list(self._pool.map(lambda nv: read_pack_index(self.backend, *nv),
                                            items))
            else:
                found = [read_pack_index(self.backend, n, v) for n, v in items]
            for (name, _size), frames in zip(items, found):
                for info, off in frames or ():
                    listed[(name, off)] = info
            for bid, (pack, off, length, raw, _codec, base, _depth) in blocks.items():
                label = f"{where}: block {bid.hex()[:12]} at {pack}@{off}"
                if pack not in sizes or off < len(PACK_MAGIC) or off + length > sizes[pack]:
                    raise CorruptionError(f"{label}: outside the packs of this step")
                info = listed.get((pack, off))
                if info is None:
                    head = self.backend.read(pack, off, min(MAX_FRAME_HEADER, length))
                    info = codec_mod.parse_header(head, label, max_raw=raw)
                if (info.block_id, info.base_id or None, info.raw_len, info.frame_len) != \
                        (bid, base, raw, length):
                    raise CorruptionError(f"{label}: the frame differs from what its writer "
                                          "reported")
            # a writer with a stale view of the index (a rank whose object-storage cache
            # lagged behind) may report blocks the store already holds: the stored copy
            # stays; the extra frame is dead weight in its pack, reclaimed by gc
            known = self._known_blocks(blocks)
            blocks = {bid: v for bid, v in blocks.items() if bid not in known}
            wanted = {b for e in entries for b in unpack_ids(e["blocks"])}
            wanted.update(v[5] for v in blocks.values() if v[5] is not None)
            raw_lens = {bid: v[3] for bid, v in blocks.items()}
            for batch in chunked([b for b in wanted if b not in blocks], 500):
                marks = ",".join("?" * len(batch))
                raw_lens.update(self._index.query(
                    f"SELECT id, raw_len FROM blocks WHERE id IN ({marks})", batch))
            for e in entries:
                ids = unpack_ids(e["blocks"])
                missing = [b for b in ids if b not in raw_lens]
                if missing:
                    raise CorruptionError(f"{where}, entry '{e['path']}': block "
                                          f"{missing[0].hex()[:12]} is neither new nor stored")
                if sum(raw_lens[b] for b in ids) != e["nbytes"]:
                    raise CorruptionError(f"{where}, entry '{e['path']}': blocks do not add "
                                          f"up to its {e['nbytes']} bytes")
            for bid, v in blocks.items():
                if v[5] is not None and v[5] not in raw_lens:
                    raise CorruptionError(f"{where}: delta base {v[5].hex()[:12]} of block "
                                          f"{bid.hex()[:12]} is not stored")
            blocks = self._with_true_depths(blocks, where)
            created = time.time()
            manifest = self._free_manifest_name(step)
            rows = [(step, int(e["idx"]), e["path"], e["kind"], e["dtype"],
                     json.dumps(list(e["shape"])), int(e["nbytes"]), int(e["block_size"]),
                     bytes(e["blocks"])) for e in sorted(entries, key=lambda e: int(e["idx"]))]
            payload = {
                "manifest_version": MANIFEST_VERSION, "step": step, "created_at": created,
                "metrics": json.loads(metrics_json), "tags": tags_list, "note": note,
                "parent": parent, "tree": tree,
                **({"generation": generation} if generation is not None else {}),
                "entries": [{"idx": r[1], "path": r[2], "kind": r[3], "dtype": r[4],
                             "shape": json.loads(r[5]), "nbytes": r[6], "block_size": r[7],
                             "blocks": r[8].hex()} for r in rows],
            }
            self.backend.put(manifest, encode_manifest(payload))
            self.backend.sync()
            logical = sum(r[6] for r in rows)
            total = sum(len(r[8]) // ID_SIZE for r in rows)
            written = sum(v[2] for v in blocks.values())
            with self._index.write() as conn:
                self._commit_step_rows(
                    conn, step, manifest, created, (metrics_json, tags_list, note, tree_json),
                    list(sizes.items()), blocks, rows, written, parent, generation)
            return SaveResult(step, logical, written, len(blocks), total,
                              time.perf_counter() - t0)

    def _commit_step_rows(self, conn: Any, step: int, manifest: str, created: float,
                          record: tuple[str, list[str], str | None, str],
                          packs: Sequence[tuple[str, int]], blocks: dict[bytes, tuple],
                          entry_rows: list[tuple], written: int, parent: int | None,
                          generation: int | None) -> None:
        """In the commit's index transaction: the rows of ``step``, whose manifest was just
        written (``record``: metrics JSON, tags, note, tree JSON; ``blocks``: the new ones,
        id -> (pack, offset, length, raw_len, codec, base, depth), in ``packs``)."""
        self._manifest_written(conn, manifest)
        if self._taken_in_already(conn, step, manifest, created):
            return
        metrics_json, tags_list, note, tree_json = record
        # blocks still here from a deleted step of the same number (no gc since) are not
        # this save's: they must not count as what it wrote (stats, a cache's own packs)
        conn.execute("UPDATE blocks SET first_step = ? WHERE first_step = ?",
                     (FIRST_STEP_REUSED, step))
        pack_ids = {name: conn.execute(
            "INSERT INTO packs(name, size, created_at) VALUES (?, ?, ?)",
            (name, size, created)).lastrowid for name, size in packs}
        summaries.insert_blocks(
            conn, [(bid, pack_ids[pk], off, ln, raw, cd, base, depth, step)
                   for bid, (pk, off, ln, raw, cd, base, depth) in blocks.items()])
        summaries.insert_step(
            conn, step, created_at=created, metrics_json=metrics_json,
            tags_json=json.dumps(tags_list), note=note, tree_json=tree_json, written=written,
            new_chunks=len(blocks), parent=parent, manifest=manifest, entry_rows=entry_rows)
        summaries.record(conn, [step])
        summaries.advance_delta_generation(conn, generation, step)

    #: whether other processes write this index too (a remote store's cache directory)
    _index_shared = False

    def _taken_in_already(self, conn: Any, step: int, manifest: str, created: float) -> bool:
        """Whether, in a commit's index transaction, another process sharing the index took
        the step in from the manifest this commit has just written (a remote store's cache):
        then its rows are this commit's, and inserting them again would fail it."""
        if not self._index_shared:
            return False
        row = conn.execute("SELECT manifest, created_at FROM steps WHERE step=?",
                           (step,)).fetchone()
        return row is not None and row[0] == manifest and row[1] == created

    def _may_delete_leftovers(self) -> bool:
        """Whether gc may trust this index to name every committed object now (a remote
        store's cache that another process rewrote during the gc may not)."""
        return True

    def _manifest_written(self, conn: Any, manifest: str) -> None:
        """Called inside the index transaction that commits what ``manifest`` (just
        written) says; a remote store's cache records the manifest's ETag there."""

    def _block_depths(self, ids: set[bytes]) -> dict[bytes, int]:
        """id -> ``blocks.depth`` of those of ``ids`` the index has."""
        out: dict[bytes, int] = {}
        for batch in chunked(list(ids), 500):
            marks = ",".join("?" * len(batch))
            out.update(self._index.query(
                f"SELECT id, depth FROM blocks WHERE id IN ({marks})", batch))
        return out

    def _shortest_copies(self, copies: dict[bytes, list[tuple]]) -> dict[bytes, tuple]:
        """One location per block id, of the copies writers reported ((pack, offset, length,
        raw_len, codec, base, depth)): the one whose base has the shortest chain in this
        index (a keyframe first), the first reported on a tie."""
        depth_of = self._block_depths(
            {c[5] for cs in copies.values() if len(cs) > 1 for c in cs if c[5] is not None})

        def chain(c: tuple) -> int:
            return 0 if c[5] is None else depth_of.get(c[5], MAX_CHAIN_HOPS) + 1

        return {bid: min(cs, key=chain) if len(cs) > 1 else cs[0]
                for bid, cs in copies.items()}

    def _with_true_depths(self, blocks: dict[bytes, tuple], where: str,
                          ) -> dict[bytes, tuple]:
        """``blocks`` (new, id -> (pack, offset, length, raw_len, codec, base, depth)) with
        each depth computed from this index rather than taken from the writer: a rank whose
        cache holds another copy of a base (a block two ranks wrote) sees another chain."""
        depth_of = self._block_depths(
            {v[5] for v in blocks.values() if v[5] is not None and v[5] not in blocks})
        out = {}
        for bid in blocks:
            chain = []
            cur: bytes | None = bid
            while cur is not None and cur in blocks and cur not in depth_of:
                chain.append(cur)
                cur = blocks[cur][5]
                if len(chain) > len(blocks):
                    raise CorruptionError(f"{where}: the new blocks' delta bases form a cycle")
            d = -1 if cur is None else depth_of[cur]
            for b in reversed(chain):
                d += 1
                depth_of[b] = d
            if depth_of[bid] > MAX_CHAIN_HOPS:
                raise CorruptionError(f"{where}: block {bid.hex()[:12]} would end a delta chain "
                                      f"of {depth_of[bid]} hops (readers stop at "
                                      f"{MAX_CHAIN_HOPS}); nothing was committed")
            v = blocks[bid]
            out[bid] = (*v[:6], depth_of[bid])
        return out

    # -- export / import / average (deltackpt.export, .importer, .average) ------
    def iter_entries(self, step: int | None = None, select: Sequence[str] | str | None = None,
                     ) -> Iterator[tuple[str, Any]]:
        """(path, CPU value) for each array entry of ``step`` (default: latest), decoded a
        window at a time, not the whole step; see :func:`deltackpt.export.iter_entries`."""
        from .export import iter_entries

        return iter_entries(self, step, select)

    def export(self, out: str | os.PathLike, step: int | None = None,
               select: Sequence[str] | str | None = "model", *,
               max_shard_size: int | str | None = None,
               metadata: dict[str, str] | None = None, quiet: bool = True) -> Any:
        """Write ``step`` as .safetensors, a sharded directory or .pt and return an
        ``ExportResult``; see :func:`deltackpt.export.export`."""
        from .export import export

        return export(self, out, step, select, max_shard_size=max_shard_size,
                      metadata=metadata, quiet=quiet)

    def import_file(self, source: str | os.PathLike, step: int, *, prefix: str | None = None,
                    nest_keys: bool = True, metrics: dict[str, Any] | None = None,
                    tags: Sequence[str] | None = None, note: str | None = None) -> SaveResult:
        """Store a .safetensors file, sharded directory or .pt file as ``step``; see
        :func:`deltackpt.importer.import_file`."""
        from .importer import import_file

        return import_file(self, source, step, prefix=prefix, nest_keys=nest_keys,
                           metrics=metrics, tags=tags, note=note)

    def average(self, steps: Sequence[int], select: Sequence[str] | str | None = "model", *,
                ema: float | None = None, save_as: int | None = None,
                metrics: dict[str, Any] | None = None, tags: Sequence[str] | None = None,
                note: str | None = None) -> Any:
        """Mean (or EMA) of ``steps``' selection, optionally saved as step ``save_as``; see
        :func:`deltackpt.average.average`."""
        from .average import average

        return average(self, steps, select, ema=ema, save_as=save_as, metrics=metrics,
                       tags=tags, note=note)

class PathNotFoundError(DeltackptError, KeyError):
    """A ``select`` path names nothing in the step."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "path not found"


def packs_size(backend: Backend, name: str) -> int:
    try:
        return backend.size(name)
    except FileNotFoundError:
        return 0


class _BaseSource:
    """Raw bytes and chain facts of delta base blocks during a save, each decoded once."""

    def __init__(self, store: Store, base_ids: list[bytes]) -> None:
        self._store = store
        self._needed = base_ids
        self._decoder: _Decoder | None = None
        self._lock = threading.Lock()

    def _get_decoder(self) -> _Decoder:
        with self._lock:
            if self._decoder is None:
                with self._store._index.read() as conn:
                    locations = self._store._locate(conn, set(self._needed))
                # not keep_bases: a save after open decodes the parent's bases from the
                # packs, and holding them all would cost the size of the changed state
                self._decoder = _Decoder(self._store, locations, [])
            return self._decoder

    def location(self, bid: bytes) -> _Location | None:
        return self._get_decoder().locations.get(bid)

    def root(self, bid: bytes) -> bytes:
        """The keyframe at the end of ``bid``'s delta chain."""
        locs = self._get_decoder().locations
        seen = 0
        while True:
            loc = locs.get(bid)
            if loc is None or loc.base is None or seen > 10_000:
                return bid
            bid = loc.base
            seen += 1

    def get(self, bid: bytes) -> np.ndarray:
        cached = self._store._base_cache.get(bid)
        if cached is not None:
            return cached
        return self._get_decoder().take(bid)

    def clear(self) -> None:
        self._decoder = None


#: a delta frame at most this fraction of the raw block is kept without also trying
#: the standalone encoding (which costs as much again)
_DELTA_GOOD_ENOUGH = 0.7


#: a delta that beat the standalone frame by this margin last time is trusted without
#: trying the standalone encoding again (re-checked after every keyframe)
_DELTA_HINT_MARGIN = 0.97
#: a position whose delta did not beat its standalone frame by that margin is encoded
#: standalone only, without trying the delta, for this many saves before trying it again:
#: Adam's first moment at a 10-step interval (delta 0.81 of raw vs 0.82 standalone) would
#: otherwise cost two encodings per save for a 1 % gain (docs/benchmarks.md)
_DELTA_SKIP_SAVES = 3


def _run_sliced(pool: ThreadPoolExecutor | None, items: list, fn: Callable[[list], Any],
                slices: int = 4) -> None:
    """Apply ``fn`` to ``items`` in a few contiguous slices, on ``pool`` when given."""
    if pool is None or len(items) < 2:
        fn(items)
        return
    n = min(slices, len(items))
    parts = [items[i * len(items) // n:(i + 1) * len(items) // n] for i in range(n)]
    wait_all([pool.submit(fn, part) for part in parts])


def _encode_block(bid: bytes, raw: np.ndarray, width: int, cfg: StoreConfig,
                  parent_id: bytes | None, bases: _BaseSource, mode: int,
                  hints: dict[tuple[str, int], float] | None = None,
                  position: tuple[str, int] | None = None, slot: bool = False):
    """Encode one new block: as a delta when there is a base and that is smaller.

    ``slot``: this save is the position's staggered keyframe slot (delta.py)."""
    plan = None
    if parent_id is not None:
        parent = bases.location(parent_id)
        if parent is not None:
            plan = cfg.delta.plan(parent_id, parent.depth, bases.root, slot)
    hint = hints.get(position) if hints is not None and position is not None else None
    if plan is not None and hint is not None and hint < 0:
        # recent deltas at this position did not pay: standalone, one save fewer to skip
        hints[position] = hint + 1 if hint + 1 < 0 else 1.0  # type: ignore[index]
        plan = None
    base_raw = None
    if plan is not None:
        try:
            base_raw = bases.get(plan[0])
        except (CorruptionError, FileNotFoundError):
            base_raw = None  # a damaged base must not poison new saves
        if base_raw is not None and base_raw.nbytes != raw.nbytes:
            base_raw = None
    if plan is None or base_raw is None:
        parts = codec_mod.encode(raw, bid, width, cfg.codec)
        return parts, _codec_name(parts), None, 0
    base_id, depth = plan
    dparts = codec_mod.encode(raw, bid, width, cfg.codec, base=base_raw, base_id=base_id,
                              delta=mode)
    dlen = codec_mod.frame_length(dparts)
    if dlen <= _DELTA_GOOD_ENOUGH * raw.nbytes:
        return dparts, _codec_name(dparts), base_id, depth
    if hint is not None and 0 <= hint <= _DELTA_HINT_MARGIN and depth > 1:
        return dparts, _codec_name(dparts), base_id, depth
    parts = codec_mod.encode(raw, bid, width, cfg.codec)
    slen = codec_mod.frame_length(parts)
    if hints is not None and position is not None:
        ratio = dlen / max(slen, 1)
        # a hint is the last delta/standalone ratio (>= 0), or minus the saves left to skip
        hints[position] = ratio if ratio <= _DELTA_HINT_MARGIN else -float(_DELTA_SKIP_SAVES)
    if slen <= dlen:
        return parts, _codec_name(parts), None, 0
    return dparts, _codec_name(dparts), base_id, depth


def _codec_name(parts: list) -> str:
    return codec_mod.parse_header(parts[0]).codec


class _Decoder:
    """Decodes blocks (through their delta chains) with each base decoded once.

    Bases are reference-counted over the blocks this decoder was built for and
    dropped when their last user is done, so a load holds at most the bases
    that pending blocks still need.
    """

    def __init__(self, store: Store, locations: dict[bytes, _Location], block_ids: list[bytes],
                 keep_bases: bool = False, fold_runs: bool = True) -> None:
        self.store = store
        self.locations = locations
        self._lock = threading.Lock()
        self._cache: dict[bytes, Future] = {}
        self._refs: dict[bytes, int] = {}
        self._keep = keep_bases
        self._fold = fold_runs and not keep_bases
        # A base is released after its last direct user is decoded: one use per block
        # to decode, plus one per distinct base that is itself a delta (each base is
        # decoded once, so its own base is used once however many blocks share it).
        refs = self._refs
        pending: list[bytes] = []
        for bid in block_ids:
            loc = locations.get(bid)
            if loc is not None and loc.base is not None:
                refs[loc.base] = refs.get(loc.base, 0) + 1
                pending.append(loc.base)
        expanded: set[bytes] = set()
        while pending:
            bid = pending.pop()
            if bid in expanded or len(expanded) > len(locations):
                continue
            expanded.add(bid)
            loc = locations.get(bid)
            if loc is not None and loc.base is not None:
                refs[loc.base] = refs.get(loc.base, 0) + 1
                pending.append(loc.base)

    def _frame(self, bid: bytes, where: str) -> tuple[bytes, FrameInfo, _Location]:
        loc = self.locations.get(bid)
        if loc is None:
            raise CorruptionError(f"{self.store.location}: {where}: block {bid.hex()[:12]} "
                                  "missing from the index")
        frame = self.store.read_frame(bid, loc, where)
        label = f"{self.store.location}: {where}, block {bid.hex()[:12]} ({loc.pack}@{loc.offset})"
        info = codec_mod.parse_header(frame, label, max_raw=loc.raw_len)
        if info.block_id != bid:
            raise CorruptionError(f"{label}: frame holds block {info.block_id.hex()[:12]}")
        if (info.base_id or None) != loc.base:
            raise CorruptionError(f"{label}: frame's delta base differs from the index")
        return frame, info, loc

    def _check_chain(self, bid: bytes, where: str) -> None:
        """Refuse a cyclic or over-long delta chain before decoding it: a damaged
        index must fail with CorruptionError, not recurse or wait forever."""
        seen = {bid}
        loc = self.locations.get(bid)
        while loc is not None and loc.base is not None:
            if loc.base in seen or len(seen) > MAX_CHAIN_HOPS:
                raise CorruptionError(
                    f"{self.store.location}: {where}: block {bid.hex()[:12]} has a "
                    f"{'cyclic' if loc.base in seen else 'too long'} delta chain "
                    f"(more than {MAX_CHAIN_HOPS} hops)")
            seen.add(loc.base)
            loc = self.locations.get(loc.base)

    def decode_to(self, bid: bytes, out: np.ndarray, where: str) -> None:
        self._check_chain(bid, where)
        frame, info, loc = self._frame(bid, where)
        if self._fold and info.base_id is not None and codec_mod.composes_grouped(info, info):
            try:
                if self._decode_run(bid, frame, info, out, where):
                    return
            except CorruptionError:
                pass  # decode hop by hop below: it names the damaged frame
        base = None
        if info.base_id is not None:
            base = self.base(info.base_id, where)
        label = f"{self.store.location}: {where}, block {bid.hex()[:12]}"
        try:
            codec_mod.decode_into(frame, out, info, base, label, self.store.config.hash)
        finally:
            if info.base_id is not None:
                self._release(info.base_id)

    def _decode_run(self, bid: bytes, frame: bytes, info: FrameInfo, out: np.ndarray,
                    where: str) -> bool:
        """Decode a chain of byte-grouped XOR (or SUB) frames in the grouped domain.

        XOR works byte by byte, so it commutes with byte grouping: the XOR of the streams
        of every frame down the chain (ending in a grouped keyframe, or in a base decoded
        the usual way) is the block, grouped. SUB adds integers, so the planes are summed
        (16-bit) and shifted into place once (codec.add_streams_into). Either costs one
        un-grouping and one hash for the whole chain instead of one per hop (un-grouping
        is as costly as zstd here). Only bases that no other block of this decoder needs
        are folded in (they are never materialised); False when the direct base is needed
        elsewhere. A CorruptionError means "decode hop by hop to find the damaged frame",
        not necessarily this one.
        """
        base_id = info.base_id
        if out.nbytes != info.raw_len:
            return False  # the hop-by-hop decode reports the mismatch
        with self._lock:
            if base_id in self._cache or self._refs.get(base_id, 0) > 1:
                return False
        n, width = info.raw_len, info.width
        m = n // width
        label = f"{self.store.location}: {where}, block {bid.hex()[:12]}"
        if info.delta == DELTA_SUB:
            acc = np.empty(n, dtype=np.uint16)
            # the first frame, the folded ones and a terminal base: MAX_SUB_FOLD at most
            fold, limit = codec_mod.add_streams_into, min(MAX_CHAIN_HOPS,
                                                          codec_mod.MAX_SUB_FOLD - 2)
        else:
            acc = np.empty(n, dtype=np.uint8)
            fold, limit = codec_mod.xor_streams_into, MAX_CHAIN_HOPS
        fold(frame, info, acc, label, assign=True)
        cur: bytes | None = base_id
        folded: list[bytes] = []
        terminal: bytes | None = None
        while cur is not None:
            with self._lock:
                shared = cur in self._cache or self._refs.get(cur, 0) > 1
            if shared or len(folded) >= limit:
                terminal = cur
                break
            hop_where = f"{where} (delta base)"
            f2, i2, _ = self._frame(cur, hop_where)
            if not codec_mod.composes_grouped(i2, info):
                terminal = cur
                break
            fold(f2, i2, acc, f"{self.store.location}: {hop_where}, block {cur.hex()[:12]}")
            folded.append(cur)
            cur = i2.base_id
        if terminal is not None:
            base = self.base(terminal, where)
            try:
                if base.nbytes != n:
                    raise CorruptionError(f"{label}: delta base {terminal.hex()[:12]} holds "
                                          f"{base.nbytes} bytes, the block {n}")
                # grouped, then one contiguous XOR (or add): faster than working on
                # strided lanes (1 MiB: 0.48 vs 0.56 ms at width 4, 0.49 vs 0.59 ms at 8)
                grouped_base = np.empty(n, dtype=np.uint8)
                codec_mod.group_into(grouped_base.reshape(width, m), base, width)
                if info.delta == DELTA_SUB:
                    np.add(acc, grouped_base, out=acc)
                else:
                    np.bitwise_xor(acc, grouped_base, out=acc)
            finally:
                self._release(terminal)
        if info.delta == DELTA_SUB:
            codec_mod.combine_sums(out, acc, width)
        else:
            codec_mod.ungroup_into(out, [acc[k * m:(k + 1) * m] for k in range(width)], width)
        if block_id(out, self.store.config.hash) != bid:
            raise CorruptionError(f"{label}: decoded bytes do not match its block id")
        with self._lock:  # the folded bases had this block as their only user
            for b in folded:
                self._refs.pop(b, None)
        return True

    def base(self, bid: bytes, where: str = "delta base") -> np.ndarray:
        with self._lock:
            fut = self._cache.get(bid)
            owner = fut is None
            if owner:
                fut = self._cache[bid] = Future()
        assert fut is not None
        if owner:
            try:
                loc = self.locations.get(bid)
                if loc is None:
                    raise CorruptionError(f"{self.store.location}: {where}: delta base "
                                          f"{bid.hex()[:12]} missing from the index (if the "
                                          "index is damaged, `deltackpt reindex` rebuilds it)")
                _check_location(loc, f"{self.store.location}: {where}: delta base "
                                     f"{bid.hex()[:12]}")
                buf = np.empty(loc.raw_len, dtype=np.uint8)
                self.decode_to(bid, buf, f"{where} (delta base)")
                fut.set_result(buf)
            except BaseException as exc:
                fut.set_exception(exc)
        return fut.result()

    def take(self, bid: bytes, where: str = "delta base") -> np.ndarray:
        """The decoded base ``bid``, dropped from the cache unless pending blocks need it."""
        buf = self.base(bid, where)
        if not self._keep:
            with self._lock:
                if self._refs.get(bid, 0) <= 0:
                    self._cache.pop(bid, None)
        return buf

    def _release(self, bid: bytes) -> None:
        if self._keep:
            return
        with self._lock:
            n = self._refs.get(bid, 0) - 1
            if n <= 0:
                self._refs.pop(bid, None)
                self._cache.pop(bid, None)
            else:
                self._refs[bid] = n


def _entry_manifest(p: _EntryPlan) -> dict:
    return {
        "idx": p.leaf.index,
        "path": p.leaf.path,
        "kind": p.leaf.kind,
        "dtype": p.leaf.dtype,
        "shape": list(p.leaf.shape),
        "nbytes": p.data.nbytes,
        "block_size": p.spans[0][1] if p.spans else 0,
        "blocks": b"".join(p.ids).hex(),
    }


def _canon(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=False)


def _index_disagrees(payload: dict, step: int, tree_text: Any, rows: list[tuple]) -> str | None:
    """How the index rows of ``step`` contradict its manifest ``payload``, or None.

    A manifest whose tree is the index's with subtrees dropped agrees: ``thin`` rewrites
    the manifest before the index, and a crash in between leaves exactly that.
    """
    if payload.get("step") != step:
        return f"the manifest names step {payload.get('step')!r}"
    try:
        itree = json.loads(tree_text)
    except (TypeError, ValueError):
        return "the tree does not parse"
    mtree = payload.get("tree")
    same_tree = _canon(itree) == _canon(mtree)
    if not same_tree and not _is_thinning(mtree, itree):
        return "the trees differ"
    mentries = {e.get("idx"): e for e in payload.get("entries") or () if isinstance(e, dict)}
    lost = set(mentries) - {r[0] for r in rows}
    if lost:
        return f"the index lacks entries {sorted(lost, key=str)[:5]}"
    for idx, path, kind, dtype, shape, nbytes, bsize, blocks in rows:
        e = mentries.get(idx)
        if e is None:
            if same_tree:
                return f"entry {idx!r} is not in the manifest"
            continue
        try:
            mine = (path, kind, dtype, _canon(json.loads(shape)), nbytes, bsize, bytes(blocks))
            theirs = (e["path"], e["kind"], e["dtype"], _canon(e["shape"]), e["nbytes"],
                      e["block_size"], bytes.fromhex(e["blocks"]))
        except (KeyError, TypeError, ValueError):
            return f"entry {idx!r} does not parse"
        if mine != theirs or any(type(a) is not type(b) for a, b in zip(mine, theirs)):
            return f"entry {idx!r} ('{e['path']}') differs"
    return None


def _is_thinning(m: Any, i: Any) -> bool:
    """Whether tree ``m`` is tree ``i`` with some subtrees dropped (what ``thin`` keeps)."""
    if _canon(m) == _canon(i):
        return True
    if not (isinstance(m, list) and isinstance(i, list) and len(m) >= 2 and len(i) >= 2
            and m[0] == i[0] and m[0] in ("L", "T", "D", "O", "C")
            and isinstance(m[1], list) and isinstance(i[1], list)):
        return False
    if m[0] in ("L", "T"):
        return len(m[1]) <= len(i[1]) and all(
            a is None or _is_thinning(a, b) for a, b in zip(m[1], i[1]))
    if m[0] == "O" and (len(m) < 3 or len(i) < 3 or _canon(m[2]) != _canon(i[2])):
        return False
    rest = iter(i[1])
    for pair in m[1]:
        if not (isinstance(pair, list) and len(pair) == 2):
            return False
        for other in rest:
            if isinstance(other, list) and len(other) == 2 and _canon(other[0]) == _canon(pair[0]):
                if not _is_thinning(pair[1], other[1]):
                    return False
                break
        else:
            return False
    return True


@contextlib.contextmanager
def _index_damage(store: Store, step: int) -> Iterator[None]:
    """Index values that do not parse (a damaged row no manifest could vouch for) raise
    :class:`CorruptionError` naming the index and step."""
    try:
        yield
    except DeltackptError:
        raise
    except (ValueError, TypeError, IndexError, AttributeError, RecursionError) as exc:
        raise CorruptionError(f"{store._index.path}: step {step}: a row of the index does not "
                              f"parse ({type(exc).__name__}: {str(exc)[:100]}); rebuild it with "
                              f"`deltackpt reindex {store.location}`") from None


def _read_current(backend: Backend, name: str) -> bytes:
    """The current bytes of an object that may be replaced in place (a manifest, by
    ``thin``): a descriptor the backend cached earlier would still show the old file."""
    if not isinstance(backend, LocalBackend):
        return backend.read(name)
    # O_NONBLOCK: a FIFO planted under the name must not block the open
    fd = os.open(backend.path(name), os.O_RDONLY | os.O_NONBLOCK |
                 getattr(os, "O_NOFOLLOW", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CorruptionError(f"{name}: not a regular file")
        want = min(st.st_size + 1, 1 << 24)  # os.read allocates what it is asked
        chunks = []
        while chunk := os.read(fd, want):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _check_location(loc: _Location, label: str) -> None:
    """Refuse an index row whose sizes no frame can have, before reading or allocating."""
    raw, length, offset = loc.raw_len, loc.length, loc.offset
    if not (type(raw) is int and type(length) is int and type(offset) is int
            and type(loc.pack) is str) or \
            not 0 <= raw <= codec_mod.MAX_BLOCK_BYTES or offset < 0 or \
            not 0 < length <= _max_frame_len(raw):
        raise CorruptionError(f"{label}: impossible location in the index ({loc.pack}@"
                              f"{offset!r}, {length!r} bytes for {raw!r} raw bytes)")


def _max_frame_len(raw_len: int) -> int:
    # header + 16 stream records + CRC, and every stream within zstd's bound (codec.py)
    return codec_mod.HEADER_SIZE + 16 * 5 + 4 + raw_len + raw_len // 64 + 16 * 1024


def _checked_shape(kind: Any, dtype: Any, shape_text: Any, nbytes: Any,
                   label: str) -> tuple[int, ...]:
    """The shape of an index row, refused unless kind, dtype, shape and size agree."""
    try:
        info = dtype_info(kind, dtype)
        shape = json.loads(shape_text)
        if not isinstance(shape, list) or not all(
                type(d) is int and 0 <= d < 1 << 62 for d in shape):
            raise ValueError(shape_text)
    except (KeyError, TypeError, ValueError):
        raise CorruptionError(f"{label}: unknown kind/dtype or bad shape in the index "
                              f"({kind!r}, {dtype!r}, {shape_text!r})") from None
    numel = 1
    for d in shape:
        numel *= d
    if kind == "bytes" and len(shape) != 1:
        raise CorruptionError(f"{label}: a bytes entry with shape {shape}")
    if type(nbytes) is not int or numel * info.itemsize != nbytes:
        raise CorruptionError(f"{label}: {nbytes!r} bytes recorded, shape {shape} of "
                              f"{dtype} gives {numel * info.itemsize}")
    return tuple(shape)


def _step_info(row: tuple) -> StepInfo:
    (step, created, metrics, tags, note, logical, written, new, total, parent, n) = row
    return StepInfo(step, created, json.loads(metrics), json.loads(tags), note, logical,
                    written, new, total, parent, n)


def _metrics_json(metrics: dict[str, Any] | None) -> str:
    if metrics is None:
        return "{}"
    if not isinstance(metrics, dict):
        raise TypeError("metrics must be a dict of str to numbers/strings")
    clean: dict[str, Any] = {}
    for k, v in metrics.items():
        if not isinstance(k, str):
            raise TypeError(f"metric names must be str, got {k!r}")
        clean[k] = metric_scalar(k, v)
    return json.dumps(clean, allow_nan=True)


def metric_scalar(name: str, value: Any) -> Any:
    """``value`` as a plain Python number, str, bool or None (a one-element tensor or
    numpy value is unwrapped), else TypeError naming the metric."""
    if hasattr(value, "item") and callable(value.item):  # tensor / numpy scalar or array
        size = getattr(value, "numel", None)
        n = size() if callable(size) else getattr(value, "size", 1)
        if n != 1:
            raise TypeError(f"metric {name!r} must be a single number, not a "
                            f"{type(value).__name__} of {n} elements")
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, (int, float, str)):
        return value
    raise TypeError(f"metric {name!r} must be a number, str, bool or None, "
                    f"not {type(value).__name__}")


def _tags_list(tags: Sequence[str] | None) -> list[str]:
    if tags is None:
        return []
    if isinstance(tags, str):
        tags = [tags]
    out = []
    for t in tags:
        if not isinstance(t, str):
            raise TypeError(f"tags must be str, got {t!r}")
        out.append(t)
    return out


def _short_list(values: list[int], limit: int = 8) -> str:
    if len(values) <= limit:
        return ", ".join(map(str, values))
    head = ", ".join(map(str, values[: limit // 2]))
    tail = ", ".join(map(str, values[-limit // 2:]))
    return f"{head}, ..., {tail} ({len(values)} steps)"


def open_store(
    path: str | os.PathLike | Backend,
    *,
    block_size: int | None = None,
    hash: str | None = None,
    level: int | None = None,
    delta: str | DeltaConfig | None = None,
    fsync: bool = True,
    threads: int | None = None,
    lock_timeout: float = 0.0,
    create: bool = True,
    base_cache_bytes: int = 1 << 30,
    **remote: Any,
) -> Store:
    """Open (creating if missing) the store at ``path``; see :func:`deltackpt.open`.

    Object-storage URLs and ``FsspecBackend`` instances go to :func:`deltackpt.remote.
    open_remote`, which takes the extra ``remote`` options (``cache_dir``, ``lease_ttl``…).
    """
    if getattr(path, "is_s3", None) is not None or (
            isinstance(path, str) and re.match(r"[a-z][a-z0-9+.-]*://", path, re.IGNORECASE)
            and not path.lower().startswith("memory://")):
        from .remote import open_remote

        return open_remote(path, block_size=block_size, hash=hash, level=level, delta=delta,
                           fsync=fsync, threads=threads, lock_timeout=lock_timeout,
                           create=create, base_cache_bytes=base_cache_bytes, **remote)
    if remote:
        raise TypeError(f"options {sorted(remote)} apply to object-storage URLs only")
    if isinstance(path, (MemoryBackend,)) or (not isinstance(path, (str, os.PathLike))
                                              and isinstance(path, Backend)):
        backend = path
        cfg = _new_config(block_size, hash, level, delta)
        return Store(backend, ":memory:", cfg, None, threads, location="<memory>",
                     base_cache_bytes=base_cache_bytes)
    root = os.path.abspath(os.fspath(path))
    if isinstance(path, str) and path.lower().startswith("memory://"):
        cfg = _new_config(block_size, hash, level, delta)
        return Store(MemoryBackend(), ":memory:", cfg, None, threads, location=path,
                     base_cache_bytes=base_cache_bytes)
    config_path = os.path.join(root, CONFIG_NAME)
    if os.path.exists(config_path):
        if not os.path.isfile(config_path):  # a FIFO here would block open() forever
            raise InvalidStoreError(f"{root}: {CONFIG_NAME} is not a regular file")
        with open(config_path, "rb") as f:
            cfg = existing_config(f.read(), root, block_size, hash, level, delta)
    else:
        if not create:
            raise InvalidStoreError(f"{root}: no deltackpt store here")
        if os.path.isdir(root) and os.listdir(root):
            raise InvalidStoreError(f"{root}: directory exists, is not empty and holds no "
                                    f"{CONFIG_NAME}; refusing to create a store in it")
        cfg = _new_config(block_size, hash, level, delta)
        try:
            # the new root's entry (and any new parent's) must be durable too
            filesystem = LocalBackend(os.path.abspath(os.sep), durable=fsync)
            filesystem.ensure_dir(os.path.abspath(root))
            filesystem.sync()
            backend = LocalBackend(root, durable=fsync)
            backend.put(CONFIG_NAME, json.dumps(cfg.to_json(), indent=2).encode() + b"\n")
            backend.sync()
            backend.close()
        except DeltackptError:
            raise
        except OSError as exc:  # a full disk, a read-only mount, a name too long...
            raise StorageError.caused_by(
                f"{root}: cannot create the store: {exc.strerror or exc}", exc) from exc
    index_path = os.path.join(root, INDEX_NAME)
    if (os.path.isdir(os.path.join(root, "packs")) or
            os.path.isdir(os.path.join(root, "manifests"))):
        # never start an empty index over existing data: gc would delete it all
        state = _index_state(index_path)
        if state is not None:
            raise InvalidStoreError(f"{root}: the index ({INDEX_NAME}) is {state} but data "
                                    "files exist; run `deltackpt reindex PATH` to rebuild it")
    backend = LocalBackend(root, durable=fsync)
    return Store(backend, index_path, cfg,
                 lock_path=os.path.join(root, LOCK_NAME), threads=threads,
                 lock_timeout=lock_timeout, location=root, base_cache_bytes=base_cache_bytes)


#: ``blocks.first_step`` of a block written by a deleted step whose number a later save
#: took (steps are >= 0): no step claims it as written
FIRST_STEP_REUSED = -1


class IndexDisagreesError(CorruptionError):
    """The index rows of a step contradict its checksummed manifest: a damaged local
    index, or a remote store's cache that missed a rewrite of that manifest."""


def _index_state(index_path: str) -> str | None:
    """``"missing"`` or ``"empty"`` (a file with no deltackpt schema: a truncated or
    freshly created SQLite file) for an index that would start over as a new store;
    None for one that holds a schema (or is damaged: opening it reports that)."""
    try:
        st = os.stat(index_path)
    except FileNotFoundError:
        return "missing"
    side = [index_path + suffix for suffix in ("-wal", "-shm")]
    if not stat.S_ISREG(st.st_mode) or any(
            os.path.exists(p) and not os.path.isfile(p) for p in side):
        return None  # a FIFO or device: the index's own open refuses it without blocking
    if st.st_size == 0 and not os.path.exists(side[0]):
        return "empty"
    try:
        # read-only URI: looking must not create or change anything
        conn = sqlite3.connect(f"file:{urllib.parse.quote(index_path)}?mode=ro", uri=True)
        try:
            row = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' "
                               "AND name='meta'").fetchone()
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return None
    return "empty" if row is None else None


def wait_all(futures: Iterable[Future]) -> None:
    """Wait for every future, then raise the first error: a caller must not return
    (and free the buffers workers write into) while any worker is still running."""
    error = None
    for f in futures:
        try:
            f.result()
        except BaseException as exc:
            error = error or exc
    if error is not None:
        raise error


def existing_config(raw: bytes, where: str, block_size, hash, level, delta) -> StoreConfig:
    """The config stored as ``raw`` (a store's ``deltackpt.json``) with this session's
    overrides; ``block_size`` and ``hash`` are fixed at creation and may only repeat it."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise InvalidStoreError(f"{where}: unreadable {CONFIG_NAME}: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidStoreError(f"{where}: {CONFIG_NAME} is not a JSON object")
    cfg = StoreConfig.from_json(data, where)
    if block_size is not None and block_size != cfg.block_size:
        raise InvalidStoreError(f"{where}: store was created with block_size "
                                f"{cfg.block_size}; it cannot change to {block_size}")
    if hash is not None and hash != cfg.hash:
        raise InvalidStoreError(f"{where}: store was created with hash {cfg.hash}; "
                                f"it cannot change to {hash}")
    if level is not None:
        cfg.codec = CodecConfig(level=level, bytegroup=cfg.codec.bytegroup)
    if delta is not None:
        cfg.delta = DeltaConfig.parse(delta)
    return cfg


def _new_config(block_size, hash, level, delta) -> StoreConfig:
    cfg = StoreConfig(
        block_size=block_size or DEFAULT_BLOCK_SIZE,
        hash=hash or "xxh3_128",
        codec=CodecConfig(level=1 if level is None else level),
        delta=DeltaConfig.parse(delta) if delta is not None else DeltaConfig(),
    )
    cfg.validate()
    return cfg
