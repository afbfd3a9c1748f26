"""stats (per step, per component, by entry) and the what-if table, against brute force."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil

import pytest
import torch
from click.testing import CliRunner
from helpers import det_floats

import deltackpt
from deltackpt.cli import main
from deltackpt.errors import InvalidInputError
from deltackpt.hashing import unpack_ids
from deltackpt.stats import DROPPED, snapshot, store_stats, top_entries
from deltackpt.whatif import Policy, whatif

torch.set_num_threads(1)

STEPS = (0, 10, 20, 30, 40, 50, 60, 70)


def _state(step: int, w: torch.Tensor, m: torch.Tensor) -> dict:
    return {"model": {"w": w.clone(), "b": det_floats((50,), 3), "emb": det_floats((64, 64), 4)},
            "optimizer": {"state": {"m": m.clone(), "step": torch.tensor(step)}},
            "epoch": step // 10}


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """Partly changing tensors, a chain delta policy (bases shared over several steps)."""
    path = os.path.join(tmp_path_factory.mktemp("stats"), "store")
    w, m = det_floats((96, 256), 1), det_floats((96, 256), 2)
    with deltackpt.open(path, block_size=4096, delta="xor:chain:4") as s:
        for i, step in enumerate(STEPS):
            w[: 6 * (i % 3 + 1)] += 0.01  # a varying number of blocks changes
            m[i * 10:(i + 1) * 10] *= 0.9
            state = _state(step, w, m)
            if step == 40:
                state["model"]["extra"] = det_floats((300,), 5)  # an entry that comes and goes
            s.save(state, step)
    return path


def _frames(store, ids) -> int:
    rows = dict(store._index.query("SELECT id, length FROM blocks"))
    return sum(rows[b] for b in ids)


def _brute_referenced(store, steps) -> set[bytes]:
    ids = set()
    for step in steps:
        for (blob,) in store._index.query("SELECT blocks FROM entries WHERE step=?", (step,)):
            ids.update(unpack_ids(blob))
    return ids


def test_stats_totals_components_and_brute_force(store_dir):
    with deltackpt.open(store_dir) as s:
        st = store_stats(s)
        log = s.log()
        stored = s.stored_bytes()
        first_steps = dict(s._index.query(
            "SELECT first_step, SUM(length) FROM blocks GROUP BY first_step"))
    assert [x["step"] for x in st["steps"]] == list(STEPS)
    assert st["components"] == ["model", "optimizer"]
    full = cum = 0
    for x, info in zip(st["steps"], log):
        full += info.logical_bytes
        cum += info.written_bytes
        assert x["logical_bytes"] == info.logical_bytes and x["written_bytes"] == info.written_bytes
        assert x["full_copies_bytes"] == full and x["cumulative_stored_bytes"] == cum
        # nothing thinned or deleted: the components account for every byte, no "(dropped)"
        assert set(x["components"]) == {"model", "optimizer"}
        assert sum(c["logical_bytes"] for c in x["components"].values()) == info.logical_bytes
        assert sum(c["written_bytes"] for c in x["components"].values()) == info.written_bytes
        assert info.written_bytes == first_steps[info.step]
        assert x["dedup_ratio"] == pytest.approx(1 - info.new_chunks / info.total_chunks)
        assert x["compression_ratio"] > 1.0
    # the optimizer moments change by 10 rows a step, the model's changes vary
    later = st["steps"][3]["components"]
    assert 0 < later["optimizer"]["written_bytes"] < later["optimizer"]["logical_bytes"]
    t = st["total"]
    assert t["stored_bytes"] == stored and t["steps"] == len(STEPS)
    assert t["logical_bytes"] == sum(i.logical_bytes for i in log)
    assert sum(c["written_bytes"] for c in t["components"].values()) == t["written_bytes"]


def test_flat_and_dcp_names_are_grouped_by_module_past_the_component_limit(tmp_path):
    """A flat state dict (or a DCP checkpoint) has one component per tensor: past
    MAX_COMPONENTS they are grouped by their first dotted part, then the smallest
    groups are summed as "(other)"; the sums always equal the step's."""
    from deltackpt.stats import MAX_COMPONENTS, OTHER

    flat = {f"enc.layer{i}.weight": det_floats((32, 32), i) for i in range(10)}
    flat |= {"emb.weight": det_floats((64, 32), 20), "head.bias": det_floats((8,), 21),
             "head.weight#chunk(0,0)": det_floats((8, 32), 22), "step": torch.tensor(7)}
    many = {f"m{i}.w": det_floats((10 + i, 8), 30 + i) for i in range(MAX_COMPONENTS + 3)}
    few = {f"a.b{i}": det_floats((4,), i) for i in range(MAX_COMPONENTS)}  # at the limit
    for state, expected in ((flat, ["emb", "enc", "head", "step"]),
                            (many, sorted(f"m{i}" for i in range(4, MAX_COMPONENTS + 3))
                             + [OTHER]),
                            (few, sorted(few))):
        path = tmp_path / f"s{len(state)}"
        with deltackpt.open(path, block_size=4096) as s:
            s.save(state, 1)
            st = store_stats(s)
            sizes = dict(s._index.query("SELECT path, nbytes FROM entries WHERE step=1"))
        assert st["components"] == expected
        comps = st["steps"][0]["components"]
        assert set(comps) == set(expected)
        groups = {n: (n if n in expected else n.split("#")[0].split(".")[0]) for n in sizes}
        for name in expected:
            want = sum(v for n, v in sizes.items()
                       if groups[n] == name or (name == OTHER and groups[n] not in expected))
            assert comps[name]["logical_bytes"] == want, name
        assert sum(c["written_bytes"] for c in comps.values()) == st["steps"][0]["written_bytes"]


