"""A DCP rank on object storage catches up with only what its own keys need.

Two "ranks" run in one process: each has its own StorageWriter and index cache, and the
test drives DCP's save protocol by hand (what ``dcp.save`` does over a process group),
against fsspec's in-memory filesystem. Rank 1's cache must not read rank 0's packs before
it writes; every step must still load bit-exact, and rank 1's partial cache must become
the same index as a fresh one once anything else uses it.
"""

from __future__ import annotations

import contextlib
import uuid

import pytest
import torch
from helpers import assert_state_equal, block_rows, det_floats, entry_block_ids
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

import deltackpt
from deltackpt import packs
from deltackpt.dcp import StorageWriter, load_full
from deltackpt.reindex import is_partial
from deltackpt.remote import RemoteStore

pytest.importorskip("fsspec")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

OPTS = {"threads": 1, "block_size": 4096}


def _state(rank: int, step: int, name: str | None = None, junk: bool = False) -> dict:
    """Rank ``rank``'s part of the state at ``step``: a few blocks change every step
    (``junk``: one more entry, written beside them, for a test to thin away)."""
    w = det_floats((64, 256), 10 + rank)            # 16 blocks of 4 KiB
    w[::7] += step * 1e-3
    part = {"w": w, "m": det_floats((1024,), 20 + rank) * step}
    if junk:
        part["junk"] = det_floats((4096,), 30 + rank + 100 * step)
    return {name or f"r{rank}": part}


def _save(writers: list[StorageWriter], states: list[dict], step: int) -> None:
    """DCP's save protocol (state_dict_saver._save_state_dict) over len(writers) ranks."""
    planners = [DefaultSavePlanner() for _ in writers]
    local = []
    for rank, (w, p, sd) in enumerate(zip(writers, planners, states)):
        w.reset(step)
        p.set_up_planner(state_dict=sd, storage_meta=w.storage_meta(), is_coordinator=rank == 0)
        w.set_up_storage_writer(rank == 0, rank=rank, use_collectives=True)
        local.append(w.prepare_local_plan(p.create_local_plan()))
    plans, metadata = planners[0].create_global_plan(local)
    plans = writers[0].prepare_global_plan(plans)
    results = [w.write_data(p.finish_plan(plan), p).value()
               for w, p, plan in zip(writers, planners, plans)]
    writers[0].finish(metadata, results)


def _rank_store(writer: StorageWriter, rank: int) -> RemoteStore:
    """The store a non-coordinator writer opens (DCP sets the rank up first)."""
    writer.set_up_storage_writer(False, rank=rank, use_collectives=True)
    return writer._writer_store(False)


class _Reads:
    """Counts what a rank's store reads: pack scans and object reads by prefix."""

    def __init__(self, store: RemoteStore, monkeypatch) -> None:
        self.scanned: list[str] = []
        self.reads: list[str] = []
        scan_many, read = store._scan_many, store.backend.read

        def counting_scan(names):
            self.scanned.extend(names)
            return scan_many(names)

        def counting_read(name, *a, **kw):
            self.reads.append(name)
            return read(name, *a, **kw)

        monkeypatch.setattr(store, "_scan_many", counting_scan)
        monkeypatch.setattr(store.backend, "read", counting_read)


@pytest.fixture
def url():
    return f"fsspec+memory://catchup/{uuid.uuid4().hex}"


def _writers(url: str, tmp_path, tag: str = "") -> list[StorageWriter]:
    return [StorageWriter(url, cache_dir=str(tmp_path / f"c{r}{tag}"), **OPTS) for r in (0, 1)]


def _check_steps(url: str, tmp_path, expected: dict[int, dict]) -> None:
    """Every step through a fresh cache, and the DCP-free reassembly: bit-exact."""
    cache = str(tmp_path / f"fresh-{uuid.uuid4().hex[:6]}")
    with deltackpt.open(url, cache_dir=cache) as s:
        assert s.steps() == sorted(expected)
        assert not s.verify().problems
        _check_depths(s)
    for step, state in expected.items():
        full = load_full(url, step, cache_dir=cache)
        for part in state.values():
            for name, part_state in part.items():
                for key, t in part_state.items():
                    assert_state_equal(full[f"{name}.{key}"], t, f"{step}:{name}.{key}")


