"""gcpause: the collector is off inside a pause, back after the last one, and left off
when it was off before."""

from __future__ import annotations

import gc
import threading
import uuid

import pytest
import torch.distributed.checkpoint as dcp
from helpers import det_floats

from deltackpt.dcp import StorageWriter
from deltackpt.gcpause import gc_paused
from deltackpt.store import Store

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(autouse=True)
def _collector_restored():
    was = gc.isenabled()
    yield
    (gc.enable if was else gc.disable)()


def test_pause_restores_the_collector_also_after_an_error():
    gc.enable()
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(ValueError), gc_paused():
        raise ValueError("x")
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off():
    gc.disable()
    with gc_paused():
        pass
    assert not gc.isenabled()


def test_overlapping_pauses_on_threads_enable_after_the_last():
    gc.enable()
    inside, release = threading.Event(), threading.Event()

    def other():
        with gc_paused():
            inside.set()
            release.wait(10)

    t = threading.Thread(target=other)
    with gc_paused():
        t.start()
        assert inside.wait(10)
    assert not gc.isenabled()          # the other thread's pause still runs
    release.set()
    t.join(10)
    assert gc.isenabled()


@pytest.mark.parametrize("where", ["local", "remote"])
def test_dcp_writer_encodes_and_commits_with_the_collector_off(store_path, monkeypatch, where):
    """Off around a local store's work; on around object storage, whose uploads may retry
    for minutes."""
    target, opts = store_path, {}
    if where == "remote":
        pytest.importorskip("fsspec")
        target = f"fsspec+memory://gcpause/{uuid.uuid4().hex}"
        opts = {"cache_dir": f"{store_path}-cache"}
    seen = {}
    for name in ("_write_new_blocks", "commit_external"):
        real = getattr(Store, name)

        def spy(self, *a, _real=real, _name=name, **k):
            seen[_name] = gc.isenabled()
            return _real(self, *a, **k)

        monkeypatch.setattr(Store, name, spy)
    gc.enable()
    with StorageWriter(target, step=1, threads=1, **opts) as w:
        dcp.save({"w": det_floats((64, 64), 1)}, storage_writer=w, no_dist=True)
    paused = where == "local"
    assert seen == {"_write_new_blocks": not paused, "commit_external": not paused}
    assert gc.isenabled()
