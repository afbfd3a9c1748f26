"""Where tensors meet bytes: zero-copy byte views of leaves, and empty outputs to fill.

Saving reads a leaf through a ``uint8`` numpy view of its memory (no copy for a
contiguous CPU tensor or array). A non-contiguous view, a conjugated/negated
view or a tensor on an accelerator is first copied into a contiguous CPU buffer;
stored bytes are always the contiguous, row-major element bytes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._torch import torch
from .dtypes import loadable_torch_dtype, numpy_dtype
from .errors import CorruptionError, InvalidInputError, UnsupportedValueError
from .flatten import Leaf, restore_attributes


def leaf_bytes(leaf: Leaf) -> np.ndarray:
    """A flat ``uint8`` array over the leaf's element bytes (a view when possible)."""
    value = leaf.value
    if leaf.kind == "bytes":
        return np.frombuffer(value, dtype=np.uint8)
    if leaf.kind == "ndarray":
        arr = np.ascontiguousarray(value)
        return arr.reshape(-1).view(np.uint8)
    t: torch.Tensor = value.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if not t.is_contiguous():
        t = contiguous(t)
    if t.numel() == 0:
        return np.empty(0, dtype=np.uint8)
    return t.reshape(-1).view(torch.uint8).numpy()


def contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t.contiguous()``, also for dtypes without a copy kernel (float4_e2m1fn_x2): their
    elements are copied as integers of the same size, bit for bit."""
    try:
        return t.contiguous()
    except (NotImplementedError, RuntimeError):
        ints = _same_size_ints(t)
        if ints is None:
            raise
        return ints.contiguous().view(t.dtype)


def copy_bits(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for tensors of one dtype, also for dtypes without a copy kernel
    (see :func:`contiguous`)."""
    try:
        dst.copy_(src)
    except (NotImplementedError, RuntimeError):
        ints = _same_size_ints(src)
        if ints is None:
            raise
        _same_size_ints(dst).copy_(ints)


def _same_size_ints(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` viewed as integers of its element size (None for sizes without one)."""
    same = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(
        t.element_size())
    return None if same is None else t.view(same)


def empty_output(kind: str, dtype: str, shape: tuple[int, ...], pin_memory: bool = False,
                 where: str = "") -> Any:
    """An uninitialised CPU value of the entry's type to decode into; ``where`` (the
    entry) prefixes the error for a dtype the installed torch lacks."""
    if kind in ("tensor", "parameter"):
        try:
            torch_dt = loadable_torch_dtype(dtype)
        except UnsupportedValueError as exc:
            raise UnsupportedValueError(f"{where}: {exc}" if where else str(exc)) from None
        return torch.empty(shape, dtype=torch_dt, pin_memory=pin_memory)
    if kind == "ndarray":
        return np.empty(shape, dtype=numpy_dtype(dtype))
    if kind == "bytes":
        return bytearray(shape[0])
    raise ValueError(f"unknown entry kind {kind!r}")


def output_bytes(value: Any) -> np.ndarray:
    """The writable flat ``uint8`` view of a value made by :func:`empty_output`."""
    if isinstance(value, torch.Tensor):
        if value.numel() == 0:
            return np.empty(0, dtype=np.uint8)
        return value.reshape(-1).view(torch.uint8).numpy()
    if isinstance(value, np.ndarray):
        return value.reshape(-1).view(np.uint8)
    return np.frombuffer(value, dtype=np.uint8)


def finish_output(kind: str, value: Any, attrs: dict[str, Any], where: str = "entry") -> Any:
    """Turn a filled output into the leaf type the tree asks for; a malformed attribute
    state in ``attrs`` raises CorruptionError naming ``where``."""
    if kind == "bytes":
        return bytes(value)
    if not isinstance(value, torch.Tensor):
        return value
    # only float and complex tensors can require grad: a tree that says otherwise is
    # not obeyed (torch would raise)
    grad_ok = value.is_floating_point() or value.is_complex()
    if kind == "parameter":
        value = torch.nn.Parameter(
            value, requires_grad=grad_ok and bool(attrs.get("requires_grad", True)))
    elif attrs.get("requires_grad") is True and grad_ok:
        value = value.requires_grad_(True)
    try:
        return restore_attributes(value, attrs)
    except ValueError as exc:
        raise CorruptionError(f"{where}: {exc}") from None


def move(value: Any, map_location: Any, saved_device: str) -> Any:
    """Place a restored CPU tensor like ``torch.load(map_location=...)`` would: the moved
    value is a leaf again, a Parameter stays a Parameter, ``requires_grad`` is kept (a
    callable ``map_location`` gets the tensor, detached, and the saved device)."""
    if not isinstance(value, torch.Tensor):
        return value
    target: Any
    data = value.detach()
    if map_location is None:
        target = saved_device
    elif callable(map_location):
        moved = map_location(data, saved_device)
        if moved is None or moved is data:
            return value
        return _as_restored(moved, value) if isinstance(moved, torch.Tensor) else moved
    elif isinstance(map_location, dict):
        target = map_location.get(saved_device, saved_device)
    else:
        target = map_location
    target = torch.device(target)
    if target.type == "cpu":
        return value
    if target.type == "cuda":
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (target.index or 0) >= have:
            raise InvalidInputError(
                f"a tensor saved on {saved_device} would go to {target}, and this machine "
                f"has {have} CUDA device(s); pass map_location='cpu' (or a dict or callable) "
                "to load it elsewhere")
    return _as_restored(data.to(target, non_blocking=True), value)


def _as_restored(moved: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``moved`` with ``like``'s type (Parameter or not), ``requires_grad`` and Python
    attributes, as a leaf."""
    if isinstance(like, torch.nn.Parameter):
        out = torch.nn.Parameter(moved.detach(), requires_grad=like.requires_grad)
    elif like.requires_grad:
        out = moved.detach().requires_grad_(True)
    else:
        out = moved
    if like.__dict__ and out is not like:
        out.__dict__.update(like.__dict__)
    return out
