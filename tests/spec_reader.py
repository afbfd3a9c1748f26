"""Independent reader for deltackpt on-disk format version 1, written from docs/format.md only.

Provenance: written by an implementer who read docs/format.md and nothing of deltackpt's
source, as a check that the spec is enough for a second reader (session 7). It is kept as
it was written, apart from lint and the float4 dtype the spec gained after it was written; tests/test_spec_reader.py compares it with Store.load. When
it disagrees with the code, the spec or the code is wrong, not this file.

Public API:
    list_steps(store_dir, source="manifest") -> list[int]
    read_step(store_dir, step, source="manifest") -> object

source="manifest": no SQLite; steps come from manifests/, block locations from scanning packs/
                   (pack index footer when valid, else frame-by-frame scan), per §10, §11, §13.5.
source="index":    steps, tree, entries and block locations from index.sqlite (§13, §16).

Does not import deltackpt. Needs numpy, zstandard, xxhash; torch for tensor entries.
"""
from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import re
import sqlite3
import struct
import zlib

import numpy as np
import xxhash
import zstandard

# ---------------------------------------------------------------- constants (§3)
FORMAT_VERSION = 1
SCHEMA_VERSION = 2
FRAME_VERSION = 1
MANIFEST_VERSION = 1
HEADER_SIZE = 48
MAX_BLOCK_BYTES = 256 * 1024 * 1024
MAX_FRAME_HEADER = 132
MAX_MANIFEST_BYTES = 2 ** 31
FOOTER_SIZE = 24
ID_SIZE = 16
MAX_CHAIN = 64
MAX_TREE_DEPTH = 250

FRAME_MAGIC = b"DKF1"
PACK_MAGIC = b"DKPACK\x00\x01"
PIDX_MAGIC = b"DKPIDX\x00\x01"
MANIFEST_MAGIC = b"DKM1"

_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")

# torch dtype name -> (itemsize, width) (§8.1)
TORCH_DTYPES = {
    "float64": (8, 8), "float32": (4, 4), "float16": (2, 2), "bfloat16": (2, 2),
    "float8_e4m3fn": (1, 1), "float8_e4m3fnuz": (1, 1), "float8_e5m2": (1, 1),
    "float8_e5m2fnuz": (1, 1), "float8_e8m0fnu": (1, 1), "complex32": (4, 2),
    "complex64": (8, 4), "complex128": (16, 8), "float4_e2m1fn_x2": (1, 1),
    "int8": (1, 1), "int16": (2, 2), "int32": (4, 4), "int64": (8, 8),
    "uint8": (1, 1), "uint16": (2, 2), "uint32": (4, 4), "uint64": (8, 8), "bool": (1, 1),
}


class FormatError(Exception):
    """Anything the spec says a reader MUST refuse."""


class CorruptionError(FormatError):
    pass


class FormatVersionError(FormatError):
    pass


# ---------------------------------------------------------------- helpers
def _crc32(b) -> int:
    return zlib.crc32(b) & 0xFFFFFFFF


def _check_name(name: str) -> str:
    parts = name.split("/")
    if not parts or any(not _COMPONENT.match(p) for p in parts):
        raise FormatError(f"bad object name {name!r}")
    return name


def _path(store_dir: str, name: str) -> str:
    return os.path.join(store_dir, *_check_name(name).split("/"))


def _read_object(store_dir: str, name: str) -> bytes:
    with open(_path(store_dir, name), "rb") as f:
        return f.read()


def _numpy_dtype_ok(name: str):
    try:
        dt = np.dtype(name)
    except TypeError:
        return None
    if dt.str != name or dt.fields is not None or dt.subdtype is not None:
        return None
    if dt.kind == "b" or dt.kind in "iu":
        return dt
    if dt.kind == "f" and dt.itemsize in (2, 4, 8):
        return dt
    if dt.kind == "c" and dt.itemsize in (8, 16):
        return dt
    return None


