"""Exact resume: an interrupted and resumed run equals the uninterrupted one, bit for bit.

The training run is small but has everything that makes resuming hard: dropout
(the torch RNG), input noise from NumPy's and Python's global RNGs, a shuffling
DataLoader whose sampler state (a torch.Generator plus the position within the
epoch) is registered as extra state, AdamW and a LambdaLR schedule. The run is
interrupted in-process at arbitrary steps, killed for real with SIGKILL in a
subprocess (while a background save is in flight, and at arbitrary points, more
than once), and crashed inside a save's pack write; each time a new process
resumes and finishes. Loss curves, parameters and optimizer state are compared
by their float bits, never with a tolerance.

Run as a script (``python tests/test_resume.py --store DIR ...``) this file is
the training child the SIGKILL tests start; it prints one line per step:
``step <n> <loss as float.hex> <1 if a save is in flight>``.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

import deltackpt
from deltackpt.checkpointer import Checkpointer

N_SAMPLES, N_FEATURES, N_CLASSES, BATCH = 200, 32, 4, 16  # 13 batches per epoch
TOTAL, EVERY = 60, 5


class ResumableRandomSampler(Sampler[int]):
    """A random sampler that can resume in the middle of an epoch.

    Each epoch's order is ``randperm`` from ``generator``. ``state_dict`` holds
    the generator state at the start of the current epoch and how many indices
    were handed out, so a resumed run re-draws the same order, skips what was
    consumed, and leaves the generator where the uninterrupted run leaves it.
    """

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n = n
        self.generator = generator
        self.epoch_start = generator.get_state()
        self.offset = 0
        self._resuming = False

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        if self._resuming:
            self.generator.set_state(self.epoch_start)
            self._resuming = False
        else:
            self.epoch_start = self.generator.get_state()
            self.offset = 0
        order = torch.randperm(self.n, generator=self.generator).tolist()
        for i in order[self.offset:]:
            self.offset += 1
            yield i

    def state_dict(self) -> dict:
        return {"epoch_start": self.epoch_start, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch_start = state["epoch_start"]
        self.offset = state["offset"]
        self._resuming = True


@dataclass
class Run:
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    sampler: ResumableRandomSampler
    loader: DataLoader


def make_run(seed: int = 0) -> Run:
    """A fresh run; every RNG is seeded here (a resumed run overwrites them all)."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(N_SAMPLES, N_FEATURES, generator=g)
    y = torch.randint(0, N_CLASSES, (N_SAMPLES,), generator=g)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(N_FEATURES, 256), torch.nn.GELU(), torch.nn.Dropout(0.2),
        torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Dropout(0.2),
        torch.nn.Linear(256, N_CLASSES))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * 0.5 ** (s // 20))
    sampler = ResumableRandomSampler(N_SAMPLES, torch.Generator().manual_seed(seed + 1))
    # the loader gets a generator of its own: creating an iterator draws a seed from it
    # (for worker processes), which must not consume the global torch RNG on resume
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, sampler=sampler,
                        generator=torch.Generator())
    return Run(model, opt, sched, sampler, loader)


def checkpointer(run: Run, store, **kwargs) -> Checkpointer:
    ck = Checkpointer(store, model=run.model, optimizer=run.opt, scheduler=run.sched,
                      every_n_steps=EVERY, **kwargs)
    ck.register("sampler", run.sampler)
    return ck


def train(run: Run, start: int, total: int, ckpt: Checkpointer | None = None,
          on_step=None, stop_at: int | None = None) -> None:
    """Train from ``start`` (completed steps) to ``total``; ``stop_at`` interrupts."""
    step = start
    while step < total:
        for x, y in run.loader:
            step += 1
            # input noise from NumPy's and Python's global RNGs, dropout from torch's
            noise = torch.from_numpy(np.random.standard_normal(x.shape).astype(np.float32))
            x = x + noise * (0.05 * random.random())
            run.model.train()
            loss = torch.nn.functional.cross_entropy(run.model(x), y)
            run.opt.zero_grad(set_to_none=True)
            loss.backward()
            run.opt.step()
            run.sched.step()
            if ckpt is not None:
                ckpt.step(step)
            if on_step is not None:
                on_step(step, loss.item())
            if step >= total or step == stop_at:
                return


