"""Turn a nested training state into a JSON tree plus a flat list of array leaves.

The tree keeps every container and small value exactly (types, key order, float
bits); large values (tensors, numpy arrays, bytes) become *entries* that the
store chunks into blocks. ``unflatten`` is the exact inverse. No pickle: anything
that is not one of the types below raises :class:`UnsupportedValueError` naming
its path, before the store writes a byte.

Tree encoding (format version 1; see docs/format.md):

- ``null``, ``true``/``false``, JSON integers and strings stand for themselves;
- ``["f", float.hex()]`` a float (exact, including -0.0); ``["f", "inf"]``,
  ``["f", "-inf"]``, ``["f", "nan"]`` (the canonical NaN) and ``["f", "nan", bits]``
  (any other NaN: its 64 bits as 16 hex digits);
- ``["I", hex]`` an int outside the int64 range (``hex(value)``, e.g. ``"-0x1f"``);
- ``["L", [..]]`` list, ``["T", [..]]`` tuple, ``["D", [[key, value], ..]]`` dict,
  ``["C", [[key, value], ..]]`` collections.Counter,
  ``["O", [[key, value], ..], metadata]`` OrderedDict (``metadata`` is the tree of
  a ``state_dict()``'s ``_metadata`` attribute or null); keys are str or int;
- ``["E", index, attrs]`` the entry with that index (attrs: ``{}`` or e.g.
  ``{"requires_grad": false, "device": "cuda:0"}``; ``"state"``: a ``D`` node of the
  tensor's Python attributes, plain values only);
- ``["S", [ints]]`` torch.Size, ``["dt", name]`` torch.dtype, ``["dev", str]``
  torch.device, ``["N", dtype.str, hex bytes]`` a numpy scalar.
"""

from __future__ import annotations

import collections
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._torch import torch
from .dtypes import loadable_torch_dtype, numpy_dtype, numpy_dtype_name, torch_dtype_name
from .errors import UnsupportedValueError

TREE_VERSION = 1


@dataclass
class Leaf:
    """One array-like value of the state: what the store chunks into blocks."""

    index: int
    path: str
    kind: str  # "tensor" | "parameter" | "ndarray" | "bytes"
    dtype: str
    shape: tuple[int, ...]
    value: Any = field(repr=False)
    device: str = "cpu"

    @property
    def nbytes(self) -> int:
        if self.kind == "bytes":
            return len(self.value)
        if self.kind == "ndarray":
            return int(self.value.nbytes)
        return int(self.value.numel() * self.value.element_size())


def escape_key(key: str | int) -> str:
    """Path component of a dict key or list index ('/' and '%' escaped)."""
    if isinstance(key, int):
        return str(key)
    return key.replace("%", "%25").replace("/", "%2F")


def join_path(parent: str, key: str | int) -> str:
    part = escape_key(key)
    return f"{parent}/{part}" if parent else part


