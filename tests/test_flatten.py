"""The state tree encoding (deltackpt/flatten.py): exact format, inverse, select, refusals."""

from __future__ import annotations

import collections
import enum
import math
import os
import struct

import numpy as np
import pytest
import torch
from helpers import assert_state_equal, dir_digest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import deltackpt
from deltackpt.flatten import (
    entry_indices,
    escape_key,
    flatten,
    join_path,
    select_tree,
    unflatten,
)

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def roundtrip_tree(state):
    tree, leaves = flatten(state)
    return unflatten(tree, {leaf.index: leaf.value for leaf in leaves})


# -- the tree format (version 1) is pinned literally -----------------------------------
def test_tree_encoding_is_pinned():
    od = collections.OrderedDict([("w", 1)])
    od._metadata = {"": {"version": 1}}
    state = {
        "f": 1.5, "neg0": -0.0, "inf": math.inf, "ninf": -math.inf, "nan": math.nan,
        2: [None, True, False, "s"], "t": (7, -(2**70)), "od": od,
        "size": torch.Size([2, 3]), "dt": torch.bfloat16, "dev": torch.device("cuda:1"),
        "np": np.float32(1.5), "npi": np.int16(-2),
    }
    tree, leaves = flatten(state)
    assert leaves == []
    assert tree == ["D", [
        ["f", ["f", "0x1.8000000000000p+0"]],
        ["neg0", ["f", "-0x0.0p+0"]],
        ["inf", ["f", "inf"]],
        ["ninf", ["f", "-inf"]],
        ["nan", ["f", "nan"]],
        [2, ["L", [None, True, False, "s"]]],
        ["t", ["T", [7, ["I", "-0x400000000000000000"]]]],
        ["od", ["O", [["w", 1]], ["D", [["", ["D", [["version", 1]]]]]]]],
        ["size", ["S", [2, 3]]],
        ["dt", ["dt", "bfloat16"]],
        ["dev", ["dev", "cuda:1"]],
        ["np", ["N", "<f4", "0000c03f"]],
        ["npi", ["N", "<i2", "feff"]],
    ]]


def test_nan_bits_and_wide_ints_are_pinned():
    neg_nan = struct.unpack("<d", struct.pack("<Q", 0xFFF8000000000000))[0]
    payload_nan = struct.unpack("<d", struct.pack("<Q", 0x7FF0000000000001))[0]
    tree, _ = flatten([neg_nan, payload_nan, 2**63 - 1, -(2**63), 2**63, -(2**63) - 1])
    assert tree == ["L", [
        ["f", "nan", "fff8000000000000"],
        ["f", "nan", "7ff0000000000001"],
        2**63 - 1,
        -(2**63),
        ["I", "0x8000000000000000"],
        ["I", "-0x8000000000000001"],
    ]]
    back = unflatten(tree, {})
    assert [struct.pack("<d", x) for x in back[:2]] == [struct.pack("<d", neg_nan),
                                                        struct.pack("<d", payload_nan)]
    assert back[2:] == [2**63 - 1, -(2**63), 2**63, -(2**63) - 1]
    assert all(type(x) is int for x in back[2:])


@pytest.mark.parametrize("node", [["f", "nan", "xyz"], ["f", "nan", 5], ["f", "0xzz"], ["f", 1.5],
                                  ["I", "12q"], ["I", 7]])
def test_malformed_float_and_int_nodes_are_refused(node):
    with pytest.raises(ValueError, match="malformed state tree"):
        unflatten(node, {})


def test_leaves_become_entries_in_tree_order():
    p = torch.nn.Parameter(torch.zeros(2, 3), requires_grad=False)
    arr = np.zeros((4,), dtype=">f4")
    state = {"a/b": {"x%": torch.ones(5, dtype=torch.int16)}, 3: [b"xyz", arr], "p": p}
    tree, leaves = flatten(state)
    assert tree == ["D", [
        ["a/b", ["D", [["x%", ["E", 0, {}]]]]],
        [3, ["L", [["E", 1, {}], ["E", 2, {}]]]],
        ["p", ["E", 3, {"requires_grad": False}]],
    ]]
    got = [(lf.index, lf.path, lf.kind, lf.dtype, lf.shape, lf.nbytes) for lf in leaves]
    assert got == [
        (0, "a%2Fb/x%25", "tensor", "int16", (5,), 10),
        (1, "3/0", "bytes", "uint8", (3,), 3),
        (2, "3/1", "ndarray", ">f4", (4,), 16),
        (3, "p", "parameter", "float32", (2, 3), 24),
    ]
    assert entry_indices(tree) == [0, 1, 2, 3]


