"""Hugging Face ``Trainer`` integration: ``checkpoint-N`` directories as store steps.

:class:`DeltaCheckpointCallback` ingests every ``checkpoint-N`` directory the
Trainer writes into a deltackpt store as step ``N`` (in a background thread) and
then removes the directory; :func:`materialize` writes it back, byte for byte,
for ``trainer.train(resume_from_checkpoint=...)`` or ``from_pretrained``.

How a directory becomes one step's state (``docs/integrations.md`` has the table):

- ``*.safetensors``: the header bytes verbatim plus every tensor, typed, so blocks
  dedup and delta-encode across steps;
- torch files (``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``, …): first
  checked with ``torch.load(weights_only=True)`` (numpy RNG state allowed, as the
  Trainer does); then the zip archive is kept as a *skeleton* (every byte except
  the tensor storages) and each storage is stored as a tensor named after the
  first tensor that uses it (``state/0/exp_avg_sq``) with that tensor's dtype;
- every other file (JSON, text, tokenizer files) as ``bytes``;
- a torch file that ``weights_only`` refuses (a pickled object) raises
  :class:`UnsupportedValueError` naming the file and nothing is ingested, unless
  its name is in ``opaque_files`` (default ``training_args.bin``, the pickled
  ``TrainingArguments`` the Trainer writes and never reads back) or
  ``unsafe_files="store"``: then its bytes are stored as they are, never unpickled.

Materializing splices the storages back into the skeletons and the tensors back
after the safetensors headers, so every file is byte-identical to what was ingested.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import struct
import threading
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xxhash

from .backend import fsync_path
from .dtypes import torch_dtype_name
from .errors import (
    BackgroundSaveError,
    CheckpointDirError,
    StoreClosedError,
    UnsupportedValueError,
)
from .flatten import join_path
from .results import SaveResult
from .store import Store, open_store

try:  # the callback needs transformers; ingest and materialize do not
    from transformers import TrainerCallback as _CallbackBase

    _TRANSFORMERS_ERROR: ImportError | None = None
except ImportError as _exc:  # pragma: no cover - exercised without transformers only
    _CallbackBase = object  # type: ignore[assignment,misc]
    _TRANSFORMERS_ERROR = _exc

#: version of the state layout below; materialize refuses layouts it does not know
LAYOUT_VERSION = 1
_MARKER = "deltackpt_hf"
CHECKPOINT_PREFIX = "checkpoint"
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")

_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
#: a safetensors header larger than this is not believed (the format's own limit)
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
_ZIP_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")


# -- reading a checkpoint directory -------------------------------------------------------


@contextmanager
def _numpy_safe_globals() -> Iterator[None]:
    """Allow the numpy objects of ``np.random.get_state()`` in weights_only loads.

    The same allow-list the Trainer uses for ``rng_state.pth``: array
    reconstruction and dtypes only, no arbitrary callables.
    """
    np_core = getattr(np, "_core", None) or np.core
    allow = [np_core.multiarray._reconstruct, np.ndarray, np.dtype,
             type(np.dtype(np.uint32))]
    with torch.serialization.safe_globals(allow):
        yield


def _private_map(path: str) -> mmap.mmap | None:
    """A copy-on-write mapping of the file (writable for torch.frombuffer, never written)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return None
        return mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)


