"""How fast can entropy coding alone be? The speed floor under the save and restore targets.

Takes two consecutive saved steps of a cached MiniLM trace (``--base`` and ``--step``),
cuts every tensor into the store's 1 MiB blocks and times, in one process and alternating
with the peers so that all see the same machine:

- ``torch.save`` (+ fsync) and ``torch.load`` of ``--step``'s state (the references);
- **zstd alone**: the store's level-1 zstd over the byte planes of every block's XOR
  residual against ``--base`` (planes prepared beforehand, not timed), and the matching
  decompression: the least any store pays that entropy-codes the changed bytes, with no
  hashing, delta arithmetic, grouping, packing or fsync;
- **codec**: ``deltackpt.codec.encode`` / ``decode_into`` of the same blocks (XOR, grouping,
  zstd; one frame per block, i.e. a keyframe's delta distance of one save);
- **zipnn** (if installed): its byte-grouping + Huffman codec on the same blocks, standalone.

Each on ``--threads`` threads (zstd and zipnn release the GIL), median of ``--repeat``.
A restore of a step stored as deltas decodes more than one frame per block (docs/format.md
§14), so the decode figures here are a lower bound for it; a save also hashes, packs and
fsyncs, so the encode figures are a lower bound for a save.

    python benchmarks/bench_codec_floor.py --trace benchmarks/.cache/traces/bf16 \
        --base 90 --step 100
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_delta import fsync_save, nest  # noqa: E402

from deltackpt import codec  # noqa: E402
from deltackpt.hashing import block_id  # noqa: E402

BLOCK = 1 << 20


def blocks_of(flat: dict[str, torch.Tensor]) -> dict[tuple[str, int], tuple[np.ndarray, int]]:
    """(key, block index) -> (flat uint8 bytes, element width), 1 MiB blocks."""
    out = {}
    for key, t in flat.items():
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy()
        width = t.element_size()
        for i in range(0, raw.nbytes, BLOCK):
            out[(key, i // BLOCK)] = (raw[i:i + BLOCK], width)
    return out


def median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", required=True)
    ap.add_argument("--base", type=int, required=True)
    ap.add_argument("--step", type=int, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    base_flat = load_file(os.path.join(args.trace, f"step_{args.base:06d}.safetensors"))
    flat = load_file(os.path.join(args.trace, f"step_{args.step:06d}.safetensors"))
    state = nest(flat)
    blocks = blocks_of(flat)
    bases = blocks_of(base_flat)
    config = codec.CodecConfig()
    # the work items: every block that changed since the base (what a save entropy-codes)
    work = []
    for k, (raw, width) in blocks.items():
        base = bases.get(k)
        if base is not None and base[0].nbytes == raw.nbytes and np.array_equal(base[0], raw):
            continue
        work.append((raw, width, base[0] if base is not None and
                     base[0].nbytes == raw.nbytes else None))
    planes = []
    for raw, width, base in work:
        data = codec.apply_delta(codec.DELTA_XOR, raw, base, width) if base is not None else raw
        grouped = np.empty((width, raw.nbytes // width), dtype=np.uint8)
        codec.group_into(grouped, data, width)
        planes.extend(grouped[k] for k in range(width))
    raw_bytes = sum(w[0].nbytes for w in work)
    total = sum(t.numel() * t.element_size() for t in flat.values())
    print(f"{args.trace} step {args.step} against {args.base}: {total / 2**20:.1f} MiB state, "
          f"{raw_bytes / 2**20:.1f} MiB in {len(work)} changed blocks; "
          f"{args.threads} threads, median of {args.repeat}")
    pool = ThreadPoolExecutor(args.threads)
    comp = [None] * len(planes)

    def z_one(i: int) -> None:
        comp[i] = codec._compressor(1).compress(planes[i])

    def zstd_encode() -> None:
        list(pool.map(z_one, range(len(planes))))

    zstd_encode()

    def zstd_decode() -> None:
        list(pool.map(lambda c: codec._decompressor().decompress(c), comp))

    frames = [None] * len(work)

    def c_one(i: int) -> None:
        raw, width, base = work[i]
        bid = block_id(raw)
        frames[i] = b"".join(bytes(p) for p in codec.encode(
            raw, bid, width, config, base=base, base_id=block_id(base) if base is not None
            else None, delta=codec.DELTA_XOR if base is not None else codec.DELTA_NONE))

    def codec_encode() -> None:
        list(pool.map(c_one, range(len(work))))

    codec_encode()
    outs = [np.empty(w[0].nbytes, dtype=np.uint8) for w in work]

    def d_one(i: int) -> None:
        codec.decode_into(frames[i], outs[i], base=work[i][2])

    def codec_decode() -> None:
        list(pool.map(d_one, range(len(work))))

    codec_decode()
    assert all(np.array_equal(o, w[0]) for o, w in zip(outs, work))
    peers = {}
    try:
        import threading

        import zipnn

        local = threading.local()

        def znn(width: int):
            cache = getattr(local, "zipnn", None)
            if cache is None:
                cache = local.zipnn = {w: zipnn.ZipNN(input_format="byte", threads=1,
                                                      bytearray_dtype=dt)
                                       for w, dt in ((2, "bfloat16"), (4, "float32"))}
            return cache[width]

        # zipnn holds float32 and bfloat16 only: the few other blocks (scalars) are left out
        zwork = [i for i, w in enumerate(work) if w[1] in (2, 4)]
        zcomp = {}

        def zn_one(i: int) -> None:
            zcomp[i] = znn(work[i][1]).compress(bytearray(work[i][0]))  # it rewrites its input

        def zipnn_encode() -> None:
            list(pool.map(zn_one, zwork))

        def zipnn_decode() -> None:
            list(pool.map(lambda i: znn(work[i][1]).decompress(zcomp[i]), zwork))

        zipnn_encode()
        peers = {"zipnn encode": zipnn_encode, "zipnn decode": zipnn_decode}
    except ImportError:
        print("zipnn not installed: its rows are left out")
    stored = sum(len(c) for c in comp)
    print(f"zstd alone stores {stored / raw_bytes:.3f} of the changed bytes; codec frames "
          f"{sum(len(f) for f in frames) / raw_bytes:.3f}")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "step.pt")
        rows: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            t_save = statistics.median(fsync_save(state, path) for _ in range(args.repeat))
            t_load = median_time(lambda: torch.load(path, weights_only=True), args.repeat)
            for name, fn, ref in [("zstd alone encode", zstd_encode, t_save),
                                  ("codec encode", codec_encode, t_save),
                                  ("zstd alone decode", zstd_decode, t_load),
                                  ("codec decode", codec_decode, t_load)] + [
                    (n, f, t_save if "encode" in n else t_load) for n, f in peers.items()]:
                rows.setdefault(name, []).append(median_time(fn, args.repeat) / ref)
            rows.setdefault("torch.save s", []).append(t_save)
            rows.setdefault("torch.load s", []).append(t_load)
    print("| measure | per round |")
    print("|---|---|")
    for name, vals in rows.items():
        unit = "" if name.endswith(" s") else "×"
        print(f"| {name} | " + ", ".join(f"{v:.3f}{unit}" for v in vals) + " |")


if __name__ == "__main__":
    main()