def test_escape_key_and_join_path():
    assert escape_key("a/b%c") == "a%2Fb%25c"
    assert escape_key(12) == "12"
    assert escape_key(-3) == "-3"
    assert join_path("", "x") == "x"
    assert join_path("x", 0) == "x/0"
    assert join_path("x/y", "a/b") == "x/y/a%2Fb"


def test_unflatten_is_the_exact_inverse_on_a_state_dict_like_tree():
    od = collections.OrderedDict([("layer.weight", torch.arange(6.0).reshape(2, 3)),
                                  ("layer.bias", torch.zeros(2))])
    od._metadata = collections.OrderedDict([("", {"version": 1}), ("layer", {"version": 2})])
    state = {"model": od, "opt": {"state": {0: {"step": torch.tensor(3.0)}},
                                  "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999),
                                                    "params": [0, 1]}]},
             "rng": (3, tuple(range(5)), None), "big": 2**200, "neg": -(2**65)}
    assert_state_equal(roundtrip_tree(state), state)


def test_nan_text_in_tree_is_lossy_only_for_payloads():
    # the documented tree form of a nan is ["f", "nan"]: canonical nan survives exactly
    assert_state_equal(roundtrip_tree([math.nan]), [math.nan])


# hypothesis over trees without array leaves: fast, so many examples
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(2**300), max_value=2**300),
    st.floats(allow_nan=False), st.just(math.nan), st.just(-0.0), st.text(max_size=8),
)


def _dict_keys_ok(d: dict) -> bool:
    ints = {str(k) for k in d if type(k) is int}
    return not any(type(k) is str and k in ints for k in d)


_keys = st.one_of(st.text(max_size=6), st.integers(min_value=-(2**70), max_value=2**70))
_trees = st.recursive(
    _scalars,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4),
        st.lists(kids, max_size=4).map(tuple),
        st.dictionaries(_keys, kids, max_size=4).filter(_dict_keys_ok),
        st.dictionaries(_keys, kids, max_size=4).filter(_dict_keys_ok)
        .map(lambda d: collections.OrderedDict(d)),
    ),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(_trees)
def test_unflatten_inverts_flatten(state):
    assert_state_equal(roundtrip_tree(state), state)


# -- select_tree -----------------------------------------------------------------------
def _sample_tree():
    od = collections.OrderedDict([("w", torch.ones(2)), ("b", torch.zeros(1))])
    od._metadata = {"": {"version": 1}}
    return {"model": od, "opt": {"state": {0: {"m": torch.ones(1)}, 1: {"m": torch.ones(1)}}},
            "lst": [torch.ones(1), 5, torch.ones(1)], "a/b": torch.ones(1), "epoch": 3}


def test_select_tree_keeps_containers_above_and_metadata():
    tree, _ = flatten(_sample_tree())
    sel = select_tree(tree, ["opt/state/1", "/model/", "a%2Fb", "epoch"])
    assert sel == ["D", [
        ["model", tree[1][0][1]],
        ["opt", ["D", [["state", ["D", [[1, ["D", [["m", ["E", 3, {}]]]]]]]]]]],
        ["a/b", ["E", 6, {}]],
        ["epoch", 3],
    ]]
    assert sel[1][0][1][0] == "O" and sel[1][0][1][2] is not None  # _metadata kept
    assert entry_indices(sel) == [0, 1, 3, 6]


@pytest.mark.parametrize("bad", ["nope", "opt/state/2", "model/w/x", "epoch/x", "a/b", "lst/9"])
def test_select_tree_unknown_path_is_a_key_error_naming_it(bad):
    tree, _ = flatten(_sample_tree())
    with pytest.raises(KeyError) as ei:
        select_tree(tree, ["model", bad])
    assert bad in str(ei.value)
    assert "'model'" not in str(ei.value)


# -- refusals --------------------------------------------------------------------------
class _Custom:
    pass


class _MyTensor(torch.Tensor):
    pass


class _Color(enum.IntEnum):
    RED = 1


_Point = collections.namedtuple("_Point", "x y")


