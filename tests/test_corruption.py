"""Damaged packs: verify names what broke, load refuses it, nothing else is affected.

Never wrong data: every load either raises CorruptionError or returns the exact
bytes that were saved.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from helpers import (
    assert_state_equal,
    block_rows,
    det_floats,
    det_tensor,
    entry_block_ids,
    flip_byte,
)

import deltackpt
from deltackpt import CorruptionError
from deltackpt import codec as C

torch.set_num_threads(1)
BS = 4096


def _states():
    smooth = torch.arange(2048, dtype=torch.float32) / 64  # compresses: zstd streams
    shared = det_floats((1024,), 3)
    return {
        1: {"rand": det_tensor(torch.float32, (2048,), 1), "smooth": smooth, "shared": shared,
            "small": det_tensor(torch.int64, (16,), 5)},
        2: {"rand": det_tensor(torch.float32, (2048,), 2), "smooth": smooth, "shared": shared,
            "small": det_tensor(torch.int64, (16,), 6)},
    }


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    path = os.path.join(tmp_path_factory.mktemp("corruption"), "store")
    with deltackpt.open(path, block_size=BS, delta="none") as s:
        for step, st_ in _states().items():
            s.save(st_, step)
    return path


@pytest.fixture
def damaged(template, tmp_path):
    """A private copy of the template store, open, plus helpers to find frames."""
    path = os.path.join(tmp_path, "store")
    shutil.copytree(template, path)
    store = deltackpt.open(path)
    yield path, store
    store.close()


def _frame(path, store, step, entry, index=0):
    """(pack file, frame offset, FrameInfo, block id) of an entry's block."""
    bid = entry_block_ids(store, step)[entry][index]
    row = next(r for r in block_rows(store) if r["id"] == bid)
    pack = os.path.join(path, *row["pack"].split("/"))
    with open(pack, "rb") as f:
        f.seek(row["offset"])
        frame = f.read(row["length"])
    return pack, row["offset"], C.parse_header(frame), bid


def _stream_offset(info, mode):
    pos = info.payload_offset
    for m, n in info.streams:
        if m == mode and n > 4:
            return pos + n // 2
        pos += n
    raise AssertionError(f"no stream of mode {mode} in {info}")


def _users(store, bid):
    return sorted((s, p) for s in store.steps() for p, ids in entry_block_ids(store, s).items()
                  if bid in ids)


def _check_never_wrong(store, expected):
    """Every step and every entry either loads exactly or raises CorruptionError."""
    for step, st_ in expected.items():
        try:
            out = store.load(step)
        except CorruptionError:
            pass
        else:
            assert_state_equal(out, st_)
        for key in st_:
            try:
                out = store.load(step, select=key)
            except CorruptionError:
                continue
            assert_state_equal(out, {key: st_[key]})


