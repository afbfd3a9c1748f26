"""The Store API: steps and metadata, dedup, select, delete/gc/thin, lifecycle and errors."""

from __future__ import annotations

import collections
import json
import math
import os
import sqlite3
import time

import numpy as np
import pytest
import torch
from helpers import (
    CountingBackend,
    assert_state_equal,
    block_rows,
    det_bytes,
    det_floats,
    det_tensor,
    dir_digest,
    entry_block_ids,
    files_under,
    float_bits,
)

import deltackpt
from deltackpt import (
    DeltackptError,
    InvalidStoreError,
    PathNotFoundError,
    StepExistsError,
    StepNotFoundError,
    StoreClosedError,
    StoreLockedError,
)
from deltackpt.reindex import reindex

torch.set_num_threads(1)
BS = 4096
F32_PER_BLOCK = BS // 4


def mem(**kw):
    kw.setdefault("block_size", BS)
    return deltackpt.open("memory://", **kw)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_text(path, text):
    with open(path, "w") as f:
        f.write(text)


def disk_bytes(path) -> int:
    return sum(files_under(path, "packs").values()) + sum(files_under(path, "manifests").values())


# -- steps, latest, info, log ----------------------------------------------------------
def test_empty_store():
    with mem() as s:
        assert s.steps() == [] and s.latest() is None and s.log() == []
        with pytest.raises(StepNotFoundError, match="no steps"):
            s.load()
        assert 0 not in s
        assert s.best("loss") is None
        r = s.verify()
        assert r.ok and r.steps_checked == 0


def test_steps_latest_info_log_ordering_and_fields():
    with mem() as s:
        states = {}
        for step in (30, 10, 20):
            states[step] = {"w": det_floats((3000,), step), "k": torch.arange(step)}
            s.save(states[step], step, metrics={"loss": 1.0 / step, "step": step},
                   tags=[f"t{step}", "all"], note=f"note {step}")
            time.sleep(0.002)
        assert s.steps() == [10, 20, 30]
        assert s.latest() == 30
        assert 20 in s and 25 not in s and "20" not in s
        log = s.log()
        assert [i.step for i in log] == [10, 20, 30]
        created = {i.step: i.created_at for i in log}
        assert created[30] < created[10] < created[20]  # save order, not step order
        for i in log:
            assert i == s.info(i.step)
            assert i.metrics == {"loss": 1.0 / i.step, "step": i.step}
            assert i.tags == [f"t{i.step}", "all"] and i.note == f"note {i.step}"
            assert i.entries == 2
            assert i.logical_bytes == 3000 * 4 + i.step * 8
            assert i.total_chunks == 3 + 1
        assert s.info(30).parent is None
        assert s.info(10).parent == 30  # no smaller step existed: the latest serves
        assert s.info(20).parent == 10
        assert s.info(30).new_chunks == 4 and s.info(30).written_bytes > 0
        assert_state_equal(s.load(), states[30])
        for step, st_ in states.items():
            assert_state_equal(s.load(step), st_)
            assert_state_equal(s.load(np.int64(step)), st_)


def test_entries_describe_every_array_leaf():
    state = {"m": collections.OrderedDict(w=torch.zeros(3, 2000)), "b": b"xy",
             "n": np.zeros((2, 3), ">f8"), "p": torch.nn.Parameter(torch.ones(2)), "i": 3}
    with mem() as s:
        s.save(state, 1)
        got = [(e.path, e.kind, e.dtype, e.shape, e.nbytes, e.blocks) for e in s.entries(1)]
    assert got == [("m/w", "tensor", "float32", (3, 2000), 24000, 6),
                   ("b", "bytes", "uint8", (2,), 2, 1),
                   ("n", "ndarray", ">f8", (2, 3), 48, 1),
                   ("p", "parameter", "float32", (2,), 8, 1)]


def test_metrics_tags_note_roundtrip():
    metrics = {"loss": 0.1, "neg0": -0.0, "tiny": 5e-324, "int": 2**62,
               "flag": True, "none": None, "name": "run-1", "t": torch.tensor(2.5),
               "np": np.float32(0.1), "npi": np.int64(7)}
    with mem() as s:
        s.save({}, 0, metrics=metrics, tags="single", note="")
        s.save({}, 1, tags=["a", "b", "a"], note="multi\nline é")
        m = s.info(0).metrics
        assert list(m) == list(metrics)
        assert float_bits(m["loss"]) == float_bits(0.1)
        assert float_bits(m["neg0"]) == float_bits(-0.0)
        assert float_bits(m["tiny"]) == float_bits(5e-324)
        assert m["int"] == 2**62 and type(m["int"]) is int
        assert m["flag"] is True and m["none"] is None and m["name"] == "run-1"
        assert type(m["t"]) is float and m["t"] == 2.5
        assert float_bits(m["np"]) == float_bits(float(np.float32(0.1)))
        assert m["npi"] == 7 and type(m["npi"]) is int
        assert s.info(0).tags == ["single"] and s.info(0).note == ""
        assert s.info(1).tags == ["a", "b", "a"] and s.info(1).note == "multi\nline é"
        assert s.info(1).metrics == {}


