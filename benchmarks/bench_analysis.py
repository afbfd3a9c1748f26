"""Time stats, diff (index part) and the what-if table on a large synthetic index.

The index is written directly through deltackpt/index.py (no packs, no data): N steps of
E entries (70% one block, 30% 2-8 blocks), a fraction of the entries changing at each
step, delta chains of up to 8 keyframe-policy hops, and each step's summary row written as a
save writes it (deltackpt/summaries.py; its cost per step is printed). Peers measured in the
same run:
``stats v1`` (the per-row SQL + Store.log() implementation this replaced) and a per-row
Python what-if (``Store.live_blocks``-style closure over ``SELECT`` results).

    .venv/bin/python benchmarks/bench_analysis.py [--steps 1000] [--entries 2000]
        [--change 0.1] [--index /tmp/bench-analysis] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import deltackpt  # noqa: E402
from deltackpt import summaries  # noqa: E402
from deltackpt.diff import diff  # noqa: E402
from deltackpt.hashing import unpack_ids  # noqa: E402
from deltackpt.index import Index  # noqa: E402
from deltackpt.stats import snapshot, store_stats  # noqa: E402
from deltackpt.whatif import Policy, whatif  # noqa: E402


def build(path: str, steps: int, entries: int, change: float, seed: int = 0) -> float:
    """Write the index; returns the median seconds one step's summary took to record."""
    with deltackpt.open(path):
        pass
    idx = Index(os.path.join(path, "index.sqlite"), durable=False)
    conn = idx.conn
    conn.execute("PRAGMA synchronous = OFF")
    rng = np.random.default_rng(seed)
    nblk = np.where(rng.random(entries) < 0.7, 1, rng.integers(2, 9, entries))
    paths = [f"{'model' if i < entries * 0.4 else 'optimizer'}/layers/{i // 8}/p{i}"
             for i in range(entries)]
    cur = [[rng.bytes(16) for _ in range(n)] for n in nblk]
    root: dict[bytes, tuple[bytes, int]] = {}
    block = 1 << 20
    record_s = []
    with idx.write():
        conn.execute("INSERT INTO packs(id, name, size, created_at) VALUES (1, 'packs/00/x.pack', "
                     "0, 0)")
        for s in range(steps):
            new = []
            changed = np.nonzero(rng.random(entries) < change)[0] if s else range(entries)
            for e in changed:
                ids = []
                for b in cur[e]:
                    nb = rng.bytes(16)
                    key, depth = root.get(b, (b, 0))
                    depth += 1
                    if s == 0 or depth > 8:
                        root[nb] = (nb, 0)
                        new.append((nb, 1, 0, 700_000, block, "group4>zstd1", None, 0, s))
                    else:
                        root[nb] = (key, depth)
                        new.append((nb, 1, 0, 150_000, block, "xor>group4>zstd1", key, depth, s))
                    ids.append(nb)
                cur[e] = ids
            new.sort()
            summaries.insert_blocks(conn, new)
            conn.execute(
                "INSERT INTO steps VALUES (?, ?, '{}', '[]', NULL, '{}', ?, ?, ?, ?, ?, ?)",
                (s, float(s), int(nblk.sum()) * block, sum(r[3] for r in new), len(new),
                 int(nblk.sum()), s - 1 if s else None, f"manifests/{s:020d}.manifest"))
            conn.executemany(
                "INSERT INTO entries VALUES (?, ?, ?, 'tensor', 'float32', ?, ?, ?, ?)",
                [(s, i, paths[i], f"[{int(nblk[i]) * block // 4}]", int(nblk[i]) * block, block,
                  b"".join(cur[i])) for i in range(entries)])
            t0 = time.perf_counter()
            summaries.record(conn, [s])
            record_s.append(time.perf_counter() - t0)
    idx.close()
    return statistics.median(record_s)


def stats_v1(store) -> dict:
    """The implementation before this change (per-row SQL over blocks, Store.log())."""
    idx = store._index
    raw_by_step = {s: (raw, length) for s, raw, length in idx.query(
        "SELECT first_step, SUM(raw_len), SUM(length) FROM blocks GROUP BY first_step")}
    out = []
    for info in store.log():
        raw, length = raw_by_step.get(info.step, (0, 0))
        out.append((info.step, raw / length if length else 1.0))
    return {"steps": out}


def whatif_rows(store, keep: set[int]) -> int:
    """Per-row Python: referenced ids of the kept steps, closed under base, summed."""
    live: set[bytes] = set()
    for step, blob in store._index.query("SELECT step, blocks FROM entries"):
        if step in keep:
            live.update(unpack_ids(blob))
    info = {b: (base, ln) for b, base, ln in store._index.query(
        "SELECT id, base, length FROM blocks")}
    todo = list(live)
    while todo:
        base = info[todo.pop()][0]
        if base is not None and base not in live:
            live.add(base)
            todo.append(base)
    return sum(info[b][1] for b in live)


def timed(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--entries", type=int, default=2000)
    ap.add_argument("--change", type=float, default=0.1)
    ap.add_argument("--index", default="/tmp/bench-analysis")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    path = f"{args.index}-{args.steps}x{args.entries}x{args.change}"
    if not os.path.exists(os.path.join(path, "index.sqlite")):
        t0 = time.perf_counter()
        record = build(path, args.steps, args.entries, args.change)
        print(f"built {path} in {time.perf_counter() - t0:.0f}s; recording one step's summary "
              f"(as a save does) took {record * 1e3:.1f} ms (median)")
    t0 = time.perf_counter()
    with deltackpt.open(path, create=False):  # migrates an index built by an older deltackpt
        pass
    print(f"open: {time.perf_counter() - t0:.2f} s")
    with deltackpt.open(path, create=False) as store:
        (nb,) = store._index.query("SELECT COUNT(*) FROM blocks")[0]
        (ne,) = store._index.query("SELECT COUNT(*) FROM entries")[0]
        print(f"{args.steps} steps x {args.entries} entries: {ne} entries rows, {nb} blocks, "
              f"{os.path.getsize(os.path.join(path, 'index.sqlite')) / 2**20:.0f} MiB index")
        policies = [Policy("keep_last", 10), Policy("keep_every", 100), Policy("save_every", 5)]
        last = args.steps - 1
        results = {
            "full snapshot (report, --by-entry)": timed(lambda: snapshot(store), args.repeat),
            "stats (per step/component, summaries)": timed(lambda: store_stats(store),
                                                            args.repeat),
            "stats v1 (peer: old per-row code)": timed(lambda: stats_v1(store), args.repeat),
            "diff --no-data (first vs last step)": timed(
                lambda: diff(store, 0, last, data=False), args.repeat),
            "what-if, 1 + 3 policies (summaries)": timed(
                lambda: whatif(store, policies), args.repeat),
            "what-if, default policies (summaries)": timed(lambda: whatif(store), args.repeat),
            "what-if keep-last 10, per-row Python (peer)": timed(
                lambda: whatif_rows(store, set(range(last - 9, last + 1))), 1),
        }
        ours = whatif(store, [Policy("keep_last", 10)])[1]["stored_bytes"]
        assert ours == results["what-if keep-last 10, per-row Python (peer)"][1], "mismatch"
        st = results["stats (per step/component, summaries)"][1]
        for x in st["steps"]:  # every written byte is accounted to a component
            assert sum(c["written_bytes"] for c in x["components"].values()) == x["written_bytes"]
    for name, (t, _) in results.items():
        print(f"{name:48s} {t:8.3f} s")


if __name__ == "__main__":
    main()