def _check_depths(store) -> None:
    """Every block's recorded depth is the length of its delta chain."""
    rows = {r["id"]: r for r in block_rows(store)}
    for bid, r in rows.items():
        hops, cur = 0, r["base"]
        while cur is not None:
            hops, cur = hops + 1, rows[cur]["base"]
        assert r["depth"] == hops, (bid.hex(), r["depth"], hops)


def _rows(store) -> list[tuple]:
    return sorted((r["id"], r["pack"], r["offset"], r["length"], r["base"], r["depth"],
                   r["first_step"]) for r in block_rows(store))


def test_rank_reads_only_the_parent_manifest(url, tmp_path, monkeypatch):
    writers = _writers(url, tmp_path)
    expected = {}
    for step in (1, 2, 3, 4):
        states = [_state(0, step), _state(1, step)]
        if step > 1:
            reads = _Reads(_rank_store(writers[1], 1), monkeypatch)
        _save(writers, states, step)
        expected[step] = {r: s for r, s in enumerate(states)}
        if step > 1:
            rank1 = writers[1]._store
            assert rank1.last_refresh == "scoped"
            assert reads.scanned == []                          # no pack of rank 0 read
            assert reads.reads == [f"manifests/{step - 1:020d}.manifest"]
            assert is_partial(rank1._index)
            info = writers[0].last_result
            assert 0 < info.new_chunks < info.total_chunks      # rank 1 deduped its blocks
            monkeypatch.undo()
    with deltackpt.open(url, cache_dir=str(tmp_path / "c0")) as s:
        rows = {r["id"]: r for r in block_rows(s)}
        new1 = [rows[b] for p, ids in entry_block_ids(s, 4).items() if p.startswith("r1")
                for b in ids if rows[b]["first_step"] == 4]
        assert new1 and any(r["base"] is not None for r in new1)  # rank 1 wrote deltas
    for w in writers:
        w.close()
    _check_steps(url, tmp_path, expected)
    with deltackpt.open(url, cache_dir=str(tmp_path / "c0")) as s:
        _check_depths(s)                                        # as the coordinator recorded
    # rank 1's partial index is a file of its own: the cache directory's shared index is
    # never partial; a refresh of the rank's index rebuilds it into what a fresh cache holds
    with deltackpt.open(url, cache_dir=str(tmp_path / "c1")) as s:
        assert not is_partial(s._index)
    with deltackpt.open(url, cache_dir=str(tmp_path / "c1"),
                        cache_index="dcp-rank1.sqlite") as s:
        assert s.last_refresh == "rebuild" and not is_partial(s._index)
        partial_rebuilt = _rows(s)
        assert not s.verify().problems
    with deltackpt.open(url, cache_dir=str(tmp_path / "other")) as s:
        assert _rows(s) == partial_rebuilt


def test_new_writer_per_save_and_deleted_steps(url, tmp_path, monkeypatch):
    """A writer made for each save (no bases kept in memory) still catches up scoped,
    reading its bases from its own packs; steps deleted meanwhile are dropped."""
    expected = {}
    for step in (1, 2, 3, 4, 5):
        states = [_state(0, step), _state(1, step)]
        writers = _writers(url, tmp_path)
        if step == 4:
            with deltackpt.open(url, cache_dir=str(tmp_path / "admin")) as s:
                s.delete(1)
                s.delete(2)
            del expected[1], expected[2]
        if step > 1:
            reads = _Reads(_rank_store(writers[1], 1), monkeypatch)
        _save(writers, states, step)
        expected[step] = {r: s for r, s in enumerate(states)}
        if step > 1:
            assert writers[1]._store.last_refresh == "scoped"
            assert reads.scanned == []
            packs = {n for n in reads.reads if n.startswith("packs/")}
            rank1_packs = {r[1] for r in _rows(writers[1]._store)}
            assert packs and packs <= rank1_packs               # its own bases only
            steps = [r[0] for r in writers[1]._store._index.query("SELECT step FROM steps")]
            assert steps == sorted(expected)[:-1]               # deleted steps dropped
            monkeypatch.undo()
        for w in writers:
            w.close()
    _check_steps(url, tmp_path, expected)


