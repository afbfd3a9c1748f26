"""Retention policies: keep_last / keep_best / keep_every / keep_full_last, as a union.

The policy is checked against an independent brute-force oracle on a log with
ties, NaN, missing and non-numeric metrics, for every combination of options;
then :func:`prune` is run on real stores, and crashed in the middle of its
deletes and its gc (in a subprocess) to show the store stays consistent.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import deltackpt
from deltackpt.faults import CRASH_EXIT_CODE
from deltackpt.results import StepInfo
from deltackpt.retention import (
    KeepBest,
    KeepEvery,
    KeepLast,
    RetentionPolicy,
    prune,
    reclaim,
)

NAN = float("nan")
# step -> metrics; ties on loss (0.3 at 3, 4, 7; 0.2 at 9 and 12), NaN, missing, bool, str
METRICS = {
    1: {"loss": 0.5, "acc": 0.1},
    2: {"loss": NAN, "acc": 0.8},
    3: {"loss": 0.3, "acc": 0.2},
    4: {"loss": 0.3},
    5: {},
    6: {"loss": 0.9, "acc": NAN},
    7: {"loss": 0.3, "acc": 0.8},
    8: {"loss": NAN, "acc": True},
    9: {"loss": 0.2, "acc": "n/a"},
    10: {"loss": 0.6, "acc": 0.8},
    11: {"loss": True, "acc": 0.5},
    12: {"loss": 0.2},
    13: {"loss": NAN},
}


def make_log(metrics=METRICS) -> list[StepInfo]:
    return [StepInfo(s, float(s), m, [], None, 0, 0, 0, 0, None, 0)
            for s, m in sorted(metrics.items())]


def rankable(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and not math.isnan(v)


def oracle_best(metrics, metric, mode, k) -> set[int]:
    """A step is among the k best when fewer than k rankable steps beat it
    (a better value, or the same value at a later step)."""
    vals = {s: m[metric] for s, m in metrics.items() if rankable(m.get(metric))}

    def beats(t, s):
        a, b = vals[t], vals[s]
        better = a < b if mode == "min" else a > b
        return better or (a == b and t > s)

    return {s for s in vals if sum(beats(t, s) for t in vals if t != s) < k}


def oracle(metrics, keep_last, keep_best, keep_every, keep_full_last, protect=()):
    steps = sorted(metrics)
    latest = steps[-1]
    prot = {latest} | {p for p in protect if p in metrics}
    any_rule = keep_last is not None or keep_best is not None or keep_every is not None
    if not any_rule:
        keep = set(steps)
    else:
        keep = set(prot)
        if keep_last:
            keep |= {s for s in steps if sum(t > s for t in steps) < keep_last}
        if keep_best is not None:
            keep |= oracle_best(metrics, *keep_best)
        if keep_every is not None:
            keep |= {s for s in steps if s % keep_every == 0}
    thin = set()
    if keep_full_last is not None:
        thin = {s for s in keep if sum(t > s for t in keep) >= keep_full_last} - prot
    return keep, set(steps) - keep, thin


BESTS = [None, ("loss", "min", 1), ("loss", "min", 2), ("loss", "min", 3), ("acc", "max", 1),
         ("acc", "max", 2)]


@pytest.mark.parametrize("keep_last,keep_best,keep_every,keep_full_last", list(itertools.product(
    [None, 0, 1, 3], BESTS, [None, 4, 5], [None, 1, 2])))
def test_policy_matches_oracle(keep_last, keep_best, keep_every, keep_full_last):
    policy = RetentionPolicy.from_args(keep_last, keep_best, keep_every, keep_full_last)
    for protect in [(), (3,), (2, 8)]:
        plan = policy.plan(make_log(), protect)
        keep, delete, thin = oracle(METRICS, keep_last, keep_best, keep_every, keep_full_last,
                                    protect)
        assert set(plan.keep) == keep
        assert set(plan.delete) == delete
        assert set(plan.thin) == thin
        assert 13 in plan.keep and 13 not in plan.thin  # the latest: what resume loads
        assert all(p in plan.keep and p not in plan.thin for p in protect)


def test_best_ties_latest_wins_and_nan_never_best():
    log = make_log()
    assert KeepBest("loss", "min", 1).select(log) == {12}  # 0.2 at 9 and 12: latest wins
    assert KeepBest("loss", "min", 2).select(log) == {9, 12}
    assert KeepBest("loss", "min", 3).select(log) == {7, 9, 12}  # then the latest 0.3
    assert KeepBest("acc", "max", 1).select(log) == {10}  # 0.8 at 2, 7, 10
    assert KeepBest("loss", "max", 1).select(log) == {6}  # NaN/True never rank
    ranked = [s for s, _ in KeepBest("loss", "min", 1).ranked(log)]
    assert ranked == [12, 9, 7, 4, 3, 1, 10, 6]
    only_nan = make_log({1: {"loss": NAN}, 2: {"loss": NAN}})
    assert KeepBest("loss").select(only_nan) == set()


def recordable(metrics: dict) -> dict:
    """NaN as the checkpointer records it while the store's manifest is strict JSON."""
    return {k: ("nan" if isinstance(v, float) and math.isnan(v) else v)
            for k, v in metrics.items()}