def _itemsize(kind: str, dtype: str) -> int:
    if kind in ("tensor", "parameter"):
        if dtype not in TORCH_DTYPES:
            raise FormatError(f"unknown torch dtype {dtype!r}")
        return TORCH_DTYPES[dtype][0]
    if kind == "ndarray":
        dt = _numpy_dtype_ok(dtype)
        if dt is None:
            raise FormatError(f"unknown/unstorable numpy dtype {dtype!r}")
        return dt.itemsize
    if kind == "bytes":
        if dtype != "uint8":
            raise FormatError("bytes entry with dtype other than uint8")
        return 1
    raise FormatError(f"unknown entry kind {kind!r}")


# ---------------------------------------------------------------- config (§5)
def read_config(store_dir: str) -> dict:
    try:
        cfg = json.loads(_read_object(store_dir, "deltackpt.json").decode("utf-8"))
    except FileNotFoundError:
        raise FormatError("missing deltackpt.json") from None
    if not isinstance(cfg, dict):
        raise FormatError("deltackpt.json is not an object")
    if cfg.get("format") != "deltackpt":
        raise FormatError("not a deltackpt store")
    fv = cfg.get("format_version")
    if type(fv) is not int or not 1 <= fv <= FORMAT_VERSION:
        raise FormatVersionError(f"unsupported format_version {fv!r}")
    if cfg.get("hash") not in ("xxh3_128", "blake2b"):
        raise FormatError(f"unknown hash {cfg.get('hash')!r}")
    bs = cfg.get("block_size")
    if type(bs) is not int or not 4096 <= bs <= MAX_BLOCK_BYTES:
        raise FormatError(f"block_size out of range: {bs!r}")
    return cfg


# ---------------------------------------------------------------- block ids (§7)
def block_id(raw: bytes, algo: str) -> bytes:
    n = len(raw)
    if algo == "xxh3_128":
        return xxhash.xxh3_128_digest(raw, seed=n)
    if algo == "blake2b":
        return hashlib.blake2b(struct.pack("<Q", n) + raw, digest_size=16).digest()
    raise FormatError(f"unknown hash {algo!r}")


# ---------------------------------------------------------------- frames (§9)
class FrameHeader:
    __slots__ = ("delta", "transform", "width", "nstreams", "raw_len", "id", "base",
                 "streams", "payload_offset", "frame_len", "header_bytes")


def parse_frame_header(buf, avail: int | None = None) -> FrameHeader:
    """§9.8 steps 1-12. `buf` starts at the frame."""
    n = len(buf) if avail is None else avail
    if n < HEADER_SIZE + 5 + 4:
        raise CorruptionError("frame truncated")
    if bytes(buf[0:4]) != FRAME_MAGIC:
        raise CorruptionError("bad frame magic")
    version, delta, transform, width, nstreams, _level, _reserved, raw_len = struct.unpack_from(
        "<BBBBBBHI", buf, 4)
    if version != FRAME_VERSION:
        raise CorruptionError(f"unknown frame version {version}")
    if not 1 <= nstreams <= 16:
        raise CorruptionError("nstreams out of bounds")
    hend = HEADER_SIZE + 5 * nstreams
    if n < hend + 4:
        raise CorruptionError("frame header truncated")
    (crc,) = struct.unpack_from("<I", buf, hend)
    if _crc32(bytes(buf[0:hend])) != crc:
        raise CorruptionError("frame header CRC mismatch")
    if delta not in (0, 1, 2) or transform not in (0, 1):
        raise CorruptionError("unknown delta/transform")
    if width not in (1, 2, 4, 8):
        raise CorruptionError("bad width")
    if raw_len > MAX_BLOCK_BYTES:
        raise CorruptionError("raw_len too large")
    if raw_len % width:
        raise CorruptionError("raw_len not a multiple of width")
    if nstreams != (width if transform == 1 else 1):
        raise CorruptionError("nstreams inconsistent with transform/width")
    stream_raw = raw_len // nstreams
    streams = []
    for i in range(nstreams):
        mode, stored = struct.unpack_from("<BI", buf, HEADER_SIZE + 5 * i)
        if mode == 0:
            if stored != stream_raw:
                raise CorruptionError("raw stream length mismatch")
        elif mode == 1:
            if stored > stream_raw + 1024 + stream_raw // 64:
                raise CorruptionError("zstd stream too long")
        else:
            raise CorruptionError("unknown stream mode")
        streams.append((mode, stored))
    h = FrameHeader()
    h.delta, h.transform, h.width, h.nstreams, h.raw_len = delta, transform, width, nstreams, raw_len
    h.id = bytes(buf[16:32])
    h.base = bytes(buf[32:48]) if delta else None
    h.streams = streams
    h.payload_offset = hend + 4
    h.frame_len = hend + 4 + sum(s for _, s in streams)
    h.header_bytes = bytes(buf[0:hend + 4])
    return h


