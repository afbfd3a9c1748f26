"""Pack objects: append-only containers of frames, and step manifests.

A pack is ``PACK_MAGIC`` followed by frames back to back, then a pack index: a
copy of every frame header, zstd-compressed, and a fixed footer that locates it
(docs/format.md, "Packs"). Packs are immutable once committed; a save writes new
packs, rotated at ``target_size``. ``reindex`` and a remote store's cache rebuild
list a pack's frames with :func:`scan_pack`: from the pack index when it checks
out (usually one read of the pack's tail: one ranged GET), else by walking the
self-delimiting frames one header at a time (packs of older writers, a damaged
index).

A manifest is the durable, index-independent record of one committed step:
``MANIFEST_MAGIC``, a CRC32 of the payload, and the zstd-compressed JSON payload.
"""

from __future__ import annotations

import json
import struct
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import zstandard

from .backend import Backend, ObjectWriter
from .codec import HEADER_SIZE, FrameInfo, header_length, parse_header
from .errors import CorruptionError, FormatVersionError

PACK_MAGIC = b"DKPACK\x00\x01"
#: the last bytes of a pack with a pack index: magic, index offset, index length, CRC32
PACK_INDEX_MAGIC = b"DKPIDX\x00\x01"
_FOOTER = struct.Struct("<8sQII")
FOOTER_SIZE = _FOOTER.size  # 24
#: the smallest frame is a header with one stream table entry and a CRC
_MIN_FRAME = HEADER_SIZE + 5 + 4
#: one read at the end of a pack that usually holds the whole pack index (~1 KiB per
#: 100 frames): a remote rebuild then costs one ranged GET per pack
_TAIL_GUESS = 64 * 1024
MANIFEST_MAGIC = b"DKM1"
MANIFEST_VERSION = 1
PACK_PREFIX = "packs/"
MANIFEST_PREFIX = "manifests/"
_CRC = struct.Struct("<I")
#: enough bytes to parse any frame header (48 + 16 streams * 5 + crc 4)
MAX_FRAME_HEADER = HEADER_SIZE + 16 * 5 + 4
#: a manifest larger than this is refused before decompression
MAX_MANIFEST_BYTES = 1 << 31


def new_pack_name() -> str:
    h = uuid.uuid4().hex
    return f"{PACK_PREFIX}{h[:2]}/{h}.pack"


def manifest_name(step: int) -> str:
    return f"{MANIFEST_PREFIX}{step:020d}.manifest"


@dataclass
class PackWriter:
    """Appends frames to new pack objects, rotating at ``target_size``.

    Not thread-safe: one thread appends. Nothing is visible until :meth:`finish`
    commits (and, on a durable backend, fsyncs) every pack.
    """

    backend: Backend
    target_size: int = 512 * 1024 * 1024
    finished: list[tuple[str, int]] = field(default_factory=list)
    _current: ObjectWriter | None = None
    _current_name: str | None = None
    #: called before a pack is started/committed (fault-injection hook)
    on_event: object = None

    _headers: list[bytes] = field(default_factory=list)

    def add(self, parts: list[bytes | memoryview]) -> tuple[str, int, int]:
        """Append one frame (its header at the start of ``parts[0]``); returns
        (pack name, offset, length)."""
        if self._current is None or self._current.tell() >= self.target_size:
            self._rotate()
        assert self._current is not None and self._current_name is not None
        offset = self._current.tell()
        head = bytes(memoryview(parts[0])[:MAX_FRAME_HEADER])
        self._headers.append(head[:header_length(head)])
        for p in parts:
            self._current.write(p)
        return self._current_name, offset, self._current.tell() - offset

    def _rotate(self) -> None:
        self._commit_current()
        self._current_name = new_pack_name()
        self._current = self.backend.create(self._current_name)
        self._current.write(PACK_MAGIC)
        self._headers = []

    def _commit_current(self) -> None:
        if self._current is not None:
            index_offset = self._current.tell()
            body = zstandard.ZstdCompressor(level=3).compress(b"".join(self._headers))
            self._current.write(body)
            self._current.write(_FOOTER.pack(PACK_INDEX_MAGIC, index_offset, len(body),
                                             zlib.crc32(body)))
            self._headers = []
            size = self._current.tell()
            self._current.commit()
            self.finished.append((self._current_name, size))  # type: ignore[arg-type]
            self._current = None
            self._current_name = None

    def finish(self) -> list[tuple[str, int]]:
        """Commit all packs; returns [(name, size)]."""
        self._commit_current()
        return self.finished

    def abort(self) -> None:
        if self._current is not None:
            self._current.abort()
            self._current = None
        # committed packs of an aborted save are unreferenced: free their space now when
        # possible (a save failing on a full disk), else gc removes them
        for name, _ in self.finished:
            try:
                self.backend.delete(name)
            except OSError:
                break
        self.finished = []


def _footer(tail: bytes, size: int) -> tuple[int, int, int] | None:
    """(index offset, index length, CRC) from the footer ending ``tail``, the last bytes of
    a pack of ``size`` bytes, or None when they are no pack index footer that fits it."""
    magic, index_offset, index_len, crc = _FOOTER.unpack_from(tail, len(tail) - FOOTER_SIZE)
    if magic != PACK_INDEX_MAGIC or index_offset < len(PACK_MAGIC) or \
            index_offset + index_len + FOOTER_SIZE != size:
        return None
    return index_offset, index_len, crc