@pytest.mark.parametrize("kw", [{"metrics": {"x": [1]}}, {"metrics": {1: 2.0}},
                                {"metrics": [("x", 1)]}, {"tags": [1]}, {"note": 3},
                                {"tags": "a", "note": b"x"}])
def test_bad_metadata_is_refused_before_anything_is_written(kw):
    with mem() as s:
        s.save({"w": torch.ones(10)}, 0)
        before = dict(s.backend._objects)
        with pytest.raises((TypeError, ValueError)):
            s.save({"w": torch.zeros(10)}, 1, **kw)
        assert s.steps() == [0] and s.backend._objects == before


def test_best_picks_min_max_skips_nan_and_ties_go_to_latest():
    with mem() as s:
        for step, loss in [(1, 3.0), (2, 1.0), (3, None), (4, 1.0), (5, "x"), (6, 9.0)]:
            s.save({}, step, metrics={"loss": loss, "acc": step if step != 6 else True})
        s.save({}, 7)
        assert s.best("loss") == 4
        assert s.best("loss", "max") == 6
        assert s.best("acc", "max") == 5  # a bool is not a number here
        assert s.best("acc") == 1
        assert s.best("missing") is None
        with pytest.raises(ValueError):
            s.best("loss", "median")


def test_nan_and_inf_metrics_are_stored_and_nan_never_wins():
    with mem() as s:
        s.save({"w": torch.ones(3)}, 1, metrics={"loss": 2.0})
        s.save({"w": torch.zeros(3)}, 2, metrics={"loss": math.nan, "grad_norm": math.inf})
        m = s.info(2).metrics
        assert math.isnan(m["loss"]) and m["grad_norm"] == math.inf
        assert s.best("loss") == 1 and s.best("loss", "max") == 1


class _FailingManifestBackend(CountingBackend):
    def put(self, name, data):
        if name.startswith("manifests/"):
            raise OSError("disk full (simulated)")
        return self.inner.put(name, data)


def test_failed_save_leaves_no_step_and_gc_removes_its_packs():
    backend = _FailingManifestBackend(deltackpt.MemoryBackend())
    with deltackpt.open(backend, block_size=BS) as s:
        with pytest.raises(OSError, match="simulated"):
            s.save({"w": det_floats((3000,), 1)}, 1)
        assert s.steps() == [] and s.stored_bytes() == 0
        assert backend.list("packs/")  # the frames were written before the failure
        leftovers = backend.list("packs/")
        r = s.gc()
        assert r.objects_deleted == len(leftovers) and r.bytes_freed > 0
        assert backend.list("packs/") == [] and backend.list("manifests/") == []
        assert s.gc().bytes_freed == 0


def test_step_exists_error():
    with mem() as s:
        s.save({"w": torch.ones(3)}, 5)
        before = dict(s.backend._objects)
        with pytest.raises(StepExistsError) as ei:
            s.save({"w": torch.zeros(3)}, 5)
        assert isinstance(ei.value, ValueError) and isinstance(ei.value, DeltackptError)
        assert "step 5" in str(ei.value)
        assert s.backend._objects == before
        assert_state_equal(s.load(5), {"w": torch.ones(3)})


@pytest.mark.parametrize("op", ["load", "info", "entries", "delete", "verify", "thin"])
def test_step_not_found_error_names_the_step(op):
    with mem() as s:
        s.save({"w": torch.ones(2)}, 10)
        s.save({"w": torch.ones(2)}, 20)
        call = {"load": lambda: s.load(7), "info": lambda: s.info(7),
                "entries": lambda: s.entries(7), "delete": lambda: s.delete(7),
                "verify": lambda: s.verify(7), "thin": lambda: s.thin(7, "w")}[op]
        with pytest.raises(StepNotFoundError) as ei:
            call()
        assert isinstance(ei.value, KeyError) and isinstance(ei.value, DeltackptError)
        msg = str(ei.value)
        assert "step 7" in msg and "10, 20" in msg and not msg.startswith(("'", '"'))
        assert s.steps() == [10, 20]


@pytest.mark.parametrize("bad,exc", [(-1, ValueError), (True, TypeError), (False, TypeError),
                                     (1.0, TypeError), ("3", TypeError), (None, TypeError),
                                     (2**63, ValueError), (-(2**63) - 1, ValueError)])
def test_invalid_step_numbers_are_rejected(bad, exc):
    with mem() as s:
        with pytest.raises(exc):
            s.save({"w": torch.ones(2)}, bad)
        assert s.steps() == [] and s.backend.list() == []
        s.save({"w": torch.ones(2)}, 1)
        if bad is not None and not (exc is ValueError and bad == -1):
            for call in (s.load, s.info, s.delete, s.entries):
                with pytest.raises(exc, match="int" if exc is TypeError else "64 bits"):
                    call(bad)
        assert s.steps() == [1]


def test_contains_agrees_with_the_step_argument_rules():
    with mem() as s:
        s.save({"a": 1}, 1)
        assert np.int64(1) in s
        assert True not in s