def _view(mm: mmap.mmap | None, offset: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
    """``nbytes`` of the mapping at ``offset`` as a 1-D tensor of ``dtype`` (raw bytes when
    the store cannot type it: the bytes, not the type, make the file identical)."""
    if torch_dtype_name(dtype) is None:
        dtype = torch.uint8
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if nbytes == 0 or mm is None:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(mm, dtype=dtype, count=nbytes // itemsize, offset=offset)


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _safetensors_entry(path: str) -> dict | None:
    """The header bytes and typed tensors of a safetensors file; None when its data
    region is not exactly the tensors back to back (then it is stored as bytes)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return None
        n = struct.unpack("<Q", head)[0]
        if n > min(_MAX_SAFETENSORS_HEADER, size - 8):
            return None
        header_bytes = head + f.read(n)
    try:
        header = json.loads(header_bytes[8:])
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(header, dict):
        return None
    spans = []
    for tname, info in header.items():
        if tname == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            return None
        spans.append((start, end, tname, dtype))
    spans.sort()
    pos = 0
    for start, end, _, dtype in spans:
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if start != pos or end < start or (end - start) % itemsize:
            return None
        pos = end
    if 8 + n + pos != size:
        return None
    mm = _private_map(path)
    base = 8 + n
    tensors = {tname: _view(mm, base + start, end - start, dtype)
               for start, end, tname, dtype in spans}
    return {"kind": "safetensors", "header": header_bytes, "tensors": tensors}


_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


def _is_torch_file(path: str) -> bool:
    """A torch.save zip archive, or a pickle-looking file with a torch/pickle suffix."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as zf:
                return any(n.endswith("/data.pkl") or n == "data.pkl" for n in zf.namelist())
        except zipfile.BadZipFile:
            return False
    # legacy (non-zip) torch.save files and bare pickles start with the PROTO opcode
    return magic[:1] == b"\x80" and path.endswith(_PICKLE_SUFFIXES)


def _weights_only_load(path: str) -> tuple[Any, str | None]:
    """(object, None) when ``torch.load(weights_only=True)`` accepts the file, else
    (None, why). weights_only refuses before building any object: nothing runs."""
    try:
        with _numpy_safe_globals():
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True), None
            except RuntimeError as exc:  # legacy (non-zip) format: no mmap
                if "mmap" not in str(exc):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True), None
    except Exception as exc:  # noqa: BLE001 - any refusal means: not loadable safely
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        # torch's message opens with advice to retry with weights_only=False: keep the cause
        cause = [ln for ln in lines if "WeightsUnpickler error" in ln]
        why = (cause or lines or [type(exc).__name__])[0]
        why = why.replace("WeightsUnpickler error: ", "").split(". Please use")[0]
        return None, why[:300]