_DCTX = zstandard.ZstdDecompressor()


def _zstd_exact(data: bytes, size: int) -> bytes:
    params = zstandard.get_frame_parameters(data)
    if params.content_size in (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR):
        raise CorruptionError("zstd frame without content size")
    if params.content_size != size:
        raise CorruptionError("zstd content size mismatch")
    out = _DCTX.decompress(data, max_output_size=size)
    if len(out) != size:
        raise CorruptionError("zstd output size mismatch")
    return out


_UINT = {1: np.uint8, 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}


def decode_frame(frame: bytes, base_raw: bytes | None, algo: str,
                 expect_id: bytes | None = None) -> bytes:
    """§9.8 steps 13-18 on a complete frame buffer."""
    h = parse_frame_header(frame)
    if len(frame) < h.frame_len:
        raise CorruptionError("frame incomplete")
    if expect_id is not None and h.id != expect_id:
        raise CorruptionError("frame id differs from the id read")
    stream_raw = h.raw_len // h.nstreams
    pos = h.payload_offset
    parts = []
    for mode, stored in h.streams:
        data = frame[pos:pos + stored]
        pos += stored
        parts.append(bytes(data) if mode == 0 else _zstd_exact(bytes(data), stream_raw))
    if h.transform == 1 and h.nstreams > 1:
        g = np.empty((stream_raw, h.width), dtype=np.uint8)
        for k, p in enumerate(parts):
            g[:, k] = np.frombuffer(p, dtype=np.uint8)
        resid = g.reshape(-1)
    else:
        resid = np.frombuffer(parts[0], dtype=np.uint8)
    if h.delta:
        if base_raw is None or len(base_raw) != h.raw_len:
            raise CorruptionError("delta base missing or of wrong length")
        b = np.frombuffer(base_raw, dtype=np.uint8)
        if h.delta == 1:
            raw = np.bitwise_xor(resid, b).tobytes()
        else:
            dt = _UINT[h.width]
            raw = (resid.view(dt) + b.view(dt)).astype(dt, copy=False).tobytes()
    else:
        raw = resid.tobytes()
    if block_id(raw, algo) != h.id:
        raise CorruptionError("block id mismatch after decoding")
    return raw


# ---------------------------------------------------------------- packs (§10)
def read_pack_index(data: bytes):
    """Return [(header, offset)] from a valid pack index, else None."""
    size = len(data)
    if size < 8 + FOOTER_SIZE:
        return None
    magic, ioff, ilen, crc = struct.unpack_from("<8sQII", data, size - FOOTER_SIZE)
    if magic != PIDX_MAGIC or ioff < 8 or ioff + ilen + FOOTER_SIZE != size:
        return None
    body = data[ioff:ioff + ilen]
    if _crc32(body) != crc:
        return None
    try:
        cs = zstandard.get_frame_parameters(body).content_size
    except zstandard.ZstdError:
        return None
    if cs in (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR):
        return None
    if cs > (ioff - 8) // 57 * MAX_FRAME_HEADER:
        return None
    try:
        hdrs = _zstd_exact(body, cs)
    except (CorruptionError, zstandard.ZstdError):
        return None
    out, p, off = [], 0, 8
    try:
        while p < len(hdrs):
            h = parse_frame_header(hdrs[p:p + MAX_FRAME_HEADER])
            p += len(h.header_bytes)
            out.append((h, off))
            off += h.frame_len
    except CorruptionError:
        return None
    if p != len(hdrs) or off != ioff:
        return None
    return out


