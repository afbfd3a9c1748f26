"""Copy a training state into host buffers that are reused from one save to the next.

An asynchronous save must not read the live tensors from a background thread
while training keeps updating them, so the caller first takes a *snapshot*: a
tree of the same shape whose containers are new and whose tensors and arrays
are private host copies. :class:`HostSnapshot` keeps those copies between
saves (keyed by the leaf's path in the state, reused while its dtype and shape
stay the same), so a training run allocates its checkpoint buffers once and
never page-faults fresh memory on later saves. Buffers of leaves that disappear
from the state are dropped at the next snapshot.

How the copy is done (measured on 2 shared CPU cores, 138 MiB fp32 tensor,
median of 7, see ``benchmarks/bench_checkpointer.py``):

================================  ==========  ==================================
copy                              idle        a zstd thread busy beside it
================================  ==========  ==================================
``Tensor.copy_``, 1 torch thread  31 ms       57 ms
``Tensor.copy_``, 2 torch threads 37 ms       68 ms
``numpy.copyto`` of uint8 views   17 ms       56 ms
================================  ==========  ==================================

So a contiguous CPU tensor is copied as raw bytes with ``numpy.copyto`` (a
plain ``memcpy``, no dtype dispatch): it is the fastest, and it never enters
torch's intra-op thread pool, so the snapshot neither depends on nor changes
``torch.set_num_threads`` (which is process-global and would race with the
training thread). Only rare leaves fall back to ``Tensor.copy_`` in the caller
thread: non-contiguous views, tensors with a lazy conjugate/negative bit, and
tensors on an accelerator. A CUDA tensor is copied with ``non_blocking=True``
into a *pinned* host buffer, and the snapshot synchronises each source device's
current stream before returning, so the host copy is complete when
:meth:`HostSnapshot.take` returns.

Tensors that alias each other (tied weights: same storage, offset, shape,
strides and dtype) are copied once and share one buffer in the snapshot.

Only what :mod:`deltackpt.flatten` stores is accepted (the same checks, made during
the copy: types, dtypes, keys, colliding paths, attributes); anything else raises
:class:`~deltackpt.errors.UnsupportedValueError` naming its path right away, in
the caller's thread, instead of failing later in the background
(``tests/test_checkpointer.py`` holds the two to the same verdicts).
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np

from ._torch import torch
from .dtypes import numpy_dtype_name, torch_dtype_name
from .errors import UnsupportedValueError
from .flatten import (
    ATTRIBUTE_LEAF,
    attribute_names,
    check_container_attributes,
    check_key,
    check_tensor,
    join_path,
    path_collision,
    unsupported,
)
from .tensors import copy_bits

_PLAIN = (type(None), bool, int, float, str, bytes)


class _Buffer:
    __slots__ = ("tensor", "flat", "pinned")

    def __init__(self, tensor: Any, pinned: bool) -> None:
        self.tensor = tensor
        self.pinned = pinned
        if isinstance(tensor, torch.Tensor):
            self.flat = (tensor.reshape(-1).view(torch.uint8).numpy()
                         if tensor.numel() else None)
        else:
            self.flat = None


class HostSnapshot:
    """Private host copies of a state, in buffers reused across :meth:`take` calls.

    Not thread-safe: one thread takes snapshots, and the caller must not take a
    new one while a previous snapshot is still being read (the checkpointer
    waits for the in-flight save first). ``pin_memory`` forces pinned buffers on
    or off; by default they are pinned exactly when the source is a CUDA tensor.
    """

    def __init__(self, pin_memory: bool | None = None) -> None:
        self._pin = pin_memory
        self._buffers: dict[str, _Buffer] = {}
        self._used: set[str] = set()
        self._aliases: dict[tuple, Any] = {}
        self._sync_devices: set[torch.device] = set()
        #: paths of the leaves (tensors, arrays, bytes) of the snapshot being taken: two
        #: values with one path are refused as flatten refuses them
        self._leaf_paths: set[str] = set()
        self._in_attributes = False

    # -- public -----------------------------------------------------------------
    def take(self, state: Any) -> Any:
        """Copy ``state`` into the buffers; returns the snapshot tree.

        The returned tree is valid until the next call to ``take`` (which reuses
        its buffers) or :meth:`release`.
        """
        self._used = set()
        self._aliases = {}
        self._sync_devices = set()
        try:
            self._leaf_paths = set()
            out = self._walk(state, "", 0)
            for dev in self._sync_devices:
                torch.cuda.current_stream(dev).synchronize()
        finally:
            self._aliases = {}
            self._sync_devices = set()
            self._leaf_paths = set()
            self._in_attributes = False
        for path in [p for p in self._buffers if p not in self._used]:
            del self._buffers[path]
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of host memory the buffers hold now."""
        total = 0
        for b in self._buffers.values():
            t = b.tensor
            total += t.numel() * t.element_size() if isinstance(t, torch.Tensor) else t.nbytes
        return total

    def release(self) -> None:
        """Drop every buffer."""
        self._buffers.clear()
        self._used = set()

    # -- walking ----------------------------------------------------------------
    def _walk(self, value: Any, path: str, depth: int) -> Any:
        if depth > 200:
            raise UnsupportedValueError(f"state nested deeper than 200 levels at '{path}'")
        t = type(value)
        if t is bytes:
            self._leaf(path, value)
            return value
        if t in _PLAIN or t is torch.Size or t is torch.device:
            return value
        if t is torch.dtype:
            if torch_dtype_name(value) is None:
                raise unsupported(path, value, f"dtype {value} is not storable")
            return value
        if t is list:
            return [self._walk(v, join_path(path, i), depth + 1) for i, v in enumerate(value)]
        if t is tuple:
            return tuple(self._walk(v, join_path(path, i), depth + 1)
                         for i, v in enumerate(value))
        if t is dict or t is collections.OrderedDict or t is collections.Counter:
            check_container_attributes(value, path)
            out = t()
            for k, v in value.items():
                k = check_key(k, path)  # before join_path, which assumes a valid key
                out[k] = self._walk(v, join_path(path, k), depth + 1)
            meta = getattr(value, "_metadata", None) if t is collections.OrderedDict else None
            if meta is not None:
                out._metadata = self._walk(meta, join_path(path, "@metadata"), depth + 1)
            return out
        if isinstance(value, torch.Tensor):
            return self._tensor(value, path, depth)
        if t is np.ndarray:
            return self._array(value, path)
        if isinstance(value, np.generic) and t is not np.object_:
            if numpy_dtype_name(value.dtype) is None:  # as flatten would refuse it, now
                raise unsupported(path, value, f"numpy dtype {value.dtype} has no fixed layout")
            return value  # numpy scalars are immutable
        raise unsupported(path, value)

    def _leaf(self, path: str, value: Any) -> None:
        """Register a leaf's path: what :mod:`deltackpt.flatten` refuses, refused now."""
        if self._in_attributes:
            raise unsupported(path, value, ATTRIBUTE_LEAF)
        if path in self._leaf_paths:
            raise path_collision(path)
        self._leaf_paths.add(path)

    def _buffer(self, path: str, make: Any, match: Any) -> _Buffer:
        buf = self._buffers.get(path)
        if buf is None or not match(buf):
            buf = make()
            self._buffers[path] = buf
        self._used.add(path)
        return buf

    def _tensor(self, src: torch.Tensor, path: str, depth: int) -> torch.Tensor:
        check_tensor(src, path)
        if torch_dtype_name(src.dtype) is None:
            raise unsupported(path, src, f"dtype {src.dtype} is not storable")
        self._leaf(path, src)
        key = None
        if src.numel():
            key = (src.device, src.untyped_storage().data_ptr(), src.storage_offset(),
                   tuple(src.shape), src.stride(), src.dtype, src.is_conj(), src.is_neg())
            done = self._aliases.get(key)
            if done is not None:
                return self._with_attributes(_as_type(done, src), done, src, path, depth)
        is_cuda = src.device.type == "cuda"
        pin = bool(is_cuda and torch.cuda.is_available()) if self._pin is None else self._pin
        shape, dtype = tuple(src.shape), src.dtype

        def make() -> _Buffer:
            return _Buffer(torch.empty(shape, dtype=dtype, pin_memory=pin), pin)

        def match(b: _Buffer) -> bool:
            bt = b.tensor
            return (isinstance(bt, torch.Tensor) and bt.dtype == dtype
                    and tuple(bt.shape) == shape and b.pinned == pin)

        buf = self._buffer(path, make, match)
        dst = buf.tensor
        data = src.detach()
        if src.numel() == 0:
            pass
        elif (data.device.type == "cpu" and data.is_contiguous() and not data.is_conj()
              and not data.is_neg()):
            np.copyto(buf.flat, data.reshape(-1).view(torch.uint8).numpy())
        elif is_cuda:
            dst.copy_(data, non_blocking=True)
            self._sync_devices.add(data.device)
        else:
            copy_bits(dst, data)
        if key is not None:
            self._aliases[key] = dst
        return self._with_attributes(_as_type(dst, src), dst, src, path, depth)

    def _with_attributes(self, out: torch.Tensor, buf: torch.Tensor, src: torch.Tensor,
                         path: str, depth: int) -> torch.Tensor:
        """``out`` with copies of ``src``'s Python attributes, never set on the reused
        buffer itself (a later snapshot of a tensor without them would inherit them)."""
        names = attribute_names(src, path)
        if not names:
            return out
        if out is buf:
            out = buf.detach()  # a new tensor object on the same memory
        self._in_attributes = True
        try:
            for name in names:
                out.__dict__[name] = self._walk(src.__dict__[name], f"{path}@{name}",
                                                depth + 2)
        finally:
            self._in_attributes = False
        return out

    def _array(self, src: np.ndarray, path: str) -> np.ndarray:
        if numpy_dtype_name(src.dtype) is None:  # objects, records, strings, datetimes...
            raise unsupported(path, src, f"numpy dtype {src.dtype} has no fixed layout")
        self._leaf(path, src)
        shape, dtype = src.shape, src.dtype

        def make() -> _Buffer:
            return _Buffer(np.empty(shape, dtype=dtype), False)

        def match(b: _Buffer) -> bool:
            bt = b.tensor
            return isinstance(bt, np.ndarray) and bt.dtype == dtype and bt.shape == shape

        buf = self._buffer(path, make, match)
        np.copyto(buf.tensor, src, casting="no")
        return buf.tensor


def _as_type(buf: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    if type(src) is torch.nn.Parameter:
        return torch.nn.Parameter(buf, requires_grad=src.requires_grad)
    if src.requires_grad:
        return buf.detach().requires_grad_(True)  # a new leaf: the buffer stays reusable
    return buf

