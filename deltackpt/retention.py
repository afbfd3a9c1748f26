"""Which checkpoints to keep: small policy objects, and :func:`prune` to apply them.

A :class:`RetentionPolicy` is a union of rules, each choosing steps to keep
from the store's log:

- :class:`KeepLast` ``(n)``: the newest ``n`` steps;
- :class:`KeepBest` ``(metric, mode, k)``: the ``k`` best steps by a metric
  recorded at save time (``mode`` ``"min"`` or ``"max"``). A step whose value
  is missing, NaN, a bool or not a number is never among the best (infinities
  rank like numbers). Ties go to the *latest* step (as in :meth:`Store.best`):
  of equal values the newer step ranks higher;
- :class:`KeepEvery` ``(m)``: every step divisible by ``m``, forever.

A step is kept when any rule keeps it; the others are deleted. A policy with no
rule keeps every step. Whatever the rules say, the *protected* steps are kept
whole: the store's latest step (the one a resume would load) and any step the
caller names (the checkpointer names the step it just saved).

Thinning: with ``keep_full_last=N`` only the newest ``N`` kept steps (and the
protected ones) keep their full state; every older kept step is thinned to
``thin_keep`` (default ``("model",)``) with :meth:`Store.thin`, so a
best-by-validation step from long ago costs only its weights. A step that lacks
the ``thin_keep`` paths is left as it is.

:func:`prune` deletes first, thins second and then runs :meth:`Store.gc` so the
space really returns. Each delete and thin is atomic on its own and gc is
crash-safe, so a crash anywhere in :func:`prune` leaves a consistent store in
which every remaining step loads; running :func:`prune` (or gc) again finishes
the job.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .results import StepInfo


def metric_value(info: StepInfo, metric: str) -> float | None:
    """The step's value of ``metric`` when it can rank (a number, not NaN), else None."""
    v = info.metrics.get(metric)
    return v if _ranks(v) else None


def _ranks(v: Any) -> bool:
    """A number that can rank: int or float, not bool, not NaN (``v != v``: math.isnan
    overflows on ints past float's range, which JSON metrics may hold)."""
    return not isinstance(v, bool) and isinstance(v, (int, float)) and v == v


@dataclass(frozen=True)
class KeepLast:
    """Keep the newest ``n`` steps."""

    n: int

    def __post_init__(self) -> None:
        _check_count("keep_last", self.n, minimum=0)

    def select(self, log: Sequence[StepInfo]) -> set[int]:
        steps = sorted(i.step for i in log)
        return set(steps[-self.n:]) if self.n else set()


@dataclass(frozen=True)
class KeepBest:
    """Keep the ``k`` best steps by ``metric`` (``mode`` ``"min"`` or ``"max"``).

    NaN, missing and non-numeric values never rank; of equal values the latest
    step ranks higher.
    """

    metric: str
    mode: str = "min"
    k: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric:
            raise TypeError("keep_best metric must be a non-empty str")
        if self.mode not in ("min", "max"):
            raise ValueError(f"keep_best mode must be 'min' or 'max', not {self.mode!r}")
        _check_count("keep_best k", self.k, minimum=1)

    def ranked(self, log: Sequence[StepInfo]) -> list[tuple[int, float]]:
        """(step, value) of every step with a rankable value, best first."""
        scored = [(i.step, v) for i in log if (v := metric_value(i, self.metric)) is not None]
        sign = 1 if self.mode == "min" else -1
        # best value first; among equal values the newest step first
        scored.sort(key=lambda sv: (sign * sv[1], -sv[0]))
        return scored

    def select(self, log: Sequence[StepInfo]) -> set[int]:
        return {s for s, _ in self.ranked(log)[: self.k]}

    def would_keep(self, log: Sequence[StepInfo], value: Any) -> bool:
        """Whether a new (newest) step with ``value`` would be among the ``k`` best."""
        if not _ranks(value):
            return False
        ranked = self.ranked(log)
        if len(ranked) < self.k:
            return True
        worst = ranked[self.k - 1][1]
        # a newer step wins ties, so an equal value also gets in
        return value <= worst if self.mode == "min" else value >= worst


@dataclass(frozen=True)
class KeepEvery:
    """Keep every step divisible by ``m`` (milestones kept forever)."""

    m: int

    def __post_init__(self) -> None:
        _check_count("keep_every", self.m, minimum=1)

    def select(self, log: Sequence[StepInfo]) -> set[int]:
        return {i.step for i in log if i.step % self.m == 0}


Rule = KeepLast | KeepBest | KeepEvery


@dataclass(frozen=True)
class RetentionPlan:
    """What :meth:`RetentionPolicy.plan` decided, all ascending."""

    keep: list[int]
    delete: list[int]
    thin: list[int]