def test_repacked_bases_and_moved_keys(url, tmp_path):
    expected = {}
    writers = _writers(url, tmp_path)
    for step in (1, 2):
        # step 2 is step 1 without its junk: every block it keeps lives in step 1's packs
        states = [_state(0, 1, junk=step == 1), _state(1, 1, junk=step == 1)]
        _save(writers, states, step)
        expected[step] = dict(enumerate(states))
    for w in writers:
        w.close()
    # gc rewrites every pack with any dead frame: step 1's hold the dead junk, so rank 1's
    # bases (step 2's blocks) move to new packs
    with deltackpt.open(url, cache_dir=str(tmp_path / "admin")) as s:
        s.delete(1)
        assert s.gc(repack_threshold=1.0).packs_rewritten
    del expected[1]
    writers = _writers(url, tmp_path)
    states = [_state(0, 3), _state(1, 3)]
    _save(writers, states, 3)
    expected[3] = dict(enumerate(states))
    # rank 1 located its bases where they were: it wrote those blocks as keyframes
    assert writers[1]._store.last_refresh == "scoped"
    with deltackpt.open(url, cache_dir=str(tmp_path / "admin")) as s:
        rows = {r["id"]: r for r in block_rows(s)}
        new1 = [rows[b] for p, ids in entry_block_ids(s, 3).items() if p.startswith("r1")
                for b in ids if rows[b]["first_step"] == 3]
        assert new1 and all(r["base"] is None for r in new1)
    _save(writers, [_state(0, 4), _state(1, 4)], 4)             # deltas again
    expected[4] = dict(enumerate([_state(0, 4), _state(1, 4)]))
    assert writers[1]._store.last_refresh == "scoped"
    # the sharding changes: rank 1 now saves what rank 0 saved (its parent blocks are not
    # in rank 1's own packs), rank 0 a new key
    states = [_state(0, 5, name="r9"), _state(1, 5, name="r0")]
    _save(writers, states, 5)
    expected[5] = {0: states[0], 1: states[1]}
    assert writers[1]._store.last_refresh != "scoped"
    for w in writers:
        w.close()
    _check_steps(url, tmp_path, expected)


def test_lease_is_released_without_etags(url, tmp_path):
    """Off S3 there are no ETags: closing a writer must still delete its lease (it used to
    stay until it expired, so the next writer waited a whole ttl)."""
    with deltackpt.open(url, cache_dir=str(tmp_path / "a")) as s:
        s.save({"x": torch.zeros(3)}, step=1)
        assert s.backend.exists("lease.json")
    assert not s.backend.exists("lease.json")
    with deltackpt.open(url, cache_dir=str(tmp_path / "b")) as s:
        s.save({"x": torch.ones(3)}, step=2)                   # no wait for a ttl
        # a lease another owner took over is left alone
        s.backend.put("lease.json", b'{"owner": "someone", "expires_at": 1e12}')
    assert s.backend.read("lease.json") == b'{"owner": "someone", "expires_at": 1e12}'


def test_ranks_sharing_one_cache(url, tmp_path):
    """Ranks on one node share the default cache directory: each finds its own blocks
    there, whichever of them ingested the parent step first."""
    shared = str(tmp_path / "node")
    writers = [StorageWriter(url, cache_dir=str(tmp_path / "c0"), **OPTS),
               StorageWriter(url, cache_dir=shared, **OPTS),
               StorageWriter(url, cache_dir=shared, **OPTS)]
    expected = {}
    for step in (1, 2, 3):
        states = [_state(r, step) for r in range(3)]
        _save(writers, states, step)
        expected[step] = dict(enumerate(states))
        if step > 1:
            assert [w._store.last_refresh for w in writers[1:]] == ["scoped", "scoped"]
    for w in writers:
        w.close()
    _check_steps(url, tmp_path, expected)


def test_a_store_open_on_the_ranks_cache_dir_loads_every_step(url, tmp_path):
    """The rank's partial index is its own file: another process's store on the same
    (per-node default) cache directory stays complete and loads each step."""
    writers = [StorageWriter(url, cache_dir=str(tmp_path / "c0"), **OPTS),
               StorageWriter(url, cache_dir=str(tmp_path / "node"), **OPTS)]
    other = deltackpt.open(url, cache_dir=str(tmp_path / "node"), **OPTS)
    try:
        for step in (1, 2, 3):
            states = [_state(0, step), _state(1, step)]
            _save(writers, states, step)
            other.refresh(check_packs=False)
            got = other.load(step)
            for state in states:
                for name, part in state.items():
                    for key, t in part.items():
                        assert_state_equal(got[f"{name}.{key}"], t, f"{step}:{name}.{key}")
        assert writers[1]._store.last_refresh == "scoped"
    finally:
        other.close()
        for w in writers:
            w.close()


