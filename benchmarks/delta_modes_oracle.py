"""How far the ``auto`` delta mode is from a per-block oracle choosing XOR or SUB.

    python benchmarks/delta_modes_oracle.py fp32_wd0 280 290

Encodes every changed 1 MiB block of trace step B against the same block of step A with XOR,
with SUB and standalone (the smaller of delta and standalone kept, as the store does) and
prints, as fractions of the raw bytes: ``auto`` (SUB for second moments, XOR otherwise),
``xor``, ``sub``, ``blockbest`` (per-block oracle), ``entrybest`` (per-entry oracle) and
``probe`` (choose per entry by its first changed block).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from deltackpt import codec  # noqa: E402
from deltackpt.codec import DELTA_SUB, DELTA_XOR, CodecConfig  # noqa: E402
from deltackpt.delta import DeltaConfig  # noqa: E402

BLOCK = 1 << 20


def frame_len(raw, base=None, mode=0, width=4):
    cfg = CodecConfig()
    if base is None:
        return codec.frame_length(codec.encode(raw, b"\0" * 16, width, cfg))
    return codec.frame_length(codec.encode(raw, b"\0" * 16, width, cfg, base=base,
                                           base_id=b"\1" * 16, delta=mode))


def main() -> None:
    scenario, a_step, b_step = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    trace = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache", "traces", scenario)
    a = load_file(os.path.join(trace, f"step_{a_step:06d}.safetensors"))
    b = load_file(os.path.join(trace, f"step_{b_step:06d}.safetensors"))
    tot = dict.fromkeys(["raw", "auto", "xor", "sub", "blockbest", "entrybest", "probe"], 0)
    auto = DeltaConfig()
    for k, tb in b.items():
        rb = tb.reshape(-1).contiguous().view(torch.uint8).numpy()
        ra = a[k].reshape(-1).contiguous().view(torch.uint8).numpy()
        w = tb.element_size()
        sizes = {"x": [], "s": [], "n": []}
        for off in range(0, rb.size, BLOCK):
            r, base = rb[off:off + BLOCK], ra[off:off + BLOCK]
            if np.array_equal(r, base):
                for v in sizes.values():
                    v.append(0)
                continue
            n = frame_len(r, width=w)
            sizes["n"].append(n)
            sizes["x"].append(min(n, frame_len(r, base, DELTA_XOR, w)))
            sizes["s"].append(min(n, frame_len(r, base, DELTA_SUB, w)))
        tot["raw"] += rb.size
        tot["auto"] += sum(sizes["s"] if auto.mode_for(k) == DELTA_SUB else sizes["x"])
        tot["xor"] += sum(sizes["x"])
        tot["sub"] += sum(sizes["s"])
        tot["blockbest"] += sum(min(x, s) for x, s in zip(sizes["x"], sizes["s"]))
        tot["entrybest"] += min(sum(sizes["x"]), sum(sizes["s"]))
        first = next((i for i, v in enumerate(sizes["n"]) if v), None)
        if first is not None:
            pick = "x" if sizes["x"][first] <= sizes["s"][first] else "s"
            tot["probe"] += sum(sizes[pick])
    print(scenario, a_step, b_step,
          {k: round(v / tot["raw"], 4) for k, v in tot.items() if k != "raw"})


if __name__ == "__main__":
    main()
