"""Named crash points, for fault-injection tests.

Every phase boundary of save, delete, thin, gc and pack rewriting calls
:func:`crash_point` with a stable name (listed in :data:`CRASH_POINTS`). When
the environment variable ``DELTACKPT_CRASH_AT`` names that point (optionally
``NAME:N`` for its N-th hit), the process exits immediately with status 77, as
if the machine had died there. Costs one dict lookup when unset.
"""

from __future__ import annotations

import os

CRASH_POINTS = (
    "save:after-flatten",
    "save:after-hash",
    "save:mid-write",
    "save:after-packs",
    "save:after-manifest",
    "save:before-commit",
    "save:after-commit",
    "delete:before-commit",
    "delete:after-commit",
    "thin:after-manifest",
    "thin:before-commit",
    "thin:after-commit",
    "gc:after-scan",
    "gc:after-index-commit",
    "gc:mid-repack-write",
    "gc:after-repack-write",
    "gc:after-repack-commit",
    "gc:mid-delete",
    "gc:after-delete",
)
CRASH_EXIT_CODE = 77

_target: str | None = None
_nth = 1
_hits: dict[str, int] = {}


def _configure() -> None:
    global _target, _nth
    spec = os.environ.get("DELTACKPT_CRASH_AT") or None
    if spec and ":" in spec and spec.rsplit(":", 1)[1].isdigit():
        name, n = spec.rsplit(":", 1)
        _target, _nth = name, int(n)
    else:
        _target, _nth = spec, 1


_configure()


def crash_point(name: str) -> None:
    """Exit the process here if ``DELTACKPT_CRASH_AT`` names this point."""
    if _target is None or name != _target:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= _nth:
        os._exit(CRASH_EXIT_CODE)