@pytest.mark.parametrize("order", ["ascending", "descending"])
def test_blocks_two_ranks_write_in_one_step(url, tmp_path, monkeypatch, order):
    """Both ranks write the same new block in one save, rank 0 as a delta and rank 1 as a
    keyframe. The coordinator and a rebuilt index keep the same copy (the shorter chain),
    whichever pack lists first; depths are true chain lengths within max_depth; every step
    loads bit-exact."""
    names = iter(range(10**6, 0, -1) if order == "descending" else range(10**6))
    monkeypatch.setattr(packs, "new_pack_name", lambda: f"packs/00/{next(names):032d}.pack")
    opts = dict(OPTS, delta="xor:chain:2:aligned")
    writers = [StorageWriter(url, cache_dir=str(tmp_path / f"c{r}"), **opts) for r in (0, 1)]
    a, z = det_floats((1024,), 1), det_floats((1024,), 2)
    c = a.clone()
    c[::50] += 1e-3
    steps = {1: [{"a": a}, {"z": z}], 2: [{"a": c}, {"z": z, "b": c.clone()}]}
    x = c
    for step in range(3, 9):
        x = x.clone()
        x[::50] += 1e-3 * step
        steps[step] = [{"a": c}, {"z": z, "b": x}]
    for step, states in steps.items():
        _save(writers, states, step)
    for w in writers:
        w.close()
    rows = {}
    for cache in ("c0", "fresh"):  # as the coordinator recorded it, and rebuilt
        with deltackpt.open(url, cache_dir=str(tmp_path / cache)) as s:
            rows[cache] = {r[0]: r[1:] for r in _rows(s)}
            _check_depths(s)
            assert max(r["depth"] for r in block_rows(s)) <= 2
            for step, states in steps.items():
                got = s.load(step)
                for part in states:
                    for key, t in part.items():
                        assert_state_equal(got[key], t, f"{step}:{key}")
    assert {b: rows["fresh"][b] for b in rows["c0"]} == rows["c0"]


def test_renamed_keys_still_dedup(url, tmp_path):
    """Keys renamed between saves (a model wrapped in another module): no delta base by
    name, but unchanged blocks are still found stored through the parent."""
    writers = _writers(url, tmp_path)
    _save(writers, [_state(0, 1), _state(1, 1)], 1)
    _save(writers, [_state(0, 1, name="wrapped.r0"), _state(1, 1, name="wrapped.r1")], 2)
    assert writers[0].last_result.new_chunks == 0
    for w in writers:
        w.close()


def test_keyframe_policy_catches_up_in_full(url, tmp_path):
    """Under the keyframe policy a base is a chain's root, which the parent need not
    reference: the rank catches up in full, and saves go on after delete + gc."""
    writers = [StorageWriter(url, cache_dir=str(tmp_path / f"c{r}"), delta="xor:keyframe:3",
                             **OPTS) for r in (0, 1)]
    expected = {}
    for step in (1, 2, 3, 4, 5, 6):
        if step == 5:
            writers[0]._store.delete(1)
            writers[0]._store.delete(2)
            writers[0]._store.gc(repack_threshold=1.0)
            del expected[1], expected[2]
        states = [_state(0, step), _state(1, step)]
        _save(writers, states, step)
        expected[step] = dict(enumerate(states))
        assert writers[1]._store.last_refresh != "scoped"
    for w in writers:
        w.close()
    _check_steps(url, tmp_path, expected)


