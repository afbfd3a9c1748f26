"""Fuzzing the parsers a reader runs on untrusted bytes: frames (``parse_header`` +
``decode_into``), packs (``scan_pack``) and manifests (``decode_manifest``).

Inputs are random bytes and mutations of valid objects (bit flips, overwritten runs,
truncation, insertion, splices). The only acceptable outcomes: the deltackpt error the
parser documents, or success -- and a frame that decodes must give back exactly the
block it names. Never another exception, a ``MemoryError`` or a hang.

Default: a few thousand cases. Stress (>= 100,000 cases, counted and printed)::

    .venv/bin/python -m pytest -m stress tests/test_fuzz.py -s
"""

from __future__ import annotations

import collections
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deltackpt import codec as C
from deltackpt.backend import MemoryBackend
from deltackpt.errors import CorruptionError, FormatVersionError
from deltackpt.packs import (
    PACK_MAGIC,
    PackWriter,
    decode_manifest,
    encode_manifest,
    scan_pack,
)

CASES: collections.Counter = collections.Counter()
DEFAULT = settings(max_examples=700, deadline=None, derandomize=True,
                   suppress_health_check=list(HealthCheck))
STRESS = settings(max_examples=26_000, deadline=None, derandomize=False,
                  suppress_health_check=list(HealthCheck))


