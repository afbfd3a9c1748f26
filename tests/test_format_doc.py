"""docs/format.md is normative: keep it in step with the code.

The spec marks the parts checked here with HTML comments (``<!-- table:NAME -->`` before a
markdown table, ``<!-- vector:NAME -->`` before a fenced hex dump), so the tables are read as
data: the frame header table is used as a parser on frames the codec writes, the SQL block must
equal ``SCHEMA_V1``, and the test vectors must encode and decode exactly as printed.
"""

from __future__ import annotations

import importlib
import pathlib
import re
import struct
import zlib

import numpy as np
import pytest

from deltackpt import codec, hashing, index, packs

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "format.md"

#: doc type name -> (struct code, size)
_TYPES = {"u8": ("B", 1), "u16": ("H", 2), "u32": ("I", 4), "u64": ("Q", 8)}


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


def _norm(text: str) -> str:
    return " ".join(text.split())


def _table(doc: str, name: str) -> list[list[str]]:
    """Body rows (cells stripped of spaces and backticks) of the table after the marker."""
    marker = f"<!-- table:{name} -->"
    assert doc.count(marker) == 1, f"docs/format.md needs exactly one {marker}"
    lines = doc.split(marker, 1)[1].lstrip("\n").splitlines()
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([c.strip().strip("`") for c in line.strip().strip("|").split("|")])
    assert len(rows) >= 3, f"table {name}: no body rows"
    assert set("".join(rows[1])) <= set("-: "), f"table {name}: second row is not a separator"
    return rows[2:]


def _vector(doc: str, name: str) -> bytes:
    """Bytes of the hex dump (``OFFSET  hh hh ...`` lines) after the marker."""
    marker = f"<!-- vector:{name} -->"
    assert doc.count(marker) == 1, f"docs/format.md needs exactly one {marker}"
    m = re.match(r"\s*```[a-z]*\n(.*?)```", doc.split(marker, 1)[1], re.S)
    assert m, f"vector {name}: no fenced block after the marker"
    out = bytearray()
    for line in m.group(1).splitlines():
        offset, _, data = line.strip().partition("  ")
        assert int(offset, 16) == len(out), f"vector {name}: offset {offset} out of sequence"
        out += bytes.fromhex(data)
    return bytes(out)


def _field_layout(rows: list[list[str]]) -> list[tuple[str, int, int, str]]:
    """(field, offset, size, struct code) per row; checks sizes, types and contiguity."""
    layout = []
    pos = 0
    for row in rows:
        offset, size, typ, field = int(row[0]), int(row[1]), row[2], row[3]
        assert offset == pos, f"field {field} at offset {offset}, expected {pos}"
        m = re.fullmatch(r"bytes\[(\d+)\]", typ)
        if m:
            code, tsize = f"{m.group(1)}s", int(m.group(1))
        else:
            assert typ in _TYPES, f"field {field}: unknown type {typ}"
            code, tsize = _TYPES[typ]
        assert tsize == size, f"field {field}: type {typ} is {tsize} bytes, table says {size}"
        layout.append((field, offset, size, code))
        pos += size
    return layout


def _read(layout: list[tuple[str, int, int, str]], buf: bytes, base: int = 0) -> dict:
    return {f: struct.unpack_from("<" + code, buf, base + off)[0] for f, off, _, code in layout}


# -- schema -------------------------------------------------------------------------------


def test_sql_ddl_is_schema_v1_and_the_migrations(doc):
    blocks = re.findall(r"```sql\n(.*?)```", doc, re.S)
    ddl = [b for b in blocks if "CREATE TABLE" in b]
    assert len(ddl) == 1 + len(index.MIGRATIONS), (
        "docs/format.md must hold one ```sql block with SCHEMA_V1 and one per migration")
    assert _norm(ddl[0]) == _norm(index.SCHEMA_V1), (
        "the DDL in docs/format.md differs from deltackpt.index.SCHEMA_V1: copy it verbatim "
        "(and add a migration if the schema changed)")
    for v, script in sorted(index.MIGRATIONS.items()):
        marker = f"<!-- ddl:v{v}-v{v + 1} -->"
        assert doc.count(marker) == 1, f"docs/format.md needs the marker {marker}"
        m = re.match(r"\s*```sql\n(.*?)```", doc.split(marker, 1)[1], re.S)
        assert m and _norm(m.group(1)) == _norm(script), (
            f"the DDL after {marker} differs from deltackpt.index.MIGRATIONS[{v}]")