def test_keys_spelt_like_the_summary_rows_stay_their_own_columns(tmp_path):
    """A state key "(other)" or "(dropped)" is quoted, so it neither merges with the
    summed-up rest nor with what thinning dropped, and every step still adds up."""
    from deltackpt.stats import OTHER

    def state(step):
        st = {f"g{i:02d}.w": det_floats((64 + i,), step * 100 + i) for i in range(14)}
        st["(other)"] = det_floats((4096,), step * 100 + 50)
        st["(dropped).w"] = det_floats((2048,), step * 100 + 51)
        return st

    with deltackpt.open(tmp_path / "s", block_size=4096) as s:
        for step in (0, 1):
            s.save(state(step), step)
        s.thin(1, ["(dropped).w", "g00.w"])
        s.gc()
        st = store_stats(s)
    assert st["components"][:2] == ['"(dropped)"', '"(other)"']
    assert st["components"].count(OTHER) == 1 and DROPPED not in st["components"]
    for x in st["steps"]:
        for key in ("logical_bytes", "written_bytes"):
            assert sum(c[key] for c in x["components"].values()) == x[key]
    assert DROPPED in st["steps"][1]["components"]          # what thinning took from step 1
    assert st["steps"][1]["components"]['"(dropped)"']["logical_bytes"] == 2048 * 4


def test_thinned_step_reports_dropped_bytes(store_dir):
    with deltackpt.open(store_dir) as s:
        s.thin(20, ["model"])
        s.gc()
        info = s.info(20)
        x = next(r for r in store_stats(s)["steps"] if r["step"] == 20)
    assert x["components"]["optimizer"] == {"logical_bytes": 0, "written_bytes": 0}
    comps = x["components"]
    assert sum(c["written_bytes"] for c in comps.values()) == info.written_bytes
    assert sum(c["logical_bytes"] for c in comps.values()) == info.logical_bytes
    assert comps[DROPPED]["written_bytes"] > 0
    with deltackpt.open(store_dir) as s:
        t = store_stats(s)["total"]
    assert sum(c["written_bytes"] for c in t["components"].values()) == t["written_bytes"]
    table = CliRunner().invoke(main, ["stats", store_dir]).output
    assert f"{DROPPED} wr." in table.splitlines()[0] and f"  {DROPPED}: " in table


def _written(store) -> dict[int, tuple[int, int, int]]:
    return {x["step"]: (x["written_bytes"], x["new_chunks"],
                        sum(c["written_bytes"] for c in x["components"].values()))
            for x in store_stats(store)["steps"]}