def _tensors_in_pickle_order(obj: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of a loaded object in the order pickle met them (dict order, depth first)."""
    if isinstance(obj, torch.Tensor):
        yield path or "tensor", obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            key = k if type(k) in (int, str) else str(k)
            yield from _tensors_in_pickle_order(v, join_path(path, key))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors_in_pickle_order(v, join_path(path, i))


def _digest(mv: Any) -> bytes:
    return xxhash.xxh3_128_digest(mv)


def _torch_entry(path: str, obj: Any) -> dict | None:
    """Skeleton + typed storages of a zip torch file; None when the archive does not
    have the plain layout (stored, uncompressed records), then it is stored as bytes."""
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        return None
    with zf:
        infos = zf.infolist()
    size = os.path.getsize(path)
    records: dict[str, tuple[int, int]] = {}  # storage key -> (file offset, size)
    with open(path, "rb") as f:
        for info in infos:
            parts = info.filename.split("/")
            if len(parts) != 3 or parts[1] != "data" or not parts[2].isdigit():
                continue
            if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
                return None
            f.seek(info.header_offset)
            local = f.read(_ZIP_LOCAL_HEADER.size)
            if len(local) != _ZIP_LOCAL_HEADER.size or local[:4] != b"PK\x03\x04":
                return None
            fields = _ZIP_LOCAL_HEADER.unpack(local)
            start = info.header_offset + _ZIP_LOCAL_HEADER.size + fields[9] + fields[10]
            if start + info.file_size > size:
                return None
            records[parts[2]] = (start, info.file_size)
    # storage keys are handed out in the order pickle first meets each storage
    storages: list[tuple[str, torch.Tensor]] = []
    seen: set[tuple[int, int]] = set()
    for tpath, t in _tensors_in_pickle_order(obj):
        st = t.untyped_storage()
        ident = (st.data_ptr(), st.nbytes())
        if ident in seen:
            continue
        seen.add(ident)
        storages.append((tpath, t))
    keys = sorted(records, key=int)
    mm = _private_map(path)
    named: list[tuple[int, int, str, torch.dtype]] = []
    matches = len(keys) == len(storages)
    if matches:
        for key, (tpath, t) in zip(keys, storages):
            start, nbytes = records[key]
            st = t.untyped_storage()
            itemsize = t.element_size()
            if st.nbytes() != nbytes or nbytes % itemsize:
                matches = False
                break
            if nbytes:
                loaded = np.frombuffer(memoryview(mm)[start:start + nbytes], dtype=np.uint8)
                raw = torch.empty(0, dtype=torch.uint8).set_(st).numpy()
                if _digest(loaded) != _digest(raw):
                    matches = False
                    break
            named.append((start, nbytes, tpath, t.dtype))
    if not matches:  # unusual archive: keep the storages as untyped bytes
        named = [(records[k][0], records[k][1], f"storage/{k}", torch.uint8) for k in keys]
    named.sort()
    pieces: list[bytes] = []
    splices: list[list[Any]] = []
    tensors: dict[str, torch.Tensor] = {}
    pos = 0
    skeleton_len = 0
    with open(path, "rb") as f:
        for start, nbytes, tname, dtype in named:
            if start < pos:
                return None
            f.seek(pos)
            piece = f.read(start - pos)
            pieces.append(piece)
            skeleton_len += len(piece)
            splices.append([skeleton_len, tname])
            tensors[tname] = _view(mm, start, nbytes, dtype)
            pos = start + nbytes
        f.seek(pos)
        pieces.append(f.read())
    return {"kind": "torch", "skeleton": b"".join(pieces), "splices": splices,
            "tensors": tensors}


def read_checkpoint_dir(
    path: str | os.PathLike,
    *,
    unsafe_files: str = "error",
    opaque_files: Sequence[str] = ("training_args.bin",),
) -> dict:
    """The storable state of a checkpoint directory (see the module docstring).

    Tensors are copy-on-write views of the files (nothing large is copied). A torch
    file that ``weights_only`` refuses raises :class:`UnsupportedValueError` naming
    it, unless its name is in ``opaque_files`` or ``unsafe_files="store"``.
    """
    if unsafe_files not in ("error", "store"):
        raise ValueError(f"unsafe_files must be 'error' or 'store', not {unsafe_files!r}")
    root = os.fspath(path)
    if not os.path.isdir(root):
        raise CheckpointDirError(f"{root}: not a directory")
    files: dict[str, dict] = {}
    for rel in _walk_files(root):
        full = os.path.join(root, *rel.split("/"))
        where = f"{root}: {rel}"
        base = rel.rsplit("/", 1)[-1]
        entry: dict | None = None
        if base in opaque_files:
            entry = {"kind": "bytes", "data": _read_bytes(full)}
        elif rel.endswith(".safetensors"):
            entry = _safetensors_entry(full)
        elif _is_torch_file(full):
            obj, why = _weights_only_load(full)
            if why is not None:
                if unsafe_files == "error":
                    raise UnsupportedValueError(
                        f"{where}: torch.load(weights_only=True) refuses this file ({why}); "
                        "deltackpt never unpickles such files and ingested nothing. Pass "
                        f"opaque_files=[..., {base!r}] (or unsafe_files='store') to keep its "
                        "bytes as they are, or stop writing it into the checkpoint")
                entry = {"kind": "bytes", "data": _read_bytes(full)}
            else:
                entry = _torch_entry(full, obj)
                del obj
        if entry is None:
            entry = {"kind": "bytes", "data": _read_bytes(full)}
        files[rel] = entry
    return {_MARKER: LAYOUT_VERSION, "name": os.path.basename(os.path.normpath(root)),
            "files": files}


def _walk_files(root: str) -> list[str]:
    """Relative POSIX paths of every regular file under ``root``, sorted."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames) + [d for d in dirnames
                                         if os.path.islink(os.path.join(dirpath, d))]:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if os.path.islink(full) or not os.path.isfile(full):
                raise CheckpointDirError(f"{root}: {rel} is a link or special file; a "
                                         "checkpoint directory holds regular files only")
            out.append(rel)
    return sorted(out)


