"""torch.distributed.checkpoint (DCP) storage plugins over a deltackpt store.

>>> import torch.distributed.checkpoint as dcp
>>> from deltackpt.dcp import StorageReader, StorageWriter
>>> dcp.save(state_dict, storage_writer=StorageWriter("ckpts", step=100))  # doctest: +SKIP
>>> dcp.load(state_dict, storage_reader=StorageReader("ckpts", step=100))  # doctest: +SKIP

Every rank hashes, deduplicates and delta-encodes the chunks it holds and appends
their frames to packs of its own (unique names) in the shared store directory,
fsyncs them and reports what it wrote in its ``WriteResult``s. The coordinator
(rank 0), the only process holding the store's writer lock, checks every report
against the packs and commits all ranks' blocks, the entries and the manifest in
one transaction (:meth:`Store.commit_external`): the step is visible only when
every rank's blocks are durable.

Each DCP chunk (one rank's piece of a tensor) is its own entry, at the top level
of the step's tree: a chunk that is the whole tensor under the tensor's name
(``model.w``), a shard under ``model.w#chunk(17,0)`` (its offsets). DCP's
``Metadata`` is stored in the same tree under ``__dcp__`` as plain JSON values,
never pickled. Non-tensor values reach us as bytes that DCP itself made with
``torch.save`` (pickle); they are stored opaque and only DCP unpickles them, on
``dcp.load``. docs/dcp.md has the design and its limits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import threading
import uuid
import weakref
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import storage as dcp_storage
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.futures import Future

from . import summaries
from .codec import CodecConfig
from .delta import DeltaConfig
from .dtypes import torch_dtype_name
from .errors import (
    DeltackptError,
    InvalidStoreError,
    StepExistsError,
    StepNotFoundError,
    UnsupportedValueError,
)
from .export import DCP_META_KEY
from .flatten import escape_key, flatten
from .gcpause import gc_paused
from .packs import PackWriter
from .remote import RemoteStore, is_remote_url
from .results import SaveResult
from .store import PathNotFoundError, Store, open_store

__all__ = ["META_KEY", "StorageReader", "StorageWriter", "chunk_key", "load_full"]

#: top-level key of a DCP step's tree holding the DCP metadata
META_KEY = DCP_META_KEY
#: version of the layout this module writes under ``META_KEY`` (docs/dcp.md)
LAYOUT_VERSION = 1
_DCP_VERSION = "1.0.0"  # what torch's FileSystemWriter records in Metadata.version
#: chunks a reader decodes at once are batched up to this many bytes
_READ_BATCH = 1 << 30

_LAYOUTS = {str(x): x for x in (torch.strided, torch.sparse_coo, torch.sparse_csr)}
_MEMORY_FORMATS = {str(x): x for x in (torch.contiguous_format, torch.channels_last,
                                       torch.channels_last_3d, torch.preserve_format)}

StoreOrPath = Store | str | os.PathLike


def chunk_key(fqn: str, offsets: Sequence[int], sizes: Sequence[int],
              size: Sequence[int]) -> str:
    """The entry name of a DCP chunk: the tensor's name when the chunk is all of it."""
    if all(o == 0 for o in offsets) and tuple(sizes) == tuple(size):
        return fqn
    return f"{fqn}#chunk({','.join(str(int(o)) for o in offsets)})"


def _item_key(item: WriteItem) -> str:
    if item.type == WriteItemType.BYTE_IO:
        return item.index.fqn
    td = item.tensor_data
    if td is None:
        raise DeltackptError(f"DCP write item '{item.index.fqn}' has no tensor data")
    return chunk_key(item.index.fqn, td.chunk.offsets, td.chunk.sizes, td.size)


def _index_key(index: MetadataIndex) -> tuple[str, tuple[int, ...] | None]:
    return index.fqn, None if index.offset is None else tuple(int(o) for o in index.offset)


