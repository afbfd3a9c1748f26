"""Block frames: the self-describing, checked encoding of one block.

A frame records its own pipeline, applied in this order when encoding and in
reverse when decoding::

    raw block --[delta: xor/sub against a base block]--> --[byte grouping by width]-->
        --[zstd per stream, or the stream raw when zstd does not pay]--> frame

Every field a decoder needs is in the frame header (docs/format.md, "Frames").
Decoding validates the header (magic, CRC, lengths, codec ids) before it
allocates anything, bounds every decompression by the length the header
promises, and re-hashes the result against the block id. A frame can therefore
never make a reader allocate more than ``raw_len`` or return wrong bytes.
"""

from __future__ import annotations

import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import zstandard

from .errors import CorruptionError
from .hashing import block_id

FRAME_MAGIC = b"DKF1"
FRAME_VERSION = 1
#: largest raw block a frame may describe; a reader refuses anything larger
MAX_BLOCK_BYTES = 256 * 1024 * 1024

DELTA_NONE, DELTA_XOR, DELTA_SUB = 0, 1, 2
DELTA_NAMES = {DELTA_NONE: "none", DELTA_XOR: "xor", DELTA_SUB: "sub"}
TRANSFORM_NONE, TRANSFORM_BYTEGROUP = 0, 1
STREAM_RAW, STREAM_ZSTD = 0, 1

# magic, version, delta, transform, width, nstreams, level, reserved(2), raw_len, id, base
_HEADER = struct.Struct("<4sBBBBBBHI16s16s")
HEADER_SIZE = _HEADER.size  # 48
_STREAM = struct.Struct("<BI")
_CRC = struct.Struct("<I")
_ZERO_ID = bytes(16)
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}

#: a zstd stream is kept only when it is at most this fraction of the raw stream
_KEEP_RATIO = 0.98
#: streams larger than this are first probed with a sample to skip hopeless zstd calls
_PROBE_MIN = 256 * 1024
_PROBE_SIZE = 32 * 1024


@dataclass(frozen=True)
class FrameInfo:
    """What a frame header says, validated."""

    block_id: bytes
    raw_len: int
    delta: int
    base_id: bytes | None
    transform: int
    width: int
    level: int
    streams: tuple[tuple[int, int], ...]  # (mode, stored_len)
    payload_offset: int  # offset of the first stream within the frame
    frame_len: int

    @property
    def codec(self) -> str:
        """Short text form of the pipeline, e.g. ``xor>group4>zstd1``."""
        parts = []
        if self.delta != DELTA_NONE:
            parts.append(DELTA_NAMES[self.delta])
        if self.transform == TRANSFORM_BYTEGROUP:
            parts.append(f"group{self.width}")
        if any(m == STREAM_ZSTD for m, _ in self.streams):
            parts.append(f"zstd{self.level}")
        return ">".join(parts) or "raw"


@dataclass(frozen=True)
class CodecConfig:
    """How new blocks are encoded (decoding needs none of it: frames describe themselves).

    ``level`` 1 (the default) uses zstd parameters tuned for byte-grouped float
    streams: the fast strategy with the longest minimum match and a tiny hash
    table, so zstd spends its time on entropy coding, which is where these
    streams compress (docs/benchmarks.md: faster than level 1 and smaller).
    Other levels are zstd's own.
    """

    level: int = 1
    bytegroup: bool = True

    def __post_init__(self) -> None:
        # the frame header stores the level as a u8; zstd's negative "fast" levels
        # do not help byte-grouped floats (docs/codec-experiments.md)
        if isinstance(self.level, bool) or not isinstance(self.level, int) or \
                not 1 <= self.level <= 22:
            raise ValueError(f"zstd level must be an int in [1, 22], got {self.level!r}")

    def to_json(self) -> dict:
        return {"level": self.level, "bytegroup": self.bytegroup}

    @classmethod
    def from_json(cls, data: dict) -> CodecConfig:
        return cls(level=int(data.get("level", 1)), bytegroup=bool(data.get("bytegroup", True)))


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    c = cache.get(level)
    if c is None:
        # content size in every frame lets the decoder check it before allocating
        if level == 1:
            params = zstandard.ZstdCompressionParameters(
                strategy=zstandard.STRATEGY_FAST, min_match=7, search_log=1, hash_log=8,
                window_log=17, write_content_size=True, write_checksum=False)
            c = zstandard.ZstdCompressor(compression_params=params)
        else:
            c = zstandard.ZstdCompressor(level=level, write_content_size=True,
                                         write_checksum=False)
        cache[level] = c
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor()
    return d


