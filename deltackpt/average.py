"""Checkpoint averaging: the element-wise mean, or an exponential moving average, of steps.

Definitions, for the entries of the selection in the steps ``s_0, ..., s_{n-1}`` (in the
order given), each value first converted exactly to the accumulation dtype ``A``
(float64 for every real float dtype, complex128 for every complex one: a float32 sum of
values near its maximum overflowed, and its rounding left a third of fp32 means one ulp off):

- mean: ``acc = x_0``; ``acc = acc + x_k`` for k = 1..n-1 in order; ``acc = acc / n``;
- EMA with decay ``d``: ``acc = x_0``; ``acc = acc * d + x_k * (1 - d)`` for k = 1..n-1,
  where ``d`` and ``1 - d`` (computed in Python floats) are rounded to ``A`` and every
  product and sum is rounded to ``A`` (no fused multiply-add); a term whose weight is 0
  (``d`` = 0 or 1) is left out rather than multiplied (``inf * 0`` would be NaN). The decay
  applies once per *listed step*, oldest first: over ``n`` steps the first keeps
  ``d^(n-1)`` of the result, the last ``1 - d``;

then ``acc`` is rounded once (to nearest, ties to even) to the stored dtype (not through
float32, as torch's cast of float64 to a 16- or 8-bit float would: see :func:`round_to`). Integer,
bool and bytes entries, and every non-array value (step counters, learning rates,
...), come from the last step, which also gives the structure. Every averaged entry
must exist in every step with the same kind, dtype and shape.

The work streams block by block: each output entry is filled range by range (one
block of every step decoded, accumulated, rounded into the output), so memory is
the output state plus a few blocks per worker thread.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ._torch import torch
from .dtypes import dtype_info, numpy_dtype, torch_dtype
from .errors import CorruptionError, InvalidInputError, StepExistsError
from .export import StepReader, StoredEntry
from .flatten import unflatten
from .store import wait_all
from .tensors import empty_output, finish_output, output_bytes

if TYPE_CHECKING:
    from .store import Store


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype averages of ``dtype`` values are accumulated in."""
    return torch.complex128 if dtype.is_complex else torch.float64


def _averaged(entry: StoredEntry) -> bool:
    family = dtype_info(entry.kind, entry.dtype).family
    if family == "packed":
        raise InvalidInputError(f"entry '{entry.path}': {entry.dtype} packs two values per "
                                "byte and has no arithmetic to average with; leave it out "
                                "of the selection")
    return family in ("float", "complex")


def _elem_dtype(entry: StoredEntry) -> torch.dtype:
    if entry.kind == "ndarray":
        dt = numpy_dtype(entry.dtype)
        if not dt.isnative:
            raise InvalidInputError(f"entry '{entry.path}': cannot average a non-native "
                                    f"byte order array ({entry.dtype})")
        return torch.from_numpy(np.empty(0, dtype=dt)).dtype
    return torch_dtype(entry.dtype)


def average(
    store: Store,
    steps: Sequence[int],
    select: str | Sequence[str] | None = "model",
    *,
    ema: float | None = None,
    save_as: int | None = None,
    metrics: dict[str, Any] | None = None,
    tags: Sequence[str] | None = None,
    note: str | None = None,
) -> Any:
    """The mean (or, with ``ema=decay``, the EMA) of ``steps``' selection; see the module
    docstring for the exact arithmetic. Returns the state on the CPU, shaped like
    ``store.load(steps[-1], select=select)``; with ``save_as`` it is also saved as that
    step (``note`` defaults to what was averaged).
    """
    steps = [store._step_arg(s) for s in steps]
    if not steps:
        raise InvalidInputError(f"{store.location}: average needs at least one step")
    if len(set(steps)) != len(steps):
        raise InvalidInputError(f"{store.location}: steps {steps} name a step twice")
    if ema is not None:
        if isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0.0 <= ema <= 1.0:
            raise InvalidInputError(f"EMA decay must be a number in [0, 1], got {ema!r}")
        ema = float(ema)
    if save_as is not None:
        save_as = store._step_arg(save_as)
        if save_as in store:
            raise StepExistsError(f"{store.location}: step {save_as} already exists; delete "
                                  "it first or save the average under another step")
    for attempt in range(3):
        packs_before = store._packs_state()
        try:
            with store._closing_race():
                state = _average_once(store, steps, select, ema)
            break
        except (FileNotFoundError, CorruptionError):
            # a concurrent gc may have moved frames we planned to read: plan again, unless
            # no pack came or went and the store has nothing to catch up (real damage)
            gone = [s for s in steps if s not in store]
            if gone:
                raise store._not_found(gone[0]) from None
            if attempt == 2 or not store._worth_replanning(packs_before):
                raise
            time.sleep(0.05 * (attempt + 1))
    if save_as is not None:
        if note is None:
            what = f"EMA (decay {ema!r})" if ema is not None else "mean"
            note = f"{what} of steps {', '.join(map(str, steps))}"
        store.save(state, save_as, metrics=metrics, tags=tags, note=note)
    return state


