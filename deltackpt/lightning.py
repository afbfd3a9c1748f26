"""PyTorch Lightning integration: a ``CheckpointIO`` plugin that saves into a deltackpt store.

    from deltackpt.lightning import DeltaCheckpointIO

    trainer = Trainer(plugins=[DeltaCheckpointIO("ckpts/", async_save=True)],
                      callbacks=[ModelCheckpoint(save_top_k=2, monitor="val_loss")])
    trainer.fit(model)                                  # checkpoints go into ckpts/
    trainer.fit(model, ckpt_path="last")                # resumes from the store

Every checkpoint file Lightning asks for becomes one step of the store (step
numbers count saves: 1, 2, 3, ...). The step's note records the file path, the
global step and the epoch (``{"lightning_path": ..., "global_step": ...,
"epoch": ...}``), its tags the file name, its metrics ``epoch`` and
``global_step``, so ``deltackpt log ckpts/`` lists them. Two paths at the same
global step (``last.ckpt`` and a top-k file) are two steps: their dicts differ
in ModelCheckpoint's own state (``last_model_path``), and the tensors they share
cost nothing the second time (block dedup).

At the path itself a small JSON *placeholder* is written (after the step
commits, atomically; an async save of a new path first reserves it with a
*pending* placeholder before ``save_checkpoint`` returns), because Lightning
decides things by looking at the filesystem: ``ModelCheckpoint`` adds ``-v1``
to names that exist, finds ``last*.ckpt`` for ``ckpt_path="last"`` by listing
the directory, and ``save_last="link"`` symlinks to the saved file. The placeholder names the
store and the step; :func:`load_checkpoint` reads a checkpoint from it without a
Trainer. Tools that ``torch.load`` the ``.ckpt`` (``LightningModule.load_from_checkpoint``)
cannot read a placeholder: load the dict with :func:`load_checkpoint` and call
``model.load_state_dict(ckpt["state_dict"])``.

Overwriting a path (``last.ckpt``) commits the new step, replaces the
placeholder, then deletes the step it replaces and runs ``gc``;
``remove_checkpoint`` unlinks the placeholder, deletes the step and runs ``gc``.
A crash between those leaves an extra step, which the next save or removal of
the same path deletes (``deltackpt delete`` otherwise).

Saves use delta mode ``none`` unless ``store_options`` names one (see
:data:`DEFAULT_DELTA`): frozen and unchanged tensors still dedup across steps.

Background saving: ``async_save=True`` copies the checkpoint's tensors into
reused host buffers in the caller's thread (the only stall) and runs the save,
the placeholder and the reclaim on one background thread; up to ``max_pending``
saves are in flight (host memory: that many copies of the state), a failure is
raised as :class:`~deltackpt.errors.BackgroundSaveError` at the next call.
Lightning's ``AsyncCheckpointIO(DeltaCheckpointIO(...))`` also works (it clones
every tensor into fresh memory on each save instead); with it, keep
``async_save=False``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .backend import fsync_path
from .errors import (
    BackgroundSaveError,
    DeltackptError,
    StepNotFoundError,
    UnsupportedValueError,
)
from .snapshot import HostSnapshot
from .store import Store, open_store

try:  # the unified package first, then the standalone one
    from lightning.fabric.plugins import CheckpointIO as _CheckpointIO
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        from lightning_fabric.plugins import CheckpointIO as _CheckpointIO
    except ImportError as exc:
        raise ImportError("deltackpt.lightning needs PyTorch Lightning: pip install lightning "
                          "(or pytorch-lightning)") from exc

#: first key of every placeholder file; how a placeholder is told from a torch checkpoint
PLACEHOLDER_KIND = "deltackpt-lightning-checkpoint"
PLACEHOLDER_VERSION = 1
_PLACEHOLDER_MAX = 64 * 1024
#: Delta mode of the saves unless ``store_options`` names one. ModelCheckpoint keeps a few
#: checkpoints far apart (top-k + last), and a delta needs its keyframe kept live beside it:
#: on the MiniLM example the kept set took 0.564x of Lightning's files with
#: ``auto:keyframe:8``, 0.378x with ``none`` (and gc at 0.9; docs/benchmarks.md). Pass
#: ``store_options={"delta": "auto"}`` when every checkpoint is kept (``save_top_k=-1``).
DEFAULT_DELTA = "none"
#: gc rewrites packs less live than this. A save's pack dies whole when its step goes, except
#: the first one, which also holds the blocks of frozen tensors every later step shares: at
#: the store's default (0.5) the dead part of that pack (the first step's trained tensors,
#: ~35% of it on the MiniLM example) would stay on disk for the whole run.
_REPACK_THRESHOLD = 0.9
#: checkpoint keys that hold what ``save_hyperparameters()`` collected
_HPARAM_KEYS = ("hyper_parameters", "datamodule_hyper_parameters")

__all__ = ["CheckpointNotFoundError", "CheckpointRecord", "DeltaCheckpointIO",
           "load_checkpoint", "read_placeholder"]


class CheckpointNotFoundError(DeltackptError, FileNotFoundError):
    """No checkpoint at the path: no placeholder there and no step of the store maps to it."""


@dataclass
class CheckpointRecord:
    """What one ``save_checkpoint`` call cost; ``step`` is filled in when the step commits."""

    path: str
    global_step: int | None
    asynchronous: bool
    step: int | None = None
    #: seconds the caller waited for a free snapshot buffer (async) or the queue (sync)
    wait_s: float = 0.0
    #: seconds spent copying the tensors into host buffers (async saves)
    snapshot_s: float = 0.0
    #: total seconds ``save_checkpoint`` blocked the training loop
    blocked_s: float = 0.0
    #: seconds ``Store.save`` took
    save_s: float = 0.0
    #: seconds deleting the step this save replaced and ``gc`` took
    reclaim_s: float = 0.0
    logical_bytes: int = 0
    written_bytes: int = 0
    done: bool = False


def _norm(path: Any) -> str:
    p = os.fspath(path)
    if isinstance(p, bytes):
        p = os.fsdecode(p)
    if "://" in p and not p.startswith("file://"):
        raise DeltackptError(f"{p}: DeltaCheckpointIO writes placeholders on the local "
                             "filesystem only; use a local checkpoint directory")
    if p.startswith("file://"):
        p = p[len("file://"):]
    return os.path.abspath(os.path.expanduser(p))


def read_placeholder(path: str | os.PathLike) -> dict[str, Any] | None:
    """The placeholder at ``path`` as a dict, or None when the file is something else.

    Raises FileNotFoundError when nothing is there.
    """
    with open(path, "rb") as f:
        head = f.read(_PLACEHOLDER_MAX + 1)
    if len(head) > _PLACEHOLDER_MAX or not head.lstrip().startswith(b"{"):
        return None
    try:
        data = json.loads(head)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("kind") != PLACEHOLDER_KIND:
        return None
    if data.get("pending") is True and isinstance(data.get("store"), str):
        return data  # a background save reserved the name; its step is not committed yet
    if data.get("version") != PLACEHOLDER_VERSION or not isinstance(data.get("step"), int) \
            or not isinstance(data.get("store"), str):
        raise DeltackptError(f"{path}: unreadable deltackpt placeholder (version "
                             f"{data.get('version')!r}); written by a newer deltackpt?")
    return data


def _note(note: str | None) -> dict[str, Any]:
    """The JSON object a save of this plugin wrote as the step's note ({} for others)."""
    if not note or not note.startswith("{"):
        return {}
    try:
        data = json.loads(note)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _note_path(note: str | None) -> str | None:
    p = _note(note).get("lightning_path")
    return p if isinstance(p, str) else None