@dataclass(frozen=True)
class RetentionPolicy:
    """A union of keep rules plus optional thinning of older kept steps."""

    rules: tuple[Rule, ...] = ()
    keep_full_last: int | None = None
    thin_keep: tuple[str, ...] = ("model",)

    def __post_init__(self) -> None:
        if isinstance(self.rules, (KeepLast, KeepBest, KeepEvery)):
            raise TypeError("RetentionPolicy takes a tuple of rules: "
                            f"RetentionPolicy(({self.rules!r},))")
        for r in self.rules:
            if not isinstance(r, (KeepLast, KeepBest, KeepEvery)):
                raise TypeError(f"not a retention rule: {r!r}")
        if self.keep_full_last is not None:
            _check_count("keep_full_last", self.keep_full_last, minimum=1)
        if isinstance(self.thin_keep, str) or not self.thin_keep or \
                not all(isinstance(p, str) and p for p in self.thin_keep):
            raise TypeError("thin_keep must be a non-empty tuple of paths, e.g. ('model',)")

    @classmethod
    def from_args(
        cls,
        keep_last: int | None = None,
        keep_best: Any = None,
        keep_every: int | None = None,
        keep_full_last: int | None = None,
        thin_keep: Sequence[str] | str = ("model",),
    ) -> RetentionPolicy:
        """Build a policy from the checkpointer's keyword arguments.

        ``keep_best`` is a :class:`KeepBest`, a tuple ``(metric, mode, k)`` or
        ``(metric, mode)`` (k=1), or a list of those for several metrics.
        """
        rules: list[Rule] = []
        if keep_last is not None:
            rules.append(KeepLast(keep_last))
        rules.extend(_best_rules(keep_best))
        if keep_every is not None:
            rules.append(KeepEvery(keep_every))
        if isinstance(thin_keep, str):
            thin_keep = (thin_keep,)
        return cls(tuple(rules), keep_full_last, tuple(thin_keep))

    @property
    def best_rules(self) -> list[KeepBest]:
        return [r for r in self.rules if isinstance(r, KeepBest)]

    @property
    def active(self) -> bool:
        """Whether applying the policy can ever delete or thin anything."""
        return bool(self.rules) or self.keep_full_last is not None

    def plan(self, log: Sequence[StepInfo], protect: Iterable[int] = ()) -> RetentionPlan:
        """Decide, from the store's log, which steps to keep, delete and thin."""
        steps = sorted(i.step for i in log)
        present = set(steps)
        protected = {s for s in protect if s in present}
        if steps:
            protected.add(steps[-1])  # the step a resume would load
        if self.rules:
            keep = set(protected)
            for rule in self.rules:
                keep |= rule.select(log)
        else:
            keep = set(present)
        delete = sorted(present - keep)
        thin: list[int] = []
        if self.keep_full_last is not None:
            kept = sorted(keep)
            full = set(kept[-self.keep_full_last:]) | protected
            thin = [s for s in kept if s not in full]
        return RetentionPlan(sorted(keep), delete, thin)


def prune(store: Any, policy: RetentionPolicy | Rule, protect: Iterable[int] = (),
          gc: bool = True, set_aside: Iterable[int] = ()) -> tuple[list[int], list[int]]:
    """Apply ``policy`` to ``store``: delete, thin, then gc. Returns (deleted, thinned).

    ``policy`` is a :class:`RetentionPolicy` or one rule (``KeepLast(3)``).
    ``protect`` names steps that must stay whole besides the latest one; ``set_aside``
    steps are left out of the plan altogether (neither counted nor touched: the newer
    steps of a run that resumed from an older one). Only
    steps that actually lost entries count as thinned (thinning is idempotent).
    Space returns through :meth:`Store.gc` when anything was deleted or thinned
    (``gc=False`` leaves that to the caller).
    """
    from .store import PathNotFoundError

    if not hasattr(store, "log"):
        raise TypeError(f"prune takes an open store (deltackpt.open(...)), not "
                        f"{type(store).__name__}")
    if isinstance(policy, (KeepLast, KeepBest, KeepEvery)):
        policy = RetentionPolicy((policy,))
    if not isinstance(policy, RetentionPolicy):
        raise TypeError(f"policy must be a RetentionPolicy or a Keep* rule, not "
                        f"{type(policy).__name__}")
    aside = set(set_aside)
    plan = policy.plan([i for i in store.log() if i.step not in aside], protect)
    deleted: list[int] = []
    for s in plan.delete:
        store.delete(s)
        deleted.append(s)
    thinned: list[int] = []
    for s in plan.thin:
        try:
            if store.thin(s, list(policy.thin_keep)):
                thinned.append(s)
        except PathNotFoundError:
            continue  # nothing to thin to: keep the step as it is
    if gc and (deleted or thinned):
        reclaim(store)
    return deleted, thinned


def reclaim(store: Any) -> None:
    """Return the space of deleted/thinned steps (:meth:`Store.gc`, which also
    rewrites packs left sparse)."""
    store.gc()


def _best_rules(spec: Any) -> list[KeepBest]:
    if spec is None:
        return []
    if isinstance(spec, KeepBest):
        return [spec]
    if isinstance(spec, tuple) and spec and isinstance(spec[0], str):
        if not 1 <= len(spec) <= 3:
            raise ValueError("keep_best must be (metric, mode, k), (metric, mode) or (metric,)")
        return [KeepBest(*spec)]
    if isinstance(spec, list):
        return [r for item in spec for r in _best_rules(item)]
    raise TypeError("keep_best must be a KeepBest, a tuple (metric, mode, k) or a list of them, "
                    f"not {spec!r}")


def _check_count(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
