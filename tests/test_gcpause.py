"""gcpause: no automatic collections inside a pause; the threshold comes back after the last
one; the collector's on/off switch and thresholds set by others are left alone."""

from __future__ import annotations

import gc
import os
import threading
import uuid

import pytest
import torch.distributed.checkpoint as dcp
from helpers import det_floats

from deltackpt import gcpause
from deltackpt.dcp import StorageWriter
from deltackpt.gcpause import HELD_THRESHOLD, gc_paused
from deltackpt.store import Store

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(autouse=True)
def _collector_restored():
    was, threshold = gc.isenabled(), gc.get_threshold()
    gc.enable()
    yield
    gc.set_threshold(*threshold)
    (gc.enable if was else gc.disable)()


def _collections_while_allocating() -> int:
    runs = []

    def count(phase: str, info: dict) -> None:
        if phase == "start":
            runs.append(info["generation"])

    gc.callbacks.append(count)
    try:
        keep = [[i] for i in range(20_000)]  # tracked containers: each counts towards a collection
        del keep
    finally:
        gc.callbacks.remove(count)
    return len(runs)


def test_no_collection_inside_and_the_threshold_back_after_also_after_an_error():
    before = gc.get_threshold()
    assert _collections_while_allocating() > 0
    with gc_paused():
        assert gc.get_threshold()[0] == HELD_THRESHOLD
        assert _collections_while_allocating() == 0
    assert gc.get_threshold() == before
    assert _collections_while_allocating() > 0
    with pytest.raises(ValueError), gc_paused():
        raise ValueError("x")
    assert gc.get_threshold() == before and gc.isenabled()


def test_what_others_set_during_a_pause_is_kept():
    with gc_paused():
        gc.disable()                      # a program that manages its collections itself
    assert not gc.isenabled()
    gc.enable()
    with gc_paused():
        gc.set_threshold(5000, 20, 20)    # someone tuned the collector meanwhile
    assert gc.get_threshold() == (5000, 20, 20)


def test_overlapping_pauses_on_threads_restore_after_the_last():
    before = gc.get_threshold()
    inside, release = threading.Event(), threading.Event()

    def other():
        with gc_paused():
            inside.set()
            release.wait(10)

    t = threading.Thread(target=other)
    with gc_paused():
        t.start()
        assert inside.wait(10)
    assert gc.get_threshold()[0] == HELD_THRESHOLD   # the other thread's pause still runs
    release.set()
    t.join(10)
    assert gc.get_threshold() == before


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork beside threads, 3.12+
def test_a_child_forked_during_a_pause_starts_with_the_old_threshold():
    before = gc.get_threshold()
    r, w = os.pipe()
    with gc_paused():
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through the pipe
            ok = gc.get_threshold() == before and gcpause._depth == 0
            with gc_paused():
                ok = ok and gc.get_threshold()[0] == HELD_THRESHOLD
            ok = ok and gc.get_threshold() == before
            os.write(w, b"1" if ok else b"0")
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    assert os.read(r, 1) == b"1"
    os.close(r)
    assert gc.get_threshold() == before


@pytest.mark.parametrize("where", ["local", "remote"])
def test_dcp_writer_encodes_and_commits_paused_on_a_local_store(store_path, monkeypatch, where):
    """Paused around a local store's work; not around object storage, whose uploads may
    retry for minutes."""
    target, opts = store_path, {}
    if where == "remote":
        pytest.importorskip("fsspec")
        target = f"fsspec+memory://gcpause/{uuid.uuid4().hex}"
        opts = {"cache_dir": f"{store_path}-cache"}
    seen = {}
    for name in ("_write_new_blocks", "commit_external"):
        real = getattr(Store, name)

        def spy(self, *a, _real=real, _name=name, **k):
            seen[_name] = gc.get_threshold()[0] == HELD_THRESHOLD
            return _real(self, *a, **k)

        monkeypatch.setattr(Store, name, spy)
    before = gc.get_threshold()
    with StorageWriter(target, step=1, threads=1, **opts) as w:
        dcp.save({"w": det_floats((64, 64), 1)}, storage_writer=w, no_dist=True)
    paused = where == "local"
    assert seen == {"_write_new_blocks": paused, "commit_external": paused}
    assert gc.get_threshold() == before and gc.isenabled()
