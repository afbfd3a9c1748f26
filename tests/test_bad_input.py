"""Crafted input: frames, index rows, manifests, names and links a hostile or broken store
could hand a reader. Each raises a clear deltackpt error before any large allocation and
without touching anything outside the store; a refused save leaves the store unchanged."""

from __future__ import annotations

import collections
import json
import os
import shutil
import sqlite3
import struct
import tracemalloc
import warnings
import zlib

import numpy as np
import pytest
import torch
import zstandard
from helpers import assert_state_equal, block_rows, det_floats, dir_digest, entry_block_ids

import deltackpt
from deltackpt import (
    CorruptionError,
    DeltackptError,
    FormatVersionError,
    InvalidStoreError,
    UnsupportedValueError,
)
from deltackpt import codec as C
from deltackpt.packs import PACK_MAGIC, decode_manifest, encode_manifest
from deltackpt.reindex import reindex

torch.set_num_threads(1)
BS = 4096
_HEADER = struct.Struct("<4sBBBBBBHI16s16s")
#: what a refused input may allocate (traced by tracemalloc: Python and numpy buffers)
SMALL = 16 * 1024 * 1024


def _frame(data: np.ndarray, width: int = 4) -> bytes:
    parts = C.encode(data, C.block_id(data), width, C.CodecConfig())
    return b"".join(bytes(p) for p in parts)


def _rebuild(frame: bytes, streams: list[tuple[int, bytes]] | None = None, **fields) -> bytes:
    """``frame`` with header fields and/or streams replaced, the header CRC made valid."""
    info = C.parse_header(frame)
    names = ("magic", "version", "delta", "transform", "width", "nstreams", "level", "res",
             "raw_len", "bid", "base")
    values = dict(zip(names, _HEADER.unpack_from(frame, 0)))
    if streams is None:
        pos, streams = info.payload_offset, []
        for mode, n in info.streams:
            streams.append((mode, frame[pos:pos + n]))
            pos += n
    values["nstreams"] = len(streams)
    values.update(fields)
    head = _HEADER.pack(*(values[n] for n in names))
    head += b"".join(struct.pack("<BI", m, len(b)) for m, b in streams)
    return head + struct.pack("<I", zlib.crc32(head)) + b"".join(b for _, b in streams)


def _smooth(n: int = 1024) -> np.ndarray:
    return (np.arange(n, dtype=np.float32) // 256 + 1.5).view(np.uint8)


def _zstd_streams(frame: bytes) -> list[tuple[int, bytes]]:
    info = C.parse_header(frame)
    pos, out = info.payload_offset, []
    for mode, n in info.streams:
        out.append((mode, frame[pos:pos + n]))
        pos += n
    assert all(m == C.STREAM_ZSTD for m, _ in out)
    return out


def _with_fcs(stream: bytes, size: int) -> bytes:
    """A zstd frame (single segment, 2-byte content size) re-headed to claim ``size``."""
    assert stream[4] == 0x60, stream[:5].hex()  # FCS field 2 bytes, single segment
    return stream[:4] + bytes([0xE0]) + struct.pack("<Q", size) + stream[7:]


def _crafted_frames() -> dict[str, tuple[bytes, int]]:
    """name -> (frame, raw length the index would record)."""
    raw = _smooth()
    good = _frame(raw)
    streams = _zstd_streams(good)
    big = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(2048))
    nosize = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1024))
    cases = {
        "raw_len over the limit": (_rebuild(good, raw_len=C.MAX_BLOCK_BYTES + 4), 4096),
        "raw_len 2^32-4": (_rebuild(good, raw_len=2**32 - 4), 4096),
        "no streams": (_rebuild(good, streams=[]), 4096),
        "17 streams": (_rebuild(good, streams=streams * 4 + streams[:1]), 4096),
        "future frame version": (_rebuild(good, version=2), 4096),
        "unknown delta codec": (_rebuild(good, delta=7), 4096),
        "unknown transform": (_rebuild(good, transform=9), 4096),
        "width 3": (_rebuild(good, width=3, streams=streams[:3], raw_len=3072), 3072),
        "unknown stream mode": (_rebuild(good, streams=[(9, s) for _, s in streams]), 4096),
        "raw stream of the wrong size": (
            _rebuild(good, streams=[(C.STREAM_RAW, b"x" * 10)] * 4), 4096),
        "zstd claims 2^40 bytes": (
            _rebuild(good, streams=[(1, _with_fcs(s, 2**40)) for _, s in streams]), 4096),
        "zstd inflates past its size": (
            _rebuild(good, streams=[(1, big[:4] + big[4:5] + struct.pack("<H", 1024 - 256)
                                     + big[7:])] + streams[1:]), 4096),
        "zstd without a content size": (_rebuild(good, streams=[(1, nosize)] + streams[1:]),
                                        4096),
        "zstd stream garbage": (_rebuild(good, streams=[(1, b"\x28\xb5\x2f\xfd" + b"\xff" * 12)]
                                         + streams[1:]), 4096),
        "delta frame without base": (_rebuild(good, delta=C.DELTA_XOR, base=b"b" * 16), 4096),
        "truncated": (good[:-3], 4096),
        "header only": (good[:C.HEADER_SIZE], 4096),
        "bad magic": (b"PKF1" + good[4:], 4096),
    }
    assert big[4] == 0x60 and len(big) > 7
    return cases