def scan_pack(data: bytes):
    if data[:8] != PACK_MAGIC:
        raise FormatError("not a pack (bad magic)")
    idx = read_pack_index(data)
    if idx is not None:
        return idx
    out, off, size = [], 8, len(data)
    while off < size:
        try:
            h = parse_frame_header(data[off:off + MAX_FRAME_HEADER])
        except CorruptionError:
            break
        if off + h.frame_len > size:
            break
        out.append((h, off))
        off += h.frame_len
    return out


# ---------------------------------------------------------------- manifests (§11)
def read_manifest(data: bytes) -> dict:
    if len(data) < 8 or data[:4] != MANIFEST_MAGIC:
        raise CorruptionError("bad manifest magic")
    (crc,) = struct.unpack_from("<I", data, 4)
    body = data[8:]
    if _crc32(body) != crc:
        raise CorruptionError("manifest CRC mismatch")
    cs = zstandard.get_frame_parameters(body).content_size
    if cs in (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR) or cs > MAX_MANIFEST_BYTES:
        raise CorruptionError("manifest content size unknown or too large")
    payload = json.loads(_zstd_exact(body, cs).decode("utf-8"))
    if not isinstance(payload, dict):
        raise CorruptionError("manifest payload is not an object")
    if type(payload.get("manifest_version")) is not int or payload["manifest_version"] != MANIFEST_VERSION:
        raise FormatVersionError(f"unsupported manifest_version {payload.get('manifest_version')!r}")
    return payload


def _manifest_names(store_dir: str):
    d = os.path.join(store_dir, "manifests")
    if not os.path.isdir(d):
        return []
    return sorted(f"manifests/{n}" for n in os.listdir(d)
                  if re.fullmatch(r"\d{20}\.manifest", n))


# ---------------------------------------------------------------- sources of a step
class _ManifestSource:
    """Steps from manifests, block locations from scanning every pack (§10, §13.5)."""

    def __init__(self, store_dir: str):
        self.dir = store_dir
        self._locs = None

    def steps(self) -> list[int]:
        out = []
        for name in _manifest_names(self.dir):
            m = read_manifest(_read_object(self.dir, name))
            if m.get("step") != int(name[10:30]):
                raise CorruptionError(f"{name} holds step {m.get('step')}")
            out.append(m["step"])
        return sorted(out)

    def step(self, step: int):
        name = f"manifests/{step:020d}.manifest"
        try:
            m = read_manifest(_read_object(self.dir, name))
        except FileNotFoundError:
            raise KeyError(step) from None
        if m.get("step") != step:
            raise CorruptionError(f"{name} holds step {m.get('step')}")
        entries = {}
        for e in m["entries"]:
            entries[e["idx"]] = dict(kind=e["kind"], dtype=e["dtype"], shape=list(e["shape"]),
                                     nbytes=e["nbytes"], blocks=bytes.fromhex(e["blocks"]))
        return m["tree"], entries

    def _scan(self):
        if self._locs is not None:
            return self._locs
        cands = collections.defaultdict(list)   # id -> [(packname, offset, header)]
        root = os.path.join(self.dir, "packs")
        names = []
        if os.path.isdir(root):
            for sub in sorted(os.listdir(root)):
                if not re.fullmatch(r"[0-9a-f]{2}", sub):
                    continue
                for fn in sorted(os.listdir(os.path.join(root, sub))):
                    if re.fullmatch(sub + r"[0-9a-f]{30}\.pack", fn):
                        names.append(f"packs/{sub}/{fn}")
        for name in sorted(names):
            data = _read_object(self.dir, name)
            for h, off in scan_pack(data):
                cands[h.id].append((name, off, h))
        # choose, per id, the frame with the shortest resolving chain; iterate to a fixpoint
        choice = {i: 0 for i in cands}

        def chain_len(i):
            seen, hops = set(), 0
            while True:
                if i in seen or i not in cands or hops > MAX_CHAIN:
                    return None
                seen.add(i)
                h = cands[i][choice[i]][2]
                if h.base is None:
                    return hops
                i, hops = h.base, hops + 1

        changed = True
        while changed:
            changed = False
            for i, lst in cands.items():
                best, best_len = choice[i], None
                for j in range(len(lst)):
                    old = choice[i]
                    choice[i] = j
                    n = chain_len(i)
                    choice[i] = old
                    if n is not None and (best_len is None or n < best_len):
                        best, best_len = j, n
                if best != choice[i]:
                    choice[i], changed = best, True
        self._locs = {i: cands[i][choice[i]] for i in cands}
        return self._locs

    def locate(self, bid: bytes):
        """-> (pack name, offset, frame_len, raw_len, base or None)."""
        locs = self._scan()
        if bid not in locs:
            raise CorruptionError(f"block {bid.hex()} not found in any pack")
        name, off, h = locs[bid]
        return name, off, h.frame_len, h.raw_len, h.base


