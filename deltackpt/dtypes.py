"""The dtypes deltackpt stores, by their stable on-disk names.

Only dtypes with a fixed, platform-independent byte layout are storable. The
on-disk name of a torch dtype is its attribute name in ``torch`` (``"bfloat16"``);
numpy arrays are recorded by ``numpy.dtype.str`` (``"<f4"``), byte order included.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class DtypeInfo:
    """Layout facts of one storable dtype."""

    name: str
    itemsize: int
    #: width of the byte groups the codec splits elements into (a float inside a complex)
    group_width: int
    #: bit layout hint for float-aware codecs: "float", "int", "bool", "complex"
    family: str


_TORCH_NAMES = [
    # name, family
    ("float64", "float"),
    ("float32", "float"),
    ("float16", "float"),
    ("bfloat16", "float"),
    ("float8_e4m3fn", "float"),
    ("float8_e4m3fnuz", "float"),
    ("float8_e5m2", "float"),
    ("float8_e5m2fnuz", "float"),
    ("float8_e8m0fnu", "float"),
    ("int8", "int"),
    ("int16", "int"),
    ("int32", "int"),
    ("int64", "int"),
    ("uint8", "int"),
    ("uint16", "int"),
    ("uint32", "int"),
    ("uint64", "int"),
    ("bool", "bool"),
    ("complex32", "complex"),
    ("complex64", "complex"),
    ("complex128", "complex"),
]

TORCH_DTYPES: dict[str, torch.dtype] = {}
TORCH_INFO: dict[str, DtypeInfo] = {}
for _name, _family in _TORCH_NAMES:
    _dt = getattr(torch, _name, None)
    if not isinstance(_dt, torch.dtype):  # older torch without this dtype
        continue
    _size = _dt.itemsize
    TORCH_DTYPES[_name] = _dt
    TORCH_INFO[_name] = DtypeInfo(
        _name, _size, _size // 2 if _family == "complex" else _size, _family
    )
_TORCH_BY_DTYPE: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}

#: numpy kinds with a fixed layout: bool, signed/unsigned int, float, complex
_NUMPY_KINDS = {"b": "bool", "i": "int", "u": "int", "f": "float", "c": "complex"}


def torch_dtype_name(dtype: torch.dtype) -> str | None:
    """On-disk name of a torch dtype, or None when it is not storable."""
    return _TORCH_BY_DTYPE.get(dtype)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for an on-disk name; KeyError when unknown."""
    return TORCH_DTYPES[name]


def numpy_dtype_name(dtype: np.dtype) -> str | None:
    """On-disk name (``dtype.str``) of a numpy dtype, or None when it is not storable."""
    if dtype.fields is not None or dtype.subdtype is not None:
        return None
    if dtype.kind not in _NUMPY_KINDS:
        return None
    if dtype.kind == "f" and dtype.itemsize not in (2, 4, 8):
        return None  # longdouble's layout differs between platforms
    if dtype.kind == "c" and dtype.itemsize not in (8, 16):
        return None
    return dtype.str


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype for an on-disk name; KeyError when unknown or not storable."""
    try:
        dt = np.dtype(name)
    except TypeError as exc:
        raise KeyError(name) from exc
    if numpy_dtype_name(dt) != name:
        raise KeyError(name)
    return dt


def dtype_info(kind: str, name: str) -> DtypeInfo:
    """Layout facts for an entry's (kind, dtype name); KeyError when unknown."""
    if kind in ("tensor", "parameter"):
        return TORCH_INFO[name]
    if kind == "ndarray":
        dt = numpy_dtype(name)
        family = _NUMPY_KINDS[dt.kind]
        width = dt.itemsize // 2 if family == "complex" else dt.itemsize
        return DtypeInfo(name, dt.itemsize, width, family)
    if kind == "bytes":
        return DtypeInfo("uint8", 1, 1, "int")
    raise KeyError(kind)
