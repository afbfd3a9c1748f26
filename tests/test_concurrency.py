"""Readers beside a writer, two writers, a killed lock holder, gc beside save.

A reader process restores the latest and random older steps while the writer saves,
deletes (retention) and collects garbage: every read is bit-exact or a clean
``StepNotFoundError`` -- never a torn step, never "database is locked". Default: ~50 saves;
``-m stress``: 1,000 saves (numbers printed for docs/reliability.md)::

    .venv/bin/python -m pytest -m stress tests/test_concurrency.py -s
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from helpers import assert_state_equal, det_floats, det_tensor

import deltackpt
from deltackpt import KeepLast, RetentionPolicy, StoreLockedError

torch.set_num_threads(1)
TESTS = os.path.dirname(os.path.abspath(__file__))
BS = 4096
#: keep the newest 8 steps, only the newest 4 whole (older ones thinned to "w")
POLICY = RetentionPolicy(rules=(KeepLast(8),), keep_full_last=4, thin_keep=("w",))


def state(step: int) -> dict:
    """What the writer saves as ``step`` (a pure function of it, shared with the reader)."""
    w = det_floats((16 * 1024,), 1)
    w[::61] += step * 1e-3  # every block changes: delta chains the reader must follow
    return {"w": w, "noise": det_tensor(torch.float32, (2048,), step),
            "shared": det_floats((4096,), 5), "step": step}


READER = textwrap.dedent("""
    import json, os, random, sys, time
    sys.path.insert(0, sys.argv[3])
    import torch
    torch.set_num_threads(1)
    import deltackpt
    from helpers import assert_state_equal
    from test_concurrency import state
    path, done = sys.argv[1], sys.argv[2]
    rng = random.Random(0)
    counts = {"exact": 0, "not_found": 0, "failures": []}
    while not os.path.exists(os.path.join(path, "deltackpt.json")):
        time.sleep(0.01)
    time.sleep(0.2)
    with deltackpt.open(path) as s:
        while True:
            finished = os.path.exists(done)
            steps = s.steps()
            picks = ([steps[-1], rng.choice(steps)] if steps else [])
            for step in picks:
                try:
                    out = s.load(step)
                    want = state(step)
                    if list(out) == ["w"]:  # thinned by retention: the model part only
                        want = {"w": want["w"]}
                    assert_state_equal(out, want)
                    counts["exact"] += 1
                except deltackpt.StepNotFoundError:
                    counts["not_found"] += 1
                except BaseException as exc:
                    counts["failures"].append(f"step {step}: {type(exc).__name__}: {exc}")
            if finished:
                break
    print(json.dumps(counts))
""")


def _run_reader_beside_writer(tmp_path, saves: int) -> dict:
    path = os.path.join(tmp_path, "s")
    done = os.path.join(tmp_path, "done")
    reader = subprocess.Popen([sys.executable, "-c", READER, path, done, TESTS],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ops = {"saves": 0, "deletes": 0, "thins": 0, "gcs": 0}
    try:
        with deltackpt.open(path, block_size=BS, threads=1) as s:
            for step in range(1, saves + 1):
                s.save(state(step), step)
                ops["saves"] += 1
                deleted, thinned = s.prune(POLICY)  # delete, thin, then gc
                ops["deletes"] += len(deleted)
                ops["thins"] += len(thinned)
                if step % 5 == 0:
                    s.gc()
                    ops["gcs"] += 1
    finally:
        open(done, "w").close()
        out, err = reader.communicate(timeout=600)
    assert reader.returncode == 0, err[-3000:]
    counts = json.loads(out.strip().splitlines()[-1])
    assert counts["failures"] == [], counts["failures"][:5]
    assert counts["exact"] > 0
    return {**counts, **ops}


def test_reader_beside_writer_with_retention_and_gc(tmp_path):
    r = _run_reader_beside_writer(tmp_path, saves=50)
    assert r["deletes"] == 42 and r["thins"] == 46 and r["gcs"] == 10


@pytest.mark.stress
def test_reader_beside_writer_stress(tmp_path):
    t0 = time.time()
    r = _run_reader_beside_writer(tmp_path, saves=1000)
    print(f"\nreader beside writer: {r['saves']} saves, {r['deletes']} deletes, "
          f"{r['thins']} thins (each prune then gc), {r['gcs']} explicit gcs; "
          f"reads: {r['exact']} bit-exact, {r['not_found']} StepNotFoundError, "
          f"{len(r['failures'])} failures ({time.time() - t0:.0f} s)")


HOLDER = textwrap.dedent("""
    import sys, time
    import deltackpt
    s = deltackpt.open(sys.argv[1])
    s.save({"x": 1}, int(sys.argv[2]))  # the first mutation takes the writer lock
    print("locked", flush=True)
    time.sleep(float(sys.argv[3]))
    s.close()
