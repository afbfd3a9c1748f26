"""Costs of the Checkpointer: blocked time, step-time overhead, host-copy method, memory reuse.

    python benchmarks/bench_checkpointer.py                 # everything (~2-4 min on 2 cores)
    python benchmarks/bench_checkpointer.py --only copy,rss

Sections
    copy      copying a 138 MiB fp32 tensor to host memory: Tensor.copy_ with 1 and 2 torch
              threads vs numpy.copyto of uint8 views, idle and beside a busy zstd thread
    blocked   how long an async save blocks the caller (snapshot into reused host buffers)
              vs a plain copy of the state to host memory (``clone()`` of every tensor) and
              vs a synchronous Store.save, for a ~22M-parameter model with its AdamW state
    overhead  mean training-step time with no checkpointing, async saves every 50 steps and
              synchronous saves every 50 steps (store threads 1 and default)
    rss       process RSS after 10 and after 200 async saves of a small model
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time

import numpy as np
import torch

import deltackpt
from deltackpt.checkpointer import Checkpointer


def _median_ms(fn, repeat: int = 7) -> float:
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def bench_copy() -> None:
    import zstandard

    n = 138 * 1024 * 1024 // 4
    src, dst = torch.randn(n), torch.empty(n)
    s8, d8 = src.view(torch.uint8).numpy(), dst.view(torch.uint8).numpy()
    before = torch.get_num_threads()
    stop = threading.Event()

    def busy() -> None:
        c = zstandard.ZstdCompressor(level=1)
        data = np.random.bytes(8 << 20)
        while not stop.is_set():
            c.compress(data)

    def run(label: str) -> None:
        out = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out[f"copy_ {threads} thr"] = _median_ms(lambda: dst.copy_(src))
        torch.set_num_threads(before)
        out["np.copyto"] = _median_ms(lambda: np.copyto(d8, s8))
        print(f"  {label:<22}" + "  ".join(f"{k}: {v:6.1f} ms" for k, v in out.items()))

    print("copy of a 138 MiB fp32 tensor (median of 7):")
    run("idle")
    th = threading.Thread(target=busy)
    th.start()
    try:
        run("beside a zstd thread")
    finally:
        stop.set()
        th.join()


def _big_model(width: int = 1024, depth: int = 5) -> torch.nn.Module:
    # 4 * width^2 params per block: ~21M at the defaults (MiniLM-L6 with its MLM head: 22.7M)
    layers = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width * 2), torch.nn.GELU(),
                   torch.nn.Linear(width * 2, width)]
    return torch.nn.Sequential(*layers)


def _warm_adam(model: torch.nn.Module) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    return opt


def _plain_copy(model, opt) -> None:
    {k: v.detach().clone() for k, v in model.state_dict().items()}
    sd = opt.state_dict()
    {i: {k: v.clone() for k, v in st.items()} for i, st in sd["state"].items()}


def _perturb(model, opt) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-4)
    for st in opt.state.values():
        st["exp_avg"].mul_(0.9)


def bench_blocked(workdir: str) -> None:
    torch.manual_seed(0)
    model = _big_model()
    opt = _warm_adam(model)
    nparams = sum(p.numel() for p in model.parameters())
    state_mb = nparams * 4 * 3 / 2**20
    print(f"blocked time, model {nparams / 1e6:.1f}M params, state {state_mb:.0f} MiB "
          "(model + AdamW moments), median of 5:")
    plain = _median_ms(lambda: _plain_copy(model, opt), repeat=5)
    print(f"  plain copy to host memory (clone every tensor): {plain:7.1f} ms")
    path = os.path.join(workdir, "blocked")
    with Checkpointer(path, model=model, optimizer=opt, keep_last=2,
                      store_options={"fsync": False}) as ck:
        for s in range(1, 7):
            _perturb(model, opt)
            ck.wait()  # measure the snapshot alone, not back-pressure
            ck.save(s)
        ck.wait()
        recs = ck.records[1:]  # the first save allocates its buffers
        first = ck.records[0]
    print(f"  async save, first (allocates host buffers):    {first.blocked_s * 1e3:7.1f} ms")
    print(f"  async save, blocked (buffers reused):           "
          f"{statistics.median(r.blocked_s for r in recs) * 1e3:7.1f} ms "
          f"(snapshot {statistics.median(r.snapshot_s for r in recs) * 1e3:.1f} ms)")
    print(f"  ... its background Store.save + retention:      "
          f"{statistics.median(r.save_s + r.retention_s for r in recs) * 1e3:7.1f} ms")
    with Checkpointer(path + "-sync", model=model, optimizer=opt, keep_last=2, async_save=False,
                      store_options={"fsync": False}) as ck:
        for s in range(1, 5):
            _perturb(model, opt)
            ck.save(s)
        sync = statistics.median(r.blocked_s for r in ck.records[1:])
    print(f"  synchronous save, blocked:                      {sync * 1e3:7.1f} ms")


def _train_model(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.GELU(),
                                torch.nn.Linear(2048, 2048), torch.nn.GELU(),
                                torch.nn.Linear(2048, 512))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def _loop(steps: int, ck: Checkpointer | None, model, opt) -> list[tuple[float, bool]]:
    """Train; per step its time and whether a background save ran during it."""
    x = torch.randn(16, 512)
    out = []
    for s in range(1, steps + 1):
        busy = ck is not None and ck.in_flight
        t = time.perf_counter()
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        t_train = time.perf_counter() - t
        busy = busy or (ck is not None and ck.in_flight)
        if ck is not None:
            ck.step(s)
        out.append((t_train, busy))
    if ck is not None:
        ck.wait()
    return out


def bench_overhead(workdir: str, steps: int = 300) -> None:
    """Overhead of a save every 50 steps, measured inside each run so that the noise
    of a shared machine (whole-run times drift by +-25% here) cancels out:

        overhead = (time blocked in save() + steps in flight x (median step while a
                    save runs - median step while none runs)) / (steps x median clean step)
    """
    model, opt = _train_model()
    nparams = sum(p.numel() for p in model.parameters())
    print(f"step-time overhead, save every 50 steps, {steps} steps per config, model "
          f"{nparams / 1e6:.1f}M params (state {nparams * 12 / 2**20:.0f} MiB), torch threads "
          f"{torch.get_num_threads()}:")
    configs = [
        ("async (store threads=1)", dict(async_save=True), {}),
        ("async, store threads=2", dict(async_save=True), {"threads": 2}),
        ("sync", dict(async_save=False), {}),
    ]
    _loop(20, None, model, opt)  # warm up
    for i, (name, kwargs, opts) in enumerate(configs):
        ck = Checkpointer(os.path.join(workdir, f"ovh-{i}"), model=model, optimizer=opt,
                          every_n_steps=50, keep_last=2,
                          store_options={"fsync": False, **opts}, **kwargs)
        times = _loop(steps, ck, model, opt)
        ck.close()
        clean = statistics.median(t for t, busy in times if not busy)
        busy = [t for t, b in times if b]
        busy_med = statistics.median(busy) if busy else clean
        blocked = [r.blocked_s for r in ck.records]
        extra = sum(blocked) + len(busy) * max(0.0, busy_med - clean)
        print(f"  {name:<24} clean step {clean * 1e3:6.2f} ms, step during a save "
              f"{busy_med * 1e3:6.2f} ms ({len(busy) / len(blocked):4.1f} steps per save), "
              f"blocked per save {statistics.median(blocked) * 1e3:6.1f} ms "
              f"-> overhead {extra / (steps * clean) * 100:5.1f}%")


def bench_rss(workdir: str, saves: int = 200) -> None:
    import psutil

    proc = psutil.Process()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(),
                                torch.nn.Linear(1024, 256))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(32, 256)
    rss = {}
    with Checkpointer(os.path.join(workdir, "rss"), model=model, optimizer=opt, keep_last=2,
                      store_options={"fsync": False}) as ck:
        for s in range(1, saves + 1):
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            ck.save(s)
            if s in (10, 50, 100, saves):
                ck.wait()
                rss[s] = proc.memory_info().rss
        nbytes = ck.records[-1].logical_bytes
    print(f"RSS over {saves} async saves (state {nbytes / 2**20:.1f} MiB, keep_last=2):")
    for s, v in rss.items():
        print(f"  after {s:4d} saves: {v / 2**20:7.1f} MiB ({(v / rss[10] - 1) * 100:+.1f}% vs 10)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="copy,blocked,overhead,rss")
    parser.add_argument("--torch-threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}, deltackpt {deltackpt.__version__}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as workdir:
        for section in args.only.split(","):
            {"copy": bench_copy, "blocked": lambda: bench_blocked(workdir),
             "overhead": lambda: bench_overhead(workdir),
             "rss": lambda: bench_rss(workdir)}[section]()


if __name__ == "__main__":
    main()
