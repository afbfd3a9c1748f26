"""Per-step summaries (index schema 2, deltackpt/summaries.py): always equal to what the
step's entry rows say, through every operation that changes them, and the v1 → v2 migration."""

from __future__ import annotations

import json
import os
import sqlite3

import numpy as np
import pytest
import torch
from helpers import det_floats

import deltackpt
from deltackpt.errors import CorruptionError, StoreLockedError
from deltackpt.hashing import unpack_ids
from deltackpt.index import SCHEMA_VERSION
from deltackpt.lock import WriterLock
from deltackpt.reindex import reindex
from deltackpt.stats import snapshot, store_stats
from deltackpt.whatif import Policy, default_policies, whatif

torch.set_num_threads(1)


def _state(step: int, w: torch.Tensor, m: torch.Tensor) -> dict:
    return {"model": {"w": w.clone(), "b": det_floats((40,), 3)},
            "optimizer": {"state": {"m": m.clone(), "step": torch.tensor(step)}},
            "loose": det_floats((16,), 9),  # a top-level entry: its own component
            "epoch": step // 10}


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    path = os.path.join(tmp_path_factory.mktemp("sum"), "store")
    w, m = det_floats((64, 256), 1), det_floats((64, 256), 2)
    with deltackpt.open(path, block_size=4096, delta="xor:chain:3") as s:
        for i in range(8):
            w[: 8 * (i % 3 + 1)] += 0.01
            m[i * 8:(i + 1) * 8] *= 0.9
            state = _state(i * 10, w, m)
            if i == 3:  # the same block twice in one step: owned by the first entry
                state["model"]["twin"] = state["model"]["w"][:8].clone()
                state["model"]["zz_twin"] = state["model"]["w"][:8].clone()
            s.save(state, i * 10)
    return path


def _brute(store, step: int) -> tuple[dict, int, list[bytes]]:
    """components, new_raw_bytes and the referenced ids of ``step``, straight from its rows."""
    blocks = {b: (ln, raw, fs) for b, ln, raw, fs in store._index.query(
        "SELECT id, length, raw_len, first_step FROM blocks")}
    comps: dict[str, list[int]] = {}
    seen: set[bytes] = set()
    raw_total = 0
    for path, nbytes, blob in store._index.query(
            "SELECT path, nbytes, blocks FROM entries WHERE step=? ORDER BY idx", (step,)):
        c = comps.setdefault(path.split("/")[0], [0, 0])
        c[0] += nbytes
        for b in unpack_ids(blob):
            if b in seen:
                continue
            seen.add(b)
            ln, raw, fs = blocks[b]
            if fs == step:
                c[1] += ln
                raw_total += raw
    return comps, raw_total, sorted(seen)


def _check_all(store) -> None:
    seq_of = dict(store._index.query("SELECT id, seq FROM blocks"))
    assert None not in seq_of.values() and len(set(seq_of.values())) == len(seq_of)
    rows = {r[0]: r[1:] for r in store._index.query(
        "SELECT step, components, new_raw_bytes, refs FROM step_stats")}
    assert sorted(rows) == store.steps()
    for step in store.steps():
        comps, raw, ids = _brute(store, step)
        got_comps, got_raw, refs = rows[step]
        assert json.loads(got_comps) == comps, step
        assert got_raw == raw, step
        assert np.frombuffer(refs, dtype="<u8").tolist() == sorted(seq_of[b] for b in ids), step


def test_summaries_follow_save_thin_delete_gc_and_external_commits(store_dir, tmp_path):
    with deltackpt.open(store_dir) as s:
        _check_all(s)
        twin = json.loads(s._index.query("SELECT components FROM step_stats WHERE step=30")[0][0])
        assert twin["model"][1] > 0 and set(twin) == {"model", "optimizer", "loose"}
        s.thin(20, ["model"])
        _check_all(s)
        s.delete(10)
        s.delete(40)
        s.gc()
        _check_all(s)
        # an import is an external commit
        from safetensors.torch import save_file

        f = os.path.join(tmp_path, "w.safetensors")
        save_file({"w": det_floats((64, 256), 1), "new": det_floats((300,), 7)}, f)
        s.import_file(f, 1000)
        _check_all(s)
        s.save(_state(2000, det_floats((64, 256), 5), det_floats((64, 256), 6)), 2000)
        _check_all(s)
        assert s.verify().ok


def test_stats_and_whatif_from_summaries_equal_the_full_snapshot(store_dir):
    with deltackpt.open(store_dir) as s:
        s.delete(10)
        s.thin(50, ["model"])
        snap = snapshot(s)
        policies = [*default_policies(snap.steps), Policy("keep_last", 2), Policy("keep_every", 20),
                    Policy("save_every", 30)]
        assert whatif(s, policies) == whatif(s, policies, snap=snap)
        st = store_stats(s)
    # the per-component written bytes, from the full snapshot (another code path)
    new = snap.new_refs()
    for i, x in enumerate(st["steps"]):
        mine = new & (snap.ref_step == i)
        for name in ("model", "optimizer", "loose"):
            in_comp = np.array([snap.paths[p].split("/")[0] == name
                                for p in snap.entry_path[snap.ref_entry[mine]]], dtype=bool)
            want = int(snap.length[snap.ref_block[mine][in_comp]].sum()) if in_comp.size else 0
            assert x["components"][name]["written_bytes"] == want, (x["step"], name)


def _downgrade_to_v1(path: str) -> None:
    """What an index written by deltackpt before schema 2 looks like."""
    con = sqlite3.connect(os.path.join(path, "index.sqlite"))
    con.execute("DROP TRIGGER entries_void_summary")
    con.execute("DROP TRIGGER blocks_need_seq")
    con.execute("DROP TABLE step_stats")
    con.execute("DROP INDEX blocks_seq")
    con.execute("ALTER TABLE blocks DROP COLUMN seq")
    con.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
    con.commit()
    con.close()


def _schema(path: str) -> int:
    con = sqlite3.connect(os.path.join(path, "index.sqlite"))
    try:
        return int(con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])
    finally:
        con.close()


