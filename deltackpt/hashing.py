"""Block identity and fixed-size chunking.

A block's id is a 16-byte digest of its raw (uncompressed, un-delta'd) bytes, so
changing the codec never breaks dedup. The default, ``xxh3_128``, is seeded with
the block length: ``XXH3_128(raw, seed=len(raw))``, which makes the length part
of the identity. ``blake2b`` (keyless, 16-byte digest of length || raw) is the
cryptographic option for stores shared with writers you do not trust
(docs/security.md).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator

import numpy as np
import xxhash

HASHES = ("xxh3_128", "blake2b")
ID_SIZE = 16
DEFAULT_BLOCK_SIZE = 1024 * 1024
_LEN = struct.Struct("<Q")


def block_id(data: np.ndarray | memoryview | bytes, hash_name: str = "xxh3_128") -> bytes:
    """The 16-byte id of a raw block."""
    n = data.nbytes if not isinstance(data, bytes) else len(data)
    if hash_name == "xxh3_128":
        return xxhash.xxh3_128_digest(data, seed=n)
    if hash_name == "blake2b":
        h = hashlib.blake2b(_LEN.pack(n), digest_size=ID_SIZE)
        h.update(data)
        return h.digest()
    raise ValueError(f"unknown block hash {hash_name!r}; known: {', '.join(HASHES)}")


def block_spans(nbytes: int, block_size: int, itemsize: int) -> Iterator[tuple[int, int]]:
    """(start, end) byte offsets of the blocks of an entry of ``nbytes`` bytes.

    Blocks are ``block_size`` rounded down to a multiple of ``itemsize`` (never
    below one element), so no element straddles two blocks; the last is shorter.
    """
    step = max(itemsize, block_size - block_size % itemsize)
    for start in range(0, nbytes, step):
        yield start, min(nbytes, start + step)


def effective_block_size(block_size: int, itemsize: int) -> int:
    return max(itemsize, block_size - block_size % itemsize)


def pack_ids(ids: list[bytes]) -> bytes:
    """The compact on-disk form of an entry's block list: ids concatenated."""
    return b"".join(ids)


def unpack_ids(blob: bytes) -> list[bytes]:
    if len(blob) % ID_SIZE:
        raise ValueError(f"block list of {len(blob)} bytes is not a multiple of {ID_SIZE}")
    return [blob[i:i + ID_SIZE] for i in range(0, len(blob), ID_SIZE)]
