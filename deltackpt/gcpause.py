"""Python's cyclic garbage collector held off while a save builds its bookkeeping.

A process that imports torch tracks ~250,000 objects, so one full collection takes ~0.1 s
on the 2-core CI machine. A DCP save makes tens of thousands of short-lived containers
(per-chunk write results, DCP's metadata description, index rows) that live long enough to
be promoted to the oldest generation, and then set off about one full collection per save
(docs/benchmarks.md, "DCP storage plugin"). Nothing in them is cyclic, so they are freed by
reference counting. With the collector held off, they die in the youngest generation and
never count towards a full collection.

The pause raises the youngest generation's threshold rather than calling ``gc.disable()``,
so it never touches the collector's on/off switch: a program that turns the collector off
(or on) while a save runs keeps its choice. The threshold is put back when the last pause
ends (pauses are counted across threads: overlapping saves, an async save beside the
training thread), unless someone else changed it meanwhile. A process forked during a
pause (a DataLoader worker) starts with the thresholds the pause replaced.
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: allocations before a young collection while paused: never, in practice, and a value no
#: program sets, so the pause can tell its own threshold from someone else's
HELD_THRESHOLD = (1 << 30) + 7

_lock = threading.Lock()
_depth = 0
_saved: tuple[int, ...] | None = None


def _pause() -> None:
    global _depth, _saved
    with _lock:
        if _depth == 0:
            current = gc.get_threshold()
            if current[0] != HELD_THRESHOLD:
                _saved = current
                gc.set_threshold(HELD_THRESHOLD, *current[1:])
        _depth += 1


def _resume() -> None:
    global _depth
    with _lock:
        _depth -= 1
        if _depth == 0:
            _restore()


def _restore() -> None:
    global _saved
    current = gc.get_threshold()
    if _saved is not None and current[0] == HELD_THRESHOLD:
        gc.set_threshold(_saved[0], *current[1:])
    _saved = None


def _after_fork_in_child() -> None:
    # the pausing threads did not come along: nothing in the child would end their pause
    global _lock, _depth
    _lock = threading.Lock()
    _depth = 0
    _restore()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Run the body without automatic garbage collections; restore the threshold after."""
    _pause()
    try:
        yield
    finally:
        _resume()
