"""Training-loop integration: periodic (asynchronous) saves, exact resume, retention.

>>> ckpt = deltackpt.Checkpointer("ckpts", model=model, optimizer=opt, scheduler=sched,
...                               every_n_steps=500, keep_last=3,
...                               keep_best=("val_loss", "min", 2))   # doctest: +SKIP
>>> start = ckpt.resume()                       # 0 for a new run          # doctest: +SKIP
>>> for step in range(start + 1, total + 1):                             # doctest: +SKIP
...     train_one_step()
...     ckpt.step(step, metrics={"val_loss": v} if step % 1000 == 0 else None)
>>> ckpt.close()                                                         # doctest: +SKIP

Steps
    ``step`` counts *completed* optimizer steps: call ``ckpt.step(s)`` after
    step ``s`` is done. :meth:`Checkpointer.resume` returns the step of the
    checkpoint it restored (0 for a new run), so a loop continues with
    ``range(start + 1, total + 1)`` and a resumed run computes exactly what the
    uninterrupted one would have.

Saved state layout (one store step per checkpoint)::

    {
      "model":     model.state_dict(),          # when a model was given
      "optimizer": optimizer.state_dict(),      # when an optimizer was given
      "scheduler": scheduler.state_dict(),      # when a scheduler was given
      "rng": {                                  # unless rng=False
        "torch":  torch.get_rng_state(),        # uint8 tensor
        "cuda":   torch.cuda.get_rng_state_all(),   # only when CUDA is initialised
        "python": random.getstate(),            # (version, (625 ints), gauss_next)
        "numpy":  numpy.random.get_state(),     # ("MT19937", uint32[624], pos, has_gauss, cached)
      },
      "extra": {name: state, ...},              # everything passed to register()
      "step": step,
    }

Any step can be loaded without deltackpt's checkpointer (``store.load(step)``),
and ``store.load(step, select="model")`` reads only the weights.

Asynchronous saves (``async_save=True``, the default)
    :meth:`Checkpointer.save` blocks the caller only while the state is copied
    into host buffers (:mod:`deltackpt.snapshot`); hashing, compression,
    writing, the commit and retention run in one background thread calling
    :meth:`Store.save` on that copy. At most one save is in flight: a new save
    first waits for the previous one (back-pressure). That is why a *single*
    set of host buffers is enough: the buffers are overwritten only after the
    save reading them has finished, and a second set would only let a second
    save queue up behind the first, which back-pressure forbids anyway (and it
    would double the host memory). The background thread calls no torch
    operation that uses torch's intra-op thread pool (the store reads the
    buffers through numpy views), and the snapshot copy itself is a plain
    ``memcpy`` (see :mod:`deltackpt.snapshot`), so ``torch.set_num_threads``
    is never touched. A store the checkpointer opens for async saves gets
    ``threads=1``: on 2 cores, with a save every 50 steps, a background save
    with 2 store threads cost 17% of the training time, with 1 thread 6%
    (``benchmarks/bench_checkpointer.py``).

    A background failure is never swallowed: it is raised as
    :class:`~deltackpt.errors.BackgroundSaveError` (chaining the original
    exception) by the next call to :meth:`step`, :meth:`save`, :meth:`wait` or
    :meth:`close`, once. A failed save never becomes visible (the store commits
    a step atomically, at its very end) and the next save works normally.

Retention (see :mod:`deltackpt.retention`)
    ``keep_last``, ``keep_best`` and ``keep_every`` are combined as a union and
    applied after every commit (in the background thread for async saves). The
    step just saved and the latest step are never deleted. ``keep_full_last``
    thins older kept steps to ``thin_keep`` (default the model only). Space is
    reclaimed with :meth:`Store.gc` after anything was deleted or thinned.
"""

from __future__ import annotations