class _IndexSource:
    """Steps, entries and block locations from index.sqlite (§13, §16)."""

    def __init__(self, store_dir: str):
        self.dir = store_dir
        path = os.path.join(store_dir, "index.sqlite")
        if not os.path.exists(path):
            raise FormatError("no index.sqlite")
        # read-only; WAL mode needs -shm, which exists after any writer used the store
        self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        self.db.execute("BEGIN")   # one snapshot for the whole read (§15.2)
        row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None or int(row[0]) > SCHEMA_VERSION:
            raise FormatVersionError(f"unsupported index schema {row}")
        self._cache = {}

    def close(self):
        self.db.execute("COMMIT")
        self.db.close()

    def steps(self) -> list[int]:
        return [r[0] for r in self.db.execute("SELECT step FROM steps ORDER BY step")]

    def step(self, step: int):
        row = self.db.execute("SELECT tree FROM steps WHERE step=?", (step,)).fetchone()
        if row is None:
            raise KeyError(step)
        entries = {}
        for idx, kind, dtype, shape, nbytes, blocks in self.db.execute(
                "SELECT idx, kind, dtype, shape, nbytes, blocks FROM entries WHERE step=?", (step,)):
            entries[idx] = dict(kind=kind, dtype=dtype, shape=json.loads(shape), nbytes=nbytes,
                                blocks=bytes(blocks))
        return json.loads(row[0]), entries

    def locate(self, bid: bytes):
        if bid not in self._cache:
            row = self.db.execute(
                "SELECT p.name, b.offset, b.length, b.raw_len, b.base FROM blocks b "
                "JOIN packs p ON p.id = b.pack_id WHERE b.id = ?", (bid,)).fetchone()
            if row is None:
                raise CorruptionError(f"block {bid.hex()} has no blocks row")
            name, off, length, raw_len, base = row
            self._cache[bid] = (name, off, length, raw_len, bytes(base) if base is not None else None)
        return self._cache[bid]


# ---------------------------------------------------------------- block decoding (§14.3)
class _BlockReader:
    def __init__(self, store_dir: str, src, algo: str):
        self.dir, self.src, self.algo = store_dir, src, algo
        self.raw = {}          # id -> decoded raw bytes (shared within one load)
        self._pack_magic_ok = set()

    def _read_frame(self, name: str, off: int, length: int) -> bytes:
        with open(_path(self.dir, name), "rb") as f:
            if name not in self._pack_magic_ok:
                if f.read(8) != PACK_MAGIC:
                    raise FormatError(f"{name}: bad pack magic")
                self._pack_magic_ok.add(name)
            f.seek(off)
            data = f.read(length)
        if len(data) != length:
            raise CorruptionError(f"{name}: short read at {off}")
        return data

    def get(self, bid: bytes) -> bytes:
        if bid in self.raw:
            return self.raw[bid]
        # walk the chain down to a keyframe, bounded and cycle-checked, then decode upward
        chain, seen, cur = [], set(), bid
        while True:
            if cur in self.raw:
                break
            if cur in seen or len(chain) > MAX_CHAIN:
                raise CorruptionError("delta chain cyclic or longer than 64 hops")
            seen.add(cur)
            loc = self.src.locate(cur)
            chain.append((cur, loc))
            if loc[4] is None:
                break
            cur = loc[4]
        base = self.raw.get(cur) if chain[-1][0] != cur else None
        for cid, (name, off, length, raw_len, base_id) in reversed(chain):
            frame = self._read_frame(name, off, length)
            h = parse_frame_header(frame)
            if h.id != cid:
                raise CorruptionError(f"{name}@{off}: header id differs")
            if h.base != base_id:
                raise CorruptionError(f"{name}@{off}: header base differs from index base")
            if h.raw_len != raw_len:
                raise CorruptionError(f"{name}@{off}: raw_len differs")
            raw = decode_frame(frame, base if h.delta else None, self.algo, expect_id=cid)
            self.raw[cid] = raw
            base = raw
        return self.raw[bid]