def test_schema_version_is_documented(doc):
    assert index.SCHEMA_VERSION == 2, "new schema version: document it in docs/format.md"
    assert sorted(index.MIGRATIONS) == [1], "new migration: document it in docs/format.md"
    assert "`index.SCHEMA_VERSION` | 2 |" in doc


# -- frames -------------------------------------------------------------------------------


def test_frame_header_table_matches_codec(doc):
    layout = _field_layout(_table(doc, "frame-header"))
    assert sum(size for _, _, size, _ in layout) == codec.HEADER_SIZE == 48
    assert "<" + "".join(code for *_, code in layout) == codec._HEADER.format
    assert [f for f, *_ in layout] == ["magic", "version", "delta", "transform", "width",
                                       "nstreams", "level", "reserved", "raw_len", "id", "base"]


def test_frame_stream_entry_table_matches_codec(doc):
    layout = _field_layout(_table(doc, "frame-stream-entry"))
    assert [f for f, *_ in layout] == ["mode", "stored_len"]
    assert sum(size for _, _, size, _ in layout) == codec._STREAM.size
    assert "<" + "".join(code for *_, code in layout) == codec._STREAM.format


def test_frame_codes_match_codec(doc):
    rows = _table(doc, "frame-codes")
    assert len(rows) == 7
    for field, value, name, constant in rows:
        _, attr = constant.split(".")
        assert getattr(codec, attr) == int(value), f"{constant} is not {value}"
        if field == "delta":
            assert codec.DELTA_NAMES[int(value)] == name


def test_doc_tables_parse_real_frames(doc):
    """Read frames the codec writes through the doc's tables, field by field."""
    head = _field_layout(_table(doc, "frame-header"))
    entry = _field_layout(_table(doc, "frame-stream-entry"))
    entry_size = sum(size for _, _, size, _ in entry)
    rng = np.random.default_rng(0)
    base = rng.standard_normal(4096).astype("<f4")
    new = base + np.float32(1e-3) * rng.standard_normal(4096).astype("<f4")
    raw, base_raw = new.view(np.uint8), base.view(np.uint8)
    bid, base_id = hashing.block_id(raw), hashing.block_id(base_raw)
    cases = [(codec.DELTA_NONE, True), (codec.DELTA_XOR, True), (codec.DELTA_SUB, False)]
    for delta, group in cases:
        cfg = codec.CodecConfig(level=3, bytegroup=group)
        kw = {} if delta == codec.DELTA_NONE else {"base": base_raw, "base_id": base_id,
                                                   "delta": delta}
        frame = b"".join(bytes(p) for p in codec.encode(raw, bid, 4, cfg, **kw))
        h = _read(head, frame)
        assert h["magic"] == codec.FRAME_MAGIC == b"DKF1"
        assert h["version"] == codec.FRAME_VERSION
        assert h["delta"] == delta
        assert h["transform"] == (codec.TRANSFORM_BYTEGROUP if group else codec.TRANSFORM_NONE)
        assert h["width"] == 4 and h["level"] == 3 and h["reserved"] == 0
        assert h["nstreams"] == (4 if group else 1)
        assert h["raw_len"] == raw.nbytes and h["id"] == bid
        assert h["base"] == (base_id if delta else bytes(16))
        # stream table, header CRC, payload as section 9.3 describes
        n = h["nstreams"]
        table_end = codec.HEADER_SIZE + n * entry_size
        streams = [_read(entry, frame, codec.HEADER_SIZE + i * entry_size) for i in range(n)]
        (crc,) = struct.unpack_from("<I", frame, table_end)
        assert crc == zlib.crc32(frame[:table_end])
        assert len(frame) == table_end + 4 + sum(s["stored_len"] for s in streams)
        info = codec.parse_header(frame)
        assert info.payload_offset == table_end + 4 == 52 + 5 * n
        assert [(s["mode"], s["stored_len"]) for s in streams] == list(info.streams)