import functools
import math
import os
import random
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._torch import torch
from .errors import BackgroundSaveError, InvalidInputError, StepExistsError, StoreClosedError
from .results import StepInfo
from .retention import RetentionPolicy, prune, reclaim
from .snapshot import HostSnapshot
from .store import Store, metric_scalar, open_store

_MISSING = object()
#: delta policy of a store the checkpointer opens when retention deletes steps
_RETENTION_DELTA = "auto:keyframe:8"


@dataclass
class SaveRecord:
    """What one checkpoint cost. Filled in when the save (and its retention) is done."""

    step: int
    asynchronous: bool
    #: seconds the caller waited for the previous save to finish (back-pressure)
    wait_s: float = 0.0
    #: seconds spent copying the state into host buffers (async saves)
    snapshot_s: float = 0.0
    #: total seconds the caller was blocked in save() (wait + snapshot + bookkeeping)
    blocked_s: float = 0.0
    #: seconds Store.save took (hash, encode, write, fsync, commit)
    save_s: float = 0.0
    #: seconds deleting, thinning and gc took
    retention_s: float = 0.0
    logical_bytes: int = 0
    written_bytes: int = 0
    new_chunks: int = 0
    deleted: list[int] = field(default_factory=list)
    thinned: list[int] = field(default_factory=list)
    #: the step is committed (visible in the store)
    committed: bool = False
    done: bool = False
    error: BaseException | None = None


class _Extra:
    """How to read and restore one registered piece of user state."""

    __slots__ = ("name", "get", "set")

    def __init__(self, name: str, get: Callable[[], Any], set: Callable[[Any], None]) -> None:
        self.name = name
        self.get = get
        self.set = set


def _make_extra(name: str, obj: Any, getter: Callable | None, setter: Callable | None) -> _Extra:
    if getter is not None or setter is not None:
        if obj is not _MISSING:
            raise TypeError("register() takes an object or getter=/setter=, not both")
        if not callable(getter) or not callable(setter):
            raise TypeError("register() needs both getter= and setter= callables")
        return _Extra(name, getter, setter)
    if obj is _MISSING or obj is None:
        raise TypeError("register() needs an object, or getter= and setter=")
    if callable(getattr(obj, "state_dict", None)) and \
            callable(getattr(obj, "load_state_dict", None)):
        return _Extra(name, obj.state_dict, obj.load_state_dict)
    if isinstance(obj, (torch.Generator, np.random.RandomState)):
        return _Extra(name, obj.get_state, obj.set_state)
    if isinstance(obj, np.random.Generator):
        bitgen = obj.bit_generator

        def set_np(state: Any) -> None:
            bitgen.state = state

        return _Extra(name, lambda: bitgen.state, set_np)
    if isinstance(obj, random.Random):
        return _Extra(name, obj.getstate, obj.setstate)
    if isinstance(obj, dict):
        def set_dict(state: Any) -> None:
            obj.clear()
            obj.update(state)

        return _Extra(name, lambda: obj, set_dict)
    if isinstance(obj, list):
        def set_list(state: Any) -> None:
            obj[:] = state

        return _Extra(name, lambda: obj, set_list)
    raise TypeError(
        f"cannot register {type(obj).__name__} as {name!r}: pass an object with "
        "state_dict()/load_state_dict(), a torch.Generator, a numpy or Python random "
        "generator, a dict or list (restored in place), or getter= and setter= callables"
    )