# ---------------------------------------------------------------- entries and tree (§8, §12)
def _torch():
    import torch
    return torch


def _build_entry(e: dict, attrs: dict, br: _BlockReader):
    kind, dtype, shape, nbytes = e["kind"], e["dtype"], e["shape"], e["nbytes"]
    itemsize = _itemsize(kind, dtype)
    if not isinstance(shape, list) or any(type(d) is not int or d < 0 for d in shape):
        raise FormatError("bad shape")
    if nbytes != math.prod(shape) * itemsize:
        raise CorruptionError("nbytes disagrees with shape and dtype")
    ids = e["blocks"]
    if len(ids) % ID_SIZE:
        raise CorruptionError("block list length not a multiple of 16")
    buf = bytearray(nbytes)
    pos = 0
    for k in range(0, len(ids), ID_SIZE):
        raw = br.get(ids[k:k + ID_SIZE])
        if pos + len(raw) > nbytes:
            raise CorruptionError("blocks exceed nbytes")
        buf[pos:pos + len(raw)] = raw
        pos += len(raw)
    if pos != nbytes:
        raise CorruptionError("sum of raw_len differs from nbytes")
    if kind == "bytes":
        if len(shape) != 1:
            raise FormatError("bytes entry shape must be [len]")
        return bytes(buf)
    if kind == "ndarray":
        return np.frombuffer(bytes(buf), dtype=np.dtype(dtype)).reshape(shape).copy()
    torch = _torch()
    tdt = getattr(torch, dtype)
    if nbytes:
        t = torch.frombuffer(buf, dtype=torch.uint8).view(tdt).reshape(shape).clone()
    else:
        t = torch.empty(shape, dtype=tdt)
    dev = attrs.get("device", "cpu")
    if dev != "cpu":
        t = t.to(dev)
    rg = bool(attrs.get("requires_grad", False))
    grad_ok = t.is_floating_point() or t.is_complex()
    if kind == "parameter":
        return torch.nn.Parameter(t, requires_grad=rg and grad_ok)
    if rg and grad_ok:
        t.requires_grad_(True)
    return t


def _decode_float(node):
    if len(node) not in (2, 3) or not isinstance(node[1], str):
        raise FormatError("malformed float node")
    text = node[1]
    if text == "nan":
        if len(node) == 3:
            if not isinstance(node[2], str) or not re.fullmatch(r"[0-9a-f]{16}", node[2]):
                raise FormatError("malformed NaN bits")
            return struct.unpack(">d", bytes.fromhex(node[2]))[0]
        return float("nan")
    if len(node) != 2:
        raise FormatError("malformed float node")
    if text == "inf":
        return math.inf
    if text == "-inf":
        return -math.inf
    return float.fromhex(text)


