"""diff: block changes from the index, numeric change against torch on the same tensors."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import assert_state_equal, det_floats, det_tensor
from safetensors.torch import load_file

import deltackpt
from deltackpt.cli import main
from deltackpt.diff import diff

torch.set_num_threads(1)


def _states():
    w = det_floats((40, 300), 1)  # 12 blocks of 4096 bytes (the last one partial)
    w2 = w.clone()
    w2[5:9] += 0.25
    w2[30, 7] = -3.0
    h = det_floats((700,), 2, torch.bfloat16)
    h2 = h.clone()
    h2[::50] *= 2
    c = torch.complex(det_floats((600,), 3), det_floats((600,), 4))
    c2 = c * (1 + 0.5j)
    i = torch.arange(2000, dtype=torch.int64)
    i2 = i.clone()
    i2[1500] = -7
    nd = np.linspace(0, 1, 900, dtype=np.float32)
    a = {"model": {"w": w, "h": h, "c": c, "idx": i, "same": det_floats((3000,), 5),
                   "zero": torch.zeros(10), "gone": torch.ones(3), "shape": torch.ones(4)},
         "np": nd, "raw": b"abcdef" * 100}
    b = {"model": {"w": w2, "h": h2, "c": c2, "idx": i2, "same": a["model"]["same"].clone(),
                   "zero": torch.ones(10), "new": torch.ones(2),
                   "shape": torch.ones(2, 2), "extra": torch.zeros(1)},
         "np": nd * 2, "raw": b"abcdeg" * 100}
    return a, b


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    path = os.path.join(tmp_path_factory.mktemp("diff"), "store")
    a, b = _states()
    with deltackpt.open(path, block_size=4096) as s:
        s.save(a, 1)
        s.save(b, 2)
    return path


def _torch_numbers(x, y):
    x = torch.as_tensor(x)
    y = torch.as_tensor(y)
    t = torch.complex128 if x.is_complex() else torch.float64
    d = (y.to(t) - x.to(t)).abs()
    l2 = torch.linalg.vector_norm(d).item()
    norm = torch.linalg.vector_norm(x.to(t)).item()
    return l2, d.max().item(), (l2 / norm if norm else (0.0 if l2 == 0 else math.inf))


def test_numbers_match_torch(store_dir):
    a, b = _states()
    with deltackpt.open(store_dir) as s:
        r = diff(s, 1, 2)
    rows = {e["path"]: e for e in r["entries"]}
    for path, x, y in [("model/w", a["model"]["w"], b["model"]["w"]),
                       ("model/h", a["model"]["h"], b["model"]["h"]),
                       ("model/c", a["model"]["c"], b["model"]["c"]),
                       ("model/idx", a["model"]["idx"], b["model"]["idx"]),
                       ("model/same", a["model"]["same"], b["model"]["same"]),
                       ("model/zero", a["model"]["zero"], b["model"]["zero"]),
                       ("np", torch.from_numpy(a["np"]), torch.from_numpy(b["np"]))]:
        l2, mx, rel = _torch_numbers(x, y)
        e = rows[path]
        assert e["l2"] == pytest.approx(l2, rel=1e-12, abs=1e-300), path
        assert e["max_abs"] == mx, path  # a maximum has no rounding to disagree on
        assert e["relative"] == pytest.approx(rel, rel=1e-12), path
    assert rows["model/zero"]["relative"] == math.inf
    assert rows["model/same"]["blocks_changed"] == 0 and rows["model/same"]["delta_bytes"] == 0
    assert rows["raw"]["l2"] is None and rows["raw"]["blocks_changed"] == 1


def test_blocks_and_bytes_from_the_index(store_dir):
    with deltackpt.open(store_dir) as s:
        r = diff(s, 1, 2)
        meta = diff(s, 1, 2, data=False)
        rows_a = {p: bl for p, bl in s._index.query(
            "SELECT path, blocks FROM entries WHERE step=1")}
        rows_b = {p: bl for p, bl in s._index.query(
            "SELECT path, blocks FROM entries WHERE step=2")}
        length = dict(s._index.query("SELECT id, length FROM blocks"))
    w = {e["path"]: e for e in r["entries"]}["model/w"]
    ia = [rows_a["model/w"][i:i + 16] for i in range(0, len(rows_a["model/w"]), 16)]
    ib = [rows_b["model/w"][i:i + 16] for i in range(0, len(rows_b["model/w"]), 16)]
    changed = [k for k in range(len(ib)) if ia[k] != ib[k]]
    assert w["blocks"] == len(ib) == 12 and w["blocks_changed"] == len(changed) == 3
    assert w["changed_fraction"] == pytest.approx(3 / 12)
    assert w["stored_bytes"] == sum(length[ib[k]] for k in changed)
    # deltas against A's blocks are far smaller than the blocks
    assert 0 < w["delta_bytes"] < 3 * 4096 * 0.7
    all_a = {x[i:i + 16] for x in rows_a.values() for i in range(0, len(x), 16)}
    all_b = {x[i:i + 16] for x in rows_b.values() for i in range(0, len(x), 16)}
    assert r["total"]["stored_bytes"] == sum(length[x] for x in all_b - all_a)
    assert [e["path"] for e in r["added"]] == ["model/new", "model/extra"]
    assert [e["path"] for e in r["removed"]] == ["model/gone"]
    assert r["retyped"] == [{"path": "model/shape",
                             "from": {"kind": "tensor", "dtype": "float32", "shape": [4]},
                             "to": {"kind": "tensor", "dtype": "float32", "shape": [2, 2]}}]
    # the index-only diff has the same block figures and no numbers
    for x, y in zip(meta["entries"], r["entries"]):
        assert {k: v for k, v in y.items() if k not in ("l2", "max_abs", "relative",
                                                        "delta_bytes")} == x
    assert "delta_bytes" not in meta["total"]


def test_select_and_errors(store_dir):
    with deltackpt.open(store_dir) as s:
        r = diff(s, 1, 2, select="model/w")
        assert [e["path"] for e in r["entries"]] == ["model/w"] and not r["added"]
        with pytest.raises(deltackpt.StepNotFoundError, match="step 9"):
            diff(s, 1, 9)
        with pytest.raises(deltackpt.DeltackptError, match="nope"):
            diff(s, 1, 2, select="nope")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_diff(store_dir):
    r = run("diff", store_dir, 1, 2, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)  # strict JSON: inf is printed as "Infinity"
    assert {e["path"]: e for e in data["entries"]}["model/zero"]["relative"] == "Infinity"
    r = run("diff", store_dir, 1, 2)
    assert r.exit_code == 0
    assert "model/w" in r.stdout and "retyped: model/shape" in r.stdout
    assert "added: model/new" in r.stdout and "removed: model/gone" in r.stdout
    assert "model/same" not in r.stdout and "model/same" in run("diff", store_dir, 1, 2,
                                                               "--all").stdout
    r = run("diff", store_dir, 1, 2, "--no-data", "--select", "model/w")
    assert r.exit_code == 0 and "L2" not in r.stdout and "1 of 1 entries changed" in r.stdout


@pytest.mark.parametrize("args,code,fragment", [
    ((1, 9), 3, "step 9"),
    ((1,), 2, "Missing argument"),
    ((1, "x"), 2, "not a valid integer"),
    ((1, 2, "--select", "nope"), 2, "nope"),
])
def test_cli_diff_bad_arguments(store_dir, args, code, fragment):
    r = run("diff", store_dir, *args)
    assert r.exit_code == code and fragment in r.output and "Traceback" not in r.output


class _Counter:
    def __init__(self) -> None:
        self.total = None
        self.done = 0

    def update(self, n: int) -> None:
        self.done += n


def test_progress_hooks_count_what_was_done(store_dir):
    with deltackpt.open(store_dir) as s:
        c = _Counter()
        r = s.verify(progress=c)
        assert c.total == c.done == r.bytes_checked > 0
        c = _Counter()
        diff(s, 1, 2, progress=c)
        assert c.total == c.done > 0


def test_progress_bars_stay_off_stdout(store_dir, tmp_path, monkeypatch):
    """Even with bars forced on (as on a terminal), --json stdout stays pure JSON and
    --quiet / --json draw nothing."""
    import deltackpt.progress

    monkeypatch.setattr(deltackpt.progress, "enabled", lambda quiet=False: not quiet)
    r = run("verify", store_dir)
    assert r.exit_code == 0 and "verify" in r.stderr
    for args in (("verify", store_dir, "--json"), ("diff", store_dir, 1, 2, "--json"),
                 ("gc", store_dir, "--json")):
        r = run(*args)
        assert r.exit_code == 0 and r.stderr == ""
        json.loads(r.stdout)
    r = run("restore", store_dir, 2, "-o", tmp_path / "x.safetensors")
    assert r.exit_code == 0 and "restore step 2" in r.stderr
    r = run("restore", store_dir, 2, "-o", tmp_path / "y.pt", "-q", "--select", "model")
    assert r.exit_code == 0 and "restore step" not in r.stderr
    _, b = _states()
    assert_state_equal(torch.load(tmp_path / "y.pt", weights_only=True), {"model": b["model"]})
    assert torch.equal(load_file(tmp_path / "x.safetensors")["model/w"], b["model"]["w"])


def test_tied_blocks_count_once_in_the_total_delta(tmp_path):
    """Two entries holding the same tensor (tied weights) share blocks: a save writes
    them once, so the total a delta costs must count them once too."""
    emb = det_floats((256, 64), 1)
    with deltackpt.open(str(tmp_path / "s"), block_size=4096) as s:
        s.save({"emb": emb, "dec": emb, "other": det_floats((10,), 2)}, 1)
        moved = emb + 1e-3
        r = s.save({"emb": moved, "dec": moved, "other": det_floats((10,), 2)}, 2)
        d = diff(s, 1, 2)
    per = {e["path"]: e["delta_bytes"] for e in d["entries"]}
    assert per["emb"] == per["dec"] > 0 and per["other"] == 0
    assert d["total"]["delta_bytes"] == per["emb"]
    assert d["total"]["stored_bytes"] == r.written_bytes


@pytest.mark.parametrize("dtype", ["int64", "uint64", "int32"])
def test_integer_differences_are_exact_beyond_float64(tmp_path, dtype):
    base = {"int64": 2**60, "uint64": 2**63 + 2**60, "int32": 2**30}[dtype]
    a = np.full(1000, base, dtype=dtype)
    b = a.copy()
    b[:10] += 1  # invisible in float64 for the 64-bit types
    b[10] -= 3 if dtype != "uint64" else 0
    with deltackpt.open(str(tmp_path / "s"), block_size=4096) as s:
        s.save({"t": torch.from_numpy(a), "n": a}, 1)
        s.save({"t": torch.from_numpy(b), "n": b}, 2)
        d = diff(s, 1, 2)
    exact = [int(y) - int(x) for x, y in zip(a.tolist(), b.tolist())]
    l2 = math.sqrt(sum(x * x for x in exact))
    for e in d["entries"]:
        assert e["l2"] == pytest.approx(l2, rel=1e-12), e["path"]
        assert e["max_abs"] == max(abs(x) for x in exact)


def test_packed_float4_entries_get_block_figures_only(tmp_path):
    a = det_tensor(torch.uint8, (64,), 1).view(torch.float4_e2m1fn_x2)
    b = det_tensor(torch.uint8, (64,), 2).view(torch.float4_e2m1fn_x2)
    with deltackpt.open(str(tmp_path / "s"), block_size=4096) as s:
        s.save({"q": a}, 1)
        s.save({"q": b}, 2)
        d = diff(s, 1, 2)
    (row,) = d["entries"]
    assert row["blocks_changed"] == 1 and row["l2"] is None and row["delta_bytes"] > 0