def _average_once(store: Store, steps: list[int], select: str | Sequence[str] | None,
                  ema: float | None) -> Any:
    reader = StepReader(store, steps, select)
    last = steps[-1]
    by_path = {s: {e.path: e for e in reader.entries[s]} for s in steps}
    outputs: dict[int, Any] = {}
    tasks: list[tuple[StoredEntry, list[StoredEntry] | None, np.ndarray, int, int]] = []
    for e in reader.entries[last]:
        out = empty_output(e.kind, e.dtype, e.shape,
                           where=f"{store.location}: step {last}, entry '{e.path}'")
        view = output_bytes(out)
        outputs[e.idx] = out
        if not _averaged(e):
            tasks.append((e, None, view, 0, e.nbytes))
            continue
        sources = []
        for s in steps:
            other = by_path[s].get(e.path)
            if other is None:
                raise InvalidInputError(f"{store.location}: step {s} has no entry '{e.path}' "
                                        f"to average with step {last}")
            if (other.kind, other.dtype, other.shape) != (e.kind, e.dtype, e.shape):
                raise InvalidInputError(
                    f"{store.location}: entry '{e.path}' is {other.kind} {other.dtype} "
                    f"{list(other.shape)} in step {s} but {e.kind} {e.dtype} {list(e.shape)} "
                    f"in step {last}; cannot average")
            sources.append(other)
        _elem_dtype(e)  # refuse what cannot be averaged before any work
        # ranges of the last step's blocks: aligned with every step's blocks when the
        # block size did not change, so each block is decoded exactly once
        for a, b, _ in e.spans:
            tasks.append((e, sources, view, a, b))

    def run(task: tuple[StoredEntry, list[StoredEntry] | None, np.ndarray, int, int]) -> None:
        e, sources, view, a, b = task
        if sources is None:
            reader.read_into(last, e, view[a:b], a)
        else:
            _average_range(reader, steps, sources, _elem_dtype(e), view[a:b], a, ema)

    wait_all([store._pool.submit(run, t) for t in tasks])
    values = {i: finish_output(e.kind, outputs[e.idx], e.attrs,
                               f"{store.location}: step {last}, entry '{e.path}'")
              for i, e in ((e.idx, e) for e in reader.entries[last])}
    return unflatten(reader.trees[last], values)


def _average_range(reader: StepReader, steps: list[int], sources: list[StoredEntry],
                   dtype: torch.dtype, out: np.ndarray, start: int, ema: float | None) -> None:
    """Average the bytes [start, start + out.nbytes) of one entry over ``steps`` into ``out``."""
    acc_dtype = accumulation_dtype(dtype)
    scratch = np.empty(out.nbytes, dtype=np.uint8)
    x = torch.from_numpy(scratch).view(dtype)
    acc = torch.empty(x.shape, dtype=acc_dtype)
    for k, (s, entry) in enumerate(zip(steps, sources)):
        reader.read_into(s, entry, scratch, start)
        xa = x.to(acc_dtype)  # exact; no copy when dtype is already acc_dtype
        if k == 0:
            acc.copy_(xa)
        elif ema is None:
            acc.add_(xa)
        elif ema == 0.0:
            acc.copy_(xa)  # the newest step alone
        elif ema != 1.0:  # 1.0: the oldest step alone
            acc.mul_(ema)
            acc.add_(xa.mul(1.0 - ema))
    if ema is None:
        acc.div_(len(steps))
    torch.from_numpy(out).view(dtype).copy_(round_to(acc, dtype))


def round_to(acc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``acc`` (float64 or complex128) rounded once, to nearest with ties to even, to
    ``dtype``. torch casts float64 to the 8- and 16-bit floats through float32, which rounds
    twice: a value just above a halfway point of the target lands on it in float32 and then
    goes to the even side, one ulp off. Rounding to float32 *to odd* first keeps that
    information (the sticky bit) and makes the second rounding exact."""
    if dtype.is_complex:
        if dtype.itemsize >= 8:
            return acc.to(dtype)
        half = torch.float16  # complex32: two float16 halves, each rounded once
        return torch.complex(round_to(acc.real, half).float(),
                             round_to(acc.imag, half).float()).to(dtype)
    if dtype.itemsize >= 4:
        return acc.to(dtype)
    single = acc.to(torch.float32)
    # inexact (NaN excepted, which compares unequal to itself) and even: step one ulp toward
    # the exact value, to the odd neighbour; between the two it brackets, the odd one is
    # the round-to-odd result
    fix = (single.to(acc.dtype) != acc) & ~torch.isnan(acc) & (single.view(torch.int32) & 1 == 0)
    if bool(fix.any()):
        toward = torch.where(acc > single.to(acc.dtype), torch.inf, -torch.inf).to(torch.float32)
        single = torch.where(fix, torch.nextafter(single, toward), single)
    return single.to(dtype)