def test_numpy_integer_steps_are_accepted():
    with mem() as s:
        s.save({"a": 0}, 2**63 - 1)  # the largest step the index can hold
        assert s.load(2**63 - 1) == {"a": 0}
        s.save({"a": 1}, np.int32(4))
        assert s.steps() == [4, 2**63 - 1] and type(s.steps()[0]) is int
        assert s.load(np.uint8(4)) == {"a": 1}


# -- dedup -------------------------------------------------------------------------------
def test_unchanged_state_writes_no_chunks_and_no_pack_bytes(tmp_path):
    path = os.path.join(tmp_path, "s")
    state = {"a": det_floats((10 * F32_PER_BLOCK,), 1), "b": det_tensor(torch.int64, (999,), 2),
             "c": det_bytes(3, 20000), "d": np.arange(5000, dtype="<u2")}
    with deltackpt.open(path, block_size=BS) as s:
        r1 = s.save(state, 1)
        assert r1.new_chunks == r1.total_chunks > 10
        packs_before = files_under(path, "packs")
        r2 = s.save(state, 2)
        assert (r2.new_chunks, r2.written_bytes) == (0, 0)
        assert r2.total_chunks == r1.total_chunks and r2.dedup_ratio == 1.0
        assert files_under(path, "packs") == packs_before
        assert s.info(2).written_bytes == 0 and s.info(2).new_chunks == 0
        assert entry_block_ids(s, 1) == entry_block_ids(s, 2)
        assert_state_equal(s.load(2), state)


@pytest.mark.parametrize("delta", ["none", "xor"])
def test_one_changed_element_writes_only_its_block(delta):
    a = det_floats((8 * F32_PER_BLOCK,), 1)
    other = det_floats((3 * F32_PER_BLOCK,), 2)
    with mem(delta=delta) as s:
        s.save({"a": a, "other": other}, 1)
        a2 = a.clone()
        a2[5 * F32_PER_BLOCK + 17] += 0.5
        r = s.save({"a": a2, "other": other}, 2)
        assert r.new_chunks == 1 and r.total_chunks == 11
        ids1, ids2 = entry_block_ids(s, 1), entry_block_ids(s, 2)
        assert ids2["other"] == ids1["other"]
        changed = [i for i, (x, y) in enumerate(zip(ids1["a"], ids2["a"])) if x != y]
        assert changed == [5]
        new = [b for b in block_rows(s) if b["first_step"] == 2]
        assert [b["id"] for b in new] == [ids2["a"][5]]
        assert r.written_bytes == new[0]["length"]
        if delta == "xor":
            assert new[0]["base"] == ids1["a"][5] and new[0]["codec"].startswith("xor")
            assert r.written_bytes < BS // 8  # one changed float: a tiny residual
        else:
            assert r.written_bytes <= BS + 100
        assert_state_equal(s.load(2), {"a": a2, "other": other})
        assert_state_equal(s.load(1), {"a": a, "other": other})


def test_identical_tensors_and_blocks_within_a_step_dedupe():
    t = det_floats((4 * F32_PER_BLOCK,), 7)
    zeros = torch.zeros(10 * F32_PER_BLOCK)
    state = {"a": t, "b": t.clone(), "c": [t], "as_int": t.view(torch.int32), "z": zeros}
    with mem() as s:
        r = s.save(state, 0)
        assert r.total_chunks == 4 * 4 + 10
        assert r.new_chunks == 4 + 1  # t's four blocks once, one zero block
        out = s.load(0)
        assert_state_equal(out, state)
        assert out["as_int"].dtype == torch.int32
        # moving a tensor to another key writes nothing
        r2 = s.save({"renamed": {"deep": t}}, 1)
        assert r2.new_chunks == 0 and r2.written_bytes == 0


# -- select ------------------------------------------------------------------------------
def _select_state():
    model = collections.OrderedDict([("enc.weight", det_floats((2 * F32_PER_BLOCK,), 1)),
                                     ("enc.bias", det_floats((10,), 2))])
    model._metadata = collections.OrderedDict([("", {"version": 1}), ("enc", {"version": 2})])
    return {
        "model": model,
        "opt": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": det_floats((3000,), 3)},
                          1: {"step": torch.tensor(3.0), "exp_avg": det_floats((3000,), 4)}},
                "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1]}]},
        "layers": [det_floats((5,), 5), det_floats((6,), 6), det_floats((7,), 7)],
        "a/b": det_floats((8,), 8),
        "meta": {"epoch": 3, "name": "x"},
    }


