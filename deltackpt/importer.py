"""Ingest a ``.safetensors`` file, a transformers-style sharded directory or a ``.pt`` file
as a step of a store, deduplicated against what the store already holds.

safetensors keys become paths: components split on '/' (``%2F`` / ``%25`` inside a
component stand for '/' / '%', as :func:`deltackpt.export.export` writes them) and
nest into dicts, so a file written by ``export(select=None)`` or a flat
``{"model/...": t, "optimizer/...": t}`` file comes back as the nested state, and a
plain transformers checkpoint (no '/' in its keys) stays one flat dict. Tensors are
read through a copy-on-write memory map, in file order (by data offset; shards in
name order), so the store sees them in the order they were written. ``.pt`` files
are loaded with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import struct
import zipfile
from typing import TYPE_CHECKING, Any

import numpy as np

from ._torch import torch
from .dtypes import torch_dtype
from .errors import InvalidInputError, StepExistsError, UnsupportedValueError
from .export import SAFETENSORS_DTYPES, SHARD_INDEX_NAME, SINGLE_SHARD_NAME

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .results import SaveResult
    from .store import Store

#: safetensors refuses headers larger than this; so do we (before reading them)
MAX_HEADER = 100 * 1024 * 1024
_ST_TO_TORCH = {v: k for k, v in SAFETENSORS_DTYPES.items()}
_UNESCAPE = re.compile(r"%(2F|25)", re.IGNORECASE)


def unescape_key(part: str) -> str:
    """Inverse of :func:`deltackpt.flatten.escape_key` for one path component."""
    return _UNESCAPE.sub(lambda m: "/" if m.group(1).upper() == "2F" else "%", part)


def read_safetensors_header(path: str | os.PathLike) -> tuple[
        dict[str, str] | None, list[tuple[str, str, tuple[int, ...], int, int]], int]:
    """Parse and check a safetensors header without reading tensor data.

    Returns (metadata, items, data start) with items = (key, torch dtype name, shape,
    start, end) in the header's key order (a writer's order of the tensors, which may
    differ from their order in the data: deltackpt's export lays data out widest dtype
    first, as safetensors does, and lists keys in the state's order). Raises
    InvalidInputError naming the file and key for anything a conforming reader would
    refuse.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InvalidInputError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise InvalidInputError(f"{path}: not a safetensors file (header length {n} does "
                                    f"not fit the {size}-byte file)")
        raw = f.read(n)

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise InvalidInputError(f"{path}: safetensors header names {dup!r} twice")
        return dict(pairs)

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, InvalidInputError):
            raise
        raise InvalidInputError(f"{path}: not a safetensors file (header is not JSON: "
                                f"{exc})") from None
    if not isinstance(header, dict):
        raise InvalidInputError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise InvalidInputError(f"{path}: safetensors __metadata__ must map str to str")
    data_len = size - 8 - n
    items = []
    for key, info in header.items():
        where = f"{path}: tensor {key!r}"
        if not isinstance(info, dict):
            raise InvalidInputError(f"{where}: header entry is not an object")
        st_dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if st_dtype not in _ST_TO_TORCH:
            raise InvalidInputError(f"{where}: unsupported dtype {st_dtype!r}")
        name = _ST_TO_TORCH[st_dtype]
        try:
            torch_dtype(name)
        except KeyError:
            raise InvalidInputError(f"{where}: dtype {st_dtype} is not available in this "
                                    "torch") from None
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise InvalidInputError(f"{where}: bad shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)
                and 0 <= offs[0] <= offs[1] <= data_len):
            raise InvalidInputError(f"{where}: bad data_offsets {offs!r} (data holds "
                                    f"{data_len} bytes)")
        nbytes = math.prod(shape) * torch_dtype(name).itemsize
        if offs[1] - offs[0] != nbytes:
            raise InvalidInputError(f"{where}: data_offsets {offs} hold {offs[1] - offs[0]} "
                                    f"bytes, dtype and shape need {nbytes}")
        items.append((key, name, tuple(shape), offs[0], offs[1]))
    pos = 0
    for key, _, _, a, b in sorted(items, key=lambda it: (it[3], it[4])):
        if a != pos:
            raise InvalidInputError(f"{path}: tensor {key!r} starts at byte {a} of the data, "
                                    f"expected {pos} (overlapping or gapped tensors)")
        pos = b
    if pos != data_len:
        raise InvalidInputError(f"{path}: tensors cover {pos} bytes, the file holds "
                                f"{data_len} after its header")
    return metadata, items, 8 + n


