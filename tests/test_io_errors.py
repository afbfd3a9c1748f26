"""Disk full and I/O errors: ENOSPC and EIO at every write, fsync, create, mkdir and rename
of one save (counted in a dry run, then the k-th call failed for every k), and a real
8 MiB tmpfs that fills up.

After each failure: save() raised StorageError naming the store and step, the step is
not visible, earlier steps restore bit-exact, a failed fsync is never retried on the
same file nor followed by its rename (the backend refuses further writes until the
store is reopened), the next save succeeds (after a reopen when an fsync failed), and
gc leaves exactly the referenced objects.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys

import pytest
import torch
from faultfs import FAULT_KINDS, Fault, install
from helpers import assert_state_equal, det_floats, det_tensor

import deltackpt
import deltackpt.packs
from deltackpt.backend import PARTIAL_SUFFIX
from deltackpt.errors import StorageError

torch.set_num_threads(1)


def state(step: int) -> dict:
    w = det_floats((2048,), 1)
    w[::50] += step * 1e-3
    return {"w": w, "b": det_tensor(torch.int64, (64,), step), "step": step}


def _base_store(path: str) -> None:
    with deltackpt.open(path, block_size=4096, threads=1) as s:
        for step in (0, 1):
            s.save(state(step), step)


def _referenced(s) -> set[str]:
    return ({n for (n,) in s._index.query("SELECT name FROM packs")}
            | {n for (n,) in s._index.query("SELECT manifest FROM steps")})


def _check_clean(s, steps: list[int]) -> None:
    assert s.steps() == steps
    for step in steps:
        assert_state_equal(s.load(step), state(step))
    assert s.verify().ok
    s.gc()
    names = set(s.backend.list("packs/") + s.backend.list("manifests/"))
    assert not [n for n in names if n.endswith(PARTIAL_SUFFIX)]
    assert names == _referenced(s)


def _attempt(monkeypatch, root: str, fault: Fault | None):
    """One save of step 2 through the fault layer; returns (error or None, log)."""
    real_name = deltackpt.packs.new_pack_name
    with install(monkeypatch, root, fault) as fos:
        # a fixed new pack directory, so every run makes the same calls
        monkeypatch.setattr(deltackpt.packs, "new_pack_name",
                            lambda: "packs/zz/" + real_name()[9:])
        s = deltackpt.open(root, threads=1)
        try:
            s.save(state(2), 2)
            err = None
        except Exception as exc:  # noqa: BLE001 - the test inspects whatever came out
            err = exc
        try:
            _after(s, fos, err, fault)
        finally:
            s.close()
    return err, fos


def _after(s, fos, err, fault) -> None:
    if fault is None:
        assert err is None
        return
    assert fos.injected is not None, f"{fault} never fired"
    assert isinstance(err, StorageError), repr(err)
    assert err.errno == fault.errno and "save of step 2" in str(err), str(err)
    assert s.location in str(err) and "nothing was committed" in str(err), str(err)
    assert s.steps() == [0, 1]
    for step in (0, 1):
        assert_state_equal(s.load(step), state(step))
    if fault.kind == "fsync":
        node = fos.injected[2]
        later = fos.ops[fos.ops.index(("failed", "fsync", node, fos.injected[1])) + 1:]
        assert ("fsync", node) not in later, "a failed fsync was retried"
        assert not [op for op in later if op[0] == "rename" and op[3] == node], \
            "a file whose fsync failed was committed"
        with pytest.raises(StorageError, match="refusing to write"):
            s.save(state(3), 3)
        assert s.steps() == [0, 1]
    else:
        s.save(state(3), 3)  # the fault was transient: the same store saves again
        assert_state_equal(s.load(3), state(3))


def _reopen_and_check(root: str, extra: list[int]) -> None:
    with deltackpt.open(root, threads=1) as s:
        s.save(state(4), 4)
        _check_clean(s, [0, 1, *extra, 4])


def injection_points(monkeypatch, tmp_path) -> dict[str, int]:
    root = str(tmp_path / "dry")
    _base_store(root)
    err, fos = _attempt(monkeypatch, root, None)
    assert err is None
    return {kind: fos.calls[kind] for kind in FAULT_KINDS}


def test_every_write_fsync_create_mkdir_and_rename_of_a_save_fails_cleanly(monkeypatch,
                                                                            tmp_path):
    counts = injection_points(monkeypatch, tmp_path)
    # pack + manifest files, their bytes, their fsyncs and directories', packs/zz, 2 renames
    assert counts["create"] == 2 and counts["mkdir"] == 1 and counts["rename"] == 2, counts
    assert counts["write"] >= 4 and counts["fsync"] >= 5, counts
    base = str(tmp_path / "base")
    _base_store(base)
    n = 0
    for kind in FAULT_KINDS:
        for k in range(1, counts[kind] + 1):
            for code in (errno.ENOSPC, errno.EIO):
                root = str(tmp_path / f"{kind}-{k}-{code}")
                shutil.copytree(base, root)
                err, fos = _attempt(monkeypatch, root, Fault(kind, k, code))
                _reopen_and_check(root, [] if kind == "fsync" else [3])
                shutil.rmtree(root)
                n += 1
    assert n == 2 * sum(counts.values())


def test_a_save_failing_mid_pack_frees_the_packs_it_had_committed(monkeypatch, tmp_path):
    """On a full disk the packs a failed save already committed are deleted at once."""
    root = str(tmp_path / "s")
    _base_store(root)
    real_name = deltackpt.packs.new_pack_name
    with install(monkeypatch, root, Fault("write", 14, errno.ENOSPC)) as fos:
        monkeypatch.setattr(deltackpt.packs, "new_pack_name",
                            lambda: "packs/zz/" + real_name()[9:])
        with deltackpt.open(root, threads=1, block_size=4096) as s:
            s._pack_size = 1  # one frame per pack: the save commits packs, then fails
            with pytest.raises(StorageError):
                s.save(state(2), 2)
            committed = [op[2] for op in fos.ops if op[0] == "rename"]
            assert committed, "no pack was committed before the failure"
            assert not os.path.exists(os.path.join(root, "packs", "zz")) or \
                os.listdir(os.path.join(root, "packs", "zz")) == []
            assert s.steps() == [0, 1]


# -- a real filesystem that fills up ---------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    if r.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {r.stderr.strip()}")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def _fill(path: str, leave: int) -> None:
    """Fill the filesystem with a ballast file, then give back ``leave`` bytes."""
    chunk = b"\xa5" * 65536
    with open(path, "wb", buffering=0) as f:
        for size in (65536, 4096):
            while True:
                try:
                    f.write(chunk[:size])
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
        f.truncate(max(0, f.tell() - 65536 - leave))


def big_state(step: int) -> dict:
    # incompressible: about 1.5 MiB of new frames per save
    return {"noise": det_tensor(torch.float32, (384 * 1024,), 1000 + step), "step": step}


def test_a_filesystem_that_fills_up(small_fs):
    root = os.path.join(small_fs, "store")
    ballast = os.path.join(small_fs, "ballast")
    acked = []
    failures = 0
    with deltackpt.open(root, threads=1) as s:
        s.save(big_state(0), 0)
        acked.append(0)
    step = 1
    # around 1.5 MiB the pack fits and the manifest or the index commit (SQLite) hits the wall
    levels = [0, 256 << 10, 1 << 20, *range(1536 << 10, 1620 << 10, 6 << 10), 3 << 20]
    for leave in levels:
        _fill(ballast, leave)
        with deltackpt.open(root, threads=1) as s:
            try:
                s.save(big_state(step), step)
                acked.append(step)
            except StorageError as exc:
                failures += 1
                assert exc.errno in (errno.ENOSPC, None), exc
                assert f"save of step {step}" in str(exc)
                assert step not in s.steps()
            assert s.steps() == acked
            for a in acked:
                assert_state_equal(s.load(a), big_state(a))
        os.unlink(ballast)
        with deltackpt.open(root, threads=1) as s:
            assert s.steps() == acked
            assert s.verify().ok
            if len(acked) > 2:  # keep room for the next round
                s.delete(acked.pop(1))
            s.gc()
            names = set(s.backend.list("packs/") + s.backend.list("manifests/"))
            assert names == _referenced(s)
        step += 1
    assert failures >= 3, "the disk never filled up"
    with deltackpt.open(root, threads=1) as s:  # space is back: saves work again
        s.save(big_state(step), step)
        for a in [*acked, step]:
            assert_state_equal(s.load(a), big_state(a))


# -- found by the session-8 review of misbehaving storage ----------------------------------
def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_full_disk_while_taking_the_lock_does_not_keep_the_store_locked(tmp_path,
                                                                          monkeypatch):
    """The holder's pid is written into the lock file for messages only: failing to write
    it (ENOSPC) must not leave the flock taken by a writer that never became one."""
    import deltackpt.lock as lock_mod

    path = tmp_path / "s"
    with deltackpt.open(path) as s:
        s.save(state(1), step=1)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lock_mod.os, "pwrite", full)
    with deltackpt.open(path) as s:
        s.save(state(2), step=2)  # the lock works, only its text is missing
    monkeypatch.undo()
    with deltackpt.open(path) as s:  # released at close: another writer gets it
        s.delete(1)
        assert s.steps() == [2]


def test_a_failing_flock_does_not_leak_its_descriptor(tmp_path, monkeypatch):
    import deltackpt.lock as lock_mod

    path = tmp_path / "s"
    deltackpt.open(path).close()

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock_mod.fcntl, "flock", no_locks)
    store = deltackpt.open(path)
    before = _open_fds()
    for _ in range(5):
        with pytest.raises(StorageError, match="No locks available"):
            store.save(state(1), step=1)
    assert _open_fds() == before
    store.close()


def test_a_read_error_names_the_store_and_pack_and_verify_lists_it(tmp_path, monkeypatch):
    import deltackpt.backend as backend_mod

    path = tmp_path / "s"
    with deltackpt.open(path) as s:
        s.save(state(1), step=1)
    real = backend_mod.os.pread

    def eio(fd, n, off):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(backend_mod.os, "pread", eio)
    with deltackpt.open(path) as s:
        with pytest.raises(StorageError, match=r"step 1.*reading packs/.*Input/output") as ei:
            s.load(1)
        assert ei.value.errno == errno.EIO and str(path) in str(ei.value)
        result = s.verify()  # never raises for what it finds
        assert not result.ok and any("Input/output" in p for p in result.problems)
        monkeypatch.setattr(backend_mod.os, "pread", real)
        assert_state_equal(s.load(1), state(1))
        assert s.verify().ok


def test_many_packs_read_by_many_threads_through_a_small_fd_cache(tmp_path):
    """An fd evicted from the reader's cache while another thread reads through it is
    closed by that reader, never under it (its number could be reused for another pack
    and the read return that pack's bytes)."""
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "s"
    states = {}
    with deltackpt.open(path, block_size=4096, delta="none") as s:
        for step in range(12):  # a pack per save
            states[step] = {"w": det_floats((3000,), step), "v": det_floats((1500,), 100 + step)}
            s.save(states[step], step=step)
    with deltackpt.open(path, threads=4) as s:
        s.backend._max_open = 2

        def check(step: int) -> None:
            assert_state_equal(s.load(step), states[step])

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(check, [i % 12 for i in range(96)]))
        assert s.verify().ok


