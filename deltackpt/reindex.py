"""Rebuild a lost or damaged SQLite index from the data files alone.

Packs are scanned frame by frame (frames are self-delimiting and name their
block id and delta base); manifests give each step's tree and block lists. A
step is recovered when every block it needs, delta bases included, was found.
The new index is built beside the old one and swapped in atomically; the old
file is kept as ``index.sqlite.broken-<time>`` when it existed.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

from .backend import PARTIAL_SUFFIX, LocalBackend
from .errors import CorruptionError, FormatVersionError, InvalidStoreError
from .hashing import unpack_ids
from .index import Index
from .lock import WriterLock
from .packs import MANIFEST_PREFIX, PACK_PREFIX, decode_manifest, scan_pack


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
    from .store import CONFIG_NAME, FORMAT_VERSION, INDEX_NAME, LOCK_NAME, StoreConfig

    root = os.path.abspath(os.fspath(path))
    cfg_path = os.path.join(root, CONFIG_NAME)
    if not os.path.exists(cfg_path):
        raise InvalidStoreError(f"{root}: no deltackpt store here ({CONFIG_NAME} missing)")
    with open(cfg_path, encoding="utf-8") as f:
        StoreConfig.from_json(json.load(f), root)
    lock = WriterLock(os.path.join(root, LOCK_NAME))
    lock.acquire(lock_timeout)
    backend = LocalBackend(root)
    result = ReindexResult()
    try:
        blocks: dict[bytes, tuple] = {}  # id -> (pack, offset, length, raw_len, codec, base)
        pack_sizes: dict[str, int] = {}
        for name in backend.list(PACK_PREFIX):
            if name.endswith(PARTIAL_SUFFIX) or not name.endswith(".pack"):
                continue
            result.packs_scanned += 1
            try:
                size = backend.size(name)
                for info, offset in scan_pack(backend, name):
                    if info.block_id not in blocks:
                        blocks[info.block_id] = (name, offset, info.frame_len, info.raw_len,
                                                 info.codec, info.base_id)
                        pack_sizes[name] = size
            except CorruptionError as exc:
                result.problems.append(str(exc))
        result.blocks_found = len(blocks)
        manifests = []
        for name in backend.list(MANIFEST_PREFIX):
            if name.endswith(PARTIAL_SUFFIX):
                continue
            try:
                manifests.append((name, decode_manifest(backend.read(name), name)))
            except (CorruptionError, FormatVersionError) as exc:
                result.problems.append(str(exc))
        steps = []
        first_step: dict[bytes, int] = {}
        for name, m in sorted(manifests, key=lambda x: x[1].get("step", -1)):
            try:
                step = int(m["step"])
                entries = m["entries"]
                need = set()
                for e in entries:
                    need.update(unpack_ids(bytes.fromhex(e["blocks"])))
            except (KeyError, TypeError, ValueError) as exc:
                result.problems.append(f"{name}: malformed manifest ({exc})")
                continue
            missing = _missing_with_bases(need, blocks)
            if missing:
                result.steps_lost[step] = (f"{len(missing)} block(s) not found in any pack, "
                                           f"e.g. {next(iter(missing)).hex()[:12]}")
                continue
            for bid in _with_bases(need, blocks):
                first_step.setdefault(bid, step)
            steps.append((name, m, step))
        index_path = os.path.join(root, INDEX_NAME)
        tmp_path = index_path + ".rebuild"
        for p in (tmp_path, tmp_path + "-wal", tmp_path + "-shm"):
            if os.path.exists(p):
                os.unlink(p)
        idx = Index(tmp_path)
        idx.create_or_migrate({"format_version": str(FORMAT_VERSION),
                               "created_at": repr(time.time()), "rebuilt_at": repr(time.time())})
        used = {bid for bid in first_step}
        with idx.write() as conn:
            pack_ids = {}
            for name in sorted({blocks[b][0] for b in used}):
                pack_ids[name] = conn.execute(
                    "INSERT INTO packs(name, size, created_at) VALUES (?, ?, ?)",
                    (name, pack_sizes[name], time.time())).lastrowid
            depth_of: dict[bytes, int] = {}
            for bid in used:
                pack, off, ln, raw, codec, base = blocks[bid]
                conn.execute(
                    "INSERT INTO blocks(id, pack_id, offset, length, raw_len, codec, base, depth, "
                    "first_step) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (bid, pack_ids[pack], off, ln, raw, codec, base,
                     _depth(bid, blocks, depth_of), first_step[bid]))
            for name, m, step in steps:
                entries = m["entries"]
                new = [b for b, s in first_step.items() if s == step]
                conn.execute(
                    "INSERT INTO steps(step, created_at, metrics, tags, note, tree, logical_bytes, "
                    "written_bytes, new_chunks, total_chunks, parent, manifest) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (step, float(m.get("created_at", 0.0)),
                     json.dumps(m.get("metrics", {}), allow_nan=True),
                     json.dumps(m.get("tags", [])), m.get("note"),
                     json.dumps(m["tree"], separators=(",", ":")),
                     sum(int(e["nbytes"]) for e in entries),
                     sum(blocks[b][2] for b in new), len(new),
                     sum(len(e["blocks"]) // 32 for e in entries), m.get("parent"), name))
                conn.executemany(
                    "INSERT INTO entries(step, idx, path, kind, dtype, shape, nbytes, block_size, "
                    "blocks) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(step, int(e["idx"]), e["path"], e["kind"], e["dtype"],
                      json.dumps(e["shape"]), int(e["nbytes"]), int(e["block_size"]),
                      bytes.fromhex(e["blocks"])) for e in entries])
                result.steps_recovered.append(step)
        idx.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        idx.conn.execute("PRAGMA journal_mode = DELETE")
        idx.close()
        fd = os.open(tmp_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if os.path.exists(index_path):
            result.old_index = f"{index_path}.broken-{int(time.time())}"
            os.replace(index_path, result.old_index)
        for suffix in ("-wal", "-shm"):
            if os.path.exists(index_path + suffix):
                os.unlink(index_path + suffix)
        os.replace(tmp_path, index_path)
        backend.mark_dir_dirty(root)
        backend.sync()
    finally:
        backend.close()
        lock.release()
    return result


def _with_bases(ids: set[bytes], blocks: dict[bytes, tuple]) -> set[bytes]:
    out = set()
    todo = list(ids)
    while todo:
        bid = todo.pop()
        if bid in out or bid not in blocks:
            continue
        out.add(bid)
        base = blocks[bid][5]
        if base is not None:
            todo.append(base)
    return out


def _missing_with_bases(ids: set[bytes], blocks: dict[bytes, tuple]) -> set[bytes]:
    missing = set()
    seen = set()
    todo = list(ids)
    while todo:
        bid = todo.pop()
        if bid in seen:
            continue
        seen.add(bid)
        if bid not in blocks:
            missing.add(bid)
            continue
        base = blocks[bid][5]
        if base is not None:
            todo.append(base)
    return missing


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