def test_select_nested_paths_int_keys_and_multiple():
    st_ = _select_state()
    with mem() as s:
        s.save(st_, 1)
        assert_state_equal(s.load(1, select="opt/state/1"),
                           {"opt": {"state": {1: st_["opt"]["state"][1]}}})
        assert_state_equal(s.load(1, select=["model", "a%2Fb", "meta/epoch"]),
                           {"model": st_["model"], "a/b": st_["a/b"], "meta": {"epoch": 3}})
        assert_state_equal(s.load(1, select=["opt/param_groups/0/betas"]),
                           {"opt": {"param_groups": [{"betas": (0.9, 0.999)}]}})
        # a partly selected list keeps only the chosen items, in order
        # unselected list items become None so kept items keep their index (and path)
        assert_state_equal(s.load(1, select=["layers/2", "layers/0"]),
                           {"layers": [st_["layers"][0], None, st_["layers"][2]]})
        assert_state_equal(s.load(1, select=["layers/1"]), {"layers": [None, st_["layers"][1]]})
        # tree order, not select order; the OrderedDict keeps its type and _metadata
        model = collections.OrderedDict([("enc.bias", st_["model"]["enc.bias"])])
        model._metadata = st_["model"]._metadata
        assert_state_equal(s.load(1, select=["opt/state/0/exp_avg", "model/enc.bias"]),
                           {"model": model,
                            "opt": {"state": {0: {"exp_avg": st_["opt"]["state"][0]["exp_avg"]}}}})


@pytest.mark.parametrize("bad", ["nope", "opt/state/2", "opt/state/0/step/x", "layers/3",
                                 "a/b", "model/enc.weight/0"])
def test_select_unknown_path_raises_path_not_found(bad):
    with mem() as s:
        s.save(_select_state(), 1)
        with pytest.raises(PathNotFoundError) as ei:
            s.load(1, select=["meta", bad])
        assert isinstance(ei.value, KeyError) and isinstance(ei.value, DeltackptError)
        assert bad in str(ei.value) and "'meta'" not in str(ei.value)
        assert "step 1" in str(ei.value)


def test_select_of_an_empty_key_names_only_it_and_trailing_slashes_are_separators(tmp_path):
    """The path of a[""] is "a/" (format.md §12.3): selecting it gives that value alone,
    not its siblings; where no empty key exists a trailing '/' is only a separator."""
    from deltackpt import diff as diff_mod
    from deltackpt.export import subtree

    state = {"a": {"": det_floats((3,), 1), "b": det_floats((2,), 2)},
             "opt": {"x": 1, "y": det_floats((2,), 3)}}
    with deltackpt.open(tmp_path / "s") as s:
        s.save(state, 1)
        assert [e.path for e in s.entries(1)] == ["a/", "a/b", "opt/y"]
        assert_state_equal(s.load(1, select="a/"), {"a": {"": state["a"][""]}})
        assert_state_equal(s.load(1, select="opt/"), {"opt": state["opt"]})
        assert_state_equal(s.load(1, select="/opt/y"), {"opt": {"y": state["opt"]["y"]}})
        assert_state_equal(s.load(1, select="a"), {"a": state["a"]})
        assert subtree(state, "a/") is state["a"][""]
        assert subtree(state, "opt/") is state["opt"]
        s.save({"a": {"": det_floats((3,), 4), "b": det_floats((2,), 5)}, "opt": state["opt"]}, 2)
        changed = diff_mod.diff(s, 1, 2, select=["a/"])
        assert [row["path"] for row in changed["entries"]] == ["a/"]
        nested = {"a": {"": {"x": det_floats((3,), 6)}, "b": det_floats((2,), 7)}}
        s.save(nested, 3)
        s.save({"a": {"": {"x": det_floats((3,), 8)}, "b": det_floats((2,), 9)}}, 4)
        changed = diff_mod.diff(s, 3, 4, select=["a/"])  # a[""] holds a container
        assert [row["path"] for row in changed["entries"]] == ["a//x"]
        assert_state_equal(s.load(3, select="a/"), {"a": {"": nested["a"][""]}})


def test_select_overlapping_paths():
    st_ = _select_state()
    with mem() as s:
        s.save(st_, 1)
        assert_state_equal(s.load(1, select=["model", "model/enc.bias"]),
                           {"model": st_["model"]})


def test_select_reads_only_the_selected_blocks():
    backend = CountingBackend(deltackpt.MemoryBackend())
    st_ = _select_state()
    with deltackpt.open(backend, block_size=BS, delta="none") as s:
        s.save(st_, 1)
        locs = {r["id"]: (r["pack"], r["offset"], r["length"]) for r in block_rows(s)}
        ids = entry_block_ids(s, 1)
        for select, paths in [("opt/state/1", ["opt/state/1/step", "opt/state/1/exp_avg"]),
                              (["model/enc.weight"], ["model/enc.weight"]),
                              (["meta"], [])]:
            backend.reads.clear()
            s.load(1, select=select)
            want = {locs[b] for p in paths for b in ids[p]}
            # plus the step's manifest, which vouches for the index rows
            pack_reads = [r for r in backend.reads if not r[0].startswith("manifests/")]
            assert set(pack_reads) == want, select
            assert len(pack_reads) == len(want)
        backend.reads.clear()
        s.load(1)
        assert {r for r in backend.reads if not r[0].startswith("manifests/")} == \
            set(locs.values())


