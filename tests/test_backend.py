"""The Backend contract (deltackpt/backend.py docstring), run against every implementation."""

from __future__ import annotations

import errno
import os
import threading
import time

import numpy as np
import pytest

from deltackpt import Backend, CorruptionError, InvalidStoreError, LocalBackend, MemoryBackend
from deltackpt.backend import PARTIAL_SUFFIX
from deltackpt.errors import StorageError


@pytest.fixture(scope="module")
def s3_server():
    """One moto S3 server on loopback for this module (tests/s3server.py)."""
    pytest.importorskip("s3fs")
    from s3server import S3Server

    with S3Server() as server:
        yield server


@pytest.fixture(params=["local", "memory", "s3", "fsspec-memory"])
def backend(request, tmp_path):
    if request.param == "local":
        b = LocalBackend(os.path.join(tmp_path, "root"), durable=True)
        os.makedirs(b.root)
    elif request.param == "s3":  # a fresh prefix of a real S3 server over HTTP
        from deltackpt.fsspec_backend import FsspecBackend

        server = request.getfixturevalue("s3_server")
        b = FsspecBackend(server.shared_fs(), f"{server.prefix()}/some/prefix")
    elif request.param == "fsspec-memory":
        fsspec = pytest.importorskip("fsspec")
        from deltackpt.fsspec_backend import FsspecBackend

        b = FsspecBackend(fsspec.filesystem("memory", skip_instance_cache=True),
                          f"/t-{os.path.basename(tmp_path)}/root")
    else:
        b = MemoryBackend()
    yield b
    b.close()


DATA = bytes(range(256)) * 4  # 1024 bytes


