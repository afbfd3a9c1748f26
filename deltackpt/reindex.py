"""Rebuild a lost or damaged SQLite index from the data files alone.

Packs are scanned frame by frame (frames are self-delimiting and name their
block id and delta base); manifests give each step's tree and block lists. A
step is recovered when every block it needs, delta bases included, was found.
The new index is built beside the old one and swapped in atomically; the old
file is kept as ``index.sqlite.broken-<time>`` when it existed.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import summaries
from .backend import PARTIAL_SUFFIX, Backend, LocalBackend, fsync_path
from .delta import MAX_CHAIN_HOPS
from .errors import (
    CorruptionError,
    DeltackptError,
    FormatVersionError,
    InvalidStoreError,
    StorageError,
)
from .hashing import unpack_ids
from .index import Index, chunked
from .lock import WriterLock
from .packs import MANIFEST_PREFIX, PACK_PREFIX, decode_manifest, manifest_name, scan_pack


class CacheChanged(Exception):
    """A cache rebuild found that another connection committed to the cache after the
    rebuild listed the store: it wrote nothing, and may be retried."""


@dataclass
class ReindexResult:
    """What a rebuild found."""

    packs_scanned: int = 0
    blocks_found: int = 0
    steps_recovered: list[int] = field(default_factory=list)
    steps_lost: dict[int, str] = field(default_factory=dict)  # step -> why
    problems: list[str] = field(default_factory=list)
    old_index: str | None = None


def reindex(path: str | os.PathLike, lock_timeout: float = 0.0) -> ReindexResult:
    """Rebuild ``<path>/index.sqlite`` from packs and manifests; see the module doc."""
    from .store import CONFIG_NAME, StoreConfig

    root = os.path.abspath(os.fspath(path))
    cfg_path = os.path.join(root, CONFIG_NAME)
    if not os.path.exists(cfg_path):
        raise InvalidStoreError(f"{root}: no deltackpt store here ({CONFIG_NAME} missing)")
    if not os.path.isfile(cfg_path):  # a FIFO here would block open() forever
        raise InvalidStoreError(f"{root}: {CONFIG_NAME} is not a regular file")
    with open(cfg_path, encoding="utf-8") as f:
        StoreConfig.from_json(json.load(f), root)
    try:
        return _reindex_locked(root, lock_timeout)
    except DeltackptError:
        raise
    except (OSError, sqlite3.Error) as exc:  # a full disk, a read-only mount
        raise StorageError.caused_by(
            f"{root}: reindex failed: {getattr(exc, 'strerror', None) or exc}; the index in "
            "place (if any) is unchanged, or kept as index.sqlite.broken-* if the failure "
            "came after it was set aside: run reindex again once this is fixed", exc) from exc


def _reindex_locked(root: str, lock_timeout: float) -> ReindexResult:
    from .store import FORMAT_VERSION, INDEX_NAME, LOCK_NAME

    lock = WriterLock(os.path.join(root, LOCK_NAME))
    lock.acquire(lock_timeout)
    backend = LocalBackend(root)
    result = ReindexResult()
    index_path = os.path.join(root, INDEX_NAME)
    tmp_path = index_path + ".rebuild"
    idx: Index | None = None
    moved_aside = False
    try:
        for p in (tmp_path, tmp_path + "-wal", tmp_path + "-shm"):
            if os.path.exists(p):
                os.unlink(p)
        idx = Index(tmp_path)
        idx.create_or_migrate({"format_version": str(FORMAT_VERSION),
                               "created_at": repr(time.time()), "rebuilt_at": repr(time.time())})
        rebuild_into(idx, backend, result)
        idx.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        idx.conn.execute("PRAGMA journal_mode = DELETE")
        idx.close()
        fsync_path(tmp_path)
        if os.path.exists(index_path):
            aside = result.old_index = f"{index_path}.broken-{int(time.time())}"
            n = 1
            while os.path.exists(result.old_index):
                n += 1  # a second reindex within the second must not overwrite the first
                result.old_index = f"{aside}-{n}"
            os.replace(index_path, result.old_index)
            moved_aside = True
        for suffix in ("-wal", "-shm"):
            if os.path.exists(index_path + suffix):
                os.unlink(index_path + suffix)
        os.replace(tmp_path, index_path)
        backend.mark_dir_dirty(root)
        backend.sync()
    except BaseException:
        if idx is not None:
            with contextlib.suppress(Exception):
                idx.close()
        if not moved_aside:  # (after that, the complete new index is the one to keep)
            for p in (tmp_path, tmp_path + "-wal", tmp_path + "-shm"):
                with contextlib.suppress(OSError):
                    os.unlink(p)  # a half-built index is nobody's
        raise
    finally:
        backend.close()
        lock.release()
    return result



#: scan_many(pack names) -> {pack: (size, [(id, offset, frame_len, raw_len, codec, base)])};
#: a pack that cannot be scanned maps to a CorruptionError instead
ScanMany = Callable[[list[str]], dict[str, Any]]


def scan_packs(backend: Backend, names: list[str]) -> dict[str, Any]:
    """Scan packs one by one with :func:`scan_pack` (the default of :func:`rebuild_into`)."""
    out: dict[str, Any] = {}
    for name in names:
        try:
            out[name] = (backend.size(name),
                         [(info.block_id, offset, info.frame_len, info.raw_len, info.codec,
                           info.base_id) for info, offset in scan_pack(backend, name)])
        except CorruptionError as exc:
            out[name] = exc
    return out


def rebuild_into(idx: Index, backend: Backend, result: ReindexResult, *,
                 scan_many: ScanMany | None = None,
                 read_manifest: Callable[[str], bytes] | None = None,
                 incremental: bool = False, replace: bool = False,
                 manifest_etags: dict[str, str | None] | None = None,
                 expect_version: int | None = None) -> None:
    """Fill ``idx`` from the packs and manifests of ``backend`` (any Backend), in one
    write transaction.

    ``incremental``: keep what ``idx`` holds and add only steps whose manifests it does
    not name yet, taking blocks it already has as found (a local cache of a remote store
    catching up). ``replace``: empty ``idx`` first (a full rebuild of a cache in place,
    safe for other connections to the same file). Steps that cannot be recovered are
    reported in ``result.steps_lost``. ``manifest_etags`` (a remote store's cache): the ETag
    each manifest had when listed, recorded in ``cache_manifests`` for the steps added, in
    the same transaction. ``expect_version``: ``PRAGMA data_version`` of ``idx``'s connection
    before the caller listed the store; if another connection committed to ``idx`` since,
    :class:`CacheChanged` is raised and nothing is written (what was read may be older than
    what that connection wrote).
    """
    scan_many = scan_many or (lambda names: scan_packs(backend, names))
    read_manifest = read_manifest or backend.read
    existing: dict[str, int] = {}
    if incremental:
        existing = {m: s for m, s in idx.query("SELECT manifest, step FROM steps")}
        known_packs = {r[0] for r in idx.query("SELECT name FROM packs")}
    pack_names = [n for n in backend.list(PACK_PREFIX)
                  if n.endswith(".pack") and not (incremental and n in known_packs)]
    blocks: dict[bytes, tuple] = {}  # id -> (pack, offset, length, raw_len, codec, base)
    others: dict[bytes, list[tuple]] = {}  # further frames of an id, in pack-name order
    pack_sizes: dict[str, int] = {}
    scanned = scan_many(pack_names)
    for name in pack_names:
        found = scanned.get(name)
        if found is None:
            continue
        result.packs_scanned += 1
        if isinstance(found, BaseException):
            result.problems.append(str(found))
            continue
        size, frames = found
        pack_sizes[name] = size
        for bid, offset, frame_len, raw_len, codec, base in frames:
            loc = (name, offset, frame_len, raw_len, codec, base)
            if bid not in blocks:
                blocks[bid] = loc
            else:
                others.setdefault(bid, []).append(loc)
    result.blocks_found = len(blocks)
    manifests = []
    for name in backend.list(MANIFEST_PREFIX):
        if name.endswith(PARTIAL_SUFFIX) or name in existing:
            continue
        try:
            manifests.append((name, decode_manifest(read_manifest(name), name)))
        except FileNotFoundError:
            continue  # listed, then deleted (another writer's delete or thin): step gone
        except (CorruptionError, FormatVersionError) as exc:
            result.problems.append(str(exc))
    known: dict[bytes, int] = {}  # blocks the index already has -> depth
    if incremental:
        need_all: set[bytes] = set()
        for _name, m in manifests:
            for e in m.get("entries", []) if isinstance(m.get("entries"), list) else []:
                try:
                    need_all.update(unpack_ids(bytes.fromhex(e["blocks"])))
                except (KeyError, TypeError, ValueError):
                    pass
        need_all.update(b[5] for b in blocks.values() if b[5] is not None)
        for batch in chunked(list(need_all), 500):
            marks = ",".join("?" * len(batch))
            known.update(idx.query(f"SELECT id, depth FROM blocks WHERE id IN ({marks})",
                                   batch))
    # one id in several frames (a writer with a stale view wrote a stored block again, two
    # DCP ranks wrote it in one save): keep the frame with the shortest delta chain that
    # resolves (the first such in pack order on a tie). A stale copy may be a delta against
    # a block gc has removed since, or against a block that is itself a delta of it (a value
    # that went X -> Y -> X): a cycle. The shortest chain, because the store's committer
    # keeps the shortest of the copies it is sent (deltackpt.dcp), and a reader then never
    # meets a chain longer than the one its writer extended
    _choose_copies(blocks, others, known)
    steps = []
    first_step: dict[bytes, int] = {}
    taken = set(existing.values())
    for name, m in sorted(manifests, key=lambda x: x[1].get("step", -1)):
        try:
            step = int(m["step"])
            entries = m["entries"]
            need = set()
            for e in entries:
                need.update(unpack_ids(bytes.fromhex(e["blocks"])))
            # everything the rows will hold, checked now: a malformed manifest is skipped
            # and reported, never an abort of the whole rebuild inside its transaction
            entry_rows = _manifest_entry_rows(step, m)
            for row in entry_rows:
                for text in row[2:5]:  # path, kind, dtype: stored as text, so no lone
                    text.encode("utf-8")  # surrogates (a crafted manifest)
            if m.get("note") is not None:
                m["note"].encode("utf-8")
            tree_json = json.dumps(m["tree"], separators=(",", ":"))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            result.problems.append(f"{name}: malformed manifest ({exc})")
            continue
        if step in taken:
            result.problems.append(f"{name}: step {step} is already named by another manifest")
            continue
        missing = _missing_with_bases(need, blocks, known)
        if missing:
            result.steps_lost[step] = (f"{len(missing)} block(s) not found in any pack, "
                                       f"e.g. {next(iter(missing)).hex()[:12]}")
            continue
        for bid in _with_bases(need, blocks, known):
            first_step.setdefault(bid, step)
        steps.append((name, m, step, need, entry_rows, tree_json))
        taken.add(step)
        if name != manifest_name(step):
            # recovered (gc deletes manifests the index lacks), but a writer names a
            # manifest after its step: saves refuse the step whose name this file took
            result.problems.append(f"{name}: holds step {step} (its name would be "
                                   f"{manifest_name(step)}); recovered under this name")
    used = {bid for bid in first_step}
    with idx.write() as conn:
        if expect_version is not None and \
                conn.execute("PRAGMA data_version").fetchone()[0] != expect_version:
            raise CacheChanged("another process wrote to the cache during the rebuild")
        if replace:
            for table in ("step_stats", "entries", "steps", "blocks", "packs"):
                conn.execute(f"DELETE FROM {table}")
            conn.execute("DELETE FROM meta WHERE key = ?", (PARTIAL_KEY,))
            if manifest_etags is not None:
                conn.execute("DELETE FROM cache_manifests")
        present = {r[0] for r in conn.execute("SELECT step FROM steps")} if incremental \
            else set()
        pack_ids = _pack_ids(conn, {blocks[b][0] for b in used}, pack_sizes)
        depth_of: dict[bytes, int] = dict(known)
        rows = []
        for bid in sorted(used):
            pack, off, ln, raw, codec, base = blocks[bid]
            rows.append((bid, pack_ids[pack], off, ln, raw, codec, base,
                         _depth(bid, blocks, depth_of), first_step[bid]))
        summaries.insert_blocks(conn, rows, ignore=True)
        for name, m, step, need, entry_rows, tree_json in steps:
            if step in present:  # another process sharing this cache added it meanwhile
                continue
            # what the step's save wrote, as far as the files tell: the blocks its entries
            # reference first. A base it needs only through a delta was written by an older
            # step, deleted since (its first_step names this step, but the bytes are not
            # this save's: stats show them apart, like any block of a deleted step)
            new = [b for b in need if first_step.get(b) == step]
            _insert_manifest_step(conn, name, step, m, tree_json, entry_rows,
                                  sum(blocks[b][2] for b in new), len(new))
            summaries.record(conn, [step])
            result.steps_recovered.append(step)
        # the keyframe clock goes on past the latest generation any ingested manifest records
        summaries.record_generations(conn, [(m.get("generation"), step)
                                            for _n, m, step, *_ in steps])
        if manifest_etags is not None:
            record_manifest_etags(conn, {n: manifest_etags.get(n) for n, *_ in steps})


#: a remote store's cache index only: the ETag of each manifest as the cache took it in
CACHE_MANIFESTS_SQL = ("CREATE TABLE IF NOT EXISTS cache_manifests "
                       "(name TEXT PRIMARY KEY, etag TEXT NOT NULL)")


def record_manifest_etags(conn: Any, etags: dict[str, str | None]) -> None:
    """Record (or forget, for None) the ETag of manifests whose rows the caller's write
    transaction holds as of that ETag."""
    conn.executemany("DELETE FROM cache_manifests WHERE name = ?",
                     [(n,) for n, e in etags.items() if e is None])
    conn.executemany("INSERT OR REPLACE INTO cache_manifests(name, etag) VALUES (?, ?)",
                     [(n, e) for n, e in etags.items() if e is not None])


def _pack_ids(conn: Any, names: set[str], sizes: dict[str, int]) -> dict[str, int]:
    """Row ids of the packs ``names`` (of ``sizes`` bytes), added when the index lacks them."""
    ids = {}
    for name in sorted(names):
        conn.execute("INSERT OR IGNORE INTO packs(name, size, created_at) VALUES (?, ?, ?)",
                     (name, sizes[name], time.time()))
        ids[name] = conn.execute("SELECT id FROM packs WHERE name=?", (name,)).fetchone()[0]
    return ids


def _manifest_entry_rows(step: int, m: dict[str, Any]) -> list[tuple]:
    """The ``entries`` rows of manifest ``m`` (whose step is ``step``)."""
    return [(step, int(e["idx"]), e["path"], e["kind"], e["dtype"], json.dumps(e["shape"]),
             int(e["nbytes"]), int(e["block_size"]), bytes.fromhex(e["blocks"]))
            for e in m["entries"]]


def _insert_manifest_step(conn: Any, name: str, step: int, m: dict[str, Any], tree_json: str,
                          rows: list[tuple], written: int, new_chunks: int) -> None:
    """The ``steps`` row and ``entries`` ``rows`` of ``step`` as manifest ``name`` (decoded:
    ``m``) records it; ``written``/``new_chunks``: the bytes and count of its new blocks."""
    summaries.insert_step(
        conn, step, created_at=float(m.get("created_at", 0.0)),
        metrics_json=json.dumps(m.get("metrics", {}), allow_nan=True),
        tags_json=json.dumps(m.get("tags", [])), note=m.get("note"), tree_json=tree_json,
        written=written, new_chunks=new_chunks, parent=m.get("parent"), manifest=name,
        entry_rows=rows)


#: ``meta`` key of a cache index that :func:`ingest_partial` filled: some of its steps'
#: blocks are not located. Only a DCP rank's own writer reads such a cache; every other use
#: rebuilds it first (deltackpt.remote). Never set in a store's own index.
PARTIAL_KEY = "cache_partial"


def is_partial(idx: Index) -> bool:
    """Whether ``idx`` is a cache that :func:`ingest_partial` left incomplete."""
    return bool(idx.query("SELECT 1 FROM meta WHERE key = ?", (PARTIAL_KEY,)))


def ingest_partial(idx: Index, name: str, manifest: dict[str, Any] | None,
                   frames: dict[bytes, tuple], pack_sizes: dict[str, int],
                   drop_steps: list[int], own_paths: set[str] | None = None,
                   etag: str | None = None) -> None:
    """Bring a cache index up to one committed step without reading other writers' packs
    (a DCP rank catching up before it writes: deltackpt.remote).

    Adds the step of ``manifest`` (named ``name``; None when the cache already has it):
    its steps row, entries and keyframe generation, and, of the blocks it references,
    those in ``frames`` (id -> (pack, offset, frame_len, raw_len, codec, base): frames this
    process wrote itself) whose delta chains resolve. With ``own_paths``, a frame whose id
    the step also holds at another path is left out: another writer may have written that
    block too, and the step's committer kept one copy, perhaps not this one. Drops the rows of
    ``drop_steps`` (steps deleted from the store). One write transaction, which also marks
    the cache partial (:data:`PARTIAL_KEY`): blocks only other processes wrote stay
    unlocated. Raises :class:`CorruptionError` on a malformed manifest.
    """
    step: int | None = None
    rows: list[tuple] = []
    need: set[bytes] = set()
    if manifest is not None:
        try:
            step = int(manifest["step"])
            tree = json.dumps(manifest["tree"], separators=(",", ":"))
            rows = _manifest_entry_rows(step, manifest)
            for r in rows:
                need.update(unpack_ids(r[8]))
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptionError(f"{name}: malformed manifest ({exc})") from None
    else:
        found = idx.query("SELECT step FROM steps WHERE manifest = ?", (name,))
        if found:
            step = int(found[0][0])
            for (blob,) in idx.query("SELECT blocks FROM entries WHERE step = ?", (step,)):
                need.update(unpack_ids(blob))
    with idx.write() as conn:
        conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, '1')", (PARTIAL_KEY,))
        for s in drop_steps:
            for table in ("step_stats", "entries", "steps"):
                conn.execute(f"DELETE FROM {table} WHERE step = ?", (s,))
        if step is None:
            return
        mine = need & frames.keys()
        if own_paths is not None and rows:
            mine -= {b for r in rows if r[2] not in own_paths for b in unpack_ids(r[8])}
        ask = mine | {f[5] for f in frames.values() if f[5] is not None}
        known: dict[bytes, int] = {}
        for batch in chunked(list(ask), 500):
            marks = ",".join("?" * len(batch))
            known.update(conn.execute(f"SELECT id, depth FROM blocks WHERE id IN ({marks})",
                                      batch).fetchall())
        take = {b for b in _with_bases(mine, frames, known)
                if not _missing_with_bases({b}, frames, known)}
        pack_ids = _pack_ids(conn, {frames[b][0] for b in take}, pack_sizes)
        depth_of = dict(known)
        summaries.insert_blocks(conn, [
            (bid, pack_ids[frames[bid][0]], *frames[bid][1:], _depth(bid, frames, depth_of), step)
            for bid in sorted(take)], ignore=True)
        if manifest is None or conn.execute("SELECT 1 FROM steps WHERE step = ?",
                                            (step,)).fetchone():
            return
        _insert_manifest_step(conn, name, step, manifest, tree, rows,
                              sum(frames[b][2] for b in take), len(take))
        summaries.record_generations(conn, [(manifest.get("generation"), step)])
        record_manifest_etags(conn, {name: etag})


def _with_bases(ids: set[bytes], blocks: dict[bytes, tuple],
                known: dict[bytes, int] | None = None) -> set[bytes]:
    """``ids`` and their transitive bases found in ``blocks`` (not those in ``known``)."""
    known = known or {}
    out = set()
    todo = list(ids)
    while todo:
        bid = todo.pop()
        if bid in out or bid not in blocks or bid in known:
            continue
        out.add(bid)
        base = blocks[bid][5]
        if base is not None:
            todo.append(base)
    return out


def _missing_with_bases(ids: set[bytes], blocks: dict[bytes, tuple],
                        known: dict[bytes, int] | None = None) -> set[bytes]:
    """Among ``ids`` and their transitive bases, those whose delta chain does not resolve
    through ``blocks`` (found frames) to a keyframe or a block of ``known`` (id -> depth):
    a block found in no pack, a chain that loops back on itself, or one longer than
    MAX_CHAIN_HOPS hops (readers refuse both). Empty when all of ``ids`` resolve."""
    return _resolve_chains(ids, blocks, known or {})[1]


def _resolve_chains(ids: set[bytes], blocks: dict[bytes, tuple], known: dict[bytes, int],
                    ) -> tuple[dict[bytes, int], set[bytes]]:
    """(depth of each id of ``ids`` and its bases that resolves and is not in ``known``,
    those that do not resolve): see :func:`_missing_with_bases`."""
    depth: dict[bytes, int] = {}
    bad: set[bytes] = set()
    for start in ids:
        chain: list[bytes] = []
        on_chain: set[bytes] = set()
        cur: bytes | None = start
        d: int | None
        while True:
            if cur is None:
                d = -1
                break
            if cur in known:
                d = known[cur]
                break
            if cur in depth:
                d = depth[cur]
                break
            if cur in bad or cur in on_chain:
                d = None
                break
            if cur not in blocks:
                bad.add(cur)
                d = None
                break
            chain.append(cur)
            on_chain.add(cur)
            cur = blocks[cur][5]
        for b in reversed(chain):
            if d is None or d + 1 > MAX_CHAIN_HOPS:
                d = None
                bad.add(b)
            else:
                d += 1
                depth[b] = d
    return depth, bad


def _choose_copies(blocks: dict[bytes, tuple], others: dict[bytes, list[tuple]],
                   known: dict[bytes, int]) -> None:
    """In place: for each id of ``others`` (its further frames), set ``blocks[id]`` to the
    frame with the shortest resolving chain, the first found on a tie. One id's choice
    depends on its bases' choices, so passes repeat until none changes (a choice only ever
    moves to a strictly shorter chain, or from none resolving to one: it ends)."""
    frames = {bid: [blocks[bid], *alts] for bid, alts in others.items()}
    for _ in range(len(frames) + 2):
        changed = False
        for bid, candidates in frames.items():
            chosen = blocks[bid]
            best, best_depth = chosen, _chain_depth(bid, blocks, known)
            for loc in candidates:
                blocks[bid] = loc
                d = _chain_depth(bid, blocks, known)
                if d is not None and (best_depth is None or d < best_depth):
                    best, best_depth = loc, d
            blocks[bid] = best
            changed = changed or best is not chosen
        if not changed:
            return


def _chain_depth(bid: bytes, blocks: dict[bytes, tuple], known: dict[bytes, int]) -> int | None:
    """Hops from ``bid`` to a keyframe (or a block of ``known``, plus its depth) through
    ``blocks``; None when the chain does not resolve (see :func:`_missing_with_bases`)."""
    if bid in known:
        return known[bid] if known[bid] <= MAX_CHAIN_HOPS else None
    return _resolve_chains({bid}, blocks, known)[0].get(bid)


def _depth(bid: bytes, blocks: dict[bytes, tuple], memo: dict[bytes, int]) -> int:
    chain = []
    cur: bytes | None = bid
    while cur is not None and cur not in memo and len(chain) < 100_000:
        chain.append(cur)
        cur = blocks[cur][5]
    d = memo.get(cur, -1) if cur is not None else -1
    for b in reversed(chain):
        d += 1
        memo[b] = d
    return memo[bid]