def test_select_works_when_unselected_blocks_are_damaged():
    st_ = _select_state()
    with mem(delta="none") as s:
        s.save(st_, 1)
        ids = entry_block_ids(s, 1)
        rows = {r["id"]: r for r in block_rows(s)}
        objects = s.backend._objects
        for path in ("model/enc.weight", "opt/state/0/exp_avg", "layers/1"):
            for bid in ids[path]:
                r = rows[bid]
                data = bytearray(objects[r["pack"]])
                mid = r["offset"] + r["length"] - 3
                data[mid] ^= 0xFF
                objects[r["pack"]] = bytes(data)
        out = s.load(1, select=["opt/state/1", "model/enc.bias", "layers/0", "layers/2"])
        assert_state_equal(out["opt"]["state"][1], st_["opt"]["state"][1])
        assert_state_equal(out["model"]["enc.bias"], st_["model"]["enc.bias"])
        assert_state_equal(out["layers"], [st_["layers"][0], None, st_["layers"][2]])
        with pytest.raises(deltackpt.CorruptionError):
            s.load(1)
        with pytest.raises(deltackpt.CorruptionError):
            s.load(1, select="layers/1")


# -- delete / gc / thin ----------------------------------------------------------------
def _three_steps(s):
    b = det_floats((2 * F32_PER_BLOCK,), 100)
    states = {i: {"a": det_floats((3 * F32_PER_BLOCK,), i), "b": b} for i in (1, 2, 3)}
    for i, st_ in states.items():
        s.save(st_, i)
    return states


def test_delete_then_gc_frees_bytes_and_keeps_other_steps(tmp_path):
    path = os.path.join(tmp_path, "s")
    with deltackpt.open(path, block_size=BS, delta="none") as s:
        states = _three_steps(s)
        packs_of_2 = {r["pack"] for r in block_rows(s) if r["first_step"] == 2}
        assert len(packs_of_2) == 1
        before = disk_bytes(path)
        s.delete(2)
        assert s.steps() == [1, 3] and 2 not in s
        with pytest.raises(StepNotFoundError):
            s.load(2)
        assert disk_bytes(path) < before  # the manifest goes at once
        before = disk_bytes(path)
        r = s.gc()
        assert (r.blocks_deleted, r.packs_deleted, r.packs_rewritten, r.objects_deleted) == \
            (3, 1, 0, 0)
        assert r.bytes_freed > 3 * 100 and r.bytes_freed == before - disk_bytes(path)
        assert not any(os.path.exists(os.path.join(path, p)) for p in packs_of_2)
        for i in (1, 3):
            assert_state_equal(s.load(i), states[i])
        assert s.verify().ok
        again = s.gc()
        assert (again.bytes_freed, again.blocks_deleted, again.packs_deleted,
                again.objects_deleted) == (0, 0, 0, 0)
        # the step number can be used again
        s.save(states[1], 2)
        assert_state_equal(s.load(2), states[1])
    with deltackpt.open(path) as s:
        for i in (1, 3):
            assert_state_equal(s.load(i), states[i])


def test_gc_keeps_delta_bases_of_live_steps():
    base = det_floats((4 * F32_PER_BLOCK,), 5)
    states = {}
    with mem(delta="xor:chain:8") as s:
        for i in range(1, 6):
            w = base.clone()
            w[::97] += i * 1e-3
            states[i] = {"w": w}
            s.save(states[i], i)
        assert all(r["base"] is not None for r in block_rows(s) if r["first_step"] > 1)
        for i in (1, 2, 3, 4):
            s.delete(i)
        r = s.gc()
        assert r.blocks_deleted == 0  # all of them are bases of step 5's chain
        assert_state_equal(s.load(5), states[5])
        assert s.verify().ok
        s.delete(5)
        r = s.gc()
        assert r.blocks_deleted == 20 and r.packs_deleted == 5 and r.bytes_freed > 0
        assert block_rows(s) == [] and s.backend.list("packs/") == []
        assert s.gc().bytes_freed == 0


def test_thin_drops_subtrees_and_gc_reclaims_them(tmp_path):
    path = os.path.join(tmp_path, "s")
    model = {"w": det_floats((2 * F32_PER_BLOCK,), 1)}
    opt = {"m": det_floats((3 * F32_PER_BLOCK,), 2), "step": 4}
    with deltackpt.open(path, block_size=BS, delta="none") as s:
        s.save({"model": model}, 0)
        s.save({"model": model, "opt": opt, "epoch": 1}, 1, metrics={"loss": 0.5})
        s.save({"model": model, "opt": opt}, 2)  # shares opt's blocks with step 1
        s.save({"model": model, "opt": {"m": opt["m"] + 1, "step": 5}}, 3)
        with pytest.raises(PathNotFoundError):
            s.thin(1, ["model", "nope"])
        assert s.thin(1, ["model", "epoch"]) == 1
        assert_state_equal(s.load(1), {"model": model, "epoch": 1})
        assert [e.path for e in s.entries(1)] == ["model/w"]
        assert s.info(1).logical_bytes == 2 * BS and s.info(1).metrics == {"loss": 0.5}
        r = s.gc()
        assert (r.bytes_freed, r.blocks_deleted) == (0, 0)  # opt's blocks: still used by step 2
        assert s.thin(2, "model") == 1
        before = disk_bytes(path)
        r = s.gc()
        assert r.blocks_deleted == 3 and r.packs_deleted == 1
        assert r.bytes_freed == before - disk_bytes(path) > 0
        assert_state_equal(s.load(2), {"model": model})
        assert_state_equal(s.load(3), {"model": model, "opt": {"m": opt["m"] + 1, "step": 5}})
        assert s.verify().ok
        assert s.gc().bytes_freed == 0
    with deltackpt.open(path) as s:  # the thinned manifest and index agree after reopening
        assert_state_equal(s.load(1), {"model": model, "epoch": 1})
        assert s.verify().ok