CRAFTED = _crafted_frames()


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_frame_is_refused_before_any_large_allocation(case):
    frame, raw_len = CRAFTED[case]
    tracemalloc.start()
    try:
        with pytest.raises(CorruptionError) as ei:
            info = C.parse_header(frame, "the frame", max_raw=raw_len)
            C.decode_into(frame, np.empty(raw_len, dtype=np.uint8), info, where="the frame")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "the frame" in str(ei.value)
    assert peak < SMALL, peak


def _store(path):
    state = {"w": det_floats((2048,), 1), "t": torch.arange(1024, dtype=torch.float32) / 64,
             "meta": {"step": 1}}
    with deltackpt.open(path, block_size=BS, delta="none") as s:
        s.save(state, 1)
        s.save({**state, "w": det_floats((2048,), 2)}, 2)
    return state


def _sql(path, *statements):
    con = sqlite3.connect(os.path.join(path, "index.sqlite"))
    for st, args in statements:
        con.execute(st, args)
    con.commit()
    con.close()


@pytest.mark.parametrize("case", ["zstd claims 2^40 bytes", "zstd inflates past its size",
                                  "future frame version", "unknown delta codec",
                                  "raw_len over the limit"])
def test_crafted_frame_in_a_pack_is_refused_by_load_and_named_by_verify(tmp_path, case):
    path = os.path.join(tmp_path, "s")
    state = _store(path)
    with deltackpt.open(path) as s:
        bid = entry_block_ids(s, 1)["t"][0]
    frame, raw = CRAFTED[case]
    frame = frame[:20] + bid + frame[36:]  # the crafted frame claims the real block's id
    head_len = C.HEADER_SIZE + 5 * frame[9] if frame[9] <= 16 else C.HEADER_SIZE
    head = frame[:head_len]
    frame = head + struct.pack("<I", zlib.crc32(head)) + frame[head_len + 4:]
    os.makedirs(os.path.join(path, "packs", "ff"), exist_ok=True)
    with open(os.path.join(path, "packs", "ff", "crafted.pack"), "wb") as f:
        f.write(PACK_MAGIC + frame)
    _sql(path, ("INSERT INTO packs(id, name, size, created_at) VALUES (999, ?, ?, 0)",
                ("packs/ff/crafted.pack", len(PACK_MAGIC) + len(frame))),
         ("UPDATE blocks SET pack_id=999, offset=?, length=? WHERE id=?",
          (len(PACK_MAGIC), len(frame), bid)))
    with deltackpt.open(path) as s:
        for step in (1, 2):
            tracemalloc.start()
            try:
                with pytest.raises(CorruptionError) as ei:
                    s.load(step)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert f"step {step}, entry 't'" in str(ei.value) and bid.hex()[:12] in str(ei.value)
            assert peak < SMALL
            assert_state_equal(s.load(1, select=["w", "meta"]),
                               {"w": state["w"], "meta": state["meta"]})
        r = s.verify()
        assert r.damaged_steps == [1, 2]
        assert all("entry 't'" in p for p in r.problems)


