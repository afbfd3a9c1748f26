"""Float-aware codec experiments on cached MiniLM fine-tuning traces.

Pure numpy / zstandard / xxhash / zipnn (torch only to measure torch.save size);
does NOT import deltackpt.  Traces come from ``benchmarks/minilm_trace.py``.

Model of the store: every tensor is split into fixed-size blocks (aligned to the
element size); a block whose xxh3_64 equals the same block of the previous
checkpoint is deduplicated (costs 0 bytes in *every* method, like a
content-addressed store); changed blocks are encoded with the method under
test.  Delta methods use the same block of the previous checkpoint as base; a
block with no base (optimizer state at step 0 is empty) falls back to the
standalone grouped codec at the same level.

Methods (suffix = zstd level):
  zstdL      zstd of the raw block
  grpL       byte grouping by element width (byte0s, byte1s, ...), one zstd frame
             per group, group stored raw if zstd does not shrink it
  rotgrpL    rotate bit pattern left by 1 (exponent -> one byte), then grpL
  xorrawL    XOR with base block, zstd without grouping
  xorL       XOR with base block, then grpL
  xorrotL    XOR, rotl1, grpL   (for bf16 this equals the BitX split)
  subL       new-old as uint32/uint16 (wraparound), then grpL
  bitxL      XOR, then exponent stream (8 bits) + sign|mantissa stream (packed
             24 bits fp32 / 8 bits bf16), each its own zstd frame
  polL       per block min(grpL, xorL)             -- the realistic policy
  polbestL   per block min(grpL, rotgrpL, xorL, xorrotL, subL, bitxL) over the
             variants computed at that level (level 1: grp, xor, xorrot, sub)
  zipnn      zipnn.ZipNN(input_format="byte", threads=1) standalone (AUTO method)
  zipnn_d    zipnn with delta_compressed_type="byte" (it XORs, then same codec)

Usage:
  python benchmarks/codec_experiments.py --traces benchmarks/.cache/traces \
      --out docs/codec-experiments.md [--jobs 2] [--late-every 50]
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
from collections import defaultdict
from multiprocessing import Pool

import numpy as np
import xxhash
import zstandard

KiB = 1024
MiB = 1024 * 1024
CATS = ("weights", "exp_avg", "exp_avg_sq")
WIDTH = {"F32": 4, "BF16": 2}
UINT = {4: np.uint32, 2: np.uint16}

# --------------------------------------------------------------------------
# trace IO (safetensors parsed by hand: numpy has no bf16)
# --------------------------------------------------------------------------


def load_st(path):
    """Return {key: (dtype_str, uint8 array)} -- the whole file read into RAM."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        hdr = json.loads(f.read(n))
        data = np.frombuffer(f.read(), dtype=np.uint8)
    out = {}
    for k, v in hdr.items():
        if k == "__metadata__":
            continue
        s, e = v["data_offsets"]
        out[k] = (v["dtype"], data[s:e])
    return out


def category(key):
    if key.startswith("model/"):
        return "weights"
    if key.endswith("/exp_avg"):
        return "exp_avg"
    if key.endswith("/exp_avg_sq"):
        return "exp_avg_sq"
    return "other"


def list_trace(trace_dir, every=None):
    out = []
    for f in sorted(os.listdir(trace_dir)):
        if f.startswith("step_") and f.endswith(".safetensors"):
            s = int(f[5:-12])
            if every is None or s % every == 0:
                out.append((s, os.path.join(trace_dir, f)))
    return out


def iter_blocks(new, old, block):
    """Yield (cat, width, new_block_u8, old_block_u8_or_None) over float tensors."""
    for k, (dt, buf) in new.items():
        cat = category(k)
        if cat == "other" or dt not in WIDTH:
            continue
        w = WIDTH[dt]
        base = old.get(k)
        if base is not None and (base[0] != dt or len(base[1]) != len(buf)):
            base = None
        bs = block - block % w
        for off in range(0, len(buf), bs):
            yield cat, w, buf[off:off + bs], (None if base is None else base[1][off:off + bs])


# --------------------------------------------------------------------------
# transforms
# --------------------------------------------------------------------------


def as_uint(b, w):
    return b.view(UINT[w])


def rotl1(u, w):
    bits = 8 * w
    return ((u << UINT[w](1)) | (u >> UINT[w](bits - 1))).astype(UINT[w], copy=False)


def rotr1(u, w):
    bits = 8 * w
    return ((u >> UINT[w](1)) | (u << UINT[w](bits - 1))).astype(UINT[w], copy=False)


