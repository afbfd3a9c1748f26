"""Cost of cryptographic block ids: save throughput with ``hash="xxh3_128"`` (default)
vs ``hash="blake2b"``, measured in the same run, plus raw hashing speed (sha256 for
reference; deltackpt does not offer it as a block id).

    .venv/bin/python benchmarks/bench_hash.py [--mib 256] [--repeat 3] [--threads 1]

Three saves per store: a first save (every block new: hash + encode + write), an unchanged
re-save (every block deduplicated: the save is almost only hashing) and a save where 1% of
the values changed (hash everything, encode the changed blocks as deltas). In-memory
stores, so the disk does not blur the difference.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import struct
import sys
import time

import numpy as np
import torch
import xxhash

import deltackpt


def _state(mib: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    n = mib * 1024 * 1024 // 4
    sizes = [n // 2, n // 4, n // 8, n - n // 2 - n // 4 - n // 8]
    return {f"layer{i}.weight": torch.from_numpy(
        rng.standard_normal(k, dtype=np.float32) * 0.02) for i, k in enumerate(sizes)}


def _changed(state: dict, frac: float = 0.01) -> dict:
    out = {}
    for k, v in state.items():
        w = v.clone()
        w[:: int(1 / frac)] += 1e-4
        out[k] = w
    return out


def _hash_speed(data: np.ndarray, block: int, repeat: int) -> dict[str, float]:
    n = data.nbytes
    mv = memoryview(data)
    funcs = {
        "xxh3_128": lambda b: xxhash.xxh3_128_digest(b, seed=len(b)),
        "blake2b": _blake,  # as deltackpt.hashing.block_id: 16-byte digest of len || raw
        "sha256": lambda b: hashlib.sha256(b).digest(),
    }
    out = {}
    for name, fn in funcs.items():
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            for i in range(0, n, block):
                fn(mv[i:i + block])
            times.append(time.perf_counter() - t0)
        out[name] = n / statistics.median(times) / 2**20
    return out


def _blake(b) -> bytes:
    h = hashlib.blake2b(struct.pack("<Q", len(b)), digest_size=16)
    h.update(b)
    return h.digest()


def _save_speeds(hashes: tuple[str, ...], states: list[dict], threads: int,
                 repeat: int) -> dict[str, list[float]]:
    """MiB/s of each save per hash: median over ``repeat`` fresh stores, the hashes
    interleaved and one warm-up round discarded, so neither profits from going second."""
    per: dict[str, list[list[float]]] = {h: [[] for _ in states] for h in hashes}
    for rnd in range(repeat + 1):
        for h in (hashes if rnd % 2 else hashes[::-1]):
            with deltackpt.open("memory://", hash=h, threads=threads) as s:
                for i, st in enumerate(states):
                    r = s.save(st, i)
                    if rnd:
                        per[h][i].append(r.logical_bytes / r.seconds / 2**20)
    return {h: [statistics.median(v) for v in per[h]] for h in hashes}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    base = _state(args.mib)
    states = [base, base, _changed(base)]
    flat = np.concatenate([v.numpy().view(np.uint8) for v in base.values()])
    hs = _hash_speed(flat, 1 << 20, args.repeat)
    print(f"# bench_hash: {args.mib} MiB state, 1 MiB blocks, threads={args.threads}, "
          f"median of {args.repeat}; command: {' '.join(['benchmarks/bench_hash.py', *sys.argv[1:]])}")
    print("\nraw hashing, one thread (MiB/s):")
    for name, v in hs.items():
        print(f"  {name:9s} {v:8.0f}  ({v / hs['xxh3_128']:.2f}x xxh3_128)")
    speeds = _save_speeds(("xxh3_128", "blake2b"), states, args.threads, args.repeat)
    print("\nsave throughput (logical MiB/s):")
    print(f"  {'save':28s} {'xxh3_128':>9s} {'blake2b':>9s} {'blake2b/xxh3':>13s}")
    for i, label in enumerate(["first (all blocks new)", "unchanged (all dedup)",
                               "1% of values changed"]):
        x, b = speeds["xxh3_128"][i], speeds["blake2b"][i]
        print(f"  {label:28s} {x:9.0f} {b:9.0f} {b / x:12.2f}x")


if __name__ == "__main__":
    main()