def test_the_coordinator_records_true_depths_not_reported_ones(url, tmp_path, monkeypatch):
    """A rank's view of a chain can be shorter than the copy the store kept: the coordinator
    computes each new block's depth from its own index."""
    writers = _writers(url, tmp_path)
    _save(writers, [_state(0, 1), _state(1, 1)], 1)
    store1 = _rank_store(writers[1], 1)
    write = store1._write_new_blocks

    def shallow(*a, **kw):
        new_blocks, written = write(*a, **kw)
        return {b: (*v[:6], 0) for b, v in new_blocks.items()}, written

    monkeypatch.setattr(store1, "_write_new_blocks", shallow)
    for step in (2, 3):
        _save(writers, [_state(0, step), _state(1, step)], step)
    for w in writers:
        w.close()
    with deltackpt.open(url, cache_dir=str(tmp_path / "c0")) as s:
        assert max(r["depth"] for r in block_rows(s)) == 2
        _check_depths(s)


def test_a_value_that_comes_back_never_makes_a_delta_cycle(url, tmp_path, monkeypatch):
    """X -> Y -> X at a rank's key: the rank writes X again as a delta of Y (Y being a delta
    of X). A rebuilt index taking that dead copy would hold a cycle, and its gc would drop
    X's keyframe. Every cache loads every step, before and after gc from a fresh cache."""
    names = iter(range(10**6, 0, -1))  # later packs list first: a stale copy is met first
    monkeypatch.setattr(packs, "new_pack_name", lambda: f"packs/00/{next(names):032d}.pack")
    writers = _writers(url, tmp_path)
    x = det_floats((2048,), 1)
    y = x.clone()
    y[::50] += 1e-3
    other = det_floats((1024,), 5)
    expected = {}
    for step, a in ((1, x), (2, y), (3, x)):
        states = [{"b": {"v": other}}, {"a": {"v": a}}]
        _save(writers, states, step)
        expected[step] = dict(enumerate(states))
    # rank 1 dedups only against the parent (Y): it wrote X again, a dead copy whose base
    # Y is a delta of X; the coordinator kept the stored X
    frames = writers[1]._store._scans.written_frames(3, "dcp-rank1.sqlite")[0]
    assert frames and all(f[5] is not None for f in frames.values())
    for w in writers:
        w.close()
    _check_steps(url, tmp_path, expected)
    with deltackpt.open(url, cache_dir=str(tmp_path / "gc")) as s:
        s.gc()
    _check_steps(url, tmp_path, expected)


def test_rebuild_refuses_cyclic_and_overlong_chains():
    from deltackpt.reindex import _missing_with_bases

    def frame(base):
        return ("p", 0, 1, 1, "c", base)

    x, y, z, k = b"x" * 16, b"y" * 16, b"z" * 16, b"k" * 16
    assert _missing_with_bases({x}, {x: frame(y), y: frame(x)}) == {x, y}
    assert not _missing_with_bases({x}, {x: frame(y), y: frame(k), k: frame(None)})
    assert _missing_with_bases({x}, {x: frame(z)}) == {x, z}
    chain = {bytes([i]) * 16: frame(bytes([i + 1]) * 16 if i < 65 else None) for i in range(66)}
    assert bytes([0]) * 16 in _missing_with_bases({bytes([0]) * 16}, chain)      # 65 hops
    assert not _missing_with_bases({bytes([1]) * 16}, chain)                       # 64 hops
    assert not _missing_with_bases({x}, {x: frame(y)}, known={y: 3})


def test_rebuild_choice_of_copies_reaches_a_fixed_point():
    """Z has copies Z->A (A gone) and Z->B; B has copies B'->Z (a stale rewrite) and a
    keyframe. Judged once in that order, Z would keep Z->A; the choice must settle on
    Z->B over B's keyframe."""
    from deltackpt.reindex import _choose_copies, _missing_with_bases

    def frame(pack, base):
        return (pack, 0, 1, 1, "c", base)

    z, a, b = b"z" * 16, b"a" * 16, b"b" * 16
    blocks = {z: frame("p1", a), b: frame("p2", z)}
    others = {z: [frame("p3", b)], b: [frame("p4", None)]}
    _choose_copies(blocks, others, {})
    assert blocks[z] == frame("p3", b) and blocks[b] == frame("p4", None)
    assert not _missing_with_bases({z}, blocks)