def group(b, w):
    """(w, n) contiguous: row i = byte i of every element."""
    return np.ascontiguousarray(b.reshape(-1, w).T)


def ungroup(g, w):
    return np.ascontiguousarray(g.T).reshape(-1)


def bitx_split(x, w):
    """x: uint XOR residual. Return (exponent u8 stream, sign|mantissa u8 stream)."""
    if w == 4:
        exp = ((x >> np.uint32(23)) & np.uint32(0xFF)).astype(np.uint8)
        sm = ((x >> np.uint32(8)) & np.uint32(0x800000)) | (x & np.uint32(0x7FFFFF))
        sm = np.ascontiguousarray(sm.view(np.uint8).reshape(-1, 4)[:, :3]).reshape(-1)
    else:
        exp = ((x >> np.uint16(7)) & np.uint16(0xFF)).astype(np.uint8)
        sm = (((x >> np.uint16(8)) & np.uint16(0x80)) | (x & np.uint16(0x7F))).astype(np.uint8)
    return exp, sm


def bitx_join(exp, sm, w):
    if w == 4:
        s4 = np.zeros((len(exp), 4), np.uint8)
        s4[:, :3] = sm.reshape(-1, 3)
        s = s4.reshape(-1).view(np.uint32)
        return ((s & np.uint32(0x800000)) << np.uint32(8)) | (exp.astype(np.uint32) << np.uint32(23)) \
            | (s & np.uint32(0x7FFFFF))
    s = sm.astype(np.uint16)
    return ((s & np.uint16(0x80)) << np.uint16(8)) | (exp.astype(np.uint16) << np.uint16(7)) \
        | (s & np.uint16(0x7F))


# --------------------------------------------------------------------------
# sizes
# --------------------------------------------------------------------------

_CCTX = {}


def cctx(level):
    c = _CCTX.get(level)
    if c is None:
        c = _CCTX[level] = zstandard.ZstdCompressor(level=level)
    return c


def zlen(arr, level):
    """min(zstd frame, raw) size of a contiguous uint8 array."""
    n = arr.nbytes
    if n == 0:
        return 0
    return min(len(cctx(level).compress(arr)), n)


def grp_len(b, w, level):
    g = group(b, w)
    return sum(zlen(g[i], level) for i in range(w))


_ZIPNN = {}


def zipnn_len(b, w, base=None):
    import zipnn  # noqa: F401  (heavy import, lazy)
    key = (w, base is not None)
    z = _ZIPNN.get(key)
    if z is None:
        kw = dict(input_format="byte", bytearray_dtype="float32" if w == 4 else "bfloat16", threads=1)
        if base is not None:
            kw["delta_compressed_type"] = "byte"
        z = _ZIPNN[key] = zipnn.ZipNN(**kw)
    # zipnn 0.5.4 rewrites its input buffer in place: always pass copies.
    if base is None:
        return len(z.compress(bytearray(b.tobytes())))
    return len(z.compress(bytearray(b.tobytes()), delta_second_data=bytearray(base.tobytes())))


FULL_METHODS = ["zstd1", "zstd3", "grp1", "grp3", "rotgrp3", "xorraw3", "xor1", "xor3",
                "xorrot1", "xorrot3", "sub1", "sub3", "bitx3", "pol1", "pol3", "polbest1", "polbest3",
                "zipnn", "zipnn_d"]


