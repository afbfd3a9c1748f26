"""Delta policy: which stored block a changed block is encoded against.

A changed block at the same position (entry path, dtype, shape, block index) of
the parent step is a natural base: consecutive checkpoints are numerically
close, so the residual (XOR or integer difference of the bit patterns) has long
runs of zero high bits and compresses far better than the block itself.

Every block records ``depth``: how many saves ago its position last got a
keyframe (a standalone block). Two policies bound restore cost:

- ``chain``: the base is the parent's block; decoding follows up to
  ``max_depth`` hops. Smallest residuals, restore cost grows with depth.
- ``keyframe``: the base is the keyframe the parent's block was encoded against;
  decoding is always one hop, residuals grow with the distance to the keyframe.

Either way a keyframe is written once ``depth`` would exceed ``max_depth``, and
a delta frame is kept only when it is smaller than the standalone frame.

Keyframes are staggered over positions ("intra refresh" in video coding): every
position has a slot, one save in ``max_depth + 1`` shifted by a hash of its path and
block index, and a chain that grew at every save since its keyframe is cut at that slot (a
position that changes now and then takes its phase from its changes). Without it every
position of a store starts its chain at the first save and they stay in phase, so a
step restores in 1 to ``max_depth + 1`` frames per block depending on where its save
falls, and every ``max_depth + 1``-th save writes all keyframes at once. Staggered, each
step costs about the average and each save writes about the same; the steady state has
as many keyframes as before.

The default, ``auto:chain:4``, was chosen by measurement (docs/benchmarks.md, "Delta
encoding"): on the MiniLM traces it stores 3–15 % less than ``auto:keyframe:8``, and a
chain of XOR frames decodes in the grouped domain (one un-grouping per block, not per hop);
with staggered keyframes every step restores in about 3× torch.load's time, the slowest in
~4×. A writer that deletes old steps should prefer ``keyframe``: a kept chain keeps its
deleted predecessors' blocks alive.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .codec import DELTA_NONE, DELTA_SUB, DELTA_XOR

MODES = {"auto": DELTA_XOR, "xor": DELTA_XOR, "sub": DELTA_SUB, "none": DELTA_NONE}
#: under ``auto``, entries whose path ends like this are second moments: always
#: positive, slowly varying, so the integer difference of their bit patterns beats
#: XOR (docs/codec-experiments.md: 1.7 points in fp32, 11 in bf16)
_SUB_SUFFIXES = ("exp_avg_sq", "square_avg", "sum", "exp_inf")
#: a shard of a DCP-saved tensor is stored as ``<fqn>#chunk(<offsets>)``
#: (deltackpt.dcp.chunk_key): its mode is its tensor's
_SHARD_SUFFIX = re.compile(r"#chunk\([0-9,]*\)$")
POLICIES = ("chain", "keyframe")
#: ``staggered``: each position's keyframes fall at its own slot (above); ``aligned``: every
#: chain runs to ``max_depth`` from the position's first block (deltackpt 0.2's behaviour)
KEYFRAME_SCHEDULES = ("staggered", "aligned")
#: ``max_depth`` when a spec names the policy only (each its best on the MiniLM traces)
_DEFAULT_DEPTH = {"chain": 4, "keyframe": 8}
#: longest delta chain a writer may create and a reader follows; readers treat
#: longer (or cyclic) chains as corruption. Restore cost grows with every hop.
MAX_CHAIN_HOPS = 64


@dataclass(frozen=True)
class DeltaConfig:
    """``mode``: ``auto`` (XOR, SUB for second moments), ``xor``, ``sub`` or ``none``;
    ``policy``: ``chain`` or ``keyframe``; ``keyframes``: ``staggered`` or ``aligned``."""

    mode_name: str = "auto"
    policy: str = "chain"  # chosen by measurement: docs/benchmarks.md
    max_depth: int = 4
    keyframes: str = "staggered"

    def __post_init__(self) -> None:
        if self.mode_name not in MODES:
            raise ValueError(f"unknown delta mode {self.mode_name!r}; use one of {list(MODES)}")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown delta policy {self.policy!r}; use one of {POLICIES}")
        if not 1 <= self.max_depth <= MAX_CHAIN_HOPS:
            raise ValueError(f"max_depth must be in [1, {MAX_CHAIN_HOPS}], got {self.max_depth}")
        if self.keyframes not in KEYFRAME_SCHEDULES:
            raise ValueError(f"unknown keyframe schedule {self.keyframes!r}; use one of "
                             f"{KEYFRAME_SCHEDULES}")

    @property
    def enabled(self) -> bool:
        return self.mode_name != "none"

    @property
    def mode(self) -> int:
        return MODES[self.mode_name]

    def mode_for(self, path: str) -> int:
        """The delta mode for an entry: ``auto`` picks SUB for second-moment tensors."""
        if self.mode_name == "auto":
            name = _SHARD_SUFFIX.sub("", path.rsplit("/", 1)[-1])
            if name.endswith(_SUB_SUFFIXES):
                return DELTA_SUB
        return MODES[self.mode_name]

    def keyframe_slot(self, generation: int, path: str, block_index: int) -> bool:
        """Whether save number ``generation`` is the keyframe slot of a block position.

        Slots recur every ``max_depth + 1`` saves, shifted per position so that
        neighbouring blocks and different tensors refresh at different saves. Never, when
        keyframes are ``aligned``."""
        if self.keyframes != "staggered":
            return False
        shift = zlib.crc32(path.encode("utf-8", "surrogatepass")) + block_index
        return (generation + shift) % (self.max_depth + 1) == 0

    def plan(self, parent_id: bytes, parent_depth: int,
             root_of: Callable[[bytes], bytes], slot: bool = False) -> tuple[bytes, int] | None:
        """(base id, depth of the new block), or None to write a keyframe.

        ``slot``: this save is the position's keyframe slot (:meth:`keyframe_slot`) and
        the chain is cut there."""
        depth = parent_depth + 1
        if not self.enabled or depth > self.max_depth or slot:
            return None
        if self.policy == "chain":
            return parent_id, depth
        return root_of(parent_id), depth

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode_name, "policy": self.policy, "max_depth": self.max_depth,
                "keyframes": self.keyframes}

    @classmethod
    def from_json(cls, data: dict) -> DeltaConfig:
        # the defaults of format 1 for a field missing from deltackpt.json (format.md §5),
        # not the writer's current defaults
        keyframes = data.get("keyframes", "aligned")
        if keyframes not in KEYFRAME_SCHEDULES:
            keyframes = "aligned"  # writer-side only: an unknown schedule must not stop a reader
        return cls(str(data.get("mode", "auto")), str(data.get("policy", "keyframe")),
                   int(data.get("max_depth", 8)), keyframes)

    @classmethod
    def parse(cls, spec: str | DeltaConfig | None) -> DeltaConfig:
        """Accept a DeltaConfig, or ``"MODE[:POLICY[:DEPTH[:KEYFRAMES]]]"``: ``"auto"``,
        ``"xor"``, ``"sub"``, ``"none"``, ``"auto:keyframe"``, ``"xor:chain:8"``,
        ``"auto:chain:4:aligned"``… Missing parts take the defaults: policy ``chain``, depth
        4 for ``chain`` and 8 for ``keyframe``, keyframes ``staggered``."""
        if isinstance(spec, DeltaConfig):
            return spec
        if spec is None:
            return cls()
        parts = str(spec).split(":")
        if len(parts) > 4:
            raise ValueError(f"malformed delta spec {spec!r}: MODE[:POLICY[:DEPTH[:KEYFRAMES]]]")
        parts += [""] * (4 - len(parts))  # an empty or missing part takes its default
        mode = parts[0] or "auto"
        policy = parts[1] or cls.policy
        depth = int(parts[2]) if parts[2] else _DEFAULT_DEPTH.get(policy, cls.max_depth)
        return cls(mode, policy, depth, parts[3] or cls.keyframes)
