"""Shared test helpers: bit-exact state comparison, deterministic data, store inspection.

``assert_state_equal(actual, expected)`` is the one definition of "lossless" the
tests use: exact Python types of every container and leaf, dict key order and
key types, ``OrderedDict._metadata``, float bits (nan payload and sign, -0.0),
tensors by dtype, shape, type, ``requires_grad`` and their raw bytes, numpy
arrays and scalars by ``dtype.str``, shape and bytes.

Deterministic data comes from :func:`det_bytes` (splitmix64 in numpy uint64
arithmetic, little-endian), so it is identical on every platform and numpy or
torch version; the frozen store and the crash children rely on that.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import signal
import struct
from typing import Any

import numpy as np
import torch

_MISSING = object()


# -- comparison ------------------------------------------------------------------------
def float_bits(x: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", x))[0]


def tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    """The row-major element bytes of ``t`` as a flat uint8 tensor."""
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if t.numel() == 0:
        return torch.empty(0, dtype=torch.uint8)
    if t.element_size() == 1:  # also float4_e2m1fn_x2, which has no copy kernel
        t = t.view(torch.uint8)
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_state_equal(actual: Any, expected: Any, path: str = "<root>") -> None:
    """Fail unless ``actual`` is a bit-exact reconstruction of ``expected``."""
    ta, te = type(actual), type(expected)
    assert ta is te, f"{path}: type {ta.__qualname__} != expected {te.__qualname__}"
    if te is dict or te is collections.OrderedDict or te is collections.Counter:
        ka, ke = list(actual.keys()), list(expected.keys())
        assert [(type(k), k) for k in ka] == [(type(k), k) for k in ke], (
            f"{path}: keys {ka!r} != expected {ke!r} (order and key types matter)")
        if te is collections.OrderedDict:
            ma = getattr(actual, "_metadata", _MISSING)
            me = getattr(expected, "_metadata", _MISSING)
            assert (ma is _MISSING) == (me is _MISSING), f"{path}: _metadata presence differs"
            if me is not _MISSING:
                assert_state_equal(ma, me, f"{path}/@metadata")
        for k in ke:
            assert_state_equal(actual[k], expected[k], f"{path}/{k!r}")
    elif te is list or te is tuple:
        assert len(actual) == len(expected), f"{path}: length {len(actual)} != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_state_equal(a, e, f"{path}/{i}")
    elif te is float:
        assert float_bits(actual) == float_bits(expected), (
            f"{path}: float bits {float_bits(actual):#018x} != {float_bits(expected):#018x}")
    elif expected is None or te in (bool, int, str, bytes):
        assert actual == expected, f"{path}: {actual!r:.200} != {expected!r:.200}"
    elif isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype, f"{path}: dtype {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{path}: shape {actual.shape} != {expected.shape}"
        assert actual.layout == expected.layout, f"{path}: layout differs"
        assert actual.device == expected.device, (
            f"{path}: device {actual.device} != {expected.device}")
        assert actual.requires_grad == expected.requires_grad, f"{path}: requires_grad differs"
        assert list(actual.__dict__) == list(expected.__dict__), (
            f"{path}: attributes {list(actual.__dict__)} != {list(expected.__dict__)}")
        for name, value in expected.__dict__.items():
            assert_state_equal(actual.__dict__[name], value, f"{path}@{name}")
        if expected.device.type != "meta":
            assert torch.equal(tensor_bytes(actual), tensor_bytes(expected)), (
                f"{path}: bytes differ")
    elif te is np.ndarray:
        assert actual.dtype.str == expected.dtype.str, (
            f"{path}: dtype {actual.dtype.str} != {expected.dtype.str}")
        assert actual.shape == expected.shape, f"{path}: shape {actual.shape} != {expected.shape}"
        assert actual.tobytes() == expected.tobytes(), f"{path}: bytes differ"
    elif isinstance(expected, np.generic):
        assert actual.dtype.str == expected.dtype.str, f"{path}: scalar dtype differs"
        assert actual.tobytes() == expected.tobytes(), f"{path}: scalar bytes differ"
    elif te is torch.Size:
        assert tuple(actual) == tuple(expected), f"{path}: {actual} != {expected}"
    elif te is torch.dtype or te is torch.device:
        assert actual == expected and str(actual) == str(expected), (
            f"{path}: {actual} != {expected}")
    else:  # pragma: no cover - a test built a state the comparison does not know
        raise AssertionError(f"{path}: assert_state_equal cannot compare {te.__qualname__}")


def state_digest(state: Any) -> str:
    """sha256 over everything :func:`assert_state_equal` compares (to pin generated states)."""
    h = hashlib.sha256()

    def feed(v: Any) -> None:
        t = type(v)
        h.update(t.__qualname__.encode() + b"|")
        if t is dict or t is collections.OrderedDict:
            h.update(str(len(v)).encode())
            for k, x in v.items():
                feed(k)
                feed(x)
            if t is collections.OrderedDict:
                feed(getattr(v, "_metadata", None))
        elif t is list or t is tuple:
            h.update(str(len(v)).encode())
            for x in v:
                feed(x)
        elif t is float:
            h.update(struct.pack("<d", v))
        elif t is bytes:
            h.update(str(len(v)).encode() + b":" + v)
        elif isinstance(v, torch.Tensor):
            h.update(f"{v.dtype}{tuple(v.shape)}{v.requires_grad}".encode())
            h.update(tensor_bytes(v).numpy().tobytes())
        elif t is np.ndarray:
            h.update(f"{v.dtype.str}{v.shape}".encode() + v.tobytes())
        elif isinstance(v, np.generic):
            h.update(v.dtype.str.encode() + v.tobytes())
        else:
            h.update(repr(v).encode())
        h.update(b";")

    feed(state)
    return h.hexdigest()


# -- deterministic data ----------------------------------------------------------------
_M = np.uint64(0xFFFFFFFFFFFFFFFF)


def det_bytes(seed: int, n: int) -> bytes:
    """``n`` pseudo-random bytes, a pure function of (seed, n) on every platform."""
    k = (n + 7) // 8
    if k == 0:
        return b""
    x = np.arange(1, k + 1, dtype=np.uint64)
    x += np.uint64(seed & 0xFFFFFFFFFFFFFFFF)
    x *= np.uint64(0x9E3779B97F4A7C15)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x.astype("<u8").tobytes()[:n]


def det_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A tensor of ``dtype``/``shape`` with deterministic (arbitrary bit pattern) contents.

    Bool tensors hold 0/1 only; every other dtype gets raw random bits (nan
    payloads, subnormals and all).
    """
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * dtype.itemsize
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    raw = bytearray(det_bytes(seed, nbytes))
    if dtype == torch.bool:
        raw = bytearray(b & 1 for b in raw)
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape).clone()