def block_sizes(b, w, base, methods):
    """Stored bytes for each method for one changed block (dict)."""
    r = {}
    u = as_uint(b, w)
    set(methods)
    cache = {}

    def grp(L):
        if ("grp", L) not in cache:
            cache[("grp", L)] = grp_len(b, w, L)
        return cache[("grp", L)]

    for m in methods:
        if m.startswith("zstd"):
            r[m] = zlen(b, int(m[4:]))
        elif m.startswith("grp"):
            r[m] = grp(int(m[3:]))
        elif m.startswith("rotgrp"):
            r[m] = grp_len(rotl1(u, w).view(np.uint8), w, int(m[6:]))
        elif m == "zipnn":
            r[m] = zipnn_len(b, w)
    if base is None:
        for m in methods:
            if m in r:
                continue
            if m == "zipnn_d":
                r[m] = r["zipnn"] if "zipnn" in r else zipnn_len(b, w)
            else:
                L = int(m[-1])
                r[m] = grp(L)
        return r
    ub = as_uint(base, w)
    x = u ^ ub
    xb = x.view(np.uint8)
    for m in methods:
        if m in r:
            continue
        if m.startswith("xorraw"):
            r[m] = zlen(xb, int(m[6:]))
        elif m.startswith("xorrot"):
            r[m] = grp_len(rotl1(x, w).view(np.uint8), w, int(m[6:]))
        elif m.startswith("xor"):
            L = int(m[3:])
            cache[("xor", L)] = r[m] = grp_len(xb, w, L)
        elif m.startswith("sub"):
            r[m] = grp_len((u - ub).view(np.uint8), w, int(m[3:]))
        elif m.startswith("bitx"):
            e, s = bitx_split(x, w)
            L = int(m[4:])
            r[m] = zlen(e, L) + zlen(s, L)
        elif m == "zipnn_d":
            r[m] = zipnn_len(b, w, base)
    for m in methods:
        if m.startswith("polbest"):
            L = m[-1]
            r[m] = min(r.get(k + L, 1 << 62) for k in ("grp", "rotgrp", "xor", "xorrot", "sub", "bitx"))
        elif m.startswith("pol"):
            L = int(m[3:])
            xl = cache.get(("xor", L))
            if xl is None:
                xl = grp_len(xb, w, L)
            r[m] = min(grp(L), xl)
    return r


def ent_add(ent, kind, w, b):
    g = group(b, w)
    for i in range(w):
        h = ent.setdefault((kind, w, i), np.zeros(256, np.int64))
        h += np.bincount(g[i], minlength=256)


def entropy_bits(h):
    p = h[h > 0] / h.sum()
    return float(-(p * np.log2(p)).sum())


# --------------------------------------------------------------------------
# experiment drivers
# --------------------------------------------------------------------------


def pair_job(args):
    """Process one (prev, new) checkpoint pair; return aggregated numbers."""
    prev_path, new_path, block, methods, with_ent = args
    old = load_st(prev_path) if prev_path else {}
    new = load_st(new_path)
    agg = defaultdict(lambda: defaultdict(int))  # cat -> field -> bytes
    hentropy = {}
    for cat, w, b, base in iter_blocks(new, old, block):
        a = agg[cat]
        a["raw"] += b.nbytes
        a["blocks"] += 1
        if base is not None and xxhash.xxh3_64_intdigest(b) == xxhash.xxh3_64_intdigest(base):
            a["unchanged_blocks"] += 1
            a["unchanged_bytes"] += b.nbytes
            continue
        if base is None:
            a["nobase_bytes"] += b.nbytes
        sizes = block_sizes(b, w, base, methods)
        if with_ent and base is not None:
            # per-category entropy histograms
            e2 = hentropy.setdefault(cat, {})
            u = as_uint(b, w)
            x = (u ^ as_uint(base, w))
            ent_add(e2, "raw", w, b)
            ent_add(e2, "xor", w, x.view(np.uint8))
            ent_add(e2, "xorrot", w, rotl1(x, w).view(np.uint8))
            ent_add(e2, "sub", w, (u - as_uint(base, w)).view(np.uint8))
        for m, s in sizes.items():
            a[m] += s
    return {c: dict(v) for c, v in agg.items()}, hentropy


def merge(dst, src):
    for c, v in src.items():
        d = dst.setdefault(c, defaultdict(int))
        for k, x in v.items():
            d[k] += x


def merge_ent(dst, src):
    for c, v in src.items():
        d = dst.setdefault(c, {})
        for k, h in v.items():
            if k in d:
                d[k] = d[k] + h
            else:
                d[k] = h.copy()


def run_pairs(pairs, block, methods, jobs, with_ent=False):
    jobs_args = [(p, n, block, methods, with_ent) for p, n in pairs]
    tot, ent = {}, {}
    if jobs > 1:
        with Pool(jobs) as pool:
            results = pool.map(pair_job, jobs_args, chunksize=1)
    else:
        results = [pair_job(a) for a in jobs_args]
    for r, e in results:
        merge(tot, r)
        merge_ent(ent, e)
    return tot, ent


def frac(a, m):
    return a.get(m, 0) / a["raw"] if a.get("raw") else float("nan")


def all_cats(tot):
    a = defaultdict(int)
    for c in CATS:
        for k, v in tot.get(c, {}).items():
            a[k] += v
    return a


def torch_save_size(path):
    """Size of torch.save of the flattened tensor dict of one trace file."""
    import io

    import torch
    from safetensors.torch import load_file
    buf = io.BytesIO()
    torch.save(load_file(path), buf)
    return buf.getbuffer().nbytes


# ----- timing -------------------------------------------------------------


