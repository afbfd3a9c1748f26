"""What changed between two steps, entry by entry.

The metadata part reads only the index: entries added, removed and *retyped*
(same path, another kind, dtype or shape), and per common entry the fraction of
block positions whose id changed and ``stored_bytes``, the frames (as stored) of
the blocks B holds that A does not.

The data part (``data=True``) decodes block by block, never a whole entry, and
computes per numeric entry, in float64 (complex: on the modulus of the
difference):

- ``l2``: ‖B − A‖₂; ``max_abs``: max |B − A|; ``relative``: ‖B − A‖₂ / ‖A‖₂
  (``inf`` when A is all zeros and B is not, 0 when both are);
- ``delta_bytes``: the frame bytes a delta from A to B costs: each changed block
  encoded against A's block at the same position with the store's codec, keeping
  the smaller of the delta and the standalone frame (as a save does).

Unchanged blocks (same id) are decoded once, from A, for ‖A‖; differences of
NaN/Inf elements propagate into the numbers as they would in torch.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from . import codec as codec_mod
from ._torch import torch
from .dtypes import dtype_info, numpy_dtype, torch_dtype
from .errors import CorruptionError, InvalidInputError
from .hashing import unpack_ids

if TYPE_CHECKING:
    from .store import Store


@dataclass
class _Entry:
    path: str
    kind: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    ids: list[bytes]


def _entries(conn: Any, store: Store, step: int) -> dict[str, _Entry]:
    if not conn.execute("SELECT 1 FROM steps WHERE step=?", (step,)).fetchone():
        raise store._not_found(step)
    out = {}
    for path, kind, dtype, shape, nbytes, blob in conn.execute(
            "SELECT path, kind, dtype, shape, nbytes, blocks FROM entries WHERE step=? "
            "ORDER BY idx", (step,)):
        try:
            ids = unpack_ids(blob)
        except ValueError:
            raise CorruptionError(f"{store.location}: step {step}, entry '{path}': malformed "
                                  "block list") from None
        out[path] = _Entry(path, kind, dtype, tuple(json.loads(shape)), nbytes, ids)
    return out


def _select(entries: dict[str, _Entry], select: Sequence[str] | None) -> dict[str, _Entry]:
    if not select:
        return entries
    # "a/" is the path of a[""] when that holds anything, else "a" with a trailing separator
    roots = [s if any(p == s or p.startswith(s + "/") for p in entries) else s.rstrip("/")
             for s in select]
    return {p: e for p, e in entries.items()
            if any(p == r or p.startswith(r + "/") for r in roots)}


def _numeric(kind: str, dtype: str) -> Callable[[np.ndarray], torch.Tensor] | None:
    """Converter from an entry's raw block bytes to a float64/complex128 tensor."""
    if kind in ("tensor", "parameter"):
        try:
            dt = torch_dtype(dtype)
        except KeyError:
            return None
        if dtype_info(kind, dtype).family == "packed":
            return None  # two 4-bit floats a byte: no arithmetic; block figures only
        target = torch.complex128 if dt.is_complex else torch.float64
        return lambda buf: torch.from_numpy(buf).view(dt).to(target)
    if kind == "ndarray":
        try:
            nd = numpy_dtype(dtype)
        except KeyError:
            return None
        target = np.complex128 if nd.kind == "c" else np.float64
        return lambda buf: torch.from_numpy(buf.view(nd).astype(target))
    return None


def _int_view(kind: str, dtype: str) -> np.dtype | None:
    """The numpy dtype of an integer entry (torch or numpy), None for other entries."""
    if kind not in ("tensor", "parameter", "ndarray"):
        return None
    try:
        if dtype_info(kind, dtype).family != "int":
            return None
    except KeyError:
        return None
    # torch's integer dtype names are numpy's, and torch entries are little-endian
    return numpy_dtype(dtype) if kind == "ndarray" else np.dtype(dtype).newbyteorder("<")


def _int_difference(nd: np.dtype, buf_a: np.ndarray, buf_b: np.ndarray) -> torch.Tensor:
    """B − A of integer elements as float64, exact before the final rounding: int64 and
    uint64 values past 2^53 differ by less than their float64 spacing (2^60 vs 2^60 + 1)."""
    a, b = buf_a.view(nd), buf_b.view(nd)
    if nd.itemsize < 8:
        return torch.from_numpy((b.astype(np.int64) - a.astype(np.int64)).astype(np.float64))
    # split into 32-bit halves: each half's difference is exact in int64
    wide = np.int64 if nd.kind == "i" else np.uint64
    a, b = a.astype(wide), b.astype(wide)
    hi = (b >> 32).astype(np.int64) - (a >> 32).astype(np.int64)
    lo = (b & 0xFFFFFFFF).astype(np.int64) - (a & 0xFFFFFFFF).astype(np.int64)
    return torch.from_numpy(hi.astype(np.float64) * 4294967296.0 + lo.astype(np.float64))