def _type_name(value: Any) -> str:
    t = type(value)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def check_text(text: str, what: str) -> None:
    """Refuse a str that has no UTF-8 form (a lone surrogate such as ``"\\ud800"``):
    the index and manifests store paths and notes as UTF-8 text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UnsupportedValueError(
            f"{what} is not valid Unicode text (a lone surrogate at position {exc.start}); "
            "deltackpt stores keys as UTF-8") from None


#: int keys are written as JSON integers: at most Python's default int/str digit limit
_KEY_INT_DIGITS = 4300
_KEY_INT_LIMIT = 10**_KEY_INT_DIGITS


def check_key(key: Any, path: str) -> Any:
    """``key`` when a state may use it as a dict key (str or int, valid Unicode), else
    UnsupportedValueError naming ``path`` (flatten and the async snapshot alike)."""
    if type(key) is int:
        if key >= _KEY_INT_LIMIT or key <= -_KEY_INT_LIMIT:
            # past Python's default int/str limit a reader's JSON parser refuses the key,
            # whatever limit this process set for itself
            raise UnsupportedValueError(
                f"dict key at '{path or '/'}' is an int of more than {_KEY_INT_DIGITS} "
                "digits; use a str key")
        return key
    if type(key) is str:
        check_text(key, f"dict key {key!r} at '{path or '/'}'")
        return key
    raise UnsupportedValueError(
        f"dict key {key!r} of type {_type_name(key)} at '{path or '/'}' is not "
        "supported: keys must be str or int"
    )


def unsupported(path: str, value: Any, why: str = "") -> UnsupportedValueError:
    """The UnsupportedValueError for ``value`` at ``path`` (used by flatten and snapshot)."""
    where = f"'{path}'" if path else "the top level"
    extra = f" ({why})" if why else ""
    return UnsupportedValueError(
        f"cannot store a value of type {_type_name(value)} at {where}{extra}: deltackpt "
        "stores dict/OrderedDict/list/tuple containers with str or int keys, and "
        "int, float, bool, None, str, bytes, torch.Tensor and numpy.ndarray leaves, "
        "without pickle; convert it to one of these (e.g. its state_dict() or a str)"
    )


def check_tensor(value: torch.Tensor, path: str) -> None:
    """Raise UnsupportedValueError (naming ``path``) for a tensor with no storable bytes."""
    t = type(value)
    if t is not torch.Tensor and t is not torch.nn.Parameter:
        raise unsupported(path, value, "tensor subclasses are not storable")
    if value.layout != torch.strided:
        raise unsupported(path, value, f"layout {value.layout} is not storable; "
                           "call .to_dense() first")
    if value.is_quantized:
        raise unsupported(path, value, "quantized tensors are not storable")
    if value.is_nested:
        raise unsupported(path, value, "nested tensors are not storable; store their "
                          "components (.unbind()) as a list")
    if value.device.type == "meta":
        raise unsupported(path, value, "a meta tensor has no data")


#: instance attributes that change what a tensor *is* to torch or numpy, not data about it:
#: ``_is_param`` makes isinstance(t, Parameter) true (Parameter-ness is the entry's kind), and
#: dunder names such as ``__array_interface__`` would let a crafted file point numpy at any
#: memory address. Refused when saving and, from a damaged or crafted tree, when loading.
_RESERVED_ATTRIBUTES = frozenset({"_is_param"})


def attribute_problem(owner: type, name: Any) -> str | None:
    """Why attribute ``name`` may not be stored on (or restored onto) an ``owner``, or None."""
    if type(name) is not str:
        return f"attribute name {name!r:.40} is not a str"
    if name.startswith("__") and name.endswith("__"):
        return f"attribute {name!r:.40} is a special name"
    if name in _RESERVED_ATTRIBUTES or hasattr(owner, name):
        return f"attribute {name!r:.40} would shadow {owner.__qualname__}.{name}"
    return None


def attribute_names(value: Any, path: str, ignore: tuple[str, ...] = ()) -> list[str]:
    """Names of the Python attributes set on a tensor or OrderedDict instance (its
    ``__dict__``; ``torch.save`` keeps them), each checked: valid text, not a special name,
    not shadowing what its type defines (a method, a property) or torch's own flags."""
    names = [n for n in getattr(value, "__dict__", {}) if n not in ignore]
    for name in names:
        why = attribute_problem(type(value), name)
        if why is not None:
            raise unsupported(path, value, why)
        check_text(name, f"attribute {name!r} at '{path or '/'}'")
    return names


def check_container_attributes(value: Any, path: str) -> None:
    """Refuse attributes on a dict-like container: only an OrderedDict's ``_metadata``
    (set by ``state_dict()``) is stored."""
    if type(value) is collections.OrderedDict:
        extra = attribute_names(value, path, ignore=("_metadata",))
    elif type(value) is collections.Counter:
        extra = attribute_names(value, path)
    else:
        return
    if extra:
        raise unsupported(path, value, f"attribute {extra[0]!r} is not storable: only an "
                          "OrderedDict's _metadata is")


def path_collision(path: str) -> UnsupportedValueError:
    return UnsupportedValueError(
        f"two values map to the same path '{path}' (an int key and a str key with the same "
        "text, or an empty key, whose path is its parent's?); rename one of them")


#: why a tensor's attributes cannot hold a leaf (flatten and the async snapshot alike)
ATTRIBUTE_LEAF = ("a tensor's attributes may hold plain values (numbers, str, containers of "
                  "them), not tensors, arrays or bytes")


