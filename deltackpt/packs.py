"""Pack objects: append-only containers of frames, and step manifests.

A pack is ``PACK_MAGIC`` followed by frames back to back (docs/format.md,
"Packs"). Packs are immutable once committed; a save writes new packs, rotated
at ``target_size``. Frames are self-delimiting, so the block index of a pack can
be rebuilt by scanning it (:func:`scan_pack`), which is what ``reindex`` does.

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
from .codec import HEADER_SIZE, FrameInfo, parse_header
from .errors import CorruptionError, FormatVersionError

PACK_MAGIC = b"DKPACK\x00\x01"
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

    def add(self, parts: list[bytes | memoryview]) -> tuple[str, int, int]:
        """Append one frame; returns (pack name, offset, length)."""
        if self._current is None or self._current.tell() >= self.target_size:
            self._rotate()
        assert self._current is not None and self._current_name is not None
        offset = self._current.tell()
        for p in parts:
            self._current.write(p)
        return self._current_name, offset, self._current.tell() - offset

    def _rotate(self) -> None:
        self._commit_current()
        self._current_name = new_pack_name()
        self._current = self.backend.create(self._current_name)
        self._current.write(PACK_MAGIC)

    def _commit_current(self) -> None:
        if self._current is not None:
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


def scan_pack(backend: Backend, pack: str) -> Iterator[tuple[FrameInfo, int]]:
    """Yield (frame info, offset) for every well-formed frame of a pack, in order.

    Stops at the first torn or damaged frame (everything after it is unreachable
    by a scan; the index may still know it).
    """
    size = backend.size(pack)
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
        payload = json.loads(zstandard.ZstdDecompressor().decompress(body, max_output_size=size))
    except (zstandard.ZstdError, ValueError) as exc:
        raise CorruptionError(f"{where}: manifest does not decode: {exc}") from None
    if not isinstance(payload, dict):
        raise CorruptionError(f"{where}: manifest is not an object")
    version = payload.get("manifest_version")
    if version != MANIFEST_VERSION:
        raise FormatVersionError(f"{where}: manifest version {version!r} is not supported "
                                 f"(this deltackpt reads version {MANIFEST_VERSION})")
    return payload