class TestBackendContract:
    def test_is_a_backend(self, backend):
        assert isinstance(backend, Backend)
        assert isinstance(backend.durable, bool)

    def test_create_commit_visibility(self, backend):
        w = backend.create("packs/ab/x.pack")
        w.write(b"abc")
        w.write(memoryview(b"def"))
        w.write(np.arange(4, dtype=np.uint8).data)  # numpy memory is accepted too
        assert w.tell() == 10
        assert not backend.exists("packs/ab/x.pack")
        assert "packs/ab/x.pack" not in backend.list()
        with pytest.raises(FileNotFoundError):
            backend.read("packs/ab/x.pack")
        with pytest.raises(FileNotFoundError):
            backend.size("packs/ab/x.pack")
        w.commit()
        assert backend.exists("packs/ab/x.pack")
        assert backend.read("packs/ab/x.pack") == b"abcdef\x00\x01\x02\x03"
        assert backend.size("packs/ab/x.pack") == 10
        assert backend.list() == ["packs/ab/x.pack"]  # no partial left behind

    def test_commit_never_replaces_an_existing_object(self, backend):
        backend.put("obj", b"old")
        w = backend.create("obj")
        w.write(b"new")
        with pytest.raises(FileExistsError):
            w.commit()
        assert backend.read("obj") == b"old"

    def test_abort_leaves_nothing_visible(self, backend):
        w = backend.create("a/b")
        w.write(DATA)
        w.abort()
        w.abort()  # idempotent
        assert not backend.exists("a/b")
        assert backend.list() == []
        with pytest.raises(FileNotFoundError):
            backend.read("a/b")
        # the name is free again
        w = backend.create("a/b")
        w.write(b"x")
        w.commit()
        assert backend.read("a/b") == b"x"

    def test_an_unfinished_writer_leaves_at_most_a_partial(self, backend):
        w = backend.create("m/x")
        w.write(b"half")
        listed = backend.list()
        assert listed in ([], ["m/x" + PARTIAL_SUFFIX])
        assert not backend.exists("m/x")
        w.abort()

    def test_put_creates_and_replaces_atomically(self, backend):
        backend.put("manifests/1", b"first")
        assert backend.read("manifests/1") == b"first"
        assert backend.read("manifests/1", 1, 3) == b"irs"  # a cached reader...
        backend.put("manifests/1", b"second version")
        assert backend.read("manifests/1") == b"second version"  # ...sees the new object
        assert backend.size("manifests/1") == 14
        assert backend.list() == ["manifests/1"]
        backend.put("manifests/1", b"")
        assert backend.read("manifests/1") == b"" and backend.size("manifests/1") == 0

    def test_read_exact_ranges(self, backend):
        backend.put("o", DATA)
        for off, ln in [(0, 1024), (0, 0), (5, 10), (1000, 24), (1023, 1), (1024, 0), (512, 1)]:
            assert backend.read("o", off, ln) == DATA[off:off + ln]
        assert backend.read("o") == DATA
        assert backend.read("o", 1000) == DATA[1000:]

    @pytest.mark.parametrize("off,ln", [(1000, 25), (0, 1025), (1024, 1), (2000, 1), (-1, 5),
                                        (0, -1), (2000, None)])
    def test_short_or_bad_range_is_corruption(self, backend, off, ln):
        backend.put("o", DATA)
        with pytest.raises(CorruptionError):
            backend.read("o", off, ln)

    def test_missing_object(self, backend):
        with pytest.raises(FileNotFoundError):
            backend.read("nope")
        with pytest.raises(FileNotFoundError):
            backend.read("nope", 0, 1)
        with pytest.raises(FileNotFoundError):
            backend.size("nope")
        assert not backend.exists("nope")

    def test_delete_is_idempotent(self, backend):
        backend.put("d/x", b"1")
        assert backend.read("d/x") == b"1"
        backend.delete("d/x")
        backend.delete("d/x")
        backend.delete("never/existed")
        assert not backend.exists("d/x")
        with pytest.raises(FileNotFoundError):
            backend.read("d/x")
        backend.put("d/x", b"22")  # same name, new object: no stale cached reader
        assert backend.read("d/x") == b"22"

    def test_list_is_sorted_and_filtered_by_prefix(self, backend):
        names = ["b/2", "a/10", "a/1", "ab", "c", "a/1x/y", "B"]
        for n in names:
            backend.put(n, n.encode())
        assert backend.list() == sorted(names)
        assert backend.list("a/") == ["a/1", "a/10", "a/1x/y"]
        assert backend.list("a") == ["a/1", "a/10", "a/1x/y", "ab"]
        assert backend.list("a/1") == ["a/1", "a/10", "a/1x/y"]
        assert backend.list("zzz") == []

    @pytest.mark.parametrize("name", ["../x", "/abs", "a//b", "", "a/../b", ".", "..", "a/.",
                                      "x/", ".hidden", "a\\b", "a b", "a/-x/..", "é", "a:b",
                                      "a\x00b"])
    def test_invalid_names_are_refused(self, backend, name):
        calls = [lambda: backend.create(name), lambda: backend.put(name, b"x"),
                 lambda: backend.read(name), lambda: backend.size(name),
                 lambda: backend.exists(name), lambda: backend.delete(name)]
        for call in calls:
            with pytest.raises(InvalidStoreError):
                call()
        assert backend.list() == []

    def test_sync_and_close_are_safe(self, backend):
        backend.put("x", b"1")
        backend.sync()
        backend.sync()
        assert backend.read("x") == b"1"


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_trailing_newline_in_a_name_is_refused(kind, tmp_path):
    b = LocalBackend(tmp_path) if kind == "local" else MemoryBackend()
    for name in ("a\n", "packs/x\n"):
        with pytest.raises(InvalidStoreError):
            b.put(name, b"x")
    assert b.list() == []


@pytest.mark.parametrize("kind", [
    "local",
    "memory",
])
def test_put_succeeds_over_a_crashed_writers_partial(kind, tmp_path):
    b = LocalBackend(tmp_path) if kind == "local" else MemoryBackend()
    w = b.create("manifests/5")
    w.write(b"torn")  # the writer "crashes": neither commit nor abort
    b.put("manifests/5", b"complete")
    assert b.read("manifests/5") == b"complete"


@pytest.mark.parametrize("kind", [
    "local",
    "memory",
])
def test_a_refused_commit_can_be_aborted_without_leftovers(kind, tmp_path):
    b = LocalBackend(tmp_path) if kind == "local" else MemoryBackend()
    b.put("obj", b"old")
    w = b.create("obj")
    w.write(b"new")
    with pytest.raises(FileExistsError):
        w.commit()
    w.abort()
    assert b.list() == ["obj"] and b.read("obj") == b"old"


# -- LocalBackend specifics --------------------------------------------------------------
def test_local_objects_are_plain_files_under_the_root(tmp_path):
    b = LocalBackend(tmp_path)
    b.put("packs/ab/cd.pack", b"xyz")
    with open(os.path.join(tmp_path, "packs", "ab", "cd.pack"), "rb") as f:
        assert f.read() == b"xyz"
    assert b.path("packs/ab/cd.pack") == os.path.join(str(tmp_path), "packs", "ab", "cd.pack")
    assert sorted(os.listdir(os.path.join(tmp_path, "packs", "ab"))) == ["cd.pack"]