def _raw(seed: int, n: int, kind: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == 0:  # random: raw streams
        return rng.integers(0, 256, n, dtype=np.uint8)
    if kind == 1:  # smooth floats: zstd streams
        return (np.arange(n // 4, dtype=np.float32) / 64).view(np.uint8).copy()
    return np.zeros(n, dtype=np.uint8)


def _valid_frames():
    frames = []
    cfg = C.CodecConfig()
    for seed, (n, kind, width) in enumerate([(64, 0, 4), (1024, 1, 4), (512, 2, 2),
                                             (300, 0, 1), (4096, 1, 8), (0, 2, 4)]):
        raw = _raw(seed, n, kind)
        frames.append((b"".join(bytes(p) for p in C.encode(raw, C.block_id(raw), width, cfg)),
                       raw, None))
    base = _raw(9, 1024, 1)
    raw = base.copy()
    raw[::16] ^= 1
    parts = C.encode(raw, C.block_id(raw), 4, cfg, base=base, base_id=C.block_id(base),
                     delta=C.DELTA_XOR)
    frames.append((b"".join(bytes(p) for p in parts), raw, base))
    return frames


FRAMES = _valid_frames()
BY_ID = {C.parse_header(f).block_id: (raw, base) for f, raw, base in FRAMES}


def _fix_crc(data: bytes) -> bytes:
    """Make the header CRC valid again, so mutations reach the checks behind it."""
    if len(data) < C.HEADER_SIZE:
        return data
    n = data[8]  # the stream count (byte 9 is the zstd level)
    end = C.HEADER_SIZE + 5 * n
    if not 1 <= n <= 16 or len(data) < end + 4:
        return data
    return data[:end] + zlib.crc32(data[:end]).to_bytes(4, "little") + data[end + 4:]


@st.composite
def mutated(draw, originals):
    data = bytearray(draw(st.sampled_from(originals)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 4))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == 0 and data:  # bit flip
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == 1 and data:  # overwrite a run
            run = draw(st.binary(min_size=1, max_size=16))
            data[pos:pos + len(run)] = run
        elif op == 2:  # truncate
            del data[pos:]
        elif op == 3:  # insert
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:  # a 32-bit field set to an extreme
            data[pos:pos + 4] = draw(st.sampled_from(
                [b"\xff\xff\xff\xff", b"\x00\x00\x00\x80", b"\x00\x00\x00\x00"]))
    return bytes(data)


def _frame_case(data: bytes) -> None:
    CASES["frame"] += 1
    try:
        info = C.parse_header(data, "fuzz")
    except CorruptionError:
        return
    # the caller sizes the output from the index: try the original length of every frame
    # with this id, else what the header says (already bounded by MAX_BLOCK_BYTES)
    known = BY_ID.get(info.block_id)
    if known is not None:
        raw, base = known
    else:
        raw, base = np.zeros(min(info.raw_len, 1 << 20), dtype=np.uint8), None
    out = np.empty(raw.nbytes, dtype=np.uint8)
    try:
        C.decode_into(data, out, info, base=base, where="fuzz")
    except CorruptionError:
        return
    assert out.tobytes() == raw.tobytes()  # decoding succeeded: exactly the named block


def _pack_case(data: bytes) -> None:
    CASES["pack"] += 1
    backend = MemoryBackend()
    w = backend.create("packs/aa/x.pack")
    w.write(data)
    w.commit()
    try:
        found = list(scan_pack(backend, "packs/aa/x.pack"))
    except CorruptionError:
        return
    end = len(PACK_MAGIC)
    for info, offset in found:
        assert offset == end and offset + info.frame_len <= len(data)
        end = offset + info.frame_len


MANIFESTS = [encode_manifest({"manifest_version": 1, "step": 7, "tree": ["D", [["w", ["E", 0, {}]]]],
                              "entries": [{"idx": 0, "path": "w", "blocks": "00" * 16}]}),
             encode_manifest({"manifest_version": 1, "step": 1, "tree": None, "entries": []})]


def _manifest_case(data: bytes) -> None:
    CASES["manifest"] += 1
    try:
        payload = decode_manifest(data, "fuzz")
    except (CorruptionError, FormatVersionError):
        return
    assert isinstance(payload, dict) and payload.get("manifest_version") == 1


VALID_FRAMES = [f for f, _, _ in FRAMES]


def _indexed_pack(frames: list[bytes]) -> bytes:
    """A pack as PackWriter writes it: frames, then its pack index and footer."""
    backend = MemoryBackend()
    writer = PackWriter(backend)
    for frame in frames:
        name, _, _ = writer.add([frame])
    writer.finish()
    return backend.read(name)


PACKS = [PACK_MAGIC + b"".join(VALID_FRAMES), PACK_MAGIC + VALID_FRAMES[1] * 3,
         _indexed_pack(VALID_FRAMES), _indexed_pack(VALID_FRAMES[1:3])]


def _run(fn, strategy, cfg):
    @cfg
    @given(strategy)
    def inner(data):
        fn(data)
    inner()


TARGETS = {
    "frame-mutated": (_frame_case, mutated(VALID_FRAMES)),
    "frame-mutated-crc-fixed": (_frame_case, mutated(VALID_FRAMES).map(_fix_crc)),
    "frame-random": (_frame_case, st.binary(max_size=400).map(
        lambda b: C.FRAME_MAGIC + b"\x01" + b)),
    "pack-mutated": (_pack_case, mutated(PACKS)),
    "manifest-mutated": (_manifest_case, mutated(MANIFESTS)),
}


def test_valid_inputs_pass_unchanged():
    for frame, raw, base in FRAMES:
        _frame_case(frame)
        out = np.empty(raw.nbytes, dtype=np.uint8)
        C.decode_into(frame, out, base=base)
        assert out.tobytes() == raw.tobytes()
    backend = MemoryBackend()
    backend.put("p", PACKS[0])
    assert len(list(scan_pack(backend, "p"))) == len(FRAMES)
    backend.put("q", PACKS[2])  # through its pack index: the same frames at the same offsets
    assert [(i.block_id, off) for i, off in scan_pack(backend, "q")] == \
        [(i.block_id, off) for i, off in scan_pack(backend, "p")]
    for m in MANIFESTS:
        assert decode_manifest(m)["manifest_version"] == 1


@pytest.mark.parametrize("target", list(TARGETS))
def test_fuzz(target):
    fn, strategy = TARGETS[target]
    _run(fn, strategy, DEFAULT)


@pytest.mark.stress
def test_fuzz_stress():
    CASES.clear()
    for target, (fn, strategy) in TARGETS.items():
        before = sum(CASES.values())
        _run(fn, strategy, STRESS)
        print(f"\n{target}: {sum(CASES.values()) - before} cases")
    total = sum(CASES.values())
    print(f"fuzz total: {total} cases ({dict(CASES)})")
    assert total >= 100_000