def test_thin_drops_non_array_values_outside_keep():
    with mem() as s:
        s.save({"model": {"w": torch.ones(3)}, "epoch": 1, "name": "run"}, 1)
        s.thin(1, "model")
        assert_state_equal(s.load(1), {"model": {"w": torch.ones(3)}})


def test_gc_repacks_sparse_packs(tmp_path):
    path = os.path.join(tmp_path, "s")
    big = det_floats((20 * F32_PER_BLOCK,), 1)
    small = det_floats((F32_PER_BLOCK,), 2)
    with deltackpt.open(path, block_size=BS, delta="none") as s:
        s.save({"big": big, "small": small}, 1)  # one pack: 21 blocks
        s.save({"small": small}, 2)
        s.delete(1)
        before = disk_bytes(path)
        r = s.gc()
        assert r.packs_rewritten == 1 and r.blocks_deleted == 20
        assert r.bytes_freed == before - disk_bytes(path) > 15 * BS
        assert_state_equal(s.load(2), {"small": small})
        assert s.verify().ok
        assert s.gc().bytes_freed == 0


# -- lifecycle, options, locking --------------------------------------------------------
def test_reopen_keeps_everything_and_fixed_options_cannot_change(tmp_path):
    path = os.path.join(tmp_path, "s")
    state = {"w": det_floats((5000,), 1), "n": np.arange(7, dtype=">i4")}
    with deltackpt.open(path, block_size=8192, hash="blake2b") as s:
        s.save(state, 1, metrics={"a": 1.5})
    cfg = read_json(os.path.join(path, "deltackpt.json"))
    assert cfg["format"] == "deltackpt" and cfg["format_version"] == 1
    assert cfg["block_size"] == 8192 and cfg["hash"] == "blake2b"
    with pytest.raises(InvalidStoreError, match="block_size"):
        deltackpt.open(path, block_size=4096)
    with pytest.raises(InvalidStoreError, match="hash"):
        deltackpt.open(path, hash="xxh3_128")
    with deltackpt.open(path, level=5, delta="sub") as s:  # per-session options may change
        assert_state_equal(s.load(1), state)
        assert s.info(1).metrics == {"a": 1.5}
        s.save({"w": state["w"] + 1}, 2)
        assert s.verify().ok


def test_open_refuses_non_stores_and_bad_configs(tmp_path):
    d = os.path.join(tmp_path, "notastore")
    os.makedirs(d)
    write_text(os.path.join(d, "x.txt"), "hello")
    with pytest.raises(InvalidStoreError):
        deltackpt.open(d)
    assert os.listdir(d) == ["x.txt"]
    with pytest.raises(InvalidStoreError):
        deltackpt.open(os.path.join(tmp_path, "missing"), create=False)
    assert not os.path.exists(os.path.join(tmp_path, "missing"))
    for bad in [{"block_size": 1000}, {"block_size": 2**30}, {"hash": "md5"}, {"delta": "zip"}]:
        with pytest.raises((InvalidStoreError, ValueError)):
            deltackpt.open(os.path.join(tmp_path, "bad"), **bad)
    path = os.path.join(tmp_path, "s")
    deltackpt.open(path).close()
    cfg_path = os.path.join(path, "deltackpt.json")
    cfg = read_json(cfg_path)
    write_text(cfg_path, "{not json")
    with pytest.raises(InvalidStoreError):
        deltackpt.open(path)
    write_text(cfg_path, json.dumps({**cfg, "format_version": 2}))
    with pytest.raises(deltackpt.FormatVersionError):
        deltackpt.open(path)
    write_text(cfg_path, json.dumps({**cfg, "format": "other"}))
    with pytest.raises(InvalidStoreError):
        deltackpt.open(path)


def test_open_refuses_an_index_from_a_newer_schema(tmp_path):
    import sqlite3

    path = os.path.join(tmp_path, "s")
    with deltackpt.open(path) as s:
        s.save({"a": 1}, 1)
    con = sqlite3.connect(os.path.join(path, "index.sqlite"))
    con.execute("UPDATE meta SET value='3' WHERE key='schema_version'")
    con.commit()
    con.close()
    with pytest.raises(deltackpt.FormatVersionError):
        deltackpt.open(path)