def bits(value) -> object:
    """A comparable image of a state in which every float is represented by its bits."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        return ("T", str(t.dtype), tuple(t.shape), t.view(-1).view(torch.uint8).numpy().tobytes())
    if isinstance(value, dict):
        return ("D", tuple((k, bits(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(bits(v) for v in value))
    if isinstance(value, float):
        return ("f", value.hex())
    return value


def full_state(run: Run) -> dict:
    return {"model": dict(run.model.state_dict()), "optimizer": run.opt.state_dict(),
            "scheduler": run.sched.state_dict(), "sampler": run.sampler.state_dict()}


_REFERENCE: dict = {}


def reference() -> tuple[dict[int, str], object]:
    """The uninterrupted run without any checkpointing: loss bits per step, final state."""
    if not _REFERENCE:
        torch.set_num_threads(1)
        run = make_run()
        losses: dict[int, str] = {}
        train(run, 0, TOTAL, on_step=lambda s, v: losses.__setitem__(s, v.hex()))
        _REFERENCE["losses"] = losses
        _REFERENCE["final"] = bits(full_state(run))
    return _REFERENCE["losses"], _REFERENCE["final"]


def assert_matches_reference(losses: dict[int, str]) -> None:
    ref, _ = reference()
    assert losses, "no steps"
    diff = [s for s, v in losses.items() if ref[s] != v]
    assert not diff, f"loss bits differ from the uninterrupted run at steps {diff[:10]}"


def assert_final_state_matches(store_path: str) -> None:
    _, ref_final = reference()
    with deltackpt.open(store_path) as store:
        assert store.latest() == TOTAL
        saved = store.load(TOTAL)
    got = {"model": dict(saved["model"]), "optimizer": saved["optimizer"],
           "scheduler": saved["scheduler"], "sampler": saved["extra"]["sampler"]}
    assert bits(got) == ref_final


def seed_for(store_path: str, other: int) -> int:
    """A new run seeds like the reference; a run that will resume gets other RNG states
    (which resume() must overwrite)."""
    with deltackpt.open(store_path) as store:
        return 0 if store.latest() is None else other


# -- in-process interruptions ------------------------------------------------------------


def test_checkpointing_does_not_perturb_training(store_path):
    losses: dict[int, str] = {}
    run = make_run()
    with checkpointer(run, store_path) as ck:
        assert ck.resume() == 0
        train(run, 0, TOTAL, ck, on_step=lambda s, v: losses.__setitem__(s, v.hex()))
    assert losses == reference()[0]
    assert bits(full_state(run)) == reference()[1]
    assert_final_state_matches(store_path)


@pytest.mark.parametrize("async_save", [True, False])
@pytest.mark.parametrize("stops", [(7,), (13, 26), (39,), (3, 4, 5, 31, 52)])
def test_interrupt_and_resume_in_process(store_path, async_save, stops):
    """Stop at each point in ``stops`` (13 and 26 are epoch ends), throw every object away,
    build a new run with other seeds, resume, continue."""
    losses: dict[int, str] = {}
    record = losses.__setitem__
    for i, stop in enumerate((*stops, None)):
        run = make_run(seed=seed_for(store_path, 100 + i))  # fresh objects, other RNGs
        with checkpointer(run, store_path, async_save=async_save) as ck:
            start = ck.resume()
            assert start == (0 if i == 0 else stops[i - 1] // EVERY * EVERY)
            train(run, start, TOTAL, ck, on_step=lambda s, v: record(s, v.hex()), stop_at=stop)
    assert_matches_reference(losses)
    assert sorted(losses) == list(range(1, TOTAL + 1))
    assert_final_state_matches(store_path)


def test_resume_with_retention_and_thinning(store_path):
    """Retention never removes what resume needs."""
    losses: dict[int, str] = {}
    for i, stop in enumerate((23, 41, None)):
        run = make_run(seed=seed_for(store_path, 7 + i))
        with checkpointer(run, store_path, keep_last=1, keep_every=20, keep_full_last=1) as ck:
            start = ck.resume()
            train(run, start, TOTAL, ck, on_step=lambda s, v: losses.__setitem__(s, v.hex()),
                  stop_at=stop)
    assert_matches_reference(losses)
    assert_final_state_matches(store_path)
    with deltackpt.open(store_path) as store:
        assert store.steps() == [20, 40, 60]
        assert set(store.load(20)) == {"model"}


# -- real process deaths ---------------------------------------------------------------------


def run_child(store_path: str, kill_when=None, env: dict | None = None, slow_save: float = 0.0,
              step_sleep: float = 0.0, timeout: float = 120.0):
    """Run the training child; SIGKILL it as soon as ``kill_when(step, in_flight)`` holds.

    Returns (resumed-from step, {step: loss hex}, exit status, whether a save was in
    flight when the kill was sent).
    """
    cmd = [sys.executable, os.path.abspath(__file__), "--store", store_path,
           "--slow-save", str(slow_save), "--step-sleep", str(step_sleep)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, **(env or {})))
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    start, losses, killed_in_flight = None, {}, None
    try:
        for line in proc.stdout:
            parts = line.split()
            if parts and parts[0] == "resumed":
                start = int(parts[1])
            elif len(parts) >= 4 and parts[0] == "step":  # a kill may cut the last line
                step, in_flight = int(parts[1]), parts[3] == "1"
                losses[step] = parts[2]
                if kill_when is not None and kill_when(step, in_flight):
                    os.kill(proc.pid, signal.SIGKILL)
                    killed_in_flight = in_flight
                    break
        rc = proc.wait(timeout)
        err = proc.stderr.read()
    finally:
        watchdog.cancel()
        proc.stdout.close()
        proc.stderr.close()
    assert start is not None, err
    return start, losses, rc, killed_in_flight, err


def test_sigkill_while_a_save_is_in_flight(store_path):
    # saves are slowed to 0.6 s, so the kill lands while the step-15 save is running
    start1, losses1, rc, in_flight, err = run_child(
        store_path, kill_when=lambda s, f: s >= 15 and f, slow_save=0.6)
    assert start1 == 0 and rc == -signal.SIGKILL, err
    assert in_flight
    with deltackpt.open(store_path) as store:
        assert store.steps() == [5, 10]  # step 15 was never committed
        assert store.verify().ok
    start2, losses2, rc2, _, err2 = run_child(store_path)
    assert rc2 == 0, err2
    assert start2 == 10
    assert_matches_reference(losses1)
    assert_matches_reference(losses2)
    assert sorted(losses2) == list(range(11, TOTAL + 1))
    assert_final_state_matches(store_path)


def test_sigkill_twice_at_arbitrary_points(store_path):
    curve: dict[int, str] = {}
    starts = []
    for kill_at in (23, 47, None):
        kill = None if kill_at is None else (lambda s, f, k=kill_at: s >= k)
        start, losses, rc, _, err = run_child(store_path, kill_when=kill, step_sleep=0.01)
        assert rc == (0 if kill_at is None else -signal.SIGKILL), err
        assert_matches_reference(losses)
        curve.update(losses)
        starts.append(start)
    assert starts[0] == 0 and starts[1] in (15, 20) and starts[2] in (40, 45)
    assert sorted(curve) == list(range(1, TOTAL + 1))
    assert_final_state_matches(store_path)


def test_crash_inside_a_pack_write(store_path):
    # the third save dies after its first block is appended to a pack
    start, losses, rc, _, err = run_child(store_path,
                                          env={"DELTACKPT_CRASH_AT": "save:mid-write:3"})
    assert rc == 77, err
    # the background save may kill the process before step 15's line is printed
    assert start == 0 and max(losses) >= 14
    start2, losses2, rc2, _, err2 = run_child(store_path)
    assert rc2 == 0 and start2 == 10, err2
    assert_matches_reference(losses)
    assert_matches_reference(losses2)
    assert_final_state_matches(store_path)
    with deltackpt.open(store_path) as store:
        assert store.verify().ok
        assert store.gc().objects_deleted >= 1  # the crashed save's partial pack


def child_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--slow-save", type=float, default=0.0)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    run = make_run(seed=seed_for(args.store, 555))
    ck = checkpointer(run, args.store)
    if args.slow_save:
        real_save = ck.store.save

        def slow_save(*a, **kw):
            time.sleep(args.slow_save)
            return real_save(*a, **kw)

        ck.store.save = slow_save
    start = ck.resume()
    print("resumed", start, flush=True)

    def report(step: int, loss: float) -> None:
        print("step", step, loss.hex(), int(ck.in_flight), flush=True)
        if args.step_sleep:
            time.sleep(args.step_sleep)

    train(run, start, TOTAL, ck, on_step=report)
    ck.close()
    print("done", flush=True)


if __name__ == "__main__":
    child_main(sys.argv[1:])
