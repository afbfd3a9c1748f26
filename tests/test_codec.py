"""Frames (deltackpt/codec.py), block ids and spans (hashing.py), packs and manifests.

Golden bytes pin the frame format: any change to the header layout, field
order, codec ids, stream table or CRC fails here. The frames are built from
incompressible data so they hold raw streams and do not depend on the zstd
library version; a zstd frame is pinned for decoding (any zstd must read it).
"""

from __future__ import annotations

import struct
import tracemalloc
import zlib

import numpy as np
import pytest
import zstandard
from helpers import det_bytes

from deltackpt import CorruptionError, FormatVersionError
from deltackpt import codec as C
from deltackpt.hashing import (
    block_id,
    block_spans,
    effective_block_size,
    pack_ids,
    unpack_ids,
)
from deltackpt.packs import (
    MANIFEST_MAGIC,
    PACK_MAGIC,
    decode_manifest,
    encode_manifest,
    manifest_name,
    scan_pack,
)

RAW = bytes.fromhex(
    "3392da7f1a4a40a2c689c811aa8d223d92029e0467500d0b8b2759fbb3acaa14"
    "18fa9bf108ac5919e2ceec226f2baad865f737bc090781e56b06ba41dd3bd483")
BASE = bytes.fromhex(
    "3cab16c93a1384c5c38ac9419078e53ea6b08c368c48b8f3093db13cddec7e65"
    "f6de5b05e026d3c27bdbbbe03fa021862fa93a9855751f8e194dcc00160f4eb5")
RAW_ID = "260907d381bac5a8b41a3d594cc918a4"
BASE_ID = "8207162a060726cd4683058ddf538b91"

# width 4, byte grouping, level 1: four raw streams of 16 bytes
FRAME_GROUP4 = bytes.fromhex(
    "444b4631" "01" "00" "01" "04" "04" "01" "0000" "40000000"
    "260907d381bac5a8b41a3d594cc918a4" "00000000000000000000000000000000"
    "0010000000" "0010000000" "0010000000" "0010000000" "86312f2a"
    "331ac6aa92678bb31808e26f65096bdd924a898d025027acfaacce2bf707063b"
    "da40c8229e0d59aa9b59ecaa3781bad47fa2113d040bfb14f11922d8bce54183")
# width 1, no grouping, level 3: one raw stream
FRAME_W1 = bytes.fromhex(
    "444b4631" "01" "00" "00" "01" "01" "03" "0000" "40000000"
    "260907d381bac5a8b41a3d594cc918a4" "00000000000000000000000000000000"
    "0040000000" "3586f120") + RAW
# xor delta against BASE, width 8, grouped: eight raw streams of 8 bytes
FRAME_XOR8 = bytes.fromhex(
    "444b4631" "01" "01" "01" "08" "08" "01" "0000" "40000000"
    "260907d381bac5a8b41a3d594cc918a4" "8207162a060726cd4683058ddf538b91"
    "0008000000" "0008000000" "0008000000" "0008000000"
    "0008000000" "0008000000" "0008000000" "0008000000" "118bdb78"
    "0f053482ee994a723903b21a24155e4bcc0112e8c0570d76b65032c7f4c22441"
    "203aeb6ee8505ccb59f518408a8b7234c4c7b5d48a8b9e9a6703f871db5e6b36")
# (arange(1024) % 7) as <u4, width 4, grouped, four zstd streams
FRAME_ZSTD = bytes.fromhex(
    "444b463101000104040100000010000043d149cb8f60434e6a24d32fc1c30199"
    "0000000000000000000000000000000001180000000113000000011300000001"
    "130000009b95e5c328b52ffd60000375000038000102030405060100f6551523"
    "28b52ffd6000034d00001000000100fb2b800528b52ffd6000034d0000100000"
    "0100fb2b800528b52ffd6000034d00001000000100fb2b8005")
ZSTD_RAW = (np.arange(1024) % 7).astype("<u4").tobytes()

_HDR = struct.Struct("<4sBBBBBBHI16s16s")