class _Flattener:
    def __init__(self) -> None:
        self.leaves: list[Leaf] = []
        self.paths: set[str] = set()
        #: set while walking a tensor's attributes, which hold plain values only
        self._attributes_of: str | None = None

    def add_leaf(self, path: str, kind: str, dtype: str, shape: tuple[int, ...], value: Any,
                 device: str = "cpu") -> int:
        if self._attributes_of is not None:
            raise unsupported(path, value, ATTRIBUTE_LEAF)
        if path in self.paths:
            raise path_collision(path)
        self.paths.add(path)
        leaf = Leaf(len(self.leaves), path, kind, dtype, shape, value, device)
        self.leaves.append(leaf)
        return leaf.index

    def walk(self, value: Any, path: str, depth: int = 0) -> Any:
        if depth > 200:
            raise UnsupportedValueError(f"state nested deeper than 200 levels at '{path}'")
        t = type(value)
        if value is None or t is bool or t is str:
            return value
        if t is int:
            # JSON parsers outside Python lose precision past 64 bits and Python's own
            # refuses ints over 4300 digits: wider ints are stored as hex text.
            return value if _INT64_MIN <= value <= _INT64_MAX else ["I", hex(value)]
        if t is float:
            return _float_node(value)
        if t is list or t is tuple:
            items = [self.walk(v, join_path(path, i), depth + 1) for i, v in enumerate(value)]
            return ["L" if t is list else "T", items]
        if t is dict or t is collections.OrderedDict or t is collections.Counter:
            pairs = []
            for k, v in value.items():
                k = check_key(k, path)
                pairs.append([k, self.walk(v, join_path(path, k), depth + 1)])
            if t is dict:
                return ["D", pairs]
            check_container_attributes(value, path)
            if t is collections.Counter:  # MultiStepLR's milestones
                return ["C", pairs]
            meta = getattr(value, "_metadata", None)
            meta_tree = None if meta is None else self.walk(meta, join_path(path, "@metadata"),
                                                            depth + 1)
            return ["O", pairs, meta_tree]
        if t is bytes:
            idx = self.add_leaf(path, "bytes", "uint8", (len(value),), value)
            return ["E", idx, {}]
        if isinstance(value, torch.Tensor):
            return self.tensor(value, path, depth)
        if t is np.ndarray:
            name = numpy_dtype_name(value.dtype)
            if name is None:
                raise unsupported(path, value, f"numpy dtype {value.dtype} has no fixed layout")
            idx = self.add_leaf(path, "ndarray", name, tuple(int(s) for s in value.shape), value)
            return ["E", idx, {}]
        if isinstance(value, np.generic) and t is not np.object_:
            name = numpy_dtype_name(value.dtype)
            if name is None:
                raise unsupported(path, value, f"numpy dtype {value.dtype} has no fixed layout")
            return ["N", name, value.tobytes().hex()]
        if t is torch.Size:
            return ["S", [int(s) for s in value]]
        if t is torch.dtype:
            name = torch_dtype_name(value)
            if name is None:
                raise unsupported(path, value, f"dtype {value} is not storable")
            return ["dt", name]
        if t is torch.device:
            return ["dev", str(value)]
        raise unsupported(path, value)

    def tensor(self, value: torch.Tensor, path: str, depth: int = 0) -> Any:
        t = type(value)
        check_tensor(value, path)
        kind = "parameter" if t is torch.nn.Parameter else "tensor"
        name = torch_dtype_name(value.dtype)
        if name is None:
            raise unsupported(path, value, f"dtype {value.dtype} is not storable")
        attrs: dict[str, Any] = {}
        if kind == "parameter" or value.requires_grad:
            attrs["requires_grad"] = bool(value.requires_grad)
        device = str(value.device)
        if device != "cpu":
            attrs["device"] = device
        names = attribute_names(value, path)
        if names:  # e.g. transformers' _is_hf_initialized, torch.nn.Buffer's persistent
            self._attributes_of = path
            try:
                attrs["state"] = ["D", [[n, self.walk(value.__dict__[n], f"{path}@{n}",
                                                      depth + 2)] for n in names]]
            finally:
                self._attributes_of = None
        idx = self.add_leaf(path, kind, name, tuple(int(s) for s in value.shape), value, device)
        return ["E", idx, attrs]


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_CANONICAL_NAN_BITS = struct.unpack("<Q", struct.pack("<d", math.nan))[0]