# index rows a reader must refuse before allocating; the manifest is removed so that the
# load cannot fall back on its cross-check and the row checks themselves are exercised
ROWS = {
    "negative shape": ("UPDATE entries SET shape='[-1]' WHERE path='t'", ()),
    "float shape": ("UPDATE entries SET shape='[1e400]' WHERE path='t'", ()),
    "shape not json": ("UPDATE entries SET shape='[10' WHERE path='t'", ()),
    "overflowing shape": ("UPDATE entries SET shape='[1099511627776]', nbytes=4398046511104 "
                          "WHERE path='t'", ()),
    "shape/nbytes disagree": ("UPDATE entries SET shape='[1025]' WHERE path='t'", ()),
    "unknown dtype": ("UPDATE entries SET dtype='float128' WHERE path='t'", ()),
    "unknown kind": ("UPDATE entries SET kind='pickle' WHERE path='t'", ()),
    "block list not a multiple of 16": (
        "UPDATE entries SET blocks=substr(blocks, 1, 7) WHERE path='t'", ()),
    "raw_len 2^40": ("UPDATE blocks SET raw_len=1099511627776", ()),
    "frame length 2^40": ("UPDATE blocks SET length=1099511627776", ()),
    "frame length past the end of the pack": ("UPDATE blocks SET length=length+50000", ()),
    "offset past the end of the pack": ("UPDATE blocks SET offset=offset+10000000", ()),
    "negative offset": ("UPDATE blocks SET offset=-8", ()),
    "tree not json": ("UPDATE steps SET tree='[\"D\", [[\"w\"' ", ()),
    "tree of the wrong shape": ("UPDATE steps SET tree='[\"E\", \"x\", 5]'", ()),
    "cyclic delta chain": ("UPDATE blocks SET base=id", ()),
}


@pytest.mark.parametrize("case", list(ROWS))
def test_crafted_index_row_is_refused(tmp_path, case):
    path = os.path.join(tmp_path, "s")
    _store(path)
    for step in (1, 2):
        os.remove(os.path.join(path, "manifests", f"{step:020d}.manifest"))
    _sql(path, ROWS[case])
    with deltackpt.open(path) as s:
        tracemalloc.start()
        try:
            with pytest.raises(CorruptionError) as ei:
                s.load(1)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < SMALL, peak
        assert "step 1" in str(ei.value) or "index" in str(ei.value), str(ei.value)
        r = s.verify(1)  # never raises for damage; reports it
        assert not r.ok


def test_manifest_vouches_for_the_rows_it_holds(tmp_path):
    path = os.path.join(tmp_path, "s")
    _store(path)
    _sql(path, ("UPDATE entries SET shape='[-1]' WHERE path='t'", ()))
    with deltackpt.open(path) as s, pytest.raises(CorruptionError,
                                                  match="disagrees with manifest.*reindex"):
        s.load(1)


@pytest.mark.parametrize("name", ["../outside.pack", "packs/../../outside.pack",
                                  "/tmp/outside.pack", "packs/a/./b.pack", ""])
def test_pack_names_outside_the_store_are_refused_and_nothing_outside_is_touched(tmp_path,
                                                                                 name):
    path = os.path.join(tmp_path, "s")
    _store(path)
    outside = os.path.join(tmp_path, "outside.pack")
    with open(outside, "wb") as f:
        f.write(b"do not touch")
    _sql(path, ("UPDATE packs SET name=? WHERE id=(SELECT MIN(id) FROM packs)", (name,)),
         ("UPDATE steps SET manifest=? WHERE step=2", ("../outside.pack",)))
    with deltackpt.open(path) as s:
        with pytest.raises(InvalidStoreError, match="invalid object name"):
            s.load(1)
        assert not s.verify().ok
        try:  # gc trusts the index (writers are trusted): it may run, never outside
            s.gc()
        except DeltackptError:
            pass
        with pytest.raises(InvalidStoreError):
            s.delete(2)
    with open(outside, "rb") as f:
        assert f.read() == b"do not touch"


