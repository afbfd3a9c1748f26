"""deltackpt over S3 vs s3fs writing/reading the same bytes as plain objects.

One moto S3 server runs on loopback in its own process (so its CPU does not share the
client's GIL); in the same run, against the same server:

- **s3fs objects**: every tensor's raw bytes as one object, written with ``fs.pipe`` (all
  objects in one concurrent batch) and read back with ``fs.cat``;
- **s3fs one object**: all bytes concatenated into one object (s3fs's multipart upload and
  concurrent ranged reads);
- **deltackpt**: ``store.save`` of the state (step 0: every block new) and ``store.load``
  from a fresh cache-less reader... (the cache is warm: the reader opened the store first,
  which is what a resuming job does), then an incremental save (1% of the values changed).

Throughput is logical bytes / wall seconds; ratios are against the faster s3fs baseline.
Requests per save come from the backend's per-operation counters.

    .venv/bin/python benchmarks/bench_s3.py [--mib 256] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

import deltackpt  # noqa: E402

MiB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def make_state(total_mib: int, seed: int = 0) -> dict:
    """A training-like state: fp32 weights plus Adam moments, in tensors of 1–16 MiB."""
    rng = np.random.default_rng(seed)
    sizes = []
    left = total_mib * MiB // 3
    while left > 0:
        n = min(left, int(rng.integers(1, 17)) * MiB)
        sizes.append(n)
        left -= n
    model = {f"layer{i}.weight": torch.from_numpy(
        (rng.standard_normal(n // 4) * 0.02).astype(np.float32)) for i, n in enumerate(sizes)}
    exp_avg = {k: torch.from_numpy((rng.standard_normal(v.numel()) * 1e-3).astype(np.float32))
               for k, v in model.items()}
    exp_avg_sq = {k: torch.from_numpy((rng.random(v.numel()) * 1e-6).astype(np.float32))
                  for k, v in model.items()}
    return {"model": model, "optimizer": {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}}


def leaves(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(leaves(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def best(fn, repeat: int) -> float:  # noqa: D103
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256, help="state size in MiB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--part-mib", type=int, default=16, help="multipart part size")
    ap.add_argument("--concurrency", type=int, default=8, help="parts in flight")
    ap.add_argument("--pack-mib", type=int, default=16, help="pack target size")
    args = ap.parse_args()
    import s3fs

    proc, endpoint = start_server()
    tmp = tempfile.mkdtemp(prefix="bench-s3-")
    try:
        opts = {"key": "testing", "secret": "testing", "skip_instance_cache": True,
                "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        fs = s3fs.S3FileSystem(**opts)
        fs.call_s3("create_bucket", Bucket="bench")
        state = make_state(args.mib)
        flat = leaves(state)
        blobs = {f"bench/plain/{k}": t.numpy().tobytes() for k, t in flat.items()}
        logical = sum(len(b) for b in blobs.values())
        one = b"".join(blobs.values())

        # baseline and deltackpt alternate within each repeat, so that load from other
        # processes on the machine hits both alike; ratios are medians over repeats
        t_put_one = best(lambda: fs.pipe_file("bench/one/all.bin", one), 1)
        t_get_one = best(lambda: fs.cat_file("bench/one/all.bin"), 1)
        one = b""
        rows = []
        for r in range(args.repeat):
            row: dict = {}
            t0 = time.perf_counter()
            fs.pipe(blobs)
            row["put"] = time.perf_counter() - t0
            url = f"s3://bench/store{r}"
            with deltackpt.open(url, storage_options=opts, part_size=args.part_mib * MiB,
                                max_concurrency=args.concurrency,
                                pack_size=args.pack_mib * MiB,
                                cache_dir=os.path.join(tmp, f"w{r}")) as st:
                st.lease.acquire()  # as a running job holds it: not part of a save
                before = dict(st.backend.requests)
                t0 = time.perf_counter()
                st.save(state, step=0)
                row["save"] = time.perf_counter() - t0
                row["reqs"] = {k: v - before.get(k, 0) for k, v in st.backend.requests.items()
                               if v - before.get(k, 0)}
                row["stored"] = st.stored_bytes()
                # step 1: 1% of the values of every tensor moved (a fine-tuning-like step)
                state1: dict = {"model": {}, "optimizer": {"exp_avg": {}, "exp_avg_sq": {}}}
                for k, t in flat.items():
                    t1 = t.clone()
                    t1.view(-1)[::100] += 1e-4
                    *parents, last = k.split("/")
                    d = state1
                    for p in parents:
                        d = d[p]
                    d[last] = t1
                before = dict(st.backend.requests)
                t0 = time.perf_counter()
                res = st.save(state1, step=1)
                row["inc"] = time.perf_counter() - t0
                row["inc_reqs"] = {k: v - before.get(k, 0) for k, v in
                                   st.backend.requests.items() if v - before.get(k, 0)}
                row["inc_written"] = res.written_bytes
                del state1
            t0 = time.perf_counter()
            fs.cat(list(blobs))
            row["get"] = time.perf_counter() - t0
            with deltackpt.open(url, storage_options=opts,
                                cache_dir=os.path.join(tmp, f"r{r}")) as rd:
                before = dict(rd.backend.requests)
                t0 = time.perf_counter()
                out = rd.load(0)
                row["load"] = time.perf_counter() - t0
                row["load_reqs"] = {k: v - before.get(k, 0) for k, v in
                                    rd.backend.requests.items() if v - before.get(k, 0)}
                lf = leaves(out)
                assert all(torch.equal(lf[k].view(torch.int32), flat[k].view(torch.int32))
                           for k in flat), "restore is not bit-exact"
                del out, lf
            rows.append(row)

        def mbs(t: float) -> str:
            return f"{logical / MiB / t:7.1f} MiB/s"

        def med(xs: list[float]) -> float:
            return float(np.median(xs))

        last = rows[-1]
        print(f"state: {logical / MiB:.0f} MiB in {len(flat)} tensors; block 1 MiB; "
              f"stored {last['stored'] / MiB:.0f} MiB; packs {args.pack_mib} MiB; "
              f"{args.repeat} repeats; endpoint {endpoint}")
        print(f"{'(best of the repeats)':36s}{'write':>14s}{'read':>14s}")
        print(f"{'s3fs, one object per tensor':36s}{mbs(min(r['put'] for r in rows)):>14s}"
              f"{mbs(min(r['get'] for r in rows)):>14s}")
        print(f"{'s3fs, one object (1 run)':36s}{mbs(t_put_one):>14s}{mbs(t_get_one):>14s}")
        print(f"{'deltackpt save / load (step 0)':36s}{mbs(min(r['save'] for r in rows)):>14s}"
              f"{mbs(min(r['load'] for r in rows)):>14s}")
        save_ratio = [r["put"] / r["save"] for r in rows]
        load_ratio = [r["get"] / r["load"] for r in rows]
        print("throughput vs s3fs one object per tensor, per repeat: save "
              + " ".join(f"{x:.2f}" for x in save_ratio) + f" (median {med(save_ratio):.2f}x)"
              + "; load " + " ".join(f"{x:.2f}" for x in load_ratio)
              + f" (median {med(load_ratio):.2f}x)")
        print(f"incremental save (1% of values changed): {min(r['inc'] for r in rows):.2f} s "
              f"({mbs(min(r['inc'] for r in rows)).strip()} logical), "
              f"{last['inc_written'] / MiB:.1f} MiB written")
        for key, what in (("reqs", "step-0 save"), ("inc_reqs", "step-1 save"),
                          ("load_reqs", "step-0 load")):
            print(f"requests, {what}: {last[key]} = {sum(last[key].values())}")
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
