"""What the store would hold under other policies, computed from the index alone.

In a content-addressed store with delta chains the bytes "of a step" are not a
number: steps share blocks, and a delta block keeps its base (and the base's
base…) alive even when no kept step references the base. So a policy is
evaluated as a set ``K`` of kept steps, and its size is

    stored(K) = Σ frame length of live(K)
    live(K)   = every block referenced by a step of K, closed under ``blocks.base``

which is exactly what deleting the other steps and running ``gc`` leaves in the
index (format.md §14.4). On disk a ``gc`` keeps the dead frames of packs that are
still at least half live (it repacks only sparser ones), plus 8 bytes of magic per
pack, so the directory may be somewhat larger than ``stored(K)``.

Policies:

- ``keep_last N``: the newest N steps (as :class:`deltackpt.retention.KeepLast`);
- ``keep_every M``: steps divisible by M (as ``KeepEvery``), plus the latest step,
  which :func:`deltackpt.retention.prune` always keeps;
- ``save_every K``: a run that had saved only at steps divisible by K. Those saves
  would have stored the same blocks (ids are content hashes) but encoded against
  the previous such save, and the intermediate bases would never exist. Its size is
  *estimated* as Σ frame length of the distinct blocks those steps reference, with
  frames as stored (no chain closure): a delta across K steps usually compresses a
  little worse than the stored one, so the true size is somewhat larger.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InvalidInputError
from .stats import IndexSnapshot, RefSnapshot, ref_snapshot

if TYPE_CHECKING:
    from .store import Store

#: bytes per GB-month in cloud storage prices (AWS and GCS bill binary gigabytes)
GB = 1 << 30
#: default price per GB-month (S3 Standard, first 50 TB, us-east-1)
DEFAULT_PRICE = 0.023

_KINDS = ("keep_all", "keep_last", "keep_every", "save_every")


@dataclass(frozen=True)
class Policy:
    """One what-if policy: ``kind`` in keep_all, keep_last, keep_every, save_every."""

    kind: str
    n: int = 0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise InvalidInputError(f"unknown what-if policy {self.kind!r}; one of {_KINDS}")
        if self.kind != "keep_all" and (isinstance(self.n, bool) or not isinstance(self.n, int)
                                        or self.n < 1):
            raise InvalidInputError(f"{self.kind.replace('_', '-')} needs a count >= 1, "
                                    f"not {self.n!r}")

    @property
    def label(self) -> str:
        if self.kind == "keep_all":
            return "keep all (now)"
        return f"{self.kind.replace('_', ' ')} {self.n}"

    def kept(self, steps: np.ndarray) -> np.ndarray:
        """Boolean mask over the (ascending) committed ``steps``."""
        mask = np.zeros(steps.size, dtype=bool)
        if steps.size == 0:
            return mask
        if self.kind == "keep_all":
            mask[:] = True
        elif self.kind == "keep_last":
            mask[-self.n:] = True
        elif self.kind == "keep_every":
            mask = steps % self.n == 0
            mask[-1] = True  # prune never deletes the latest step
        else:
            mask = steps % self.n == 0
        return mask


def default_policies(steps: np.ndarray) -> list[Policy]:
    """keep-last 1/3/10, and keep-every/save-every at multiples of the usual save interval."""
    out = [Policy("keep_last", n) for n in (1, 3, 10) if n < steps.size]
    if steps.size >= 2:
        gap = int(np.median(np.diff(steps))) or 1
        out += [Policy("keep_every", gap * m) for m in (10, 100) if gap * m <= steps[-1]]
        out += [Policy("save_every", gap * m) for m in (2, 5, 10) if gap * m <= steps[-1]]
    return out


class LiveSets:
    """Computes live(K) for many K over one :class:`IndexSnapshot`."""

    def __init__(self, snap: IndexSnapshot | RefSnapshot) -> None:
        self.snap = snap
        has = np.nonzero(snap.base >= 0)[0]
        # a base is always shallower than its user (format.md §14.2), so one sweep from
        # the deepest level down closes the set; _close checks that and falls back
        order = has[np.argsort(-snap.depth[has], kind="stable")]
        depths = snap.depth[order]
        cuts = np.nonzero(np.diff(depths))[0] + 1
        self.levels = np.split(order, cuts) if order.size else []
        self.with_base = has

    def referenced(self, kept: np.ndarray) -> np.ndarray:
        live = np.zeros(self.snap.n_blocks, dtype=bool)
        live[self.snap.ref_block[kept[self.snap.ref_step]]] = True
        return live

    def live(self, kept: np.ndarray) -> np.ndarray:
        live = self.referenced(kept)
        base = self.snap.base
        for level in self.levels:
            users = level[live[level]]
            live[base[users]] = True
        while True:  # only for an index whose depths do not decrease along chains
            users = self.with_base[live[self.with_base]]
            missing = users[~live[base[users]]]
            if missing.size == 0:
                return live
            live[base[missing]] = True


def whatif(store: Store, policies: list[Policy] | None = None,
           price_per_gb_month: float = DEFAULT_PRICE,
           snap: IndexSnapshot | RefSnapshot | None = None) -> list[dict[str, Any]]:
    """One row per policy (the current store first): steps kept, stored bytes and monthly
    cost, as defined in the module docstring. No block data is read."""
    if not price_per_gb_month >= 0 or price_per_gb_month == float("inf"):
        raise InvalidInputError(f"price per GB-month must be a finite number >= 0, not "
                                f"{price_per_gb_month!r}")
    snap = snap if snap is not None else ref_snapshot(store)
    policies = default_policies(snap.steps) if policies is None else list(policies)
    live_sets = LiveSets(snap)
    rows = []
    current = None
    for policy in [Policy("keep_all"), *policies]:
        kept = policy.kept(snap.steps)
        if policy.kind == "save_every":
            live = live_sets.referenced(kept)
        else:
            live = live_sets.live(kept)
        stored = int(snap.length[live].sum())
        logical = int(snap.logical[kept].sum())
        if current is None:
            current = stored
        rows.append({
            "policy": policy.label,
            "kind": policy.kind,
            "n": policy.n,
            "estimate": policy.kind == "save_every",
            "steps_kept": int(kept.sum()),
            "blocks": int(live.sum()),
            "stored_bytes": stored,
            "full_copies_bytes": logical,
            "vs_now": stored / current if current else 0.0,
            "monthly_cost": stored / GB * price_per_gb_month,
        })
    return rows