def _write_placeholder(path: str, data: dict[str, Any], durable: bool) -> None:
    """Atomically replace ``path`` with the placeholder (tmp file, fsync, rename)."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex[:12]}.deltackpt-tmp"  # writers of one path never share it
    body = json.dumps(data, indent=1).encode() + b"\n"
    with open(tmp, "wb") as f:
        f.write(body)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    if os.path.islink(path):
        os.unlink(path)  # replace the link itself, never write through it
    os.replace(tmp, path)
    if durable:
        fsync_path(folder)


def _drain_at_exit(io: DeltaCheckpointIO) -> None:
    """Finish ``io``'s queued saves when the interpreter exits, before thread pools stop
    taking work (a save queued after ``teardown``, e.g. ``trainer.save_checkpoint()`` after
    ``fit``, would otherwise be dropped silently), and report a failure on stderr."""
    ref = weakref.ref(io)

    def drain() -> None:
        plugin = ref()
        if plugin is None:
            return
        try:
            plugin.wait()
        except BaseException as exc:  # noqa: BLE001 - nobody is left to raise it to
            sys.stderr.write(f"deltackpt.lightning: a checkpoint save did not complete "
                             f"before exit: {type(exc).__name__}: {exc}\n")

    # threading's exit hooks run before concurrent.futures stops its pools (atexit's run
    # after, too late for the store's own pool); the private hook is what
    # concurrent.futures itself uses
    register = getattr(threading, "_register_atexit", None)
    if register is None:  # pragma: no cover - CPython >= 3.9 has it
        import atexit

        atexit.register(drain)
    else:
        with contextlib.suppress(RuntimeError):  # already shutting down
            register(drain)


def _remove_pending(path: str, pending_id: str) -> None:
    """Unlink ``path`` if it is still the pending placeholder ``pending_id`` wrote."""
    with contextlib.suppress(OSError, DeltackptError):
        data = read_placeholder(path)
        if data is not None and data.get("pending_id") == pending_id:
            os.unlink(path)


def _explain_unsupported(exc: UnsupportedValueError, path: str) -> UnsupportedValueError:
    """Re-word a flatten error for Lightning users: which checkpoint key, and what to do."""
    msg = str(exc)
    for key in _HPARAM_KEYS:
        if f"'{key}/" in msg or f"'{key}'" in msg:
            name = msg.split(f"'{key}/", 1)[1].split("/", 1)[0].split("'", 1)[0] \
                if f"'{key}/" in msg else key
            owner = "LightningDataModule" if key.startswith("datamodule") else "LightningModule"
            return UnsupportedValueError(
                f"{path}: checkpoint key '{key}' holds the hyper-parameter {name!r}, which "
                f"deltackpt cannot store without pickle ({msg}). Leave it out with "
                f"self.save_hyperparameters(ignore=[{name!r}]) in the {owner}'s __init__ "
                "(Lightning recommends this for modules), or pass plain values (numbers, "
                "str, lists, dicts) instead of the object")
    if "'hparams_type'" in msg:
        return UnsupportedValueError(
            f"{path}: checkpoint key 'hparams_type' holds a Python type (OmegaConf "
            "hyper-parameters), which deltackpt cannot store without pickle; call "
            "save_hyperparameters(OmegaConf.to_container(cfg, resolve=True)) instead")
    return UnsupportedValueError(
        f"{path}: {msg}. In a LightningModule or Callback, convert such values in "
        "on_save_checkpoint and back in on_load_checkpoint")


class DeltaCheckpointIO(_CheckpointIO):
    """Lightning ``CheckpointIO`` that stores checkpoints incrementally in a deltackpt store.

    ``path_or_store``: the store directory (created when missing) or an open
    :class:`~deltackpt.Store` (not closed by :meth:`teardown`). ``async_save``:
    save in a background thread after copying the tensors to host buffers;
    ``max_pending``: saves in flight at once (each holds one copy of the
    state). ``map_location`` (default ``"cpu"``, as Lightning's own IO) applies
    when Lightning does not pass one. ``store_options`` go to
    :func:`deltackpt.open`. The ``records`` list tells what each save cost.
    """

    def __init__(
        self,
        path_or_store: str | os.PathLike | Store,
        *,
        async_save: bool = False,
        max_pending: int = 2,
        map_location: Any = "cpu",
        store_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be an int >= 1, got {max_pending!r}")
        if isinstance(path_or_store, Store):
            if store_options:
                raise ValueError("store_options apply only when DeltaCheckpointIO opens the store")
            self._store: Store | None = path_or_store
            self._store_path: str | None = None
        else:
            self._store = None
            self._store_path = os.path.abspath(os.fspath(path_or_store))
        self._options = {"delta": DEFAULT_DELTA, **(store_options or {})}
        self.async_save = bool(async_save)
        self.max_pending = max_pending
        self.map_location = map_location
        self.records: list[CheckpointRecord] = []
        self._lock = threading.Lock()  # guards _paths, _error, _futures
        self._paths: dict[str, list[int]] | None = None  # path -> steps, built lazily
        self._executor: ThreadPoolExecutor | None = None
        self._futures: list[Future] = []
        self._error: BaseException | None = None
        self._snapshots = [HostSnapshot() for _ in range(max_pending)]
        self._snap_busy: list[Future | None] = [None] * max_pending
        self._next_snap = 0
        self._sync_saves = 0  # sync saves running now (AsyncCheckpointIO calls from its thread)
        # sync saves have come from a thread other than the main one: AsyncCheckpointIO's,
        # whose queue may hold saves of files Lightning removes meanwhile
        self._saves_off_main = False
        self._queued: dict[str, int] = {}  # path -> saves submitted to the worker, not done
        #: paths removed before their save reached us (see remove_checkpoint)
        self._tombstones: dict[str, int] = {}
        self._open_lock = threading.Lock()
        self._exit_hook = False

    # -- the store ----------------------------------------------------------------
    @property
    def store(self) -> Store:
        """The store (opened on first use, again after :meth:`teardown`)."""
        store = self._store
        if store is None:
            # Lightning's AsyncCheckpointIO saves on its thread while the main thread may
            # remove a file: two first uses at once must not open the store twice (the
            # second open would find the first one's writer lock)
            with self._open_lock:
                if self._store is None:
                    assert self._store_path is not None
                    self._store = open_store(self._store_path, **self._options)
                store = self._store
        return store

    @property
    def _durable(self) -> bool:
        return bool(getattr(self.store.backend, "durable", True))

    def _mapping(self) -> dict[str, list[int]]:
        """Path -> steps (ascending) from the notes of the store's steps."""
        with self._lock:
            if self._paths is None:
                paths: dict[str, list[int]] = {}
                for info in self.store.log():
                    p = _note_path(info.note)
                    if p is not None:
                        paths.setdefault(p, []).append(info.step)
                self._paths = paths
            return self._paths

    def steps_for(self, path: str | os.PathLike) -> list[int]:
        """The committed steps that hold checkpoint ``path`` (normally one; waits for saves)."""
        self.wait()
        return list(self._mapping().get(_norm(path), []))

    # -- background work ------------------------------------------------------------
    def _submit(self, fn: Callable[..., Any], *args: Any, background: bool) -> Future:
        """Queue ``fn`` on the worker; a ``background`` job's failure is kept for the next call
        (a foreground one is raised by whoever waits on the future)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="deltackpt-lightning")
            if not self._exit_hook:
                self._exit_hook = True
                _drain_at_exit(self)
        with self._lock:
            if fn == self._save_job:
                self._queued[args[1]] = self._queued.get(args[1], 0) + 1
        fut = self._executor.submit(self._guard if background else fn,
                                    *((fn, *args) if background else args))
        with self._lock:
            self._futures = [f for f in self._futures if not f.done()] + [fut]
        return fut

    def _guard(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except BaseException as exc:
            with self._lock:
                if self._error is None:
                    self._error = exc

    def _raise_pending(self) -> None:
        with self._lock:
            exc, self._error = self._error, None
        if exc is not None:
            raise BackgroundSaveError(f"{self._where()}: a background checkpoint operation "
                                      f"failed: {type(exc).__name__}: {exc}") from exc

    def _where(self) -> str:
        return self._store_path or (self._store.location if self._store else "<store>")

    def wait(self) -> None:
        """Block until every queued save and removal is done; raise the first failure."""
        with self._lock:
            futures = list(self._futures)
        for fut in futures:
            fut.exception()  # background failures are kept in self._error; foreground
            # ones were raised to the caller that waited on them
        self._raise_pending()

    # -- CheckpointIO ---------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        """Store ``checkpoint`` as a new step for ``path``; write the placeholder at ``path``."""
        t0 = time.perf_counter()
        if storage_options is not None:
            raise TypeError("DeltaCheckpointIO.save_checkpoint does not take storage_options")
        if not isinstance(checkpoint, dict):
            raise TypeError(f"checkpoint must be a dict, not {type(checkpoint).__name__}")
        target = _norm(path)
        self._raise_pending()
        with self._lock:
            if self._tombstones.get(target):
                # Lightning removed this file while this save sat in AsyncCheckpointIO's queue
                self._tombstones[target] -= 1
                return
        gs = checkpoint.get("global_step")
        record = CheckpointRecord(target, gs if type(gs) is int else None, self.async_save)
        if not self.async_save:
            with self._lock:
                self._sync_saves += 1
                if threading.current_thread() is not threading.main_thread():
                    self._saves_off_main = True
            try:
                fut = self._submit(self._save_job, checkpoint, target, record, background=False)
                try:
                    fut.result()
                except UnsupportedValueError as exc:
                    raise _explain_unsupported(exc, target) from None
            finally:
                with self._lock:
                    self._sync_saves -= 1
                record.blocked_s = time.perf_counter() - t0
                self.records.append(record)
            return
        # async: a free buffer set, then a private copy of every tensor, here
        i = self._next_snap
        busy = self._snap_busy[i]
        if busy is not None:
            busy.exception()  # a failure is kept in self._error and raised below
        self._raise_pending()
        t1 = time.perf_counter()
        record.wait_s = t1 - t0
        try:
            snap = self._snapshots[i].take(checkpoint)
        except UnsupportedValueError as exc:
            raise _explain_unsupported(exc, target) from None
        record.snapshot_s = time.perf_counter() - t1
        # now, not in the worker: Lightning decides by looking at the filesystem right after
        # this call returns: ModelCheckpoint versions a name that exists ("-v1"), and
        # save_last="link" links last.ckpt to this path. A new name is reserved with a
        # pending placeholder (an existing one keeps the checkpoint it holds until the save
        # replaces it); a failure here is the worker's to report.
        pending = None
        with contextlib.suppress(OSError):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if not os.path.lexists(target):
                pending = uuid.uuid4().hex
                _write_placeholder(target, {
                    "kind": PLACEHOLDER_KIND, "version": PLACEHOLDER_VERSION, "pending": True,
                    "store": self._where(), "pending_id": pending,
                    "load_with": "deltackpt.lightning.load_checkpoint(path)"}, durable=False)
        self._next_snap = (i + 1) % self.max_pending
        self._snap_busy[i] = self._submit(self._save_job, snap, target, record, pending,
                                          background=True)
        record.blocked_s = time.perf_counter() - t0
        self.records.append(record)

    def _save_job(self, state: dict[str, Any], target: str, record: CheckpointRecord,
                  pending: str | None = None) -> None:
        try:
            self._save_step(state, target, record)
        except BaseException:
            if pending is not None:
                _remove_pending(target, pending)  # the name is free again, as it was
            raise
        finally:
            with self._lock:
                self._queued[target] -= 1
                if not self._queued[target]:
                    del self._queued[target]
            self._idle()

    def _save_step(self, state: dict[str, Any], target: str, record: CheckpointRecord) -> None:
        store = self.store
        paths = self._mapping()
        step = (store.latest() or 0) + 1
        gs, epoch = state.get("global_step"), state.get("epoch")
        # ties the placeholder to this save: a step number alone is reused when the store
        # is recreated at the same path or its latest step deleted
        save_id = uuid.uuid4().hex
        note = json.dumps({"lightning_path": target, "global_step": gs, "epoch": epoch,
                           "save_id": save_id})
        metrics = {k: v for k, v in (("epoch", epoch), ("global_step", gs)) if type(v) is int}
        t0 = time.perf_counter()
        res = store.save(state, step, metrics=metrics, tags=[os.path.basename(target)],
                         note=note)
        record.save_s = time.perf_counter() - t0
        record.step, record.logical_bytes, record.written_bytes = \
            step, res.logical_bytes, res.written_bytes
        _write_placeholder(target, {
            "kind": PLACEHOLDER_KIND, "version": PLACEHOLDER_VERSION,
            "store": store.location, "step": step, "save_id": save_id, "global_step": gs,
            "epoch": epoch, "load_with": "deltackpt.lightning.load_checkpoint(path)",
        }, self._durable)
        with self._lock:
            old = paths.get(target, [])
            paths[target] = [step]
        t1 = time.perf_counter()
        if old:
            self._drop_steps(old)
        record.reclaim_s = time.perf_counter() - t1
        record.done = True

    def _drop_steps(self, steps: list[int]) -> None:
        """Delete the steps no path maps to any more, then gc."""
        paths = self._mapping()
        with self._lock:
            still = {s for v in paths.values() for s in v}
        doomed = [s for s in steps if s not in still]
        for s in doomed:
            try:
                self.store.delete(s)
            except StepNotFoundError:
                pass  # already gone (deleted by hand)
        if doomed:
            self.store.gc(repack_threshold=_REPACK_THRESHOLD)

    def remove_checkpoint(self, path: Any) -> None:
        """Unlink the placeholder at ``path``, delete its step and reclaim the space.

        A regular file at ``path`` that is not a placeholder (a checkpoint from
        Lightning's own IO) is removed as Lightning's IO would remove it.
        """
        target = _norm(path)
        self._raise_pending()
        paths = self._mapping()
        exists = os.path.lexists(target)
        self._unlink(target)
        with self._lock:
            # synchronous like Lightning's IO; but never wait behind a save that
            # AsyncCheckpointIO runs in its thread: the space comes back after it
            background = self.async_save or self._sync_saves > 0
            if (self._sync_saves > 0 or self._saves_off_main) and not exists and \
                    target not in paths and target not in self._queued:
                # saves come from AsyncCheckpointIO's thread, and this file was never saved
                # here: its save may still wait in that queue (whether the thread is in
                # another save or between two), so drop it when it reaches us. Lightning
                # never saves a file again under a name it removed (top-k names carry the
                # step; it keeps last.ckpt when the name repeats)
                self._tombstones[target] = self._tombstones.get(target, 0) + 1
        fut = self._submit(self._remove_job, target, background=background)
        if not background:
            fut.result()

    def _unlink(self, target: str) -> None:
        if os.path.islink(target) or os.path.isfile(target):
            os.unlink(target)

    def _remove_job(self, target: str) -> None:
        try:
            paths = self._mapping()
            self._unlink(target)  # a save of the same path queued before us wrote it
            with self._lock:
                steps = paths.pop(target, [])
            self._drop_steps(steps)
        finally:
            self._idle()

    def _idle(self) -> None:
        """After a job: with nothing else queued, give the store's writer lock back, so that
        another plugin on the same store (a second Trainer in this process) can write. The
        store stays open; the next save takes the lock again. Lightning's
        ``AsyncCheckpointIO`` never tears the plugin it wraps down, so this is the only
        point where its lock could be released."""
        if self._store_path is None:
            return  # the caller's store: its lock is the caller's to manage
        with self._lock:
            # _queued drops a path at 0; the job calling this is still one of the futures
            busy = bool(self._queued) or sum(not f.done() for f in self._futures) > 1
        store = self._store
        if not busy and store is not None:
            with contextlib.suppress(DeltackptError):
                store._release_writer()

    def load_checkpoint(self, path: Any, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """The checkpoint dict saved at ``path``, bit for bit (tensors on ``map_location``)."""
        self.wait()
        where = map_location if map_location is not None else self.map_location
        return _load(path, where, self)

    def teardown(self) -> None:
        """Finish queued work, release buffers and threads, close the store if opened here."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            for snap in self._snapshots:
                snap.release()
            self._snap_busy = [None] * self.max_pending
            with self._lock:
                self._tombstones.clear()
                self._saves_off_main = False
            closed = False
            with self._open_lock:
                if self._store_path is not None and self._store is not None:
                    self._store.close()
                    self._store = None
                    closed = True
            if closed:  # not under _open_lock: _mapping takes _lock, then _open_lock
                with self._lock:
                    self._paths = None

    def __repr__(self) -> str:
        return f"<deltackpt.lightning.DeltaCheckpointIO {self._where()!r} async={self.async_save}>"


def _load(path: Any, map_location: Any, io: DeltaCheckpointIO | None) -> dict[str, Any]:
    import torch

    target = _norm(path)
    try:
        data = read_placeholder(target)
    except FileNotFoundError:
        data = None
        if io is not None:
            steps = io._mapping().get(target)
            if steps:
                return io.store.load(steps[-1], map_location=map_location)
        raise CheckpointNotFoundError(
            f"{target}: no checkpoint here (no placeholder file"
            + (f", and no step of {io._where()} was saved for this path)" if io else ")")
        ) from None
    if data is None:
        # a checkpoint written by Lightning's own IO: read it, without pickle
        try:
            return torch.load(target, map_location=map_location, weights_only=True)
        except Exception as exc:
            raise DeltackptError(f"{target}: not a deltackpt placeholder, and torch.load("
                                 f"weights_only=True) cannot read it: {exc}") from exc
    if data.get("pending"):
        raise CheckpointNotFoundError(
            f"{target}: this checkpoint's background save never completed (the process "
            "ended, or the save failed, before its step was committed); use another "
            "checkpoint")
    step, location = data["step"], data["store"]
    if io is not None and (io._store_path == location or
                           (io._store is not None and io._store.location == location)):
        return _load_step(io.store, step, target, map_location, data)
    if os.path.isdir(location):
        with open_store(location, create=False) as other:
            return _load_step(other, step, target, map_location, data)
    if io is not None:
        # the store moved: accept our store's step only if it was saved for this file
        info = io.store.info(step) if step in io.store else None
        if info is not None and os.path.basename(_note_path(info.note) or "") == \
                os.path.basename(target):
            return _load_step(io.store, step, target, map_location, data)
    raise CheckpointNotFoundError(f"{target}: the placeholder points to step {step} of "
                                  f"{location}, which does not exist")


def _load_step(store: Store, step: int, target: str, map_location: Any,
               placeholder: dict[str, Any]) -> dict[str, Any]:
    if step not in store:
        raise StepNotFoundError(f"{target}: the placeholder points to step {step} of "
                                f"{store.location}, which is not committed (deleted, or the "
                                "save did not finish)")
    want = placeholder.get("save_id")
    # a placeholder written before save ids is trusted as before: it may be read through
    # last.ckpt (a link or a copy), so its own name need not be the step's file name
    if want is not None and _note(store.info(step).note).get("save_id") != want:
        raise CheckpointNotFoundError(
            f"{target}: the placeholder points to step {step} of {store.location}, which "
            "now holds another save (the store was recreated, or that step deleted and its "
            "number reused): the checkpoint this file stood for is gone")
    return store.load(step, map_location=map_location)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read the Lightning checkpoint at ``path`` (a placeholder) from its store, bit for bit.

    For use outside a Trainer, e.g.
    ``model.load_state_dict(load_checkpoint("ckpts/epoch=3.ckpt")["state_dict"])``.
    """
    return _load(path, map_location, None)


# both namespaces can be installed side by side; Lightning checks isinstance() against its own
for _mod in ("lightning.fabric.plugins", "lightning_fabric.plugins"):
    try:
        _other = __import__(_mod, fromlist=["CheckpointIO"]).CheckpointIO
    except ImportError:
        continue
    if _other is not _CheckpointIO:
        _other.register(DeltaCheckpointIO)