def test_store_records_nan_metrics(store):
    store.save({"w": torch.ones(1)}, 1, metrics={"loss": NAN})
    assert math.isnan(store.info(1).metrics["loss"])


def test_best_agrees_with_store_best(store):
    for s, m in METRICS.items():
        store.save({"model": {"w": torch.tensor([float(s)])}}, s, metrics=recordable(m))
    for metric, mode in [("loss", "min"), ("loss", "max"), ("acc", "max"), ("acc", "min")]:
        assert {store.best(metric, mode)} == KeepBest(metric, mode, 1).select(store.log())


def test_would_keep():
    log = make_log()
    rule = KeepBest("loss", "min", 2)  # current best two: 0.2 (12), 0.2 (9)
    assert rule.would_keep(log, 0.1)
    assert rule.would_keep(log, 0.2)  # a tie: the newer step wins
    assert not rule.would_keep(log, 0.25)
    assert not rule.would_keep(log, NAN)
    assert not rule.would_keep(log, True)
    assert KeepBest("loss", "min", 20).would_keep(log, 99.0)  # fewer than k ranked
    assert KeepBest("acc", "max", 1).would_keep(log, 0.8)


def test_policy_validation():
    with pytest.raises(ValueError):
        KeepLast(-1)
    with pytest.raises(TypeError):
        KeepLast(1.5)
    with pytest.raises(ValueError):
        KeepBest("loss", "median")
    with pytest.raises(ValueError):
        KeepBest("loss", "min", 0)
    with pytest.raises(ValueError):
        KeepEvery(0)
    with pytest.raises(ValueError):
        RetentionPolicy(keep_full_last=0)
    with pytest.raises(TypeError):
        RetentionPolicy(thin_keep="model")
    with pytest.raises(TypeError):
        RetentionPolicy.from_args(keep_best=3)
    assert RetentionPolicy.from_args(keep_best=("loss", "max")).rules == (KeepBest("loss", "max"),)
    two = RetentionPolicy.from_args(keep_best=[("loss", "min", 2), KeepBest("acc", "max")])
    assert len(two.best_rules) == 2
    assert RetentionPolicy.from_args(thin_keep="model").thin_keep == ("model",)
    assert not RetentionPolicy().active
    assert RetentionPolicy().plan(make_log()).delete == []


# -- on real stores -----------------------------------------------------------------------


def _state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {
        "model": {"w": torch.randn(64 * 1024, generator=g), "b": torch.full((7,), float(step))},
        "optimizer": {"m": torch.randn(192 * 1024, generator=g)},
        "step": step,
    }


def _fill(store, steps, metrics=METRICS):
    for s in steps:
        store.save(_state(s), s, metrics=recordable(metrics.get(s, {})))


def _assert_full(store, s):
    out = store.load(s)
    ref = _state(s)
    assert set(out) == {"model", "optimizer", "step"}
    assert torch.equal(out["model"]["w"], ref["model"]["w"])
    assert torch.equal(out["optimizer"]["m"], ref["optimizer"]["m"])


def _assert_thin(store, s):
    out = store.load(s)
    assert set(out) == {"model"}
    assert torch.equal(out["model"]["w"], _state(s)["model"]["w"])


@pytest.mark.parametrize("kwargs", [
    dict(keep_last=2),
    dict(keep_best=("loss", "min", 2)),
    dict(keep_every=4),
    dict(keep_last=1, keep_best=("loss", "min", 1), keep_every=5),
    dict(keep_last=3, keep_full_last=1),
    dict(keep_last=2, keep_best=("acc", "max", 2), keep_every=4, keep_full_last=2),
    dict(keep_full_last=3),
])
def test_prune_store(store, kwargs):
    _fill(store, METRICS)
    policy = RetentionPolicy.from_args(**kwargs)
    before = store.stored_bytes()
    keep, delete, thin = oracle(METRICS, kwargs.get("keep_last"), kwargs.get("keep_best"),
                                kwargs.get("keep_every"), kwargs.get("keep_full_last"),
                                protect=(12,))
    deleted, thinned = prune(store, policy, protect=(12,))
    assert set(deleted) == delete
    assert set(thinned) == thin
    assert set(store.steps()) == keep
    for s in keep:
        (_assert_thin if s in thin else _assert_full)(store, s)
    assert store.verify().ok
    if deleted or thinned:
        assert store.stored_bytes() < before  # gc gave the space back
    # idempotent: nothing left to do, and nothing re-thinned
    assert prune(store, policy, protect=(12,)) == ([], [])


