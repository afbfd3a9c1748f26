"""A DCP rank on object storage catches up with only what its own keys need.

Two "ranks" run in one process: each has its own StorageWriter and index cache, and the
test drives DCP's save protocol by hand (what ``dcp.save`` does over a process group),
against fsspec's in-memory filesystem. Rank 1's cache must not read rank 0's packs before
it writes; every step must still load bit-exact, and rank 1's partial cache must become
the same index as a fresh one once anything else uses it.
"""

from __future__ import annotations

import uuid

import pytest
import torch
from helpers import assert_state_equal, block_rows, det_floats, entry_block_ids
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

import deltackpt
from deltackpt.dcp import StorageWriter, load_full
from deltackpt.reindex import is_partial
from deltackpt.remote import RemoteStore

pytest.importorskip("fsspec")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

OPTS = {"threads": 1, "block_size": 4096}


def _state(rank: int, step: int, name: str | None = None) -> dict:
    """Rank ``rank``'s part of the state at ``step``: a few blocks change every step."""
    w = det_floats((64, 256), 10 + rank)            # 16 blocks of 4 KiB
    w[::7] += step * 1e-3
    return {name or f"r{rank}": {"w": w, "m": det_floats((1024,), 20 + rank) * step}}


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
    for step, state in expected.items():
        full = load_full(url, step, cache_dir=cache)
        for part in state.values():
            for name, part_state in part.items():
                for key, t in part_state.items():
                    assert_state_equal(full[f"{name}.{key}"], t, f"{step}:{name}.{key}")


def _rows(store) -> list[tuple]:
    return sorted((r["id"], r["pack"], r["offset"], r["length"], r["base"], r["depth"],
                   r["first_step"]) for r in block_rows(store))


def test_rank_reads_only_the_parent_manifest(url, tmp_path, monkeypatch):
    writers = _writers(url, tmp_path)
    expected = {}
    for step in (1, 2, 3, 4):
        states = [_state(0, step), _state(1, step)]
        if step > 1:
            reads = _Reads(writers[1]._writer_store(False), monkeypatch)
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
    # rank 1's cache is partial: anything else that opens it rebuilds it first, into the
    # index a fresh cache has
    with deltackpt.open(url, cache_dir=str(tmp_path / "c1")) as s:
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
            reads = _Reads(writers[1]._writer_store(False), monkeypatch)
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
        states = [_state(0, step), _state(1, step)]
        _save(writers, states, step)
        expected[step] = dict(enumerate(states))
    for w in writers:
        w.close()
    # gc rewrites every pack with any dead frame: rank 1's bases move to new packs
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
