"""The dtypes deltackpt stores, by their stable on-disk names.

Only dtypes with a fixed, platform-independent byte layout are storable. The
on-disk name of a torch dtype is its attribute name in ``torch`` (``"bfloat16"``);
numpy arrays are recorded by ``numpy.dtype.str`` (``"<f4"``), byte order included.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ._torch import torch
from .errors import UnsupportedValueError


@dataclass(frozen=True)
class DtypeInfo:
    """Layout facts of one storable dtype."""

    name: str
    itemsize: int
    #: width of the byte groups the codec splits elements into (a float inside a complex)
    group_width: int
    #: bit layout hint for float-aware codecs: "float", "int", "bool", "complex", "packed"
    family: str


_TORCH_NAMES = [
    # name, itemsize, family (the layout is the dtype's, whatever torch build reads it)
    ("float64", 8, "float"),
    ("float32", 4, "float"),
    ("float16", 2, "float"),
    ("bfloat16", 2, "float"),
    ("float8_e4m3fn", 1, "float"),
    ("float8_e4m3fnuz", 1, "float"),
    ("float8_e5m2", 1, "float"),
    ("float8_e5m2fnuz", 1, "float"),
    ("float8_e8m0fnu", 1, "float"),
    # two 4-bit floats packed in each byte: stored as bytes, never averaged
    ("float4_e2m1fn_x2", 1, "packed"),
    ("int8", 1, "int"),
    ("int16", 2, "int"),
    ("int32", 4, "int"),
    ("int64", 8, "int"),
    ("uint8", 1, "int"),
    ("uint16", 2, "int"),
    ("uint32", 4, "int"),
    ("uint64", 8, "int"),
    ("bool", 1, "bool"),
    ("complex32", 4, "complex"),
    ("complex64", 8, "complex"),
    ("complex128", 16, "complex"),
]

#: layout facts by on-disk name, known without importing torch (index-only commands)
_LAYOUT: dict[str, DtypeInfo] = {
    name: DtypeInfo(name, size, size // 2 if family == "complex" else size, family)
    for name, size, family in _TORCH_NAMES
}


@functools.cache
def _torch_tables() -> tuple[dict[str, torch.dtype], dict[str, DtypeInfo],
                             dict[torch.dtype, str]]:
    dtypes: dict[str, torch.dtype] = {}
    for name, size, _family in _TORCH_NAMES:
        dt = getattr(torch, name, None)
        if not isinstance(dt, torch.dtype) or dt.itemsize != size:  # older torch without it
            continue
        dtypes[name] = dt
    info = {name: _LAYOUT[name] for name in dtypes}
    return dtypes, info, {v: k for k, v in dtypes.items()}


def __getattr__(name: str) -> object:
    # TORCH_DTYPES (name -> torch.dtype) and TORCH_INFO (name -> DtypeInfo) of the
    # installed torch, built on first use
    if name == "TORCH_DTYPES":
        return _torch_tables()[0]
    if name == "TORCH_INFO":
        return _torch_tables()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: numpy kinds with a fixed layout: bool, signed/unsigned int, float, complex
_NUMPY_KINDS = {"b": "bool", "i": "int", "u": "int", "f": "float", "c": "complex"}


def torch_dtype_name(dtype: torch.dtype) -> str | None:
    """On-disk name of a torch dtype, or None when it is not storable."""
    return _torch_tables()[2].get(dtype)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for an on-disk name; KeyError when unknown."""
    return _torch_tables()[0][name]


def loadable_torch_dtype(name: str, what: str = "") -> torch.dtype:
    """:func:`torch_dtype`, or :class:`UnsupportedValueError` saying that the installed
    torch lacks it (a store written with a newer torch); ``what`` describes the value."""
    try:
        return torch_dtype(name)
    except KeyError:
        raise UnsupportedValueError(f"dtype {name}{what} is not available in torch "
                                    f"{torch.__version__}; a newer torch loads it") from None


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
        return _LAYOUT[name]
    if kind == "ndarray":
        dt = numpy_dtype(name)
        family = _NUMPY_KINDS[dt.kind]
        width = dt.itemsize // 2 if family == "complex" else dt.itemsize
        return DtypeInfo(name, dt.itemsize, width, family)
    if kind == "bytes":
        return DtypeInfo("uint8", 1, 1, "int")
    raise KeyError(kind)