def test_prune_skips_steps_without_thin_paths(store):
    store.save({"weights": torch.ones(10)}, 1)
    store.save({"model": torch.ones(10), "opt": torch.zeros(10)}, 2)
    store.save({"model": torch.ones(10), "opt": torch.zeros(10)}, 3)
    deleted, thinned = prune(store, RetentionPolicy(keep_full_last=1))
    assert deleted == [] and thinned == [2]
    assert set(store.load(1)) == {"weights"}


def test_prune_then_gc_reclaims_repacked_space(store):
    # a pack with a little live data and a lot of dead data gets rewritten
    a, b = torch.randn(100_000), torch.randn(900_000)
    store.save({"model": a, "optimizer": b}, 1)
    store.save({"model": a}, 2)
    deleted, _ = prune(store, RetentionPolicy.from_args(keep_last=1))
    assert deleted == [1]
    assert store.stored_bytes() < 600_000
    assert torch.equal(store.load(2)["model"], a)
    assert store.verify().ok


# -- crashes in the middle of retention ----------------------------------------------------

CHILD = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_retention import _state, METRICS
    import deltackpt
    from deltackpt.retention import RetentionPolicy, prune
    with deltackpt.open({path!r}) as store:
        prune(store, RetentionPolicy.from_args(keep_last=2, keep_best=("loss", "min", 1),
                                               keep_full_last=1))
    print("finished")
""")


@pytest.mark.parametrize("point", [
    "delete:before-commit", "delete:after-commit", "delete:after-commit:3", "gc:after-scan",
    "gc:after-repack-write", "gc:after-repack-commit", "gc:mid-delete", "gc:after-delete"])
def test_crash_during_prune_leaves_consistent_store(store_path, point):
    with deltackpt.open(store_path) as store:
        _fill(store, METRICS)
    code = CHILD.format(tests=os.path.dirname(__file__), path=store_path)
    env = dict(os.environ, DELTACKPT_CRASH_AT=point)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == CRASH_EXIT_CODE, proc.stderr
    with deltackpt.open(store_path) as store:
        steps = store.steps()
        assert {12, 13} <= set(steps)
        assert store.verify().ok, store.verify().problems
        for s in steps:  # every remaining step loads, thinned or whole
            out = store.load(s)
            assert torch.equal(out["model"]["w"], _state(s)["model"]["w"])
        _assert_full(store, 13)  # what resume would load is untouched
        # finishing the job: the same outcome as an uninterrupted prune
        policy = RetentionPolicy.from_args(keep_last=2, keep_best=("loss", "min", 1),
                                           keep_full_last=1)
        prune(store, policy)
        assert store.steps() == [12, 13]
        _assert_thin(store, 12)
        _assert_full(store, 13)
        reclaim(store)  # what a crash left behind (the checkpointer does this once per run)
        again = store.gc(repack_threshold=0.0)
        assert again.objects_deleted == 0 and again.bytes_freed == 0  # no leftovers remain
        assert store.verify().ok


def test_int_metrics_past_float_range_rank_and_prune_like_store_best():
    """A JSON metric may be an int too large for a float: KeepBest ranks it exactly
    (math.isnan would overflow), as Store.best does, and prune completes."""
    with deltackpt.open("memory://") as store:
        for step, score in ((1, 10**400), (2, 5), (3, 10**400 + 1), (4, float("nan"))):
            store.save({"w": torch.ones(1) * step}, step, metrics={"score": score})
        assert store.best("score", "max") == 3
        assert KeepBest("score", "max", 2).select(store.log()) == {1, 3}
        assert KeepBest("score", "max", 1).would_keep(store.log(), 10**401)
        deleted, _ = store.prune(KeepBest("score", "max", 2))
        assert deleted == [2] and store.steps() == [1, 3, 4]  # the latest step stays


def test_retention_arguments_that_are_not_what_they_should_be_say_so():
    with pytest.raises(TypeError, match=r"tuple of rules: RetentionPolicy\(\(KeepLast"):
        RetentionPolicy(KeepLast(3))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="open store"):
        deltackpt.prune("some/path", KeepLast(1))  # type: ignore[arg-type]
