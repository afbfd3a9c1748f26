"""Reading stored steps entry by entry, and writing them to files other tools read.

:class:`StepReader` plans one or more steps in one index snapshot and decodes
entries (or byte ranges of entries) on demand, so export and averaging hold a
window of blocks instead of whole steps. :func:`export` writes a step as one
``.safetensors`` file, a transformers-style sharded directory or a ``.pt`` file.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import math
import os
import re
import secrets
import struct
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ._torch import torch
from .dtypes import dtype_info, torch_dtype_name
from .errors import (
    CorruptionError,
    DeltackptError,
    InvalidInputError,
    StepNotFoundError,
    StorageError,
    UnsupportedValueError,
)
from .flatten import Leaf, entry_nodes, escape_key, join_path, select_tree
from .hashing import unpack_ids
from .store import _Decoder
from .tensors import empty_output, finish_output, leaf_bytes, output_bytes

if TYPE_CHECKING:
    from .store import Store

#: top-level key of a step saved through torch.distributed.checkpoint (deltackpt.dcp):
#: its tensors are stored as shards, and exports reassemble them
DCP_META_KEY = "__dcp__"


def iter_tensors(state: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(path, tensor) for every tensor in a nested state, paths joined by '/'."""
    if isinstance(state, torch.Tensor):
        yield prefix, state
    elif isinstance(state, dict):
        for k, v in state.items():
            yield from iter_tensors(v, join_path(prefix, k))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            yield from iter_tensors(v, join_path(prefix, i))