# -- manifest ETags on a filesystem whose listings carry them (as gcsfs and adlfs do) ---
def _etag_fs():
    import hashlib

    from fsspec.implementations.memory import MemoryFileSystem

    class ETagMemoryFS(MemoryFileSystem):
        protocol = "etagmemory"

        def info(self, path, **kw):
            out = dict(super().info(path, **kw))
            if out.get("type") == "file":
                out["etag"] = hashlib.md5(self.cat_file(path)).hexdigest()
            return out

        def find(self, path, maxdepth=None, withdirs=False, detail=False, **kw):
            found = super().find(path, maxdepth=maxdepth, withdirs=withdirs, detail=detail,
                                 **kw)
            return {k: self.info(k) for k in found} if detail else found

        def ls(self, path, detail=True, **kw):
            found = super().ls(path, detail=detail, **kw)
            if detail:
                found = [self.info(r["name"]) if r.get("type") == "file" else r for r in found]
            return found

    return ETagMemoryFS()


def test_own_saves_and_thins_never_rebuild_a_cache_on_an_etag_filesystem(url, tmp_path):
    fs = _etag_fs()
    with deltackpt.open(url, filesystem=fs, cache_dir=str(tmp_path / "w"), **OPTS) as s:
        for step in range(4):
            s.save(_state(0, step), step=step)
            if step:
                s.thin(step - 1, ["r0/w"])
            s.gc()
            assert s.last_refresh != "rebuild"
        assert s.backend.list_info("manifests/")[f"manifests/{3:020d}.manifest"]["etag"]
    with deltackpt.open(url, filesystem=fs, cache_dir=str(tmp_path / "w"), **OPTS) as s:
        assert s.last_refresh == "none"


def test_a_thin_whose_index_commit_failed_is_caught_up(url, tmp_path, monkeypatch):
    """The manifest was rewritten but the cache's transaction failed: the record of its
    ETag went with that transaction, so the next refresh rebuilds from the thinned one."""
    fs = _etag_fs()
    s = deltackpt.open(url, filesystem=fs, cache_dir=str(tmp_path / "w"), **OPTS)
    try:
        for step in range(2):
            s.save(_state(0, step), step=step)

        def failing(conn, manifest):
            raise RuntimeError("index write failed")

        monkeypatch.setattr(s, "_manifest_written", failing)
        with pytest.raises(Exception, match="index write failed"):
            s.thin(0, ["r0/w"])
        monkeypatch.undo()
        assert sorted(s.load(0)["r0"]) == ["m", "w"]          # the cache still has it all
        s.refresh(check_packs=False)
        assert s.last_refresh == "rebuild"
        assert sorted(s.load(0)["r0"]) == ["w"]
    finally:
        s.close()


def test_ranks_stay_scoped_when_an_older_step_is_thinned(url, tmp_path):
    """A rank dedups against its parent alone: a thin of an older step is no reason to
    catch up in full (the parent's manifest is compared by its ETag, the others not)."""
    fs = _etag_fs()
    writers = [StorageWriter(url, filesystem=fs, cache_dir=str(tmp_path / f"c{r}"), **OPTS)
               for r in (0, 1)]
    expected = {}
    for step in range(1, 6):
        states = [_state(0, step), _state(1, step)]
        _save(writers, states, step)
        expected[step] = dict(enumerate(states))
        if step > 1:
            assert writers[1]._store.last_refresh == "scoped"
        if step >= 3:
            writers[0]._store.thin(step - 2, ["__dcp__", "r0.w", "r0.m", "r1.w"])
    for w in writers:
        w.close()
    with deltackpt.open(url, filesystem=fs, cache_dir=str(tmp_path / "fresh")) as s:
        assert not s.verify().problems
        for step in (4, 5):
            got = s.load(step)
            for part in expected[step].values():
                for name, part_state in part.items():
                    for key, t in part_state.items():
                        assert_state_equal(got[f"{name}.{key}"], t, f"{step}:{name}.{key}")


@contextlib.contextmanager
def _writer_and_reader(url: str, tmp_path, steps: int):
    """A writer that saved ``steps`` steps and a reader, sharing one cache directory (as
    processes of one machine do by default)."""
    shared = str(tmp_path / "shared")
    writer = deltackpt.open(url, cache_dir=shared, **OPTS)
    reader = deltackpt.open(url, cache_dir=shared, **OPTS)
    try:
        for step in range(steps):
            writer.save(_state(0, step), step=step)
        yield writer, reader
    finally:
        reader.close()
        writer.close()