def apply_delta(mode: int, raw: np.ndarray, base: np.ndarray, width: int) -> np.ndarray:
    """The residual of ``raw`` against ``base`` (new array); widths 1, 2, 4 or 8."""
    ut = _UINT[width]
    a, b = raw.view(ut), base.view(ut)
    if mode == DELTA_XOR:
        return np.bitwise_xor(a, b).view(np.uint8)
    if mode == DELTA_SUB:
        return np.subtract(a, b).view(np.uint8)  # wraps around: exact inverse is add
    raise ValueError(f"unknown delta mode {mode}")


def undo_delta(mode: int, residual: np.ndarray, base: np.ndarray, width: int) -> None:
    """In place: turn ``residual`` back into the raw block."""
    ut = _UINT[width]
    r, b = residual.view(ut), base.view(ut)
    if mode == DELTA_XOR:
        np.bitwise_xor(r, b, out=r)
    elif mode == DELTA_SUB:
        np.add(r, b, out=r)
    else:
        raise ValueError(f"unknown delta mode {mode}")


def _compress_stream(stream: np.ndarray, level: int) -> tuple[int, bytes | memoryview]:
    n = stream.nbytes
    if n == 0:
        return STREAM_RAW, b""
    comp = _compressor(level)
    if n >= _PROBE_MIN:
        mid = (n // 2) - (_PROBE_SIZE // 2)
        sample = comp.compress(stream[mid:mid + _PROBE_SIZE])
        if len(sample) >= _PROBE_SIZE * 0.995:
            return STREAM_RAW, memoryview(stream)
    out = comp.compress(stream)
    if len(out) <= n * _KEEP_RATIO:
        return STREAM_ZSTD, out
    return STREAM_RAW, memoryview(stream)


_LE16 = np.dtype("<u2")


def group_into(grouped: np.ndarray, data: np.ndarray, width: int) -> None:
    """Byte grouping: byte ``k`` of every ``width``-byte element of the flat uint8
    ``data`` goes to row ``k`` of ``grouped`` (shape ``(width, len(data) // width)``).
    Both contiguous, not overlapping."""
    if width == 2:
        # two contiguous casts of the little-endian words beat numpy's strided byte copy 2x
        words = data.view(_LE16)
        np.copyto(grouped[0], words, casting="unsafe")
        np.copyto(grouped[1], np.right_shift(words, 8), casting="unsafe")
        return
    # the element-wise residual then one strided copy per plane: 2x faster than copying
    # the transpose (0.48 vs 1.04 ms per MiB of fp32), and faster than computing the XOR
    # plane by plane on strided lanes (0.60 ms)
    lanes = data.reshape(-1, width)
    for k in range(width):
        grouped[k] = lanes[:, k]


def ungroup_into(out: np.ndarray, planes: list[np.ndarray], width: int) -> None:
    """Inverse of :func:`group_into`: interleave ``width`` byte planes into flat ``out``
    (contiguous; the planes must not overlap it)."""
    if width == 2:
        words = out.view(_LE16)
        np.left_shift(planes[1], 8, out=words, dtype=np.uint16)  # native; cast into out
        np.bitwise_or(words, planes[0], out=words)
        return
    target = out.reshape(-1, width)
    for k, plane in enumerate(planes):
        target[:, k] = plane


def encode(raw: np.ndarray, bid: bytes, width: int, config: CodecConfig,
           base: np.ndarray | None = None, base_id: bytes | None = None,
           delta: int = DELTA_NONE) -> list[bytes | memoryview]:
    """Encode one block into a frame, returned as a list of buffers to write in order.

    ``raw`` is a flat uint8 array (a view into the caller's tensor is fine: it is
    never modified). With ``base`` and ``delta``, the block is stored as its
    residual against ``base`` (same length). ``width`` is the element width used
    for delta arithmetic and byte grouping.
    """
    n = raw.nbytes
    if n > MAX_BLOCK_BYTES:
        raise ValueError(f"block of {n} bytes exceeds the {MAX_BLOCK_BYTES}-byte frame limit")
    if width not in _UINT or n % width:
        width = 1
    if delta != DELTA_NONE and (base is None or base_id is None or base.nbytes != n):
        raise ValueError("a delta frame needs a base block of the same length")
    transform = TRANSFORM_NONE
    if config.bytegroup and width > 1 and n:
        transform = TRANSFORM_BYTEGROUP
        grouped = np.empty((width, n // width), dtype=np.uint8)
        data = apply_delta(delta, raw, base, width) if delta != DELTA_NONE else raw
        group_into(grouped, data, width)
        streams = [grouped[k] for k in range(width)]
    else:
        streams = [apply_delta(delta, raw, base, width) if delta != DELTA_NONE else raw]
    encoded = [_compress_stream(s, config.level) for s in streams]
    header = _HEADER.pack(FRAME_MAGIC, FRAME_VERSION, delta, transform, width, len(encoded),
                          config.level, 0, n, bid, base_id if delta else _ZERO_ID)
    table = b"".join(_STREAM.pack(mode, len(buf) if isinstance(buf, bytes) else buf.nbytes)
                     for mode, buf in encoded)
    head = header + table
    return [head + _CRC.pack(zlib.crc32(head)), *(buf for _, buf in encoded)]


def header_length(head: bytes | memoryview) -> int:
    """Length of the frame header (with stream table and CRC) at the start of ``head``."""
    return HEADER_SIZE + head[8] * _STREAM.size + _CRC.size  # byte 8: the stream count


def frame_length(parts: list[bytes | memoryview]) -> int:
    return sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)


def parse_header(buf: bytes | memoryview, where: str = "frame",
                 max_raw: int = MAX_BLOCK_BYTES) -> FrameInfo:
    """Validate and parse a frame header from the start of ``buf``.

    Raises :class:`CorruptionError` (mentioning ``where``) on any inconsistency.
    ``buf`` must hold at least the header and stream table (HEADER_SIZE + 5*16 + 4
    bytes suffice for any valid frame).
    """
    mv = memoryview(buf)
    if len(mv) < HEADER_SIZE + _STREAM.size + _CRC.size:
        raise CorruptionError(f"{where}: truncated frame ({len(mv)} bytes)")
    (magic, version, delta, transform, width, nstreams, level, _res, raw_len, bid,
     base) = _HEADER.unpack_from(mv, 0)
    if magic != FRAME_MAGIC:
        raise CorruptionError(f"{where}: bad frame magic {bytes(magic)!r}")
    if version != FRAME_VERSION:
        raise CorruptionError(f"{where}: unsupported frame version {version}")
    if not 1 <= nstreams <= 16:
        raise CorruptionError(f"{where}: bad stream count {nstreams}")
    table_end = HEADER_SIZE + nstreams * _STREAM.size
    if len(mv) < table_end + _CRC.size:
        raise CorruptionError(f"{where}: truncated frame header")
    (crc,) = _CRC.unpack_from(mv, table_end)
    if zlib.crc32(mv[:table_end]) != crc:
        raise CorruptionError(f"{where}: frame header checksum mismatch")
    if delta not in DELTA_NAMES or transform not in (TRANSFORM_NONE, TRANSFORM_BYTEGROUP):
        raise CorruptionError(f"{where}: unknown codec (delta={delta}, transform={transform})")
    if width not in _UINT:
        raise CorruptionError(f"{where}: bad element width {width}")
    if raw_len > max_raw:
        raise CorruptionError(f"{where}: frame claims {raw_len} raw bytes (limit {max_raw})")
    if raw_len % width:
        raise CorruptionError(f"{where}: raw length {raw_len} not a multiple of width {width}")
    expected_streams = width if transform == TRANSFORM_BYTEGROUP else 1
    if nstreams != expected_streams:
        raise CorruptionError(f"{where}: {nstreams} streams, expected {expected_streams}")
    streams = tuple(_STREAM.unpack_from(mv, HEADER_SIZE + i * _STREAM.size)
                    for i in range(nstreams))
    stream_raw = raw_len // nstreams
    for mode, stored in streams:
        if mode == STREAM_RAW and stored != stream_raw:
            raise CorruptionError(f"{where}: raw stream of {stored} bytes, expected {stream_raw}")
        if mode not in (STREAM_RAW, STREAM_ZSTD):
            raise CorruptionError(f"{where}: unknown stream mode {mode}")
        if mode == STREAM_ZSTD and stored > stream_raw + 1024 + stream_raw // 64:
            raise CorruptionError(f"{where}: zstd stream larger than its bound")
    payload_offset = table_end + _CRC.size
    return FrameInfo(
        block_id=bytes(bid), raw_len=raw_len, delta=delta,
        base_id=bytes(base) if delta != DELTA_NONE else None, transform=transform,
        width=width, level=level, streams=streams, payload_offset=payload_offset,
        frame_len=payload_offset + sum(s for _, s in streams),
    )


def _streams(mv: memoryview, info: FrameInfo, where: str) -> Iterator[tuple[int, np.ndarray]]:
    """(index, decoded bytes) of each stream of a frame, lengths checked."""
    nstreams = len(info.streams)
    stream_raw = info.raw_len // nstreams
    pos = info.payload_offset
    for k, (mode, stored) in enumerate(info.streams):
        chunk = mv[pos:pos + stored]
        pos += stored
        if mode == STREAM_ZSTD:
            try:
                size = zstandard.frame_content_size(chunk)
            except zstandard.ZstdError as exc:
                raise CorruptionError(f"{where}: bad zstd stream: {exc}") from None
            if size != stream_raw:
                raise CorruptionError(f"{where}: zstd stream claims {size} bytes, "
                                      f"expected {stream_raw}")
            if chunk[4] & 0x18:
                # zstd ignores the descriptor's unused bit (a flip there decodes fine) and
                # libzstd never sets it nor the reserved one: either is damage
                raise CorruptionError(f"{where}: zstd frame descriptor has reserved bits set")
            try:
                data = _decompressor().decompress(chunk, max_output_size=stream_raw)
            except zstandard.ZstdError as exc:
                raise CorruptionError(f"{where}: zstd stream does not decode: {exc}") from None
            if len(data) != stream_raw:
                raise CorruptionError(f"{where}: zstd stream decoded to {len(data)} bytes")
            yield k, np.frombuffer(data, dtype=np.uint8)
        else:
            yield k, np.frombuffer(chunk, dtype=np.uint8)


def _checked_view(frame: bytes | memoryview, info: FrameInfo | None, where: str,
                  raw_len: int) -> tuple[memoryview, FrameInfo]:
    mv = memoryview(frame)
    if info is None:
        info = parse_header(mv, where)
    if raw_len != info.raw_len:
        raise CorruptionError(f"{where}: frame holds {info.raw_len} bytes, "
                              f"index expects {raw_len}")
    if len(mv) < info.frame_len:
        raise CorruptionError(f"{where}: frame truncated ({len(mv)} of {info.frame_len} bytes)")
    return mv, info


def decode_into(frame: bytes | memoryview, out: np.ndarray, info: FrameInfo | None = None,
                base: np.ndarray | None = None, where: str = "block",
                hash_name: str = "xxh3_128") -> FrameInfo:
    """Decode ``frame`` into the flat uint8 array ``out`` (exactly ``raw_len`` bytes).

    Verifies lengths before decompressing and the block id after; a delta frame
    needs its decoded ``base``. Raises :class:`CorruptionError` naming ``where``.
    """
    mv, info = _checked_view(frame, info, where, out.nbytes)
    if info.delta != DELTA_NONE and (base is None or base.nbytes != info.raw_len):
        raise CorruptionError(f"{where}: delta base missing or of the wrong length")
    if info.transform == TRANSFORM_BYTEGROUP and info.raw_len:
        ungroup_into(out, [src for _, src in _streams(mv, info, where)], info.width)
    else:
        for _, src in _streams(mv, info, where):
            out[:] = src
    if info.delta != DELTA_NONE:
        assert base is not None
        undo_delta(info.delta, out, base, info.width)
    if block_id(out, hash_name) != info.block_id:
        raise CorruptionError(f"{where}: decoded bytes do not match block id "
                              f"{info.block_id.hex()[:12]}")
    return info


def composes_grouped(info: FrameInfo, like: FrameInfo) -> bool:
    """Whether ``info``'s streams can be folded into a grouped accumulator of ``like``'s
    layout: a byte-grouped frame whose delta is ``like``'s (XOR or SUB) or none, of the same
    length, width and streams. XOR works byte by byte, so grouping commutes with it (see
    :func:`xor_streams_into`); SUB is a sum of the planes' weighted bytes (see
    :func:`add_streams_into`)."""
    return (info.transform == TRANSFORM_BYTEGROUP and like.delta in (DELTA_XOR, DELTA_SUB)
            and info.delta in (DELTA_NONE, like.delta)
            and info.raw_len == like.raw_len and info.width == like.width
            and len(info.streams) == len(like.streams) == info.width > 1)


def xor_streams_into(frame: bytes | memoryview, info: FrameInfo, acc: np.ndarray,
                     where: str = "block", assign: bool = False) -> None:
    """Decode a byte-grouped frame's streams into ``acc`` (stream ``k`` at
    ``acc[k*m:(k+1)*m]``, ``m = raw_len / width``), XOR-ing with what is there, or
    overwriting it with ``assign``. The frame's delta is *not* undone: for a run of XOR
    frames ending in a keyframe, the XOR of all their streams is the grouped raw block
    (no block id is checked here: the caller checks the composed result)."""
    mv, info = _checked_view(frame, info, where, acc.nbytes)
    m = info.raw_len // len(info.streams)
    for k, src in _streams(mv, info, where):
        part = acc[k * m:(k + 1) * m]
        if assign:
            part[:] = src
        else:
            np.bitwise_xor(part, src, out=part)


#: frames a SUB run may fold into 16-bit plane sums: 255 * 257 + carries stays below 2**16
MAX_SUB_FOLD = 256


def add_streams_into(frame: bytes | memoryview, info: FrameInfo, sums: np.ndarray,
                     where: str = "block", assign: bool = False) -> None:
    """Add a byte-grouped frame's decoded streams to the uint16 plane sums ``sums``
    (stream ``k`` at ``sums[k*m:(k+1)*m]``), or overwrite them with ``assign``.

    A SUB residual is the integer ``sum_k byte_k << 8k`` (mod ``2**(8*width)``), so the
    sum of a run of SUB frames ending in a keyframe is ``sum_k S_k << 8k`` where ``S_k``
    sums plane ``k`` over the run: adding planes costs a quarter of un-grouping each
    hop (:func:`combine_sums` turns the sums into the block once)."""
    mv, info = _checked_view(frame, info, where, sums.size)
    m = info.raw_len // len(info.streams)
    for k, src in _streams(mv, info, where):
        part = sums[k * m:(k + 1) * m]
        if assign:
            np.copyto(part, src)
        else:
            np.add(part, src, out=part)


def combine_sums(out: np.ndarray, sums: np.ndarray, width: int) -> None:
    """Write ``sum_k sums[k] << 8k`` (wrapping at the element width) into the flat uint8
    ``out``: the inverse of grouping for plane sums of :func:`add_streams_into`."""
    ut = _UINT[width]
    words = out.view(ut)
    m = words.size
    np.copyto(words, sums[:m], casting="unsafe")
    tmp = np.empty(m, dtype=ut)
    for k in range(1, width):
        np.left_shift(sums[k * m:(k + 1) * m], 8 * k, out=tmp, dtype=ut)
        np.add(words, tmp, out=words)