# -- other binary structures and limits ---------------------------------------------------


def test_constants_table(doc):
    mods = {"store", "index", "codec", "packs", "hashing"}
    for name, value, _meaning in _table(doc, "constants"):
        module, attr = name.split(".")
        assert module in mods, name
        actual = getattr(importlib.import_module(f"deltackpt.{module}"), attr)
        assert actual == int(value), f"docs/format.md says {name} = {value}, code has {actual}"


def test_magics(doc):
    assert packs.PACK_MAGIC.hex(" ") == "44 4b 50 41 43 4b 00 01"
    assert packs.MANIFEST_MAGIC.hex(" ") == "44 4b 4d 31"
    assert packs.PACK_INDEX_MAGIC.hex(" ") == "44 4b 50 49 44 58 00 01"
    for magic in (packs.PACK_MAGIC, packs.MANIFEST_MAGIC, codec.FRAME_MAGIC,
                  packs.PACK_INDEX_MAGIC):
        assert magic.hex(" ").upper() in doc, f"magic {magic!r} not spelled out in the doc"


def test_manifest_layout():
    data = packs.encode_manifest({"manifest_version": packs.MANIFEST_VERSION, "step": 7})
    assert data[:4] == b"DKM1"
    assert struct.unpack_from("<I", data, 4)[0] == zlib.crc32(data[8:])
    assert data[8:12] == bytes.fromhex("28 b5 2f fd")  # one zstd frame
    assert packs.decode_manifest(data)["step"] == 7
    assert packs.manifest_name(100) == "manifests/00000000000000000100.manifest"


# -- test vectors -------------------------------------------------------------------------


def _block_z() -> np.ndarray:
    z = np.zeros(256, np.uint8)
    z[::16] = 7
    return z


def test_vector_blocks_and_ids(doc):
    a = np.frombuffer(_vector(doc, "raw-a"), np.uint8)
    b = np.frombuffer(_vector(doc, "raw-b"), np.uint8)
    assert a.view("<f4").tolist() == [1.0, 2.0, 3.0, 4.0]
    assert b.view("<f4").tolist() == [1.0, 1.5, 3.0, -4.0]
    blocks = {"A": a, "B": b, "Z": _block_z()}
    rows = _table(doc, "block-ids")
    assert [r[0] for r in rows] == ["A", "B", "Z"]
    for name, xxh, b2 in rows:
        assert hashing.block_id(blocks[name], "xxh3_128").hex() == xxh
        assert hashing.block_id(blocks[name], "blake2b").hex() == b2


@pytest.mark.parametrize("name,delta", [("frame-a", codec.DELTA_NONE),
                                        ("frame-b-xor", codec.DELTA_XOR),
                                        ("frame-b-sub", codec.DELTA_SUB)])
def test_vector_frames_encode_and_decode(doc, name, delta):
    a = np.frombuffer(_vector(doc, "raw-a"), np.uint8)
    b = np.frombuffer(_vector(doc, "raw-b"), np.uint8)
    raw, kw = (a, {}) if delta == codec.DELTA_NONE else (
        b, {"base": a, "base_id": hashing.block_id(a), "delta": delta})
    expected = _vector(doc, name)
    frame = b"".join(bytes(p) for p in
                     codec.encode(raw, hashing.block_id(raw), 4, codec.CodecConfig(), **kw))
    assert frame == expected, f"codec no longer writes vector {name} as documented"
    out = np.empty(raw.nbytes, np.uint8)
    codec.decode_into(expected, out, base=kw.get("base"))
    assert out.tobytes() == raw.tobytes()


def test_vector_zstd_frame_decodes(doc):
    frame = _vector(doc, "frame-z")
    info = codec.parse_header(frame)
    assert info.streams[0][0] == codec.STREAM_ZSTD and info.frame_len == len(frame)
    out = np.empty(256, np.uint8)
    codec.decode_into(frame, out)
    assert out.tobytes() == _block_z().tobytes()