def enc_dec_funcs(method, level):
    """Return (encode(b, base, w) -> payload, decode(payload, base, w) -> u8 array)."""
    C = zstandard.ZstdCompressor(level=level)
    D = zstandard.ZstdDecompressor()

    def zframes(arrs):
        out = []
        for a in arrs:
            c = C.compress(a)
            out.append((True, c) if len(c) < a.nbytes else (False, a.tobytes()))
        return out

    def unframes(frames):
        return [np.frombuffer(D.decompress(c) if z else c, np.uint8) for z, c in frames]

    if method == "zstd":
        return (lambda b, base, w: C.compress(b),
                lambda p, base, w: np.frombuffer(D.decompress(p), np.uint8))
    if method == "grp":
        def enc(b, base, w):
            g = group(b, w)
            return zframes([g[i] for i in range(w)])

        def dec(p, base, w):
            return ungroup(np.stack(unframes(p)), w)
        return enc, dec
    if method in ("xor", "xorrot", "sub"):
        def enc(b, base, w):
            u, ub = as_uint(b, w), as_uint(base, w)
            if method == "sub":
                x = u - ub
            else:
                x = u ^ ub
                if method == "xorrot":
                    x = rotl1(x, w)
            g = group(x.view(np.uint8), w)
            return zframes([g[i] for i in range(w)])

        def dec(p, base, w):
            x = as_uint(ungroup(np.stack(unframes(p)), w), w)
            ub = as_uint(base, w)
            if method == "sub":
                return (x + ub).view(np.uint8)
            if method == "xorrot":
                x = rotr1(x, w)
            return (x ^ ub).view(np.uint8)
        return enc, dec
    if method == "bitx":
        def enc(b, base, w):
            x = as_uint(b, w) ^ as_uint(base, w)
            return zframes(list(bitx_split(x, w)))

        def dec(p, base, w):
            e, s = unframes(p)
            return (bitx_join(e, s, w) ^ as_uint(base, w)).view(np.uint8)
        return enc, dec
    if method in ("zipnn", "zipnn_d"):
        import zipnn
        zs = {}

        def get(w):
            if w not in zs:
                kw = dict(input_format="byte", bytearray_dtype="float32" if w == 4 else "bfloat16",
                          threads=1)
                if method == "zipnn_d":
                    kw["delta_compressed_type"] = "byte"
                zs[w] = zipnn.ZipNN(**kw)
            return zs[w]

        def enc(b, base, w):
            if method == "zipnn":
                return bytes(get(w).compress(bytearray(b.tobytes())))
            return bytes(get(w).compress(bytearray(b.tobytes()), delta_second_data=bytearray(base.tobytes())))

        def dec(p, base, w):
            if method == "zipnn":
                return np.frombuffer(bytes(get(w).decompress(bytearray(p))), np.uint8)
            return np.frombuffer(bytes(get(w).decompress(bytearray(p), delta_second_data=bytearray(base.tobytes()))),
                                 np.uint8)
        return enc, dec
    raise ValueError(method)


def pick_keys(new, old, max_bytes):
    """Deterministic tensor subset (same for every block size) of about max_bytes."""
    keys = [k for k, (dt, b) in sorted(new.items())
            if category(k) != "other" and dt in WIDTH and k in old and len(old[k][1]) == len(b)]
    if not max_bytes:
        return set(keys)
    tot = sum(new[k][1].nbytes for k in keys)
    if tot <= max_bytes:
        return set(keys)
    stride = tot / max_bytes
    return set(k for i, k in enumerate(keys) if int(i / stride) != int((i - 1) / stride) or i == 0)


def time_method(new, old, block, method, level, keys=None, repeat=3):
    """Single-thread encode/decode MiB/s (best of `repeat`) over changed blocks; stored/raw over all blocks."""
    enc, dec = enc_dec_funcs(method, level)
    if keys is not None:
        new = {k: v for k, v in new.items() if k in keys}
    work = []
    raw_all = 0
    for _cat, w, b, base in iter_blocks(new, old, block):
        if base is None:
            continue
        raw_all += b.nbytes
        if xxhash.xxh3_64_intdigest(b) == xxhash.xxh3_64_intdigest(base):
            continue
        work.append((w, np.ascontiguousarray(b), np.ascontiguousarray(base)))
    raw = sum(x[1].nbytes for x in work)
    te = td = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        payloads = [enc(b, base, w) for w, b, base in work]
        t1 = time.perf_counter()
        outs = [dec(p, base, w) for p, (w, b, base) in zip(payloads, work)]
        t2 = time.perf_counter()
        te, td = min(te, t1 - t0), min(td, t2 - t1)
    for o, (w, b, base) in zip(outs, work):
        if not np.array_equal(o, b):
            raise AssertionError(f"round trip failed for {method}")
    stored = 0
    for p in payloads:
        if isinstance(p, list):
            stored += sum(len(c) for _, c in p)
        else:
            stored += len(p)
    return dict(raw=raw_all, changed=raw, stored=stored, enc=raw / MiB / te, dec=raw / MiB / td)


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------


