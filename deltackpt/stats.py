"""Storage-cost figures computed from the index alone (no block data is read).

Two read paths, both one read transaction:

- the per-step summaries (:mod:`deltackpt.summaries`, written at save time) answer
  :func:`store_stats` and, through :func:`ref_snapshot`, the what-if table
  (:mod:`deltackpt.whatif`) without reading a single entry row: that is what keeps them
  under a second on a 1,000-step × 2,000-entry index;
- :func:`snapshot` reads the whole index into numpy arrays (one row per block, per block
  reference and per entry) for the questions that need entry paths: :func:`top_entries`
  and the report's change heat-map. Columns are fetched with ``group_concat`` (a few large
  strings instead of millions of rows).

Definitions (docs/analysis.md):

- *logical bytes*: the bytes of a step's array entries (what ``torch.save`` writes,
  less its few hundred bytes of zip and pickle overhead per tensor);
- *written bytes*: frame bytes the step's save appended to packs;
- a block reference of step ``s`` is *new* when the block's ``first_step`` is ``s``
  (the first reference within the step, in path order, owns it);
- *component*: the first component of an entry path (``model``, ``optimizer``…).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from . import summaries
from .errors import CorruptionError, InvalidInputError
from .hashing import ID_SIZE
from .summaries import StepSummary

if TYPE_CHECKING:
    from .store import Store

#: components beyond this many (a flat state dict has one per tensor) are summed as "(other)"
MAX_COMPONENTS = 12
OTHER = "(other)"
#: written bytes of a step that no current reference accounts for (thinned or gc'd blocks)
DROPPED = "(dropped)"


@dataclass
class IndexSnapshot:
    """The index of a store as arrays; built by :func:`snapshot`.

    Blocks are in id order; ``base`` and ``ref_block`` index into them (-1: none).
    Steps are ascending; ``entry_step`` and ``ref_step`` index into ``steps``.
    """

    location: str
    steps: np.ndarray  # int64 step numbers, ascending
    created_at: np.ndarray
    logical: np.ndarray  # per step
    written: np.ndarray
    new_chunks: np.ndarray
    total_chunks: np.ndarray
    metrics: list[dict[str, Any]]
    # blocks
    length: np.ndarray
    raw_len: np.ndarray
    depth: np.ndarray
    first_step: np.ndarray
    base: np.ndarray  # int64 block index of the delta base, -1 for a keyframe
    # entries (one per step and array leaf)
    entry_step: np.ndarray
    entry_path: np.ndarray  # index into ``paths``
    entry_nbytes: np.ndarray
    entry_nblocks: np.ndarray
    paths: list[str]
    # block references, entry by entry
    ref_step: np.ndarray
    ref_entry: np.ndarray
    ref_block: np.ndarray
    _new: np.ndarray | None = field(default=None, repr=False)

    @property
    def n_blocks(self) -> int:
        return int(self.length.size)

    def step_pos(self, step: int) -> int:
        """Position of ``step`` in :attr:`steps`; InvalidInputError when it is not committed."""
        i = int(np.searchsorted(self.steps, step))
        if i >= self.steps.size or self.steps[i] != step:
            raise InvalidInputError(f"{self.location}: step {step} not found")
        return i

    def new_refs(self) -> np.ndarray:
        """Boolean per reference: this reference is the one that wrote its block."""
        if self._new is None:
            fs = self.first_step[self.ref_block]
            cand = fs == self.steps[self.ref_step]
            new = np.zeros(self.ref_block.size, dtype=bool)
            idx = np.nonzero(cand)[0]
            if idx.size:
                # a block referenced twice in its first step belongs to the first reference
                _, first = np.unique(self.ref_block[idx], return_index=True)
                new[idx[first]] = True
            self._new = new
        return self._new

    def components(self) -> tuple[list[str], np.ndarray]:
        """(component names, component index per path); at most MAX_COMPONENTS names,
        the largest by logical bytes, the rest summed as "(other)"."""
        tops = [p.split("/", 1)[0] for p in self.paths]
        names = sorted(set(tops))
        code = np.array([names.index(t) for t in tops], dtype=np.int64) if tops else \
            np.zeros(0, dtype=np.int64)
        if len(names) <= MAX_COMPONENTS:
            return names, code
        size = np.bincount(code[self.entry_path], weights=self.entry_nbytes,
                           minlength=len(names))
        keep = sorted(np.argsort(-size, kind="stable")[:MAX_COMPONENTS - 1].tolist())
        new_names = [names[i] for i in keep] + [OTHER]
        remap = np.full(len(names), len(keep), dtype=np.int64)
        remap[keep] = np.arange(len(keep))
        return new_names, remap[code]


def _ints(text: bytes | None, n: int, what: str) -> np.ndarray:
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    arr = np.array(text.split(b","), dtype=np.int64) if text else np.zeros(0, dtype=np.int64)
    if arr.size != n:
        raise CorruptionError(f"index: {what}: {arr.size} values for {n} rows")
    return arr


def snapshot(store: Store) -> IndexSnapshot:
    """Read the index of ``store`` into an :class:`IndexSnapshot` (one read transaction)."""
    store._check_open()
    with _read_as_bytes(store) as conn:
        try:
            return _snapshot(conn, store.location)
        except sqlite3.DataError as exc:  # a group_concat beyond SQLITE_MAX_LENGTH
            raise InvalidInputError(f"{store.location}: index too large to analyse in one "
                                    f"pass: {exc}") from None


@contextmanager
def _read_as_bytes(store: Store) -> Iterator[sqlite3.Connection]:
    """A read transaction whose TEXT values come back as bytes: ``group_concat`` columns
    are split and parsed as bytes, without building a str first."""
    with store._index.read() as conn:
        old = conn.text_factory
        conn.text_factory = bytes
        try:
            yield conn
        finally:
            conn.text_factory = old


def _blocks(conn: sqlite3.Connection, location: str, columns: tuple[str, ...],
            ) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """The blocks table in id order, with ``conn.text_factory = bytes``: the ids as
    :func:`_keys`, the integer ``columns`` and each block's base position (-1: none)."""
    (n_blocks,) = conn.execute("SELECT COUNT(*) FROM blocks").fetchone()
    concat = "".join(f"group_concat({c}), " for c in columns)
    ids, *texts, bases, has_base = conn.execute(
        f"SELECT group_concat(id, ''), {concat}"
        "group_concat(COALESCE(base, zeroblob(16)), ''), group_concat(base IS NOT NULL) "
        "FROM blocks").fetchone()
    ids = ids or b""
    if len(ids) != n_blocks * ID_SIZE:
        raise CorruptionError(f"{location}: index holds malformed block ids")
    keys = _keys(ids)
    cols = [_ints(t, n_blocks, f"blocks.{c}") for c, t in zip(columns, texts)]
    hb = _ints(has_base, n_blocks, "blocks.base").astype(bool)
    base_keys = _keys(bases or b"")
    if keys.size > 1 and not bool(np.all((keys[1:, 0] > keys[:-1, 0]) |
                                         ((keys[1:, 0] == keys[:-1, 0]) &
                                          (keys[1:, 1] > keys[:-1, 1])))):
        order = np.lexsort((keys[:, 1], keys[:, 0]))  # rows did not come in id order
        keys, hb, base_keys = keys[order], hb[order], base_keys[order]
        cols = [c[order] for c in cols]
    base = np.full(n_blocks, -1, dtype=np.int64)
    if hb.any():
        found = _lookup(keys, base_keys[hb])
        if (found < 0).any():
            raise CorruptionError(f"{location}: {int((found < 0).sum())} delta bases missing "
                                  "from the index; run verify")
        base[hb] = found
    return keys, cols, base


