"""Checkpointer: periodic and async saves, back-pressure, failure surfacing, extras, snapshots."""

from __future__ import annotations

import collections
import math
import os
import random
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch

import deltackpt
import deltackpt.store as store_mod
from deltackpt.backend import MemoryBackend
from deltackpt.checkpointer import Checkpointer, capture_rng, restore_rng
from deltackpt.errors import (
    BackgroundSaveError,
    StepExistsError,
    StoreClosedError,
    UnsupportedValueError,
)
from deltackpt.faults import CRASH_EXIT_CODE
from deltackpt.snapshot import HostSnapshot


class Injected(RuntimeError):
    """The failure a test injects."""


class FlakyBackend(MemoryBackend):
    """A MemoryBackend that fails (or slows down) the chosen operations on demand."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.fail: set[str] = set()
        self.delay = delay
        self.calls: list[str] = []

    def _hit(self, op: str) -> None:
        self.calls.append(op)
        if op in self.fail:
            raise Injected(f"injected failure in {op}")

    def create(self, name):
        writer = super().create(name)
        backend = self
        write, commit = writer.write, writer.commit

        def failing_write(data):
            backend._hit("write")
            write(data)

        def failing_commit():
            backend._hit("commit")
            commit()

        writer.write, writer.commit = failing_write, failing_commit
        return writer

    def put(self, name, data):
        self._hit("put")
        super().put(name, data)

    def sync(self):
        if self.delay:
            time.sleep(self.delay)
        self._hit("sync")


def small_model(seed: int = 0, width: int = 64) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, width), torch.nn.ReLU(),
                               torch.nn.Linear(width, 4))


def train_step(model, opt, sched=None):
    x = torch.randn(8, 16)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    if sched is not None:
        sched.step()
    return loss.item()


def bits_equal(a, b) -> bool:
    """Recursive bit-for-bit equality of two states (floats compared by bits)."""
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and a.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                == b.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.tobytes() == b.tobytes()
    if isinstance(a, dict):
        return (isinstance(b, dict) and list(a) == list(b)
                and all(bits_equal(a[k], b[k]) for k in a))
    if isinstance(a, (list, tuple)):
        return (type(a) is type(b) and len(a) == len(b)
                and all(bits_equal(x, y) for x, y in zip(a, b)))
    if isinstance(a, float):
        return isinstance(b, float) and a.hex() == b.hex() if a == a else b != b
    return type(a) is type(b) and a == b


# -- basics ------------------------------------------------------------------------------


@pytest.mark.parametrize("async_save", [True, False])
def test_step_saves_every_n_and_layout(store_path, async_save):
    model = small_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)
    with Checkpointer(store_path, model=model, optimizer=opt, scheduler=sched,
                      every_n_steps=4, async_save=async_save) as ck:
        assert ck.resume() == 0
        saved = []
        for s in range(1, 13):
            train_step(model, opt, sched)
            if ck.step(s):
                saved.append(s)
                expected = {k: v.clone() for k, v in model.state_dict().items()}
                exp_opt = opt.state_dict()
                exp_opt = {"state": {i: {k: v.clone() for k, v in st.items()}
                                     for i, st in exp_opt["state"].items()},
                           "param_groups": exp_opt["param_groups"]}
                exp_rng = capture_rng()
        assert saved == [4, 8, 12]
        assert not ck.step(12)  # already saved
        ck.wait()
        assert ck.store.steps() == [4, 8, 12]
        state = ck.store.load(12)
        assert list(state) == ["model", "optimizer", "scheduler", "rng", "extra", "step"]
        assert state["step"] == 12 and state["extra"] == {}
        assert bits_equal(dict(state["model"]), expected)
        assert bits_equal(state["optimizer"], exp_opt)
        assert state["scheduler"] == sched.state_dict()
        assert set(state["rng"]) == {"torch", "python", "numpy"}
        assert bits_equal(state["rng"], exp_rng)
        assert all(r.done and r.error is None and r.written_bytes > 0 for r in ck.records)
        assert ck.records[0].logical_bytes == state_bytes(model, opt)
    with pytest.raises(StoreClosedError):
        ck.step(13)


def state_bytes(model, opt) -> int:
    n = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for st in opt.state_dict()["state"].values():
        n += sum(t.numel() * t.element_size() for t in st.values())
    return n + torch.get_rng_state().numel() + np.random.get_state()[1].nbytes


def test_save_existing_step_and_bad_args(store_path):
    model = small_model()
    with Checkpointer(store_path, model=model) as ck:
        ck.save(5)
        ck.wait()
        with pytest.raises(StepExistsError):
            ck.save(5)
        with pytest.raises(TypeError):
            ck.save(1.5)
        with pytest.raises(ValueError):
            ck.save(-1)
        with pytest.raises(TypeError):
            ck.save(6, metrics={"loss": [1, 2]})
    with pytest.raises(ValueError):
        Checkpointer(store_path, every_n_steps=0)
    with pytest.raises(TypeError):
        Checkpointer(store_path, keep_last=1,
                     retention=deltackpt.retention.RetentionPolicy())


def test_unsupported_state_raises_in_caller(store_path):
    class Opaque:
        pass

    with Checkpointer(store_path, model=small_model()) as ck:
        ck.register("thing", getter=lambda: {"ok": 1, "bad": Opaque()}, setter=lambda v: None)
        with pytest.raises(UnsupportedValueError, match="extra/thing/bad"):
            ck.save(1)
        assert not ck.in_flight and ck.records == []
        ck.wait()
        assert ck.store.steps() == []


def test_resume_restores_everything(store_path):
    model = small_model(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)
    loop = {"epoch": 3, "seen": [1, 2]}
    order = [5, 6, 7]
    gen = torch.Generator().manual_seed(123)
    npgen = np.random.default_rng(7)
    pyrng = random.Random(9)
    counter = {"n": 41}
    with Checkpointer(store_path, model=model, optimizer=opt, scheduler=sched) as ck:
        ck.register("loop", loop)
        ck.register("order", order)
        ck.register("gen", gen)
        ck.register("npgen", npgen)
        ck.register("pyrng", pyrng)
        ck.register("counter", getter=lambda: counter["n"],
                    setter=lambda v: counter.__setitem__("n", v))
        for _ in range(3):
            train_step(model, opt, sched)
        torch.manual_seed(5)
        random.seed(5)
        np.random.seed(5)
        ck.save(3)
        expect = {
            "model": {k: v.clone() for k, v in model.state_dict().items()},
            "lr": opt.param_groups[0]["lr"],
            "sched": sched.state_dict(),
            "draws": (torch.rand(3), random.random(), np.random.rand(),
                      torch.rand(2, generator=gen), npgen.random(), pyrng.random()),
        }
    # scramble everything, then resume
    model2 = small_model(1)
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
    sched2 = torch.optim.lr_scheduler.ExponentialLR(opt2, 0.9)
    loop.clear()
    order[:] = []
    gen.manual_seed(0)
    npgen2, pyrng2 = np.random.default_rng(0), random.Random(0)
    counter["n"] = 0
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    with Checkpointer(store_path, model=model2, optimizer=opt2, scheduler=sched2) as ck2:
        for name, obj in [("loop", loop), ("order", order), ("gen", gen), ("npgen", npgen2),
                          ("pyrng", pyrng2)]:
            ck2.register(name, obj)
        ck2.register("counter", getter=lambda: counter["n"],
                     setter=lambda v: counter.__setitem__("n", v))
        assert ck2.resume() == 3
        assert not ck2.step(3)  # the resumed step is not saved again
    assert bits_equal(dict(model2.state_dict()), expect["model"])
    assert opt2.param_groups[0]["lr"] == expect["lr"]
    assert sched2.state_dict() == expect["sched"]
    assert loop == {"epoch": 3, "seen": [1, 2]} and order == [5, 6, 7] and counter["n"] == 41
    draws = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=gen),
             npgen2.random(), pyrng2.random())
    assert bits_equal(draws, expect["draws"])


@pytest.mark.parametrize("async_save", [False, True])
def test_rolling_back_to_an_older_step(store_path, async_save):
    """resume(older) keeps the newer steps and refuses to save over them with a message
    that says how to roll back; discard_newer=True deletes them and the run re-saves."""
    model = small_model(0)
    with Checkpointer(store_path, model=model, every_n_steps=10,
                      async_save=async_save) as ck:
        for s in range(1, 31):
            ck.step(s)
    with Checkpointer(store_path, model=small_model(1), every_n_steps=10,
                      async_save=async_save) as ck:
        assert ck.resume(step=10) == 10
        assert ck.store.steps() == [10, 20, 30]
        with pytest.raises(StepExistsError, match="discard_newer=True"):
            for s in range(11, 21):
                ck.step(s)
    replay = small_model(2)
    with Checkpointer(store_path, model=replay, every_n_steps=10,
                      async_save=async_save) as ck:
        assert ck.resume(step=10, discard_newer=True) == 10
        assert ck.store.steps() == [10]
        with torch.no_grad():
            replay[0].weight.add_(1.0)
        for s in range(11, 21):
            ck.step(s)
        ck.wait()
        assert ck.store.steps() == [10, 20]
        assert bits_equal(ck.store.load(20)["model"], dict(replay.state_dict()))
        assert ck.store.verify().ok


@pytest.mark.parametrize("async_save", [False, True])
def test_after_a_rollback_keep_last_keeps_this_runs_checkpoints(store_path, async_save):
    """Resumed from step 30 with steps 70 and 80 kept: keep_last=2 counts this run's
    steps, not the abandoned newer ones (which it neither counts nor deletes)."""
    with Checkpointer(store_path, model=small_model(0), every_n_steps=10) as ck:
        for s in (30, 70, 80):
            ck.save(s)
    with Checkpointer(store_path, model=small_model(1), every_n_steps=10, keep_last=2,
                      keep_best=("val", "min", 1), async_save=async_save) as ck:
        assert ck.resume(step=30) == 30
        for s in range(31, 61):
            ck.step(s, metrics={"val": 1.0 / s} if s % 10 == 0 else None)
        ck.wait()
        assert ck.store.steps() == [50, 60, 70, 80]
    # keep-best alone never saves over a step the abandoned run holds (only a scheduled
    # save there stops the run, with the way out in its message)
    with Checkpointer(store_path, model=small_model(1), every_n_steps=25, keep_last=2,
                      keep_best=("val", "min", 1), async_save=async_save) as ck:
        assert ck.resume(step=60) == 60
        for s in range(61, 91):
            ck.step(s, metrics={"val": 1e-6 / s})  # every step a new best
        ck.wait()
        assert {70, 80} <= set(ck.store.steps()) and 90 in ck.store.steps()


def test_resume_missing_extra_is_an_error_unless_not_strict(store_path):
    with Checkpointer(store_path, model=small_model()) as ck:
        ck.save(1)
    with Checkpointer(store_path, model=small_model()) as ck:
        ck.register("new", {})
        with pytest.raises(ValueError, match="'new'"):
            ck.resume()
        with pytest.warns(UserWarning, match="'new'"):
            assert ck.resume(strict=False) == 1


def test_register_rejects_what_it_cannot_restore(store_path):
    with Checkpointer(store_path) as ck:
        with pytest.raises(TypeError):
            ck.register("x", 3)
        with pytest.raises(TypeError):
            ck.register("x", getter=lambda: 1)
        with pytest.raises(TypeError):
            ck.register("x", {}, getter=lambda: 1, setter=print)
        ck.register("x", {})
        with pytest.raises(ValueError):
            ck.register("x", [])


def test_rng_capture_restore_roundtrip_through_store(store):
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    np.random.randn()  # leaves a cached gaussian in the numpy state
    random.gauss(0, 1)
    store.save({"rng": capture_rng()}, 1)
    expect = (torch.rand(4), random.random(), random.gauss(0, 1), np.random.randn(3))
    torch.manual_seed(2)
    random.seed(2)
    np.random.seed(2)
    restore_rng(store.load(1)["rng"])
    got = (torch.rand(4), random.random(), random.gauss(0, 1), np.random.randn(3))
    assert bits_equal(got, expect)


# -- async: isolation, back-pressure, failures ----------------------------------------------


def test_async_save_is_isolated_from_later_updates():
    backend = FlakyBackend(delay=0.3)
    model = small_model()
    with Checkpointer(backend, model=model) as ck:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        ck.save(1)
        assert ck.in_flight
        assert ck.records[0].blocked_s < 0.2  # the caller did not wait for the write
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # training goes on while the save runs
        ck.wait()
        assert bits_equal(dict(ck.store.load(1)["model"]), before)
        assert ck.records[0].save_s >= 0.3


def test_back_pressure_never_two_in_flight():
    backend = FlakyBackend(delay=0.1)
    model = small_model()
    spans: list[tuple[float, float]] = []
    active, peak = [0], [0]
    lock = threading.Lock()
    with Checkpointer(backend, model=model) as ck:
        real_save = ck.store.save

        def tracked_save(*a, **kw):
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            t0 = time.perf_counter()
            try:
                return real_save(*a, **kw)
            finally:
                spans.append((t0, time.perf_counter()))
                with lock:
                    active[0] -= 1

        ck.store.save = tracked_save
        returns = []
        for s in range(1, 5):
            ck.save(s)
            returns.append(time.perf_counter())
        ck.wait()
        assert ck.store.steps() == [1, 2, 3, 4]
    assert peak[0] == 1
    for i in range(1, 4):  # save i+1 returned only after save i had finished
        assert returns[i] >= spans[i - 1][1]
        assert spans[i][0] >= spans[i - 1][1]
    assert ck.records[0].wait_s < 0.05
    assert all(r.wait_s > 0.05 for r in ck.records[1:])


FAILURES = [
    ("crash_point", "save:after-flatten"),
    ("crash_point", "save:after-hash"),  # hashing done
    ("encode", None),
    ("crash_point", "save:mid-write"),
    ("backend", "write"),
    ("backend", "commit"),  # pack commit (fsync + rename)
    ("backend", "sync"),  # fsync of the directory
    ("crash_point", "save:after-packs"),
    ("backend", "put"),  # the manifest
    ("crash_point", "save:after-manifest"),
    ("crash_point", "save:before-commit"),  # inside the index transaction
]


def _arm(monkeypatch, backend, kind, where):
    if kind == "backend":
        backend.fail.add(where)
    elif kind == "encode":
        real = store_mod._encode_block

        def failing(*a, **kw):
            raise Injected("injected encode failure")

        monkeypatch.setattr(store_mod, "_encode_block", failing)
        return lambda: monkeypatch.setattr(store_mod, "_encode_block", real)
    else:
        real = store_mod.crash_point

        def failing(name):
            if name == where:
                raise Injected(f"injected failure at {name}")

        monkeypatch.setattr(store_mod, "crash_point", failing)
        return lambda: monkeypatch.setattr(store_mod, "crash_point", real)
    return lambda: backend.fail.discard(where)


@pytest.mark.parametrize("kind,where", FAILURES, ids=[f"{k}-{w}" for k, w in FAILURES])
def test_background_failure_surfaces_and_is_not_visible(monkeypatch, kind, where):
    backend = FlakyBackend()
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ck = Checkpointer(backend, model=model, optimizer=opt, keep_last=2)
    ck.save(1)
    ck.wait()
    train_step(model, opt)
    disarm = _arm(monkeypatch, backend, kind, where)
    ck.save(2)
    with pytest.raises(BackgroundSaveError, match="step 2 failed.*not committed") as info:
        ck.wait()
    assert isinstance(info.value.__cause__, Injected)
    assert ck.records[-1].error is info.value.__cause__ and not ck.records[-1].committed
    ck.wait()  # raised once, then cleared
    assert ck.store.steps() == [1]
    assert 2 not in ck.store
    assert ck.store.verify().ok
    disarm()
    # the next save works, the failed step can be saved again, everything loads exactly
    train_step(model, opt)
    expect = {k: v.clone() for k, v in model.state_dict().items()}
    assert ck.step(2, metrics=None) is False  # not due (no every_n_steps)
    ck.save(2)
    ck.save(3)
    ck.wait()
    assert ck.store.steps() == [2, 3]
    assert bits_equal(dict(ck.store.load(3)["model"]), expect)
    assert ck.store.verify().ok
    ck.store.gc()  # the failed attempt's leftovers go
    assert ck.store.verify().ok
    ck.close()


def _fail_next_save(ck, monkeypatch):
    monkeypatch.setattr(ck.store, "save", lambda *a, **k: (_ for _ in ()).throw(Injected("x")))


@pytest.mark.parametrize("surface", ["step", "step-due", "save", "wait", "close", "best_step"])
def test_background_failure_surfaces_at_next_call(monkeypatch, surface):
    ck = Checkpointer(MemoryBackend(), model=small_model(), every_n_steps=10)
    _fail_next_save(ck, monkeypatch)
    ck.save(1)
    while ck.in_flight:
        time.sleep(0.005)
    monkeypatch.undo()
    call = {
        "step": lambda: ck.step(3),
        "step-due": lambda: ck.step(10),
        "save": lambda: ck.save(4),
        "wait": ck.wait,
        "close": ck.close,
        "best_step": lambda: ck.best_step("loss"),
    }[surface]
    with pytest.raises(BackgroundSaveError) as info:
        call()
    assert isinstance(info.value.__cause__, Injected)
    if surface != "close":
        assert ck.store.steps() == []  # the raising call did not save either
        ck.save(5)
        ck.wait()
        assert ck.store.steps() == [5]
    ck.close()


def test_retention_failure_surfaces_but_step_is_committed(monkeypatch):
    ck = Checkpointer(MemoryBackend(), model=small_model(), keep_last=1)
    ck.save(1)
    ck.wait()

    def broken_delete(step):
        raise Injected("delete failed")

    monkeypatch.setattr(ck.store, "delete", broken_delete)
    ck.save(2)
    with pytest.raises(BackgroundSaveError, match="step 2 was saved") as info:
        ck.wait()
    assert isinstance(info.value.__cause__, Injected)
    assert ck.store.steps() == [1, 2]
    monkeypatch.undo()
    ck.save(3)
    ck.wait()
    assert ck.store.steps() == [3]
    ck.close()


def test_sync_mode_raises_directly(monkeypatch):
    ck = Checkpointer(MemoryBackend(), model=small_model(), async_save=False)
    _fail_next_save(ck, monkeypatch)
    with pytest.raises(Injected):
        ck.save(1)
    monkeypatch.undo()
    ck.save(1)
    assert ck.store.steps() == [1]
    assert ck.records[-1].blocked_s >= ck.records[-1].save_s
    ck.close()


def test_context_manager_waits_and_closes(store_path):
    model = small_model()
    with Checkpointer(store_path, model=model) as ck:
        ck.save(1)
        ck.save(2)
    assert not ck.in_flight
    with pytest.raises(StoreClosedError):
        ck.save(3)
    with pytest.raises(deltackpt.StoreClosedError):
        ck.store.steps()  # a store opened by the checkpointer is closed with it
    ck.close()  # idempotent
    with deltackpt.open(store_path) as store:  # and its writer lock released
        assert store.steps() == [1, 2]
        store.save({"x": 1}, 3)


def test_context_manager_keeps_a_given_store_open():
    store = deltackpt.open("memory://")
    with Checkpointer(store, model=small_model()) as ck:
        ck.save(1)
    assert store.steps() == [1]
    store.close()


def test_context_manager_does_not_mask_the_body_exception(monkeypatch):
    backend = FlakyBackend()
    with pytest.warns(UserWarning, match="background save of step 1 failed"), \
            pytest.raises(KeyError), Checkpointer(backend, model=small_model()) as ck:
        backend.fail.add("put")
        ck.save(1)
        raise KeyError("training crashed")
    # without a body exception, leaving the block raises
    with pytest.raises(BackgroundSaveError), \
            Checkpointer(MemoryBackend(), model=small_model()) as ck:
        _fail_next_save(ck, monkeypatch)
        ck.save(1)


# -- metrics, best ---------------------------------------------------------------------------


def test_best_metric_triggers_saves_and_retention():
    ck = Checkpointer(MemoryBackend(), model=small_model(), every_n_steps=10, keep_last=1,
                      keep_best=("val", "min", 2))
    evals = {3: 5.0, 5: 4.0, 7: 6.0, 9: float("nan"), 12: 4.0, 14: 3.0, 16: 4.5}
    saved = [s for s in range(1, 21)
             if ck.step(s, metrics={"val": torch.tensor(evals[s])} if s in evals else None)]
    ck.wait()
    # 3, 5: fewer than two bests; 7 worse; NaN never; 12 ties 4.0 (newer wins); 14 best;
    # 16 (4.5) is not among the best two {14: 3.0, 12: 4.0}; 10, 20 are due
    assert saved == [3, 5, 10, 12, 14, 20]
    assert ck.best_step("val", "min") == 14
    assert ck.store.steps() == [12, 14, 20]
    assert ck.store.info(14).metrics["val"] == 3.0
    ck.save(21, metrics={"val": float("nan")})  # a NaN metric never makes a save fail
    ck.wait()
    v = ck.store.info(21).metrics["val"]
    assert v == "nan" or math.isnan(v)
    assert ck.best_step("val", "min") == 14
    ck.close()


def test_keep_full_last_thins_older_checkpoints():
    model = small_model()
    opt = torch.optim.Adam(model.parameters())
    ck = Checkpointer(MemoryBackend(), model=model, optimizer=opt, every_n_steps=2,
                      keep_last=3, keep_every=4, keep_full_last=1)
    for s in range(1, 11):
        train_step(model, opt)
        ck.step(s)
    ck.wait()
    assert ck.store.steps() == [4, 6, 8, 10]
    for s in (4, 6, 8):
        assert set(ck.store.load(s)) == {"model"}
    assert set(ck.store.load(10)) == {"model", "optimizer", "rng", "extra", "step"}
    assert [r.thinned for r in ck.records] == [[], [2], [4], [6], [8]]
    assert [r.deleted for r in ck.records] == [[], [], [], [2], []]
    ck.close()


# -- snapshots ------------------------------------------------------------------------------


def test_snapshot_reuses_buffers_and_shares_aliases():
    lin = torch.nn.Linear(8, 8)
    state = {"w": lin.weight, "tied": lin.weight, "b": lin.bias.detach(), "arr": np.arange(5.0),
             "t": (1, 2.5, "x", None, b"raw", torch.Size([2]), torch.float16, np.float32(3)),
             "od": torch.nn.Linear(2, 2).state_dict(), "empty": torch.empty(0, 3)}
    snap = HostSnapshot()
    a = snap.take(state)
    assert type(a["w"]) is torch.nn.Parameter and a["w"].requires_grad
    assert a["tied"].data_ptr() == a["w"].data_ptr() != lin.weight.data_ptr()
    assert bits_equal(a["t"], state["t"]) and a["od"]._metadata == state["od"]._metadata
    assert type(a["od"]) is type(state["od"])
    ptrs = {k: a[k].data_ptr() for k in ("w", "b")}
    arr_buf = a["arr"]
    with torch.no_grad():
        lin.weight.add_(1)
    state["arr"][0] = 42
    b = snap.take(state)
    assert {k: b[k].data_ptr() for k in ("w", "b")} == ptrs  # the same buffers, refilled
    assert b["arr"] is arr_buf and b["arr"][0] == 42
    assert bits_equal(b["w"].detach(), lin.weight.detach())
    expected = sum(t.numel() * t.element_size() for t in (lin.weight, lin.bias)) + 5 * 8
    assert snap.nbytes == expected + 2 * 2 * 4 + 2 * 4
    state.pop("arr")
    snap.take(state)
    assert snap.nbytes == expected - 5 * 8 + 2 * 2 * 4 + 2 * 4  # unused buffers dropped


def test_snapshot_copies_strided_and_conjugate_views():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    c = torch.randn(5, dtype=torch.complex64)
    state = {"t": base.t(), "slice": base[:, 1], "conj": c.conj(), "neg": c.conj().imag,
             "bool": torch.tensor([True, False]), "bf16": torch.randn(3).bfloat16()}
    out = HostSnapshot().take(state)
    for k, v in state.items():
        assert torch.equal(out[k], v.resolve_conj().resolve_neg()), k
        assert out[k].is_contiguous() and not out[k].is_conj()


def test_snapshot_keeps_parameters_and_requires_grad_and_reuses_its_buffers():
    g = torch.randn(4).requires_grad_(True)
    state = {"p": torch.nn.Parameter(torch.randn(3)), "g": g, "t": torch.randn(2)}
    snap = HostSnapshot()
    first = snap.take(state)
    with torch.no_grad():
        g.add_(1.0)
    second = snap.take(state)  # the copy into a reused buffer must not trip autograd
    assert torch.equal(second["g"].detach(), g.detach())
    assert second["g"].untyped_storage().data_ptr() == first["g"].untyped_storage().data_ptr()
    for k, v in state.items():
        assert type(second[k]) is type(v) and second[k].requires_grad == v.requires_grad, k
        assert second[k].is_leaf, k


def test_snapshot_rejects_unstorable_values():
    snap = HostSnapshot()
    with pytest.raises(UnsupportedValueError, match="'a/0'"):
        snap.take({"a": [object()]})
    with pytest.raises(UnsupportedValueError, match="keys must be str or int"):
        snap.take({1.5: 1})
    with pytest.raises(UnsupportedValueError, match="layout"):
        snap.take({"s": torch.eye(2).to_sparse()})
    with pytest.raises(UnsupportedValueError):
        snap.take({"o": np.array([object()])})


def _tensor_with(name: str, value) -> torch.Tensor:
    t = torch.ones(2)
    setattr(t, name, value)
    return t


@pytest.mark.parametrize("bad,match", [
    ({"u": np.array(["text"])}, "numpy dtype <U4"),
    ({"dt": torch.qint8}, "dtype torch.qint8"),
    ({1: torch.ones(1), "1": torch.zeros(1)}, "same path"),
    ({"k": {10**5000: 1}}, "4300 digits"),
    ({"t": _tensor_with("extra", torch.ones(1))}, "extra/t@extra'"),
    ({"t": _tensor_with("size", 3)}, "'size' would shadow"),
], ids=["numpy-str", "quantized-dtype", "colliding-paths", "huge-int-key", "tensor-attribute",
        "shadowing-attribute"])
def test_async_saves_refuse_what_the_store_refuses_in_the_caller(store_path, bad, match):
    """Everything store.save refuses, an async Checkpointer.save refuses in the caller's
    thread (not later, from the background, as BackgroundSaveError)."""
    with deltackpt.open("memory://") as mem, pytest.raises(UnsupportedValueError, match=match):
        mem.save({"extra": bad}, 0)
    with Checkpointer(store_path, async_save=True) as ck:
        ck.register("extra", getter=lambda: bad, setter=lambda v: None)
        with pytest.raises(UnsupportedValueError, match=match):
            ck.save(1)
        assert not ck.in_flight and ck.records == []
        ck.wait()
        assert ck.store.steps() == []


def _od_with(**attrs):
    od = collections.OrderedDict(a=torch.ones(1))
    od._metadata = {"": {"version": 1}}
    for k, v in attrs.items():
        setattr(od, k, v)
    return od


def _counter_with_attr():
    c = collections.Counter({3: 1})
    c.note = "x"
    return c


_VERDICT_CASES = {
    "plain": {"w": torch.ones(2), "n": 3, "s": "x", "b": b"ab", "l": [1.5, None]},
    "numpy-str": {"u": np.array(["text"])},
    "numpy-datetime": {"d": np.array(["2020-01-01"], dtype="M8[D]")},
    "numpy-longdouble": {"d": np.zeros(2, dtype=np.longdouble)},
    "numpy-record": {"r": np.zeros(2, dtype=[("a", "<i4")])},
    "numpy-ok": {"a": np.arange(3, dtype=">f8"), "s": np.float32(1.5)},
    "quantized-dtype-value": {"dt": torch.qint8},
    "dtype-value": {"dt": torch.bfloat16},
    "bits8-tensor": {"t": torch.zeros(2, dtype=torch.bits8)},
    "int-str-collision": {1: torch.ones(1), "1": torch.zeros(1)},
    "bytes-collision": {1: b"x", "1": b"y"},
    "huge-int-key": {"k": {10**4300: 1}},
    "big-int-key": {"k": {10**4299: 1}},
    "tensor-attribute": {"t": _tensor_with("extra", torch.ones(1))},
    "array-attribute": {"t": _tensor_with("extra", [np.zeros(1)])},
    "bytes-attribute": {"t": _tensor_with("extra", {"k": b"x"})},
    "shadowing-attribute": {"t": _tensor_with("size", 3)},
    "dunder-attribute": {"t": _tensor_with("__array_interface__", {"shape": (1,)})},
    "is-param-attribute": {"t": _tensor_with("_is_param", True)},
    "plain-attribute": {"t": _tensor_with("_is_hf_initialized", True)},
    "ordereddict-metadata": {"m": _od_with()},
    "ordereddict-attribute": {"m": _od_with(extra=1)},
    "counter-attribute": {"c": _counter_with_attr()},
    "object": {"o": object()},
    "sparse": {"s": torch.eye(2).to_sparse()},
}


@pytest.mark.parametrize("name", sorted(_VERDICT_CASES))
def test_snapshot_and_store_give_the_same_verdict(name):
    """An async save refuses exactly what store.save refuses, with the same message: the
    snapshot makes flatten's checks during its copy instead of flattening again."""
    from deltackpt.flatten import flatten

    state = {"extra": _VERDICT_CASES[name]}
    verdicts = []
    for check in (flatten, HostSnapshot().take):
        try:
            check(state)
            verdicts.append(None)
        except UnsupportedValueError as exc:
            verdicts.append(str(exc))
    assert verdicts[0] == verdicts[1]
    assert (verdicts[0] is None) == (name in ("plain", "numpy-ok", "dtype-value", "big-int-key",
                                              "plain-attribute", "ordereddict-metadata"))