def det_floats(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32,
               scale: float = 1.0) -> torch.Tensor:
    """Finite, "training-like" floats in [-scale, scale), deterministic on every platform."""
    numel = int(np.prod(shape)) if shape else 1
    ints = np.frombuffer(det_bytes(seed, 4 * numel), dtype="<u4").astype(np.float64)
    vals = (ints / 2.0**32 * 2.0 - 1.0) * scale
    return torch.from_numpy(vals.reshape(shape)).to(dtype)


def det_array(dtype: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    dt = np.dtype(dtype)
    numel = int(np.prod(shape)) if shape else 1
    raw = det_bytes(seed, numel * dt.itemsize)
    if dt.kind == "b":
        raw = bytes(b & 1 for b in raw)
    return np.frombuffer(raw, dtype=dt).reshape(shape).copy()


# -- store inspection ------------------------------------------------------------------
def dir_digest(root: str | os.PathLike, skip_suffixes: tuple[str, ...] = ()) -> dict[str, str]:
    """relative path -> sha256 of every file under ``root`` (what "unchanged" means)."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            full = os.path.join(dirpath, f)
            rel = os.path.relpath(full, root)
            if rel.endswith(skip_suffixes):
                continue
            with open(full, "rb") as fh:
                out[rel] = hashlib.sha256(fh.read()).hexdigest()
    return out


def files_under(root: str | os.PathLike, sub: str) -> dict[str, int]:
    """relative path -> size of the files under ``root/sub``."""
    out = {}
    base = os.path.join(root, sub)
    for dirpath, _dirs, files in os.walk(base):
        for f in files:
            full = os.path.join(dirpath, f)
            out[os.path.relpath(full, root)] = os.path.getsize(full)
    return out


def block_rows(store) -> list[dict]:
    """Every block the index knows, with its pack, offset, length, codec and base."""
    rows = store._index.query(
        "SELECT b.id, p.name, b.offset, b.length, b.raw_len, b.codec, b.base, b.depth, "
        "b.first_step FROM blocks b JOIN packs p ON p.id = b.pack_id ORDER BY p.name, b.offset")
    keys = ("id", "pack", "offset", "length", "raw_len", "codec", "base", "depth", "first_step")
    return [dict(zip(keys, r)) for r in rows]


def entry_block_ids(store, step: int) -> dict[str, list[bytes]]:
    """entry path -> its block ids, for one step."""
    from deltackpt.hashing import unpack_ids

    rows = store._index.query("SELECT path, blocks FROM entries WHERE step=? ORDER BY idx",
                              (step,))
    return {p: unpack_ids(b) for p, b in rows}


class CountingBackend:
    """A Backend wrapper that records every read (name, offset, length)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.durable = inner.durable
        self.reads: list[tuple[str, int, int | None]] = []

    def create(self, name):
        return self.inner.create(name)

    def put(self, name, data):
        return self.inner.put(name, data)

    def read(self, name, offset=0, length=None):
        self.reads.append((name, offset, length))
        return self.inner.read(name, offset, length)

    def size(self, name):
        return self.inner.size(name)

    def exists(self, name):
        return self.inner.exists(name)

    def list(self, prefix=""):
        return self.inner.list(prefix)

    def delete(self, name):
        return self.inner.delete(name)

    def sync(self):
        return self.inner.sync()

    def close(self):
        return self.inner.close()



class Hang(Exception):
    """Raised by :func:`deadline` when the block it guards runs too long."""


@contextlib.contextmanager
def deadline(seconds: int):
    """Raise :class:`Hang` in the main thread after ``seconds`` (SIGALRM): interrupts a
    call blocked in the kernel (a FIFO open, a read) as well as a loop."""
    def fire(signum, frame):
        raise Hang(f"blocked for {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def flip_byte(path: str | os.PathLike, offset: int, mask: int = 0xFF) -> None:
    """XOR one byte of a file in place (same inode: open readers see it)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        assert len(b) == 1, f"offset {offset} past the end of {path}"
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


# -- states of the crash-test children (tests/test_crash.py) ----------------------------------
def crash_state(step: int, kind: str = "plain") -> dict:
    """The state a crash-test child saves as ``step`` (a pure function of its arguments)."""
    if kind == "plain":
        w = det_floats((8 * 1024,), 1)
        w[::100] += step * 1e-3  # every 4 KiB block changes: delta frames
        return {"w": w, "b": det_tensor(torch.int64, (100,), step),
                "fixed": det_floats((2048,), 7), "meta": {"step": step, "name": "crash"}}
    if kind == "repack":
        small = det_floats((1024,), 2)
        if step == 0:
            return {"big": det_floats((20 * 1024,), 1), "small": small}
        return {"small": small, "step": step}
    if kind == "loop":
        w = det_floats((512 * 1024,), 3)
        w[::1000] += step * 1e-3
        return {"w": w, "noise": det_tensor(torch.float32, (256 * 1024,), step), "n": step}
    raise ValueError(kind)