def count_leaves(state: Any) -> int:
    if isinstance(state, dict):
        return sum(count_leaves(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(count_leaves(v) for v in state)
    return 1


def check_output_file(path: str | os.PathLike) -> None:
    """Refuse an output file whose directory does not exist, before any work."""
    parent = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(parent):
        raise InvalidInputError(f"{os.fspath(path)}: directory {parent} does not exist")


def partial_name(path: str | os.PathLike) -> str:
    """A temporary name beside ``path`` that no other writer uses: two exports to the
    same target must not write into one file (the loser's bytes would land in the
    winner's renamed file)."""
    return f"{os.fspath(path)}.{os.getpid()}-{secrets.token_hex(4)}.partial"


def write_safetensors(state: Any, path: str | os.PathLike,
                      metadata: dict[str, str] | None = None) -> tuple[int, int]:
    """Write the tensors of ``state`` to a .safetensors file keyed by their paths.

    Returns (tensors written, other leaves left out). Written atomically.
    """
    from safetensors.torch import save_file

    check_output_file(path)
    tensors = {}
    for name, t in iter_tensors(state):
        if torch_dtype_name(t.dtype) not in SAFETENSORS_DTYPES:
            raise InvalidInputError(f"'{name}': safetensors cannot hold a {t.dtype} tensor; "
                                    "write a .pt instead")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        tensors[name] = t.contiguous()
    skipped = count_leaves(state) - len(tensors)
    tmp = partial_name(path)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return len(tensors), skipped


def write_pt(state: Any, path: str | os.PathLike) -> None:
    """Write the full structure with ``torch.save`` (atomically)."""
    check_output_file(path)
    tmp = partial_name(path)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(exc, RuntimeError):
            # torch's zip writer reports a failed write (a full disk) as "unexpected pos"
            raise StorageError(f"{os.fspath(path)}: writing the file failed: {exc}") from exc
        raise


# -- streaming reads of stored steps ----------------------------------------------------
#: safetensors dtype names of the torch dtypes it can hold (safetensors ≥ 0.4)
SAFETENSORS_DTYPES: dict[str, str] = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "float8_e4m3fnuz": "F8_E4M3FNUZ", "float8_e5m2fnuz": "F8_E5M2FNUZ",
    "complex64": "C64",
}

#: bytes of entries decoded ahead of the consumer by :meth:`StepReader.iter_raw`
DEFAULT_WINDOW = 16 * 1024 * 1024


@dataclass
class StoredEntry:
    """One array entry of a planned step: what it holds and which blocks hold its bytes."""

    idx: int
    path: str
    kind: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    attrs: dict[str, Any]
    #: (start, end, block id): the entry's bytes [start, end) are that block's
    spans: list[tuple[int, int, bytes]]


class StepReader:
    """Reads steps of a store entry by entry or byte range by byte range.

    Every step is planned in one index snapshot when the reader is made; data is
    decoded on demand through the store's decoder (each delta base decoded once and
    dropped when no planned block needs it any more), so memory stays at what the
    caller asks for plus a few blocks. A concurrent ``gc`` that rewrites a pack
    makes a later read fail (FileNotFoundError/CorruptionError): plan again.
    """

    def __init__(self, store: Store, steps: Sequence[int | None],
                 select: str | Sequence[str] | None = None) -> None:
        from .store import PathNotFoundError

        store._check_open()
        sel = [select] if isinstance(select, str) else (list(select) if select else None)
        self.store = store
        self.steps: list[int] = []
        self.trees: dict[int, Any] = {}
        self.entries: dict[int, list[StoredEntry]] = {}
        rows_of: dict[int, list[tuple]] = {}
        with store._index.read() as conn:
            for step in steps:
                if step is None:
                    row = conn.execute("SELECT MAX(step) FROM steps").fetchone()
                    if row[0] is None:
                        raise StepNotFoundError(f"{store.location}: the store has no steps")
                    step = int(row[0])
                step = store._step_arg(step)
                row = conn.execute("SELECT tree FROM steps WHERE step=?", (step,)).fetchone()
                if row is None:
                    raise store._not_found(step)
                tree = json.loads(row[0])
                if sel:
                    try:
                        tree = select_tree(tree, sel)
                    except KeyError as exc:
                        raise PathNotFoundError(f"{store.location}: step {step} has no path "
                                                f"{exc.args[0]}") from None
                by_idx = {r[0]: r for r in conn.execute(
                    "SELECT idx, path, kind, dtype, shape, nbytes, blocks FROM entries "
                    "WHERE step=?", (step,))}
                rows = []
                for i, attrs in entry_nodes(tree):
                    if i not in by_idx:
                        raise CorruptionError(f"{store.location}: step {step}: index lacks "
                                              f"entry {i} referenced by its tree")
                    rows.append((*by_idx[i], attrs))
                self.steps.append(step)
                self.trees[step] = tree
                rows_of[step] = rows
            all_ids = [bid for rows in rows_of.values() for r in rows
                       for bid in unpack_ids(r[6])]
            locations = store._locate(conn, all_ids)
        for step, rows in rows_of.items():
            out = []
            for idx, path, kind, dtype, shape, nbytes, blob, attrs in rows:
                spans = []
                pos = 0
                for bid in unpack_ids(blob):
                    loc = locations.get(bid)
                    if loc is None:
                        raise CorruptionError(f"{store.location}: step {step}, entry '{path}': "
                                              f"block {bid.hex()[:12]} missing from the index")
                    spans.append((pos, pos + loc.raw_len, bid))
                    pos += loc.raw_len
                if pos != nbytes:
                    raise CorruptionError(f"{store.location}: step {step}, entry '{path}': "
                                          f"blocks hold {pos} bytes, entry has {nbytes}")
                out.append(StoredEntry(idx, path, kind, dtype, tuple(json.loads(shape)),
                                       nbytes, attrs, spans))
            self.entries[step] = out
        self._decoder = _Decoder(store, locations, all_ids)

    def read_into(self, step: int, entry: StoredEntry, out: np.ndarray, start: int = 0) -> None:
        """Decode the entry's bytes [start, start + out.nbytes) into the uint8 array ``out``."""
        end = start + out.nbytes
        if start < 0 or end > entry.nbytes:
            raise ValueError(f"byte range [{start}, {end}) outside entry '{entry.path}' "
                             f"({entry.nbytes} bytes)")
        where = f"step {step}, entry '{entry.path}'"
        first = bisect.bisect_right([s[1] for s in entry.spans], start)
        for a, b, bid in entry.spans[first:]:
            if a >= end:
                break
            if a >= start and b <= end:
                self._decoder.decode_to(bid, out[a - start:b - start], where)
            else:  # a block only partly inside the range
                tmp = np.empty(b - a, dtype=np.uint8)
                self._decoder.decode_to(bid, tmp, where)
                lo, hi = max(a, start), min(b, end)
                out[lo - start:hi - start] = tmp[lo - a:hi - a]

    def iter_raw(self, step: int, entries: Sequence[StoredEntry] | None = None,
                 window: int = DEFAULT_WINDOW) -> Iterator[tuple[StoredEntry, Any]]:
        """(entry, filled CPU output) in order, decoding up to ``window`` bytes ahead.

        The output is a plain tensor, ndarray or bytearray (see
        :func:`deltackpt.tensors.empty_output`); an entry larger than the window is
        decoded alone. Blocks are decoded in parallel on the store's pool.
        """
        todo = deque(self.entries[step] if entries is None else entries)
        pool = self.store._pool
        pending: deque[tuple[StoredEntry, Any, list[Future]]] = deque()
        ahead = 0
        try:
            while todo or pending:
                while todo and (not pending or ahead + todo[0].nbytes <= window):
                    e = todo.popleft()
                    out = empty_output(e.kind, e.dtype, e.shape)
                    view = output_bytes(out)
                    if view.nbytes != e.nbytes:
                        raise CorruptionError(
                            f"{self.store.location}: step {step}, entry '{e.path}': {e.nbytes} "
                            f"bytes recorded, shape/dtype give {view.nbytes}")
                    where = f"step {step}, entry '{e.path}'"
                    futs = [pool.submit(self._decoder.decode_to, bid, view[a:b], where)
                            for a, b, bid in e.spans]
                    pending.append((e, out, futs))
                    ahead += e.nbytes
                e, out, futs = pending.popleft()
                ahead -= e.nbytes
                for f in futs:
                    f.result()
                yield e, out
        finally:
            # no worker may go on writing into buffers after the caller is gone
            for _, _, futs in pending:
                for f in futs:
                    f.cancel()
            for _, _, futs in pending:
                for f in futs:
                    if not f.cancelled():
                        try:
                            f.result()
                        except BaseException:  # noqa: S110 - the first error is already raised
                            pass

    def iter_blocks(self, step: int, entries: Sequence[StoredEntry] | None = None,
                    window: int = DEFAULT_WINDOW) -> Iterator[tuple[StoredEntry, int, np.ndarray]]:
        """(entry, byte offset, decoded block bytes) for every block of the entries, in order,
        decoding up to ``window`` bytes ahead. A yielded array is reused once the next item
        is requested: memory stays at the window, however large an entry is."""
        todo = deque((e, a, b, bid) for e in (self.entries[step] if entries is None else entries)
                     for a, b, bid in e.spans)
        pool = self.store._pool
        free: dict[int, list[np.ndarray]] = {}
        pending: deque[tuple[StoredEntry, int, np.ndarray, Future]] = deque()
        ahead = 0
        try:
            while todo or pending:
                while todo and (not pending or ahead + todo[0][2] - todo[0][1] <= window):
                    e, a, b, bid = todo.popleft()
                    spare = free.get(b - a)
                    buf = spare.pop() if spare else np.empty(b - a, dtype=np.uint8)
                    pending.append((e, a, buf, pool.submit(
                        self._decoder.decode_to, bid, buf, f"step {step}, entry '{e.path}'")))
                    ahead += b - a
                e, a, buf, fut = pending.popleft()
                fut.result()
                yield e, a, buf
                ahead -= buf.nbytes
                free.setdefault(buf.nbytes, []).append(buf)
        finally:
            for *_, fut in pending:
                fut.cancel()
            for *_, fut in pending:
                if not fut.cancelled():
                    with contextlib.suppress(BaseException):
                        fut.result()

    def iter_entries(self, step: int, window: int = DEFAULT_WINDOW) -> Iterator[tuple[str, Any]]:
        """(path, value) for every entry of ``step``, values as :meth:`Store.load` makes them
        on the CPU (tensor, Parameter, ndarray or bytes)."""
        for e, out in self.iter_raw(step, window=window):
            yield e.path, finish_output(e.kind, out, e.attrs,
                                        f"{self.store.location}: step {step}, entry '{e.path}'")


def iter_entries(store: Store, step: int | None = None,
                 select: str | Sequence[str] | None = None,
                 window: int = DEFAULT_WINDOW) -> Iterator[tuple[str, Any]]:
    """(path, value) for each array entry of ``step`` (default: latest), one at a time.

    Holds about ``window`` bytes of decoded entries at once instead of the whole step;
    see :class:`StepReader`.
    A concurrent ``gc`` that rewrites a pack this plan reads from is met by planning the
    entries not yet yielded again (twice at most, and only when packs did change).
    """
    done: set[int] = set()
    with store._closing_race():
        for attempt in range(3):
            packs_before = store._packs_state()
            reader = StepReader(store, [step], select)
            step = s = reader.steps[0]
            todo = [e for e in reader.entries[s] if e.idx not in done]
            try:
                for e, out in reader.iter_raw(s, todo, window=window):
                    done.add(e.idx)
                    yield e.path, finish_output(e.kind, out, e.attrs,
                                                f"{store.location}: step {s}, entry '{e.path}'")
                return
            except (FileNotFoundError, CorruptionError):
                if s not in store:
                    raise store._not_found(s) from None
                if attempt == 2 or not store._worth_replanning(packs_before):
                    raise
                time.sleep(0.05 * (attempt + 1))


# -- export -----------------------------------------------------------------------------
SHARD_INDEX_NAME = "model.safetensors.index.json"
SINGLE_SHARD_NAME = "model.safetensors"
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


@dataclass
class ExportResult:
    """What an export wrote."""

    step: int
    #: files written: the .safetensors/.pt file, or the shards then the index
    files: list[str]
    tensors: int
    #: tensor bytes written
    nbytes: int
    #: values of the selection left out (non-tensor leaves; .safetensors holds only tensors)
    skipped: int
    seconds: float


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes of ``size``: an int, or a string like ``"5GB"`` (10^9) / ``"500MiB"`` (2^20)."""
    if isinstance(size, bool):
        raise ValueError(f"invalid size {size!r}")
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", str(size))
        unit = m.group(2).upper() if m else ""
        if m is None or unit not in _SIZE_UNITS:
            raise ValueError(f"invalid size {size!r}: use bytes or a number with KB, MB, GB, "
                             "TB (powers of 10) or KiB, MiB, GiB, TiB")
        value = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


def export(
    store: Store,
    out: str | os.PathLike,
    step: int | None = None,
    select: str | Sequence[str] | None = "model",
    *,
    max_shard_size: int | str | None = None,
    metadata: dict[str, str] | None = None,
    quiet: bool = True,
) -> ExportResult:
    """Write ``step`` (default: latest) of ``store`` as a deployment artifact at ``out``.

    - ``out`` ending in ``.safetensors``: one safetensors file of the selection's tensors;
    - ``max_shard_size`` given: ``out`` is a directory laid out like transformers'
      ``save_pretrained`` (``model-00001-of-0000N.safetensors`` + ``model.safetensors.index.json``;
      a single ``model.safetensors`` when everything fits in one shard);
    - ``out`` ending in ``.pt``/``.pth``: ``torch.save`` of the selected subtree with its
      full structure (loadable with ``torch.load(weights_only=True)``).

    With one ``select`` path (default ``"model"``) keys are entry paths relative to it, so
    ``model.load_state_dict(load_file(out))`` works; ``select=None`` exports the whole
    state under full paths. Components are joined by '/'; a '/' or '%' inside a key is
    written as %2F / %25. A safetensors header lists the keys in the state's order, and
    their data lie widest dtype first, so every tensor is aligned to its element size
    as in files ``safetensors`` writes. Tensors are decoded and written one window at a
    time (safetensors), never the whole step at once. Files appear atomically; a sharded export
    over an earlier one removes the old index first and writes the new one last, so an
    interrupted export leaves no index (export again), never an index over mixed shards.
    """
    out = os.fspath(out)
    if max_shard_size is not None:
        kind = "sharded"
        limit = parse_size(max_shard_size)
    elif out.endswith(".safetensors"):
        kind, limit = "safetensors", 0
    elif out.endswith((".pt", ".pth")):
        kind, limit = "pt", 0
    else:
        raise InvalidInputError(f"{out}: export to a .safetensors or .pt file, or to a "
                                "directory with max_shard_size")
    if step is None:  # once: the DCP check and the export must see the same step
        step = store.latest()
    for attempt in range(3):
        packs_before = store._packs_state()
        try:
            t0 = time.perf_counter()
            if step is not None and is_dcp_step(store, step):
                result = _export_dcp(store, out, step, select, limit if kind == "sharded"
                                     else None, metadata)
            elif kind == "pt":
                result = _export_pt(store, out, step, select)
            else:
                result = _export_safetensors(store, out, step, select, limit if
                                             kind == "sharded" else None, metadata, quiet)
            result.seconds = time.perf_counter() - t0
            return result
        except (FileNotFoundError, CorruptionError):
            # a concurrent gc may have moved frames we planned to read: plan again
            if step is not None and step not in store:
                raise store._not_found(step) from None
            if attempt == 2 or not store._worth_replanning(packs_before):
                raise  # no pack came or went: the damage is real
            time.sleep(0.05 * (attempt + 1))
        except DeltackptError:
            raise
        except OSError as exc:  # writing the output: a full disk, an I/O error
            raise StorageError.caused_by(
                f"{out}: writing the export failed: {exc.strerror or exc}", exc) from exc
    raise AssertionError("unreachable")


def is_dcp_step(store: Store, step: int | None) -> bool:
    """Whether ``step`` (default: latest) was saved through ``deltackpt.dcp``: its state
    has DCP's metadata under ``__dcp__`` (a plain state may use that key for anything)."""
    try:
        tree = StepReader(store, [step], [DCP_META_KEY]).trees
    except KeyError:  # PathNotFoundError
        return False
    (node,) = tree.values()
    for key, meta in node[1] if node[0] == "D" else ():
        if key == DCP_META_KEY:
            return meta[0] == "D" and {"layout", "state_dict"} <= {k for k, _ in meta[1]}
    return False


def dcp_state(store: Store, step: int, select: str | Sequence[str] | None) -> dict[str, Any]:
    """``{fqn: tensor or bytes}`` of a DCP step, shards reassembled in memory
    (``deltackpt.dcp.load_full``); ``select`` takes name prefixes (``"model"``)."""
    from .dcp import load_full

    return load_full(store, step, select=_select_list(select))


def _export_dcp(store: Store, out: str, step: int, select: str | Sequence[str] | None,
                shard_limit: int | None, metadata: dict[str, str] | None) -> ExportResult:
    # DCP names tensors by their fully qualified names (model.bert.…): one selected prefix
    # is cut off the keys, as export cuts a selected subtree's path
    state = dcp_state(store, step, select)
    sel = _select_list(select)
    if sel is not None and len(sel) == 1:
        root = sel[0].strip("/.")
        if list(state) == [root] and shard_limit is None and out.endswith((".pt", ".pth")):
            state = state[root]  # the selection is one value: written bare, as for any step
        else:
            state = {relative_key(k, sel, sep="."): v for k, v in state.items()}
    result = write_state(state, out, None, max_shard_size=shard_limit,
                         metadata={"deltackpt_step": str(step), **(metadata or {})})
    result.step = step
    return result


def _select_list(select: str | Sequence[str] | None) -> list[str] | None:
    if select is None:
        return None
    sel = [select] if isinstance(select, str) else list(select)
    return sel or None


def relative_key(path: str, select: list[str] | None, sep: str = "/") -> str:
    """The export key of an entry path: relative to the one selected path, if one.
    ``sep``: what joins components ('.' in the names of a DCP step)."""
    if select is None or len(select) != 1:
        return path
    root = select[0].strip("/" + sep)
    if path.startswith(root + sep):
        return path[len(root) + 1:]
    return path.rsplit(sep, 1)[-1]  # the selection is this very entry


def _count_values(node: Any) -> int:
    """Leaves of a state tree that are not entries (numbers, strings, ...)."""
    if isinstance(node, list) and node and isinstance(node[0], str):
        tag = node[0]
        if tag in ("L", "T"):
            return sum(_count_values(v) for v in node[1])
        if tag in ("D", "O", "C"):
            return sum(_count_values(v) for _, v in node[1])
        return 0 if tag == "E" else 1
    return 1


def _plan_shards(sizes: list[int], limit: int) -> list[list[int]]:
    """Split item indices into shards as huggingface_hub does (in order, a new shard when
    the next item would pass ``limit``, an item larger than ``limit`` alone in its shard),
    except that an oversized item also closes the shard before it, so shards hold
    consecutive items and a re-import sees them in their original order."""
    shards: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in enumerate(sizes):
        if current and (n > limit or used + n > limit):
            shards.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current or not shards:
        shards.append(current)
    return shards


def aligned_order(dtypes: Sequence[str]) -> list[int]:
    """Positions of tensors with these torch dtype names in the order their data should
    lie in a safetensors file: widest elements first, otherwise as given, so every tensor
    starts at a multiple of its element size (the data section starts 8-byte aligned), as
    ``safetensors.torch.save_file`` lays them out. Zero-copy readers then map each tensor
    in place instead of copying a misaligned one."""
    return sorted(range(len(dtypes)), key=lambda i: -dtype_info("tensor", dtypes[i]).itemsize)


def safetensors_header(items: Sequence[tuple[str, str, tuple[int, ...], int]],
                       metadata: dict[str, str] | None,
                       layout: Sequence[int] | None = None) -> bytes:
    """The 8-byte length + JSON header of a safetensors file holding ``items``
    (key, safetensors dtype, shape, nbytes): keys listed in that order, data back to
    back in ``layout`` order (positions in ``items``; default: the same order)."""
    offsets: dict[int, int] = {}
    off = 0
    for i in range(len(items)) if layout is None else layout:
        offsets[i] = off
        off += items[i][3]
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for i, (key, dtype, shape, nbytes) in enumerate(items):
        header[key] = {"dtype": dtype, "shape": list(shape),
                       "data_offsets": [offsets[i], offsets[i] + nbytes]}
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned, as safetensors pads
    return struct.pack("<Q", len(raw)) + raw


def _export_safetensors(store: Store, out: str, step: int | None,
                        select: str | Sequence[str] | None, shard_limit: int | None,
                        metadata: dict[str, str] | None, quiet: bool) -> ExportResult:
    sel = _select_list(select)
    reader = StepReader(store, [step], sel)
    step = reader.steps[0]
    entries = [e for e in reader.entries[step] if e.kind in ("tensor", "parameter")]
    skipped = _count_values(reader.trees[step]) + len(reader.entries[step]) - len(entries)
    keys = [relative_key(e.path, sel) for e in entries]
    for e, key in zip(entries, keys):
        if e.dtype not in SAFETENSORS_DTYPES:
            raise InvalidInputError(f"{store.location}: step {step}, entry '{e.path}': dtype "
                                    f"{e.dtype} has no safetensors type; export to .pt or "
                                    "select around it")
        if key == "__metadata__":
            raise InvalidInputError(f"{store.location}: step {step}: entry '{e.path}' would "
                                    "be named __metadata__, which safetensors reserves")
    if len(set(keys)) != len(keys):
        raise InvalidInputError(f"{store.location}: step {step}: the selected entries do "
                                "not have distinct names relative to the selection")
    meta = {"format": "pt", "deltackpt_step": str(step)}
    meta.update(metadata or {})
    items = [(k, e.dtype, e.shape, e.nbytes) for k, e in zip(keys, entries)]

    def read(order: list[int]) -> Iterator[np.ndarray]:
        blocks = reader.iter_blocks(step, [entries[i] for i in order])
        try:
            for _, _, buf in blocks:
                yield buf
        finally:
            blocks.close()

    written = write_tensor_files(out, items, read, shard_limit, meta, f"export step {step}",
                                 quiet)
    return ExportResult(step, written, len(entries), sum(e.nbytes for e in entries), skipped,
                        0.0)


def write_tensor_files(
    out: str,
    items: Sequence[tuple[str, str, tuple[int, ...], int]],
    read: Callable[[list[int]], Iterator[np.ndarray]],
    shard_limit: int | None,
    metadata: dict[str, str] | None,
    desc: str = "write",
    quiet: bool = True,
) -> list[str]:
    """Write tensors as one safetensors file ``out`` or, with ``shard_limit``, as a
    transformers-style sharded directory ``out``; returns the files written.

    ``items``: (key, torch dtype name, shape, nbytes) in order: shards hold runs of
    that order and list their keys in it. ``read(order)`` (called once, ``order`` a
    permutation of the items' positions: the data layout, see :func:`aligned_order`)
    yields the items' bytes in that order as flat uint8 arrays, each within one item
    (an item may come in several pieces), consumed one at a time.
    """
    from .progress import bar

    if shard_limit is None:
        check_output_file(out)
        shards = [(out, list(range(len(items))))]
    else:
        if os.path.exists(out) and not os.path.isdir(out):
            raise InvalidInputError(f"{out}: exists and is not a directory; a sharded "
                                    "export writes a directory")
        os.makedirs(out, exist_ok=True)
        groups = _plan_shards([it[3] for it in items], shard_limit)
        if len(groups) == 1:
            shards = [(os.path.join(out, SINGLE_SHARD_NAME), groups[0])]
        else:
            shards = [(os.path.join(out, f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"),
                       g) for i, g in enumerate(groups)]
    total = sum(it[3] for it in items)
    # positions within each shard's group, data order
    layouts = [aligned_order([items[i][1] for i in group]) for _, group in shards]
    data = read([group[j] for (_, group), layout in zip(shards, layouts) for j in layout])
    written: list[str] = []
    partial: list[str] = []
    try:
        with bar(total, desc, quiet=quiet) as progress:
            for (path, group), layout in zip(shards, layouts):
                tmp = partial_name(path)
                partial.append(tmp)
                with open(tmp, "wb") as f:
                    f.write(safetensors_header(
                        [(items[i][0], SAFETENSORS_DTYPES[items[i][1]], items[i][2], items[i][3])
                         for i in group], metadata, layout))
                    for i in (group[j] for j in layout):
                        need = items[i][3]
                        while need > 0:
                            chunk = next(data)
                            need -= chunk.nbytes
                            if need < 0:
                                raise AssertionError(f"{items[i][0]}: more bytes than the "
                                                     f"{items[i][3]} announced")
                            f.write(chunk)
                            progress.update(chunk.nbytes)
                written.append(path)
        if shard_limit is not None and len(shards) > 1:
            # an earlier export's index goes before any shard is replaced, and the new index
            # comes last: an export interrupted in between leaves shards without an index,
            # which no loader takes for a checkpoint, never one index over two steps' shards
            # (a single model.safetensors is replaced atomically, and loaders prefer it to
            # an index: it goes only after the new index is in place, below)
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(out, SHARD_INDEX_NAME))
        for path, tmp in zip(written, partial):
            os.replace(tmp, path)
        partial = []
    finally:
        close = getattr(data, "close", None)
        if close is not None:
            close()
        for tmp in partial:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
    if shard_limit is not None:
        index_path = os.path.join(out, SHARD_INDEX_NAME)
        if len(shards) > 1:
            index = {
                "metadata": {"total_parameters": sum(math.prod(it[2]) for it in items),
                             "total_size": total},
                "weight_map": {items[i][0]: os.path.basename(path)
                               for path, group in shards for i in group},
            }
            tmp = partial_name(index_path)
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, index_path)
            written.append(index_path)
        # files of an earlier export into this directory would contradict the new one
        keep = {os.path.basename(p) for p in written}
        for name in sorted(os.listdir(out), key=lambda n: n != SHARD_INDEX_NAME):
            if name not in keep and (name in (SHARD_INDEX_NAME, SINGLE_SHARD_NAME)
                                     or _SHARD_RE.fullmatch(name)):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(out, name))
    return written