def _rebuild_now(store) -> None:
    """Make ``store``'s cache rebuild in full on its next refresh, and refresh it."""
    with store._index.write() as conn:
        conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('cache_partial', '1')")
    store.refresh(check_packs=False)


def test_a_rebuild_never_puts_back_what_a_process_sharing_the_cache_wrote(url, tmp_path):
    """A reader's rebuild lists the store, then the writer sharing its cache directory
    commits a new step, then the rebuild would replace the cache with what it listed:
    it starts over instead (the writer's gc would otherwise delete that step's pack)."""
    with _writer_and_reader(url, tmp_path, 2) as (writer, reader):
        reader.refresh(check_packs=False)
        read = reader._manifest
        calls = []

        def read_then_writer_saves(name, listing):
            if not calls:
                writer.save(_state(0, 2), step=2)       # after the reader's listing
            calls.append(name)
            return read(name, listing)

        reader._manifest = read_then_writer_saves
        _rebuild_now(reader)
        assert reader.last_refresh == "rebuild"
        assert reader.steps() == [0, 1, 2]
        writer.gc()
        assert_state_equal(writer.load(2)["r0"], _state(0, 2)["r0"])


def test_gc_keeps_what_it_wrote_when_a_reader_rebuilds_the_shared_cache_meanwhile(
        url, tmp_path, monkeypatch):
    """A reader's rebuild runs while gc deletes the packs it has just repacked: the rebuild
    may name the old copies, not the new pack; gc must not then delete the new pack (or
    any other 'leftover') on the word of that cache."""
    names = iter(range(10**6))  # new packs list after old ones: a rebuild keeps old copies
    monkeypatch.setattr(packs, "new_pack_name", lambda: f"packs/00/{next(names):032d}.pack")
    with _writer_and_reader(url, tmp_path, 3) as (writer, reader):
        writer.delete(1)
        delete = writer.backend.delete
        seen = []

        def delete_while_the_reader_rebuilds(name):
            if name.startswith("packs/") and not seen:
                seen.append(name)
                _rebuild_now(reader)
            return delete(name)

        monkeypatch.setattr(writer.backend, "delete", delete_while_the_reader_rebuilds)
        assert writer.gc(repack_threshold=1.0).packs_rewritten
        assert seen
    with deltackpt.open(url, cache_dir=str(tmp_path / "fresh")) as s:
        assert s.steps() == [0, 2]
        for step in (0, 2):
            assert_state_equal(s.load(step)["r0"], _state(0, step)["r0"])


def test_a_deleted_step_does_not_come_back_through_a_reader_sharing_the_cache(
        url, tmp_path, monkeypatch):
    with _writer_and_reader(url, tmp_path, 3) as (writer, reader):
        delete = writer.backend.delete

        def reader_refreshes_first(name):
            if name.startswith("manifests/"):
                reader.refresh(check_packs=False)  # the manifest is still listed
            return delete(name)

        monkeypatch.setattr(writer.backend, "delete", reader_refreshes_first)
        writer.delete(2)
        monkeypatch.undo()
        assert writer.steps() == [0, 1]
        writer.save(_state(1, 2), step=2)              # new data under the same number
        assert_state_equal(writer.load(2)["r1"], _state(1, 2)["r1"])


def test_a_save_whose_step_a_reader_took_in_first_succeeds(url, tmp_path, monkeypatch):
    """A reader sharing the cache refreshes between the writer's manifest PUT and the
    writer's own index transaction: it takes the step in from that manifest. The save
    succeeds (it failed with 'UNIQUE constraint failed' though the step was committed)."""
    with _writer_and_reader(url, tmp_path, 1) as (writer, reader):
        put = writer.backend.put

        def put_then_reader_refreshes(name, data):
            put(name, data)
            if name.startswith("manifests/"):
                reader.refresh(check_packs=False)

        monkeypatch.setattr(writer.backend, "put", put_then_reader_refreshes)
        result = writer.save(_state(0, 1), step=1)
        monkeypatch.undo()
        assert result.step == 1 and reader.steps() == writer.steps() == [0, 1]
        assert_state_equal(writer.load(1)["r0"], _state(0, 1)["r0"])
        writer.save(_state(0, 2), step=2)                # and the next save deltas as usual
        assert writer.info(2).new_chunks < writer.info(2).total_chunks
        assert not writer.verify().problems
