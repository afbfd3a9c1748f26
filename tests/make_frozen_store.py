"""Build tests/data/frozen_store_v1: a tiny store that pins on-disk format version 1.

Run once, from the repository root, when a NEW format version is introduced
(write a new ``frozen_store_vN`` then; never regenerate v1)::

    .venv/bin/python tests/make_frozen_store.py [OUT_DIR]

The states are pure functions of fixed seeds (tests/helpers.py ``det_*``, plain
integer arithmetic: no torch or numpy RNG), so tests regenerate the expected
values and compare every loaded step bit for bit. The store holds:

- step 100 and step 200: tensors of several dtypes (float32, bfloat16, float16,
  float64, int64, uint8, bool, complex64, float8_e4m3fn), a Parameter, numpy
  arrays ('>f4', '<i2'), bytes, an OrderedDict with ``_metadata``, dict/list/
  tuple trees, int keys, big ints, -0.0/inf/nan floats, torch.Size/dtype/device
  and a numpy scalar; metrics, tags and a note;
- step 200 changes a few elements of ``model/w``: one block is stored as an xor
  delta against the step-100 block;
- step 150 was saved with a tensor of its own, then deleted and garbage
  collected (its pack is gone).

The lock file is removed and the index is checkpointed (no -wal/-shm files).
"""

from __future__ import annotations

import collections
import math
import os
import shutil
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import det_array, det_bytes, det_floats, det_tensor  # noqa: E402

BLOCK_SIZE = 4096
STEPS = (100, 200)
DELETED_STEP = 150
METRICS = {100: {"loss": 2.5, "acc": 0.25}, 200: {"loss": 1.25, "acc": 0.5}}
TAGS = {100: ["frozen", "first"], 200: ["frozen"]}
NOTES = {100: "format v1", 200: None}


def frozen_state(step: int) -> dict:
    """The state saved as ``step`` (100 or 200) in the frozen store."""
    v = 0 if step == 100 else 1
    w = det_floats((48, 48), 1)  # 9216 bytes: 3 blocks of 4096
    if v:
        w[30, 5] += 0.125  # inside block 1 only: stored as an xor delta
        w[31, 7] = -0.0
    model = collections.OrderedDict([
        ("w", w),
        ("b", det_floats((16,), 2, torch.bfloat16)),
        ("emb", det_floats((8, 3), 3, torch.float16)),
        ("p", torch.nn.Parameter(det_floats((5,), 4), requires_grad=False)),
    ])
    model._metadata = collections.OrderedDict([("", {"version": 1}), ("w", {"version": 2})])
    exp_avg = det_floats((10,), 5, torch.float64) * (v + 1)
    return {
        "model": model,
        "opt": {
            "state": {0: {"step": torch.tensor(3.0 + v), "exp_avg": exp_avg},
                      1: {"step": torch.tensor(3.0 + v), "exp_avg": exp_avg[::2]}},
            "param_groups": [{"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-08,
                              "params": [0, 1], "foreach": None}],
        },
        "ints": det_tensor(torch.int64, (5,), 6),
        "u8": det_tensor(torch.uint8, (3, 3), 7),
        "flags": det_tensor(torch.bool, (7,), 8),
        "c64": det_tensor(torch.complex64, (3,), 9),
        "f8": det_tensor(torch.float8_e4m3fn, (6,), 10),
        "np_be": det_array(">f4", (4,), 11),
        "np_i2": det_array("<i2", (2, 3), 12),
        "raw": det_bytes(13, 100 + v),
        "meta": {"epoch": 1 + v, "name": "frozen", "neg0": -0.0, "inf": math.inf,
                 "nan": math.nan, "big": 2**100 + v, "none": None, "tup": (1, "a"),
                 "lst": [1.5, [2]], 7: "int key"},
        "size": torch.Size([2, 3]),
        "dt": torch.bfloat16,
        "dev": torch.device("cpu"),
        "nps": np.float32(1.25),
    }


def deleted_state() -> dict:
    s = frozen_state(100)
    s["extra"] = det_floats((2048,), 99)
    return s


def build(out: str) -> None:
    import deltackpt

    if os.path.exists(out):
        shutil.rmtree(out)
    with deltackpt.open(out, block_size=BLOCK_SIZE, delta="xor") as s:
        s.save(frozen_state(100), 100, metrics=METRICS[100], tags=TAGS[100], note=NOTES[100])
        s.save(deleted_state(), DELETED_STEP)
        s.save(frozen_state(200), 200, metrics=METRICS[200], tags=TAGS[200], note=NOTES[200])
        s.delete(DELETED_STEP)
        r = s.gc()
        assert r.packs_deleted == 1 and r.bytes_freed > 0, r
        deltas = s._index.query("SELECT COUNT(*) FROM blocks WHERE base IS NOT NULL")[0][0]
        assert deltas >= 1, "no delta-encoded block: the frozen store would not pin deltas"
        assert s.verify().ok and s.steps() == list(STEPS)
    os.remove(os.path.join(out, "lock"))
    leftovers = [f for f in os.listdir(out) if f.endswith(("-wal", "-shm", ".partial"))]
    assert not leftovers, leftovers


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    target = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "data", "frozen_store_v1")
    build(target)
    print(f"wrote {target}")