def write_state(
    state: Any,
    out: str | os.PathLike,
    select: str | Sequence[str] | None = "model",
    *,
    max_shard_size: int | str | None = None,
    metadata: dict[str, str] | None = None,
) -> ExportResult:
    """Write an in-memory state (e.g. an average) like :func:`export` writes a step.

    ``state`` is shaped like ``store.load(step, select=select)``; keys, formats and the
    sharded layout are those of :func:`export`. ``ExportResult.step`` is -1.
    """
    t0 = time.perf_counter()
    out = os.fspath(out)
    sel = _select_list(select)
    if sel is not None and len(sel) == 1:
        try:
            state = subtree(state, sel[0])
        except KeyError:
            raise InvalidInputError(f"the state has no path {sel[0]!r}") from None
        if isinstance(state, torch.Tensor) and not (max_shard_size is None and
                                                    out.endswith((".pt", ".pth"))):
            # the selection is one tensor: its key is its own name, as export writes it
            state = {relative_key(sel[0], sel): state}
    if max_shard_size is None and out.endswith((".pt", ".pth")):
        check_weights_only(state)
        tensors = list(iter_tensors(state))
        write_pt(state, out)
        return ExportResult(-1, [out], len(tensors), sum(t.numel() * t.element_size()
                                                         for _, t in tensors),
                            0, time.perf_counter() - t0)
    if max_shard_size is None and not out.endswith(".safetensors"):
        raise InvalidInputError(f"{out}: write to a .safetensors or .pt file, or to a "
                                "directory with max_shard_size")
    limit = None if max_shard_size is None else parse_size(max_shard_size)
    tensors = list(iter_tensors(state))
    items = []
    for key, t in tensors:
        name = torch_dtype_name(t.dtype)
        if name not in SAFETENSORS_DTYPES or t.device.type != "cpu":
            raise InvalidInputError(f"'{key}': a {t.dtype} tensor on {t.device} cannot be "
                                    "written to safetensors from here; write a .pt")
        items.append((key, name, tuple(t.shape), t.numel() * t.element_size()))
    if len({k for k, *_ in items}) != len(items) or any(k == "__metadata__" for k, *_ in items):
        raise InvalidInputError("tensor names are not distinct or use __metadata__")

    def read(order: list[int]) -> Iterator[np.ndarray]:
        for i in order:
            key, name, shape, nbytes = items[i]
            if nbytes:
                yield leaf_bytes(Leaf(0, key, "tensor", name, shape, tensors[i][1]))

    written = write_tensor_files(out, items, read, limit, {"format": "pt", **(metadata or {})})
    return ExportResult(-1, written, len(items), sum(it[3] for it in items),
                        count_leaves(state) - len(items), time.perf_counter() - t0)