# (entry whose block gets damaged, step owning it, where in the frame)
CASES = {
    "header-magic": ("small", 2, lambda info: 0),
    "header-raw_len": ("small", 2, lambda info: 12),
    "header-block-id": ("rand", 1, lambda info: 20),
    "stream-table": ("rand", 1, lambda info: C.HEADER_SIZE + 1),
    "header-crc": ("rand", 1, lambda info: info.payload_offset - 2),
    "zstd-payload": ("smooth", 1, lambda info: _stream_offset(info, C.STREAM_ZSTD)),
    "raw-payload": ("rand", 1, lambda info: _stream_offset(info, C.STREAM_RAW)),
    "last-byte": ("shared", 1, lambda info: info.frame_len - 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_flipped_byte_is_found_refused_and_contained(damaged, case):
    path, store = damaged
    entry, step, where = CASES[case]
    expected = _states()
    pack, offset, info, bid = _frame(path, store, step, entry)
    users = _users(store, bid)
    assert users, "the damaged block must belong to a step"
    flip_byte(pack, offset + where(info), 0x41)
    r = store.verify()
    assert not r.ok
    assert r.damaged_steps == sorted({s for s, _ in users})
    assert len(r.problems) == len(users)
    for (s, p), problem in zip(users, sorted(r.problems)):
        assert f"step {s}, entry '{p}'" in problem and bid.hex()[:12] in problem, problem
    for s in r.damaged_steps:
        with pytest.raises(CorruptionError) as ei:
            store.load(s)
        assert f"entry '{entry}'" in str(ei.value) and bid.hex()[:12] in str(ei.value)
        assert not store.verify(s).ok
        with pytest.raises(CorruptionError):
            store.load(s, select=entry)
        # the step's other entries still load
        others = [k for k in expected[s] if k != entry]
        assert_state_equal(store.load(s, select=others), {k: expected[s][k] for k in others})
    for s in set(expected) - set(r.damaged_steps):
        assert_state_equal(store.load(s), expected[s])
        assert store.verify(s).ok


def test_damage_shared_by_two_steps_is_reported_for_both(damaged):
    path, store = damaged
    pack, offset, info, bid = _frame(path, store, 1, "shared")
    flip_byte(pack, offset + info.payload_offset + 5)
    r = store.verify()
    assert r.damaged_steps == [1, 2]
    assert sorted(r.problems) == sorted(
        p for p in r.problems if "entry 'shared'" in p and bid.hex()[:12] in p)
    for s in (1, 2):
        with pytest.raises(CorruptionError):
            store.load(s, select="shared")


def test_truncated_pack(damaged):
    path, store = damaged
    expected = _states()
    pack, offset, info, bid = _frame(path, store, 1, "smooth", 1)  # mid-pack frame
    os.truncate(pack, offset + info.frame_len // 2)
    ids = entry_block_ids(store, 1)
    rows = {r["id"]: r for r in block_rows(store)}
    pack_name = rows[bid]["pack"]
    cut = [b for b, r in rows.items() if r["pack"] == pack_name and r["offset"] >= offset]
    hit = sorted(p for p, bl in ids.items() if set(bl) & set(cut))
    assert "smooth" in hit and "rand" not in hit
    r = store.verify()
    assert not r.ok and 1 in r.damaged_steps
    for p in hit:
        assert any(f"step 1, entry '{p}'" in x for x in r.problems), (p, r.problems)
    with pytest.raises(CorruptionError, match="truncated|short read"):
        store.load(1)
    intact = [p for p in ids if p not in hit]
    assert intact
    assert_state_equal(store.load(1, select=intact), {k: expected[1][k] for k in intact})
    _check_never_wrong(store, expected)


def test_missing_pack_is_reported_and_refused(damaged):
    path, store = damaged
    pack, _, _, _ = _frame(path, store, 2, "rand")
    os.remove(pack)
    r = store.verify()
    assert not r.ok and r.damaged_steps == [2]
    assert any("step 2, entry 'rand'" in p for p in r.problems)
    with pytest.raises((CorruptionError, FileNotFoundError)):
        store.load(2)
    assert_state_equal(store.load(1), _states()[1])


def test_damaged_manifest_is_reported_but_data_still_loads(damaged):
    path, store = damaged
    manifest = os.path.join(path, "manifests", f"{1:020d}.manifest")
    flip_byte(manifest, os.path.getsize(manifest) - 1)
    r = store.verify()
    assert not r.ok and r.damaged_steps == [1]
    assert any(p.startswith("step 1: manifest") for p in r.problems)
    assert_state_equal(store.load(1), _states()[1])
    assert store.verify(2).ok


def test_damaged_delta_base_breaks_its_dependents_only(tmp_path):
    base = det_floats((3 * 1024,), 9)
    states = {}
    path = os.path.join(tmp_path, "s")
    with deltackpt.open(path, block_size=BS, delta="xor:chain:8") as s:
        for i in (1, 2, 3):
            w = base.clone()
            w[::50] += i * 0.01
            states[i] = {"w": w, "other": torch.full((100,), float(i))}
            s.save(states[i], i)
        rows = {r["id"]: r for r in block_rows(s)}
        ids = {i: entry_block_ids(s, i)["w"] for i in (1, 2, 3)}
        assert all(rows[b]["base"] == a for a, b in zip(ids[1], ids[2]))
        assert all(rows[b]["base"] == a for a, b in zip(ids[2], ids[3]))
        # damage step 2's middle block: step 3's block is a delta on it
        pack, offset, info, bid = _frame(path, s, 2, "w", 1)
        flip_byte(pack, offset + info.frame_len - 1)
        r = s.verify()
        assert r.damaged_steps == [2, 3]
        assert any("step 3, entry 'w'" in p and ids[3][1].hex()[:12] in p for p in r.problems)
        assert_state_equal(s.load(1), states[1])
        for i in (2, 3):
            with pytest.raises(CorruptionError):
                s.load(i)
            assert_state_equal(s.load(i, select="other"), {"other": states[i]["other"]})
        _check_never_wrong(s, states)


def _memory_store_with(state):
    s = deltackpt.open("memory://", block_size=BS, delta="none")
    s.save(state, 1)
    row = block_rows(s)[0]
    return s, row


@pytest.mark.parametrize("kind", ["raw", "zstd"])
def test_every_single_byte_flip_of_a_frame_is_detected(kind):
    t = det_tensor(torch.float32, (16,), 4) if kind == "raw" else torch.zeros(256)
    s, row = _memory_store_with({"t": t})
    try:
        info = C.parse_header(s.backend.read(row["pack"], row["offset"], row["length"]))
        modes = {m for m, _ in info.streams}
        assert modes == ({C.STREAM_RAW} if kind == "raw" else {C.STREAM_ZSTD})
        objects = s.backend._objects
        good = objects[row["pack"]]
        for pos in range(row["offset"], row["offset"] + row["length"]):
            for mask in (0x01, 0x80):
                bad = bytearray(good)
                bad[pos] ^= mask
                objects[row["pack"]] = bytes(bad)
                r = s.verify()
                assert not r.ok and r.damaged_steps == [1], (pos - row["offset"], mask)
        for pos in range(row["offset"], row["offset"] + row["length"], 23):
            bad = bytearray(good)
            bad[pos] ^= 0xFF
            objects[row["pack"]] = bytes(bad)
            with pytest.raises(CorruptionError):
                s.load(1)
        objects[row["pack"]] = good
        assert s.verify().ok
        assert_state_equal(s.load(1), {"t": t})
    finally:
        s.close()


def _delta_chain_store(path):
    base = det_floats((3 * 1024,), 9)
    states = {}
    s = deltackpt.open(path, block_size=BS, delta="xor:chain:8")
    for i in (1, 2, 3):
        w = base.clone()
        w[::50] += i * 0.01
        states[i] = {"w": w}
        s.save(states[i], i)
    return s, states


def test_damaged_block_reachable_only_as_a_delta_base(tmp_path):
    path = os.path.join(tmp_path, "s")
    s, states = _delta_chain_store(path)
    try:
        s.delete(2)
        s.gc()  # step 2's blocks stay: step 3's frames are deltas on them
        ids2 = [r["id"] for r in block_rows(s) if r["first_step"] == 2]
        assert len(ids2) == 3
        bid = ids2[0]
        row = next(r for r in block_rows(s) if r["id"] == bid)
        flip_byte(os.path.join(path, *row["pack"].split("/")), row["offset"] + row["length"] - 1)
        r = s.verify()
        assert r.damaged_steps == [3]
        assert len(r.problems) == 1 and "step 3, entry 'w'" in r.problems[0]
        assert_state_equal(s.load(1), states[1])
        with pytest.raises(CorruptionError):
            s.load(3)
    finally:
        s.close()


def test_a_damaged_delta_base_does_not_poison_new_saves(tmp_path):
    path = os.path.join(tmp_path, "s")
    s, states = _delta_chain_store(path)
    s.close()
    with deltackpt.open(path, delta="xor:chain:8") as s:  # reopened: no cached base bytes
        for bid in entry_block_ids(s, 3)["w"]:
            row = next(r for r in block_rows(s) if r["id"] == bid)
            flip_byte(os.path.join(path, *row["pack"].split("/")),
                      row["offset"] + row["length"] - 1)
        w = states[3]["w"].clone()
        w[::50] += 0.01
        r = s.save({"w": w}, 4)  # step 3 is the parent: its blocks would be the bases
        assert r.new_chunks == 3
        assert_state_equal(s.load(4), {"w": w})
        assert s.verify(4).ok and s.verify().damaged_steps == [3]


def _pack_files(path):
    out = []
    for d, _, files in os.walk(os.path.join(path, "packs")):
        out += [os.path.join(d, f) for f in files if f.endswith(".pack")]
    return sorted(out)


def test_every_pack_ends_in_a_pack_index_that_lists_what_a_frame_walk_finds(damaged):
    """The pack index lists exactly the frames a walk of the pack finds, at the same offsets,
    and a scan answers from it in one read of the pack's tail instead of one per frame."""
    from deltackpt.packs import PACK_INDEX_MAGIC, read_pack_index, scan_pack

    path, store = damaged
    for pack in _pack_files(path):
        name = os.path.relpath(pack, path).replace(os.sep, "/")
        with open(pack, "rb") as f:
            data = f.read()
        assert data[-24:-16] == PACK_INDEX_MAGIC
        index_offset = int.from_bytes(data[-16:-8], "little")
        walked, pos = [], 8
        while pos < index_offset:
            info = C.parse_header(data[pos:pos + 200])
            walked.append((info.block_id, pos, info.frame_len))
            pos += info.frame_len
        assert pos == index_offset
        listed = read_pack_index(store.backend, name)
        assert [(i.block_id, off, i.frame_len) for i, off in listed] == walked
        reads = []
        real = store.backend.read

        def counting(n, offset=0, length=None, reads=reads, real=real):
            reads.append((offset, length))
            return real(n, offset, length)

        store.backend.read = counting
        try:
            assert [(i.block_id, off, i.frame_len) for i, off in scan_pack(store.backend,
                                                                           name)] == walked
        finally:
            del store.backend.read
        assert len(reads) == 1 < len(walked), reads  # the tail, which holds the pack index


@pytest.mark.parametrize("where", ["crc", "magic", "body"])
def test_a_damaged_pack_index_is_reported_by_verify_and_reindex_walks_the_frames(damaged,
                                                                               where):
    """Loads never read the pack index: every step still loads. verify reports the pack
    (no step is damaged), and reindex recovers every step by walking the frames."""
    from deltackpt.reindex import reindex

    path, store = damaged
    pack = _pack_files(path)[0]
    with open(pack, "r+b") as f:
        data = f.read()
        index_offset = int.from_bytes(data[-16:-8], "little")
        pos = {"crc": len(data) - 1, "magic": len(data) - 24,
               "body": index_offset + (len(data) - 24 - index_offset) // 2}[where]
        f.seek(pos)
        f.write(bytes([data[pos] ^ 0x55]))
    expected = _states()
    for step, st_ in expected.items():
        assert_state_equal(store.load(step), st_)
    r = store.verify()
    assert r.damaged_steps == [] and len(r.problems) == 1, r.problems
    assert "damaged pack index" in r.problems[0] and os.path.basename(pack) in r.problems[0]
    store.close()
    res = reindex(path)
    assert res.steps_recovered == [1, 2] and not res.steps_lost
    with deltackpt.open(path) as s:
        for step, st_ in expected.items():
            assert_state_equal(s.load(step), st_)


def test_a_renamed_manifest_is_recovered_and_its_name_is_not_overwritten(tmp_path):
    """reindex recovers a manifest stored under another step's name, and says so (gc deletes
    manifests the index lacks, so refusing it would lose the step); a later save of the step
    whose name it took is refused with the way out, and nothing committed is lost."""
    from deltackpt.reindex import reindex

    path = tmp_path / "s"
    expected = _states()
    with deltackpt.open(path, block_size=BS) as s:
        for step, st_ in expected.items():
            s.save(st_, step=step)
    manifests = path / "manifests"
    names = sorted(os.listdir(manifests))
    os.rename(manifests / names[1], manifests / f"{9:020d}.manifest")  # step 2, renamed
    res = reindex(path)
    assert res.steps_recovered == [1, 2] and not res.steps_lost
    assert len(res.problems) == 1 and "recovered under this name" in res.problems[0]
    with deltackpt.open(path) as s:
        s.gc()
        with pytest.raises(deltackpt.InvalidStoreError, match="rename it to"):
            s.save(expected[1], step=9)
        assert s.steps() == [1, 2]
        for step, st_ in expected.items():
            assert_state_equal(s.load(step), st_)
    os.rename(manifests / f"{9:020d}.manifest", manifests / names[1])  # the way out
    reindex(path)
    with deltackpt.open(path) as s:
        s.save(expected[1], step=9)
        assert s.steps() == [1, 2, 9]
        assert_state_equal(s.load(2), expected[2])