@pytest.mark.parametrize("loss", ["deleted", "truncated", "no schema"])
def test_a_lost_index_never_leads_gc_to_delete_the_data(tmp_path, loss):
    """A missing, 0-byte or schema-less index.sqlite beside data files must not open as
    a new, empty store (its gc would delete every committed step): reindex restores it."""
    path = os.path.join(tmp_path, "s")
    with deltackpt.open(path) as s:
        s.save({"w": det_floats((3000,), 1)}, 1)
    data_files = {**files_under(path, "packs"), **files_under(path, "manifests")}
    index = os.path.join(path, "index.sqlite")
    os.remove(index)
    if loss == "truncated":
        open(index, "wb").close()
    elif loss == "no schema":
        conn = sqlite3.connect(index)
        conn.execute("CREATE TABLE other (x)")
        conn.commit()
        conn.close()
    state = "missing" if loss == "deleted" else "empty"
    with pytest.raises(InvalidStoreError, match=f"index.*{state}.*reindex"):
        deltackpt.open(path)
    assert {**files_under(path, "packs"), **files_under(path, "manifests")} == data_files
    reindex(path)
    with deltackpt.open(path) as s:
        assert s.steps() == [1]
        assert_state_equal(s.load(1), {"w": det_floats((3000,), 1)})


def test_closed_store_refuses_every_call():
    s = mem()
    s.save({"a": 1}, 1)
    s.close()
    s.close()  # idempotent
    for call in (lambda: s.save({}, 2), lambda: s.load(1), s.steps, s.latest, lambda: s.info(1),
                 s.log, lambda: s.entries(1), s.verify, lambda: s.delete(1), s.gc,
                 lambda: s.thin(1, "a")):
        with pytest.raises(StoreClosedError):
            call()


def test_second_writer_is_locked_out_until_the_first_closes(tmp_path):
    path = os.path.join(tmp_path, "s")
    a = deltackpt.open(path)
    a.save({"w": torch.ones(3)}, 1)
    b = deltackpt.open(path)
    try:
        assert_state_equal(b.load(1), {"w": torch.ones(3)})  # readers need no lock
        before = dir_digest(path, skip_suffixes=("-shm", "-wal", "index.sqlite"))
        for call in (lambda: b.save({"w": torch.zeros(3)}, 2), lambda: b.delete(1), b.gc):
            with pytest.raises(StoreLockedError) as ei:
                call()
            assert isinstance(ei.value, BlockingIOError)
            assert f"pid {os.getpid()}" in str(ei.value)
        assert dir_digest(path, skip_suffixes=("-shm", "-wal", "index.sqlite")) == before
        assert b.steps() == [1]
        a.close()
        b.save({"w": torch.zeros(3)}, 2)
        assert b.steps() == [1, 2]
    finally:
        a.close()
        b.close()


def test_loads_run_beside_saves_deletes_and_gc():
    import threading

    def state(i):
        w = det_floats((6 * F32_PER_BLOCK,), 1)
        w[:: 300] += i
        return {"w": w, "i": i}

    errors: list[BaseException] = []
    done = threading.Event()
    checked = []
    with mem(delta="xor") as s:
        s.save(state(0), 0)

        def reader():
            try:
                while not done.is_set():
                    latest = s.latest()
                    try:
                        out = s.load(latest)
                    except StepNotFoundError:
                        continue  # deleted in between: fine
                    assert_state_equal(out, state(latest))
                    checked.append(latest)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=reader) for _ in range(2)]
        for t in threads:
            t.start()
        for i in range(1, 12):
            s.save(state(i), i)
            if i % 3 == 0:
                s.delete(i)  # the newest step: its blocks die, nothing needs a repack
                s.gc()
        done.set()
        for t in threads:
            t.join()
        assert not errors, errors
        assert checked, "the readers never ran"
        for i in s.steps():
            assert_state_equal(s.load(i), state(i))
        assert s.verify().ok


def test_lock_timeout_waits_for_the_writer(tmp_path):
    import threading

    path = os.path.join(tmp_path, "s")
    a = deltackpt.open(path)
    a.save({"x": 1}, 1)
    b = deltackpt.open(path, lock_timeout=5.0)
    threading.Timer(0.3, a.close).start()
    t0 = time.monotonic()
    b.save({"x": 2}, 2)
    assert 0.2 < time.monotonic() - t0 < 5.0
    assert b.steps() == [1, 2]
    b.close()


# -- limits that protect readers from damaged or hostile indexes ------------------------
@pytest.mark.parametrize("level", [0, -1, 23, 1.5, True])
def test_zstd_level_is_validated_at_open(tmp_path, level):
    with pytest.raises(ValueError, match="zstd level"):
        deltackpt.open(tmp_path / "s", level=level)
    assert not os.path.exists(tmp_path / "s")


def test_delta_depth_is_capped_and_the_longest_chain_loads(tmp_path):
    with pytest.raises(ValueError, match="max_depth"):
        deltackpt.open(tmp_path / "x", delta="xor:chain:65")
    with deltackpt.open(tmp_path / "s", delta="xor:chain:64", block_size=4096) as s:
        states = [{"w": torch.full((64,), float(i)) + torch.arange(64.0)} for i in range(66)]
        for i, st_ in enumerate(states):
            s.save(st_, i)
        depths = [r[0] for r in s._index.query("SELECT depth FROM blocks")]
        assert 32 < max(depths) <= 64
        for i in (0, 64, 65):
            assert_state_equal(s.load(i), states[i])