def subtree(state: Any, path: str) -> Any:
    """The value at ``path`` (escaped components joined by '/') inside a loaded state."""
    node = state
    parts = path.lstrip("/").split("/")
    for i, part in enumerate(parts):
        if part == "" and i == len(parts) - 1 and not (isinstance(node, dict) and "" in node):
            break  # a trailing '/' is a separator, unless it names an empty key (select_tree)
        if isinstance(node, dict):
            match = [k for k in node if escape_key(k) == part]
            if not match:
                raise KeyError(path)
            node = node[match[0]]
        elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise KeyError(path)
    return node


def _pickled_int_bytes(value: int) -> int:
    """Length of pickle's little-endian two's-complement encoding of ``value``."""
    n = (value.bit_length() >> 3) + 1
    if value < 0 and n > 1:
        raw = value.to_bytes(n, "little", signed=True)
        if raw[-1] == 0xFF and raw[-2] & 0x80:
            n -= 1
    return n


def check_weights_only(value: Any, path: str = "") -> None:
    """Raise UnsupportedValueError for values ``torch.load(weights_only=True)`` refuses."""
    if isinstance(value, (np.ndarray, np.generic)):
        where = f"'{path}'" if path else "the top level"
        raise UnsupportedValueError(
            f"the numpy value at {where} cannot be loaded with torch.load(weights_only=True); "
            "export to .safetensors, or select a subtree without numpy values")
    if (type(value) is bytes and not value) or (
            type(value) is int and _pickled_int_bytes(value) > 255):
        # torch's weights_only unpickler knows neither pickle's empty-bytes opcode
        # sequence nor LONG4 (ints over 255 bytes)
        where = f"'{path}'" if path else "the top level"
        what = "an empty bytes value" if type(value) is bytes else "an int this large"
        raise UnsupportedValueError(
            f"{what} at {where} cannot be loaded with torch.load(weights_only=True); "
            "export to .safetensors, or select a subtree without it")
    if isinstance(value, torch.Tensor):
        for name, v in value.__dict__.items():  # pickled with the tensor
            check_weights_only(v, f"{path}@{name}")
    elif isinstance(value, dict):
        for k, v in value.items():
            check_weights_only(v, join_path(path, k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_weights_only(v, join_path(path, i))


def _export_pt(store: Store, out: str, step: int | None,
               select: str | Sequence[str] | None) -> ExportResult:
    sel = _select_list(select)
    step = store.latest() if step is None else store._step_arg(step)
    if step is None:
        raise StepNotFoundError(f"{store.location}: the store has no steps")
    state = store.load(step, map_location="cpu", select=sel)
    if sel is not None and len(sel) == 1:
        state = subtree(state, sel[0])
    check_weights_only(state)
    tensors = list(iter_tensors(state))
    write_pt(state, out)
    # torch.save keeps every value of the selection: nothing is left out
    return ExportResult(step, [out], len(tensors), sum(t.numel() * t.element_size()
                                                       for _, t in tensors), 0, 0.0)