def test_symlinked_pack_and_manifest_are_not_followed(tmp_path):
    path = os.path.join(tmp_path, "s")
    state = _store(path)
    with deltackpt.open(path) as s:
        bid = entry_block_ids(s, 1)["t"][0]  # "t" is the same in both steps: one block
        pack = next(r["pack"] for r in block_rows(s) if r["id"] == bid)
    target = os.path.join(path, *pack.split("/"))
    copy = os.path.join(tmp_path, "elsewhere.pack")
    shutil.copy(target, copy)  # even a byte-identical file is refused through a link
    os.remove(target)
    os.symlink(copy, target)
    manifest = os.path.join(path, "manifests", f"{1:020d}.manifest")
    shutil.copy(manifest, copy + ".m")
    os.remove(manifest)
    os.symlink(copy + ".m", manifest)
    with deltackpt.open(path) as s:
        with pytest.raises(CorruptionError, match="symbolic link"):
            s.load(1)
        r = s.verify()
        assert any("symbolic link" in p for p in r.problems)
        assert any("step 1: manifest" in p for p in r.problems)
        with pytest.raises(CorruptionError):
            s.load(2, select="t")
        assert_state_equal(s.load(2, select="meta"), {"meta": state["meta"]})


def test_future_format_versions_are_refused(tmp_path):
    path = os.path.join(tmp_path, "s")
    _store(path)
    cfg = os.path.join(path, "deltackpt.json")
    with open(cfg) as f:
        data = json.load(f)
    with open(cfg, "w") as f:
        json.dump({**data, "format_version": 2}, f)
    with pytest.raises(FormatVersionError, match="format version 2"):
        deltackpt.open(path)
    with open(cfg, "w") as f:
        json.dump(data, f)
    manifest = os.path.join(path, "manifests", f"{1:020d}.manifest")
    with open(manifest, "rb") as f:
        payload = decode_manifest(f.read())
    with open(manifest, "wb") as f:
        f.write(encode_manifest({**payload, "manifest_version": 2}))
    with open(manifest, "rb") as f, pytest.raises(FormatVersionError,
                                                  match="manifest version 2"):
        decode_manifest(f.read())
    with deltackpt.open(path) as s:
        r = s.verify()
        assert r.damaged_steps == [1] and "manifest version 2" in r.problems[0]


def test_manifest_claiming_a_huge_size_is_refused_before_decompression():
    body = zstandard.ZstdCompressor(write_content_size=True).compress(b"{}")
    assert body[4] == 0x20  # 1-byte content size, single segment
    huge = body[:4] + bytes([0xE0]) + struct.pack("<Q", 2**40) + body[6:]
    data = b"DKM1" + struct.pack("<I", zlib.crc32(huge)) + huge
    tracemalloc.start()
    try:
        with pytest.raises(CorruptionError, match="claims"):
            decode_manifest(data, "m")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < SMALL


class _Opaque:
    pass


def _nested(parts: list[torch.Tensor]) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "prototype stage"
        return torch.nested.nested_tensor(parts)