def pct(x):
    return "n/a" if x != x else f"{100 * x:.1f}%"


def table(headers, rows):
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--traces", default="benchmarks/.cache/traces")
    ap.add_argument("--out", default="docs/codec-experiments.md")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--late-every", type=int, default=10,
                    help="for the late phase of the 300-step fp32_wd0 trace at 10-step interval, "
                         "only use pairs ending at multiples of this (10 = all)")
    ap.add_argument("--timing-bytes", type=int, default=0, help="0 = whole pair")
    ap.add_argument("--json", default="benchmarks/.cache/codec_experiments.json")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: ratio,block,timing")
    a = ap.parse_args(argv)
    skip = set(x for x in a.skip.split(",") if x)
    T = a.traces
    t_all = time.perf_counter()
    results = {}
    md = []
    cmd = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])

    scen = [s for s in ("fp32_wd0", "fp32_wd001", "partial", "bf16") if os.path.isdir(os.path.join(T, s))]

    # ---------- trace summary + torch.save sizes
    summary_rows = []
    tsave = {}
    for s in scen:
        tr = list_trace(os.path.join(T, s))
        last = tr[-1][1]
        with open(last, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            json.loads(json.loads(f.read(n))["__metadata__"]["deltackpt_trace"])
        st = load_st(last)
        by = defaultdict(int)
        for k, (_dt, b) in st.items():
            by[category(k)] += b.nbytes
        tsave[s] = torch_save_size(last)
        raw_all = sum(by.values())
        losses = []
        for _step, p in tr:
            with open(p, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                m = json.loads(json.loads(f.read(n))["__metadata__"]["deltackpt_trace"])
            losses.append(m["loss"])
        summary_rows.append([s, len(tr), f"{tr[0][0]}..{tr[-1][0]}", f"{by['weights'] / MiB:.1f}",
                             f"{by['exp_avg'] / MiB:.1f}", f"{by['exp_avg_sq'] / MiB:.1f}",
                             f"{by['other'] / KiB:.1f} KiB", f"{raw_all / MiB:.1f}", f"{tsave[s] / MiB:.1f}",
                             f"{losses[1]:.3f} -> {losses[-1]:.3f}"])
        results.setdefault("summary", {})[s] = dict(bytes=dict(by), torch_save=tsave[s], losses=losses)

    # ---------- ratio sweep at 1 MiB
    BLOCK = 1 * MiB
    configs = []  # (label, scenario, interval, phase, pairs)

    def pairs_of(s, every, lo, hi, sub=None):
        tr = list_trace(os.path.join(T, s), every)
        ps = []
        for (_s0, p0), (s1, p1) in zip(tr, tr[1:]):
            if lo < s1 <= hi and (sub is None or s1 % sub == 0):
                ps.append((p0, p1))
        return ps

    configs.append(("fp32_wd0", 10, "early (<=60)", pairs_of("fp32_wd0", 10, 0, 60)))
    late_sub = a.late_every if a.late_every > 10 else None
    configs.append(("fp32_wd0", 10, "late (>60)" + (f", pairs ending at multiples of {a.late_every}" if late_sub else ""),
                    pairs_of("fp32_wd0", 10, 60, 10 ** 9, late_sub)))
    configs.append(("fp32_wd0", 100, "0->100 (early)", pairs_of("fp32_wd0", 100, 0, 100)))
    configs.append(("fp32_wd0", 100, "100->300 (late)", pairs_of("fp32_wd0", 100, 100, 300)))
    for s in ("fp32_wd001", "partial", "bf16"):
        if s in scen:
            configs.append((s, 10, "early (<=60)", pairs_of(s, 10, 0, 60)))
            configs.append((s, 10, "late (>60)", pairs_of(s, 10, 60, 10 ** 9)))
    configs = [c for c in configs if c[0] in scen and c[3]]

    ratio = {}
    ent_all = {}
    if "ratio" not in skip:
        for s, iv, ph, ps in configs:
            t0 = time.perf_counter()
            tot, ent = run_pairs(ps, BLOCK, FULL_METHODS, a.jobs, with_ent=True)
            ratio[(s, iv, ph)] = tot
            merge_ent(ent_all.setdefault((s, iv, "early" if "early" in ph or ph.startswith("0->") else "late"), {}), ent)
            print(f"ratio {s} every {iv} {ph}: {len(ps)} pairs {time.perf_counter() - t0:.0f}s", flush=True)
        results["ratio"] = {f"{k[0]}|{k[1]}|{k[2]}": {c: dict(v) for c, v in tot.items()} for k, tot in ratio.items()}

    # ---------- block size sweep
    bsweep = {}
    BS_METHODS = ["zstd1", "grp1", "grp3", "xor1", "xor3", "pol3", "zipnn"]
    if "block" not in skip:
        bs_cfgs = [("fp32_wd0", 10, "late", pairs_of("fp32_wd0", 10, 60, 10 ** 9, 50)),
                   ("fp32_wd0", 100, "all", pairs_of("fp32_wd0", 100, 0, 300))]
        for s in ("partial", "bf16"):
            if s in scen:
                bs_cfgs.append((s, 10, "late", pairs_of(s, 10, 60, 10 ** 9, 20)))
        for s, iv, ph, ps in bs_cfgs:
            for bsz in (256 * KiB, 1 * MiB, 4 * MiB):
                t0 = time.perf_counter()
                tot, _ = run_pairs(ps, bsz, BS_METHODS, a.jobs)
                bsweep[(s, iv, ph, bsz)] = (tot, len(ps))
                print(f"block {s} {iv} {ph} {bsz // KiB}KiB: {time.perf_counter() - t0:.0f}s", flush=True)
        results["block"] = {f"{k[0]}|{k[1]}|{k[2]}|{k[3]}": {c: dict(v) for c, v in t.items()}
                            for k, (t, n) in bsweep.items()}

    # ---------- timing (single process, single thread)
    timing = []
    lvl_sweep = []
    if "timing" not in skip:
        tr = dict(list_trace(os.path.join(T, "fp32_wd0")))
        s_new = 160 if 160 in tr else sorted(tr)[len(tr) // 2]
        new, old = load_st(tr[s_new]), load_st(tr[s_new - 10])
        keys = pick_keys(new, old, a.timing_bytes)
        for m, L in [("zstd", 1), ("zstd", 3), ("grp", 1), ("grp", 3), ("xor", 1), ("xor", 3),
                     ("xorrot", 3), ("sub", 3), ("bitx", 3), ("zipnn", 0), ("zipnn_d", 0)]:
            r = time_method(new, old, MiB, m, L, keys)
            timing.append(("fp32", m, L, r))
            print(f"timing fp32 {m}{L}: {r}", flush=True)
        hb = [b for k, (dt, b) in new.items() if k in keys]
        th = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for b in hb:
                for off in range(0, len(b), MiB):
                    xxhash.xxh3_64_intdigest(b[off:off + MiB])
            th = min(th, time.perf_counter() - t0)
        hash_mibs = sum(b.nbytes for b in hb) / MiB / th
        results["xxh3_mibs"] = hash_mibs
        print(f"xxh3_64 {hash_mibs:.0f} MiB/s", flush=True)
        for m in ("grp", "xor"):
            for L in (1, 3, 5):
                for bsz in (256 * KiB, MiB, 4 * MiB):
                    r = time_method(new, old, bsz, m, L, keys)
                    lvl_sweep.append((m, L, bsz, r))
                    print(f"level sweep {m} L{L} {bsz // KiB}KiB: {r}", flush=True)
        if "bf16" in scen:
            trb = dict(list_trace(os.path.join(T, "bf16")))
            sb = 80 if 80 in trb else sorted(trb)[-1]
            newb, oldb = load_st(trb[sb]), load_st(trb[sb - 10])
            keysb = pick_keys(newb, oldb, a.timing_bytes)
            for m, L in [("grp", 1), ("grp", 3), ("xor", 1), ("xor", 3), ("bitx", 3), ("zipnn", 0), ("zipnn_d", 0)]:
                r = time_method(newb, oldb, MiB, m, L, keysb)
                timing.append(("bf16", m, L, r))
                print(f"timing bf16 {m}{L}: {r}", flush=True)
        results["timing"] = [dict(dtype=d, method=m, level=L, **r) for d, m, L, r in timing]
        results["level_sweep"] = [dict(method=m, level=L, block=b, **r) for m, L, b, r in lvl_sweep]

    os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(results, f, indent=1, default=str)

    # ---------- markdown
    md.append("# Codec experiments on real MiniLM fine-tuning checkpoints\n")
    md.append("Generated by `benchmarks/codec_experiments.py` (pure numpy / zstandard / xxhash / zipnn; "
              "does not use deltackpt). Traces by `benchmarks/minilm_trace.py`.\n")
    md.append("Commands:\n\n```\n"
              "python benchmarks/minilm_trace.py --scenario fp32_wd0   --steps 300 --save-every 10 --out benchmarks/.cache/traces/fp32_wd0\n"
              "python benchmarks/minilm_trace.py --scenario partial    --steps 100 --save-every 10 --out benchmarks/.cache/traces/partial\n"
              "python benchmarks/minilm_trace.py --scenario bf16       --steps 100 --save-every 10 --out benchmarks/.cache/traces/bf16\n"
              "python benchmarks/minilm_trace.py --scenario fp32_wd001 --steps 100 --save-every 10 --out benchmarks/.cache/traces/fp32_wd001\n"
              f"{cmd}\n```\n")
    md.append(f"Total experiment wall time: {time.perf_counter() - t_all:.0f} s.\n")
    md.append("## Traces\n")
    md.append(table(["scenario", "saves", "steps", "weights MiB", "exp_avg MiB", "exp_avg_sq MiB", "other",
                     "raw total MiB", "torch.save MiB", "loss (first save -> last)"], summary_rows))
    md.append("\n`other` = optimizer `step` scalars + torch RNG state; excluded below. "
              "Step 0 has no optimizer state yet.\n")

    md.append("## Method legend\n")
    md.append("```\n" + __doc__.split("Methods (suffix = zstd level):\n")[1].split("\nUsage:")[0] + "\n```\n")
    md.append("All numbers are stored bytes / raw bytes of the *new* checkpoint's float tensors (lower is better), "
              "summed over all pairs of the configuration. Unchanged blocks (same xxh3_64 as the previous "
              "checkpoint's same block) cost 0 in every method; `changed` is the fraction of raw bytes in "
              "changed blocks (what plain dedup would store). Frame headers are included; block index/metadata "
              "is not.\n")

    if ratio:
        md.append("## Ratios at 1 MiB blocks (all float tensors)\n")
        show = ["zstd1", "zstd3", "grp1", "grp3", "rotgrp3", "xorraw3", "xor1", "xor3", "xorrot3", "sub1", "sub3",
                "bitx3", "pol1", "pol3", "polbest1", "polbest3", "zipnn", "zipnn_d"]
        rows = []
        for (s, iv, ph), tot in ratio.items():
            A = all_cats(tot)
            n_pairs = len([c for c in configs if c[:3] == (s, iv, ph)][0][3])
            rows.append([s, iv, ph, n_pairs, pct(1 - A["unchanged_bytes"] / A["raw"])] + [pct(frac(A, m)) for m in show])
        md.append(table(["scenario", "interval", "phase", "pairs", "changed"] + show, rows))
        md.append("\nRelative to torch.save: every *new* checkpoint of a pair has the same torch.save size "
                  "(it includes the tiny `other` tensors), so stored / (pairs x torch.save size):\n")
        rows = []
        for (s, iv, ph), tot in ratio.items():
            A = all_cats(tot)
            n_pairs = len([c for c in configs if c[:3] == (s, iv, ph)][0][3])
            den = tsave[s] * n_pairs
            rows.append([s, iv, ph, f"{A['raw'] / den:.4f}"] + [pct(A[m] / den) for m in ("zstd3", "grp3", "xor3", "pol3", "polbest3", "zipnn_d")])
        md.append(table(["scenario", "interval", "phase", "raw float / torch.save", "zstd3", "grp3", "xor3", "pol3", "polbest3", "zipnn_d"], rows))
        md.append("")

        md.append("### Split by tensor kind (1 MiB blocks)\n")
        show2 = ["zstd3", "grp1", "grp3", "rotgrp3", "xor1", "xor3", "xorrot3", "sub1", "sub3", "bitx3", "pol1",
                 "polbest1", "polbest3", "zipnn", "zipnn_d"]
        rows = []
        for (s, iv, ph), tot in ratio.items():
            for c in CATS:
                if c not in tot:
                    continue
                A = tot[c]
                rows.append([s, iv, ph, c, f"{A['raw'] / MiB:.0f}",
                             pct(1 - A.get("unchanged_bytes", 0) / A["raw"])] + [pct(frac(A, m)) for m in show2])
        md.append(table(["scenario", "interval", "phase", "kind", "raw MiB", "changed"] + show2, rows))
        md.append("")

        md.append("### Order-0 entropy of byte groups of changed blocks (bits/byte), delta streams vs raw\n")
        md.append("Byte 0 = least significant. For fp32 after `rotl1`, byte 3 holds the 8 exponent bits exactly and "
                  "bit 0 the sign. `floor` = mean entropy / 8 = what an ideal order-0 coder per group would reach "
                  "(zstd can beat it on long zero runs, so it is a guide, not a hard bound).\n")
        rows = []
        for (s, iv, ph), e in ent_all.items():
            for c in CATS:
                if c not in e:
                    continue
                for kind in ("raw", "xor", "xorrot", "sub"):
                    hs = sorted(((k[2], entropy_bits(h)) for k, h in e[c].items() if k[0] == kind))
                    if not hs:
                        continue
                    ws = [f"{v:.2f}" for _, v in hs]
                    rows.append([s, iv, ph, c, kind, " / ".join(ws), pct(sum(v for _, v in hs) / (8 * len(hs)))])
        md.append(table(["scenario", "interval", "phase", "kind", "stream", "H per byte group (b0 / b1 / ...)",
                         "floor"], rows))
        md.append("")

    if bsweep:
        md.append("## Block size sweep\n")
        rows = []
        for (s, iv, ph, bsz), (tot, n) in bsweep.items():
            A = all_cats(tot)
            if not A["raw"]:
                continue  # a trace too short for this interval and phase: no pairs
            rows.append([s, iv, ph, n, f"{bsz // KiB} KiB", A["blocks"], pct(1 - A["unchanged_bytes"] / A["raw"])]
                        + [pct(frac(A, m)) for m in BS_METHODS])
        md.append(table(["scenario", "interval", "phase", "pairs", "block", "blocks", "changed"] + BS_METHODS, rows))
        md.append("")

    if timing:
        md.append("## Throughput (single thread, 1 MiB blocks, changed blocks only, best of 3)\n")
        md.append(f"fp32: fp32_wd0 pair step {s_new - 10}->{s_new}; bf16: bf16 pair step {sb - 10}->{sb} "
                  + ("(all float tensors). " if not a.timing_bytes else f"(a fixed ~{a.timing_bytes // MiB} MiB subset of tensors). ")
                  + "stored/raw counts unchanged blocks as 0; MiB/s = raw MiB of changed blocks per "
                  "second; decode includes un-grouping and re-applying the delta to the base block, and every "
                  "decode is verified bit-exact. Best of 3 runs; numpy + python-zstandard driven from Python, "
                  "so the numpy transforms (grouping, XOR, rotation) are a big share of the cost. The machine "
                  "has 2 cores that other work may share: treat absolute numbers as +-20 %.\n")
        rows = [[d, m + (str(L) if L else ""), pct(r["changed"] / r["raw"]), pct(r["stored"] / r["raw"]), f"{r['enc']:.0f}", f"{r['dec']:.0f}"]
                for d, m, L, r in timing]
        md.append(table(["dtype", "method", "changed", "stored/raw", "encode MiB/s", "decode MiB/s"], rows))
        md.append(f"\nxxh3_64 over 1 MiB blocks of the same fp32 pair: {results['xxh3_mibs']:.0f} MiB/s. "
                  "A per-block min(standalone, delta) policy costs the sum of both encoders' time.\n")
        md.append("\n### zstd level x block size (fp32, same pair)\n")
        rows = [[m, L, f"{b // KiB} KiB", pct(r["changed"] / r["raw"]), pct(r["stored"] / r["raw"]), f"{r['enc']:.0f}", f"{r['dec']:.0f}"]
                for m, L, b, r in lvl_sweep]
        md.append(table(["method", "level", "block", "changed", "stored/raw", "encode MiB/s", "decode MiB/s"], rows))
        md.append("")

    # The conclusions are written by hand; keep an existing section when regenerating.
    marker = "## Conclusions / recommended defaults"
    concl = marker + "\n\n_TO BE FILLED IN BY HAND FROM THE TABLES ABOVE._\n"
    if os.path.exists(a.out):
        with open(a.out) as f:
            old_md = f.read()
        if marker in old_md:
            concl = old_md[old_md.index(marker):]
    md.append(concl)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        f.write("\n".join(md))
    print(f"wrote {a.out} in {time.perf_counter() - t_all:.0f}s")


if __name__ == "__main__":
    main()
