"""Writing restored states to files other tools read (safetensors, torch .pt)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch

from .flatten import join_path


def iter_tensors(state: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(path, tensor) for every tensor in a nested state, paths joined by '/'."""
    if isinstance(state, torch.Tensor):
        yield prefix, state
    elif isinstance(state, dict):
        for k, v in state.items():
            yield from iter_tensors(v, join_path(prefix, k))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            yield from iter_tensors(v, join_path(prefix, i))


def count_leaves(state: Any) -> int:
    if isinstance(state, dict):
        return sum(count_leaves(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(count_leaves(v) for v in state)
    return 1


def write_safetensors(state: Any, path: str | os.PathLike,
                      metadata: dict[str, str] | None = None) -> tuple[int, int]:
    """Write the tensors of ``state`` to a .safetensors file keyed by their paths.

    Returns (tensors written, other leaves left out). Written atomically.
    """
    from safetensors.torch import save_file

    tensors = {}
    for name, t in iter_tensors(state):
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        tensors[name] = t.contiguous()
    skipped = count_leaves(state) - len(tensors)
    tmp = f"{os.fspath(path)}.partial"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)
    return len(tensors), skipped


def write_pt(state: Any, path: str | os.PathLike) -> None:
    """Write the full structure with ``torch.save`` (atomically)."""
    tmp = f"{os.fspath(path)}.partial"
    torch.save(state, tmp)
    os.replace(tmp, path)