def test_local_backend_refuses_to_follow_a_symlinked_object(tmp_path):
    root = os.path.join(tmp_path, "root")
    os.makedirs(os.path.join(root, "packs"))
    secret = os.path.join(tmp_path, "secret")
    with open(secret, "wb") as f:
        f.write(b"outside the store")
    os.symlink(secret, os.path.join(root, "packs", "evil.pack"))
    b = LocalBackend(root)
    with pytest.raises(OSError) as ei:
        b.read("packs/evil.pack")
    assert ei.value.errno == errno.ELOOP
    with pytest.raises(OSError):
        b.read("packs/evil.pack", 0, 5)
    # replacing or deleting the object never touches the link's target
    b.put("packs/evil.pack", b"inside")
    with open(secret, "rb") as f:
        assert f.read() == b"outside the store"
    assert not os.path.islink(os.path.join(root, "packs", "evil.pack"))
    assert b.read("packs/evil.pack") == b"inside"
    os.symlink(secret, os.path.join(root, "packs", "evil2.pack"))
    b.delete("packs/evil2.pack")
    assert os.path.exists(secret)
    # a writer never writes through a symlink planted at its temporary name: the stale
    # name is unlinked (the link, not its target) and a fresh file created
    os.symlink(secret, os.path.join(root, "packs", "new.pack" + PARTIAL_SUFFIX))
    w = b.create("packs/new.pack")
    w.write(b"new")
    w.commit()
    with open(secret, "rb") as f:
        assert f.read() == b"outside the store"
    assert b.read("packs/new.pack") == b"new"
    with open(secret, "rb") as f:
        assert f.read() == b"outside the store"


def test_durable_commit_fsyncs_every_directory_it_created(tmp_path):
    root = os.path.join(tmp_path, "root")
    os.makedirs(root)
    b = LocalBackend(root, durable=True)
    synced = []
    real = b.fsync_fd

    def record(fd):
        synced.append(os.path.relpath(os.readlink(f"/proc/self/fd/{fd}"), root))
        real(fd)

    b.fsync_fd = record
    w = b.create("packs/ab/x.pack")
    w.write(b"frame")
    w.commit()
    b.put("manifests/1", b"m")
    b.sync()
    assert "packs/ab/x.pack.partial" in synced  # the file's data
    # every directory entry the commit depends on: the file's, and each new directory's
    for d in ("packs/ab", "packs", "manifests", "."):
        assert d in synced, (d, synced)


def _durable_local(tmp_path, monkeypatch, flush_bytes=1024):
    import deltackpt.backend

    monkeypatch.setattr(deltackpt.backend, "EARLY_FLUSH_BYTES", flush_bytes)
    root = os.path.join(tmp_path, "root")
    os.makedirs(root)
    return LocalBackend(root, durable=True)


def test_a_growing_object_is_flushed_in_the_background_and_fully_at_commit(tmp_path,
                                                                          monkeypatch):
    b = _durable_local(tmp_path, monkeypatch)
    synced: list[tuple[str, int]] = []
    real = b.fsync_fd

    def record(fd):
        synced.append((threading.current_thread().name, os.fstat(fd).st_size))
        real(fd)

    b.fsync_fd = record
    w = b.create("packs/big.pack")
    for i in range(8):
        w.write(bytes([i]) * 1000)
        if i == 3:
            # the flush thread may not have been scheduled yet on a busy machine: give it
            # time (bounded) before the writer goes on
            deadline = time.monotonic() + 10
            while not any(n == "deltackpt-flush" for n, _ in synced) and \
                    time.monotonic() < deadline:
                time.sleep(0.01)
    early = [size for name, size in synced if name == "deltackpt-flush"]
    w.commit()
    assert early, "no background flush ran"
    assert min(early) < 8000  # it flushed a prefix while the writer went on
    # the commit's own fsync covers the whole object, after every background flush
    last_main = [size for name, size in synced if name != "deltackpt-flush"]
    assert last_main and last_main[0] == 8000
    assert b.read("packs/big.pack") == b"".join(bytes([i]) * 1000 for i in range(8))