def u8(b: bytes) -> np.ndarray:
    return np.frombuffer(b, dtype=np.uint8)


def joined(parts) -> bytes:
    return b"".join(bytes(p) for p in parts)


def build_frame(streams, raw_len, bid=bytes(16), base=bytes(16), delta=0, transform=1, width=4,
                level=1, version=1, magic=b"DKF1", nstreams=None, crc=None) -> bytes:
    """A frame laid out by hand from the documented format (valid CRC unless given)."""
    n = len(streams) if nstreams is None else nstreams
    head = _HDR.pack(magic, version, delta, transform, width, n, level, 0, raw_len, bid, base)
    head += b"".join(struct.pack("<BI", mode, len(p)) for mode, p in streams)
    crc = zlib.crc32(head) if crc is None else crc
    return head + struct.pack("<I", crc) + b"".join(p for _, p in streams)


def with_crc_fixed(frame: bytes) -> bytes:
    n = frame[9]
    end = 48 + 5 * n
    return frame[:end] + struct.pack("<I", zlib.crc32(frame[:end])) + frame[end + 4:]


# -- golden bytes --------------------------------------------------------------------
def test_block_ids_are_pinned():
    assert block_id(RAW).hex() == RAW_ID
    assert block_id(BASE).hex() == BASE_ID
    assert block_id(u8(RAW)).hex() == RAW_ID and block_id(memoryview(RAW)).hex() == RAW_ID
    assert block_id(RAW, "blake2b").hex() == "d70a862c00555ed1badb4e589bf1b259"
    assert block_id(b"").hex() == "99aa06d3014798d86001c324468d497f"
    assert block_id(b"", "blake2b").hex() == "c804ce198ec337e3dc762bdd1a09aece"
    # the length is part of the identity
    assert block_id(b"\x00") != block_id(b"\x00\x00")
    with pytest.raises(ValueError):
        block_id(RAW, "md5")


def test_golden_frames_encode_exactly():
    bid = bytes.fromhex(RAW_ID)
    assert joined(C.encode(u8(RAW), bid, 4, C.CodecConfig(level=1, bytegroup=True))) \
        == FRAME_GROUP4
    assert joined(C.encode(u8(RAW), bid, 1, C.CodecConfig(level=3, bytegroup=False))) \
        == FRAME_W1
    assert joined(C.encode(u8(RAW), bid, 8, C.CodecConfig(level=1), base=u8(BASE),
                           base_id=bytes.fromhex(BASE_ID), delta=C.DELTA_XOR)) == FRAME_XOR8


@pytest.mark.parametrize("frame,base", [(FRAME_GROUP4, None), (FRAME_W1, None),
                                        (FRAME_XOR8, BASE)], ids=["group4", "w1", "xor8"])
def test_golden_frames_decode(frame, base):
    out = np.empty(64, dtype=np.uint8)
    info = C.decode_into(frame, out, base=None if base is None else u8(base))
    assert out.tobytes() == RAW
    assert info.block_id.hex() == RAW_ID and info.raw_len == 64 and info.frame_len == len(frame)


def test_golden_zstd_frame_decodes_and_header_fields():
    info = C.parse_header(FRAME_ZSTD)
    assert (info.raw_len, info.delta, info.base_id, info.transform, info.width, info.level) == \
        (4096, C.DELTA_NONE, None, C.TRANSFORM_BYTEGROUP, 4, 1)
    assert [m for m, _ in info.streams] == [C.STREAM_ZSTD] * 4
    assert info.payload_offset == 48 + 4 * 5 + 4 == 72 and info.frame_len == len(FRAME_ZSTD)
    assert info.codec == "group4>zstd1"
    out = np.empty(4096, dtype=np.uint8)
    C.decode_into(FRAME_ZSTD, out)
    assert out.tobytes() == ZSTD_RAW
    # the encoder (any zstd version) still picks zstd for every stream of this block
    parts = C.encode(u8(ZSTD_RAW), block_id(ZSTD_RAW), 4, C.CodecConfig())
    again = C.parse_header(parts[0])
    assert [m for m, _ in again.streams] == [C.STREAM_ZSTD] * 4
    C.decode_into(joined(parts), out)
    assert out.tobytes() == ZSTD_RAW