def _unsupported_cases():
    return [
        ("lambda", lambda: (lambda x: x)),
        ("set", lambda: {1, 2}),
        ("frozenset", lambda: frozenset([1])),
        ("custom object", _Custom),
        ("tensor subclass", lambda: torch.ones(2).as_subclass(_MyTensor)),
        ("sparse tensor", lambda: torch.eye(3).to_sparse()),
        ("sparse csr tensor", lambda: torch.eye(3).to_sparse_csr()),
        ("meta tensor", lambda: torch.empty(3, device="meta")),
        ("quantized tensor",
         lambda: torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)),
        ("bits8 tensor",
         lambda: torch.zeros(4, dtype=torch.uint8).view(torch.bits8)),
        ("object array", lambda: np.array([1, "a"], dtype=object)),
        ("str array", lambda: np.array(["ab"])),
        ("datetime array", lambda: np.array(["2020-01-01"], dtype="M8[D]")),
        ("structured array", lambda: np.zeros(2, dtype=[("a", "<i4"), ("b", "<f4")])),
        ("longdouble array", lambda: np.zeros(2, dtype=np.longdouble)),
        ("numpy str scalar", lambda: np.str_("x")),
        ("numpy datetime scalar", lambda: np.datetime64("2020-01-01")),
        ("non-storable torch.dtype", lambda: torch.qint8),
        ("namedtuple", lambda: _Point(1, 2)),
        ("defaultdict", lambda: collections.defaultdict(int)),
        ("IntEnum", lambda: _Color.RED),
        ("bytearray", lambda: bytearray(b"x")),
        ("complex", lambda: 1 + 2j),
        ("module", lambda: torch.nn.Linear(1, 1)),
        ("dict with tuple key", lambda: {(1, 2): 3}),
        ("dict with float key", lambda: {1.5: 3}),
        ("dict with bool key", lambda: {True: 3}),
        ("dict with None key", lambda: {None: 3}),
    ]


_ALL = _unsupported_cases()


@pytest.mark.parametrize("name,make", _ALL, ids=[c[0] for c in _ALL])
def test_unsupported_value_raises_naming_its_path(name, make):
    state = {"model": {"layers": [torch.ones(2), {"ok": 1, "bad": make()}]}}
    with pytest.raises(deltackpt.UnsupportedValueError) as ei:
        flatten(state)
    assert isinstance(ei.value, TypeError) and isinstance(ei.value, deltackpt.DeltackptError)
    # a bad value names its own path, a bad key the path of its dict: the same here
    assert "'model/layers/1/bad'" in str(ei.value), str(ei.value)


def test_unsupported_at_top_level_names_the_top_level():
    with pytest.raises(deltackpt.UnsupportedValueError, match="top level"):
        flatten({1, 2})


def test_int_and_str_key_with_same_text_and_leaves_is_refused():
    with pytest.raises(deltackpt.UnsupportedValueError, match="'x/1'"):
        flatten({"x": {1: torch.ones(1), "1": torch.zeros(1)}})
    # without array leaves the tree keeps the two keys apart: no ambiguity, no refusal
    state = {"x": {1: "int", "1": "str"}}
    assert_state_equal(roundtrip_tree(state), state)


def test_nesting_deeper_than_the_limit_is_refused():
    state: list = []
    for _ in range(300):
        state = [state]
    with pytest.raises(deltackpt.UnsupportedValueError, match="deeper"):
        flatten(state)


_SOME = _ALL[::3] + _ALL[-3:]


@pytest.mark.parametrize("name,make", _SOME, ids=[c[0] for c in _SOME])
def test_refused_save_leaves_the_store_byte_for_byte_unchanged(tmp_path, name, make):
    path = os.path.join(tmp_path, "s")
    store = deltackpt.open(path, block_size=4096)
    try:
        store.save({"w": torch.arange(3000, dtype=torch.float32)}, step=1)
        before = dir_digest(path)
        # the unsupported value comes after a valid (large) tensor in tree order
        bad = {"w": torch.arange(3000, dtype=torch.float32) + 1,
               "model": {"layers": [torch.ones(2), {"ok": 1, "bad": make()}]}}
        with pytest.raises(deltackpt.UnsupportedValueError):
            store.save(bad, step=2)
        assert dir_digest(path) == before
        assert store.steps() == [1]
        # the step number is still free and the store still works
        good = {"w": torch.arange(3000, dtype=torch.float32) + 1}
        store.save(good, step=2)
        assert_state_equal(store.load(2), good)
    finally:
        store.close()


def test_refused_save_in_memory_store_changes_nothing():
    with deltackpt.open("memory://", block_size=4096) as store:
        store.save({"a": torch.ones(2000)}, 0)
        objects_before = dict(store.backend._objects)
        with pytest.raises(deltackpt.UnsupportedValueError, match="'x/2'"):
            store.save({"a": torch.zeros(2000), "x": [1, 2, object()]}, 1)
        assert store.backend._objects == objects_before
        assert store.steps() == [0]