def test_snapshot_keeps_python_attributes_off_its_reused_buffers():
    t = torch.randn(3)
    t.persistent = False
    snap = HostSnapshot()
    first = snap.take({"t": t})
    assert first["t"].__dict__ == {"persistent": False}
    t.persistent = True
    assert first["t"].persistent is False  # a copy, taken at snapshot time
    second = snap.take({"t": torch.randn(3)})  # same path, no attributes
    assert second["t"].untyped_storage().data_ptr() == first["t"].untyped_storage().data_ptr()
    assert second["t"].__dict__ == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_snapshot_of_cuda_tensors_is_pinned_and_complete():  # pragma: no cover - GPU only
    t = torch.randn(1 << 20, device="cuda")
    out = HostSnapshot().take({"t": t})
    assert out["t"].is_pinned() and out["t"].device.type == "cpu"
    assert torch.equal(out["t"], t.cpu())


def test_memory_is_reused_over_many_async_saves(tmp_path):
    """RSS after 200 async saves stays close to RSS after 10 (buffers are reused)."""
    psutil = pytest.importorskip("psutil")
    proc = psutil.Process()
    model = small_model(width=512)  # ~40k params; with Adam state ~0.5 MB per save
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rss = {}
    with Checkpointer(str(tmp_path / "s"), model=model, optimizer=opt, keep_last=2,
                      store_options={"fsync": False}) as ck:
        for s in range(1, 201):
            train_step(model, opt)
            ck.save(s)
            if s in (10, 200):
                ck.wait()
                rss[s] = proc.memory_info().rss
        assert ck.store.steps() == [199, 200]
    assert rss[200] <= rss[10] * 1.10 + (8 << 20), rss


