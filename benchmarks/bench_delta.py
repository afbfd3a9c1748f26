"""Delta policies on real fine-tuning traces: bytes per incremental checkpoint, save and
restore time, each as a ratio to torch.save / torch.load of the same state in the same run.

Usage (traces from benchmarks/minilm_trace.py):

    python benchmarks/bench_delta.py --trace benchmarks/.cache/traces/fp32_wd0 \
        --every 10 --configs none,xor:chain:4,xor:keyframe:8 [--max-steps 300] [--json out.json]

For every saved step of the trace: torch.save (+ fsync) to a scratch file, then each
configuration's store.save (fsync on, the default), interleaved so that all see the same
machine state. Afterwards: load of the latest step and of a random older step per store,
beside torch.load of the same step, and of each store's worst step to restore (the older step
whose new blocks have the deepest delta chains on average). Medians of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deltackpt  # noqa: E402


def category(path: str) -> str:
    if path.startswith("model/"):
        return "weights"
    if path.endswith("exp_avg_sq"):
        return "exp_avg_sq"
    if path.endswith("exp_avg"):
        return "exp_avg"
    return "other"


def trace_files(trace: str, every: int, max_steps: int | None) -> list[tuple[int, str]]:
    out = []
    for f in sorted(glob.glob(os.path.join(trace, "step_*.safetensors"))):
        step = int(re.search(r"step_(\d+)", f).group(1))
        if step % every == 0 and (max_steps is None or step <= max_steps):
            out.append((step, f))
    return out


def nest(flat: dict[str, torch.Tensor]) -> dict:
    """Flat 'a/b/c' keys back into nested dicts (int-looking keys become ints)."""
    root: dict = {}
    for k, v in flat.items():
        parts = k.split("/")
        d = root
        for p in parts[:-1]:
            key = int(p) if p.isdigit() else p
            d = d.setdefault(key, {})
        last = parts[-1]
        d[int(last) if last.isdigit() else last] = v
    return root


def fsync_save(obj, path: str) -> float:
    t = time.perf_counter()
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t


def written_by_category(store: deltackpt.Store, step: int) -> dict[str, int]:
    idx = store._index
    rows = idx.query("SELECT id, length FROM blocks WHERE first_step=?", (step,))
    new = dict(rows)
    out: dict[str, int] = {}
    for path, blob in idx.query("SELECT path, blocks FROM entries WHERE step=?", (step,)):
        for i in range(0, len(blob), 16):
            bid = blob[i:i + 16]
            if bid in new:
                out[category(path)] = out.get(category(path), 0) + new.pop(bid)
    return out


def peer_bytes(state: dict[str, torch.Tensor], prev: dict[str, torch.Tensor] | None,
               block: int = 1 << 20) -> tuple[dict[str, int], dict[str, float]]:
    """Bytes and seconds of the peers on the same blocks: zipnn standalone, zipnn's
    delta mode (XOR against the previous checkpoint's block: an unbounded chain, the
    best case for it) and plain zstd-3. Unchanged blocks cost 0 for everyone (dedup)."""
    from codec_experiments import zipnn_len, zlen

    sizes = {"zipnn": 0, "zipnn_delta": 0, "zstd3": 0}
    secs = {"zipnn": 0.0, "zipnn_delta": 0.0, "zstd3": 0.0}
    for k, t in state.items():
        raw = t.reshape(-1).contiguous().view(torch.uint8).numpy()
        base_t = prev.get(k) if prev is not None else None
        base = (base_t.reshape(-1).contiguous().view(torch.uint8).numpy()
                if base_t is not None and base_t.shape == t.shape and base_t.dtype == t.dtype
                else None)
        w = t.element_size() if t.dtype in (torch.float32, torch.bfloat16) else None
        for off in range(0, raw.size, block):
            b = raw[off:off + block]
            bb = base[off:off + block] if base is not None else None
            if bb is not None and bytes(b) == bytes(bb):
                continue
            t0 = time.perf_counter()
            z = zlen(b, 3)
            sizes["zstd3"] += z
            t1 = time.perf_counter()
            if w is None:  # zipnn handles float32/bfloat16 only: the rest is zstd-3 for all
                sizes["zipnn"] += z
                sizes["zipnn_delta"] += z
                continue
            sizes["zipnn"] += zipnn_len(b, w)
            t2 = time.perf_counter()
            sizes["zipnn_delta"] += zipnn_len(b, w, bb) if bb is not None else zipnn_len(b, w)
            t3 = time.perf_counter()
            secs["zstd3"] += t1 - t0
            secs["zipnn"] += t2 - t1
            secs["zipnn_delta"] += t3 - t2
    return sizes, secs


def deepest_step(store: deltackpt.Store, steps: list[int]) -> int:
    """Among ``steps``, the one whose newly written blocks sit deepest in delta chains
    (a chain policy's last step before a keyframe): the slowest to restore."""
    depth = dict(store._index.query(
        "SELECT first_step, AVG(depth) FROM blocks GROUP BY first_step"))
    return max(steps, key=lambda s: (depth.get(s, 0.0), -s))


def timed_load(store: deltackpt.Store, step: int, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        store.load(step)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def timed_torch_load(path: str, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        torch.load(path, weights_only=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", required=True)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--min-step", type=int, default=0)
    ap.add_argument("--configs", default="none,xor:chain:8,xor:keyframe:8")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--peers", action="store_true",
                    help="also measure zipnn, zipnn's delta mode and zstd-3 on the same blocks")
    ap.add_argument("--workdir", default=None, help="scratch dir (same disk as the stores)")
    ap.add_argument("--load-all", action="store_true",
                    help="time the restore of every step (mean and slowest), not only the "
                         "latest, one older and the deepest; torch.load is re-timed between "
                         "stores and the median of all its timings is the reference")
    args = ap.parse_args()
    torch.set_num_threads(1)
    files = [(s, f) for s, f in trace_files(args.trace, args.every, args.max_steps)
             if s >= args.min_step]
    configs = args.configs.split(",")
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="bench_delta_", dir=args.workdir)
    stores = {c: deltackpt.open(os.path.join(work, c.replace(":", "_")), delta=c,
                                threads=args.threads) for c in configs}
    rows = {c: [] for c in configs}
    torch_rows = []
    peer_rows: list[dict] = []
    prev_flat = None
    last_pt = None
    try:
        for step, f in files:
            flat = load_file(f)
            if args.peers:
                psizes, psecs = peer_bytes(flat, prev_flat)
                peer_rows.append({"step": step, "bytes": psizes, "seconds": psecs})
            prev_flat = flat
            state = nest(flat)
            pt = os.path.join(work, f"step_{step}.pt")
            t_torch = fsync_save(state, pt)
            size = os.path.getsize(pt)
            torch_rows.append({"step": step, "seconds": t_torch, "bytes": size})
            if last_pt and os.path.exists(last_pt):
                os.unlink(last_pt)
            last_pt = pt
            for c in configs:
                t = time.perf_counter()
                r = stores[c].save(state, step=step)
                dt = time.perf_counter() - t
                rows[c].append({"step": step, "seconds": dt, "written": r.written_bytes,
                                "by_category": written_by_category(stores[c], step),
                                "torch_bytes": size, "torch_seconds": t_torch})
            del state
            print(f"step {step}: torch.save {size / 1e6:.1f} MB {t_torch:.2f}s | " + " | ".join(
                f"{c} {rows[c][-1]['written'] / size:.3f} {rows[c][-1]['seconds'] / t_torch:.2f}x"
                for c in configs), flush=True)
        latest = files[-1][0]
        rng = random.Random(0)
        old = rng.choice([s for s, _ in files[1:-1]]) if len(files) > 2 else files[0][0]
        t_tl = timed_torch_load(last_pt, args.repeat)
        tl_times = [t_tl]
        results = {}
        for c in configs:
            incr = rows[c][1:] if len(rows[c]) > 1 else rows[c]
            frac = [r["written"] / r["torch_bytes"] for r in incr]
            tsave = [r["seconds"] / r["torch_seconds"] for r in incr]
            cats: dict[str, float] = {}
            for r in incr:
                for k, v in r["by_category"].items():
                    cats[k] = cats.get(k, 0) + v / r["torch_bytes"] / len(incr)
            every: dict[int, float] = {}
            if args.load_all:
                tl_times.append(timed_torch_load(last_pt, args.repeat))
                every = {s: timed_load(stores[c], s, args.repeat) for s, _ in files}
                worst = max(every, key=every.__getitem__)
                t_latest, t_old, t_worst = every[latest], every[old], every[worst]
            else:
                t_latest = timed_load(stores[c], latest, args.repeat)
                t_old = timed_load(stores[c], old, args.repeat)
                worst = deepest_step(stores[c], [s for s, _ in files[:-1]] or [latest])
                t_worst = timed_load(stores[c], worst, args.repeat)
            total = stores[c].stored_bytes()
            full = sum(r["bytes"] for r in torch_rows)
            results[c] = {
                "incremental_fraction_mean": statistics.mean(frac),
                "incremental_fraction_median": statistics.median(frac),
                "by_category": cats,
                "save_ratio_median": statistics.median(tsave),
                "load_latest_ratio": t_latest / t_tl,
                "load_old_ratio": t_old / t_tl,
                "old_step": old,
                "load_worst_ratio": t_worst / t_tl,
                "worst_step": worst,
                "total_fraction": total / full,
                "save_ratio_max": max(tsave),
                "load_seconds_every_step": every,
            }
        if args.load_all:
            # one reference for every store: torch.load drifts with the machine's state
            t_tl = statistics.median(tl_times)
            for c, r in results.items():
                every = r["load_seconds_every_step"]
                r["load_latest_ratio"] = every[latest] / t_tl
                r["load_old_ratio"] = every[old] / t_tl
                r["load_worst_ratio"] = every[r["worst_step"]] / t_tl
                r["load_mean_ratio"] = statistics.mean(every.values()) / t_tl
        print(f"\ntrace {args.trace}, every {args.every}, steps {files[0][0]}..{latest}, "
              f"torch.save {torch_rows[-1]['bytes'] / 1e6:.1f} MB, torch.load {t_tl:.3f}s")
        print("| config | bytes/incr. ckpt (× torch.save) | weights | exp_avg | exp_avg_sq | "
              "total vs full copies | save time × | load latest × | load old × | "
              "load worst × (step) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for c, r in results.items():
            cat = r["by_category"]
            print(f"| {c} | {r['incremental_fraction_mean']:.3f} | {cat.get('weights', 0):.3f} | "
                  f"{cat.get('exp_avg', 0):.3f} | {cat.get('exp_avg_sq', 0):.3f} | "
                  f"{r['total_fraction']:.3f} | {r['save_ratio_median']:.2f} | "
                  f"{r['load_latest_ratio']:.2f} | {r['load_old_ratio']:.2f} | "
                  f"{r['load_worst_ratio']:.2f} ({r['worst_step']}) |")
        if args.load_all:
            print("\n| config | save max × | load mean × (every step) | load max × (step) |")
            print("|---|---|---|---|")
            for c, r in results.items():
                print(f"| {c} | {r['save_ratio_max']:.2f} | {r['load_mean_ratio']:.2f} | "
                      f"{r['load_worst_ratio']:.2f} ({r['worst_step']}) |")
        peers = {}
        if peer_rows:
            by_step = {r["step"]: r["bytes"] for r in torch_rows}
            incr = peer_rows[1:] if len(peer_rows) > 1 else peer_rows
            for name in ("zstd3", "zipnn", "zipnn_delta"):
                frac = [r["bytes"][name] / by_step[r["step"]] for r in incr]
                tsave = [r["seconds"][name] for r in incr]
                peers[name] = {"incremental_fraction_mean": statistics.mean(frac),
                               "compress_seconds_median": statistics.median(tsave)}
                print(f"| peer {name} (same blocks, 1 thread) | {statistics.mean(frac):.3f} | | | | "
                      f"| codec {statistics.median(tsave):.2f}s/ckpt | | |")
            zd = peers["zipnn_delta"]["incremental_fraction_mean"]
            for c, r in results.items():
                print(f"{c}: {r['incremental_fraction_mean'] / zd:.3f}x zipnn-delta's bytes")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "torch": torch_rows, "torch_load_seconds": t_tl,
                           "rows": rows,
                           "results": results, "peers": peers, "peer_rows": peer_rows},
                          f, indent=1)
    finally:
        for s in stores.values():
            s.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