def _parse_step(checkpoint_id: Any) -> int:
    if isinstance(checkpoint_id, bool):
        raise TypeError("a DCP checkpoint_id for deltackpt is a step number, not a bool")
    if isinstance(checkpoint_id, int):
        step = checkpoint_id
    else:
        text = os.fspath(checkpoint_id) if isinstance(checkpoint_id, os.PathLike) else \
            str(checkpoint_id)
        if not text.isdigit():
            raise ValueError(f"a DCP checkpoint_id for deltackpt is a step number, "
                             f"got {checkpoint_id!r}")
        step = int(text)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return step


def _open(store_or_path: StoreOrPath, create: bool, options: dict[str, Any]) -> Store:
    if isinstance(store_or_path, Store):
        return store_or_path
    return open_store(os.fspath(store_or_path), create=create, **options)


def _done(value: Any) -> Future:
    fut: Future = Future()
    fut.set_result(value)
    return fut


# -- metadata <-> plain values (no pickle) ------------------------------------------
def _describe(metadata: Metadata, keys: dict[tuple[str, tuple[int, ...] | None], str]) -> Any:
    """DCP's Metadata as values the state tree stores exactly (dicts, lists, Size, dtype)."""
    state: dict[str, Any] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, BytesStorageMetadata):
            state[fqn] = {"type": "bytes", "entry": keys[(fqn, None)]}
            continue
        if not isinstance(md, TensorStorageMetadata):
            raise UnsupportedValueError(f"DCP metadata of '{fqn}' has unknown type "
                                        f"{type(md).__name__}")
        p = md.properties
        state[fqn] = {
            "type": "tensor",
            "size": torch.Size(md.size),
            "properties": {
                "dtype": p.dtype, "layout": str(p.layout), "requires_grad": bool(p.requires_grad),
                "memory_format": str(p.memory_format), "pin_memory": bool(p.pin_memory),
            },
            "chunks": [{"offsets": torch.Size(c.offsets), "sizes": torch.Size(c.sizes),
                        "entry": keys[(fqn, tuple(int(o) for o in c.offsets))]}
                       for c in md.chunks],
        }
    sm = metadata.storage_meta
    return {
        "layout": LAYOUT_VERSION,
        "version": metadata.version,
        "state_dict": state,
        "planner_data": metadata.planner_data,
        "storage_meta": None if sm is None else {
            "checkpoint_id": None if sm.checkpoint_id is None else os.fspath(sm.checkpoint_id),
            "save_id": sm.save_id, "load_id": sm.load_id, "modules": list(sm.modules)},
    }


def _rebuild(desc: Any, where: str) -> tuple[Metadata, dict[MetadataIndex, str]]:
    """Inverse of :func:`_describe`: the Metadata and each chunk's entry name."""
    try:
        if desc.get("layout") != LAYOUT_VERSION:
            raise InvalidStoreError(f"{where}: DCP layout {desc.get('layout')!r} is not "
                                    f"supported (this deltackpt reads {LAYOUT_VERSION})")
        state: dict[str, Any] = {}
        keys: dict[MetadataIndex, str] = {}
        for fqn, md in desc["state_dict"].items():
            if md["type"] == "bytes":
                state[fqn] = BytesStorageMetadata()
                keys[MetadataIndex(fqn)] = md["entry"]
                continue
            if md["type"] != "tensor":
                raise InvalidStoreError(f"{where}: '{fqn}' has unknown type {md['type']!r}")
            p = md["properties"]
            props = TensorProperties(
                dtype=p["dtype"], layout=_LAYOUTS[p["layout"]],
                requires_grad=p["requires_grad"],
                memory_format=_MEMORY_FORMATS[p["memory_format"]], pin_memory=p["pin_memory"])
            chunks = []
            for c in md["chunks"]:
                chunks.append(ChunkStorageMetadata(offsets=torch.Size(c["offsets"]),
                                                   sizes=torch.Size(c["sizes"])))
                keys[MetadataIndex(fqn, c["offsets"])] = c["entry"]
            state[fqn] = TensorStorageMetadata(props, torch.Size(md["size"]), chunks)
        sm = desc.get("storage_meta")
        meta = Metadata(state_dict_metadata=state, planner_data=desc.get("planner_data"),
                        storage_data=keys, version=desc.get("version"),
                        storage_meta=None if sm is None else StorageMeta(**sm))
    except (KeyError, TypeError, AttributeError) as exc:
        raise InvalidStoreError(f"{where}: malformed DCP metadata ({exc!r})") from None
    return meta, keys