# -- writing it back ------------------------------------------------------------------------


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _check_layout(state: Any, where: str) -> dict:
    if not isinstance(state, dict) or _MARKER not in state:
        raise CheckpointDirError(f"{where} was not ingested from a checkpoint directory "
                                 "(no deltackpt_hf layout); use `deltackpt restore` instead")
    if state[_MARKER] != LAYOUT_VERSION:
        raise CheckpointDirError(f"{where}: checkpoint layout version {state[_MARKER]!r} is "
                                 f"not supported (this deltackpt writes {LAYOUT_VERSION})")
    files = state.get("files")
    if not isinstance(files, dict):
        raise CheckpointDirError(f"{where}: damaged checkpoint layout (no file table)")
    return files


def _file_chunks(entry: dict, where: str) -> Iterator[bytes | memoryview]:
    kind = entry.get("kind")
    if kind == "bytes":
        yield entry["data"]
    elif kind == "safetensors":
        header = entry["header"]
        n = struct.unpack("<Q", header[:8])[0]
        meta = json.loads(header[8:8 + n])
        spans = sorted((tuple(v["data_offsets"]), k) for k, v in meta.items()
                       if k != "__metadata__")
        yield header
        for (start, end), tname in spans:
            data = _tensor_bytes(entry["tensors"][tname])
            if data.nbytes != end - start:
                raise CheckpointDirError(f"{where}: tensor {tname!r} has {data.nbytes} bytes, "
                                         f"the header says {end - start}")
            yield data
    elif kind == "torch":
        skeleton = entry["skeleton"]
        pos = 0
        for offset, tname in entry["splices"]:
            yield skeleton[pos:offset]
            yield _tensor_bytes(entry["tensors"][tname])
            pos = offset
        yield skeleton[pos:]
    else:
        raise CheckpointDirError(f"{where}: unknown file kind {kind!r}")


def _safe_relpath(rel: str, where: str) -> list[str]:
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise CheckpointDirError(f"{where}: refusing file name {rel!r} (outside the directory)")
    return parts