def diff(store: Store, a: int, b: int, *, data: bool = True,
         select: Sequence[str] | str | None = None, progress: Any = None) -> dict[str, Any]:
    """Compare step ``a`` with step ``b``; see the module docstring for each number.

    ``select`` restricts the comparison to subtrees (paths joined by '/').
    ``progress``: an object with tqdm's ``total`` attribute and ``update(n)``, advanced
    by the bytes of B's entries compared. Returns ``{"a", "b", "entries", "added",
    "removed", "retyped", "total"}``.
    """
    store._check_open()
    with store._closing_race():
        for attempt in range(3):
            packs_before = store._packs_state()
            try:
                return _diff_once(store, a, b, data, select, progress if attempt == 0 else None)
            except (FileNotFoundError, CorruptionError):
                # a concurrent gc rewrote a pack this plan read from: plan again
                if attempt == 2 or not store._worth_replanning(packs_before):
                    raise
                time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def _diff_once(store: Store, a: int, b: int, data: bool,
               select: Sequence[str] | str | None, progress: Any) -> dict[str, Any]:
    from .store import _Decoder

    a, b = store._step_arg(a), store._step_arg(b)
    sel = [select] if isinstance(select, str) else (list(select) if select else None)
    with store._index.read() as conn:
        ea, eb = _entries(conn, store, a), _entries(conn, store, b)
        ea, eb = _select(ea, sel), _select(eb, sel)
        if sel and not ea and not eb:
            raise InvalidInputError(f"{store.location}: steps {a} and {b} have no entry under "
                                    f"{', '.join(sel)}")
        only_b = {bid for p, e in eb.items() for bid in e.ids
                  if p not in ea or bid not in set(ea[p].ids)}
        locations = store._locate(conn, only_b | {bid for e in ea.values() for bid in e.ids}
                                  if data else only_b)
    missing = [bid for bid in only_b if bid not in locations]
    if missing:
        raise CorruptionError(f"{store.location}: block {missing[0].hex()[:12]} of step {b} "
                              "missing from the index; run verify")
    added = [{"path": p, "kind": e.kind, "dtype": e.dtype, "shape": list(e.shape),
              "nbytes": e.nbytes} for p, e in eb.items() if p not in ea]
    removed = [{"path": p, "kind": e.kind, "dtype": e.dtype, "shape": list(e.shape),
                "nbytes": e.nbytes} for p, e in ea.items() if p not in eb]
    retyped, rows, pairs = [], [], []
    for p, e in eb.items():
        old = ea.get(p)
        if old is None:
            continue
        if (old.kind, old.dtype, old.shape) != (e.kind, e.dtype, e.shape):
            retyped.append({"path": p, "from": {"kind": old.kind, "dtype": old.dtype,
                                                "shape": list(old.shape)},
                            "to": {"kind": e.kind, "dtype": e.dtype, "shape": list(e.shape)}})
            continue
        a_ids = set(old.ids)
        changed = sum(1 for k, bid in enumerate(e.ids)
                      if k >= len(old.ids) or old.ids[k] != bid)
        new_ids = {bid for bid in e.ids if bid not in a_ids}
        row = {"path": p, "kind": e.kind, "dtype": e.dtype, "shape": list(e.shape),
               "nbytes": e.nbytes, "blocks": len(e.ids), "blocks_changed": changed,
               "changed_fraction": changed / len(e.ids) if e.ids else 0.0,
               "stored_bytes": sum(locations[bid].length for bid in new_ids)}
        rows.append(row)
        pairs.append((row, old, e))
    delta_total = 0
    if data:
        delta_total = _numbers(store, pairs, locations, progress, _Decoder, (a, b))
    changed_rows = [r for r in rows if r["blocks_changed"]]
    total = {
        "entries": len(rows),
        "entries_changed": len(changed_rows),
        "blocks": sum(r["blocks"] for r in rows),
        "blocks_changed": sum(r["blocks_changed"] for r in rows),
        "stored_bytes": sum(locations[bid].length for bid in
                            {x for e in eb.values() for x in e.ids}
                            - {x for e in ea.values() for x in e.ids}),
        "added": len(added), "removed": len(removed), "retyped": len(retyped),
    }
    if data:
        total["delta_bytes"] = delta_total
    return {"a": a, "b": b, "entries": rows, "added": added, "removed": removed,
            "retyped": retyped, "total": total}