def read_safetensors(path: str | os.PathLike) -> list[tuple[str, torch.Tensor]]:
    """(key, tensor) in the header's order; tensors are copy-on-write maps of the file."""
    path = os.fspath(path)
    _, items, start = read_safetensors_header(path)
    data_len = os.path.getsize(path) - start
    mm = (np.memmap(path, dtype=np.uint8, mode="c", offset=start, shape=(data_len,))
          if data_len else None)
    out = []
    for key, name, shape, a, b in items:
        dt = torch_dtype(name)
        if b == a:
            t = torch.empty(shape, dtype=dt)
        else:
            assert mm is not None
            t = torch.from_numpy(mm[a:b]).view(dt).reshape(shape)
        out.append((key, t))
    return out


def _find_index(directory: str) -> str | None:
    names = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors.index.json"))
    if SHARD_INDEX_NAME in names:
        return os.path.join(directory, SHARD_INDEX_NAME)
    if len(names) > 1:
        raise InvalidInputError(f"{directory}: several shard indexes ({', '.join(names)}); "
                                "pass the one to import")
    return os.path.join(directory, names[0]) if names else None


def read_sharded(index_path: str | os.PathLike) -> list[tuple[str, torch.Tensor]]:
    """(key, tensor) of a transformers-style sharded checkpoint, shards in name order."""
    index_path = os.fspath(index_path)
    directory = os.path.dirname(os.path.abspath(index_path))
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidInputError(f"{index_path}: not a JSON shard index: {exc}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise InvalidInputError(f"{index_path}: no weight_map of tensor name to shard file")
    shards = sorted(set(weight_map.values()))
    for name in shards:
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise InvalidInputError(f"{index_path}: shard {name!r} is not a file name in "
                                    "the index's directory")
    out: list[tuple[str, torch.Tensor]] = []
    for name in shards:
        shard = os.path.join(directory, name)
        if not os.path.isfile(shard):
            raise InvalidInputError(f"{index_path}: shard {name} is missing")
        tensors = read_safetensors(shard)
        have = {k for k, _ in tensors}
        listed = {k for k, v in weight_map.items() if v == name}
        if have != listed:
            extra = sorted(have - listed)[:3]
            missing = sorted(listed - have)[:3]
            raise InvalidInputError(f"{index_path}: shard {name} disagrees with the index "
                                    f"(not in the index: {extra}, missing from the shard: "
                                    f"{missing})")
        out.extend(tensors)
    return out


def nest(items: Sequence[tuple[str, Any]], source: str) -> dict[str, Any]:
    """Nested dicts from '/'-joined keys (components unescaped), in the given order."""
    root: dict[str, Any] = {}
    for key, value in items:
        parts = [unescape_key(p) for p in key.split("/")]
        node = root
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise InvalidInputError(f"{source}: key {key!r} nests under "
                                        f"'{'/'.join(parts[:depth + 1])}', which is a tensor")
            node = child
        if parts[-1] in node:
            raise InvalidInputError(f"{source}: key {key!r} names a value that other keys "
                                    "nest under (or appears twice)")
        node[parts[-1]] = value
    return root


def _load_pt(path: str) -> Any:
    try:
        # a zip-format file can be mapped instead of read into memory
        return torch.load(path, map_location="cpu", weights_only=True,
                          mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        text = str(exc)
        marker = "WeightsUnpickler error:"
        if marker in text:  # torch's own reason, without its "please file an issue" preamble
            why = text.split(marker, 1)[1].strip().splitlines()[0] or "malformed pickle data"
        else:
            why = next((ln.strip() for ln in text.splitlines() if "Unsupported" in ln),
                       text.splitlines()[0] if text else type(exc).__name__)
        raise UnsupportedValueError(f"{path}: refused by torch.load(weights_only=True), which "
                                    f"is the only way deltackpt reads .pt files: {why}") from None
    except Exception as exc:  # noqa: BLE001 - torch's legacy reader fails on garbage with
        # KeyError or struct.error too; whatever it raises, the file is not readable
        if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise
        raise InvalidInputError(f"{path}: not a readable torch file: "
                                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                                ) from None


def read_source(source: str | os.PathLike, *, prefix: str | None = None,
                nest_keys: bool = True) -> Any:
    """The state :func:`import_file` would store for ``source`` (see the module docstring).

    ``source``: a ``.safetensors`` file, a directory with a ``model.safetensors`` (read
    first, as ``from_pretrained`` does) or a shard index, a ``*.safetensors.index.json``
    file, or a ``.pt``/``.pth``/``.bin`` torch file. ``prefix`` (a '/'-joined path)
    places the content under it, e.g. ``prefix="model"`` for a plain model checkpoint.
    ``nest_keys=False`` keeps safetensors keys as one flat dict.
    """
    src = os.fspath(source)
    if not os.path.exists(src):
        raise FileNotFoundError(f"{src}: no such file or directory")
    state: Any
    if os.path.isdir(src):
        single = os.path.join(src, SINGLE_SHARD_NAME)
        # model.safetensors first, as transformers' from_pretrained looks: a directory with
        # both imports the weights a model would load from it
        index = None if os.path.isfile(single) else _find_index(src)
        if index is not None:
            items = read_sharded(index)
        else:
            files = sorted(n for n in os.listdir(src) if n.endswith(".safetensors"))
            if not os.path.isfile(single) and len(files) != 1:
                raise InvalidInputError(f"{src}: no {SHARD_INDEX_NAME} and not exactly one "
                                        f".safetensors file ({len(files)} found)")
            items = read_safetensors(single if os.path.isfile(single)
                                     else os.path.join(src, files[0]))
        state = nest(items, src) if nest_keys else dict(items)
    elif src.endswith(".index.json"):
        items = read_sharded(src)
        state = nest(items, src) if nest_keys else dict(items)
    elif src.endswith((".pt", ".pth", ".bin")) or zipfile.is_zipfile(src):
        state = _load_pt(src)
    else:
        items = read_safetensors(src)
        state = nest(items, src) if nest_keys else dict(items)
    if prefix:
        for part in reversed([unescape_key(p) for p in prefix.strip("/").split("/")]):
            state = {part: state}
    return state


def import_file(
    store: Store,
    source: str | os.PathLike,
    step: int,
    *,
    prefix: str | None = None,
    nest_keys: bool = True,
    metrics: dict[str, Any] | None = None,
    tags: Sequence[str] | None = None,
    note: str | None = None,
) -> SaveResult:
    """Store the content of ``source`` as ``step`` (see :func:`read_source` for what is read).

    Blocks the store already has are not written again, and changed blocks are delta
    encoded against the step before, exactly as :meth:`Store.save` does. Nothing is
    written when the file is refused. ``note`` defaults to "imported from <source>".
    """
    step = _new_step(store, step)
    state = read_source(source, prefix=prefix, nest_keys=nest_keys)
    return save_imported(store, state, source, step, metrics=metrics, tags=tags, note=note)


def _new_step(store: Store, step: int) -> int:
    step = store._step_arg(step)
    if step in store:
        raise StepExistsError(f"{store.location}: step {step} already exists; delete it "
                              "first or import under another step")
    return step


def save_imported(store: Store, state: Any, source: str | os.PathLike, step: int, *,
                  metrics: dict[str, Any] | None = None, tags: Sequence[str] | None = None,
                  note: str | None = None) -> SaveResult:
    """Save what :func:`read_source` read from ``source`` as ``step``, like
    :func:`import_file` (for a caller that reads the source before opening the store)."""
    step = _new_step(store, step)
    if note is None:
        note = f"imported from {os.path.abspath(os.fspath(source))}"
    return store.save(state, step, metrics=metrics, tags=tags, note=note)