def write_checkpoint_dir(state: Any, out_dir: str | os.PathLike, *, overwrite: bool = False,
                         fsync: bool = True, where: str = "state") -> list[str]:
    """Write a state from :func:`read_checkpoint_dir` as a directory; returns the file names.

    Files go to a sibling ``<out_dir>.partial-<pid>`` that is renamed into place at
    the end, so ``out_dir`` never holds a half-written checkpoint. An existing
    ``out_dir`` is an error unless ``overwrite``.
    """
    files = _check_layout(state, where)
    out = os.path.abspath(os.fspath(out_dir))
    if os.path.lexists(out) and not overwrite:
        raise CheckpointDirError(f"{out} already exists; remove it or pass overwrite "
                                 "(--force) to replace it")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{out}.partial-{os.getpid()}"
    if os.path.lexists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        for rel, entry in files.items():
            parts = _safe_relpath(rel, where)
            target = os.path.join(tmp, *parts)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as f:
                for chunk in _file_chunks(entry, f"{where}: {rel}"):
                    f.write(chunk)
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())
        if os.path.lexists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
        if fsync:
            fsync_path(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return list(files)


# -- store-level API ------------------------------------------------------------------------


def _with_store(store: Store | str | os.PathLike, create: bool) -> tuple[Store, bool]:
    if isinstance(store, Store):
        return store, False
    return open_store(store, create=create), True


def ingest_checkpoint(
    store: Store | str | os.PathLike,
    path: str | os.PathLike,
    step: int | None = None,
    *,
    metrics: dict[str, Any] | None = None,
    replace: bool = False,
    unsafe_files: str = "error",
    opaque_files: Sequence[str] = ("training_args.bin",),
) -> SaveResult:
    """Store the checkpoint directory ``path`` as ``step`` (default: the N of
    ``checkpoint-N``). ``replace`` first deletes an existing step of that number."""
    root = os.fspath(path)
    if step is None:
        m = _CHECKPOINT_RE.match(os.path.basename(os.path.normpath(root)))
        if m is None:
            raise CheckpointDirError(f"{root}: name is not checkpoint-<step>; pass step=")
        step = int(m.group(1))
    state = read_checkpoint_dir(root, unsafe_files=unsafe_files, opaque_files=opaque_files)
    s, owned = _with_store(store, create=True)
    try:
        if replace and step in s:
            s.delete(step)
        return s.save(state, step=step, metrics=metrics, tags=["hf-trainer"],
                      note=state["name"])
    finally:
        del state
        if owned:
            s.close()


def _refuse_overlap(store: Store, out_dir: str | os.PathLike) -> None:
    """Refuse an output directory that is, holds or sits inside the store's local files
    (its root, or a remote store's cache): replacing it would delete them."""
    out = os.path.realpath(os.fspath(out_dir))
    for base in (getattr(store.backend, "root", None), getattr(store, "cache_dir", None)):
        if not isinstance(base, str):
            continue
        base = os.path.realpath(base)
        if out == base or out.startswith(base + os.sep) or base.startswith(out + os.sep):
            raise CheckpointDirError(f"{out}: the output overlaps the store's files in "
                                     f"{base}; write the checkpoint directory elsewhere")


def materialize(
    store: Store | str | os.PathLike,
    step: int | None,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    fsync: bool = True,
) -> str:
    """Rebuild the ``checkpoint-N`` directory of ``step`` (default: latest) at ``out_dir``.

    Every file is byte-identical to the one ingested. Returns ``out_dir``, ready for
    ``trainer.train(resume_from_checkpoint=out_dir)`` or ``from_pretrained(out_dir)``.
    """
    materialize_files(store, step, out_dir, overwrite=overwrite, fsync=fsync)
    return os.fspath(out_dir)


def materialize_files(store: Store | str | os.PathLike, step: int | None,
                      out_dir: str | os.PathLike, *, overwrite: bool = False,
                      fsync: bool = True) -> list[str]:
    """:func:`materialize`, returning the names of the files written."""
    s, owned = _with_store(store, create=False)
    try:
        _refuse_overlap(s, out_dir)
        if step is None:
            step = s.latest()
            if step is None:
                raise CheckpointDirError(f"{s.location}: the store is empty")
        state = s.load(step)
        return write_checkpoint_dir(state, out_dir, overwrite=overwrite, fsync=fsync,
                                    where=f"{s.location}: step {step}")
    finally:
        if owned:
            s.close()


def resume_checkpoint(store: Store | str | os.PathLike, output_dir: str | os.PathLike,
                      step: int | None = None) -> str | None:
    """Materialize ``step`` (default: latest) as ``<output_dir>/checkpoint-<step>`` unless
    that directory already holds every file of the step; the path for
    ``resume_from_checkpoint``, or None when there is nothing to resume from.

    Without ``step``, a newer complete ``checkpoint-N`` directory already in
    ``output_dir`` (one with ``trainer_state.json``, which the Trainer writes last:
    a save whose ingest a crash interrupted) wins over the store's latest step.
    """
    on_disk = None if step is not None else _newest_complete_dir(os.fspath(output_dir))
    if not isinstance(store, Store) and not os.path.isdir(os.fspath(store)):
        return on_disk[1] if on_disk else None
    s, owned = _with_store(store, create=False)
    try:
        step = s.latest() if step is None else step
        if on_disk is not None and (step is None or on_disk[0] > step):
            return on_disk[1]
        if step is None:
            return None
        target = os.path.join(os.fspath(output_dir), f"{CHECKPOINT_PREFIX}-{step}")
        # a directory of a stored step may be one a removal interrupted (files gone,
        # trainer_state.json still there): rewritten from the store unless it holds every
        # file the step does. A complete one is left alone: under torchrun every rank calls
        # this, and they must not rewrite a directory the others are reading
        if not os.path.isdir(target) or not _stored_files(s, step) <= _dir_files(target):
            materialize(s, step, target, overwrite=True)
        return target
    finally:
        if owned:
            s.close()


def _dir_files(path: str) -> set[str]:
    """Relative paths of the regular files under ``path`` ('/'-joined)."""
    out = set()
    for dirpath, _dirs, files in os.walk(path):
        rel = os.path.relpath(dirpath, path)
        for f in files:
            out.add(f if rel == "." else f"{rel.replace(os.sep, '/')}/{f}")
    return out


def _stored_files(store: Store, step: int) -> set[str]:
    """The file names a stored checkpoint directory holds, from its tree (no data read)."""
    rows = store._index.query("SELECT tree FROM steps WHERE step=?", (step,))
    if not rows:
        return set()
    tree = json.loads(rows[0][0])
    for key, node in tree[1] if tree[0] in ("D", "O") else []:
        if key == "files" and isinstance(node, list) and node[0] in ("D", "O"):
            return {k for k, _ in node[1]}
    return set()


def _remove_dir(path: str) -> None:
    """Remove a checkpoint directory so that no interrupted removal leaves something that
    looks like a checkpoint: rename it out of the ``checkpoint-N`` namespace first."""
    trash = os.path.join(os.path.dirname(path),
                         f".deltackpt-removing-{os.path.basename(path)}-{os.getpid()}")
    try:
        os.rename(path, trash)
    except OSError:
        trash = path  # another filesystem's rules: remove it in place
    shutil.rmtree(trash)


def _newest_complete_dir(output_dir: str) -> tuple[int, str] | None:
    best: tuple[int, str] | None = None
    if not os.path.isdir(output_dir):
        return None
    for name in os.listdir(output_dir):
        m = _CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        complete = m is not None and os.path.isfile(os.path.join(path, "trainer_state.json"))
        if complete and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), path)
    return best