def _numbers(store: Store, pairs: list[tuple[dict, _Entry, _Entry]], locations: dict,
             progress: Any, decoder_cls: Any, steps: tuple[int, int]) -> int:
    """Fill the numbers of each row; returns the delta bytes of the distinct changed
    blocks (a block two entries share, tied weights, is written once)."""
    cfg = store.config
    # A's blocks, and B's where they differ: each decoded once per use
    convs = [_numeric(new.kind, new.dtype) for _, _, new in pairs]
    ints = [_int_view(new.kind, new.dtype) for _, _, new in pairs]
    plan: list[tuple[int, int, bytes, bytes | None]] = []  # (pair, position, id in A, id in B)
    for i, (_, old, new) in enumerate(pairs):
        for k, (ia, ib) in enumerate(zip(old.ids, new.ids)):
            if ia != ib or convs[i] is not None:  # an unchanged non-numeric block tells nothing
                plan.append((i, k, ia, None if ia == ib else ib))
    decoder = decoder_cls(store, locations,
                          [x[2] for x in plan] + [x[3] for x in plan if x[3] is not None])
    widths = []
    for _, _, new in pairs:
        try:
            widths.append(dtype_info(new.kind, new.dtype).group_width)
        except KeyError:
            widths.append(1)
    acc = [[0.0, 0.0, 0.0, 0] for _ in pairs]  # Σ(b-a)², max|b-a|, Σa², delta bytes
    bad = [False] * len(pairs)  # NaN met in a maximum: keep it, as torch.max would

    def job(item: tuple[int, int, bytes, bytes | None]):
        i, _, ia, ib = item
        _, _, new = pairs[i]
        la = locations[ia].raw_len
        buf_a = np.empty(la, dtype=np.uint8)
        decoder.decode_to(ia, buf_a, f"step {steps[0]}, entry '{new.path}'")
        conv = convs[i]
        va = conv(buf_a) if conv is not None else None
        sa = float((va.abs() ** 2).sum()) if va is not None else 0.0
        if ib is None:
            return i, 0.0, 0.0, sa, 0, la, None
        lb = locations[ib].raw_len
        buf_b = np.empty(lb, dtype=np.uint8)
        decoder.decode_to(ib, buf_b, f"step {steps[1]}, entry '{new.path}'")
        sd = md = 0.0
        if va is not None and la == lb:
            nd = ints[i]
            d = (_int_difference(nd, buf_a, buf_b) if nd is not None
                 else conv(buf_b) - va).abs()
            sd = float((d ** 2).sum())
            md = float(d.max()) if d.numel() else 0.0
        mode = cfg.delta.mode_for(new.path)
        frame = codec_mod.frame_length(codec_mod.encode(buf_b, ib, widths[i], cfg.codec))
        if cfg.delta.enabled and la == lb:
            frame = min(frame, codec_mod.frame_length(codec_mod.encode(
                buf_b, ib, widths[i], cfg.codec, base=buf_a, base_id=ia, delta=mode)))
        return i, sd, md, sa, frame, lb, ib

    window: deque = deque()
    distinct: dict[bytes, int] = {}
    limit = 2 * store._threads + 2

    def drain() -> None:
        i, sd, md, sa, frame, nbytes, ib = window.popleft().result()
        if ib is not None:
            distinct.setdefault(ib, frame)
        s = acc[i]
        s[0] += sd
        if md != md:
            bad[i] = True
        s[1] = max(s[1], md)
        s[2] += sa
        s[3] += frame
        if progress is not None:
            progress.update(nbytes)

    if progress is not None:
        progress.total = sum(x[0]["nbytes"] for x in pairs)
    try:
        for item in plan:
            window.append(store._pool.submit(job, item))
            if len(window) >= limit:
                drain()
        while window:
            drain()
    finally:
        for f in window:
            f.cancel()
    for (row, _, _), conv, (sd, md, sa, frame), nan in zip(pairs, convs, acc, bad):
        row["delta_bytes"] = frame
        if conv is None:
            row["l2"] = row["max_abs"] = row["relative"] = None
            continue
        l2 = math.sqrt(sd)
        norm_a = math.sqrt(sa)
        row["l2"] = l2
        row["max_abs"] = float("nan") if nan else md
        row["relative"] = (l2 / norm_a if norm_a else (0.0 if l2 == 0 else float("inf")))
    return sum(distinct.values())
