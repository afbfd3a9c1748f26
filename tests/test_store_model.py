"""Model-based test of the store's life cycle: hypothesis drives random sequences of
save, delete, thin, gc (with and without repacking), reindex, reopen, prune and load
over a multi-entry training-like state, and compares the store with a plain dict of
what every kept step must give back.

The state changes the way a training run's does (most elements move a little, some
blocks stay identical, a moment tensor uses SUB deltas, a bf16 copy, an int counter)
and also the ways runs surprise a store: an entry appears, disappears, changes shape
or dtype, a step is saved below the latest, an old step is thinned to its weights.
After every rule: no delta chain is longer than the configured depth and every
block a kept step references is indexed. At the end, and at random points, every
kept step loads bit-exact and ``verify`` passes.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from helpers import assert_state_equal, entry_block_ids
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

import deltackpt
from deltackpt.delta import DeltaConfig
from deltackpt.reindex import reindex

BLOCK = 4096
SPECS = ["auto:chain:3", "xor:chain:1", "auto:keyframe:3", "auto:chain:4:aligned",
         "none"]


def _moved(t: torch.Tensor, rng: np.random.Generator, fraction: float) -> torch.Tensor:
    """``t`` after an optimiser step that touched ``fraction`` of its elements."""
    out = t.clone()
    flat = out.view(-1)
    k = int(flat.numel() * fraction)
    if k:
        idx = torch.from_numpy(rng.choice(flat.numel(), size=k, replace=False))
        scale = torch.from_numpy(1 + 1e-3 * rng.standard_normal(k)).to(t.dtype)
        flat[idx] = flat[idx] * scale
    return out


class StoreLifeCycle(RuleBasedStateMachine):
    saved = Bundle("saved")

    @initialize(spec=st.sampled_from(SPECS), seed=st.integers(0, 2**31))
    def open_store(self, spec: str, seed: int) -> None:
        self.spec = spec
        self.max_depth = DeltaConfig.parse(spec).max_depth if spec != "none" else 0
        self.rng = np.random.default_rng(seed)
        self.dir = Path(tempfile.mkdtemp(prefix="store_model_"))
        self.path = self.dir / "store"
        self.store = deltackpt.open(self.path, delta=spec, block_size=BLOCK, threads=2)
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(3 * BLOCK // 4 + 100, generator=g)  # 4 blocks, the last partial
        self.state = {
            "model": {"w": w, "b": torch.randn(64, 8, generator=g),
                      "w_bf16": w.to(torch.bfloat16)},
            "optimizer": {"state": {0: {"exp_avg": torch.zeros_like(w),
                                        "exp_avg_sq": torch.zeros_like(w),
                                        "step": torch.tensor(0.0)}},
                          "param_groups": [{"lr": 1e-3, "params": [0]}]},
            "counter": 0,
        }
        self.expected: dict[int, dict] = {}

    def teardown(self) -> None:
        store = getattr(self, "store", None)
        if store is not None:
            try:
                self.check_every_step_loads()
            finally:
                store.close()
                shutil.rmtree(self.dir, ignore_errors=True)

    # -- the training run -------------------------------------------------------------
    def _next_state(self, fraction: float, surprise: str) -> dict:
        s = copy.deepcopy(self.state)
        m, opt = s["model"], s["optimizer"]["state"][0]
        m["w"] = _moved(m["w"], self.rng, fraction)
        m["w_bf16"] = m["w"].to(torch.bfloat16)
        opt["exp_avg"] = 0.9 * opt["exp_avg"] + 0.1 * _moved(m["w"], self.rng, fraction)
        opt["exp_avg_sq"] = 0.999 * opt["exp_avg_sq"] + 0.001 * m["w"] * m["w"]
        opt["step"] = opt["step"] + 1
        s["counter"] += 1
        if surprise == "add":
            m[f"extra{s['counter']}"] = torch.randn(700, dtype=torch.float64)
        elif surprise == "drop":
            extras = [k for k in m if k.startswith("extra")]
            m.pop(extras[0] if extras else "b", None)
        elif surprise == "reshape" and "b" in m:
            m["b"] = m["b"].reshape(8, 64).contiguous() + 0
        elif surprise == "retype" and "b" in m:
            m["b"] = m["b"].to(torch.float16 if m["b"].dtype == torch.float32
                               else torch.float32)
        return s

    @rule(target=saved, fraction=st.sampled_from([0.0, 0.05, 0.5, 1.0]),
          surprise=st.sampled_from(["none"] * 6 + ["add", "drop", "reshape", "retype"]),
          gap=st.integers(1, 3))
    def save_next(self, fraction: float, surprise: str, gap: int) -> int:
        step = max([*self.expected, 0]) + gap * 10
        self.state = self._next_state(fraction, surprise)
        r = self.store.save(self.state, step=step, metrics={"loss": float(step % 7)})
        assert r.step == step
        self.expected[step] = copy.deepcopy(self.state)
        return step

    @precondition(lambda self: self.expected)
    @rule(target=saved, fraction=st.sampled_from([0.0, 0.5]))
    def save_below_latest(self, fraction: float) -> int:
        """Steps need not come in order (a resumed run re-saving an earlier step)."""
        free = [s for s in range(1, max(self.expected)) if s not in self.expected]
        if not free:
            return max(self.expected)
        step = free[int(self.rng.integers(len(free)))]
        state = self._next_state(fraction, "none")
        self.store.save(state, step=step)
        self.expected[step] = copy.deepcopy(state)
        return step

    @rule(step=consumes(saved))
    def delete(self, step: int) -> None:
        if step in self.expected:
            self.store.delete(step)
            del self.expected[step]

    @rule(step=saved)
    def thin_to_model(self, step: int) -> None:
        if step in self.expected and set(self.expected[step]) != {"model"}:
            self.store.thin(step, ["model"])
            self.expected[step] = {"model": self.expected[step]["model"]}

    @rule(repack=st.sampled_from([0.0, 0.5, 1.0]))
    def gc(self, repack: float) -> None:
        self.store.gc(repack_threshold=repack)

    @rule(keep=st.integers(1, 4), full=st.sampled_from([None, 1, 2]))
    def prune(self, keep: int, full: int | None) -> None:
        """Keep the newest ``keep`` steps, the newest ``full`` of them whole, the
        others thinned to their weights."""
        from deltackpt.retention import KeepLast, RetentionPolicy

        policy = KeepLast(keep) if full is None else RetentionPolicy((KeepLast(keep),), full)
        deleted, thinned = self.store.prune(policy)
        steps = sorted(self.expected)
        assert deleted == steps[:-keep]
        for s in deleted:
            del self.expected[s]
        kept = steps[-keep:]
        should_thin = [] if full is None else kept[:-full]
        assert thinned == [s for s in should_thin if set(self.expected[s]) != {"model"}]
        for s in should_thin:
            self.expected[s] = {"model": self.expected[s]["model"]}

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = deltackpt.open(self.path, delta=self.spec)

    @rule()
    def rebuild_index(self) -> None:
        self.store.close()
        (self.path / "index.sqlite").unlink()
        reindex(self.path)
        self.store = deltackpt.open(self.path, delta=self.spec)

    @rule(step=saved)
    def load_one(self, step: int) -> None:
        if step in self.expected:
            assert_state_equal(self.store.load(step), self.expected[step])

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def load_selected(self, data) -> None:
        step = data.draw(st.sampled_from(sorted(self.expected)))
        got = self.store.load(step, select=["model/w"])
        assert_state_equal(got, {"model": {"w": self.expected[step]["model"]["w"]}})

    # -- invariants -----------------------------------------------------------------
    @invariant()
    def steps_match(self) -> None:
        if hasattr(self, "store"):
            assert self.store.steps() == sorted(self.expected)

    @invariant()
    def chains_bounded_and_blocks_indexed(self) -> None:
        if not hasattr(self, "store"):
            return
        idx = self.store._index
        depths = [r[0] for r in idx.query("SELECT depth FROM blocks")]
        assert not depths or max(depths) <= self.max_depth, (self.spec, max(depths))
        indexed = {r[0] for r in idx.query("SELECT id FROM blocks")}
        for step in self.expected:
            for path, ids in entry_block_ids(self.store, step).items():
                missing = [b for b in ids if b not in indexed]
                assert not missing, f"step {step} {path}: {len(missing)} blocks not indexed"
        bases = {r[0] for r in idx.query("SELECT base FROM blocks WHERE base IS NOT NULL")}
        assert bases <= indexed, "a delta's base was dropped"

    def check_every_step_loads(self) -> None:
        for step, value in self.expected.items():
            assert_state_equal(self.store.load(step), value)
        result = self.store.verify()
        assert result.ok, result


StoreLifeCycle.TestCase.settings = settings(
    max_examples=40, stateful_step_count=20, deadline=None,
    suppress_health_check=list(HealthCheck))
TestStoreLifeCycle = StoreLifeCycle.TestCase