# -- the Trainer callback --------------------------------------------------------------------


@dataclass
class IngestRecord:
    """What ingesting one ``checkpoint-N`` directory cost."""

    step: int
    dir_bytes: int  # size of the directory the Trainer wrote
    written_bytes: int  # bytes the store appended for it
    logical_bytes: int
    ingest_s: float  # read + store.save, in the ingest thread
    stall_s: float  # time the callback held the training loop for this save (hook + waits)
    removed: bool
    deleted: list[int]  # steps retention deleted after this one


def _dir_size(path: str) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            total += os.path.getsize(os.path.join(dirpath, name))
    return total


class DeltaCheckpointCallback(_CallbackBase):  # type: ignore[misc,valid-type]
    """Ingest each ``checkpoint-N`` the Trainer writes into a deltackpt store as step N.

    ``store``: a :class:`Store` or a path (opened with ``store_options``).
    ``remove_checkpoints`` (default True): delete the directory once the step is
    committed. ``async_ingest`` (default True): ingest in a background thread
    after the Trainer has written the directory; the training loop waits for it
    only before the Trainer's next save or evaluation (so its rotation never
    races the ingest) and at the end of training. A failure is raised as
    :class:`BackgroundSaveError` at the next callback event; the directory is then
    left in place.

    Retention mirrors the Trainer: with ``save_total_limit`` the store keeps the
    same steps the Trainer's rotation would keep (the newest, the best, and the
    newest others up to the limit). ``load_best_model_at_end``: the best step's
    directory is materialized from the store when training ends, before the
    Trainer loads it, and removed at ``on_train_end``.
    """

    def __init__(
        self,
        store: Store | str | os.PathLike,
        *,
        remove_checkpoints: bool = True,
        async_ingest: bool = True,
        unsafe_files: str = "error",
        opaque_files: Sequence[str] = ("training_args.bin",),
        store_options: dict[str, Any] | None = None,
        on_ingested: Callable[[IngestRecord], None] | None = None,
    ) -> None:
        if _TRANSFORMERS_ERROR is not None:
            raise ImportError("DeltaCheckpointCallback needs transformers "
                              "(pip install 'deltackpt[hf]')") from _TRANSFORMERS_ERROR
        if unsafe_files not in ("error", "store"):
            raise ValueError(f"unsafe_files must be 'error' or 'store', not {unsafe_files!r}")
        if isinstance(store, Store):
            self.store, self._owns_store = store, False
        else:
            options = dict(store_options or {})
            if async_ingest:
                options.setdefault("threads", 1)  # leave the other cores to training
            self.store, self._owns_store = open_store(store, **options), True
        self.remove_checkpoints = remove_checkpoints
        self.async_ingest = async_ingest
        self.unsafe_files = unsafe_files
        self.opaque_files = tuple(opaque_files)
        self.on_ingested = on_ingested
        self.records: list[IngestRecord] = []
        self._thread: threading.Thread | None = None
        self._inflight_step: int | None = None
        self._error: BaseException | None = None
        self._error_job: tuple[str, int] = ("", 0)
        #: best checkpoints materialized for load_best_model_at_end, removed at the end
        self._materialized_best: list[str] = []
        self._closed = False

    # -- background work -----------------------------------------------------------------
    def wait(self) -> None:
        """Block until the in-flight ingest finishes; raise its failure, if any."""
        t = self._thread
        if t is not None:
            t0 = time.perf_counter()
            t.join()
            self._thread = None
            if self.records and self.records[-1].step == self._inflight_step:
                # time the loop waited for this ingest counts as its stall
                self.records[-1].stall_s += time.perf_counter() - t0
        if self._error is not None:
            exc, (path, step) = self._error, self._error_job
            self._error = None
            kept = "the directory was left in place" if os.path.isdir(path) else \
                "the step was stored and its directory removed"
            raise BackgroundSaveError(
                f"ingesting {path} (step {step}) into {self.store.location} failed: "
                f"{type(exc).__name__}: {exc} ({kept})") from exc

    def _ingest(self, path: str, step: int, metrics: dict[str, Any], protect: int | None,
                limit: int | None, stall_s: float) -> None:
        t0 = time.perf_counter()
        dir_bytes = _dir_size(path)
        state = read_checkpoint_dir(path, unsafe_files=self.unsafe_files,
                                    opaque_files=self.opaque_files)
        if step in self.store:  # the Trainer overwrote this directory: so do we
            self.store.delete(step)
        result = self.store.save(state, step=step, metrics=metrics, tags=["hf-trainer"],
                                 note=state["name"])
        del state  # drops the file mappings before the directory goes
        ingest_s = time.perf_counter() - t0
        removed = False
        if self.remove_checkpoints:
            _remove_dir(path)
            removed = True
        deleted = self._rotate(limit, protect)
        rec = IngestRecord(step, dir_bytes, result.written_bytes, result.logical_bytes,
                           ingest_s, stall_s, removed, deleted)
        self.records.append(rec)
        if self.on_ingested is not None:
            self.on_ingested(rec)

    def _run(self, *args: Any) -> None:
        try:
            self._ingest(*args)
        except BaseException as exc:  # re-raised in the training thread by wait()
            self._error, self._error_job = exc, (args[0], args[1])

    def _rotate(self, limit: int | None, best: int | None, final: bool = False) -> list[int]:
        """Delete the steps the Trainer's rotate_checkpoints would delete (then gc)."""
        if limit is None or limit <= 0:
            return []
        # in save order, as the Trainer rotates by mtime: after a resume from an older
        # step the newest save is not the highest step number
        steps = [i.step for i in sorted(self.store.log(), key=lambda i: (i.created_at, i.step))]
        protected = {steps[-1]} if steps else set()
        if best is not None and best in steps:
            protected.add(best)
        if final and limit == 1 and best is not None and best in steps:
            # the Trainer's end of training with save_total_limit=1 keeps only the best
            protected = {best}
            keep = 1
        else:
            keep = max(limit, len(protected))
        deleted = []
        remaining = len(steps)
        for s in steps:
            if remaining <= keep:
                break
            if s not in protected:
                self.store.delete(s)
                deleted.append(s)
                remaining -= 1
        if deleted:
            self.store.gc()
        return deleted

    # -- Trainer events ------------------------------------------------------------------
    @staticmethod
    def _best_step(state: Any) -> int | None:
        # the checkpoint the Trainer will load and its rotation protects; best_global_step
        # may name an evaluation that had no save (eval_steps finer than save_steps)
        path = getattr(state, "best_model_checkpoint", None)
        if path:
            m = _CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
            if m:
                return int(m.group(1))
        best = getattr(state, "best_global_step", None)
        return int(best) if best else None

    @staticmethod
    def _metrics(state: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for entry in getattr(state, "log_history", []):
            if entry.get("step") == state.global_step:
                out.update({k: v for k, v in entry.items() if k not in ("step", "epoch")
                            and isinstance(v, (int, float)) and not isinstance(v, bool)})
        return out

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._check_open()
        # The Trainer drops a best_model_checkpoint whose directory is gone (we removed
        # it); point it back when the store has that step, to materialize it at the end.
        best = self._best_step(state)
        if (args.load_best_model_at_end and state.best_model_checkpoint is None
                and best is not None and best in self.store):
            state.best_model_checkpoint = os.path.join(args.output_dir,
                                                       f"{CHECKPOINT_PREFIX}-{best}")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # the Trainer's next save rotates directories: finish reading ours first
        if control.should_save or control.should_evaluate or control.should_training_stop:
            self.wait()

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.wait()  # save_strategy="best" decides to save after evaluating

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.wait()
        if control.should_training_stop or state.global_step >= state.max_steps:
            self._ensure_best(args, state)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        t0 = time.perf_counter()
        self._check_open()
        self.wait()
        if not state.is_world_process_zero:
            return
        path = os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}-{state.global_step}")
        if not os.path.isdir(path):
            raise CheckpointDirError(f"{path}: the Trainer reported a save but the directory "
                                     "is missing (hyper-parameter search runs are not "
                                     "supported)")
        ending = control.should_training_stop or state.global_step >= state.max_steps
        job = (path, state.global_step, self._metrics(state), self._best_step(state),
               args.save_total_limit)
        if self.async_ingest and not ending:
            self._thread = threading.Thread(target=self._run,
                                            args=job + (time.perf_counter() - t0,),
                                            name=f"deltackpt-hf-{state.global_step}",
                                            daemon=True)
            self._inflight_step = state.global_step
            self._thread.start()
        else:
            self._ingest(*job, stall_s=0.0)
            self.records[-1].stall_s = time.perf_counter() - t0
        if ending:
            self._ensure_best(args, state)

    def _ensure_best(self, args: Any, state: Any) -> None:
        """Materialize the best step for load_best_model_at_end (it runs before on_train_end)."""
        if not (args.load_best_model_at_end and state.best_model_checkpoint):
            return
        target = state.best_model_checkpoint
        best = self._best_step(state)
        if os.path.isdir(target) or best is None or best not in self.store:
            return
        materialize(self.store, best, target)
        self._materialized_best.append(target)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.wait()
        self._rotate(args.save_total_limit, self._best_step(state), final=True)
        if self.remove_checkpoints:
            for path in self._materialized_best:
                shutil.rmtree(path, ignore_errors=True)
        self._materialized_best = []

    # -- lifecycle -----------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError("DeltaCheckpointCallback used after close()")

    def close(self) -> None:
        """Wait for the last ingest and close the store (when the callback opened it)."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            if self._owns_store:
                self.store.close()

    def __enter__(self) -> DeltaCheckpointCallback:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "CheckpointDirError",
    "DeltaCheckpointCallback",
    "IngestRecord",
    "ingest_checkpoint",
    "materialize",
    "read_checkpoint_dir",
    "resume_checkpoint",
    "write_checkpoint_dir",
]