UNSUPPORTED = {
    "object": _Opaque(),
    "lambda": lambda: 1,
    "set": {1, 2},
    "tuple key": {(1, 2): 3},
    "sparse tensor": torch.eye(3).to_sparse(),
    "nested under a tensor": {"ok": torch.ones(2), "bad": [torch.ones(2), object()]},
    "deque": collections.deque([1]),
    "lone surrogate in a key": {"ok": 1, "\ud800": torch.ones(3)},
    "nested tensor": _nested([torch.ones(2), torch.ones(3)]),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_refused_save_leaves_the_store_byte_for_byte_unchanged(tmp_path, case):
    path = os.path.join(tmp_path, "s")
    _store(path)
    with deltackpt.open(path) as s:
        before = dir_digest(path, skip_suffixes=("-shm",))
        with pytest.raises(UnsupportedValueError):
            s.save({"w": torch.ones(4), "x": UNSUPPORTED[case]}, 3)
        assert dir_digest(path, skip_suffixes=("-shm",)) == before
        with pytest.raises(DeltackptError):
            s.save({"w": torch.ones(4)}, 2)  # exists: refused once it holds the writer lock
        # the lock file now names its holder; nothing else changed
        before.pop("lock")
        assert dir_digest(path, skip_suffixes=("-shm", "lock")) == before
        assert s.steps() == [1, 2]
    # after close: the same data files and the same (checkpointed) index
    assert dir_digest(path, skip_suffixes=("-shm", "-wal", "lock")) == {
        k: v for k, v in before.items() if not k.endswith("-wal")}


def test_refusals_name_the_value_and_a_bad_note_writes_nothing(tmp_path):
    path = os.path.join(tmp_path, "s")
    _store(path)
    with deltackpt.open(path) as s:
        with pytest.raises(UnsupportedValueError, match=r"dict key '\\ud800' at 'a'.*surrogate"):
            s.save({"a": {"\ud800": torch.ones(3)}}, 3)
        with pytest.raises(UnsupportedValueError, match="'x/1'.*nested tensors"):
            s.save({"x": [1, _nested([torch.ones(2)])]}, 3)
        before = dir_digest(path, skip_suffixes=("-shm", "-wal", "lock"))
        with pytest.raises(UnsupportedValueError, match="the note"):
            s.save({"w": torch.ones(4)}, 3, note="bad \udc80 note")
        assert dir_digest(path, skip_suffixes=("-shm", "-wal", "lock")) == before
        # characters beyond the BMP are fine (JSON writes them as surrogate pairs)
        s.save({"\U0001f600": torch.ones(4)}, 3, note="\U0001f600")
    os.remove(os.path.join(path, "index.sqlite"))
    reindex(path)
    with deltackpt.open(path) as s:
        assert_state_equal(s.load(3), {"\U0001f600": torch.ones(4)})
        assert s.info(3).note == "\U0001f600"


def test_lone_surrogates_in_values_survive_reindex_and_gc_and_a_crafted_path_is_reported(
        tmp_path):
    """String values with lone surrogates (file names decoded with surrogateescape) are
    JSON escapes in manifests: a rebuilt index keeps such a step (a first fix of keys
    refused every manifest holding one, and reindex + gc then deleted the step). Only a
    crafted manifest with such an entry path cannot go into the index: reported, skipped."""
    path = os.path.join(tmp_path, "s")
    value = {"w": torch.ones(3), "file": "data/\udcff.bin", "tags": ["\udc80"]}
    with deltackpt.open(path) as s:
        s.save(value, 1, metrics={"m": 1.0}, tags=["x\udc81"])
    os.remove(os.path.join(path, "index.sqlite"))
    r = reindex(path)
    assert r.steps_recovered == [1] and not r.problems
    with deltackpt.open(path) as s:
        s.gc()
        assert_state_equal(s.load(1), value)
        assert s.info(1).tags == ["x\udc81"] and s.verify().ok
    crafted = encode_manifest({"manifest_version": 1, "step": 2, "tree": ["D", []],
                               "entries": [{"idx": 0, "path": "a\ud800", "blocks": ""}]})
    with open(os.path.join(path, "manifests", "00000000000000000002.manifest"), "wb") as f:
        f.write(crafted)
    os.remove(os.path.join(path, "index.sqlite"))
    r = reindex(path)
    assert r.steps_recovered == [1] and any("malformed" in p for p in r.problems)
    # other fields the index stores as text, and a manifest without a tree: skipped too,
    # never an abort of the whole rebuild
    for entry in ({"idx": 0, "path": "a", "kind": "tensor\udc80", "dtype": "float32",
                   "shape": [0], "nbytes": 0, "block_size": 0, "blocks": ""},):
        for payload in ({"tree": ["D", []], "entries": [entry]}, {"entries": []}):
            crafted = encode_manifest({"manifest_version": 1, "step": 2, **payload})
            with open(os.path.join(path, "manifests", "00000000000000000002.manifest"),
                      "wb") as f:
                f.write(crafted)
            os.remove(os.path.join(path, "index.sqlite"))
            r = reindex(path)
            assert r.steps_recovered == [1] and any("malformed" in p for p in r.problems)
