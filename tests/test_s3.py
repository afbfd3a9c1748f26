"""Stores in S3 over HTTP: a real S3 server (moto) on loopback, end to end.

Save / load / delete / gc / verify through ``deltackpt.open("s3://…")``; reopening from a
fresh process and a fresh cache; a second writer against the lease; another writer's gc
under a reader's cache; crashed uploads; and injected faults (5xx replies, connections
reset mid-upload, slow replies) that must either be retried or fail the save cleanly
without losing anything committed. The backend contract itself runs in test_backend.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch
from helpers import assert_state_equal, det_array, det_floats, det_tensor, state_digest

pytest.importorskip("s3fs")

from s3server import Fault, S3Server  # noqa: E402

import deltackpt  # noqa: E402
from deltackpt import StoreLockedError  # noqa: E402
from deltackpt.errors import StorageError  # noqa: E402
from deltackpt.fsspec_backend import FsspecBackend  # noqa: E402
from deltackpt.remote import LEASE_NAME, RemoteStore  # noqa: E402

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        yield server


@pytest.fixture(autouse=True)
def _no_faults(s3):
    s3.clear()
    yield
    s3.clear()


def state(step: int, big: bool = False) -> dict:
    w = det_floats((64 * 1024,), 1)
    w[::100] += step * 1e-3  # delta frames against the previous step
    s = {"model": {"w": w, "b": det_tensor(torch.bfloat16, (333,), step)},
         "opt": {"m": det_tensor(torch.float32, (5000,), step + 10)},
         "arr": det_array("int16", (7, 3), step),
         "meta": {"step": step, "name": "s3", "lr": 0.1, "nan": float("nan"),
                  "raw": b"\x00\x01"}}
    if big:  # 10 MiB of noise: its pack is a multipart upload of 5 MiB parts
        g = torch.Generator().manual_seed(100 + step)
        s["big"] = torch.randint(0, 256, (10 * MiB,), dtype=torch.uint8, generator=g)
    return s


def open_s3(s3: S3Server, url: str, cache: str, fs=None, **kw) -> RemoteStore:
    kw.setdefault("block_size", 65536)
    kw.setdefault("part_size", 5 * MiB)
    if fs is None:
        return deltackpt.open(url, storage_options=s3.storage_options(), cache_dir=cache, **kw)
    return deltackpt.open(url, filesystem=fs, cache_dir=cache, **kw)


def fail_fast_fs(s3: S3Server, **config):
    """A client that gives up quickly (2 botocore attempts, 2 s3fs tries, 1 s timeouts)."""
    config = {"retries": {"max_attempts": 2, "mode": "standard"}, "read_timeout": 1,
              "connect_timeout": 1, **config}
    fs = s3.fs(**config)
    fs.retries = 2
    return fs


def test_save_load_delete_gc_verify_over_http(s3, tmp_path):
    url = f"s3://{s3.prefix()}"
    with open_s3(s3, url, str(tmp_path / "c")) as st:
        assert isinstance(st, RemoteStore) and st.location == url
        for step in range(3):
            st.save(state(step, big=step == 1), step=step, metrics={"loss": 1.0 / (step + 1)})
        uploads = dict(st.backend.requests)
        for step in range(3):
            assert_state_equal(st.load(step), state(step, big=step == 1))
        assert_state_equal(st.load(select=["model"]), {"model": state(2)["model"]})
        assert st.verify().ok
        st.delete(1)
        g = st.gc()
        assert g.packs_deleted >= 1 and g.bytes_freed > 10 * MiB
        assert st.steps() == [0, 2] and st.verify().ok
        assert_state_equal(st.load(2), state(2))
        lease_seen = st.backend.exists(LEASE_NAME)
    # packs, not blocks, are objects: the small steps' packs are one PUT each, the 10 MiB
    # step's one multipart upload of 2 parts
    assert uploads.get("create_multipart_upload") == 1 and uploads.get("upload_part") == 2
    assert uploads.get("complete_multipart_upload") == 1
    assert uploads.get("put_object") == 1 + 2 + 3 + 1  # config, packs, manifests, lease
    assert lease_seen
    # the same objects a local store has, under the prefix; the lease is gone after close
    be = FsspecBackend(s3.shared_fs(), url[len("s3://"):])
    names = be.list()
    assert LEASE_NAME not in names
    assert names[0] == "deltackpt.json"
    assert [n for n in names if n.startswith("manifests/")] == [
        "manifests/00000000000000000000.manifest", "manifests/00000000000000000002.manifest"]
    packs = [n for n in names if n.startswith("packs/")]
    assert packs and all(len(n.split("/")[2]) == len("0" * 32 + ".pack") for n in packs)
    assert set(names) == {"deltackpt.json", *packs,
                          "manifests/00000000000000000000.manifest",
                          "manifests/00000000000000000002.manifest"}
    cfg = json.loads(be.read("deltackpt.json"))
    assert cfg["format"] == "deltackpt" and cfg["block_size"] == 65536


_CHILD = r"""
import json, sys
sys.path.insert(0, "tests")
import deltackpt
from helpers import state_digest
from s3server import S3Server
from test_s3 import state
url, endpoint, cache = sys.argv[1:4]
opts = {"key": "testing", "secret": "testing", "skip_instance_cache": True,
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
with deltackpt.open(url, storage_options=opts, cache_dir=cache, create=False) as st:
    out = {"steps": st.steps(), "refresh": st.last_refresh,
           "digests": {s: state_digest(st.load(s)) for s in st.steps()}}
    st.save(state(7), step=7)
print(json.dumps(out))
"""


def test_reopen_from_a_fresh_process_and_cache(s3, tmp_path):
    url = f"s3://{s3.prefix()}"
    with open_s3(s3, url, str(tmp_path / "parent")) as st:
        for step in (0, 5):
            st.save(state(step), step=step)
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, url, s3.endpoint, str(tmp_path / "child")],
        capture_output=True, text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["steps"] == [0, 5]
    assert out["refresh"] == "incremental"  # an empty cache caught up from the manifests
    assert out["digests"] == {str(s): state_digest(state(s)) for s in (0, 5)}
    # the parent's cache learns the child's step on reopen, without a rebuild
    with open_s3(s3, url, str(tmp_path / "parent")) as st:
        assert st.steps() == [0, 5, 7] and st.last_refresh == "incremental"
        assert_state_equal(st.load(7), state(7))
        assert st.verify().ok
    with open_s3(s3, url, str(tmp_path / "parent")) as st:
        assert st.last_refresh == "none"
        n = sum(st.backend.requests.values())
        assert n <= 4, st.backend.requests  # config, two listings: nothing to rescan


def test_an_empty_cache_reads_each_packs_index_not_each_frame_header(s3, tmp_path):
    """Catching up a fresh cache costs a ranged GET or two per pack (its pack index), not
    one per frame: the request count that decides the cost of a 1,024-rank run
    (docs/scaling.md)."""
    url = f"s3://{s3.prefix()}"
    with open_s3(s3, url, str(tmp_path / "writer"), block_size=512 * 1024) as st:
        for step in (0, 1, 2):  # frames too far apart for readahead windows to share GETs
            st.save(state(step, big=True), step=step)
        frames = st._index.query("SELECT COUNT(*) FROM blocks")[0][0]
        packs = st._index.query("SELECT COUNT(*) FROM packs")[0][0]
    assert frames >= 10 * packs, (frames, packs)
    with open_s3(s3, url, str(tmp_path / "fresh"), block_size=512 * 1024) as st:
        gets = st.backend.requests.get("get_object", 0)
        assert st.steps() == [0, 1, 2] and st.last_refresh == "incremental"
        assert_state_equal(st.load(2), state(2, big=True))
    # deltackpt.json, 3 manifests, then one GET of each pack's tail
    assert gets <= 1 + 3 + packs, (gets, packs, frames)


def test_a_reader_cache_follows_another_writers_delete_and_repack(s3, tmp_path):
    url = f"s3://{s3.prefix()}"
    with open_s3(s3, url, str(tmp_path / "w")) as w:
        for step in range(3):
            w.save(state(step), step=step)
    # no readahead: no window of an old pack cached by the scan can serve the load below
    reader = open_s3(s3, url, str(tmp_path / "r"), readahead=0)
    try:
        assert reader.steps() == [0, 1, 2]
        with open_s3(s3, url, str(tmp_path / "w")) as w:
            w.delete(0)
            w.delete(1)
            g = w.gc(repack_threshold=0.99)  # rewrite every sparse pack: old names vanish
            assert g.packs_deleted >= 1
        # the reader's plan names packs that are gone: load catches up and re-plans
        assert_state_equal(reader.load(2), state(2))
        assert reader.last_refresh == "rebuild"
        assert reader.steps() == [2]
        with pytest.raises(deltackpt.StepNotFoundError):
            reader.load(1)
    finally:
        reader.close()


def test_caches_notice_manifests_rewritten_under_the_same_name(s3, tmp_path):
    """Another writer thins a step, and deletes a step and saves new data under its number:
    the manifest names stay, their ETags change. A reader's cache, and the cache of the
    writer that made those steps, rebuild, so neither serves a step's old entries (a load
    then failed with 'the index disagrees with manifest' until a reindex)."""
    url = f"s3://{s3.prefix()}"
    with open_s3(s3, url, str(tmp_path / "w")) as w:
        for step in range(3):
            w.save(state(step), step=step)
    reader = open_s3(s3, url, str(tmp_path / "r"))
    try:
        assert_state_equal(reader.load(2), state(2))
        with open_s3(s3, url, str(tmp_path / "other")) as w:
            w.thin(1, ["model"])
            w.delete(2)
            w.save(state(7), step=2)
        reader.refresh(check_packs=False)
        with open_s3(s3, url, str(tmp_path / "w")) as writer:  # refreshes on open
            for cache in (reader, writer):
                assert cache.last_refresh == "rebuild"
                assert_state_equal(cache.load(2), state(7))
                assert sorted(cache.load(1)) == ["model"]
                cache.refresh(check_packs=False)
                assert cache.last_refresh == "none"
    finally:
        reader.close()


def test_a_writers_own_thin_and_saves_do_not_rebuild_its_cache(s3, tmp_path):
    url = f"s3://{s3.prefix()}"
    with open_s3(s3, url, str(tmp_path / "w")) as w:
        for step in range(4):
            w.save(state(step), step=step)
            if step:
                w.thin(step - 1, ["model"])   # the retention pattern: keep old weights only
            w.gc()
            assert w.last_refresh != "rebuild"
    with open_s3(s3, url, str(tmp_path / "w")) as w:
        assert w.last_refresh == "none"
        # a cache without the records (an older version's) rebuilds once
        with w._index.write() as conn:
            conn.execute("DELETE FROM cache_manifests")
        w.refresh(check_packs=False)
        assert w.last_refresh == "rebuild"
        w.refresh(check_packs=False)
        assert w.last_refresh == "none"


def test_the_lease_keeps_a_second_writer_out(s3, tmp_path):
    url = f"s3://{s3.prefix()}"
    w1 = open_s3(s3, url, str(tmp_path / "1"))
    w2 = open_s3(s3, url, str(tmp_path / "2"))
    try:
        w1.save(state(0), step=0)
        assert w2.steps() == []  # opening never takes the lease; reading is free
        with pytest.raises(StoreLockedError, match="pid"):
            w2.save(state(1), step=1)
        assert w2.backend.exists(LEASE_NAME)
        w1.close()  # releases the lease
        w2.save(state(1), step=1)  # taking it refreshed the cache first
        assert w2.steps() == [0, 1]
        assert_state_equal(w2.load(0), state(0))
    finally:
        w1.close()
        w2.close()


def test_an_expired_lease_is_taken_over_and_the_old_writer_cannot_commit(s3, tmp_path):
    url = f"s3://{s3.prefix()}"
    w1 = open_s3(s3, url, str(tmp_path / "1"), lease_ttl=30)
    w2 = open_s3(s3, url, str(tmp_path / "2"), lease_ttl=30)
    try:
        w1.save(state(0), step=0)
        # w1 stalls (a long pause): its lease expires without renewal
        w1.lease._stop.set()
        expired = json.dumps({"owner": w1.lease.owner, "host": "h", "pid": 1,
                              "expires_at": time.time() - 1}).encode()
        w1.lease._etag = w1.backend.put_if_match(LEASE_NAME, expired, w1.lease._etag)
        w2.save(state(1), step=1)  # takes the expired lease over (compare-and-swap)
        w1.lease._expires = time.time()  # w1 wakes up: its check must renew, and fails
        with pytest.raises(StoreLockedError, match="lost"):
            w1.save(state(2), step=2)
        assert not w1.backend.exists("manifests/00000000000000000002.manifest")
        assert w2.steps() == [0, 1]
    finally:
        w1.close()
        w2.close()
    with open_s3(s3, url, str(tmp_path / "3")) as st:
        assert st.steps() == [0, 1]
        assert_state_equal(st.load(1), state(1))
        g = st.gc()  # w1's packs of step 2 were never referenced
        assert st.verify().ok and g.objects_deleted >= 1


def test_a_crashed_upload_is_invisible_and_gc_aborts_it(s3, tmp_path):
    url = f"s3://{s3.prefix()}"
    with open_s3(s3, url, str(tmp_path / "c")) as st:
        st.save(state(0), step=0)
    crashed = FsspecBackend(s3.fs(), url[len("s3://"):], part_size=5 * MiB)
    w = crashed.create("packs/ab/" + "ab" * 16 + ".pack")
    w.write(os.urandom(10 * MiB))  # one part sent, then the writer "dies"
    w._parts[0][1].result()
    assert [n for n in crashed.list() if n.startswith("packs/ab")] == []
    with open_s3(s3, url, str(tmp_path / "c")) as st:
        assert st.steps() == [0]
        g = st.gc()
        assert g.objects_deleted == 1  # the upload, aborted
        up = st.backend.call("list_multipart_uploads", Bucket=st.backend.bucket,
                             Prefix=st.backend._prefix)
        assert not up.get("Uploads")
        assert_state_equal(st.load(0), state(0))


@pytest.mark.parametrize("fault", [
    Fault("PUT", "status", query="partNumber", times=2, status=503),
    Fault("PUT", "status", path="/manifests/", times=1, status=500),
    Fault("PUT", "drop", query="partNumber", times=1, after_bytes=1 * MiB),
])
def test_transient_faults_are_retried_and_the_save_succeeds(s3, tmp_path, fault):
    url = f"s3://{s3.prefix()}"
    with open_s3(s3, url, str(tmp_path / "c"), fs=s3.fs()) as st:
        st.save(state(0), step=0)
        s3.inject(fault)
        st.save(state(1, big=True), step=1)
        assert fault.hits == fault.times  # the fault did happen
        s3.clear()
        assert_state_equal(st.load(1), state(1, big=True))
        assert st.verify().ok


@pytest.mark.parametrize("fault", [
    Fault("PUT", "status", query="partNumber", times=10**6, status=503),
    Fault("PUT", "drop", query="partNumber", times=10**6, after_bytes=64 * 1024),
    Fault("PUT", "status", path="/manifests/", times=10**6, status=503),
])
def test_persistent_faults_fail_the_save_cleanly(s3, tmp_path, fault):
    url = f"s3://{s3.prefix()}"
    # botocore's own retries back off for seconds: the s3fs layer's are enough here
    fs = fail_fast_fs(s3, retries={"max_attempts": 1, "mode": "standard"})
    with open_s3(s3, url, str(tmp_path / "c"), fs=fs) as st:
        st.save(state(0), step=0)
        s3.inject(fault)
        with pytest.raises(StorageError, match="nothing was committed"):
            st.save(state(1, big=True), step=1)
        s3.clear()
        assert st.steps() == [0]
        assert_state_equal(st.load(0), state(0))
        st.save(state(1), step=1)  # the store still works
    with open_s3(s3, url, str(tmp_path / "fresh")) as st:  # and another cache agrees
        assert st.steps() == [0, 1]
        assert_state_equal(st.load(1), state(1))
        st.gc()
        assert st.verify().ok
        assert not st.backend.call("list_multipart_uploads", Bucket=st.backend.bucket,
                                   Prefix=st.backend._prefix).get("Uploads")


def test_a_slow_reply_times_out_and_is_retried(s3, tmp_path):
    url = f"s3://{s3.prefix()}"
    with open_s3(s3, url, str(tmp_path / "c"), fs=fail_fast_fs(s3), readahead=0) as st:
        st.save(state(0), step=0)
        rule = Fault("GET", "delay", path="/packs/", times=1, seconds=1.6)
        s3.inject(rule)
        t0 = time.monotonic()
        assert_state_equal(st.load(0), state(0))
        assert rule.hits == 1 and time.monotonic() - t0 >= 1.0  # waited for the timeout


def test_open_refuses_bad_targets(s3, tmp_path):
    prefix = s3.prefix()
    with pytest.raises(deltackpt.InvalidStoreError, match="no deltackpt store"):
        open_s3(s3, f"s3://{prefix}", str(tmp_path / "c"), create=False)
    be = FsspecBackend(s3.shared_fs(), prefix)
    be.put("manifests/00000000000000000001.manifest", b"x")
    with pytest.raises(deltackpt.InvalidStoreError, match="refusing to create"):
        open_s3(s3, f"s3://{prefix}", str(tmp_path / "c"))
    other = s3.prefix()
    open_s3(s3, f"s3://{other}", str(tmp_path / "d")).close()
    with pytest.raises(deltackpt.InvalidStoreError, match="block_size"):
        open_s3(s3, f"s3://{other}", str(tmp_path / "d"), block_size=8192)
    with pytest.raises(TypeError, match="object-storage"):
        deltackpt.open(str(tmp_path / "local"), cache_dir=str(tmp_path))


def test_a_backend_instance_and_fsspec_memory_urls_are_persistent_stores(s3, tmp_path):
    # format.md §18 Q15: a FsspecBackend instance gets a config, manifests and a cache
    be = FsspecBackend(s3.shared_fs(), s3.prefix(), part_size=5 * MiB)
    with deltackpt.open(be, cache_dir=str(tmp_path / "a"), block_size=65536) as st:
        st.save(state(3), step=3)
    assert be.exists("deltackpt.json")
    with deltackpt.open(be, cache_dir=str(tmp_path / "b")) as st:
        assert_state_equal(st.load(3), state(3))
    url = f"fsspec+memory://t-{os.path.basename(tmp_path)}/store"
    with deltackpt.open(url, cache_dir=str(tmp_path / "m"), block_size=65536) as st:
        st.save(state(0), step=0)
        st.save(state(1), step=1)
    with deltackpt.open(url, cache_dir=str(tmp_path / "m2")) as st:
        assert st.steps() == [0, 1]
        assert_state_equal(st.load(1), state(1))
    with open(tmp_path / "m" / "index.sqlite", "r+b") as f:  # a damaged cache...
        f.write(b"not a database" * 100)
    with deltackpt.open(url, cache_dir=str(tmp_path / "m")) as st:  # ...is rebuilt
        assert st.steps() == [0, 1] and st.last_refresh == "incremental"
        assert_state_equal(st.load(0), state(0))
    with deltackpt.open("memory://") as st:  # still deltackpt's own in-process store
        assert not isinstance(st, RemoteStore)


def test_readahead_windows_return_exact_ranges(s3):
    be = FsspecBackend(s3.shared_fs(), s3.prefix(), readahead=1 * MiB, prefetch=2)
    data = os.urandom(3 * MiB + 12345)
    be.put("packs/aa/w.pack", data)
    n0 = be.requests.get("get_object", 0)
    off = 8
    while off < len(data):  # a sequential load: frames of ~300 KiB, across window edges
        ln = min(300_001, len(data) - off)
        assert be.read("packs/aa/w.pack", off, ln) == data[off:off + ln]
        off += ln
    gets = be.requests["get_object"] - n0
    assert gets <= 4 + 2  # the 4 windows (+ at most the prefetches past the end)
    for off, ln in [(0, 8), (MiB - 3, 6), (2 * MiB + 1, MiB), (len(data) - 1, 1)]:
        assert be.read("packs/aa/w.pack", off, ln, window=True) == data[off:off + ln]
    for off, ln in [(len(data) - 1, 2), (len(data), 1), (4 * MiB, 10)]:
        with pytest.raises(deltackpt.CorruptionError):
            be.read("packs/aa/w.pack", off, ln, window=True)
    be.delete("packs/aa/w.pack")  # no stale window outlives the object
    with pytest.raises(FileNotFoundError):
        be.read("packs/aa/w.pack", 8, 100)


def test_many_packs_are_listed_per_subdirectory(s3):
    be = FsspecBackend(s3.shared_fs(), s3.prefix())
    names = [f"packs/{h}/{h}{i:030x}.pack" for h in ("00", "7f", "ff") for i in range(3)]
    for n in names + ["manifests/00000000000000000001.manifest"]:
        be.put(n, b"x")
    be.list_page = 2  # so that "packs/" does not fit in one page
    be.requests.clear()
    assert be.list("packs/") == sorted(names)
    assert be.requests["list_objects_v2"] > 256  # one listing per subdirectory
    assert be.list() == sorted(names + ["manifests/00000000000000000001.manifest"])


def test_cli_reindex_of_an_s3_url_rebuilds_this_machines_cache(s3, tmp_path, monkeypatch):
    """`deltackpt reindex s3://…` rebuilds the local index cache (default location, S3
    credentials and endpoint from the environment) from the store's manifests and packs."""
    from click.testing import CliRunner

    from deltackpt.cli import main

    url = f"s3://{s3.prefix()}"
    with open_s3(s3, url, str(tmp_path / "writer")) as st:
        st.save(state(0), step=0)
        st.save(state(1), step=1)
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_ENDPOINT_URL": s3.endpoint, "AWS_DEFAULT_REGION": "us-east-1",
                       "XDG_CACHE_HOME": str(tmp_path / "xdg")}.items():
        monkeypatch.setenv(key, value)
    runner = CliRunner()
    r = runner.invoke(main, ["log", url, "--json"])  # fills the default cache
    assert r.exit_code == 0, r.output
    cache = next((tmp_path / "xdg").rglob("index.sqlite"))
    with open(cache, "r+b") as f:
        f.write(b"damaged " * 512)
    r = runner.invoke(main, ["reindex", url, "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert sorted(out["steps_recovered"]) == [0, 1] and out["steps_lost"] == {}
    assert out["packs_scanned"] >= 2
    with deltackpt.open(url) as st:  # the cache the CLI rebuilt, used as it is
        assert st.last_refresh == "none"
        assert_state_equal(st.load(1), state(1))


def test_a_cache_rebuilt_under_a_writer_never_leads_its_gc_to_delete_a_step(tmp_path):
    """Found in review. One machine, one cache: `reindex URL` needs the writer's lease; and
    a cache rebuilt by another process (a reader's refresh after deletes) that missed a step
    committed meanwhile is caught up by the writer's gc before it deletes anything."""
    url = f"fsspec+memory://race-{os.path.basename(tmp_path)}/store"
    cache = str(tmp_path / "cache")
    writer = deltackpt.open(url, cache_dir=cache, block_size=65536)
    try:
        writer.save(state(0), step=0)
        writer.save(state(1), step=1)
        with deltackpt.open(url, cache_dir=cache) as other, pytest.raises(StoreLockedError):
            other.rebuild_cache()
        # a rebuild in place (what a reader's refresh does) that misses a step the writer
        # commits while it runs
        reader = deltackpt.open(url, cache_dir=cache)
        real = reader._scan_many

        def scan_then_commit(names):
            out = real(names)
            writer.save(state(2), step=2)
            return out

        reader._scan_many = scan_then_commit
        listing = reader.backend.list_info("manifests/")
        listing.update(reader.backend.list_info("packs/"))
        from deltackpt.remote import _Listed

        reader._rebuild(_Listed(reader.backend, listing), listing)
        reader.close()
        assert 2 not in writer.steps()  # the shared cache lost step 2...
        writer.gc()                     # ...and gc must not delete it
    finally:
        writer.close()
    with deltackpt.open(url, cache_dir=str(tmp_path / "fresh")) as fresh:
        assert fresh.steps() == [0, 1, 2]
        assert_state_equal(fresh.load(2), state(2))


@pytest.mark.parametrize("same_state", [False, True], ids=["new-state", "same-state"])
def test_a_cache_without_etags_rebuilds_when_a_load_finds_a_rewritten_manifest(
        tmp_path, same_state):
    """Without ETags (fsspec memory, local files) a listing cannot show that a step's
    manifest was rewritten under the same name (the store recreated, a step deleted and
    saved anew elsewhere). The load's cross-check with the manifest catches a new state;
    the same state in new packs shows as a missing pack. Either way a cache, unlike a local
    index, is then rebuilt and the load re-planned."""
    import fsspec

    url = f"fsspec+memory://stale-{same_state}-{os.path.basename(tmp_path)}/s"
    old_cache = str(tmp_path / "old")
    with deltackpt.open(url, cache_dir=old_cache, block_size=65536) as s:
        s.save(state(1), step=2, metrics={"loss": 1.0})
    fsspec.filesystem("memory").rm(f"/stale-{same_state}-{os.path.basename(tmp_path)}",
                                   recursive=True)
    with deltackpt.open(url, cache_dir=str(tmp_path / "other"), block_size=65536) as s:
        s.save(state(1 if same_state else 2), step=2, metrics={"loss": 2.0})
    with deltackpt.open(url, cache_dir=old_cache) as s:
        assert s.info(2).metrics == {"loss": 1.0}  # what the listing cannot show
        assert_state_equal(s.load(2), state(1 if same_state else 2))
        assert s.last_refresh == "rebuild" and s.info(2).metrics == {"loss": 2.0}


@pytest.mark.parametrize("commit", ["save", "commit_external"])
def test_a_reader_sharing_the_cache_may_take_a_step_in_before_its_writer_commits(
        tmp_path, monkeypatch, commit):
    """Between a writer's manifest PUT and its index transaction, a reader sharing the
    cache directory refreshes and takes the new step in from that manifest: the writer's
    commit then finds its own rows there and keeps them instead of failing on them."""
    import deltackpt.store as store_mod

    url = f"fsspec+memory://taken-{commit}-{os.path.basename(tmp_path)}/store"
    cache = str(tmp_path / "cache")
    writer = deltackpt.open(url, cache_dir=cache, block_size=65536)
    reader = deltackpt.open(url, cache_dir=cache)
    took: list[list[int]] = []

    def reader_refreshes():
        reader.refresh()
        took.append(reader.steps())

    try:
        writer.save(state(0), step=0)
        if commit == "save":
            real_crash_point = store_mod.crash_point

            def at(name):
                if name == "save:after-manifest":
                    reader_refreshes()
                real_crash_point(name)

            monkeypatch.setattr(store_mod, "crash_point", at)
            writer.save(state(1), step=1, metrics={"loss": 0.5})
        else:
            from torch.distributed.checkpoint import save as dcp_save

            from deltackpt.dcp import StorageWriter  # the coordinator's commit_external

            real_put = writer.backend.put

            def put(name, data):
                real_put(name, data)
                if name.startswith("manifests/"):
                    reader_refreshes()

            monkeypatch.setattr(writer.backend, "put", put)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "assuming the intent is ... single process"
                dcp_save({"w": det_floats((40000,), 7)},
                         storage_writer=StorageWriter(writer, step=1), no_dist=True)
        assert took == [[0, 1]], took  # the reader did take step 1 in first
        assert writer.steps() == [0, 1] and reader.steps() == [0, 1]
        expected = state(1) if commit == "save" else None
        if expected is not None:
            assert_state_equal(writer.load(1), expected)
            assert writer.info(1).metrics == {"loss": 0.5}
        assert writer.verify().ok
    finally:
        reader.close()
        writer.close()
    with deltackpt.open(url, cache_dir=str(tmp_path / "fresh")) as fresh:
        assert fresh.steps() == [0, 1]
        assert fresh.verify().ok


def test_reindex_keeps_the_frame_whose_delta_chain_resolves(tmp_path):
    """Found in review: a stale writer's duplicate frame of a stored block, a delta against a
    block gc has since removed, must not make reindex report healthy steps lost."""
    import numpy as np

    from deltackpt import codec
    from deltackpt.packs import PackWriter
    from deltackpt.reindex import reindex

    path = str(tmp_path / "s")
    with deltackpt.open(path, block_size=65536) as st:
        st.save(state(1), step=1)
        st.save(state(2), step=2)
        (blob,) = st._index.query("SELECT blocks FROM entries WHERE step=2 AND "
                                  "path='model/w'")[0]
        bid = blob[:16]
        raw = st.load(2)["model"]["w"].view(torch.uint8).numpy()[:65536]
        # the same block again, as a delta against a block the store no longer has
        gone = b"\x42" * 16
        parts = codec.encode(raw, bid, 4, st.config.codec, base=np.zeros_like(raw),
                             base_id=gone, delta=codec.DELTA_XOR)
        writer = PackWriter(st.backend, 1 << 30)
        writer.add(parts)
        (name, _size), = writer.finish()
        st.backend.sync()
    first = os.path.join(path, "packs", "00", "0" * 32 + ".pack")  # first in name order
    os.makedirs(os.path.dirname(first), exist_ok=True)
    os.replace(os.path.join(path, name), first)
    r = reindex(path)
    assert r.steps_lost == {} and sorted(r.steps_recovered) == [1, 2]
    with deltackpt.open(path) as st:
        assert_state_equal(st.load(2), state(2))
        assert st.verify().ok


def test_a_step_deleted_while_a_cache_catches_up_is_gone_not_an_error(tmp_path, monkeypatch):
    """Found in review: a manifest listed, then deleted by the writer before the reader read
    it (60 of 420 refreshes in a stress run) failed the open with FileNotFoundError."""
    url = f"fsspec+memory://race-del-{os.path.basename(tmp_path)}/s"
    with deltackpt.open(url, cache_dir=str(tmp_path / "w"), block_size=65536) as w:
        w.save(state(1), step=1)
        w.save(state(2), step=2)
    real = RemoteStore._manifest

    def deleted_after_listing(self, name, listing):
        if name.endswith("1.manifest"):
            raise FileNotFoundError(name)
        return real(self, name, listing)

    monkeypatch.setattr(RemoteStore, "_manifest", deleted_after_listing)
    with deltackpt.open(url, cache_dir=str(tmp_path / "r")) as r:
        assert r.steps() == [2]
        assert_state_equal(r.load(2), state(2))


def test_a_damaged_scan_cache_is_set_aside_and_refilled(tmp_path):
    url = f"fsspec+memory://scans-{os.path.basename(tmp_path)}/s"
    cache = tmp_path / "c"
    with deltackpt.open(url, cache_dir=str(cache), block_size=65536) as s:
        s.save(state(1), step=1)
    (cache / "scans.sqlite").write_bytes(b"this is not a database" * 100)
    (cache / "index.sqlite").unlink()
    with deltackpt.open(url, cache_dir=str(cache)) as s:
        assert_state_equal(s.load(1), state(1))
    assert any(p.name.startswith("scans.sqlite.broken-") for p in cache.iterdir())


def test_url_schemes_ignore_case_and_a_cache_serves_one_store(tmp_path):
    name = f"case-{os.path.basename(tmp_path)}"
    cache = str(tmp_path / "c")
    with deltackpt.open(f"FSSPEC+MEMORY://{name}/s", cache_dir=cache, block_size=65536) as s:
        assert isinstance(s, RemoteStore)  # not a local directory named 'FSSPEC+MEMORY:'
        s.save(state(1), step=1)
    assert not os.path.exists("FSSPEC+MEMORY:")
    with deltackpt.open(f"fsspec+memory://{name}/s", cache_dir=cache) as s:
        assert s.steps() == [1]
    with pytest.raises(deltackpt.InvalidStoreError, match="is the cache of"):
        deltackpt.open(f"fsspec+memory://{name}/other", cache_dir=cache)


@pytest.mark.parametrize("url", ["fsspec+file:///tmp/x/store", "fsspec+local://x/store"])
def test_a_local_directory_through_fsspec_is_refused_with_the_way_to_open_it(url, tmp_path):
    # the object-store backend assumes flat keys: through fsspec's local filesystem an
    # absolute path turned relative, saves failed and other processes saw no steps
    with pytest.raises(deltackpt.InvalidStoreError, match="opened by its path"):
        deltackpt.open(url, cache_dir=str(tmp_path / "c"))
