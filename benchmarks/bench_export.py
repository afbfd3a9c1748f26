"""Export, import and averaging on the real MiniLM fine-tuning trace.

Imports trace steps (``benchmarks/.cache/traces/<scenario>/step_NNNNNN.safetensors``,
made by ``benchmarks/minilm_trace.py``) into a fresh store, then measures, each in
its own subprocess so peak RSS is that operation's alone:

- ``export``: ``store.export(out.safetensors, step)`` of the model subtree, against
  the peer ``store.load(step, select="model")`` + ``safetensors.torch.save_file``;
- ``average``: ``store.average(steps)`` of the model subtree, against the peer
  "load every step, average in torch";
- import: seconds per trace file, and bytes written when the same file is imported again.

Peak RSS is the child's VmHWM; "over baseline" subtracts the child's RSS
right before the operation (interpreter, torch, open store). Timings are the median of
``--repeat`` runs, alternating the two contenders.

    .venv/bin/python benchmarks/bench_export.py --steps 10,20,30,40,50
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _hwm() -> int:
    """Peak RSS of this process image: VmHWM (ru_maxrss would carry the forking
    parent's peak across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    import deltackpt

    steps = [int(s) for s in args.steps.split(",")]
    out_dir = tempfile.mkdtemp(dir=args.tmp)
    with deltackpt.open(args.store) as store:
        model_bytes = sum(e.nbytes for e in store.entries(steps[-1])
                          if e.path.startswith("model/"))
        base = _rss()
        t0 = time.perf_counter()
        if args.child == "export":
            store.export(os.path.join(out_dir, "m.safetensors"), steps[-1])
        elif args.child == "load_save":
            from safetensors.torch import save_file

            state = store.load(steps[-1], select="model", map_location="cpu")
            save_file(state["model"], os.path.join(out_dir, "m.safetensors"))
        elif args.child == "average":
            store.average(steps)
        elif args.child == "load_average":
            states = [store.load(s, select="model", map_location="cpu")["model"] for s in steps]
            out = {}
            for k, v in states[-1].items():
                if v.is_floating_point():
                    acc = states[0][k].float()
                    for s in states[1:]:
                        acc += s[k].float()
                    out[k] = (acc / len(states)).to(v.dtype)
                else:
                    out[k] = v
        seconds = time.perf_counter() - t0
    peak = _hwm()
    shutil.rmtree(out_dir)
    print(json.dumps({"seconds": seconds, "peak": peak, "base": base,
                      "model_bytes": model_bytes}))


def run_child(kind: str, store: str, steps: str, tmp: str) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kind,
                          "--store", store, "--steps", steps, "--tmp", tmp],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scenario", default="fp32_wd0")
    p.add_argument("--steps", default="10,20,30,40,50", help="trace steps to import/average")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--tmp", default=None, help="work directory (default: a temp dir)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--store", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    import torch

    torch.set_num_threads(1)
    import deltackpt

    trace = os.path.join(HERE, ".cache", "traces", args.scenario)
    steps = [int(s) for s in args.steps.split(",")]
    files = [os.path.join(trace, f"step_{s:06d}.safetensors") for s in steps]
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        sys.exit(f"missing trace files {missing[:2]}...; generate them with "
                 f"benchmarks/minilm_trace.py --scenario {args.scenario}")
    work = tempfile.mkdtemp(dir=args.tmp)
    store_path = os.path.join(work, "store")
    print(f"# command: {' '.join([os.path.relpath(sys.executable, ROOT)] + sys.argv)}")
    print(f"# {os.cpu_count()} CPUs, torch {torch.__version__}, scenario {args.scenario}, "
          f"steps {args.steps}")
    imports = []
    with deltackpt.open(store_path) as store:
        for s, f in zip(steps, files):
            t0 = time.perf_counter()
            r = store.import_file(f, s)
            imports.append((s, time.perf_counter() - t0, r.logical_bytes, r.written_bytes))
        t0 = time.perf_counter()
        again = store.import_file(files[-1], 10**9)
        again_s = time.perf_counter() - t0
        store.delete(10**9)
    mib = 1024 * 1024
    for s, sec, logical, written in imports:
        print(f"import step {s}: {logical / mib:.1f} MiB in {sec:.2f}s "
              f"({logical / mib / sec:.0f} MiB/s), {written / mib:.1f} MiB written")
    print(f"import of step {steps[-1]}'s file again: {again.written_bytes} bytes written, "
          f"{again.new_chunks} new blocks, {again_s:.2f}s")

    def compare(ours: str, peer: str, step_arg: str) -> tuple[dict, dict]:
        res: dict[str, list[dict]] = {ours: [], peer: []}
        for _ in range(args.repeat):
            for kind in (ours, peer):
                res[kind].append(run_child(kind, store_path, step_arg, work))
        return ({"seconds": statistics.median(r["seconds"] for r in res[ours]),
                 "peak": max(r["peak"] for r in res[ours]),
                 "over": max(r["peak"] - r["base"] for r in res[ours]),
                 "model": res[ours][0]["model_bytes"]},
                {"seconds": statistics.median(r["seconds"] for r in res[peer]),
                 "peak": max(r["peak"] for r in res[peer]),
                 "over": max(r["peak"] - r["base"] for r in res[peer])})

    ex, ls = compare("export", "load_save", str(steps[-1]))
    model = ex["model"]
    print(f"\nexport of step {steps[-1]} (model subtree, {model / mib:.1f} MiB) to .safetensors, "
          f"median of {args.repeat}:")
    print(f"  store.export           {ex['seconds']:.3f}s  peak RSS {ex['peak'] / mib:.0f} MiB "
          f"(+{ex['over'] / mib:.0f} MiB over baseline)")
    print(f"  store.load + save_file {ls['seconds']:.3f}s  peak RSS {ls['peak'] / mib:.0f} MiB "
          f"(+{ls['over'] / mib:.0f} MiB over baseline)")
    print(f"  speed ratio export / (load+save_file) = {ls['seconds'] / ex['seconds']:.2f}x; "
          f"memory over baseline {ex['over'] / max(ls['over'], 1):.2f}x of the peer's")
    av, la = compare("average", "load_average", args.steps)
    print(f"\naverage of steps {args.steps} (model subtree), median of {args.repeat}:")
    print(f"  store.average          {av['seconds']:.3f}s  peak RSS {av['peak'] / mib:.0f} MiB "
          f"(+{av['over'] / mib:.0f} MiB over baseline = {av['over'] / model:.2f}x the model)")
    print(f"  load all + torch mean  {la['seconds']:.3f}s  peak RSS {la['peak'] / mib:.0f} MiB "
          f"(+{la['over'] / mib:.0f} MiB over baseline = {la['over'] / model:.2f}x the model)")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