def capture_rng() -> dict[str, Any]:
    """The global RNG states: torch CPU, every initialised CUDA device, Python, NumPy."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    state["python"] = random.getstate()
    state["numpy"] = np.random.get_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng` captured (CUDA: as many devices as exist)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        n = torch.cuda.device_count()
        if len(cuda) != n:
            warnings.warn(f"checkpoint holds CUDA RNG states of {len(cuda)} devices, this "
                          f"process sees {n}; restoring the first {min(n, len(cuda))}",
                          stacklevel=3)
        for i, s in enumerate(cuda[:n]):
            torch.cuda.set_rng_state(s.cpu(), i)
    if "python" in state:
        random.setstate(_tuples(state["python"]))
    if "numpy" in state:
        np.random.set_state(state["numpy"])


def _tuples(value: Any) -> Any:
    """random.setstate needs tuples all the way down."""
    if isinstance(value, (list, tuple)):
        return tuple(_tuples(v) for v in value)
    return value


@functools.lru_cache(maxsize=1)
def _store_takes_nonfinite() -> bool:
    """Whether the store can record NaN/inf metrics (its manifest is strict JSON today)."""
    from .packs import encode_manifest

    try:
        encode_manifest({"metrics": {"x": math.nan}})
    except ValueError:
        return False
    return True


def _clean_metrics(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """Metric values as plain Python scalars, converted in the caller's thread.

    A NaN or infinite value is recorded as the string ``"nan"``/``"inf"``/``"-inf"``
    while the store cannot record non-finite floats (a NaN loss must not make the
    save fail); as a string it never ranks as best, which is what NaN means.
    """
    if metrics is None:
        return None
    if not isinstance(metrics, dict):
        raise TypeError("metrics must be a dict of str to numbers/strings")
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if not isinstance(k, str):
            raise TypeError(f"metric names must be str, got {k!r}")
        v = metric_scalar(k, v)
        if isinstance(v, float) and not math.isfinite(v) and not _store_takes_nonfinite():
            v = repr(v)
        out[k] = v
    return out


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"step must be an int, not {type(step).__name__}")
    step = int(step)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return step


class Checkpointer:
    """Checkpoint a training loop into a deltackpt store; see the module docstring.

    ``store`` is a path (opened, and closed by :meth:`close`), a :class:`Store`
    (left open) or a Backend. ``every_n_steps`` makes :meth:`step` save every
    steps divisible by it; ``keep_last``, ``keep_best`` (``(metric, mode, k)``),
    ``keep_every``, ``keep_full_last`` and ``thin_keep`` define the retention
    policy (or pass ``retention=RetentionPolicy(...)``). ``rng=False`` leaves
    the global RNG states out. ``store_options`` go to :func:`deltackpt.open`;
    for async saves the store it opens defaults to ``threads=1`` (the background
    save then leaves the other cores to training; pass ``{"threads": n}`` to
    save faster on a machine whose CPUs idle while a GPU trains). When the
    retention policy deletes steps, that store also defaults to
    ``delta="auto:keyframe:8"``: with the default chain policy every kept step
    still needs the delta bases of the deleted ones, so deleting frees nothing
    until the next keyframe.
    ``on_saved(record)`` is called (from the background thread for async
    saves) after each completed save with its :class:`SaveRecord`; it must not call
    ``save``/``step``/``wait``/``close``/``resume`` of this checkpointer (they would wait for
    the save that runs it: refused with :class:`InvalidInputError`).
    """

    def __init__(
        self,
        store: str | os.PathLike | Store | Any,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        *,
        every_n_steps: int | None = None,
        keep_last: int | None = None,
        keep_best: Any = None,
        keep_every: int | None = None,
        keep_full_last: int | None = None,
        thin_keep: Sequence[str] | str = ("model",),
        retention: RetentionPolicy | None = None,
        async_save: bool = True,
        rng: bool = True,
        store_options: dict[str, Any] | None = None,
        on_saved: Callable[[SaveRecord], None] | None = None,
    ) -> None:
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or
                                          not isinstance(every_n_steps, int) or
                                          every_n_steps < 1):
            raise ValueError(f"every_n_steps must be a positive int, got {every_n_steps!r}")
        if retention is not None:
            if any(v is not None for v in (keep_last, keep_best, keep_every, keep_full_last)):
                raise TypeError("pass either retention= or keep_* arguments, not both")
            if not isinstance(retention, RetentionPolicy):
                raise TypeError("retention must be a RetentionPolicy")
            self.retention = retention
        else:
            self.retention = RetentionPolicy.from_args(keep_last, keep_best, keep_every,
                                                       keep_full_last, thin_keep)
        if isinstance(store, Store):
            self._store, self._owns_store = store, False
        else:
            options = dict(store_options or {})
            if self.retention.rules:
                # deleted steps' blocks stay as long as a kept step's delta chain needs
                # them; against a keyframe (one hop) only the keyframe stays. MiniLM run,
                # keep_last=2 of 6 saves: 607 MiB of packs instead of 1061 MiB
                options.setdefault("delta", _RETENTION_DELTA)
            if async_save:
                # one background worker: more would take cores from the training step
                # (2 cores, save every 50 steps: +17% step time with 2 store threads,
                # +6% with 1; benchmarks/bench_checkpointer.py)
                options.setdefault("threads", 1)
            self._store, self._owns_store = open_store(store, **options), True
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.every_n_steps = every_n_steps
        self.async_save = bool(async_save)
        self.rng = bool(rng)
        self.on_saved = on_saved
        #: one record per save, oldest first
        self.records: list[SaveRecord] = []
        self._extras: dict[str, _Extra] = {}
        self._snapshot = HostSnapshot()
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: Future | None = None
        #: the save in flight as the log will show it, and its record (once that save
        #: failed, it ranks no more)
        self._pending: tuple[StepInfo, SaveRecord] | None = None
        self._lock = threading.Lock()
        self._error: tuple[SaveRecord, str, BaseException] | None = None
        self._last_step: int | None = None
        self._reclaimed = False
        #: steps newer than the one resume() restored, saved by an earlier run
        self._resumed_before: set[int] = set()
        #: the extras of the step resume() restored, for extras registered after it
        self._resumed_extra: dict[str, Any] | None = None
        # one save at a time, from any thread: a save's snapshot reuses the host buffers
        # the previous one filled, and two callers at once would write into each other's
        self._save_lock = threading.RLock()
        self._closed = False
        #: the thread running background saves (and on_saved callbacks), once one ran
        self._bg_thread: int | None = None

    # -- configuration -----------------------------------------------------------
    @property
    def store(self) -> Store:
        """The store checkpoints go to."""
        return self._store

    def register(self, name: str, obj: Any = _MISSING, *, getter: Callable[[], Any] | None = None,
                 setter: Callable[[Any], None] | None = None) -> Any:
        """Save and restore extra state under ``state["extra"][name]``; returns ``obj``.

        ``obj`` may have ``state_dict()``/``load_state_dict()`` (a stateful sampler or data
        loader, a GradScaler...; torch's own RandomSampler and DataLoader keep no state and
        cannot be registered), be a ``torch.Generator``, a
        ``numpy.random.Generator``/``RandomState`` or ``random.Random`` (their
        state is saved), or a ``dict``/``list`` of plain values that is saved and
        updated *in place* on resume. For anything else give ``getter=`` (returns
        a storable value) and ``setter=`` (receives it back). Registered after
        :meth:`resume`, it receives the resumed step's state for it right away.
        """
        if not isinstance(name, str) or not name:
            raise TypeError("register() name must be a non-empty str")
        if name in self._extras:
            raise ValueError(f"{name!r} is already registered")
        extra = self._extras[name] = _make_extra(name, obj, getter, setter)
        resumed = self._resumed_extra
        if resumed is not None:
            # registered after resume(): give it the state the checkpoint holds for it
            if name in resumed:
                extra.set(resumed[name])
            else:
                warnings.warn(f"{name!r} was registered after resume(), and the checkpoint "
                              "resumed from holds no extra state for it", stacklevel=2)
        return None if obj is _MISSING else obj

    # -- state ---------------------------------------------------------------------
    def state(self, step: int) -> dict[str, Any]:
        """The live training state (no copies) in the layout described in the module doc."""
        state: dict[str, Any] = {}
        if self.model is not None:
            state["model"] = self.model.state_dict()
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        if self.rng:
            state["rng"] = capture_rng()
        state["extra"] = {name: ex.get() for name, ex in self._extras.items()}
        state["step"] = int(step)
        return state

    def restore(self, state: dict[str, Any], strict: bool = True) -> None:
        """Load ``state`` (as saved) into the model, optimizer, scheduler, extras and RNGs."""
        parts = [("model", self.model), ("optimizer", self.optimizer),
                 ("scheduler", self.scheduler)]
        missing = [name for name, obj in parts if obj is not None and name not in state]
        if missing:
            raise ValueError(f"the checkpoint holds no {', '.join(missing)} state (a thinned "
                             "step? resume loads the latest step, which is never thinned)")
        if self.model is not None:
            self.model.load_state_dict(state["model"], strict=strict)
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        extra = state.get("extra", {})
        absent = [n for n in self._extras if n not in extra]
        if absent:
            msg = f"the checkpoint holds no extra state for {', '.join(map(repr, absent))}"
            if strict:
                raise ValueError(msg)
            warnings.warn(msg, stacklevel=3)
        for name, ex in self._extras.items():
            if name in extra:
                ex.set(extra[name])
        if self.rng and "rng" in state:
            restore_rng(state["rng"])

    def resume(self, step: int | None = None, map_location: Any = "cpu",
               strict: bool = True, discard_newer: bool = False) -> int:
        """Restore the latest checkpoint (or ``step``); returns its step, 0 for a new run.

        Restores the model, optimizer, scheduler, registered extras and RNG
        states. Tensors are loaded to ``map_location`` (default CPU) and copied
        into the model's and optimizer's own devices by their load_state_dict.

        Resuming from a step older than the latest (a rollback, e.g. past a loss spike)
        leaves the newer steps alone: retention neither counts nor deletes them (they
        would otherwise make ``keep_last`` delete this run's own checkpoints), and saving
        over one of them raises :class:`StepExistsError`. ``discard_newer=True`` deletes
        them once the state is restored, so the run saves its new history under the same
        step numbers (a later ``resume()`` would otherwise load the newest, abandoned one).
        """
        self._not_from_background("resume")
        with self._save_lock:  # no save from another thread runs beside a restore
            return self._resume(step, map_location, strict, discard_newer)

    def _resume(self, step: int | None, map_location: Any, strict: bool,
                discard_newer: bool) -> int:
        self.wait()
        if step is None:
            step = self._store.latest()
            if step is None:
                return 0
        state = self._store.load(step, map_location=map_location)
        self.restore(state, strict=strict)
        # for extras registered after this call (until the next save)
        self._resumed_extra = state.get("extra", {}) if isinstance(state, dict) else {}
        step = int(step)
        newer = [s for s in self._store.steps() if s > step]
        if discard_newer and newer:
            for s in newer:
                self._store.delete(s)
            reclaim(self._store)
            newer = []
        self._resumed_before = set(newer)
        self._last_step = step
        return step

    # -- saving --------------------------------------------------------------------
    def due(self, step: int, metrics: dict[str, Any] | None = None) -> bool:
        """Whether :meth:`step` would save at ``step`` with these metrics."""
        if step == self._last_step:
            return False
        if self.every_n_steps is not None and step % self.every_n_steps == 0:
            return True
        if metrics and step not in self._resumed_before:
            # (a step the abandoned newer run holds is not overwritten for a metric: only a
            # scheduled save there stops the run, with the way out in its message)
            rules = [r for r in self.retention.best_rules if r.metric in metrics]
            if rules:
                log = [i for i in self._store.log() if i.step not in self._resumed_before]
                pending = self._pending
                if (pending is not None and pending[1].error is None
                        and all(i.step != pending[0].step for i in log)):
                    log.append(pending[0])  # the save in flight counts as if committed
                return any(r.would_keep(log, metrics[r.metric]) for r in rules)
        return False

    def step(self, step: int, metrics: dict[str, Any] | None = None) -> bool:
        """Call after every training step; saves when due and returns whether it saved.

        Due: ``step`` divisible by ``every_n_steps``, or ``metrics`` carry a
        ``keep_best`` metric whose value would rank among the kept best. A step
        already saved (or resumed from) is not saved again.
        """
        self._not_from_background("step")
        with self._save_lock:
            self._check_open()
            self._raise_pending()
            step = _check_step(step)
            clean = _clean_metrics(metrics)
            if not self.due(step, clean):
                return False
            self.save(step, clean)
            return True

    def save(self, step: int, metrics: dict[str, Any] | None = None, *,
             tags: Sequence[str] | None = None, note: str | None = None) -> None:
        """Save a checkpoint of ``step`` now (asynchronously unless ``async_save=False``).

        Blocks while a previous save is still in flight, then while the state is
        copied to host memory. Raises :class:`BackgroundSaveError` (without
        saving) when the previous background save failed. Calls from several threads
        take turns.
        """
        self._not_from_background("save")
        with self._save_lock:
            self._save(step, metrics, tags, note)

    def _save(self, step: int, metrics: dict[str, Any] | None, tags: Sequence[str] | None,
              note: str | None) -> None:
        self._check_open()
        t0 = time.perf_counter()
        self._drain()
        self._raise_pending()
        t_wait = time.perf_counter() - t0
        step = _check_step(step)
        clean = _clean_metrics(metrics)
        if step in self._store:
            if step in self._resumed_before:
                raise StepExistsError(
                    f"{self._store.location}: step {step} already exists: this run resumed "
                    f"from an older step, and step {step} was saved before that; pass "
                    "resume(step, discard_newer=True) to roll the store back with the run")
            raise StepExistsError(f"{self._store.location}: step {step} already exists; "
                                  "was resume() called?")
        record = SaveRecord(step, self.async_save, wait_s=t_wait)
        self._resumed_extra = None  # training went on: later registrations start fresh
        live = self.state(step)
        if not self.async_save:
            self._last_step = step
            self.records.append(record)
            try:
                self._run(live, step, clean, tags, note, record)
            except BaseException as exc:
                record.error, record.done = exc, True
                if not record.committed and self._last_step == step:
                    self._last_step = None
                raise
            finally:
                record.blocked_s = time.perf_counter() - t0
            return
        t1 = time.perf_counter()
        snap = self._snapshot.take(live)  # raises UnsupportedValueError here, not later
        del live
        record.snapshot_s = time.perf_counter() - t1
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="deltackpt-save")
        self._last_step = step
        self.records.append(record)
        self._pending = (StepInfo(step, time.time(), dict(clean or {}), [], note, 0, 0, 0, 0,
                                  None), record)
        self._inflight = self._executor.submit(self._job, snap, step, clean, tags, note, record)
        record.blocked_s = time.perf_counter() - t0

    def _run(self, state: Any, step: int, metrics: dict[str, Any] | None,
             tags: Sequence[str] | None, note: str | None, record: SaveRecord) -> None:
        """Save, then apply retention and call on_saved."""
        t0 = time.perf_counter()
        res = self._store.save(state, step, metrics=metrics, tags=tags, note=note)
        record.committed = True
        record.save_s = time.perf_counter() - t0
        record.logical_bytes = res.logical_bytes
        record.written_bytes = res.written_bytes
        record.new_chunks = res.new_chunks
        if self.retention.active:
            t1 = time.perf_counter()
            # steps newer than the one this run resumed from belong to the abandoned run:
            # counted, they would make keep_last delete this run's own checkpoints
            record.deleted, record.thinned = prune(self._store, self.retention, protect=(step,),
                                                   gc=False, set_aside=self._resumed_before)
            if record.deleted or record.thinned or not self._reclaimed:
                # the first pass of a run also clears what a crashed run left behind
                reclaim(self._store)
                self._reclaimed = True
            record.retention_s = time.perf_counter() - t1
        record.done = True
        if self.on_saved is not None:
            self.on_saved(record)

    def _job(self, snap: Any, step: int, metrics: dict[str, Any] | None,
             tags: Sequence[str] | None, note: str | None, record: SaveRecord) -> None:
        self._bg_thread = threading.get_ident()
        try:
            self._run(snap, step, metrics, tags, note, record)
        except BaseException as exc:  # surfaced by the next call in the caller's thread
            record.error, record.done = exc, True
            with self._lock:
                if self._error is None:
                    self._error = (record, "committed" if record.committed else "save", exc)

    def _drain(self) -> None:
        """Wait for the in-flight save, if any (its errors are kept for _raise_pending).
        Callers hold ``_save_lock``: a save submitted meanwhile from another thread must
        not be taken for this one (the next snapshot would overwrite the host buffers
        that save still encodes)."""
        fut = self._inflight
        if fut is not None:
            fut.result()  # _job never raises
            if self._inflight is fut:
                self._inflight = None
                self._pending = None

    def _raise_pending(self) -> None:
        with self._lock:
            pending, self._error = self._error, None
        if pending is None:
            return
        record, stage, exc = pending
        if stage == "save" and self._last_step == record.step:
            self._last_step = None
        if stage == "save" and self._pending is not None and self._pending[1] is record:
            self._pending = None  # never committed: ranks no more
        if stage == "save":
            msg = (f"{self._store.location}: background save of step {record.step} failed: "
                   f"{type(exc).__name__}: {exc}; the step was not committed (later saves "
                   "work as usual)")
        else:
            msg = (f"{self._store.location}: step {record.step} was saved, but what followed "
                   f"its commit (retention or on_saved) failed: {type(exc).__name__}: {exc}")
        raise BackgroundSaveError(msg) from exc

    # -- waiting and closing -------------------------------------------------------
    @property
    def in_flight(self) -> bool:
        """Whether a background save is running now."""
        fut = self._inflight
        return fut is not None and not fut.done()

    def wait(self) -> None:
        """Block until the in-flight save (and its retention) is done; raise its failure."""
        self._not_from_background("wait")
        with self._save_lock:
            self._drain()
            self._raise_pending()

    def best_step(self, metric: str, mode: str = "min") -> int | None:
        """The committed step with the best ``metric`` (ties: latest; NaN never wins)."""
        self._not_from_background("best_step")
        self.wait()
        return self._store.best(metric, mode)

    def close(self) -> None:
        """Wait for the in-flight save, release the buffers (and the store, if opened here).

        Raises :class:`BackgroundSaveError` if that save failed. Idempotent.
        """
        self._not_from_background("close")
        with self._save_lock:  # a save from another thread finishes its snapshot first
            if self._closed:
                return
            self._closed = True
            try:
                self._drain()
            finally:
                if self._executor is not None:
                    self._executor.shutdown(wait=True)
                    self._executor = None
                self._snapshot.release()
                if self._owns_store:
                    self._store.close()
            self._raise_pending()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except BackgroundSaveError as err:  # do not mask the exception in flight
            warnings.warn(f"{err} (while handling {exc_type.__name__})", stacklevel=2)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError("the checkpointer is closed")

    def _not_from_background(self, what: str) -> None:
        """Refuse a call an ``on_saved`` callback makes from the background save: it would
        wait for that very save (and the caller's thread may hold the save lock)."""
        if self._bg_thread is not None and threading.get_ident() == self._bg_thread:
            raise InvalidInputError(
                f"Checkpointer.{what}() called from its own background save (an on_saved "
                "callback?) would wait for itself; call it from the training thread")

    def __repr__(self) -> str:
        return (f"<deltackpt.Checkpointer {self._store.location!r} every={self.every_n_steps} "
                f"async={self.async_save}>")
