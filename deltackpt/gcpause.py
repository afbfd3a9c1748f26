"""Python's cyclic garbage collector held off while a save builds its bookkeeping.

A process that imports torch tracks ~250,000 objects, so one full collection takes ~0.1 s
on the 2-core CI machine. A DCP save makes tens of thousands of short-lived containers
(per-chunk write results, DCP's metadata description, index rows) that live long enough to
be promoted to the oldest generation, and then set off about one full collection per save
(docs/benchmarks.md, "DCP storage plugin"). Nothing in them is cyclic, so they are freed by
reference counting. With the collector off, they die in the youngest generation and never
count towards a full collection.

The pause is counted across threads (overlapping saves through one writer, an async save
beside the training thread): the collector comes back when the last pause ends, and only
if it was enabled when the first began.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_depth = 0
_reenable = False


@contextmanager
def gc_paused() -> Iterator[None]:
    """Run the body with ``gc`` disabled; restore the collector's state after it."""
    global _depth, _reenable
    with _lock:
        if _depth == 0:
            _reenable = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _reenable:
                gc.enable()