def test_codec_names():
    assert C.parse_header(FRAME_GROUP4).codec == "group4"
    assert C.parse_header(FRAME_W1).codec == "raw"
    assert C.parse_header(FRAME_XOR8).codec == "xor>group8"
    assert C.HEADER_SIZE == 48 and C.FRAME_MAGIC == b"DKF1" and C.FRAME_VERSION == 1


# -- decode rejects ------------------------------------------------------------------
def _zstd_claiming(size: int, payload: bytes) -> bytes:
    """A zstd frame whose header claims ``size`` content bytes, holding one raw block."""
    fhd = 0xE0  # 8-byte content size, single segment, no checksum, no dictionary
    block = struct.pack("<I", (len(payload) << 3) | 1)[:3]  # last block, raw
    return struct.pack("<IB", 0xFD2FB528, fhd) + struct.pack("<Q", size) + block + payload


def _zstd_without_size(payload: bytes) -> bytes:
    block = struct.pack("<I", (len(payload) << 3) | 1)[:3]
    return struct.pack("<IBB", 0xFD2FB528, 0x00, 0x00) + block + payload


def _corrupt_variants():
    good = FRAME_GROUP4
    bid = bytes.fromhex(RAW_ID)
    s = [RAW[i::4] for i in range(4)]  # not what the grouping produces, fine for rejects
    raw_streams = [(0, x) for x in s]
    zs = raw_streams[1:]
    v = {
        "bad magic": (b"DKF2" + good[4:], "bad frame magic"),
        "bad magic fixed crc": (with_crc_fixed(b"XXXX" + good[4:]), "bad frame magic"),
        "bad crc": (good[:68] + bytes([good[68] ^ 1]) + good[69:], "checksum mismatch"),
        "header bit flip": (good[:20] + bytes([good[20] ^ 0x10]) + good[21:], "checksum"),
        "version 2": (with_crc_fixed(good[:4] + b"\x02" + good[5:]), "version 2"),
        "raw_len over limit": (build_frame(raw_streams, C.MAX_BLOCK_BYTES + 4, bid),
                               "claims 268435460 raw bytes"),
        "raw_len 2**32-4": (build_frame(raw_streams, 2**32 - 4, bid), "claims 4294967292"),
        "raw_len not multiple of width": (build_frame(raw_streams, 65, bid), "not a multiple"),
        "zero streams": (build_frame([], 64, bid) + bytes(40), "stream count 0"),
        "17 streams": (build_frame([(0, b"")] * 17, 64, bid), "stream count 17"),
        "stream count not width": (build_frame(raw_streams[:2], 64, bid), "expected 4"),
        "width 3": (build_frame([(0, RAW[:21])] * 3, 63, bid, width=3), "width 3"),
        "unknown delta": (build_frame(raw_streams, 64, bid, delta=3), "unknown codec"),
        "unknown transform": (build_frame(raw_streams, 64, bid, transform=2), "unknown codec"),
        "unknown stream mode": (build_frame([(2, s[0])] + zs, 64, bid), "stream mode 2"),
        "raw stream length": (build_frame([(0, s[0] + b"x")] + zs, 64, bid), "17 bytes"),
        "zstd over bound": (build_frame([(1, b"\x00" * 1100)] + zs, 64, bid), "bound"),
        "zstd claims 2**40": (build_frame([(1, _zstd_claiming(2**40, s[0]))] + zs, 64, bid),
                              "claims 1099511627776"),
        "zstd claims 2**27": (build_frame([(1, _zstd_claiming(2**27, s[0]))] + zs, 64, bid),
                              "claims 134217728"),
        "zstd size absent": (build_frame([(1, _zstd_without_size(s[0]))] + zs, 64, bid),
                             "claims -1"),
        "zstd holds more than it claims": (
            build_frame([(1, _zstd_claiming(16, s[0] * 2))] + zs, 64, bid), "does not decode"),
        "zstd garbage": (build_frame([(1, b"\x28\xb5\x2f\xfd" + b"\xff" * 12)] + zs, 64, bid),
                         "bad zstd stream"),
        "wrong block id": (build_frame(raw_streams, 64, bytes(16)), "do not match block id"),
        "payload flip": (good[:-1] + bytes([good[-1] ^ 0x80]), "do not match block id"),
        "zstd payload flip": (FRAME_ZSTD[:80] + bytes([FRAME_ZSTD[80] ^ 4]) + FRAME_ZSTD[81:],
                              "zstd"),
        "delta frame without base": (FRAME_XOR8, "delta base missing"),
    }
    return v