def _snapshot(conn: sqlite3.Connection, location: str) -> IndexSnapshot:
    srows = conn.execute(
        "SELECT step, created_at, logical_bytes, written_bytes, new_chunks, total_chunks, "
        "metrics FROM steps ORDER BY step").fetchall()
    steps = np.array([r[0] for r in srows], dtype=np.int64)
    metrics = []
    for r in srows:
        try:
            m = json.loads(r[6])
        except ValueError:
            m = {}
        metrics.append(m if isinstance(m, dict) else {})
    keys, cols, base = _blocks(conn, location, ("length", "raw_len", "depth", "first_step"))
    length, raw_len, depth, first_step = cols
    erows = conn.execute(
        "SELECT step, group_concat(blocks, ''), group_concat(length(blocks) / 16), "
        "group_concat(nbytes), group_concat(path, char(0)), COUNT(*) "
        "FROM entries GROUP BY step ORDER BY step").fetchall()
    path_code: dict[bytes, int] = {}
    paths: list[str] = []
    e_step, e_path, e_nbytes, e_nblocks, refs = [], [], [], [], []
    prev: tuple[bytes, bytes, bytes] | None = None
    cached: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    for step, blob, counts, nbytes, names, n in erows:
        pos = int(np.searchsorted(steps, step))
        if pos >= steps.size or steps[pos] != step:
            continue  # entries of a step row that is gone (cannot happen with foreign keys)
        if prev is not None and cached is not None and prev == (counts, nbytes, names):
            codes, nb, cnt = cached  # most steps have the very same entries as the last
        else:
            parts = names.split(b"\0") if names is not None else []
            if len(parts) != n:
                raise CorruptionError(f"{location}: step {step}: cannot split entry paths")
            codes = np.empty(n, dtype=np.int64)
            for i, p in enumerate(parts):
                c = path_code.get(p)
                if c is None:
                    c = path_code[p] = len(paths)
                    paths.append(p.decode("utf-8", "surrogateescape"))
                codes[i] = c
            nb = _ints(nbytes, n, f"step {step} entries.nbytes")
            cnt = _ints(counts, n, f"step {step} entries.blocks")
            prev, cached = (counts, nbytes, names), (codes, nb, cnt)
        blob = blob or b""
        if len(blob) != int(cnt.sum()) * ID_SIZE:
            raise CorruptionError(f"{location}: step {step}: malformed block list")
        e_step.append(np.full(n, pos, dtype=np.int64))
        e_path.append(codes)
        e_nbytes.append(nb)
        e_nblocks.append(cnt)
        refs.append(blob)
    def cat(xs: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(xs) if xs else np.zeros(0, dtype=np.int64)

    entry_step, entry_path = cat(e_step), cat(e_path)
    entry_nbytes, entry_nblocks = cat(e_nbytes), cat(e_nblocks)
    ref_entry = np.repeat(np.arange(entry_step.size, dtype=np.int64), entry_nblocks)
    ref_step = entry_step[ref_entry]
    ref_block = _lookup(keys, _keys(b"".join(refs)))
    if (ref_block < 0).any():
        bad = int(np.nonzero(ref_block < 0)[0][0])
        raise CorruptionError(
            f"{location}: step {int(steps[ref_step[bad]])}, entry "
            f"'{paths[entry_path[ref_entry[bad]]]}': block missing from the index; run verify")
    cols = list(zip(*srows))[1:6] if srows else [()] * 5
    created, logical, written, new_chunks, total_chunks = (np.array(c, dtype=np.float64 if i == 0
                                                           else np.int64)
                                                           for i, c in enumerate(cols))
    return IndexSnapshot(location, steps, created, logical, written, new_chunks, total_chunks,
                         metrics, length, raw_len, depth, first_step, base, entry_step,
                         entry_path, entry_nbytes, entry_nblocks, paths, ref_step, ref_entry,
                         ref_block)


def _keys(blob: bytes) -> np.ndarray:
    """Block ids as (n, 2) big-endian uint64: row order equals the ids' byte order."""
    return np.frombuffer(blob, dtype=">u8").astype(np.uint64).reshape(-1, 2)


def _lookup(sorted_keys: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Row of each wanted id in ``sorted_keys`` (-1 when absent)."""
    if wanted.size == 0:
        return np.zeros(0, dtype=np.int64)
    if sorted_keys.size == 0:
        return np.full(wanted.shape[0], -1, dtype=np.int64)
    hi = np.ascontiguousarray(sorted_keys[:, 0])
    lo = np.ascontiguousarray(sorted_keys[:, 1])
    # needles in order make the binary searches walk memory in order: several times faster
    order = np.argsort(wanted[:, 0], kind="stable")
    w_hi, w_lo = wanted[order, 0], wanted[order, 1]
    cand = np.minimum(np.searchsorted(hi, w_hi, side="left"), hi.size - 1)
    found = np.full(wanted.shape[0], -1, dtype=np.int64)
    ok = (hi[cand] == w_hi) & (lo[cand] == w_lo)
    found[ok] = cand[ok]
    if hi.size > 1 and bool(np.any(hi[1:] == hi[:-1])):
        # ids sharing their first 8 bytes (never seen with 128-bit hashes): look in the run
        right = np.searchsorted(hi, w_hi, side="right")
        for i in np.nonzero(~ok & (right - cand > 1))[0]:
            k = cand[i] + np.searchsorted(lo[cand[i]:right[i]], w_lo[i])
            if k < right[i] and lo[k] == w_lo[i]:
                found[i] = k
    out = np.empty_like(found)
    out[order] = found
    return out


def step_summaries(store: Store) -> tuple[list[tuple], list[StepSummary]]:
    """``(step, created_at, logical, written, new_chunks, total_chunks)`` per committed step,
    ascending, and each step's :class:`~deltackpt.summaries.StepSummary`, read in one
    transaction (the summaries are written with the step: no entry row is read)."""
    store._check_open()
    with store._index.read() as conn:
        rows = conn.execute(
            "SELECT step, created_at, logical_bytes, written_bytes, new_chunks, total_chunks "
            "FROM steps ORDER BY step").fetchall()
        stored = {step: (comps, raw, refs) for step, comps, raw, refs in conn.execute(
            "SELECT step, components, new_raw_bytes, refs FROM step_stats")}
        out = []
        for r in rows:
            got = stored.get(r[0])
            # no row: a step an older deltackpt committed or thinned into this index, or one
            # the migration could not summarise: computed from its entry rows (slower)
            out.append(summaries.decode(*got) if got is not None
                       else summaries.compute(conn, r[0]))
        return rows, out


@dataclass
class RefSnapshot:
    """What the what-if table needs, from the per-step summaries: steps, their logical
    bytes, the blocks (frame length, depth, base) and which step references which block.
    Has the same fields, with the same meaning, as those of :class:`IndexSnapshot`."""

    steps: np.ndarray
    logical: np.ndarray
    length: np.ndarray
    depth: np.ndarray
    base: np.ndarray  # block position of the delta base, -1 for a keyframe
    ref_step: np.ndarray
    ref_block: np.ndarray

    @property
    def n_blocks(self) -> int:
        return int(self.length.size)


def ref_snapshot(store: Store) -> RefSnapshot:
    """The blocks and each step's block references, from ``step_stats`` and ``blocks``
    in one read transaction; no entry row is read."""
    store._check_open()
    with _read_as_bytes(store) as conn:
        srows = conn.execute(
            "SELECT s.step, s.logical_bytes, t.refs FROM steps s "
            "LEFT JOIN step_stats t ON t.step = s.step ORDER BY s.step").fetchall()
        _, (seq, length, depth), base = _blocks(conn, store.location, ("seq", "length", "depth"))
        parts, counts = [], []
        for step, _, refs in srows:
            # no row: see step_summaries
            arr = summaries.compute(conn, step).refs if refs is None else \
                summaries.decode("{}", 0, refs).refs
            parts.append(arr)
            counts.append(arr.size)
    steps = np.array([r[0] for r in srows], dtype=np.int64)
    logical = np.array([r[1] for r in srows], dtype=np.int64)
    refs_all = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    # seq -> block position by binary search: a damaged huge seq must not size an array
    order = np.argsort(seq, kind="stable")
    sorted_seq = seq[order]
    at = np.minimum(np.searchsorted(sorted_seq, refs_all), max(sorted_seq.size - 1, 0))
    if refs_all.size and (sorted_seq.size == 0 or (sorted_seq[at] != refs_all).any()):
        raise CorruptionError(f"{store.location}: a step summary references a block missing "
                              "from the index; run verify")
    ref_block = order[at] if refs_all.size else refs_all
    ref_step = np.repeat(np.arange(steps.size, dtype=np.int64), counts)
    return RefSnapshot(steps, logical, length, depth, base, ref_step, ref_block)


def _dotted_head(component: str) -> str:
    """``optim.state.3.exp_avg#chunk(0,0)`` -> ``optim``: the module a flat key names."""
    return component.split("#", 1)[0].split(".", 1)[0] or component


def store_stats(store: Store) -> dict[str, Any]:
    """Per-step and total logical/written/stored bytes, dedup and compression ratios,
    and the split of logical and written bytes by top-level component.

    ``dedup_ratio`` is the fraction of a step's block references that were
    already stored; ``compression_ratio`` is the raw size of the blocks the step
    wrote (and still references) over their frame bytes (deltas included);
    ``full_copies_bytes`` is the running sum of logical bytes (one full copy per
    step). ``components[name]`` holds ``logical_bytes`` and ``written_bytes``
    whose sums over components equal the step's (see :data:`DROPPED`). Past
    :data:`MAX_COMPONENTS` components (a flat state dict, a DCP checkpoint: one per
    tensor), they are grouped by the text before their first ``.`` (``model``,
    ``optim``), and past that many groups the smallest are summed as ``(other)``.
    Read from the per-step summaries of the index (:mod:`deltackpt.summaries`).
    """
    rows, sums = step_summaries(store)
    size: dict[str, int] = {}
    for sm in sums:
        for name, (logical, _) in sm.components.items():
            size[name] = size.get(name, 0) + logical
    group = {n: n for n in size}
    if len(size) > MAX_COMPONENTS:
        # a flat state dict or a DCP checkpoint: one component per tensor, named
        # <module>.<...>[#chunk(...)]; its modules are what a reader wants to compare
        group = {n: _dotted_head(n) for n in size}
    # a state key may be spelt like a summary row: quoted, it stays a column of its own
    group = {n: f'"{g}"' if g in (OTHER, DROPPED) else g for n, g in group.items()}
    grouped: dict[str, int] = {}
    for n, g in group.items():
        grouped[g] = grouped.get(g, 0) + size[n]
    names = sorted(grouped)
    if len(names) > MAX_COMPONENTS:  # the largest by logical bytes (ties: name order)
        largest = sorted(names, key=lambda n: -grouped[n])[:MAX_COMPONENTS - 1]
        names = [*sorted(largest), OTHER]
        group = {n: (g if g in largest else OTHER) for n, g in group.items()}
    totals = {name: {"logical_bytes": 0, "written_bytes": 0} for name in names}
    steps: list[dict[str, Any]] = []
    cumulative = full = 0
    for (step, _, logical, written, new_chunks, total_chunks), sm in zip(rows, sums):
        cumulative += written
        full += logical
        comps = {name: {"logical_bytes": 0, "written_bytes": 0} for name in names}
        for name, (lg, wr) in sm.components.items():
            c = comps[group[name]]
            c["logical_bytes"] += lg
            c["written_bytes"] += wr
        for name, c in comps.items():
            totals[name]["logical_bytes"] += c["logical_bytes"]
            totals[name]["written_bytes"] += c["written_bytes"]
        # entries of thinned steps no longer account for what the save wrote
        dropped_logical = logical - sum(c["logical_bytes"] for c in comps.values())
        dropped_written = written - sum(c["written_bytes"] for c in comps.values())
        if dropped_logical or dropped_written:
            comps[DROPPED] = {"logical_bytes": dropped_logical, "written_bytes": dropped_written}
            dropped_total = totals.setdefault(DROPPED, {"logical_bytes": 0, "written_bytes": 0})
            dropped_total["logical_bytes"] += dropped_logical
            dropped_total["written_bytes"] += dropped_written
        frames = sm.new_frame_bytes
        steps.append({
            "step": int(step),
            "logical_bytes": int(logical),
            "written_bytes": int(written),
            "cumulative_stored_bytes": cumulative,
            "full_copies_bytes": full,
            "new_chunks": int(new_chunks),
            "total_chunks": int(total_chunks),
            "dedup_ratio": 1 - new_chunks / total_chunks if total_chunks else 1.0,
            "compression_ratio": sm.new_raw_bytes / frames if frames else 1.0,
            "components": comps,
        })
    stored = store.stored_bytes()
    logical_total = sum(int(r[2]) for r in rows)
    live_frames = store._index.query("SELECT COALESCE(SUM(length), 0) FROM blocks")[0][0]
    return {
        "steps": steps,
        "components": names,
        "total": {
            "steps": len(rows),
            "logical_bytes": logical_total,
            "written_bytes": sum(int(r[3]) for r in rows),
            "stored_bytes": stored,
            "live_frame_bytes": int(live_frames),
            "stored_fraction": stored / logical_total if logical_total else 0.0,
            "components": totals,
        },
    }


def step_range(snap: IndexSnapshot, first: int | None, last: int | None) -> np.ndarray:
    """Boolean mask over ``snap.steps`` of first <= step <= last (None: unbounded)."""
    if first is not None and last is not None and first > last:
        raise InvalidInputError(f"empty step range: {first} > {last}")
    mask = np.ones(snap.steps.size, dtype=bool)
    if first is not None:
        mask &= snap.steps >= first
    if last is not None:
        mask &= snap.steps <= last
    return mask


def top_entries(store: Store, n: int = 20, first: int | None = None, last: int | None = None,
                snap: IndexSnapshot | None = None) -> list[dict[str, Any]]:
    """The ``n`` entry paths that cost the most written bytes over steps first..last.

    Per path: ``written_bytes`` (frames its blocks took when first written),
    ``steps_changed`` (steps in the range that wrote at least one of its blocks),
    ``steps`` (steps in the range holding it) and its ``logical_bytes`` at the last of them.
    """
    if n < 1:
        raise InvalidInputError(f"--top must be at least 1, not {n}")
    snap = snap if snap is not None else snapshot(store)
    mask = step_range(snap, first, last)
    npaths = len(snap.paths)
    new = snap.new_refs() & mask[snap.ref_step]
    paths_new = snap.entry_path[snap.ref_entry[new]]
    written = np.bincount(paths_new, weights=snap.length[snap.ref_block[new]], minlength=npaths)
    e_in = mask[snap.entry_step]
    held = np.bincount(snap.entry_path[e_in], minlength=npaths)
    changed_entries = np.unique(snap.ref_entry[new])
    changed = np.bincount(snap.entry_path[changed_entries], minlength=npaths)
    last_nbytes = np.zeros(npaths, dtype=np.int64)
    sel = np.nonzero(e_in)[0][::-1]  # newest entry first: np.unique keeps the first seen
    uniq, first_seen = np.unique(snap.entry_path[sel], return_index=True)
    last_nbytes[uniq] = snap.entry_nbytes[sel[first_seen]]
    order = np.lexsort((np.arange(npaths), -written))
    out = []
    for p in order[:n]:
        if held[p] == 0:
            continue
        out.append({"path": snap.paths[p], "written_bytes": int(written[p]),
                    "steps_changed": int(changed[p]), "steps": int(held[p]),
                    "logical_bytes": int(last_nbytes[p])})
    return out