def _float_node(value: float) -> list:
    if math.isfinite(value):
        return ["f", float.hex(value)]
    if value == value:
        return ["f", "inf" if value > 0 else "-inf"]
    bits = struct.unpack("<Q", struct.pack("<d", value))[0]
    # A NaN's sign and payload are data too (float.hex drops them): keep the bits
    # unless this is the canonical NaN, so older trees stay byte-identical.
    return ["f", "nan"] if bits == _CANONICAL_NAN_BITS else ["f", "nan", f"{bits:016x}"]


def _float_from_node(node: list) -> float:
    s = node[1]
    if s == "nan" and len(node) > 2:
        bits = node[2]
        if not (isinstance(bits, str) and len(bits) == 16):
            raise _bad_tree(f"bad NaN bits {bits!r:.40}")
        try:
            return struct.unpack("<d", struct.pack("<Q", int(bits, 16)))[0]
        except ValueError:
            raise _bad_tree(f"bad NaN bits {bits!r:.40}") from None
    if s in ("nan", "inf", "-inf"):
        return float(s)
    if not isinstance(s, str):
        raise _bad_tree(f"bad float {s!r:.40}")
    try:
        return float.fromhex(s)
    except ValueError:
        raise _bad_tree(f"bad float {s!r:.40}") from None


def flatten(state: Any) -> tuple[Any, list[Leaf]]:
    """Split ``state`` into its JSON tree and its array leaves (in tree order)."""
    f = _Flattener()
    tree = f.walk(state, "")
    return tree, f.leaves


def _bad_tree(why: str) -> ValueError:
    return ValueError(f"malformed state tree: {why}")


def unflatten(tree: Any, entries: dict[int, Any]) -> Any:
    """Rebuild the state from its tree; ``entries`` maps entry index to its value.

    Entries missing from ``entries`` (not selected) are skipped together with the
    containers that hold nothing else, see :func:`prune_tree`.
    """
    return _build(tree, entries, 0)


def _build(node: Any, entries: dict[int, Any], depth: int) -> Any:
    if depth > 250:
        raise _bad_tree("nested too deep")
    if node is None or isinstance(node, (bool, str)):
        return node
    if isinstance(node, int):
        return node
    if not isinstance(node, list) or not node or not isinstance(node[0], str):
        raise _bad_tree(f"unexpected node {node!r:.80}")
    tag = node[0]
    if tag == "f":
        return _float_from_node(node)
    if tag == "I":
        try:
            return int(node[1], 16)
        except (TypeError, ValueError):
            raise _bad_tree(f"bad int {node[1]!r:.40}") from None
    if tag in ("L", "T"):
        items = [_build(v, entries, depth + 1) for v in node[1]]
        return items if tag == "L" else tuple(items)
    if tag == "D":
        return {k: _build(v, entries, depth + 1) for k, v in node[1]}
    if tag == "C":
        return collections.Counter({k: _build(v, entries, depth + 1) for k, v in node[1]})
    if tag == "O":
        od = collections.OrderedDict((k, _build(v, entries, depth + 1)) for k, v in node[1])
        if len(node) > 2 and node[2] is not None:
            od._metadata = _build(node[2], entries, depth + 1)  # type: ignore[attr-defined]
        return od
    if tag == "E":
        return entries[int(node[1])]
    if tag == "N":
        dt = numpy_dtype(node[1])
        return np.frombuffer(bytes.fromhex(node[2]), dtype=dt)[0]
    if tag == "S":
        return torch.Size(int(s) for s in node[1])
    if tag == "dt":
        return loadable_torch_dtype(node[1], " (a value in the state)")
    if tag == "dev":
        return torch.device(node[1])
    raise _bad_tree(f"unknown tag {tag!r}")


def restore_attributes(value: Any, attrs: dict[str, Any]) -> Any:
    """Set the Python attributes an ``E`` node's ``attrs["state"]`` records on ``value``
    (see :func:`attribute_names`); a state that names something its type defines, or
    holds entries, is a malformed tree."""
    node = attrs.get("state")
    if node is None:
        return value
    if not (isinstance(node, list) and len(node) == 2 and node[0] == "D"
            and isinstance(node[1], list)):
        raise _bad_tree(f"bad attribute state {node!r:.80}")
    for pair in node[1]:
        if not (isinstance(pair, list) and len(pair) == 2):
            raise _bad_tree(f"bad attribute pair {pair!r:.80}")
        why = attribute_problem(type(value), pair[0])
        if why is not None:
            raise _bad_tree(why)
    try:
        state = _build(node, {}, 1)  # an E node inside finds no entry: KeyError
    except (KeyError, TypeError, IndexError, AttributeError, RecursionError) as exc:
        raise _bad_tree(f"bad attribute state ({type(exc).__name__})") from None
    value.__dict__.update(state)
    return value