@pytest.mark.parametrize("name", list(_corrupt_variants()))
def test_decode_rejects_with_corruption_error_and_no_big_allocation(name):
    frame, why = _corrupt_variants()[name]
    raw_len = 4096 if name == "zstd payload flip" else 64
    out = np.zeros(raw_len, dtype=np.uint8)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptionError, match=why) as ei:
            C.decode_into(frame, out, where="test-frame")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"decoding a bad frame allocated {peak} bytes"
    assert str(ei.value).startswith("test-frame: ")


def test_corruption_errors_name_the_location():
    with pytest.raises(CorruptionError, match="pack-x@123"):
        C.parse_header(b"DKF2" + FRAME_GROUP4[4:], "pack-x@123")
    with pytest.raises(CorruptionError, match="step 5, entry 'w'"):
        C.decode_into(FRAME_GROUP4[:-1] + b"\x00", np.empty(64, np.uint8),
                      where="step 5, entry 'w'")


def test_parse_header_honours_max_raw():
    C.parse_header(FRAME_GROUP4, max_raw=64)
    with pytest.raises(CorruptionError, match="claims 64"):
        C.parse_header(FRAME_GROUP4, max_raw=63)


@pytest.mark.parametrize("frame", [FRAME_GROUP4, FRAME_W1, FRAME_ZSTD],
                         ids=["group4", "w1", "zstd"])
def test_every_truncation_is_rejected(frame):
    n = C.parse_header(frame).raw_len
    out = np.empty(n, dtype=np.uint8)
    for cut in range(len(frame)):
        with pytest.raises(CorruptionError):
            C.decode_into(frame[:cut], out)
    C.decode_into(frame + b"trailing bytes are not read", out)


def test_output_of_the_wrong_size_is_rejected():
    with pytest.raises(CorruptionError, match="index expects 65"):
        C.decode_into(FRAME_GROUP4, np.empty(65, np.uint8))


def test_delta_frame_with_wrong_base_is_rejected():
    with pytest.raises(CorruptionError):
        C.decode_into(FRAME_XOR8, np.empty(64, np.uint8), base=u8(RAW))
    with pytest.raises(CorruptionError):
        C.decode_into(FRAME_XOR8, np.empty(64, np.uint8), base=u8(BASE[:32]))


# -- delta modes, widths, grouping ----------------------------------------------------------
@pytest.mark.parametrize("mode", [C.DELTA_XOR, C.DELTA_SUB], ids=["xor", "sub"])
@pytest.mark.parametrize("width", [1, 2, 4, 8])
@pytest.mark.parametrize("bytegroup", [True, False], ids=["grouped", "plain"])
def test_delta_modes_roundtrip_every_width(mode, width, bytegroup):
    n = 4096
    base = np.frombuffer(det_bytes(width, n), dtype=np.uint8).copy()
    raw = base.copy()
    raw[::37] ^= 0x5A  # close to the base: the residual is mostly zero
    raw[:8] = 0x00
    base[:8] = 0xFF  # sub must wrap around
    raw[8:16] = 0xFF
    base[8:16] = 0x01
    bid, base_id = block_id(raw), block_id(base)
    parts = C.encode(raw, bid, width, C.CodecConfig(level=1, bytegroup=bytegroup), base=base,
                     base_id=base_id, delta=mode)
    frame = joined(parts)
    info = C.parse_header(frame)
    assert (info.delta, info.base_id, info.width, info.raw_len) == (mode, base_id, width, n)
    assert info.transform == (C.TRANSFORM_BYTEGROUP if bytegroup and width > 1 else
                              C.TRANSFORM_NONE)
    out = np.empty(n, dtype=np.uint8)
    C.decode_into(frame, out, base=base)
    assert out.tobytes() == raw.tobytes()
    assert len(frame) < n // 2  # the residual compressed
    # the residual itself is exactly invertible
    res = C.apply_delta(mode, raw, base, width)
    C.undo_delta(mode, res, base, width)
    assert res.tobytes() == raw.tobytes()