@pytest.mark.parametrize("damage", ["cycle", "self"])
def test_cyclic_delta_chain_in_the_index_is_corruption_not_a_hang(tmp_path, damage):
    with deltackpt.open(tmp_path / "s", delta="xor:chain:8", block_size=4096) as s:
        s.save({"w": torch.arange(256.0)}, 1)
        s.save({"w": torch.arange(256.0) + 0.5}, 2)
        (kf,), (delta,) = (s._index.query("SELECT id FROM blocks WHERE first_step=?", (n,))
                           for n in (1, 2))
    import sqlite3

    con = sqlite3.connect(tmp_path / "s" / "index.sqlite")
    with con:
        con.execute("UPDATE blocks SET base=? WHERE id=?",
                    (delta[0] if damage == "cycle" else kf[0], kf[0]))
    con.close()
    with deltackpt.open(tmp_path / "s") as s:
        with pytest.raises(deltackpt.CorruptionError, match="cyclic delta chain"):
            s.load(2)
        assert not s.verify().ok


def test_first_save_after_open_holds_a_bounded_number_of_decoded_bases(tmp_path, monkeypatch):
    """The base cache is empty after open, so every base comes from the packs: they must be
    dropped after use, not held until the save ends (that would cost the changed state)."""
    from deltackpt import store as store_mod

    n_blocks = 64
    w = torch.arange(n_blocks * 1024, dtype=torch.float32)
    with deltackpt.open(tmp_path / "s", block_size=4096, threads=2) as s:
        s.save({"w": w}, 1)
    peak = 0
    real_take = store_mod._Decoder.take

    def take(self, bid, where="delta base"):
        nonlocal peak
        out = real_take(self, bid, where)
        peak = max(peak, len(self._cache))
        return out

    monkeypatch.setattr(store_mod._Decoder, "take", take)
    with deltackpt.open(tmp_path / "s", block_size=4096, threads=2) as s:
        r = s.save({"w": w + 0.5}, 2)
        assert r.new_chunks == n_blocks
        assert s.info(2).written_bytes < 0.9 * n_blocks * 4096  # deltas were used
        assert_state_equal(s.load(2), {"w": w + 0.5})
    assert 0 < peak <= 8, peak


def test_a_position_whose_delta_clearly_won_is_not_encoded_twice(tmp_path, monkeypatch):
    """Deltas above the 'good enough' ratio are compared with the standalone frame; a
    position where the delta won clearly is trusted on later saves until its next keyframe."""
    from deltackpt import codec as codec_mod

    g = torch.Generator().manual_seed(3)
    w = torch.randn(64 * 1024, generator=g)
    states = [w]
    for _ in range(4):
        # large relative updates: the XOR residual is ~0.75 of raw (above the 'good
        # enough' 0.7) and still clearly below the standalone frame (~0.84)
        states.append(states[-1] * (1 + 0.1 * torch.randn(w.shape, generator=g)))
    calls = {"standalone": 0, "delta": 0}
    real = codec_mod.encode

    def counting(raw, bid, width, config, base=None, base_id=None, delta=0):
        calls["delta" if delta else "standalone"] += 1
        return real(raw, bid, width, config, base=base, base_id=base_id, delta=delta)

    monkeypatch.setattr(codec_mod, "encode", counting)
    with deltackpt.open(tmp_path / "s", block_size=64 * 1024, delta="xor:chain:8") as s:
        per_save = []
        for i, st_ in enumerate(states):
            before = dict(calls)
            s.save({"w": st_}, i)
            per_save.append({k: calls[k] - before[k] for k in calls})
        for i, st_ in enumerate(states):
            assert_state_equal(s.load(i), {"w": st_})
    blocks = 4
    assert per_save[0] == {"standalone": blocks, "delta": 0}
    # depth 1 (first delta after a keyframe): both encodings are tried
    assert per_save[1] == {"standalone": blocks, "delta": blocks}
    # later saves trust the delta: no standalone encoding
    assert per_save[2] == per_save[3] == {"standalone": 0, "delta": blocks}


def test_a_missing_pack_is_corruption_naming_the_step_and_pack(tmp_path):
    with deltackpt.open(tmp_path / "s") as s:
        s.save({"w": torch.arange(1000.0)}, 7)
        (pack,) = [r[0] for r in s._index.query("SELECT name FROM packs")]
    os.unlink(tmp_path / "s" / pack)
    with deltackpt.open(tmp_path / "s") as s:
        with pytest.raises(deltackpt.CorruptionError, match=r"step 7: a pack the index names is missing") as ei:
            s.load(7)
        assert pack.split("/")[-1] in str(ei.value)
        assert not s.verify().ok


def test_an_index_sqlite_cannot_open_is_a_storage_error_naming_it(tmp_path, monkeypatch):
    """A read-only store directory: SQLite's 'attempt to write a readonly database' names
    no file (root ignores permissions, so the failure is injected)."""
    import deltackpt.store as store_mod
    from deltackpt.errors import StorageError

    path = os.path.join(tmp_path, "s")
    with deltackpt.open(path) as s:
        s.save({"w": torch.ones(2)}, 1)

    def readonly(*args, **kwargs):
        raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(store_mod, "Index", readonly)
    with pytest.raises(StorageError, match=r"index\.sqlite: attempt to write a readonly.*writable"):
        deltackpt.open(path)