def entry_nodes(tree: Any) -> list[tuple[int, dict[str, Any]]]:
    """(index, attrs) of every entry referenced by ``tree``, in tree order."""
    out: list[tuple[int, dict[str, Any]]] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, list) and node and isinstance(node[0], str):
            tag = node[0]
            if tag == "E":
                attrs = node[2] if len(node) > 2 and isinstance(node[2], dict) else {}
                out.append((int(node[1]), attrs))
            elif tag in ("L", "T"):
                stack.extend(reversed(node[1]))
            elif tag in ("D", "O", "C"):
                # an OrderedDict's _metadata comes after its items, as flatten walks them
                if tag == "O" and len(node) > 2 and node[2] is not None:
                    stack.append(node[2])
                stack.extend(reversed([v for _, v in node[1]]))
    return out


def entry_indices(tree: Any) -> list[int]:
    """Indices of all entries referenced by ``tree``, in tree order."""
    return [i for i, _ in entry_nodes(tree)]


def select_tree(tree: Any, select: list[str]) -> Any:
    """The part of ``tree`` under the chosen paths, containers above them kept.

    A path names a dict key or list index at each level joined by '/'; selecting
    "optimizer/state" keeps ``{"optimizer": {"state": ...}}``. Paths that match
    nothing raise KeyError naming them.
    """
    # the path of a value under an empty key ends in '/' ("a/" is a[""]); elsewhere a
    # trailing '/' is only a separator ("optimizer/" selects optimizer)
    wanted = [p.lstrip("/").split("/") for p in select]
    matched = [False] * len(wanted)

    def has_empty_key(node: Any) -> bool:
        return (isinstance(node, list) and len(node) > 1 and node[0] in ("D", "O", "C")
                and any(isinstance(kv, list) and kv and kv[0] == "" for kv in node[1]))

    def walk(node: Any, prefixes: list[tuple[int, list[str]]]) -> Any:
        # prefixes: (select index, remaining components); empty remaining => whole node
        if any(rest == [""] for _, rest in prefixes) and not has_empty_key(node):
            prefixes = [(i, [] if rest == [""] else rest) for i, rest in prefixes]
        if any(not rest for _, rest in prefixes):
            for i, rest in prefixes:
                if not rest:
                    matched[i] = True
            deeper = [(i, rest) for i, rest in prefixes if rest]
            if deeper:  # overlapping paths: the whole node is kept, but they must exist
                walk(node, deeper)
            return node
        if not (isinstance(node, list) and node and node[0] in ("L", "T", "D", "O", "C")):
            return _MISSING
        tag = node[0]
        if tag in ("L", "T"):
            # Unselected items become None (up to the last selected one) so every kept
            # value stays at its stored index and its path does not change.
            items: list[Any] = []
            for idx, child in enumerate(node[1]):
                sub = [(i, r[1:]) for i, r in prefixes if r[0] == str(idx)]
                got = walk(child, sub) if sub else _MISSING
                items.append(got)
            while items and items[-1] is _MISSING:
                items.pop()
            if not items:
                return _MISSING
            return [tag, [None if v is _MISSING else v for v in items]]
        pairs = []
        for k, child in node[1]:
            sub = [(i, r[1:]) for i, r in prefixes if r[0] == escape_key(k)]
            if sub:
                got = walk(child, sub)
                if got is not _MISSING:
                    pairs.append([k, got])
        if not pairs:
            return _MISSING
        return [tag, pairs, node[2]] if tag == "O" else [tag, pairs]

    out = walk(tree, [(i, w) for i, w in enumerate(wanted)])
    missing = [select[i] for i, m in enumerate(matched) if not m]
    if missing:
        raise KeyError(", ".join(repr(m) for m in missing))
    return out


_MISSING = object()

