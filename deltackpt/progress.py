"""Progress bars (tqdm) that stay out of scripts' way.

A bar is shown only when stderr is a terminal and the caller did not ask for
quiet output; ``--json`` output goes to stdout and is never mixed with it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def enabled(quiet: bool = False) -> bool:
    """True when a progress bar should be drawn (stderr is a TTY and not ``quiet``)."""
    return not quiet and sys.stderr.isatty()


def progress(
    iterable: Iterable[T],
    desc: str,
    *,
    total: int | None = None,
    unit: str = "it",
    quiet: bool = False,
    unit_scale: bool = False,
) -> Iterator[T]:
    """Iterate over ``iterable`` with a bar on stderr when :func:`enabled`."""
    if not enabled(quiet):
        yield from iterable
        return
    yield from tqdm(iterable, desc=desc, total=total, unit=unit, unit_scale=unit_scale,
                    file=sys.stderr, leave=False, dynamic_ncols=True)


def bar(total: int, desc: str, *, unit: str = "B", quiet: bool = False) -> Any:
    """A manual bar (call ``.update(n)``, use as a context manager); a no-op when disabled."""
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B",
                unit_divisor=1024 if unit == "B" else 1000, file=sys.stderr, leave=False,
                dynamic_ncols=True, disable=not enabled(quiet))