def test_a_rebuilt_index_charges_no_step_with_blocks_it_does_not_reference(tmp_path):
    """reindex charged the delta bases that deleted steps wrote to the first kept step
    needing them, though no entry of that step references them: new_chunks > total_chunks,
    dedup < 0. (The files do not say which save wrote a block: one a deleted step wrote
    and a kept step references directly counts for the first such step, format §13.5.)"""
    from deltackpt.reindex import reindex

    path = str(tmp_path / "s")
    w = det_floats((128, 128), 1)
    saved = {}
    with deltackpt.open(path, block_size=4096, delta="xor:chain:4") as s:
        for step in range(1, 7):
            w = w + 1e-3 * det_floats((128, 128), step + 10)  # every block changes
            r = s.save({"model": {"w": w}}, step)
            saved[step] = (r.written_bytes, r.new_chunks, r.written_bytes)
        s.delete(2)
        s.delete(3)  # its blocks live on as the bases of step 4's deltas
        s.gc()
        assert _written(s) == {k: v for k, v in saved.items() if k not in (2, 3)}
    os.remove(os.path.join(path, "index.sqlite"))
    reindex(path)
    with deltackpt.open(path) as s:
        assert _written(s) == {k: v for k, v in saved.items() if k not in (2, 3)}
        for x in store_stats(s)["steps"]:
            assert x["new_chunks"] <= x["total_chunks"] and x["dedup_ratio"] >= 0


def test_a_step_number_saved_again_before_gc_claims_only_what_it_wrote(store_dir):
    with deltackpt.open(store_dir) as s:
        state = s.load(70)
        s.delete(70)
        r = s.save(state, 70)  # every block still stored: nothing written
        assert r.written_bytes == 0
        st = store_stats(s)
        x = next(r for r in st["steps"] if r["step"] == 70)
        assert x["written_bytes"] == 0 and x["new_chunks"] == 0
        assert all(c["written_bytes"] == 0 for c in x["components"].values())
        assert sum(c["written_bytes"] for c in st["total"]["components"].values()) == \
            st["total"]["written_bytes"]
        entries = {e["path"]: e for e in top_entries(s, 100, 70, 70)}
        assert all(e["written_bytes"] == 0 for e in entries.values())


def test_top_entries_match_brute_force(store_dir):
    with deltackpt.open(store_dir) as s:
        top = top_entries(s, 3, first=10, last=40)
        rows = s._index.query("SELECT step, path, blocks FROM entries WHERE step BETWEEN 10 AND 40")
        blocks = {b: (ln, fs) for b, ln, fs in
                  s._index.query("SELECT id, length, first_step FROM blocks")}
        with pytest.raises(InvalidInputError, match="empty step range"):
            top_entries(s, 3, first=40, last=10)
    want: dict[str, int] = {}
    for step, path, blob in rows:
        for b in set(unpack_ids(blob)):
            if blocks[b][1] == step:
                want[path] = want.get(path, 0) + blocks[b][0]
    best = sorted(want.items(), key=lambda kv: -kv[1])[:3]
    assert [(t["path"], t["written_bytes"]) for t in top] == best
    assert top[0]["steps"] == 4


@pytest.mark.parametrize("policy", [Policy("keep_last", 1), Policy("keep_last", 3),
                                    Policy("keep_every", 20), Policy("keep_every", 30)])
def test_whatif_equals_pruning_a_copy(store_dir, tmp_path, policy):
    """The what-if size is what deleting the other steps and a full gc really leaves."""
    with deltackpt.open(store_dir) as s:
        (row,) = [r for r in whatif(s, [policy]) if r["kind"] == policy.kind]
        now = whatif(s, [])[0]
        assert now["stored_bytes"] == _frames(s, s.live_blocks())
    copy = os.path.join(tmp_path, "pruned")
    shutil.copytree(store_dir, copy)
    with deltackpt.open(copy) as s:
        steps = s.steps()
        kept = set(steps[-policy.n:]) if policy.kind == "keep_last" else \
            {x for x in steps if x % policy.n == 0} | {steps[-1]}
        for step in steps:
            if step not in kept:
                s.delete(step)
        s.gc(repack_threshold=0.0)
        s.gc(repack_threshold=1.0)  # repack every partly dead pack: only live frames remain
        (measured,) = s._index.query("SELECT SUM(length), COUNT(*) FROM blocks")
        packs = s._index.query("SELECT COUNT(*) FROM packs")[0][0]
        assert s.verify().ok
        on_disk = s.stored_bytes()
        # what is not a frame: each pack's magic, and its pack index from index_offset on
        overhead = sum(8 + size - int.from_bytes(s.backend.read(name, size - 16, 8), "little")
                       for name, size in s._index.query("SELECT name, size FROM packs"))
    assert row["steps_kept"] == len(kept)
    assert (row["stored_bytes"], row["blocks"]) == tuple(measured)
    assert on_disk == row["stored_bytes"] + overhead
    assert overhead < 8 * packs + 200 * row["blocks"]
    assert row["stored_bytes"] < now["stored_bytes"]