def test_sub_delta_is_wrapping_integer_difference():
    raw = np.array([0, 0, 0, 0, 0, 0, 0, 0], dtype=np.uint8)
    base = np.array([1, 0, 0, 0, 0, 0, 0, 0], dtype=np.uint8)
    assert C.apply_delta(C.DELTA_SUB, raw, base, 8).tobytes() == b"\xff" * 8
    assert C.apply_delta(C.DELTA_SUB, raw, base, 2).tobytes() == b"\xff\xff" + bytes(6)
    assert C.apply_delta(C.DELTA_XOR, raw, base, 4).tobytes() == b"\x01" + bytes(7)


@pytest.mark.parametrize("width", [1, 2, 4, 8, 3, 16])
@pytest.mark.parametrize("n", [0, 1, 8, 24, 4096, 4099])
def test_encode_decode_any_size_and_width(width, n):
    raw = u8(det_bytes(n + width, n))
    frame = joined(C.encode(raw, block_id(raw), width, C.CodecConfig()))
    info = C.parse_header(frame)
    if width not in (1, 2, 4, 8) or n % width:
        assert info.width == 1  # falls back to bytes
    out = np.empty(n, dtype=np.uint8)
    C.decode_into(frame, out)
    assert out.tobytes() == raw.tobytes()


def test_encode_does_not_modify_its_input():
    raw = u8(det_bytes(1, 4096)).copy()
    base = u8(det_bytes(2, 4096)).copy()
    keep_raw, keep_base = raw.tobytes(), base.tobytes()
    C.encode(raw, block_id(raw), 4, C.CodecConfig(), base=base, base_id=block_id(base),
             delta=C.DELTA_SUB)
    assert raw.tobytes() == keep_raw and base.tobytes() == keep_base


def test_encode_refuses_a_delta_without_a_matching_base():
    raw = u8(RAW)
    with pytest.raises(ValueError):
        C.encode(raw, block_id(RAW), 4, C.CodecConfig(), delta=C.DELTA_XOR)
    with pytest.raises(ValueError):
        C.encode(raw, block_id(RAW), 4, C.CodecConfig(), base=u8(BASE[:32]),
                 base_id=block_id(BASE[:32]), delta=C.DELTA_XOR)


# -- spans and ids -------------------------------------------------------------------------
def test_block_spans():
    assert list(block_spans(10000, 4096, 4)) == [(0, 4096), (4096, 8192), (8192, 10000)]
    assert list(block_spans(0, 4096, 4)) == []
    assert list(block_spans(4096, 4096, 1)) == [(0, 4096)]
    assert list(block_spans(9000, 4100, 16)) == [(0, 4096), (4096, 8192), (8192, 9000)]
    assert list(block_spans(6, 4096, 3))[0] == (0, 6)
    assert effective_block_size(4096, 3) == 4095
    assert effective_block_size(4096, 8192) == 8192  # never below one element
    assert list(block_spans(16384, 4096, 8192)) == [(0, 8192), (8192, 16384)]


def test_pack_and_unpack_ids():
    ids = [bytes([i]) * 16 for i in range(5)]
    assert unpack_ids(pack_ids(ids)) == ids
    assert unpack_ids(b"") == []
    with pytest.raises(ValueError):
        unpack_ids(b"x" * 17)


