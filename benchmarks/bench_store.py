"""The core store against torch.save/torch.load and safetensors save_file/load_file.

Same state, same run, same disk, fsync counted for everyone; medians of ``--repeat``
runs; results as ratios (machines here are noisy: absolute times mean little).

    python benchmarks/bench_store.py --json docs/bench_store.json          # everything
    python benchmarks/bench_store.py --only trace --only gpt2              # a subset

Workloads:

- ``trace``: the real MiniLM fine-tuning trace (benchmarks/minilm_trace.py; full training
  state every 10 steps), fp32 and bf16: first-save bytes and time, incremental saves,
  load of the latest step, each beside torch.save/safetensors of the same state.
- ``gpt2``: a synthetic GPT-2-small-shaped training state (124M params + AdamW moments,
  1.5 GB) where a controlled fraction of the tensors is frozen between two saves:
  first save, 100% / 50% / 0% of tensors changed.
- ``rss``: peak RSS of save and load in fresh processes (a sampler thread reads
  /proc/self/statm every 2 ms), beside the state size.
- ``index``: a synthetic index of 1,000 steps of a 7B-parameter state with Adam:
  index size, ``log`` time and load planning time (SQL + locating every block).

Every store uses the defaults (1 MiB blocks, zstd level 1, fsync on) unless the row
says otherwise; ``delta=none`` rows show the store before delta encoding (issue 2's
targets), ``auto`` rows the default.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from bench_delta import fsync_save, trace_files  # noqa: E402

import deltackpt  # noqa: E402
from deltackpt.backend import fsync_path  # noqa: E402

TRACES = os.path.join(HERE, ".cache", "traces")
MiB = 1 << 20


# -- helpers ----------------------------------------------------------------------------
def st_save(flat: dict, path: str) -> float:
    t = time.perf_counter()
    save_file(flat, path)
    fsync_path(path)
    return time.perf_counter() - t


def timed(fn, *args, **kw) -> float:
    t = time.perf_counter()
    fn(*args, **kw)
    return time.perf_counter() - t


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def state_bytes(flat: dict) -> int:
    return sum(t.numel() * t.element_size() for t in flat.values())


def dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


def store_data_bytes(store: deltackpt.Store) -> int:
    return store.stored_bytes()


# -- workload 1: the real MiniLM trace --------------------------------------------------
def bench_trace(name: str, work: str, repeat: int, steps: int) -> dict:
    files = trace_files(os.path.join(TRACES, name), 10, None)[: steps + 1]
    if len(files) < 2:
        print(f"[trace] {name}: no trace in {TRACES}/{name}; run benchmarks/minilm_trace.py",
              file=sys.stderr)
        return {}
    out: dict = {"scenario": name, "steps": [s for s, _ in files], "configs": {}}
    pt, sf = os.path.join(work, "x.pt"), os.path.join(work, "x.safetensors")
    states = [(s, load_file(f)) for s, f in files]
    size = state_bytes(states[0][1])
    out["state_bytes"] = size
    for delta in ("none", "auto"):
        rows = []
        for rep in range(repeat):
            root = os.path.join(work, f"store-{delta}-{rep}")
            shutil.rmtree(root, ignore_errors=True)
            with deltackpt.open(root, delta=delta) as store:
                for i, (step, flat) in enumerate(states):
                    t_pt = fsync_save(flat, pt)
                    b_pt = os.path.getsize(pt)
                    t_sf = st_save(flat, sf)
                    b_sf = os.path.getsize(sf)
                    t = time.perf_counter()
                    r = store.save(flat, step=step)
                    t_ds = time.perf_counter() - t
                    if rep == 0:
                        rows.append({"step": step, "first": i == 0, "pt_bytes": b_pt,
                                     "sf_bytes": b_sf, "written": r.written_bytes,
                                     "t_pt": [t_pt], "t_sf": [t_sf], "t_ds": [t_ds]})
                    else:
                        rows[i]["t_pt"].append(t_pt)
                        rows[i]["t_sf"].append(t_sf)
                        rows[i]["t_ds"].append(t_ds)
                last = states[-1][0]
                store.load(last)  # warm the page cache for everyone
                torch.load(pt, weights_only=True)
                load_file(sf)
                t_l = [timed(store.load, last) for _ in range(3)]
                t_lo = [timed(store.load, states[len(states) // 2][0]) for _ in range(3)]
                t_tl = [timed(torch.load, pt, weights_only=True) for _ in range(3)]
                t_sl = [timed(load_file, sf) for _ in range(3)]
            if rep == 0:
                loads = {"t_load": t_l, "t_load_mid": t_lo, "t_torch_load": t_tl,
                         "t_st_load": t_sl}
            else:
                for k, v in zip(("t_load", "t_load_mid", "t_torch_load", "t_st_load"),
                                (t_l, t_lo, t_tl, t_sl)):
                    loads[k] += v
            shutil.rmtree(root, ignore_errors=True)
        first, inc = rows[0], rows[1:]
        cfg = {
            "first_bytes_vs_pt": first["written"] / first["pt_bytes"],
            "first_bytes_vs_sf": first["written"] / first["sf_bytes"],
            "first_time_vs_pt": med(first["t_ds"]) / med(first["t_pt"]),
            "first_time_vs_sf": med(first["t_ds"]) / med(first["t_sf"]),
            "inc_bytes_vs_pt": med([r["written"] / r["pt_bytes"] for r in inc]),
            "inc_time_vs_pt": med([med(r["t_ds"]) / med(r["t_pt"]) for r in inc]),
            "inc_time_vs_sf": med([med(r["t_ds"]) / med(r["t_sf"]) for r in inc]),
            "load_latest_vs_torch_load": med(loads["t_load"]) / med(loads["t_torch_load"]),
            "load_latest_vs_st_load": med(loads["t_load"]) / med(loads["t_st_load"]),
            "load_mid_vs_torch_load": med(loads["t_load_mid"]) / med(loads["t_torch_load"]),
            "abs": {"torch_save_s": med(first["t_pt"]), "st_save_s": med(first["t_sf"]),
                    "first_save_s": med(first["t_ds"]),
                    "torch_load_s": med(loads["t_torch_load"]),
                    "load_s": med(loads["t_load"])},
        }
        out["configs"][delta] = cfg
        print(f"[trace] {name} delta={delta}: " + json.dumps(
            {k: round(v, 3) for k, v in cfg.items() if isinstance(v, float)}), flush=True)
    del states
    gc.collect()
    return out


# -- workload 2: synthetic GPT-2 small ---------------------------------------------------
def gpt2_shapes() -> list[tuple[str, tuple[int, ...]]]:
    d, v, n, layers = 768, 50257, 1024, 12
    shapes = [("wte.weight", (v, d)), ("wpe.weight", (n, d))]
    for i in range(layers):
        p = f"h.{i}."
        shapes += [(p + "ln_1.weight", (d,)), (p + "ln_1.bias", (d,)),
                   (p + "attn.c_attn.weight", (d, 3 * d)), (p + "attn.c_attn.bias", (3 * d,)),
                   (p + "attn.c_proj.weight", (d, d)), (p + "attn.c_proj.bias", (d,)),
                   (p + "ln_2.weight", (d,)), (p + "ln_2.bias", (d,)),
                   (p + "mlp.c_fc.weight", (d, 4 * d)), (p + "mlp.c_fc.bias", (4 * d,)),
                   (p + "mlp.c_proj.weight", (4 * d, d)), (p + "mlp.c_proj.bias", (d,))]
    return shapes + [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]


def gpt2_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    flat: dict[str, torch.Tensor] = {}
    for i, (name, shape) in enumerate(gpt2_shapes()):
        flat[f"model/{name}"] = torch.randn(shape, generator=g) * 0.02
        flat[f"optimizer/state/{i}/exp_avg"] = torch.randn(shape, generator=g) * 1e-4
        flat[f"optimizer/state/{i}/exp_avg_sq"] = torch.rand(shape, generator=g) * 1e-7
        flat[f"optimizer/state/{i}/step"] = torch.tensor(100.0)
    return flat


def gpt2_step(flat: dict[str, torch.Tensor], changed_fraction: float, seed: int) -> dict:
    """A next training state: the first ``changed_fraction`` of the parameters (by bytes,
    with their moments) take an AdamW-like small update; the rest are frozen (identical)."""
    g = torch.Generator().manual_seed(seed)
    names = [n for n, _ in gpt2_shapes()]
    total = sum(flat[f"model/{n}"].numel() for n in names)
    out = dict(flat)
    done = 0
    for i, n in enumerate(names):
        if done >= changed_fraction * total:
            break
        w = flat[f"model/{n}"]
        done += w.numel()
        m = flat[f"optimizer/state/{i}/exp_avg"]
        v = flat[f"optimizer/state/{i}/exp_avg_sq"]
        grad = torch.randn(w.shape, generator=g) * 1e-3
        m2 = m * 0.9 + grad * 0.1
        v2 = v * 0.999 + grad * grad * 0.001
        out[f"model/{n}"] = w - 1e-4 * m2 / (v2.sqrt() + 1e-8)
        out[f"optimizer/state/{i}/exp_avg"] = m2
        out[f"optimizer/state/{i}/exp_avg_sq"] = v2
        out[f"optimizer/state/{i}/step"] = flat[f"optimizer/state/{i}/step"] + 1
    return out


def bench_gpt2(work: str, repeat: int) -> dict:
    base = gpt2_state(0)
    size = state_bytes(base)
    print(f"[gpt2] state {size / 1e9:.2f} GB, {len(base)} tensors", flush=True)
    nxt = {f: gpt2_step(base, f, 1) for f in (1.0, 0.5, 0.0)}
    pt, sf = os.path.join(work, "g.pt"), os.path.join(work, "g.safetensors")
    res: dict = {"state_bytes": size, "rows": {}}
    for delta in ("none", "auto"):
        for label, state in [("first", None), ("changed 100%", nxt[1.0]),
                             ("changed 50%", nxt[0.5]), ("changed 0%", nxt[0.0])]:
            t_pt, t_sf, t_ds, written = [], [], [], 0
            target = base if state is None else state
            for _ in range(repeat):
                root = os.path.join(work, "gstore")
                shutil.rmtree(root, ignore_errors=True)
                with deltackpt.open(root, delta=delta) as store:
                    if state is not None:
                        store.save(base, step=0)
                    gc.collect()
                    t_pt.append(fsync_save(target, pt))
                    b_pt = os.path.getsize(pt)
                    t_sf.append(st_save(target, sf))
                    t = time.perf_counter()
                    r = store.save(target, step=1)
                    t_ds.append(time.perf_counter() - t)
                    written = r.written_bytes
                shutil.rmtree(root, ignore_errors=True)
            row = {"time_vs_pt": med(t_ds) / med(t_pt), "time_vs_sf": med(t_ds) / med(t_sf),
                   "bytes_vs_pt": written / b_pt, "state_GBps": size / med(t_ds) / 1e9,
                   "torch_save_s": med(t_pt), "save_s": med(t_ds)}
            res["rows"][f"{delta}/{label}"] = row
            print(f"[gpt2] delta={delta} {label}: " + json.dumps(
                {k: round(v, 3) for k, v in row.items()}), flush=True)
    return res


# -- workload 3: peak RSS in fresh processes ---------------------------------------------
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    def __enter__(self):
        self.base = _rss()
        self.peak = self.base
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, _rss())


def rss_child(args: list[str]) -> None:
    op, root, src = args[0], args[1], args[2]
    torch.set_num_threads(1)
    if op == "save":
        flat = load_file(src)
        with deltackpt.open(root) as store:
            store.save(flat, step=0)  # the parent step (bases for the measured save)
            nxt = {k: (v + 1e-6 if v.is_floating_point() else v) for k, v in flat.items()}
            gc.collect()
            with PeakRSS() as p:
                store.save(nxt, step=1)
    elif op == "torch_save":
        flat = load_file(src)
        with PeakRSS() as p:
            fsync_save(flat, root)
    elif op == "load":
        with deltackpt.open(root) as store, PeakRSS() as p:
            state = store.load(1)
        del state
    elif op == "torch_load":
        with PeakRSS() as p:
            torch.load(root, weights_only=True)
    elif op == "st_load":
        with PeakRSS() as p:
            load_file(root)
    print(json.dumps({"base": p.base, "peak": p.peak}))


def bench_rss(work: str) -> dict:
    files = trace_files(os.path.join(TRACES, "fp32_wd0"), 10, None)
    if not files:
        return {}
    src = files[-1][1]
    size = state_bytes(load_file(src))
    root, pt = os.path.join(work, "rss-store"), os.path.join(work, "rss.pt")
    shutil.rmtree(root, ignore_errors=True)
    out = {"state_bytes": size}

    def child(*a):
        r = subprocess.run([sys.executable, __file__, "--rss-child", *a], check=True,
                           capture_output=True, text=True)
        d = json.loads(r.stdout.strip().splitlines()[-1])
        return d["peak"] - d["base"]

    out["save_extra_MiB"] = (child("save", root, src)) / MiB
    out["torch_save_extra_MiB"] = child("torch_save", pt, src) / MiB
    out["load_peak_vs_state"] = child("load", root, src) / size
    out["torch_load_peak_vs_state"] = child("torch_load", pt, src) / size
    shutil.rmtree(root, ignore_errors=True)
    print("[rss] " + json.dumps({k: round(v, 3) for k, v in out.items()}), flush=True)
    return out


# -- workload 4: the index at scale ------------------------------------------------------
def llama7b_shapes() -> list[tuple[str, tuple[int, ...]]]:
    d, ff, v, layers = 4096, 11008, 32000, 32
    shapes = [("model.embed_tokens.weight", (v, d))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + f"self_attn.{x}_proj.weight", (d, d)) for x in "qkvo"]
        shapes += [(p + "mlp.gate_proj.weight", (ff, d)), (p + "mlp.up_proj.weight", (ff, d)),
                   (p + "mlp.down_proj.weight", (d, ff)),
                   (p + "input_layernorm.weight", (d,)),
                   (p + "post_attention_layernorm.weight", (d,))]
    return shapes + [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]


def bench_index(work: str, steps: int, block_size: int) -> dict:
    """Fill an index the way 1,000 fully-changed saves would (every block new each step:
    the worst case for index size), then time log, info and load planning."""
    from deltackpt import summaries
    from deltackpt.flatten import flatten

    root = os.path.join(work, f"idx-{block_size}")
    shutil.rmtree(root, ignore_errors=True)
    with deltackpt.open(root, block_size=block_size):
        pass
    # entries of one step: (path, dtype, shape, nbytes)
    shapes = llama7b_shapes()
    entries = []
    for i, (n, s) in enumerate(shapes):
        nb = int(np.prod(s)) * 4
        entries += [(f"model/{n}", s, nb), (f"optimizer/state/{i}/exp_avg", s, nb),
                    (f"optimizer/state/{i}/exp_avg_sq", s, nb), (f"optimizer/state/{i}/step", (), 4)]
    params = sum(int(np.prod(s)) for _, s in shapes)
    # the tree of a matching state (small tensors stand in: only the tree's shape matters)
    fake = {"model": {}, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "betas": (0.9, 0.999), "params": list(range(len(shapes)))}]}}
    for i, (n, _) in enumerate(shapes):
        fake["model"][n] = torch.zeros(1)
        fake["optimizer"]["state"][i] = {"step": torch.zeros(()), "exp_avg": torch.zeros(1), "exp_avg_sq": torch.zeros(1)}
    tree, leaves = flatten(fake)
    paths = [lf.path for lf in leaves]
    by_path = {p: (s, nb) for p, s, nb in entries}
    tree_json = json.dumps(tree, separators=(",", ":"))
    conn = sqlite3.connect(os.path.join(root, "index.sqlite"), isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    rng = np.random.default_rng(0)
    blocks_per_step = sum(-(-nb // block_size) for _, _, nb in entries)
    t0 = time.perf_counter()
    for step in range(steps):
        ids = rng.bytes(16 * blocks_per_step)
        conn.execute("BEGIN")
        pack_id = conn.execute("INSERT INTO packs (name, size, created_at) VALUES (?, ?, ?)",
                               (f"packs/{step:02x}/{step:030x}.pack", blocks_per_step * block_size, time.time())).lastrowid
        # through the library's writer: schema 2 numbers every block (blocks.seq)
        summaries.insert_blocks(
            conn, [(ids[16 * k:16 * k + 16], pack_id, k * block_size, block_size * 3 // 4,
                    block_size, "xor>group4>zstd1",
                    None if step == 0 else ids[16 * k:16 * k + 16][::-1], 1, step)
                   for k in range(blocks_per_step)])
        conn.execute("INSERT INTO steps (step, created_at, metrics, tags, note, tree, logical_bytes, "
                     "written_bytes, new_chunks, total_chunks, parent, manifest) VALUES "
                     "(?, ?, ?, '[]', NULL, ?, ?, ?, ?, ?, ?, ?)",
                     (step, time.time(), json.dumps({"val_loss": 2.0 - step * 1e-3}), tree_json,
                      sum(nb for *_, nb in entries), blocks_per_step * block_size * 3 // 4,
                      blocks_per_step, blocks_per_step, step - 1 if step else None,
                      f"manifests/{step:012d}.manifest"))
        pos = 0
        rows = []
        for idx, p in enumerate(paths):
            s, nb = by_path[p]
            nblk = -(-nb // block_size)
            rows.append((step, idx, p, "tensor", "float32", json.dumps(list(s)), nb,
                         min(nb, block_size), ids[16 * pos:16 * (pos + nblk)]))
            pos += nblk
        conn.executemany("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        summaries.record(conn, [step])  # the per-step summary every writer records
        conn.execute("COMMIT")
        if step % 100 == 99:
            print(f"[index] {step + 1} steps, {time.perf_counter() - t0:.0f} s", flush=True)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    size = os.path.getsize(os.path.join(root, "index.sqlite"))
    res = {"steps": steps, "block_size": block_size, "params": params,
           "state_bytes_per_step": sum(nb for *_, nb in entries),
           "entries_per_step": len(entries), "blocks_per_step": blocks_per_step,
           "index_bytes": size, "index_bytes_per_step": size / steps,
           "build_s": time.perf_counter() - t0}
    with deltackpt.open(root) as store:
        res["open_s"] = timed(lambda: deltackpt.open(root).close())
        res["log_s"] = med([timed(store.log) for _ in range(3)])
        res["steps_s"] = med([timed(store.steps) for _ in range(3)])
        res["info_s"] = med([timed(store.info, steps // 2) for _ in range(3)])

        def plan(step: int, select=None) -> int:
            from deltackpt.flatten import entry_indices, select_tree
            from deltackpt.store import unpack_ids
            with store._index.read() as c:
                t = json.loads(c.execute("SELECT tree FROM steps WHERE step=?", (step,)).fetchone()[0])
                if select:
                    t = select_tree(t, select)
                want = set(entry_indices(t))
                ids = set()
                for idx, blob in c.execute("SELECT idx, blocks FROM entries WHERE step=?", (step,)):
                    if idx in want:
                        ids.update(unpack_ids(blob))
                return len(store._locate(c, ids))

        res["plan_full_s"] = med([timed(plan, steps - 1) for _ in range(3)])
        res["plan_old_s"] = med([timed(plan, steps // 3) for _ in range(3)])
        res["plan_model_only_s"] = med([timed(plan, steps - 1, ["model"]) for _ in range(3)])
    shutil.rmtree(root, ignore_errors=True)
    print("[index] " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                                   for k, v in res.items()}), flush=True)
    return res


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--rss-child":
        rss_child(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", action="append", choices=["trace", "gpt2", "rss", "index"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--trace-steps", type=int, default=6,
                    help="saves per trace after the first (every 10 training steps)")
    ap.add_argument("--index-steps", type=int, default=1000)
    ap.add_argument("--index-block-sizes", default="16777216,1048576")
    ap.add_argument("--index-steps-small-blocks", type=int, default=100,
                    help="steps for block sizes under 16 MiB (80k block rows per step)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    only = set(args.only or ["trace", "gpt2", "rss", "index"])
    work = tempfile.mkdtemp(prefix="bench-store-", dir=args.workdir or HERE)
    results: dict = {"command": " ".join(["python", "benchmarks/bench_store.py"] + sys.argv[1:]),
                     "cpus": os.cpu_count(), "torch": torch.__version__}
    try:
        if "trace" in only:
            results["trace"] = [bench_trace(n, work, args.repeat, args.trace_steps)
                                for n in ("fp32_wd0", "bf16")]
        if "gpt2" in only:
            results["gpt2"] = bench_gpt2(work, args.repeat)
        if "rss" in only:
            results["rss"] = bench_rss(work)
        if "index" in only:
            results["index"] = []
            for bs in (int(x) for x in args.index_block_sizes.split(",")):
                n = args.index_steps if bs >= 16 * MiB else args.index_steps_small_blocks
                results["index"].append(bench_index(work, n, bs))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
