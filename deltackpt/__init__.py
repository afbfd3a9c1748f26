"""deltackpt: incremental, content-addressed, bit-exact storage of PyTorch training checkpoints.

>>> import deltackpt
>>> with deltackpt.open("ckpts") as store:          # doctest: +SKIP
...     store.save({"model": model.state_dict()}, step=100, metrics={"val_loss": 2.3})
...     state = store.load(100)
"""

from __future__ import annotations

import os
from typing import Any

from .backend import Backend, LocalBackend, MemoryBackend
from .checkpointer import Checkpointer, SaveRecord
from .codec import CodecConfig
from .delta import DeltaConfig
from .errors import (
    BackgroundSaveError,
    CorruptionError,
    DeltackptError,
    FormatVersionError,
    InvalidInputError,
    InvalidStoreError,
    StepExistsError,
    StepNotFoundError,
    StoreClosedError,
    StoreLockedError,
    UnsupportedValueError,
)
from .export import ExportResult
from .results import EntryInfo, GcResult, SaveResult, StepInfo, VerifyResult
from .retention import KeepBest, KeepEvery, KeepLast, RetentionPolicy, prune
from .store import PathNotFoundError, Store, open_store

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "Checkpointer",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "RetentionPolicy",
    "SaveRecord",
    "prune",
    "BackgroundSaveError",
    "CodecConfig",
    "CorruptionError",
    "DeltaConfig",
    "DeltackptError",
    "EntryInfo",
    "ExportResult",
    "FormatVersionError",
    "GcResult",
    "InvalidInputError",
    "InvalidStoreError",
    "LocalBackend",
    "MemoryBackend",
    "PathNotFoundError",
    "SaveResult",
    "StepExistsError",
    "StepInfo",
    "StepNotFoundError",
    "Store",
    "StoreClosedError",
    "StoreLockedError",
    "UnsupportedValueError",
    "VerifyResult",
    "open",
]


def open(path: str | os.PathLike | Backend, **options: Any) -> Store:  # noqa: A001
    """Open the store at ``path``, creating it when missing.

    ``path`` is a directory, ``"memory://"`` for a throw-away in-memory store, an
    object-storage URL (``"s3://bucket/prefix"``, ``"gs://…"``, ``"fsspec+memory://…"``;
    docs/object-storage.md: extra options ``cache_dir``, ``storage_options``,
    ``filesystem``, ``lease_ttl``, ``pack_size``, ``part_size``, ``max_concurrency``,
    ``readahead``), or a :class:`Backend`. Options (fixed at creation unless noted):
    ``block_size`` (bytes, default 1 MiB), ``hash`` (``"xxh3_128"`` or
    ``"blake2b"``), ``level`` (zstd level, per session), ``delta`` (``"auto"`` =
    ``"auto:chain:4"``, the default; ``"xor"``, ``"sub"``, ``"none"``, or
    ``"MODE:keyframe:8"``; keyframes are staggered over saves, ``":aligned"`` at the end
    refreshes every block at once; per session), ``fsync``
    (default True: a returned save survives power loss), ``threads``,
    ``lock_timeout`` (seconds to wait for another writer), ``base_cache_bytes``
    (memory kept for the next save's delta bases). Use it as a context manager
    or call ``close()``.
    """
    return open_store(path, **options)


#: integrations with optional dependencies: ``deltackpt.lightning`` works after a plain
#: ``import deltackpt`` (imported on first use, so ``import deltackpt`` stays light)
_LAZY_SUBMODULES = frozenset({"lightning", "hf", "dcp", "remote", "fsspec_backend", "reindex",
                              "stats", "diff", "whatif", "report", "average", "importer"})


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'deltackpt' has no attribute {name!r}")
