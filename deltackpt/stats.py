"""Storage-cost figures computed from the index alone (no block data is read)."""

from __future__ import annotations

from typing import Any

from .store import Store


def store_stats(store: Store) -> dict[str, Any]:
    """Per-step and total logical/written/stored bytes, dedup and compression ratios.

    ``dedup_ratio`` is the fraction of a step's block references that were
    already stored; ``compression_ratio`` is the raw size of the blocks the step
    wrote over the bytes written for them (frames, deltas included).
    """
    idx = store._index
    raw_by_step = dict(
        (s, (raw, length)) for s, raw, length in idx.query(
            "SELECT first_step, SUM(raw_len), SUM(length) FROM blocks GROUP BY first_step"))
    steps = []
    cumulative = 0
    logical_total = 0
    for info in store.log():
        raw, length = raw_by_step.get(info.step, (0, 0))
        cumulative += info.written_bytes
        logical_total += info.logical_bytes
        steps.append({
            "step": info.step,
            "logical_bytes": info.logical_bytes,
            "written_bytes": info.written_bytes,
            "cumulative_stored_bytes": cumulative,
            "full_copies_bytes": logical_total,
            "new_chunks": info.new_chunks,
            "total_chunks": info.total_chunks,
            "dedup_ratio": 1 - info.new_chunks / info.total_chunks if info.total_chunks else 1.0,
            "compression_ratio": (raw / length) if length else 1.0,
        })
    stored = store.stored_bytes()
    return {
        "steps": steps,
        "total": {
            "steps": len(steps),
            "logical_bytes": logical_total,
            "stored_bytes": stored,
            "stored_fraction": stored / logical_total if logical_total else 0.0,
        },
    }