# -- packs and manifests ------------------------------------------------------------------
def test_manifest_roundtrip_and_rejects():
    payload = {"manifest_version": 1, "step": 3, "tree": ["D", []], "entries": [],
               "metrics": {"x": 1.5}}
    data = encode_manifest(payload)
    assert data[:4] == MANIFEST_MAGIC == b"DKM1"
    assert struct.unpack_from("<I", data, 4)[0] == zlib.crc32(data[8:])
    assert decode_manifest(data) == payload
    assert manifest_name(3) == "manifests/00000000000000000003.manifest"
    with pytest.raises(CorruptionError):
        decode_manifest(b"DKM2" + data[4:])
    with pytest.raises(CorruptionError):
        decode_manifest(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CorruptionError):
        decode_manifest(data[:6])
    body = zstandard.ZstdCompressor().compress(b"[1, 2]")
    with pytest.raises(CorruptionError, match="not an object"):
        decode_manifest(MANIFEST_MAGIC + struct.pack("<I", zlib.crc32(body)) + body)
    body = zstandard.ZstdCompressor().compress(b'{"manifest_version": 2}')
    with pytest.raises(FormatVersionError):
        decode_manifest(MANIFEST_MAGIC + struct.pack("<I", zlib.crc32(body)) + body)
    body = _zstd_claiming(2**40, b"{}")
    with pytest.raises(CorruptionError):
        decode_manifest(MANIFEST_MAGIC + struct.pack("<I", zlib.crc32(body)) + body)


def test_scan_pack_finds_every_frame_and_stops_at_a_torn_one():
    from deltackpt import MemoryBackend

    b = MemoryBackend()
    frames = [FRAME_GROUP4, FRAME_ZSTD, FRAME_W1, FRAME_XOR8]
    data = PACK_MAGIC + b"".join(frames)
    b.put("packs/aa/p.pack", data)
    found = list(scan_pack(b, "packs/aa/p.pack"))
    offsets = [len(PACK_MAGIC)]
    for f in frames[:-1]:
        offsets.append(offsets[-1] + len(f))
    assert [o for _, o in found] == offsets
    assert [i.frame_len for i, _ in found] == [len(f) for f in frames]
    b.put("packs/aa/t.pack", data[:-5])
    assert len(list(scan_pack(b, "packs/aa/t.pack"))) == 3
    b.put("packs/aa/m.pack", b"NOTAPACK" + FRAME_W1)
    with pytest.raises(CorruptionError):
        list(scan_pack(b, "packs/aa/m.pack"))