def _decode_tree(node, entries: dict, br: _BlockReader, depth: int = 0):
    if depth > MAX_TREE_DEPTH:
        raise FormatError("state tree nested too deeply")
    if node is None or isinstance(node, (bool, str)):
        return node
    if isinstance(node, int):
        return node
    if not isinstance(node, list) or not node or not isinstance(node[0], str):
        raise FormatError(f"malformed tree node {node!r:.80}")
    tag, d = node[0], depth + 1
    rec = lambda n: _decode_tree(n, entries, br, d)  # noqa: E731

    def pairs(p):
        if not isinstance(p, list):
            raise FormatError("malformed pairs")
        out = []
        for kv in p:
            if not isinstance(kv, list) or len(kv) != 2 or type(kv[0]) not in (str, int):
                raise FormatError("malformed dict pair")
            out.append((kv[0], rec(kv[1])))
        return out

    if tag == "I":
        if len(node) != 2 or not isinstance(node[1], str):
            raise FormatError("malformed I node")
        return int(node[1], 16)
    if tag == "f":
        return _decode_float(node)
    if tag in ("L", "T"):
        if len(node) != 2 or not isinstance(node[1], list):
            raise FormatError("malformed L/T node")
        items = [rec(x) for x in node[1]]
        return items if tag == "L" else tuple(items)
    if tag == "D":
        if len(node) != 2:
            raise FormatError("malformed D node")
        return dict(pairs(node[1]))
    if tag == "C":  # added with the spec's C node (session 7), not by the original author
        if len(node) != 2:
            raise FormatError("malformed C node")
        return collections.Counter(dict(pairs(node[1])))
    if tag == "O":
        if len(node) not in (2, 3):
            raise FormatError("malformed O node")
        od = collections.OrderedDict(pairs(node[1]))
        if len(node) == 3 and node[2] is not None:
            od._metadata = rec(node[2])
        return od
    if tag == "E":
        if len(node) != 3 or type(node[1]) is not int or not isinstance(node[2], dict):
            raise FormatError("malformed E node")
        if node[1] not in entries:
            raise FormatError(f"E index {node[1]} has no entry")
        value = _build_entry(entries[node[1]], node[2], br)
        state = node[2].get("state")  # §12.1 attrs "state" (added in session 8)
        if state is not None and not isinstance(value, (bytes, np.ndarray)):
            if not (isinstance(state, list) and len(state) == 2 and state[0] == "D"):
                raise FormatError("malformed attribute state")
            names = dict(pairs(state[1]))
            if any(type(n) is not str or hasattr(type(value), n) for n in names):
                raise FormatError("attribute name defined by the tensor type")
            value.__dict__.update(names)
        return value
    if tag == "N":
        if len(node) != 3 or not isinstance(node[1], str) or not isinstance(node[2], str):
            raise FormatError("malformed N node")
        dt = _numpy_dtype_ok(node[1])
        if dt is None:
            raise FormatError(f"bad numpy scalar dtype {node[1]!r}")
        raw = bytes.fromhex(node[2])
        if len(raw) != dt.itemsize:
            raise FormatError("numpy scalar size mismatch")
        return np.frombuffer(raw, dtype=dt)[0]
    if tag == "S":
        if len(node) != 2 or not isinstance(node[1], list) or any(type(x) is not int for x in node[1]):
            raise FormatError("malformed S node")
        return _torch().Size(node[1])
    if tag == "dt":
        if len(node) != 2 or node[1] not in TORCH_DTYPES:
            raise FormatError("malformed dt node")
        return getattr(_torch(), node[1])
    if tag == "dev":
        if len(node) != 2 or not isinstance(node[1], str):
            raise FormatError("malformed dev node")
        return _torch().device(node[1])
    raise FormatError(f"unknown tree tag {tag!r}")


# ---------------------------------------------------------------- public API
def _source(store_dir: str, source: str):
    if source == "manifest":
        return _ManifestSource(store_dir)
    if source == "index":
        return _IndexSource(store_dir)
    raise ValueError(source)


def list_steps(store_dir: str, source: str = "manifest") -> list[int]:
    read_config(store_dir)
    src = _source(store_dir, source)
    try:
        return src.steps()
    finally:
        if hasattr(src, "close"):
            src.close()


def read_step(store_dir: str, step: int, source: str = "manifest") -> object:
    cfg = read_config(store_dir)
    src = _source(store_dir, source)
    try:
        tree, entries = src.step(step)
        for e in entries.values():
            _itemsize(e["kind"], e["dtype"])   # refuse unknown kinds/dtypes up front
        br = _BlockReader(store_dir, src, cfg["hash"])
        return _decode_tree(tree, entries, br)
    finally:
        if hasattr(src, "close"):
            src.close()


if __name__ == "__main__":
    import sys
    d = sys.argv[1]
    print(read_config(d))
    for s in list_steps(d):
        print(s, type(read_step(d, s)).__name__)
