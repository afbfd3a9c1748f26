"""Plain result records returned by the store API."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SaveResult:
    """What one ``save()`` stored."""

    step: int
    logical_bytes: int  # bytes of all array leaves of the state
    written_bytes: int  # bytes appended to packs by this save
    new_chunks: int  # blocks this save wrote
    total_chunks: int  # block references of the step
    seconds: float = 0.0

    @property
    def dedup_ratio(self) -> float:
        """Fraction of the step's blocks that were already stored."""
        return 1.0 - self.new_chunks / self.total_chunks if self.total_chunks else 1.0


@dataclass(frozen=True)
class StepInfo:
    """Metadata of one committed step (no array data is read)."""

    step: int
    created_at: float
    metrics: dict[str, Any]
    tags: list[str]
    note: str | None
    logical_bytes: int
    written_bytes: int
    new_chunks: int
    total_chunks: int
    parent: int | None
    entries: int = 0


@dataclass(frozen=True)
class EntryInfo:
    """One array leaf of a step, as the index records it."""

    path: str
    kind: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    blocks: int


@dataclass
class VerifyResult:
    """Outcome of ``verify()``: ``ok`` is False when any problem was found."""

    steps_checked: int = 0
    blocks_checked: int = 0
    bytes_checked: int = 0
    problems: list[str] = field(default_factory=list)
    #: steps with at least one problem
    damaged_steps: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class GcResult:
    """What ``gc()`` removed and rewrote."""

    bytes_freed: int
    blocks_deleted: int
    packs_deleted: int
    packs_rewritten: int
    objects_deleted: int  # leftovers of crashed saves (unreferenced packs, partials, manifests)