def pack_frame_bytes(backend: Backend, pack: str, size: int) -> int:
    """Bytes of a pack's frames: its size less the magic and, when its footer checks out,
    the pack index and footer (a pack without one is all frames after the magic)."""
    if size >= len(PACK_MAGIC) + FOOTER_SIZE:
        try:
            footer = _footer(backend.read(pack, size - FOOTER_SIZE, FOOTER_SIZE), size)
        except (OSError, ValueError, struct.error):  # CorruptionError is a ValueError
            footer = None
        if footer is not None:
            return footer[0] - len(PACK_MAGIC)
    return max(0, size - len(PACK_MAGIC))


def read_pack_index(backend: Backend, pack: str,
                    size: int | None = None) -> list[tuple[FrameInfo, int]] | None:
    """The frames of a pack as its pack index lists them, or None when the pack has no
    index or it does not check out (footer, CRC, every header's own CRC, and frames that
    tile the pack exactly from the magic to the index)."""
    if size is None:
        size = backend.size(pack)
    if size < len(PACK_MAGIC) + FOOTER_SIZE:
        return None
    tail_len = min(size, _TAIL_GUESS)
    tail = backend.read(pack, size - tail_len, tail_len)
    footer = _footer(tail, size)
    if footer is None:
        return None
    index_offset, index_len, crc = footer
    if index_offset >= size - tail_len:
        start = index_offset - (size - tail_len)
        body = tail[start:start + index_len]
    else:
        body = backend.read(pack, index_offset, index_len)
    if zlib.crc32(body) != crc:
        return None
    # every frame is at least _MIN_FRAME bytes and its header at most MAX_FRAME_HEADER; the
    # body must declare its size (the writer always does): zstd would otherwise allocate the
    # whole limit up front, ~2.3x the pack, for a damaged body
    limit = (index_offset - len(PACK_MAGIC)) // _MIN_FRAME * MAX_FRAME_HEADER
    try:
        declared = zstandard.frame_content_size(body) if body else 0
        if declared < 0 or declared > limit:
            return None
        headers = zstandard.ZstdDecompressor().decompress(body, max_output_size=declared) \
            if body else b""
    except zstandard.ZstdError:
        return None
    if len(headers) != declared:
        return None
    out: list[tuple[FrameInfo, int]] = []
    pos, offset = 0, len(PACK_MAGIC)
    try:
        while pos < len(headers):
            info = parse_header(headers[pos:pos + MAX_FRAME_HEADER], f"{pack}: pack index")
            out.append((info, offset))
            pos += info.payload_offset
            offset += info.frame_len
    except CorruptionError:
        return None
    return out if offset == index_offset else None


def scan_pack(backend: Backend, pack: str) -> Iterator[tuple[FrameInfo, int]]:
    """Yield (frame info, offset) for every frame of a pack, in order.

    From the pack index when it checks out; else by walking the frames, which stops at
    the first torn or damaged one (everything after it is unreachable by a scan; the
    index may still know it).
    """
    size = backend.size(pack)
    # the pack index first: one read of the tail (a ranged GET) answers for the whole pack
    listed = read_pack_index(backend, pack, size)
    if listed is not None:
        yield from listed
        return
    if size < len(PACK_MAGIC) or backend.read(pack, 0, len(PACK_MAGIC)) != PACK_MAGIC:
        raise CorruptionError(f"{pack}: not a deltackpt pack (bad magic)")
    offset = len(PACK_MAGIC)
    while offset < size:
        head = backend.read(pack, offset, min(MAX_FRAME_HEADER, size - offset))
        try:
            info = parse_header(head, f"{pack}@{offset}")
        except CorruptionError:
            return
        if offset + info.frame_len > size:
            return
        yield info, offset
        offset += info.frame_len


def encode_manifest(payload: dict) -> bytes:
    body = zstandard.ZstdCompressor(level=3).compress(
        json.dumps(payload, separators=(",", ":"), allow_nan=True).encode()
    )
    return MANIFEST_MAGIC + _CRC.pack(zlib.crc32(body)) + body


def decode_manifest(data: bytes, where: str = "manifest") -> dict:
    if len(data) < 8 or data[:4] != MANIFEST_MAGIC:
        raise CorruptionError(f"{where}: not a deltackpt manifest")
    (crc,) = _CRC.unpack_from(data, 4)
    body = data[8:]
    if zlib.crc32(body) != crc:
        raise CorruptionError(f"{where}: manifest checksum mismatch")
    try:
        size = zstandard.frame_content_size(body)
        if size < 0 or size > MAX_MANIFEST_BYTES:
            raise CorruptionError(f"{where}: manifest claims {size} bytes")
        payload = json.loads(zstandard.ZstdDecompressor().decompress(body,
                                                                    max_output_size=size))
    except (zstandard.ZstdError, ValueError) as exc:
        raise CorruptionError(f"{where}: manifest does not decode: {exc}") from None
    if not isinstance(payload, dict):
        raise CorruptionError(f"{where}: manifest is not an object")
    version = payload.get("manifest_version")
    if version != MANIFEST_VERSION:
        raise FormatVersionError(f"{where}: manifest version {version!r} is not supported "
                                 f"(this deltackpt reads version {MANIFEST_VERSION})")
    return payload