@pytest.mark.parametrize("width", [1, 2, 4, 8])
@pytest.mark.parametrize("misaligned", [False, True])
def test_group_and_ungroup_match_the_plain_byte_transpose(width, misaligned):
    """The width-2 fast path (casts of little-endian words) and the strided copies give
    exactly byte k of every element in plane k, also on a buffer at an odd address."""
    rng = np.random.default_rng(width)
    n = width * 1000
    buf = rng.integers(0, 256, n + 1, dtype=np.uint8)
    data = buf[1:] if misaligned else buf[:n]
    reference = data.reshape(-1, width).T.copy()
    grouped = np.empty((width, n // width), dtype=np.uint8)
    C.group_into(grouped, data, width)
    assert np.array_equal(grouped, reference)
    out = np.empty(n + 1, dtype=np.uint8)[1:] if misaligned else np.empty(n, dtype=np.uint8)
    C.ungroup_into(out, [reference[k] for k in range(width)], width)
    assert np.array_equal(out, data)


@pytest.mark.parametrize("width", [2, 4, 8])
@pytest.mark.parametrize("hops", [1, 3, C.MAX_SUB_FOLD - 1])
def test_a_run_of_sub_frames_folds_into_plane_sums(width, hops):
    """Summing the decoded planes of a keyframe and ``hops`` SUB frames, then shifting the
    sums into place, gives the block that decoding hop by hop gives, wrap-around and
    carries included (values near 0 and 2**(8*width) that move by +-1 at every hop)."""
    rng = np.random.default_rng(width * 1000 + hops)
    n = width * 512
    ut = {2: np.uint16, 4: np.uint32, 8: np.uint64}[width]
    words = rng.integers(0, 2**63, n // width, dtype=np.uint64).astype(ut)
    words[:4] = np.array([0, 1, -1, -2], dtype=np.int64).astype(ut)  # wrap both ways
    blocks = [words.view(np.uint8).copy()]
    for h in range(hops):
        nxt = blocks[-1].view(ut).copy()
        nxt[:: 3 + h % 5] += ut(1) if h % 2 else np.iinfo(ut).max  # +1 or -1, wrapping
        nxt[1::7] ^= ut(rng.integers(0, 255))  # bigger moves, carries through the planes
        blocks.append(nxt.view(np.uint8))
    cfg = C.CodecConfig(level=1)
    frames = [joined(C.encode(blocks[0], block_id(blocks[0]), width, cfg))]
    for prev, cur in zip(blocks, blocks[1:]):
        frames.append(joined(C.encode(cur, block_id(cur), width, cfg, base=prev,
                                      base_id=block_id(prev), delta=C.DELTA_SUB)))
    infos = [C.parse_header(f) for f in frames]
    assert all(C.composes_grouped(i, infos[-1]) for i in infos)
    assert not C.composes_grouped(infos[-1], C.parse_header(joined(C.encode(
        blocks[1], block_id(blocks[1]), width, cfg, base=blocks[0],
        base_id=block_id(blocks[0]), delta=C.DELTA_XOR))))  # modes do not mix
    sums = np.empty(n, dtype=np.uint16)
    C.add_streams_into(frames[-1], infos[-1], sums, assign=True)
    for f, i in zip(frames[-2::-1], infos[-2::-1]):
        C.add_streams_into(f, i, sums)
    out = np.empty(n, dtype=np.uint8)
    C.combine_sums(out, sums, width)
    assert out.tobytes() == blocks[-1].tobytes()


@pytest.mark.parametrize("declared", ["none", "huge"])
def test_a_pack_index_body_that_hides_its_size_is_refused_without_allocating(declared):
    """A damaged or crafted pack index whose zstd body does not declare its size (or declares
    more than the pack's frames could need) is no index: the scan walks the frames, and never
    lets zstd allocate its output bound (~2.3x the pack) up front."""
    from deltackpt import MemoryBackend
    from deltackpt.packs import FOOTER_SIZE, PACK_INDEX_MAGIC, read_pack_index

    frames = [b"".join(bytes(p) for p in C.encode(raw, C.block_id(raw), 4, C.CodecConfig()))
              for raw in (np.frombuffer(det_bytes(4096, k), dtype=np.uint8) for k in (1, 2))]
    pad = b"\0" * (8 << 20)  # a big pack: its bound would be ~19 MiB
    frames.append(b"".join(bytes(p) for p in C.encode(
        np.frombuffer(pad, dtype=np.uint8), C.block_id(np.frombuffer(pad, dtype=np.uint8)), 4,
        C.CodecConfig())))
    body_src = b"".join(f[:C.parse_header(f).payload_offset] for f in frames)
    body = zstandard.ZstdCompressor(write_content_size=False).compress(body_src)
    data = PACK_MAGIC + b"".join(frames)
    index_offset = len(data)
    if declared == "huge":  # a frame claiming 1 GiB of headers
        body = zstandard.ZstdCompressor().compress(b"\0" * (64 << 20))
    data += body + struct.pack("<8sQII", PACK_INDEX_MAGIC, index_offset, len(body),
                               zlib.crc32(body))
    assert len(data) == index_offset + len(body) + FOOTER_SIZE
    b = MemoryBackend()
    b.put("packs/aa/p.pack", data)
    tracemalloc.start()
    try:
        assert read_pack_index(b, "packs/aa/p.pack") is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20, peak
    # the walk still finds every frame
    assert [i.block_id for i, _ in scan_pack(b, "packs/aa/p.pack")] == \
        [C.parse_header(f).block_id for f in frames]
