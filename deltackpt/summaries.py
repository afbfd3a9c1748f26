"""Per-step summaries kept in the index (schema 2: ``blocks.seq`` and ``step_stats``).

``stats`` and the what-if table must answer from a 1,000-step × 2,000-entry index in
well under a second, and reading every entry row of every step cannot (docs/benchmarks.md,
"Analysis"). So every writer of a step's entries also writes, in the same transaction, one
``step_stats`` row for that step:

- ``components``: JSON object, top-level component (first path component) →
  ``[logical_bytes, written_bytes]``; ``written_bytes`` are the frame bytes of the blocks the
  step's entries reference and the step itself wrote (``blocks.first_step = step``; a block
  referenced twice counts once, for the entry that comes first in ``idx`` order);
- ``new_raw_bytes``: the raw bytes of those same blocks (for the compression ratio);
- ``refs``: the ``blocks.seq`` of every distinct block the step references, ascending, as
  little-endian u64 — the what-if table's live-set computation runs on these.

A summary is derived data: it is recomputed from the step's entry rows whenever those change
(save, thin, external commits, reindex, the v1 → v2 migration) and never read back into a
checkpoint. A step without a row (committed into a migrated index by an older deltackpt that
had it open, or too damaged for the migration to summarise) is summarised by the reader.
Frame lengths never change after a block is written (repacking copies frames as they are),
so a summary stays exact across ``gc``. Two triggers (schema 2) keep such a writer from
breaking the rest: a ``blocks`` row without ``seq`` is refused, and deleting a step's entry
rows deletes its summary row (a writer of this version then records a fresh one).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import CorruptionError
from .hashing import ID_SIZE

#: dtype of ``step_stats.refs``
REF_DTYPE = np.dtype("<u8")
#: ids per ``IN (...)`` lookup: below SQLite's 999-variable limit of old builds
_LOOKUP_BATCH = 900


def component_of(path: str) -> str:
    """The top-level component of an entry path (``model``, ``optimizer``…)."""
    return path.split("/", 1)[0]


@dataclass
class StepSummary:
    """One ``step_stats`` row, decoded."""

    components: dict[str, list[int]]  # name -> [logical_bytes, written_bytes]
    new_raw_bytes: int
    refs: np.ndarray  # distinct block seqs, ascending

    @property
    def new_frame_bytes(self) -> int:
        return sum(w for _, w in self.components.values())


def compute(conn: sqlite3.Connection, step: int) -> StepSummary:
    """The summary of ``step`` from its entry rows and the blocks they reference."""
    rows = conn.execute("SELECT path, nbytes, blocks FROM entries WHERE step=? ORDER BY idx",
                        (step,)).fetchall()
    components: dict[str, list[int]] = {}
    owner: dict[bytes, str] = {}  # block id -> component of its first reference
    for path, nbytes, blob in rows:
        if isinstance(path, bytes):  # a connection reading TEXT as bytes (stats snapshots)
            path = path.decode("utf-8", "surrogateescape")
        name = component_of(path)
        components.setdefault(name, [0, 0])[0] += int(nbytes)
        blob = bytes(blob)
        if len(blob) % ID_SIZE:
            raise CorruptionError(f"index: step {step}, entry '{path}': malformed block list")
        for i in range(0, len(blob), ID_SIZE):
            owner.setdefault(blob[i:i + ID_SIZE], name)
    ids = list(owner)
    seqs = np.empty(len(ids), dtype=REF_DTYPE)
    found = 0
    new_raw = 0
    for lo in range(0, len(ids), _LOOKUP_BATCH):
        batch = ids[lo:lo + _LOOKUP_BATCH]
        marks = ",".join("?" * len(batch))
        for bid, seq, length, raw, first in conn.execute(
                "SELECT id, seq, length, raw_len, first_step FROM blocks "
                f"WHERE id IN ({marks})", batch):
            bid = bytes(bid)
            if seq is None:
                raise CorruptionError(f"index: block {bid.hex()[:12]} has no seq")
            seqs[found] = seq
            found += 1
            if first == step:
                components[owner[bid]][1] += int(length)
                new_raw += int(raw)
    if found != len(ids):
        raise CorruptionError(f"index: step {step} references {len(ids) - found} block(s) "
                              "missing from the blocks table; run verify")
    return StepSummary(components, new_raw, np.sort(seqs))


def record(conn: sqlite3.Connection, steps: Iterable[int]) -> None:
    """(Re)write the ``step_stats`` rows of ``steps``; call inside the write transaction
    that changed their entries."""
    for step in steps:
        s = compute(conn, step)
        conn.execute(
            "INSERT OR REPLACE INTO step_stats(step, components, new_raw_bytes, refs) "
            "VALUES (?, ?, ?, ?)",
            (step, json.dumps(s.components, separators=(",", ":"), sort_keys=True),
             s.new_raw_bytes, s.refs.tobytes()))


def decode(components: str | bytes, new_raw: int, refs: bytes) -> StepSummary:
    """A ``step_stats`` row as a :class:`StepSummary`."""
    try:
        comps = json.loads(components)
        if not isinstance(comps, dict) or not all(
                isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) for x in v)
                for v in comps.values()):
            raise ValueError("not an object of [logical, written] pairs")
    except ValueError as exc:
        raise CorruptionError(f"index: malformed step_stats.components ({exc}); "
                              "rebuild it with `deltackpt reindex`") from None
    if len(refs) % REF_DTYPE.itemsize:
        raise CorruptionError("index: malformed step_stats.refs; rebuild it with "
                              "`deltackpt reindex`")
    return StepSummary(comps, int(new_raw), np.frombuffer(refs, dtype=REF_DTYPE))


def next_seq(conn: sqlite3.Connection) -> int:
    """The first unused ``blocks.seq``; call inside the write transaction that inserts."""
    (top,) = conn.execute("SELECT MAX(seq) FROM blocks").fetchone()
    return (top or 0) + 1


def insert_step(conn: sqlite3.Connection, step: int, *, created_at: float, metrics_json: str,
                tags_json: str, note: str | None, tree_json: str, written: int,
                new_chunks: int, parent: int | None, manifest: str,
                entry_rows: Sequence[tuple]) -> None:
    """Insert the ``steps`` row of ``step`` and its ``entries`` rows ``(step, idx, path,
    kind, dtype, shape, nbytes, block_size, blocks)``; the logical size and the block count
    are the entries'. ``written``/``new_chunks``: the bytes and count of its new blocks."""
    conn.execute(
        "INSERT INTO steps(step, created_at, metrics, tags, note, tree, logical_bytes, "
        "written_bytes, new_chunks, total_chunks, parent, manifest) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (step, created_at, metrics_json, tags_json, note, tree_json,
         sum(r[6] for r in entry_rows), written, new_chunks,
         sum(len(r[8]) // ID_SIZE for r in entry_rows), parent, manifest))
    conn.executemany(
        "INSERT INTO entries(step, idx, path, kind, dtype, shape, nbytes, block_size, "
        "blocks) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", entry_rows)


def insert_blocks(conn: sqlite3.Connection, rows: Sequence[tuple], ignore: bool = False) -> None:
    """Insert block rows ``(id, pack_id, offset, length, raw_len, codec, base, depth,
    first_step)``, numbering them with fresh ``seq`` values in order."""
    start = next_seq(conn)
    verb = "INSERT OR IGNORE" if ignore else "INSERT"
    conn.executemany(
        f"{verb} INTO blocks(id, pack_id, offset, length, raw_len, codec, base, depth, "
        "first_step, seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(*row, start + i) for i, row in enumerate(rows)])


#: ``meta`` key holding the generation the next save takes: the clock of staggered keyframes
#: (delta.py). Each commit sets it past the generation it used, and an index filled from
#: manifests past the highest generation they record, so a fresh cache of a remote store
#: goes on from where its writers were. Writer-side only, like ``blocks.depth``.
GENERATION_KEY = "delta_generation"
#: ``meta`` key holding ``[[generation, step], …]`` of the latest commits, oldest first: how
#: many saves lie between two steps even after the steps in between were deleted (the test
#: of a dense chain, store.py)
HISTORY_KEY = "delta_history"
#: commits remembered: enough for the longest chain a writer creates (MAX_CHAIN_HOPS)
HISTORY_LENGTH = 66
#: generations are kept within int64, as SQLite stores them
_GENERATION_MAX = 2**62


def parse_generation(value: Any) -> int | None:
    """A recorded generation (meta text or manifest JSON), or None when it is not a
    non-negative integer: a damaged clock only moves keyframe slots, it is never fatal."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 19:
        value = int(value)
    if isinstance(value, int) and 0 <= value < _GENERATION_MAX:
        return value
    return None


def _meta(conn: sqlite3.Connection, key: str) -> Any:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return row[0] if row else None


def _history(text: Any) -> list[tuple[int, int]]:
    """The parsed ``delta_history`` value; what does not parse is left out."""
    try:
        items = json.loads(text) if isinstance(text, str) else []
    except ValueError:
        return []
    out = []
    for item in items if isinstance(items, list) else []:
        if isinstance(item, list) and len(item) == 2:
            g, step = parse_generation(item[0]), item[1]
            if g is not None and isinstance(step, int) and not isinstance(step, bool):
                out.append((g, step))
    return out


def delta_generation(index: Any) -> int:
    """The generation the next save of ``index`` (an :class:`~deltackpt.index.Index`) takes."""
    rows = index.query("SELECT value FROM meta WHERE key = ?", (GENERATION_KEY,))
    return (parse_generation(rows[0][0]) if rows else None) or 0


def step_generations(index: Any) -> dict[int, int]:
    """Step -> the generation it was saved at, for the latest commits the index remembers.
    A step number saved twice (deleted, then saved again) is left out: ambiguous."""
    rows = index.query("SELECT value FROM meta WHERE key = ?", (HISTORY_KEY,))
    out: dict[int, int] = {}
    twice = set()
    for g, step in _history(rows[0][0] if rows else None):
        if step in out and out[step] != g:
            twice.add(step)
        out[step] = g
    for step in twice:
        del out[step]
    return out


def record_generations(conn: sqlite3.Connection, saved: Iterable[tuple[Any, int]]) -> None:
    """Record steps committed at generations (``(generation, step)`` pairs; a generation
    :func:`parse_generation` refuses is skipped): the next save takes a later generation, and
    the history keeps the latest ``HISTORY_LENGTH``. Call inside the write transaction that
    commits them."""
    saved = [(g, s) for g, s in ((parse_generation(g), s) for g, s in saved) if g is not None]
    if not saved:
        return
    current = parse_generation(_meta(conn, GENERATION_KEY)) or 0
    nxt = min(max(current, max(g for g, _ in saved) + 1), _GENERATION_MAX - 1)
    history = sorted(set(_history(_meta(conn, HISTORY_KEY))) | set(saved))[-HISTORY_LENGTH:]
    conn.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                     [(GENERATION_KEY, str(nxt)),
                      (HISTORY_KEY, json.dumps([list(x) for x in history]))])


def advance_delta_generation(conn: sqlite3.Connection, used: int | None, step: int) -> None:
    """Record that ``step`` was committed at generation ``used`` (None: the current one).
    Call inside the write transaction of that commit."""
    g = parse_generation(used)
    if g is None:
        g = parse_generation(_meta(conn, GENERATION_KEY)) or 0
    record_generations(conn, [(g, step)])


def migrate_v1(conn: sqlite3.Connection) -> None:
    """Data part of the v1 → v2 migration (after ``MIGRATIONS[1]``'s DDL): number the
    existing blocks in id order and summarise every step. A step whose rows are damaged
    gets no summary (readers then compute it, and report the damage, when asked): the
    migration must not lock everybody out of the healthy steps and of ``verify``."""
    ids = [r[0] for r in conn.execute("SELECT id FROM blocks ORDER BY id")]
    conn.executemany("UPDATE blocks SET seq=? WHERE id=?",
                     [(i + 1, bid) for i, bid in enumerate(ids)])
    for (step,) in conn.execute("SELECT step FROM steps ORDER BY step").fetchall():
        try:
            record(conn, [step])
        except CorruptionError:
            continue