def _read_desc(store: Store, step: int | None) -> tuple[int, Any]:
    if step is None:
        step = store.latest()
        if step is None:
            raise StepNotFoundError(f"{store.location}: the store has no steps")
    try:
        desc = store.load(step, select=[META_KEY])[META_KEY]
    except PathNotFoundError:
        raise InvalidStoreError(f"{store.location}: step {step} was not saved through "
                                "deltackpt.dcp (its state has no DCP metadata)") from None
    if not isinstance(desc, dict):
        raise InvalidStoreError(f"{store.location}: step {step}: malformed DCP metadata")
    return step, desc


# -- save ---------------------------------------------------------------------------
class StorageWriter(dcp_storage.StorageWriter):
    """Save DCP checkpoints as steps of a deltackpt store (``dcp.save``/``async_save``).

    Construct one on every rank with the same store directory and step (or pass
    the step as DCP's ``checkpoint_id``). Rank 0 opens the store for writing (creating
    it) and holds its writer lock from planning to the commit; the other ranks
    open it only to read the parent step and write packs of their own. Reusing one
    writer across saves keeps each rank's delta bases in memory.

    ``metrics``/``tags``/``note`` are recorded with the next step the writer commits (and
    then cleared); ``open_options`` go to :func:`deltackpt.open` (e.g. ``block_size``,
    ``delta``, ``level``, ``fsync``, ``threads``). After a save, rank 0's
    :attr:`last_result` says what the step cost. Rank 0 holds the store's writer lock
    from planning a save to committing it; a writer that opened the store itself closes
    it when it is garbage (so ``StorageWriter(path, step=N)`` per save works like
    ``FileSystemWriter``). Saves through one writer may overlap (``dcp.async_save``
    without waiting): each keeps its own step.
    """

    def __init__(self, store_or_path: StoreOrPath, step: int | None = None, *,
                 metrics: dict[str, Any] | None = None, tags: Sequence[str] | None = None,
                 note: str | None = None, **open_options: Any) -> None:
        super().__init__()
        self._target = store_or_path
        self._options = open_options
        self.step = None if step is None else _parse_step(step)
        self.metrics, self.tags, self.note = metrics, tags, note
        self._store: Store | None = None
        self._is_coordinator = False
        self._rank = 0
        self.last_result: SaveResult | None = None
        self._init_runtime()

    def _init_runtime(self) -> None:
        # per save: DCP runs each save's calls on one thread, and an async_save on a thread
        # of its own, so two saves through this writer must not share a step or a parent
        self._saves = threading.local()
        self._open_lock = threading.Lock()
        self._finalizer: weakref.finalize | None = None
        #: rank 0: id of each save planned and not yet committed -> the thread running it
        self._in_flight: dict[int, threading.Thread] = {}

    def __getstate__(self) -> dict[str, Any]:
        # DCP's process-based async_save pickles the writer into its daemon: the copy opens
        # the store there (a store, its locks and threads do not travel)
        state = dict(self.__dict__)
        for key in ("_saves", "_open_lock", "_finalizer", "_in_flight"):
            state.pop(key, None)
        if not isinstance(self._target, Store):
            state["_store"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def _save(self) -> SimpleNamespace:
        """This save's state (step, parent, generation, save id), on this thread."""
        st = getattr(self._saves, "state", None)
        if st is None:
            st = self._saves.state = self._new_save(self.step)
        return st

    @staticmethod
    def _new_save(step: int | None, from_reset: bool = False) -> SimpleNamespace:
        return SimpleNamespace(step=step, from_reset=from_reset, planned=False, parent=None,
                               generation=None, save_id=uuid.uuid4().hex)

    # -- DCP protocol ---------------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        step = self.step if checkpoint_id is None else _parse_step(checkpoint_id)
        if checkpoint_id is not None:
            self.step = step  # what the last save asked for, as before (a public attribute)
        self._saves.state = self._new_save(step, from_reset=True)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        try:
            _parse_step(checkpoint_id)
        except (TypeError, ValueError):
            return False
        return True

    @property
    def checkpoint_id(self) -> str:
        """``<store>@<step>``: what DCP logs for this save."""
        where = self._target.location if isinstance(self._target, Store) else \
            os.fspath(self._target)
        return f"{where}@{self._save().step}"

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.checkpoint_id, save_id=self._save().save_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if not kwargs.get("use_collectives", True):
            raise DeltackptError("deltackpt.dcp needs DCP's collectives (use_collectives=True): "
                                 "the coordinator commits every rank's blocks as one step")
        self._is_coordinator = bool(is_coordinator)
        rank = kwargs.get("rank")
        if rank is None and dist.is_available() and dist.is_initialized():
            rank = dist.get_rank()  # a DCP that does not pass it (names the rank's index)
        self._rank = int(rank or 0)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        # every save's first call on every rank. DCP calls reset() only when given a
        # checkpoint_id: without one, a save starts here, from self.step (which callers may
        # set between saves); a state a previous save left (done or failed) is not reused
        st = getattr(self._saves, "state", None)
        if st is None or st.planned or not st.from_reset:
            st = self._saves.state = self._new_save(self.step)
        st.planned = True
        if st.step is None:
            raise DeltackptError("deltackpt.dcp.StorageWriter: no step given; pass step= or "
                                 "the step as dcp.save(..., checkpoint_id=STEP)")
        for item in plan.items:  # refuse what we cannot store before any rank writes
            if item.type != WriteItemType.BYTE_IO:
                dtype = item.tensor_data.properties.dtype if item.tensor_data else None
                if dtype is None or torch_dtype_name(dtype) is None:
                    raise UnsupportedValueError(f"'{item.index.fqn}': dtype {dtype} is not "
                                                "storable by deltackpt")
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        store = self._writer_store(create=True)
        save = self._save()
        step = save.step
        assert step is not None
        _refuse_existing(store, step)  # before taking the lock: a refused save must not keep it
        with store._mutex:
            # held until the commit: no gc may delete the packs ranks are about to write,
            # and no other writer may commit this step meanwhile
            store._become_writer()
            with self._open_lock:
                # the lock goes back only when no save through this writer is between
                # planning and commit; a save that failed on the way was on a thread that
                # has ended, or that started another save since
                me = threading.current_thread()
                self._in_flight = {k: t for k, t in self._in_flight.items()
                                   if t.is_alive() and t is not me}
                self._in_flight[id(save)] = me
        _refuse_existing(store, step)  # again: another writer may have taken it meanwhile
        save.parent = store._parent_of(step)
        seen: dict[str, str] = {}
        for plan in plans:
            for item in plan.items:
                key = _item_key(item)
                if key == META_KEY or seen.setdefault(key, item.index.fqn) != item.index.fqn:
                    raise UnsupportedValueError(f"'{item.index.fqn}': entry name '{key}' is "
                                                "taken; rename the state_dict key")
        save.generation = store._delta_generation()
        info = {"step": step, "parent": save.parent, "codec": store.config.codec.to_json(),
                "delta": store.config.delta.to_json(), "generation": save.generation}
        return [dataclasses.replace(p, storage_data=dict(info, rank=i))
                for i, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future:
        # gcpause.py: its bookkeeping would set off a full collection. Not around uploads to
        # object storage, whose retries can last minutes (cyclic garbage would pile up)
        with self._gc_paused_if_local():
            return self._write_data(plan, planner)

    def _write_data(self, plan: SavePlan, planner: SavePlanner) -> Future:
        info = plan.storage_data
        step = self._save().step
        if not isinstance(info, dict) or info.get("step") != step:
            raise DeltackptError(
                f"rank {self._rank}: the coordinator planned step "
                f"{info.get('step') if isinstance(info, dict) else None}, this rank saves step "
                f"{step} (every rank needs the same step; DCP plan caching is not "
                "supported)")
        store = self._writer_store(create=False)
        codec = CodecConfig.from_json(info["codec"])
        delta = DeltaConfig.from_json(info["delta"])
        if (store.config.codec, store.config.delta) != (codec, delta):
            store.config.codec, store.config.delta = codec, delta  # encode like the coordinator
        values: dict[str, Any] = {}
        for item in plan.items:
            key = _item_key(item)
            if key in values:
                raise DeltackptError(f"rank {self._rank}: DCP planned '{key}' twice")
            values[key] = self._resolve(item, planner)
        _, leaves = flatten(values)
        parent = info["parent"]
        # an object-storage store: this rank's index cache must know the steps committed since
        # it last wrote, or it would rewrite stored blocks and miss its delta bases. The rank
        # reads only what its own keys need when it can (not every rank's packs: scaling.md)
        remote = not self._is_coordinator and hasattr(store, "catch_up_for_rank")
        scoped = remote and not isinstance(self._target, Store) and \
            store.catch_up_for_rank(parent, [leaf.path for leaf in leaves])
        if remote and not scoped:
            store.refresh(check_packs=False)
        generation = summaries.parse_generation(info.get("generation")) or 0
        with store._mutex:
            plans = store._plan_entries(leaves)
            store._hash_all(plans)
            writer = PackWriter(store.backend, store._pack_size)
            try:
                # a base this rank located from its own records but a gc has moved since
                # cannot be read: that block is written as a keyframe (the save stays
                # correct, its frames are larger once)
                new_blocks, _ = store._write_new_blocks(plans, step, parent, writer,
                                                        generation,
                                                        dedup_step=parent if scoped else None)
                packs = writer.finish()
                store.backend.sync()
            except BaseException:
                writer.abort()
                raise
            store._refresh_after_commit(plans, new_blocks, step)
            if remote:
                store.record_rank_write(step, packs, new_blocks)
        results = []
        claimed: set[bytes] = set()
        for item, p in zip(plan.items, plans):
            mine = {}
            for bid in p.ids:
                if bid in new_blocks and bid not in claimed:
                    claimed.add(bid)
                    mine[bid] = new_blocks[bid]
            entry = {"path": p.leaf.path, "kind": p.leaf.kind, "dtype": p.leaf.dtype,
                     "shape": list(p.leaf.shape), "nbytes": int(p.data.nbytes),
                     "block_size": p.spans[0][1] if p.spans else 0, "blocks": b"".join(p.ids)}
            results.append(dcp_storage.WriteResult(
                index=item.index, size_in_bytes=sum(v[2] for v in mine.values()),
                storage_data={"rank": self._rank, "entry": entry, "blocks": mine,
                              "packs": packs}))
        return _done(results)

    def finish(self, metadata: Metadata, results: list[list[dcp_storage.WriteResult]]) -> None:
        with self._gc_paused_if_local():
            self._finish(metadata, results)

    def _gc_paused_if_local(self) -> contextlib.AbstractContextManager[None]:
        remote = is_remote_url(self._target) or isinstance(self._target, RemoteStore)
        return contextlib.nullcontext() if remote else gc_paused()

    def _finish(self, metadata: Metadata, results: list[list[dcp_storage.WriteResult]]) -> None:
        store = self._writer_store(create=False)
        save = self._save()
        step = save.step
        by_index: dict[tuple[str, tuple[int, ...] | None], dict] = {}
        copies: dict[bytes, list[tuple]] = {}
        packs: dict[str, int] = {}
        for rank_results in results:
            for wr in rank_results:
                sd = wr.storage_data
                if not (isinstance(sd, dict) and {"entry", "blocks", "packs"} <= sd.keys()):
                    raise DeltackptError(f"'{wr.index.fqn}': a rank returned a write result "
                                         "deltackpt.dcp did not make")
                key = _index_key(wr.index)
                if key in by_index:
                    raise DeltackptError(f"'{wr.index.fqn}' at {key[1]} was written by two "
                                         "ranks")
                by_index[key] = sd
                for bid, loc in sd["blocks"].items():
                    copies.setdefault(bid, []).append(tuple(loc))  # two ranks may write one
                for name, size in sd["packs"]:
                    packs[name] = size
        # of a block two ranks wrote, the copy with the shortest chain: the one a rebuilt
        # index keeps too (format.md §13.5)
        blocks = store._shortest_copies(copies)
        keys: dict[tuple[str, tuple[int, ...] | None], str] = {}
        entries: list[dict[str, Any]] = []
        for fqn, md in metadata.state_dict_metadata.items():
            if isinstance(md, BytesStorageMetadata):
                wanted = [((fqn, None), fqn, None)]
            else:
                wanted = [((fqn, tuple(int(o) for o in c.offsets)),
                           chunk_key(fqn, c.offsets, c.sizes, md.size), c) for c in md.chunks]
            for index, key, chunk in wanted:
                sd = by_index.pop(index, None)
                if sd is None:
                    raise DeltackptError(f"{store.location}: step {step}: no rank wrote "
                                         f"'{fqn}'" + (f" chunk at {index[1]}" if index[1] else ""))
                entry = sd["entry"]
                if entry["path"] != escape_key(key) or (
                        chunk is not None and tuple(entry["shape"]) != tuple(chunk.sizes)):
                    raise DeltackptError(f"{store.location}: step {step}: rank "
                                         f"{sd.get('rank')} wrote '{entry['path']}' "
                                         f"{entry['shape']} for '{key}'")
                keys[index] = key
                entries.append(dict(entry, idx=len(entries)))
        if by_index:
            raise DeltackptError(f"{store.location}: step {step}: ranks wrote chunks "
                                 f"DCP's metadata does not list: {sorted(by_index)[:3]}")
        if metadata.version is None:
            metadata.version = _DCP_VERSION
        metadata.storage_meta = metadata.storage_meta or self.storage_meta()
        meta_tree, leaves = flatten(_describe(metadata, keys))
        if leaves:
            raise UnsupportedValueError(f"DCP planner_data holds arrays ('{leaves[0].path}'); "
                                        "deltackpt.dcp stores plain values only")
        tree = ["D", [[META_KEY, meta_tree]]
                + [[k, ["E", i, {}]] for i, k in enumerate(keys.values())]]
        self.last_result = store.commit_external(
            step, tree, entries, blocks, sorted(packs.items()), save.parent,
            metrics=self.metrics, tags=self.tags, note=self.note, generation=save.generation)
        self.metrics = self.tags = self.note = None  # they described this step only
        metadata.storage_data = {MetadataIndex(f, o): k for (f, o), k in keys.items()}
        with self._open_lock:
            self._in_flight.pop(id(save), None)
            idle = not any(t.is_alive() for t in self._in_flight.values())
        if idle and not isinstance(self._target, Store) and not is_remote_url(self._target):
            # held from planning to this commit: between saves another process may write,
            # and a writer per save that is never closed does not lock the next one out.
            # Not while another save through this writer is still between planning and
            # commit (its packs are not yet in the index: another writer's gc would delete
            # them); a save that failed on the way keeps it until close() (safe, as before).
            # A remote store keeps its lease: taking it again lists every pack.
            store._release_writer()

    # -- helpers --------------------------------------------------------------------
    def _writer_store(self, create: bool) -> Store:
        store = self._store
        if store is None:
            with self._open_lock:  # two overlapping first saves open it once
                if self._store is None:
                    options = self._options
                    if not self._is_coordinator and is_remote_url(self._target):
                        # an index of this rank's own (a partial one: never shared with
                        # other processes), which write_data catches up with only what the
                        # rank needs
                        options = dict(options, catch_up_on_open=False,
                                       cache_index=f"dcp-rank{self._rank}.sqlite")
                    opened = _open(self._target, create and self._is_coordinator, options)
                    if not isinstance(self._target, Store):
                        self._finalizer = weakref.finalize(self, opened.close)
                    self._store = opened
                store = self._store
        return store

    def _resolve(self, item: WriteItem, planner: SavePlanner) -> Any:
        data = planner.resolve_data(item)
        fqn = item.index.fqn
        if item.type == WriteItemType.BYTE_IO:
            if not isinstance(data, io.BytesIO):
                raise UnsupportedValueError(f"'{fqn}': DCP gave {type(data).__name__} for a "
                                            "bytes item")
            return data.getvalue()
        if not isinstance(data, torch.Tensor):
            raise UnsupportedValueError(f"'{fqn}': DCP gave {type(data).__name__} for a tensor")
        td = item.tensor_data
        assert td is not None
        tensor = data.detach()
        if tuple(tensor.shape) != tuple(td.chunk.sizes) or tensor.dtype != td.properties.dtype:
            raise UnsupportedValueError(
                f"'{fqn}': chunk at {list(td.chunk.offsets)} resolved to {tensor.dtype} "
                f"{list(tensor.shape)}, DCP planned {td.properties.dtype} {list(td.chunk.sizes)}")
        return tensor

    def close(self) -> None:
        """Close the store this writer opened (releasing rank 0's writer lock)."""
        if self._store is not None and not isinstance(self._target, Store):
            self._store.close()
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self._store = None

    def __enter__(self) -> StorageWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _refuse_existing(store: Store, step: int) -> None:
    if step in store:
        raise StepExistsError(f"{store.location}: step {step} already exists; delete it "
                              "first or save under another step")


# -- load ---------------------------------------------------------------------------
class StorageReader(dcp_storage.StorageReader):
    """Load a step saved by :class:`StorageWriter` with ``dcp.load``, on any number of ranks.

    ``step`` (or DCP's ``checkpoint_id``) defaults to the latest step. Each rank
    decodes only the chunk entries its read requests touch and copies the requested
    regions into its tensors, so a step saved on N ranks loads on M.
    """

    def __init__(self, store_or_path: StoreOrPath, step: int | None = None, *,
                 batch_bytes: int = _READ_BATCH, **open_options: Any) -> None:
        super().__init__()
        self._target = store_or_path
        self._options = open_options
        self._requested = None if step is None else _parse_step(step)
        self._resolved: int | None = None
        self._batch = max(1, int(batch_bytes))
        self._store: Store | None = None
        self._keys: dict[MetadataIndex, str] = {}
        self._load_id = uuid.uuid4().hex

    @property
    def step(self) -> int | None:
        """The step this reader loads: the one given (or set), else the latest step as
        the current load resolved it (None before a load)."""
        return self._requested if self._requested is not None else self._resolved

    @step.setter
    def step(self, value: int | None) -> None:
        self._requested = None if value is None else _parse_step(value)
        self._resolved = None

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self._requested = _parse_step(checkpoint_id)
        self._resolved = None  # "latest" means the latest at this load, not at the last one
        self._keys = {}
        self._load_id = uuid.uuid4().hex

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return StorageWriter.validate_checkpoint_id(checkpoint_id)

    @property
    def checkpoint_id(self) -> str:
        where = self._target.location if isinstance(self._target, Store) else \
            os.fspath(self._target)
        return f"{where}@{'latest' if self.step is None else self.step}"

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        store = self._reader_store()
        step, desc = _read_desc(store, self._requested)
        self._resolved = step
        meta, self._keys = _rebuild(desc, f"{store.location}: step {step}")
        if meta.storage_meta is None:
            meta.storage_meta = StorageMeta()
        meta.storage_meta.load_id = self._load_id
        return meta

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any,
                              **kwargs: Any) -> None:
        if not isinstance(metadata.storage_data, dict):
            raise InvalidStoreError("DCP metadata without deltackpt entry names; read it "
                                    "with deltackpt.dcp.StorageReader.read_metadata")
        self._keys = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future:
        store = self._reader_store()
        by_key: dict[str, list] = {}
        for req in plan.items:
            key = self._keys.get(req.storage_index)
            if key is None:
                raise InvalidStoreError(f"{store.location}: step {self.step} has no "
                                        f"'{req.storage_index.fqn}' at "
                                        f"{list(req.storage_index.offset or [])}")
            by_key.setdefault(key, []).append(req)
        sizes = {e.path: e.nbytes for e in store.entries(self.step)}
        for batch in _batches(list(by_key), lambda k: sizes.get(escape_key(k), 0), self._batch):
            values = store.load(self.step, select=[escape_key(k) for k in batch])
            for key in batch:
                value = values[key]
                for req in by_key[key]:
                    if req.type == LoadItemType.BYTE_IO:
                        planner.load_bytes(req, io.BytesIO(value))  # DCP unpickles it
                        continue
                    src = narrow_tensor_by_index(value, req.storage_offsets, req.lengths)
                    dst = planner.resolve_tensor(req).detach()
                    if dst.size() != src.size():
                        raise InvalidStoreError(f"'{req.storage_index.fqn}': stored region "
                                                f"{list(src.size())} does not fit the target "
                                                f"{list(dst.size())}")
                    dst.copy_(src)
                    planner.commit_tensor(req, dst)
            del values
        return _done(None)

    def _reader_store(self) -> Store:
        if self._store is None:
            self._store = _open(self._target, False, self._options)
        return self._store

    def close(self) -> None:
        """Close the store this reader opened."""
        if self._store is not None and not isinstance(self._target, Store):
            self._store.close()
        self._store = None

    def __enter__(self) -> StorageReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _batches(keys: list[str], size_of: Any, budget: int) -> list[list[str]]:
    out: list[list[str]] = []
    cur: list[str] = []
    used = 0
    for k in keys:
        n = size_of(k)
        if cur and used + n > budget:
            out.append(cur)
            cur, used = [], 0
        cur.append(k)
        used += n
    if cur:
        out.append(cur)
    return out


def load_full(store_or_path: StoreOrPath, step: int | None = None,
              select: Sequence[str] | str | None = None,
              **open_options: Any) -> dict[str, torch.Tensor | bytes]:
    """A DCP step as a flat dict ``{fqn: full tensor}``, chunks reassembled, in one process.

    ``select``: fully qualified name prefixes (``"model"`` takes ``model.*``); only their
    chunks are decoded. Non-tensor values come back as the bytes DCP wrote for them
    (``torch.save`` output, i.e. pickle): deltackpt never unpickles them;
    ``torch.load(io.BytesIO(b), weights_only=True)`` reads the plain ones.
    """
    store = _open(store_or_path, False, open_options)
    try:
        step, desc = _read_desc(store, step)
        meta, keys = _rebuild(desc, f"{store.location}: step {step}")
        fqns = list(meta.state_dict_metadata)
        if select is not None:
            prefixes = [p.strip("/.") for p in ([select] if isinstance(select, str) else select)]
            for p in prefixes:
                if not any(f == p or f.startswith(p + ".") for f in fqns):
                    raise PathNotFoundError(f"{store.location}: step {step} has no path {p!r} "
                                            "(a DCP step names values as DCP does, e.g. "
                                            "'model.encoder.weight')")
            fqns = [f for f in fqns if any(f == p or f.startswith(p + ".") for p in prefixes)]
        out: dict[str, torch.Tensor | bytes] = {}
        names = {k: escape_key(k) for k in keys.values()}
        sizes = {e.path: e.nbytes for e in store.entries(step)}
        targets: dict[str, tuple[str, ChunkStorageMetadata | None]] = {}
        for fqn in fqns:
            md = meta.state_dict_metadata[fqn]
            if isinstance(md, TensorStorageMetadata):
                if sum(math.prod(c.sizes) for c in md.chunks) != math.prod(md.size):
                    raise InvalidStoreError(f"{store.location}: step {step}: the chunks of "
                                            f"'{fqn}' do not cover its {list(md.size)} elements")
                out[fqn] = torch.empty(md.size, dtype=md.properties.dtype)
                for c in md.chunks:
                    targets[keys[MetadataIndex(fqn, c.offsets)]] = (fqn, c)
            else:
                targets[keys[MetadataIndex(fqn)]] = (fqn, None)
        for batch in _batches(list(targets), lambda k: sizes.get(names[k], 0), _READ_BATCH):
            values = store.load(step, select=[names[k] for k in batch])
            for key in batch:
                fqn, chunk = targets[key]
                if chunk is None:
                    out[fqn] = values[key]
                else:
                    dst = narrow_tensor_by_index(out[fqn], chunk.offsets, chunk.sizes)
                    dst.copy_(values[key])
        return {fqn: out[fqn] for fqn in fqns}
    finally:
        if store is not store_or_path:
            store.close()
