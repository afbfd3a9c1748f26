"""deltackpt.dcp.StorageWriter against DCP's own FileSystemWriter, same run, same state.

Replays a cached MiniLM fine-tuning trace (benchmarks/minilm_trace.py: model + AdamW
state every 10 steps) on N ranks of a gloo process group on the CPU. Every tensor is
a DTensor sharded on dim 0 over the ranks, as FSDP2 shards parameters and optimizer
state; 0-d ``step`` tensors stay replicated. For each trace step, in the same
processes, one after the other (FileSystemWriter first at even steps, deltackpt first
at odd ones):

- ``dcp.save(state, storage_writer=FileSystemWriter(<dir>/step_N))`` — DCP's format,
  one directory per checkpoint (what a training job keeps);
- ``dcp.save(state, storage_writer=deltackpt.dcp.StorageWriter(<store>), checkpoint_id=N)``.

Both fsync. Time is the wall time of ``dcp.save`` on rank 0 between barriers;
rank 0's full garbage collections are counted by where they ran (in either save or
between them: deltackpt holds the collector off in its own work, deltackpt/gcpause.py);
bytes are what each added on disk (the store's growth includes index and manifests).
At the end, the last step is loaded back with ``dcp.load`` on the same ranks and
compared bit-exact with the trace.

    python benchmarks/bench_dcp.py --scenario fp32_wd0 --steps 10:100:10 --world 2

Needs the trace cache (``python benchmarks/minilm_trace.py --scenario S --steps 300
--save-every 10 --out benchmarks/.cache/traces/S``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def _dir_bytes(path: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except FileNotFoundError:
                pass
    return total


def _state(trace_file: str, mesh):
    """The trace step as a DCP state dict of dim-0 sharded DTensors."""
    from safetensors import safe_open
    from torch.distributed.tensor import Shard, distribute_tensor

    model: dict = {}
    optim: dict = {}
    with safe_open(trace_file, "pt") as f:
        meta = json.loads(f.metadata()["deltackpt_trace"])
        for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
            t = f.get_tensor(key)
            if t.dim() > 0:
                # src_data_rank=None: every rank holds the full trace, slices its own shard
                t = distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None)
            parts = key.split("/")
            if parts[0] == "model":
                model[parts[1]] = t
            elif parts[0] == "optimizer":
                optim.setdefault(parts[2], {})[parts[3]] = t
    return {"model": model, "optim": {"state": optim, "param_groups": meta["param_groups"]},
            "step": meta["step"]}


def _worker(rank: int, world: int, port: int, opts: dict) -> None:
    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    from deltackpt.dcp import StorageReader, StorageWriter

    torch.set_num_threads(1)
    # full collections (~0.1 s each with torch imported) by where they ran: a writer that
    # holds the collector off must not just move its collections into the other's save
    gc_where = {"phase": "between", "t0": 0.0, "row": 0.0}
    gc_time: dict[str, list[float]] = {}

    def on_gc(phase: str, info: dict) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            gc_where["t0"] = time.perf_counter()
        else:
            spent = time.perf_counter() - gc_where["t0"]
            gc_time.setdefault(gc_where["phase"], []).append(spent)
            gc_where["row"] += spent

    gc.callbacks.append(on_gc)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    work, trace = opts["workdir"], opts["trace"]
    store = os.path.join(work, "store")
    fs_root = os.path.join(work, "fs")
    writer = StorageWriter(store, threads=opts["threads"])
    rows = []
    for i, step in enumerate(opts["steps"]):
        state = _state(os.path.join(trace, f"step_{step:06d}.safetensors"), mesh)
        row = {"step": step}
        # alternate which writer goes first: the second one starts while the disk still
        # writes back the first one's pages (the same drift bench_overhead's ABBA removes)
        order = ("fs", "deltackpt") if i % 2 == 0 else ("deltackpt", "fs")  # same on all ranks
        for name in order:
            before = _dir_bytes(store) if name == "deltackpt" else 0
            dist.barrier()
            gc_where["phase"], gc_where["row"] = name, 0.0
            t0 = time.perf_counter()
            if name == "fs":
                dcp.save(state, storage_writer=dcp.FileSystemWriter(
                    os.path.join(fs_root, f"step_{step}")))
            else:
                dcp.save(state, storage_writer=writer, checkpoint_id=step)
            dist.barrier()
            row[f"{name}_s"] = time.perf_counter() - t0
            row[f"{name}_gc_s"] = gc_where["row"]
            gc_where["phase"] = "between"
            row[f"{name}_bytes"] = (_dir_bytes(os.path.join(fs_root, f"step_{step}"))
                                    if name == "fs" else _dir_bytes(store) - before)
        if rank == 0:
            r = writer.last_result
            row["logical"] = r.logical_bytes
            rows.append(row)
            print(f"step {step}: fs {row['fs_s']:.2f} s {row['fs_bytes'] / 2**20:.1f} MiB | "
                  f"deltackpt {row['deltackpt_s']:.2f} s {row['deltackpt_bytes'] / 2**20:.1f} "
                  f"MiB ({r.new_chunks}/{r.total_chunks} blocks new)", flush=True)
        del state
    writer.close()
    # read back the last step on the same ranks and compare with the trace, bit for bit
    last = opts["steps"][-1]
    target = _state(os.path.join(trace, f"step_{last:06d}.safetensors"), mesh)
    expected = {k: v.full_tensor().clone() for k, v in target["model"].items()
                if hasattr(v, "full_tensor")}
    for v in target["model"].values():
        if hasattr(v, "to_local"):
            v.to_local().zero_()
    t0 = time.perf_counter()
    dcp.load(target, storage_reader=StorageReader(store, step=last, threads=opts["threads"]))
    load_s = time.perf_counter() - t0
    for k, v in target["model"].items():
        if hasattr(v, "full_tensor"):
            got = v.full_tensor()
            assert got.dtype == expected[k].dtype and torch.equal(
                got.view(torch.uint8), expected[k].view(torch.uint8)), k
    if rank == 0:
        with open(os.path.join(work, "result.json"), "w") as f:
            json.dump({"rows": rows, "load_s": load_s, "gc": gc_time}, f)
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenario", default="fp32_wd0")
    ap.add_argument("--steps", default="10:100:10", help="first:last:every of the trace")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="deltackpt threads per rank")
    ap.add_argument("--traces", default=os.path.join(HERE, ".cache", "traces"))
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    import torch.multiprocessing as mp

    first, last, every = (int(x) for x in args.steps.split(":"))
    trace = os.path.join(args.traces, args.scenario)
    work = args.workdir or tempfile.mkdtemp(prefix="bench_dcp_")
    os.makedirs(work, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    opts = {"workdir": work, "trace": trace, "steps": list(range(first, last + 1, every)),
            "threads": args.threads}
    try:
        mp.spawn(_worker, args=(args.world, port, opts), nprocs=args.world, join=True)
        with open(os.path.join(work, "result.json")) as f:
            res = json.load(f)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    rows = res["rows"]
    fs_b = sum(r["fs_bytes"] for r in rows)
    dk_b = sum(r["deltackpt_bytes"] for r in rows)
    inc = rows[1:]
    fs_t = statistics.median(r["fs_s"] for r in inc)
    dk_t = statistics.median(r["deltackpt_s"] for r in inc)
    mib = 2 ** 20
    print(f"\n{args.scenario}, {args.world} ranks, {len(rows)} saves (steps {args.steps}), "
          f"state {rows[0]['logical'] / mib:.1f} MiB")
    print("| | FileSystemWriter | deltackpt.dcp | ratio |")
    print("|---|---|---|---|")
    print(f"| bytes, all {len(rows)} saves | {fs_b / mib:.1f} MiB | {dk_b / mib:.1f} MiB | "
          f"{dk_b / fs_b:.3f}× |")
    print(f"| bytes, first save | {rows[0]['fs_bytes'] / mib:.1f} MiB | "
          f"{rows[0]['deltackpt_bytes'] / mib:.1f} MiB | "
          f"{rows[0]['deltackpt_bytes'] / rows[0]['fs_bytes']:.3f}× |")
    inc_fs = sum(r["fs_bytes"] for r in inc)
    inc_dk = sum(r["deltackpt_bytes"] for r in inc)
    print(f"| bytes, incremental saves (2nd on) | {inc_fs / mib:.1f} MiB | {inc_dk / mib:.1f} MiB "
          f"| {inc_dk / inc_fs:.3f}× |")
    print(f"| time, first save | {rows[0]['fs_s']:.2f} s | {rows[0]['deltackpt_s']:.2f} s | "
          f"{rows[0]['deltackpt_s'] / rows[0]['fs_s']:.2f}× |")
    print(f"| time per incremental save (median) | {fs_t:.2f} s | {dk_t:.2f} s | "
          f"{dk_t / fs_t:.2f}× |")
    if all("fs_gc_s" in r for r in inc):  # on rank 0: a slower rank is not in it
        fs_n = statistics.median(r["fs_s"] - r["fs_gc_s"] for r in inc)
        dk_n = statistics.median(r["deltackpt_s"] - r["deltackpt_gc_s"] for r in inc)
        print(f"| the same, rank 0's full collections taken out | {fs_n:.2f} s | {dk_n:.2f} s "
              f"| {dk_n / fs_n:.2f}× |")
    gcs = res.get("gc", {})
    print("\nfull collections on rank 0 (count, seconds): " + ", ".join(
        f"{where} {len(gcs.get(where, []))}, {sum(gcs.get(where, [])):.2f} s"
        for where in ("fs", "deltackpt", "between")))
    print(f"dcp.load of step {rows[-1]['step']} from the store on {args.world} ranks: "
          f"{res['load_s']:.2f} s, bit-exact")


if __name__ == "__main__":
    main()