def test_whatif_save_every_and_chain_closure(store_dir):
    with deltackpt.open(store_dir) as s:
        rows = whatif(s, [Policy("save_every", 20), Policy("keep_every", 20)], 0.02)
        referenced = _brute_referenced(s, [0, 20, 40, 60])
        save_every = _frames(s, referenced)
        bases = dict(s._index.query("SELECT id, base FROM blocks"))
    est, keep = rows[1], rows[2]
    assert est["estimate"] and est["steps_kept"] == 4
    assert est["stored_bytes"] == save_every and est["blocks"] == len(referenced)
    # keep-every keeps 70 (latest) too, and the delta bases of what it keeps
    closure = set(referenced | _brute_referenced(deltackpt.open(store_dir), [70]))
    todo = list(closure)
    while todo:
        b = bases[todo.pop()]
        if b is not None and b not in closure:
            closure.add(b)
            todo.append(b)
    assert keep["blocks"] == len(closure) > len(referenced)
    assert keep["monthly_cost"] == pytest.approx(keep["stored_bytes"] / 2**30 * 0.02)


def test_whatif_rejects_bad_input(store_dir):
    with pytest.raises(InvalidInputError):
        Policy("keep_last", 0)
    with pytest.raises(InvalidInputError):
        Policy("keep_sometimes", 3)
    with deltackpt.open(store_dir) as s, pytest.raises(InvalidInputError, match="price"):
        whatif(s, None, -1.0)


def test_snapshot_of_an_empty_store(tmp_path):
    with deltackpt.open(os.path.join(tmp_path, "e")) as s:
        snap = snapshot(s)
        st = store_stats(s)
        assert snap.steps.size == 0 and st["steps"] == [] and st["total"]["logical_bytes"] == 0
        assert whatif(s)[0]["stored_bytes"] == 0


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_stats_table_json_csv(store_dir):
    data = json.loads(run("stats", store_dir, "--json").stdout)
    assert [x["step"] for x in data["steps"]] == list(STEPS)
    r = run("stats", store_dir)
    assert r.exit_code == 0 and "model wr." in r.stdout and "8 steps" in r.stdout
    r = run("stats", store_dir, "--csv")
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    per_step = [x for x in rows if x["component"] == ""]
    assert [int(x["written_bytes"]) for x in per_step] == \
        [x["written_bytes"] for x in data["steps"]]
    for x in data["steps"]:
        parts = [int(c["written_bytes"]) for c in rows
                 if c["step"] == str(x["step"]) and c["component"]]
        assert sum(parts) == x["written_bytes"]
    r = run("stats", store_dir, "--by-entry", "--top", 2, "--from", 10, "--to", 40, "--json")
    assert r.exit_code == 0 and len(json.loads(r.stdout)) == 2
    r = run("stats", store_dir, "--by-entry", "--csv")
    assert r.exit_code == 0 and r.stdout.startswith("path,written_bytes")


@pytest.mark.parametrize("args,fragment", [
    (("--json", "--csv"), "exclude"),
    (("--from", 3), "--by-entry"),
    (("--by-entry", "--top", 0), "--top"),
    (("--by-entry", "--from", 50, "--to", 10), "empty step range"),
])
def test_cli_stats_bad_arguments(store_dir, args, fragment):
    r = run("stats", store_dir, *args)
    assert r.exit_code != 0 and fragment in r.output and "Traceback" not in r.output


def test_cli_stats_missing_store(tmp_path):
    r = run("stats", tmp_path / "nope")
    assert r.exit_code == 9 and "no deltackpt store" in r.output