""")


def _holder(path: str, step: int, hold: float) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, path, str(step), str(hold)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_second_writer_is_refused_or_waits_with_lock_timeout(tmp_path):
    path = os.path.join(tmp_path, "s")
    with deltackpt.open(path) as s:
        s.save({"x": 0}, 0)
    p = _holder(path, 1, 60)
    try:
        with deltackpt.open(path) as s:
            assert_state_equal(s.load(0), {"x": 0})  # readers need no lock
            for call in (lambda: s.save({"x": 2}, 2), lambda: s.delete(0), s.gc):
                with pytest.raises(StoreLockedError, match=f"pid {p.pid}"):
                    call()
    finally:
        p.kill()
        p.wait()
    p = _holder(path, 3, 1.0)
    try:
        with deltackpt.open(path, lock_timeout=120) as s:
            with pytest.raises(StoreLockedError):
                s._lock.acquire(0)  # held right now ...
            s.save({"x": 4}, 4)  # ... so this waits for the holder to close, then proceeds
            assert s.steps() == [0, 1, 3, 4]
    finally:
        p.wait()


def test_a_lock_left_by_a_killed_writer_is_recovered(tmp_path):
    path = os.path.join(tmp_path, "s")
    p = _holder(path, 1, 600)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    with open(os.path.join(path, "lock")) as f:
        assert f"pid {p.pid}" in f.read()  # the file stays; the kernel dropped the flock
    with deltackpt.open(path) as s:
        s.save({"x": 2}, 2)
        s.gc()
        assert s.steps() == [1, 2] and s.verify().ok


def test_gc_needs_the_writer_lock_so_it_cannot_run_beside_another_process_save(tmp_path):
    path = os.path.join(tmp_path, "s")
    with deltackpt.open(path) as s:
        s.save(state(1), 1)
        s.delete(1)  # its blocks are garbage now ...
    p = _holder(path, 2, 60)  # ... while another process is the writer
    try:
        with deltackpt.open(path) as s:
            with pytest.raises(StoreLockedError):
                s.gc()
            before = {r[0] for r in s._index.query("SELECT id FROM blocks")}
        assert before  # nothing was collected
    finally:
        p.kill()
        p.wait()


def test_gc_in_one_thread_never_removes_a_block_a_save_in_another_is_reusing(tmp_path):
    path = os.path.join(tmp_path, "s")
    stop = threading.Event()
    errors = []
    with deltackpt.open(path, block_size=BS, threads=1) as s:
        def collector():
            while not stop.is_set():
                try:
                    s.gc()
                except BaseException as exc:  # noqa: BLE001
                    errors.append(exc)
                    return

        t = threading.Thread(target=collector)
        t.start()
        try:
            for step in range(1, 25):
                # the same content every other step: the save dedups against blocks of a
                # step deleted just before, which the collector is trying to remove
                s.save(state(step % 2), step)
                if step > 1:
                    s.delete(step - 1)
        finally:
            stop.set()
            t.join()
        assert errors == []
        assert s.steps() == [24]
        assert_state_equal(s.load(24), state(0))
        assert s.verify().ok
        s.gc()
        assert_state_equal(s.load(24), state(0))


def test_a_reader_opens_and_loads_while_a_writer_is_inside_a_transaction(tmp_path):
    """Opening writes nothing to an up-to-date index: it cannot queue behind a commit."""
    path = os.path.join(tmp_path, "s")
    with deltackpt.open(path) as s:
        s.save(state(1), 1)
    con = sqlite3.connect(os.path.join(path, "index.sqlite"), isolation_level=None)
    con.execute("BEGIN IMMEDIATE")  # a writer between BEGIN and COMMIT
    con.execute("DELETE FROM steps WHERE step = -1")
    try:
        with deltackpt.open(path) as s:
            assert_state_equal(s.load(1), state(1))
            assert s.verify().ok and s.steps() == [1]
    finally:
        con.execute("ROLLBACK")
        con.close()


def test_a_reader_sees_a_manifest_replaced_by_thin_in_another_store(tmp_path):
    """thin() replaces a manifest in place; a reader that read the old one must not keep
    seeing it (it would contradict the thinned index: found by the stress run above)."""
    path = os.path.join(tmp_path, "s")
    with deltackpt.open(path) as w:
        w.save(state(1), 1)
    with deltackpt.open(path) as reader:
        assert_state_equal(reader.load(1), state(1))
        assert reader.verify().ok
        with deltackpt.open(path) as w:
            w.thin(1, ["w"])
        assert_state_equal(reader.load(1), {"w": state(1)["w"]})
        assert reader.verify().ok


def test_a_store_opened_before_reindex_follows_the_new_index(tmp_path):
    """`deltackpt reindex` renames the old index aside while a reader (which holds no
    lock) has it open: that store must read and commit into the new index, never into
    the old file (a save there was acknowledged, then lost, and a gc planned from it
    deleted steps the new index holds)."""
    from deltackpt.reindex import reindex

    path = tmp_path / "s"
    with deltackpt.open(path) as s:
        s.save(state(1), step=1)
        s.save(state(2), step=2)
    reader = deltackpt.open(path)
    assert reader.steps() == [1, 2]  # open, reading, no lock held
    old = reindex(path).old_index
    assert old and os.path.exists(old)
    reader.save(state(3), step=3)  # acknowledged: must be in the index everyone reads
    assert reader.steps() == [1, 2, 3]
    reader.close()
    with deltackpt.open(path) as s:
        assert s.steps() == [1, 2, 3]
        assert_state_equal(s.load(3), state(3))

    gc_runner = deltackpt.open(path)
    assert gc_runner.steps() == [1, 2, 3]
    reindex(path)
    with deltackpt.open(path) as s:
        s.save(state(4), step=4)  # committed into the new index only
    gc_runner.gc(repack_threshold=0.99)  # must see step 4, not delete its pack
    assert gc_runner.steps() == [1, 2, 3, 4]
    gc_runner.close()
    with deltackpt.open(path) as s:
        for step in (1, 2, 3, 4):
            assert_state_equal(s.load(step), state(step))
        assert s.verify().ok
    # each reindex kept its predecessor aside, also two within one second
    assert len(list(path.glob("index.sqlite.broken-*"))) == 2


def test_verify_beside_a_writer_reports_no_damage_that_a_delete_and_gc_caused(tmp_path,
                                                                                monkeypatch):
    """A step deleted and its pack repacked by another writer while verify reads them is
    not damage: verify checks again from a fresh plan and reports the store healthy; real
    damage found by an undisturbed pass is still reported."""
    import deltackpt.store as store_mod

    path = tmp_path / "s"
    with deltackpt.open(path, block_size=4096) as s:
        for step in range(1, 6):
            s.save(state(step), step=step)
    verifier = deltackpt.open(path)
    real_read = store_mod._read_current
    fired = []

    def read_current(backend, name):
        if not fired:  # the writer strikes after verify planned, before it reads
            fired.append(name)
            with deltackpt.open(path) as writer:
                writer.delete(1)
                writer.delete(2)
                writer.gc(repack_threshold=0.99)
        return real_read(backend, name)

    monkeypatch.setattr(store_mod, "_read_current", read_current)
    result = verifier.verify()
    assert fired and result.ok, result.problems
    assert result.steps_checked == 3
    monkeypatch.setattr(store_mod, "_read_current", real_read)
    manifest = verifier._index.query("SELECT manifest FROM steps WHERE step=4")[0][0]
    os.remove(path / manifest)
    result = verifier.verify()
    assert not result.ok and result.damaged_steps == [4]
    verifier.close()


def test_a_close_overtaking_a_waiting_writer_does_not_leave_the_lock_taken(tmp_path):
    """delete/thin/gc that waited for the store's mutex while another thread closed the
    store raise StoreClosedError and never take the writer lock back (nothing would
    release it: every other writer got StoreLockedError until the process exited)."""
    path = tmp_path / "s"
    with deltackpt.open(path) as s:
        s.save(state(1), step=1)
        s.save(state(2), step=2)
    for op in (lambda s: s.delete(1), lambda s: s.thin(1, "model"), lambda s: s.gc()):
        store = deltackpt.open(path)
        errors = []
        with store._mutex:  # the op passes its first check, then waits here
            t = threading.Thread(target=lambda o=op, st=store, e=errors: e.append(_raises(o, st)))
            t.start()
            time.sleep(0.1)
            store.close()  # the same thread may take the RLock again
        t.join(10)
        assert errors and isinstance(errors[0], deltackpt.StoreClosedError), errors
        with deltackpt.open(path) as other:  # the lock is free
            other.save(state(3), step=3)
            other.delete(3)


def _raises(fn, *args):
    try:
        fn(*args)
    except Exception as exc:
        return exc
    return None


def test_reads_overtaken_by_close_raise_store_closed_error(tmp_path, monkeypatch):
    import deltackpt.store as store_mod
    from deltackpt import diff as diff_mod
    from deltackpt.export import iter_entries

    path = tmp_path / "s"
    with deltackpt.open(path) as s:
        s.save(state(1), step=1)
        s.save(state(2), step=2)
    real = store_mod.Store._locate
    calls = [
        ("load", lambda s: s.load(1)),
        ("verify", lambda s: s.verify()),
        ("diff", lambda s: diff_mod.diff(s, 1, 2)),
        ("iter_entries", lambda s: list(iter_entries(s, 1, select=None))),
    ]
    def open_pack_fds() -> list[str]:
        out = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/self/fd/{fd}")
                if target.startswith(str(path)) and target.endswith(".pack"):
                    out.append(target)
        return out

    for threads in (1, 2):  # one thread: blocks are read in the caller's thread
        for _name, call in calls:
            store = deltackpt.open(path, threads=threads)

            def closing(self, *a, **k):
                self.close()  # close() overtakes the read: pool, index and files go under it
                return real(self, *a, **k)

            monkeypatch.setattr(store_mod.Store, "_locate", closing)
            with pytest.raises(deltackpt.StoreClosedError, match="closed during the call"):
                call(store)
            monkeypatch.setattr(store_mod.Store, "_locate", real)
            assert open_pack_fds() == []  # the closed backend opened none behind close()


@pytest.mark.parametrize("reader", ["diff", "iter_entries"])
def test_diff_and_iter_entries_plan_again_after_a_concurrent_repack(tmp_path, monkeypatch,
                                                                   reader):
    import deltackpt.store as store_mod
    from deltackpt import diff as diff_mod
    from deltackpt.export import iter_entries

    path = tmp_path / "s"

    def shared_state(step: int) -> dict:  # "shared" lives in step 1's pack for all steps
        return {"shared": det_floats((30000,), 0), "own": det_floats((30000,), step)}

    with deltackpt.open(path, block_size=4096, delta="none") as s:
        for step in range(1, 5):
            s.save(shared_state(step), step=step)
    real = store_mod._Decoder.__init__
    fired = []

    def repack_after_planning(self, store, *a, **k):
        real(self, store, *a, **k)
        if not fired:  # the plan is made: its packs are rewritten before it reads them
            fired.append(1)
            store.delete(1)
            assert store.gc(repack_threshold=1.0).packs_rewritten == 1

    monkeypatch.setattr(store_mod._Decoder, "__init__", repack_after_planning)
    with deltackpt.open(path) as s:
        if reader == "diff":
            result = diff_mod.diff(s, 2, 4)
            assert result["total"]["entries"] > 0
        else:
            got = dict(iter_entries(s, 4, select=None))
            expected = shared_state(4)
            assert list(got) == list(expected)
            for k in expected:
                assert_state_equal(got[k], expected[k])
    assert fired


def test_a_read_overtaken_by_close_opens_no_pack_behind_it(tmp_path, monkeypatch):
    """With one thread a load reads its frames in the caller's thread: once close() has
    closed the backend, the read must not open (and cache, for ever) a new pack fd."""
    import deltackpt.store as store_mod

    path = tmp_path / "s"
    with deltackpt.open(path) as s:
        s.save(state(1), step=1)
    real = store_mod.Store._decode_blocks

    def closing(self, *a, **k):
        self.close()  # the plan is made, no frame read yet
        return real(self, *a, **k)

    monkeypatch.setattr(store_mod.Store, "_decode_blocks", closing)
    store = deltackpt.open(path, threads=1)
    with pytest.raises(deltackpt.StoreClosedError, match="closed during the call"):
        store.load(1)
    assert not store.backend._fds
    packs = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
             if os.path.exists(f"/proc/self/fd/{fd}")]
    assert not [p for p in packs if p.startswith(str(path)) and p.endswith(".pack")]


def test_a_long_open_remote_store_catches_up_before_calling_damage(tmp_path):
    """Another process (another cache) deletes steps and repacks: a remote store that
    stayed open refreshes its cache and plans again in verify, diff, iter_entries and
    export, as load does, instead of reporting missing objects or FileNotFoundError."""
    import uuid

    from deltackpt import diff as diff_mod
    from deltackpt.export import iter_entries

    url = f"fsspec+memory://stale-{uuid.uuid4().hex[:8]}"

    def shared_state(step: int) -> dict:  # "shared" lives in step 0's pack for all steps
        return {"shared": det_floats((30000,), 0), "own": det_floats((30000,), 100 + step)}

    with deltackpt.open(url, cache_dir=str(tmp_path / "w1"), block_size=4096,
                        delta="none") as w:
        for step in range(4):
            w.save(shared_state(step), step=step)
    reader = deltackpt.open(url, cache_dir=str(tmp_path / "reader"))
    assert reader.steps() == [0, 1, 2, 3]
    with deltackpt.open(url, cache_dir=str(tmp_path / "w2")) as w:
        w.delete(0)
        w.delete(1)
        assert w.gc(repack_threshold=0.99).packs_rewritten
    result = reader.verify()
    assert result.ok, result.problems
    assert result.steps_checked == 2
    assert diff_mod.diff(reader, 2, 3)["total"]["entries"] == 2
    got = dict(iter_entries(reader, 2, select=None))
    assert_state_equal(got, {"shared": shared_state(2)["shared"], "own": shared_state(2)["own"]})
    reader.export(tmp_path / "o.safetensors", step=3, select=None)
    assert_state_equal(reader.load(3), shared_state(3))
    reader.close()


def test_a_remote_store_that_lost_a_pack_reports_damage_not_a_catch_up(tmp_path,
                                                                       monkeypatch):
    """A pack object lost with no writer anywhere is damage: verify reports the step and
    diff raises, naming the pack, instead of a refreshed cache that silently dropped the
    step; a refresh that fails does not replace the report either."""
    import uuid

    from deltackpt import diff as diff_mod

    def three_steps(tag: str):
        """A reader on a fresh remote store of steps 0-2, another cache having written it."""
        url = f"fsspec+memory://{tag}-{uuid.uuid4().hex[:8]}"
        with deltackpt.open(url, cache_dir=str(tmp_path / f"w-{tag}"), block_size=4096,
                            delta="none") as w:
            for step in range(3):
                w.save({"w": det_floats((20000,), 10 + step)}, step=step)
        return deltackpt.open(url, cache_dir=str(tmp_path / f"r-{tag}"))

    reader = three_steps("lost")
    lost = [r[0] for r in reader._index.query(
        "SELECT DISTINCT p.name FROM blocks b JOIN packs p ON p.id=b.pack_id "
        "WHERE b.first_step=1")]
    for name in lost:
        reader.backend.fs.rm(reader.backend._path(name))
    result = reader.verify()
    assert not result.ok and result.damaged_steps == [1], result.problems
    assert any(lost[0] in p for p in result.problems)
    reader.close()

    # a flipped byte, and a listing that fails when verify/diff try to catch up: the
    # damage is what they report, not the listing's error
    reader = three_steps("flip")
    name, offset, length = reader._index.query(
        "SELECT p.name, b.offset, b.length FROM blocks b JOIN packs p ON p.id=b.pack_id "
        "WHERE b.first_step=1 LIMIT 1")[0]
    path = reader.backend._path(name)
    data = bytearray(reader.backend.fs.cat(path))
    data[offset + length - 1] ^= 0x01
    reader.backend.fs.pipe(path, bytes(data))

    def failing_refresh(self, check_packs=True):
        raise OSError(5, "list_objects_v2 failed")

    monkeypatch.setattr(type(reader), "refresh", failing_refresh)
    result = reader.verify()
    assert not result.ok and result.damaged_steps == [1]
    with pytest.raises(deltackpt.CorruptionError, match="step 1"):
        diff_mod.diff(reader, 0, 1)
    reader.close()
