"""docs/format.md is enough to read a store: tests/spec_reader.py, a reader written from the
spec alone (no deltackpt import), must rebuild every step of stores written by deltackpt
bit-exact, both from manifests and pack scans (no SQLite) and from the index.

The states exercise every tree tag, the storable dtypes, numpy arrays and scalars, odd
floats and keys; the stores every delta policy and mode, two hashes, two block sizes,
deletes with gc, thin, a repack, and a crashed save's duplicate frames.
"""

from __future__ import annotations

import collections
import os
import struct

import numpy as np
import pytest
import spec_reader
import torch
from helpers import assert_state_equal

import deltackpt

torch.set_num_threads(1)


def _state(i: int) -> dict:
    g = torch.Generator().manual_seed(7 + i)
    w = torch.randn(1500, 7, generator=torch.Generator().manual_seed(1234))
    if i:  # a training-like change: 30 % of the weights move a little
        w = w + (torch.rand(w.shape, generator=g) < 0.3) * torch.randn(w.shape, generator=g) * 1e-3
    model = collections.OrderedDict()
    model["layer.weight"] = w
    model["bias"] = (torch.arange(37, dtype=torch.float32) / (i + 1)).to(torch.bfloat16)
    model["half"] = torch.linspace(-3, 3, 3001, dtype=torch.float16) + (i % 2) * 0.001
    model["dbl"] = torch.arange(700, dtype=torch.float64) * (1.0 + 1e-12 * i)
    model["param"] = torch.nn.Parameter(torch.ones(5, 3) * (1 + i * 0.01))
    model["frozen"] = torch.nn.Parameter(torch.zeros(4), requires_grad=False)
    model["counts"] = torch.arange(1200, dtype=torch.int64) + i
    model["mask"] = torch.arange(5000) % (3 + i % 2) == 0
    model["cplx"] = torch.complex(torch.arange(600.0), torch.full((600,), float(i)))
    model["empty"] = torch.empty(0, 4)
    model["scalar"] = torch.tensor(3.25 + i)
    model["strided"] = torch.arange(64.0).reshape(8, 8).t()
    model["grad"] = torch.ones(3, requires_grad=True)
    model["u16"] = torch.arange(3000, dtype=torch.int32).to(torch.uint16)
    model["f8"] = torch.linspace(-2, 2, 100).to(torch.float8_e4m3fn)
    model["tagged"] = torch.nn.Parameter(torch.ones(6) * i)
    model["tagged"]._is_hf_initialized = True  # Python attributes (§12.1 attrs "state")
    model["tagged"].info = {"scale": 0.5 + i, "names": ["a", 2**70]}
    model._metadata = collections.OrderedDict([("", {"version": 1}), ("layer", {"version": 2})])
    exp_avg = torch.full((3000,), 0.01 * i) + torch.arange(3000) * 1e-4
    exp_avg_sq = (torch.arange(3000, dtype=torch.float32) * 1e-6 + 1e-8) * (1 + 0.05 * i)
    odd_nan = struct.unpack("<d", struct.pack("<Q", 0xFFF8000000000123))[0]
    misc = {"int": 7 + i, "big": 2**70, "nbig": -(2**64) - 31, "f": 0.1 * i, "nan": float("nan"),
            "odd_nan": odd_nan, "negzero": -0.0, "inf": float("-inf"), "flags": (True, False, None),
            "s": "héllo/%x", "b": b"\x00\x01raw" * 3, "eb": b"", "size": torch.Size([3, 4]),
            "dtype": torch.bfloat16, "dev": torch.device("cpu"), "tup": (1, (2.5, "x"), [None, ()]),
            "be": np.arange(10, dtype=">f8") * (i + 1), "i4": np.arange(-5, 5, dtype="<i4"),
            "c16": np.array([1 + 2j, -3j]), "u1": np.arange(7, dtype=np.uint8),
            "fortran": np.asfortranarray(np.arange(12.0).reshape(3, 4)),
            "scalars": [np.float32(1.5), np.int64(-3), np.bool_(True), np.dtype(">f8").type(2.0)],
            3: "int key", -1: {"nested": [1, {5: torch.tensor([1, 2])}]}, 2**70: "wide key",
            "a/b%c": torch.zeros(2), "order": {"z": 1, "a": 2}}
    tied = torch.arange(10.0)
    return {"model": model,
            "optimizer": {"state": {0: {"step": torch.tensor(float(i)), "exp_avg": exp_avg,
                                        "exp_avg_sq": exp_avg_sq}},
                          "param_groups": [{"lr": 1e-3 * 0.9**i, "betas": (0.9, 0.999),
                                            "params": [0]}]},
            "misc": misc, "unchanged": torch.arange(20000, dtype=torch.float32),
            "tied": [tied, tied], "zeros": torch.zeros(3000), "epoch": i}


STORES = {
    "chain-delete-gc-thin": dict(block_size=4096, delta="auto:chain:3"),
    "keyframe": dict(block_size=4096, delta="auto:keyframe:3"),
    "none-thin-inside-tuples": dict(block_size=4096, delta="none"),
    "xor-blake2b-8k-level5": dict(block_size=8192, delta="xor:chain:2", hash="blake2b", level=5),
    "sub-aligned": dict(block_size=4096, delta="sub:chain:4:aligned"),
}


def _build(path: str, name: str) -> None:
    with deltackpt.open(path, **STORES[name]) as s:
        for i in range(6):
            s.save(_state(i), step=(i + 1) * 10)
        if name == "chain-delete-gc-thin":
            s.delete(30)
            s.delete(20)
            s.gc(repack_threshold=0.9)  # also rewrites packs
            s.thin(50, ["model"])
        elif name == "none-thin-inside-tuples":
            s.thin(20, ["misc/tup/1", "optimizer/state/0"])


@pytest.mark.parametrize("name", list(STORES))
def test_the_spec_reader_rebuilds_every_step_bit_exact(tmp_path, name):
    path = str(tmp_path / "store")
    _build(path, name)
    with deltackpt.open(path) as store:
        steps = store.steps()
        expected = {step: store.load(step) for step in steps}
    for source in ("manifest", "index"):
        assert spec_reader.list_steps(path, source=source) == steps, source
        for step in steps:
            assert_state_equal(spec_reader.read_step(path, step, source=source), expected[step])


def test_the_spec_reader_prefers_the_resolvable_copy_after_a_crashed_save(tmp_path):
    """A save that crashed after writing its packs left frames of blocks that the retry
    wrote again: without the index, the reader must pick among duplicates (§13.5)."""
    import subprocess
    import sys
    import textwrap

    path = str(tmp_path / "store")
    _build(path, "keyframe")
    child = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})
        import deltackpt, test_spec_reader as t
        with deltackpt.open({path!r}) as s:
            s.save(t._state(7), step=70)
    """)
    env = dict(os.environ, DELTACKPT_CRASH_AT="save:after-packs")
    r = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True)
    assert r.returncode != 0  # crashed where asked
    with deltackpt.open(path) as s:
        s.save(_state(7), step=70)
        expected = s.load(70)
        indexed = {r[0] for r in s._index.query("SELECT name FROM packs")}
    on_disk = {f"packs/{d}/{f}" for d in os.listdir(os.path.join(path, "packs"))
               for f in os.listdir(os.path.join(path, "packs", d))}
    assert len(on_disk - indexed) >= 1  # the crashed save's packs, with duplicate frames
    for source in ("manifest", "index"):
        assert_state_equal(spec_reader.read_step(path, 70, source=source), expected)