# -- crash during retention ------------------------------------------------------------------

CRASH_CHILD = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from deltackpt.checkpointer import Checkpointer
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256)
    opt = torch.optim.Adam(model.parameters())
    with Checkpointer({path!r}, model=model, optimizer=opt, every_n_steps=1, keep_last=2,
                      keep_best=("loss", "min", 1), keep_full_last=1) as ck:
        for s in range(1, 9):
            loss = model(torch.randn(4, 256)).pow(2).mean()
            opt.zero_grad(); loss.backward(); opt.step()
            ck.step(s, metrics={{"loss": 10.0 if s != 3 else 0.0}})
    print("finished")
""")


@pytest.mark.parametrize("point", ["delete:after-commit:2", "gc:mid-delete",
                                   "gc:after-repack-commit"])
def test_crash_during_retention_leaves_a_consistent_store(store_path, point):
    env = dict(os.environ, DELTACKPT_CRASH_AT=point)
    proc = subprocess.run([sys.executable, "-c", CRASH_CHILD.format(path=store_path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == CRASH_EXIT_CODE, proc.stdout + proc.stderr
    model = torch.nn.Linear(256, 256)
    opt = torch.optim.Adam(model.parameters())
    with deltackpt.open(store_path) as store:
        assert store.verify().ok
        steps = store.steps()
        for s in steps:
            store.load(s)
    with Checkpointer(store_path, model=model, optimizer=opt, every_n_steps=1, keep_last=2,
                      keep_best=("loss", "min", 1), keep_full_last=1) as ck:
        start = ck.resume()
        assert start == max(steps) and start >= 2
        ck.step(start + 1, metrics={"loss": 10.0})
        ck.wait()
        steps = ck.store.steps()
        assert steps[-2:] == [start, start + 1]
        if start >= 3:
            assert 3 in steps  # the best (loss 0.0) survives
        # retention reached its fixed point: nothing left to delete or thin
        assert ck.retention.plan(ck.store.log()).keep == steps
        for s in steps[:-1]:
            assert set(ck.store.load(s)) == {"model"}
        assert ck.store.verify().ok
        again = ck.store.gc(repack_threshold=0.0)
        assert again.objects_deleted == 0 and again.bytes_freed == 0


@pytest.mark.parametrize("async_save", [False, True])
def test_saves_from_two_threads_take_turns(store_path, async_save):
    """Found in review: two threads saving through one Checkpointer overwrote each other's
    host snapshot while a background save still encoded it (steps that failed to load or
    held the other thread's values)."""
    ck = Checkpointer(store_path, model=small_model(0), async_save=async_save)
    live_state = ck.state

    def state_with_step(step):  # every save carries its own step number in its bytes
        state = live_state(step)
        state["extra"]["v"] = torch.full((4096,), float(step))
        return state

    ck.state = state_with_step
    per_thread = {1: [100 + i for i in range(6)], 2: [200 + i for i in range(6)]}
    barrier = threading.Barrier(2)

    def run(tid: int) -> None:
        barrier.wait()
        for step in per_thread[tid]:
            ck.save(step)

    threads = [threading.Thread(target=run, args=(t,)) for t in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ck.close()
    with deltackpt.open(store_path) as s:
        assert s.steps() == sorted(per_thread[1] + per_thread[2])
        for step in s.steps():
            assert torch.equal(s.load(step)["extra"]["v"], torch.full((4096,), float(step)))
        assert s.verify().ok


def test_multistep_and_sequential_schedulers_resume(store_path):
    """MultiStepLR keeps its milestones in a collections.Counter (format §12.1 'C')."""
    def make():
        model = small_model(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        warm = torch.optim.lr_scheduler.LinearLR(opt, 0.5, total_iters=2)
        multi = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[3, 5, 5], gamma=0.5)
        return model, opt, torch.optim.lr_scheduler.SequentialLR(opt, [warm, multi], [2])

    model, opt, sched = make()
    with Checkpointer(store_path, model=model, optimizer=opt, scheduler=sched) as ck:
        for _ in range(4):
            train_step(model, opt, sched)
        ck.save(4)
        expect = sched.state_dict()
        lrs = []
        for _ in range(4):
            train_step(model, opt, sched)
            lrs.append(opt.param_groups[0]["lr"])
    model2, opt2, sched2 = make()
    with Checkpointer(store_path, model=model2, optimizer=opt2, scheduler=sched2) as ck:
        assert ck.resume() == 4
        assert sched2.state_dict() == expect
        milestones = sched2.state_dict()["_schedulers"][1]["milestones"]
        assert type(milestones) is collections.Counter and milestones[5] == 2
        again = []
        for _ in range(4):
            train_step(model2, opt2, sched2)
            again.append(opt2.param_groups[0]["lr"])
    assert again == lrs


def test_an_extra_registered_after_resume_gets_its_state(store_path):
    with Checkpointer(store_path, model=small_model(0)) as ck:
        ck.register("counter", {"n": 77})
        ck.save(1)
    with Checkpointer(store_path, model=small_model(0)) as ck:
        assert ck.resume() == 1
        late = ck.register("counter", {"n": 0})
        assert late == {"n": 77}
        with pytest.warns(UserWarning, match="'other' was registered after resume"):
            ck.register("other", {"m": 1})


@pytest.mark.parametrize("bad", [{"s": np.str_("x")}, {"\ud800": 1}],
                         ids=["numpy str scalar", "lone surrogate key"])
def test_async_saves_refuse_what_the_store_cannot_hold_in_the_caller(store_path, bad):
    with Checkpointer(store_path, model=small_model(0), async_save=True) as ck:
        ck.register("bad", getter=lambda: bad, setter=lambda v: None)
        with pytest.raises(UnsupportedValueError):
            ck.save(1)
        assert not ck.in_flight and ck.store.steps() == []


def test_a_failed_background_save_no_longer_ranks_as_best(store_path):
    """keep_best counts the save in flight as committed; once it failed (and the failure
    surfaced through step()), a later step better than everything committed is saved."""
    ck = Checkpointer(store_path, model=small_model(), keep_best=("val", "min", 1),
                      async_save=True, rng=False)
    with ck:
        assert ck.step(1, metrics={"val": 0.5})
        ck.wait()
        real_save = ck.store.save

        def failing_once(*a, **k):
            ck.store.save = real_save
            raise OSError(28, "No space left on device")

        ck.store.save = failing_once
        assert ck.step(2, metrics={"val": 0.1})  # a new best, fails in the background
        while ck.in_flight:
            time.sleep(0.01)
        with pytest.raises(BackgroundSaveError, match="step 2"):
            ck.step(3, metrics={"val": 0.9})
        assert ck.step(4, metrics={"val": 0.2})  # beats 0.5, the best committed value
        ck.wait()
        assert ck.store.steps() == [4] and ck.store.best("val") == 4  # 1 pruned: k=1


def test_metrics_that_are_not_one_number_name_the_metric(store_path):
    with deltackpt.open("memory://") as mem:
        for bad in (torch.tensor([0.1, 0.2]), np.array([0.1, 0.2])):
            with pytest.raises(TypeError, match="metric 'val' must be a single number"):
                mem.save({"w": torch.ones(1)}, 1, metrics={"val": bad})
        mem.save({"w": torch.ones(1)}, 1, metrics={"val": torch.tensor([0.25]),
                                                   "acc": np.float32(0.5)})
        assert mem.info(1).metrics == {"val": 0.25, "acc": 0.5}
    with Checkpointer(store_path, model=small_model()) as ck, \
            pytest.raises(TypeError, match="metric 'val' must be a single number"):
        ck.step(1, metrics={"val": torch.tensor([0.1, 0.2])})


def test_wait_from_another_thread_never_lets_a_save_overwrite_buffers_in_use(store_path):
    """One thread saves asynchronously while another calls wait() in a loop: wait() must
    not take the next save's future for the one it waited on (the save after it would then
    snapshot into host buffers a background save still encodes: damaged or wrong steps)."""
    import sys

    def weights(step: int) -> torch.Tensor:
        return torch.randn(16 * 1024, generator=torch.Generator().manual_seed(step))

    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.zeros(16 * 1024), requires_grad=False)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: the race shows in a few saves
    try:
        ck = Checkpointer(store_path, model=model, rng=False,
                          store_options={"block_size": 4096, "fsync": False})
        stop = threading.Event()
        errors: list[BaseException] = []

        def saver() -> None:
            try:
                for step in range(1, 101):
                    model.w.data.copy_(weights(step))
                    ck.save(step)
                    model.w.data.fill_(-1.0)  # training goes on
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
            finally:
                stop.set()

        def waiter() -> None:
            while not stop.is_set():
                ck.wait()

        threads = [threading.Thread(target=saver), threading.Thread(target=waiter)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        ck.close()
    finally:
        sys.setswitchinterval(old)
    assert not errors
    with deltackpt.open(store_path) as s:
        assert s.steps() == list(range(1, 101))
        for step in s.steps():
            assert torch.equal(s.load(step)["model"]["w"].view(torch.int32),
                               weights(step).view(torch.int32)), step
        assert s.verify().ok


@pytest.mark.parametrize("call", ["wait", "best_step", "step", "close"])
def test_an_on_saved_callback_calling_back_is_refused_not_a_deadlock(store_path, call):
    """on_saved runs in the background save: calling wait()/step()/close() there would wait
    for that very save. It is refused, and the refusal surfaces at the next call."""
    holder: dict = {}

    def on_saved(record):
        ck = holder["ck"]
        {"wait": ck.wait, "best_step": lambda: ck.best_step("val"),
         "step": lambda: ck.step(record.step + 1), "close": ck.close}[call]()

    done = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            ck = Checkpointer(store_path, model=small_model(), async_save=True,
                              on_saved=on_saved)
            holder["ck"] = ck
            ck.save(1)
            with pytest.raises(BackgroundSaveError, match=f"{call}\\(\\) called from its own"):
                ck.wait()
            ck.close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            done.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert done.wait(60), "deadlock"
    assert not errors, errors