def test_a_v1_index_is_migrated_on_open_with_identical_figures(store_dir):
    with deltackpt.open(store_dir) as s:
        s.thin(20, ["model"])
        before = store_stats(s)
        before_whatif = whatif(s)
        state = s.load(70)
    _downgrade_to_v1(store_dir)
    assert _schema(store_dir) == 1
    with deltackpt.open(store_dir) as s:
        assert _schema(store_dir) == SCHEMA_VERSION == 2
        _check_all(s)
        after = store_stats(s)
        assert after["steps"] == before["steps"] and after["components"] == before["components"]
        assert whatif(s) == before_whatif
        got = s.load(70)
        assert torch.equal(got["model"]["w"], state["model"]["w"])
        s.save(_state(80, det_floats((64, 256), 1), det_floats((64, 256), 2)), 80)
        _check_all(s)


def test_migration_waits_for_the_writer_lock_and_changes_nothing_without_it(store_dir):
    _downgrade_to_v1(store_dir)
    lock = WriterLock(os.path.join(store_dir, "lock"))
    lock.acquire()
    try:
        with pytest.raises(StoreLockedError):
            deltackpt.open(store_dir)
        assert _schema(store_dir) == 1
    finally:
        lock.release()
    with deltackpt.open(store_dir) as s:
        assert _schema(store_dir) == 2
        _check_all(s)


def test_reindex_rebuilds_the_summaries(store_dir):
    with deltackpt.open(store_dir) as s:
        before = store_stats(s)
    os.remove(os.path.join(store_dir, "index.sqlite"))
    reindex(store_dir)
    with deltackpt.open(store_dir) as s:
        _check_all(s)
        after = store_stats(s)
    # reindex recomputes first_step (the lowest step needing a block): same here, no deletes
    for a, b in zip(before["steps"], after["steps"]):
        assert a["components"] == b["components"] and a["step"] == b["step"]


def test_a_damaged_summary_is_reported_not_trusted(store_dir):
    con = sqlite3.connect(os.path.join(store_dir, "index.sqlite"))
    con.execute("UPDATE step_stats SET components='[1, 2' WHERE step=30")
    con.commit()
    con.close()
    with deltackpt.open(store_dir) as s, pytest.raises(CorruptionError, match="reindex"):
        store_stats(s)



def test_a_step_without_summary_row_is_derived_by_the_reader(store_dir):
    """What an older deltackpt that had the index open before the migration leaves: a step
    whose save wrote no new block and so no summary row."""
    with deltackpt.open(store_dir) as s:
        before, before_whatif = store_stats(s), whatif(s)
    con = sqlite3.connect(os.path.join(store_dir, "index.sqlite"))
    con.execute("DELETE FROM step_stats WHERE step=30")
    con.commit()
    con.close()
    with deltackpt.open(store_dir) as s:
        assert store_stats(s)["steps"] == before["steps"]
        assert whatif(s) == before_whatif


def test_triggers_keep_an_older_writer_from_breaking_a_migrated_index(store_dir):
    con = sqlite3.connect(os.path.join(store_dir, "index.sqlite"))
    row = con.execute("SELECT id, pack_id, offset, length, raw_len, codec, base, depth, "
                      "first_step FROM blocks LIMIT 1").fetchone()
    with pytest.raises(sqlite3.IntegrityError, match="upgrade deltackpt"):
        # an older writer's INSERT names no seq
        con.execute("INSERT INTO blocks(id, pack_id, offset, length, raw_len, codec, base, "
                    "depth, first_step) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (b"\x01" * 16, *row[1:]))
    # an older writer's thin deletes entry rows and leaves the summary alone: it goes
    con.execute("DELETE FROM entries WHERE step=20 AND path LIKE 'optimizer/%'")
    con.commit()
    assert con.execute("SELECT COUNT(*) FROM step_stats WHERE step=20").fetchone()[0] == 0
    con.close()
    with deltackpt.open(store_dir) as s:
        x = next(r for r in store_stats(s)["steps"] if r["step"] == 20)
        assert x["components"]["optimizer"]["logical_bytes"] == 0


def test_migration_skips_a_damaged_step_and_the_store_still_opens(store_dir):
    with deltackpt.open(store_dir) as s:
        want = s.load(10)
    _downgrade_to_v1(store_dir)
    con = sqlite3.connect(os.path.join(store_dir, "index.sqlite"))
    con.execute("UPDATE entries SET blocks = ? WHERE step=40 AND path='model/w'",
                (b"\x07" * 16,))  # a dangling block reference
    con.commit()
    con.close()
    with deltackpt.open(store_dir) as s:
        assert _schema(store_dir) == 2
        assert torch.equal(s.load(10)["model"]["w"], want["model"]["w"])
        assert not s.verify().ok
        with pytest.raises(CorruptionError, match="step 40"):
            store_stats(s)