def test_a_failed_background_flush_fails_the_commit_and_stops_the_backend(tmp_path,
                                                                         monkeypatch):
    b = _durable_local(tmp_path, monkeypatch)

    real = b.fsync_fd

    def failing(fd):  # only the background flush fails: the commit's own fsync would pass
        if threading.current_thread().name == "deltackpt-flush":
            raise OSError(errno.EIO, "I/O error")
        real(fd)

    b.fsync_fd = failing
    w = b.create("packs/x.pack")
    w.write(b"a" * 2000)  # starts a flush, which fails
    w.write(b"b" * 10)
    with pytest.raises(OSError, match="I/O error"):
        w.commit()
    assert not b.exists("packs/x.pack")
    assert not os.path.exists(b.path("packs/x.pack") + PARTIAL_SUFFIX)
    with pytest.raises(StorageError, match="fsync of .*x.pack.partial failed"):
        b.create("packs/y.pack")  # fsyncgate: nothing written since can be trusted


def test_abort_waits_for_a_running_background_flush(tmp_path, monkeypatch):
    b = _durable_local(tmp_path, monkeypatch)
    started, release = threading.Event(), threading.Event()
    seen: list[int] = []
    real = b.fsync_fd

    def slow(fd):
        started.set()
        assert release.wait(10)
        seen.append(os.fstat(fd).st_size)  # the fd must still be ours
        real(fd)

    b.fsync_fd = slow
    w = b.create("packs/x.pack")
    w.write(b"a" * 2000)
    assert started.wait(10)
    threading.Timer(0.2, release.set).start()
    w.abort()
    assert seen == [2000]
    assert not os.path.exists(b.path("packs/x.pack") + PARTIAL_SUFFIX)


def _fail_in_flush_thread(b):
    real = b.fsync_fd

    def fsync(fd):
        if threading.current_thread().name == "deltackpt-flush":
            raise OSError(errno.EIO, "I/O error")
        real(fd)

    b.fsync_fd = fsync


def test_put_waits_for_its_background_flush_and_keeps_the_old_object_when_it_fails(
        tmp_path, monkeypatch):
    """Linux reports a write-back error to one fsync of a file only: put's own fsync may pass
    after the background one failed. put must not replace the object then."""
    b = _durable_local(tmp_path, monkeypatch)
    b.put("manifests/m", b"old")
    _fail_in_flush_thread(b)
    with pytest.raises(OSError, match="I/O error"):
        b.put("manifests/m", b"n" * 5000)
    assert b.read("manifests/m") == b"old"
    assert not os.path.exists(b.path("manifests/m") + PARTIAL_SUFFIX)
    assert not [t for t in threading.enumerate() if t.name == "deltackpt-flush"]
    with pytest.raises(StorageError, match="refusing to write"):
        b.put("manifests/m", b"again")


def test_abort_after_a_failed_background_flush_still_stops_the_backend(tmp_path, monkeypatch):
    b = _durable_local(tmp_path, monkeypatch)
    _fail_in_flush_thread(b)
    w = b.create("packs/x.pack")
    w.write(b"a" * 2000)
    w.abort()  # the save failed for another reason: the disk error must not be forgotten
    with pytest.raises(StorageError, match="refusing to write"):
        b.create("packs/y.pack")


def test_no_thread_to_spare_means_no_early_flush_not_a_failed_write(tmp_path, monkeypatch):
    b = _durable_local(tmp_path, monkeypatch)

    def refuse(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    w = b.create("packs/x.pack")
    w.write(b"a" * 5000)
    w.commit()
    assert b.read("packs/x.pack") == b"a" * 5000
    w2 = b.create("packs/y.pack")
    w2.write(b"b" * 5000)
    w2.abort()
    assert not os.path.exists(b.path("packs/y.pack") + PARTIAL_SUFFIX)


def test_local_backend_sees_in_place_truncation_as_corruption(tmp_path):
    b = LocalBackend(tmp_path)
    b.put("o", DATA)
    assert b.read("o", 1000, 24) == DATA[1000:]
    os.truncate(os.path.join(tmp_path, "o"), 1010)
    with pytest.raises(CorruptionError, match="truncated"):
        b.read("o", 1000, 24)
    assert b.read("o", 1000, 10) == DATA[1000:1010]


def test_local_backend_fd_cache_is_bounded(tmp_path):
    b = LocalBackend(tmp_path, max_open=4)
    for i in range(20):
        b.put(f"o{i:02d}", bytes([i]) * 3)
    for _ in range(2):
        for i in range(20):
            assert b.read(f"o{i:02d}", 1, 1) == bytes([i])
    assert len(b._fds) <= 4
    b.close()
    assert len(b._fds) == 0