def test_loads_under_a_low_file_descriptor_limit(tmp_path):
    """More packs than the process may open at once: the fd cache gives back what it holds
    and retries instead of failing with EMFILE."""
    path = tmp_path / "s"
    with deltackpt.open(path, block_size=4096, delta="none") as s:
        for step in range(80):
            s.save({"w": det_floats((1024,), step)}, step=step)
    script = (
        "import resource, sys, deltackpt, torch\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "base = len(__import__('os').listdir('/proc/self/fd'))\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (base + 24, hard))\n"
        f"s = deltackpt.open({str(path)!r}, threads=1)\n"
        "state = s.load(select=None)\n"
        "assert all(s.load(i)['w'].numel() == 1024 for i in range(80))\n"
        "assert s.verify().ok\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_creating_a_store_where_the_filesystem_refuses_names_the_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError, match=r"file/store: cannot create the store"):
        deltackpt.open(blocker / "store")


def test_a_failing_reindex_names_the_store_and_leaves_nothing_behind(tmp_path, monkeypatch):
    import sqlite3

    import deltackpt.reindex as reindex_mod

    path = tmp_path / "s"
    with deltackpt.open(path) as s:
        s.save(state(1), step=1)

    def full(*a, **k):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(reindex_mod, "rebuild_into", full)
    with pytest.raises(StorageError, match=r"reindex failed: database or disk is full"):
        reindex_mod.reindex(path)
    assert not [n for n in os.listdir(path) if ".rebuild" in n]
    monkeypatch.undo()
    with deltackpt.open(path) as s:  # the index in place is unchanged, the lock free
        s.save(state(2), step=2)
        assert s.steps() == [1, 2]


def test_a_pt_export_that_fails_to_write_is_a_storage_error(tmp_path, monkeypatch):
    import deltackpt.export as export_mod

    path = tmp_path / "s"
    with deltackpt.open(path) as s:
        s.save({"model": {"w": det_floats((10,), 1)}}, step=1)

        def full(obj, f, *a, **k):
            raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 832")

        monkeypatch.setattr(export_mod.torch, "save", full)
        with pytest.raises(StorageError, match=r"m\.pt: writing the file failed"):
            s.export(tmp_path / "m.pt", 1)
        assert not list(tmp_path.glob("m.pt*"))
