"""Export of stored steps: .safetensors, transformers-style shards, .pt; the streaming reader."""

from __future__ import annotations

import collections
import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import assert_state_equal, det_floats, det_tensor, entry_block_ids, tensor_bytes
from safetensors import safe_open
from safetensors.torch import load_file

import deltackpt
from deltackpt.cli import main
from deltackpt.export import SAFETENSORS_DTYPES, StepReader, parse_size, write_state

pytestmark = pytest.mark.filterwarnings("ignore:ComplexHalf support")


def _model() -> collections.OrderedDict:
    """Every dtype safetensors holds, a multi-block entry, 0-d and zero-size tensors."""
    m = collections.OrderedDict()
    for i, name in enumerate(SAFETENSORS_DTYPES):
        m[f"t.{name}"] = det_tensor(getattr(torch, name), (3, 5), 100 + i)
    m["big.weight"] = det_floats((5000,), 1)  # 20 kB: five 4 KiB blocks
    m["scalar"] = torch.tensor(2.5, dtype=torch.bfloat16)
    m["empty"] = torch.empty(0, 4, dtype=torch.float16)
    m["param"] = torch.nn.Parameter(det_floats((7,), 2), requires_grad=False)
    m._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    return m


def _state(m=None) -> dict:
    return {"model": _model() if m is None else m, "optimizer": {"lr": 0.1, "n": 3},
            "arr": np.arange(4, dtype=np.int32)}


@pytest.fixture
def small(store_path):
    s = deltackpt.open(store_path, block_size=4096)
    yield s
    s.close()


def _assert_tensor(actual: torch.Tensor, expected: torch.Tensor, key: str) -> None:
    assert actual.dtype == expected.dtype, key
    assert actual.shape == expected.shape, key
    assert torch.equal(tensor_bytes(actual), tensor_bytes(expected)), key


def test_safetensors_export_is_bit_exact_for_every_dtype(small, tmp_path):
    m = _model()
    small.save(_state(m), 10)
    out = tmp_path / "w.safetensors"
    r = small.export(out, 10)
    assert r.files == [str(out)] and r.step == 10 and r.tensors == len(m)
    assert r.nbytes == sum(t.numel() * t.element_size() for t in m.values())
    loaded = load_file(out)
    assert set(loaded) == set(m)
    for k, t in m.items():
        _assert_tensor(loaded[k], t.detach(), k)
    with safe_open(out, "pt") as f:
        assert f.metadata()["format"] == "pt" and f.metadata()["deltackpt_step"] == "10"
    # keys are listed in entry order, which import keeps; data lie widest dtype first
    assert _aligned_header_keys(out) == list(m)
    small.import_file(out, 11, prefix="model")
    assert list(small.load(11)["model"]) == list(m)


_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "C64": 8, "F32": 4, "I32": 4, "U32": 4,
             "F16": 2, "BF16": 2, "I16": 2, "U16": 2}


def _aligned_header_keys(path) -> list[str]:
    """The tensor keys of a safetensors file in header order, after checking that every
    tensor's data start at a multiple of its element size, as safetensors' own writer
    lays them out (the data section starts at a multiple of 8)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    assert n % 8 == 0
    header.pop("__metadata__", None)
    for key, info in header.items():
        size = _ITEMSIZE.get(info["dtype"], 1)
        assert info["data_offsets"][0] % size == 0, (key, info)
    return list(header)


def test_export_whole_state_uses_full_paths_and_counts_left_out_values(small, tmp_path):
    small.save(_state(), 1)
    r = small.export(tmp_path / "all.safetensors", select=None)
    loaded = load_file(tmp_path / "all.safetensors")
    assert "model/big.weight" in loaded and "arr" not in loaded
    assert r.skipped == 3  # lr, n and the numpy array
    # several select paths keep full paths too
    small.export(tmp_path / "two.safetensors", 1, ["model/big.weight", "model/scalar"])
    assert set(load_file(tmp_path / "two.safetensors")) == {"model/big.weight", "model/scalar"}
    # one tensor selected: named by its last component
    small.export(tmp_path / "one.safetensors", 1, "model/big.weight")
    assert set(load_file(tmp_path / "one.safetensors")) == {"big.weight"}


def test_sharded_export_matches_huggingface_layout_and_reimports_identically(small, tmp_path):
    from huggingface_hub import save_torch_state_dict

    m = _model()
    small.save(_state(m), 5)
    limit = 20000  # three shards; no tensor is larger than the limit
    r = small.export(tmp_path / "hf", 5, max_shard_size=limit)
    names = sorted(os.listdir(tmp_path / "hf"))
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    n = len(names) - 1
    assert n == 3 and names[:-1] == [f"model-{i:05d}-of-{n:05d}.safetensors"
                                   for i in range(1, n + 1)]
    assert r.files[-1].endswith("model.safetensors.index.json") and len(r.files) == n + 1
    assert set(index) == {"metadata", "weight_map"}
    assert index["metadata"]["total_size"] == r.nbytes
    assert list(index["weight_map"]) == sorted(m)  # transformers writes sort_keys=True
    # every shard respects the limit unless it holds one tensor larger than it
    merged = {}
    for name in names[:-1]:
        part = load_file(tmp_path / "hf" / name)
        size = sum(t.numel() * t.element_size() for t in part.values())
        assert size <= limit or len(part) == 1
        assert all(index["weight_map"][k] == name for k in part)
        merged.update(part)
    for k, t in m.items():
        _assert_tensor(merged[k], t.detach(), k)
    # huggingface_hub splits the same tensors into the same files
    plain = collections.OrderedDict((k, v.detach().clone()) for k, v in m.items())
    (tmp_path / "ref").mkdir()
    save_torch_state_dict(plain, tmp_path / "ref", max_shard_size=limit)
    ref = json.loads((tmp_path / "ref" / "model.safetensors.index.json").read_text())
    assert ref["weight_map"] == index["weight_map"]
    assert ref["metadata"]["total_size"] == index["metadata"]["total_size"]
    # re-import: the same entries, the same blocks, nothing new written
    res = small.import_file(tmp_path / "hf", 6, prefix="model")
    assert res.written_bytes == 0 and res.new_chunks == 0
    assert entry_block_ids(small, 6) == {p: ids for p, ids in entry_block_ids(small, 5).items()
                                         if p.startswith("model/")}
    back = small.load(6)["model"]
    assert list(back) == list(m)
    for k, t in m.items():
        _assert_tensor(back[k], t.detach(), k)


def test_oversized_tensors_get_their_own_shard_and_order_is_kept(small, tmp_path):
    m = _model()
    small.save(_state(m), 5)
    small.export(tmp_path / "hf", 5, max_shard_size=600)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    for name in sorted(set(index["weight_map"].values())):
        part = load_file(tmp_path / "hf" / name)
        size = sum(t.numel() * t.element_size() for t in part.values())
        assert size <= 600 or len(part) == 1
    assert len(set(index["weight_map"].values())) > 3
    small.import_file(tmp_path / "hf", 6, prefix="model")
    assert list(small.load(6)["model"]) == list(m)


def test_every_shard_and_written_state_is_aligned_like_safetensors_writes_it(small, tmp_path):
    m = _model()
    small.save(_state(m), 5)
    small.export(tmp_path / "hf", 5, max_shard_size=300)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    keys = []
    for name in sorted(set(index["weight_map"].values())):
        keys += _aligned_header_keys(tmp_path / "hf" / name)
    assert keys == list(m)  # shards hold runs of the entry order
    write_state(small.load(5), tmp_path / "avg.safetensors")
    assert _aligned_header_keys(tmp_path / "avg.safetensors") == list(m)
    loaded = load_file(tmp_path / "avg.safetensors")
    for k, t in m.items():
        _assert_tensor(loaded[k], t.detach(), k)


def test_single_shard_is_model_safetensors_and_stale_files_go(small, tmp_path):
    small.save(_state(), 1)
    d = tmp_path / "hf"
    small.export(d, 1, max_shard_size=4000)
    assert "model.safetensors.index.json" in os.listdir(d)
    (d / "notes.txt").write_text("kept")
    r = small.export(d, 1, max_shard_size="1GB")
    assert sorted(os.listdir(d)) == ["model.safetensors", "notes.txt"]
    assert r.files == [str(d / "model.safetensors")]


@pytest.mark.parametrize("before", ["1GB", 4000], ids=["single-before", "sharded-before"])
@pytest.mark.parametrize("shards", ["1GB", 4000], ids=["single", "sharded"])
def test_an_interrupted_re_export_never_leaves_an_index_over_mixed_steps(small, tmp_path,
                                                                          monkeypatch, shards,
                                                                          before):
    """Exporting step 2 over step 1's export, killed at every rename in turn: the directory
    holds step 1's export, step 2's, or shards without an index (which no loader takes for
    a checkpoint), never an index whose shards come from two steps; a single
    model.safetensors is replaced atomically (never missing)."""
    m1 = _model()
    m2 = _model()
    m2["big.weight"] = m2["big.weight"] + 1  # step 2 differs
    small.save(_state(m1), 1)
    small.save(_state(m2), 2)
    real_replace = os.replace

    class Killed(Exception):
        pass

    for kill_at in range(0, 12):
        d = tmp_path / f"hf{kill_at}"
        small.export(d, 1, max_shard_size=before)
        calls = []

        def replace(src, dst, _calls=calls, _kill=kill_at):
            if len(_calls) == _kill:
                raise Killed
            _calls.append(dst)
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        try:
            small.export(d, 2, max_shard_size=shards)
            finished = True
        except Killed:
            finished = False
        finally:
            monkeypatch.setattr(os, "replace", real_replace)
        names = set(os.listdir(d))
        if before == shards == "1GB":
            assert "model.safetensors" in names, kill_at
        if "model.safetensors.index.json" in names:
            index = json.loads((d / "model.safetensors.index.json").read_text())
            steps = {safe_open(d / f, "pt").metadata()["deltackpt_step"]
                     for f in set(index["weight_map"].values())}
            assert len(steps) == 1, (kill_at, steps)
        if "model.safetensors" in names:  # loaders prefer it to an index: a whole step
            assert safe_open(d / "model.safetensors", "pt").metadata()["deltackpt_step"] in (
                "1", "2")
        if finished:
            break
    else:
        pytest.fail("the export never finished")


def test_pt_export_loads_weights_only_and_equals(small, tmp_path):
    m = _model()
    small.save(_state(m), 3)
    r = small.export(tmp_path / "m.pt", 3)
    loaded = torch.load(tmp_path / "m.pt", weights_only=True)
    assert_state_equal(loaded, small.load(3, select="model")["model"])
    assert r.tensors == len(m)
    r = small.export(tmp_path / "opt.pt", 3, "optimizer")
    assert torch.load(tmp_path / "opt.pt", weights_only=True) == {"lr": 0.1, "n": 3}
    assert r.tensors == 0 and r.skipped == 0  # torch.save kept both values
    r = write_state({"w": torch.ones(2), "lr": 0.1}, tmp_path / "s.pt", select=None)
    assert r.tensors == 1 and r.skipped == 0
    assert torch.load(tmp_path / "s.pt", weights_only=True)["lr"] == 0.1


def test_pt_export_refuses_tensor_attributes_weights_only_cannot_load(small, tmp_path):
    """A tensor's attributes are pickled with it: a numpy scalar or a huge int there would
    make a .pt that torch.load(weights_only=True) refuses, so export refuses it first."""
    for bad in (np.float32(0.5), 2**3000):
        t = det_floats((3,), 1)
        t.scale = bad
        step = 10 if isinstance(bad, np.generic) else 11
        small.save({"model": {"w": t}}, step)
        with pytest.raises(deltackpt.UnsupportedValueError, match="'w@scale'"):
            small.export(tmp_path / f"m{step}.pt", step)
    t = det_floats((3,), 1)
    t.scale = 0.5  # a plain float pickles fine
    small.save({"model": {"w": t}}, 12)
    small.export(tmp_path / "ok.pt", 12)
    assert torch.load(tmp_path / "ok.pt", weights_only=True)["w"].scale == 0.5


def test_pt_export_refuses_numpy_values(small, tmp_path):
    small.save(_state(), 3)
    with pytest.raises(deltackpt.UnsupportedValueError, match="'arr'.*weights_only"):
        small.export(tmp_path / "all.pt", 3, select=None)
    assert not os.listdir(tmp_path) or "all.pt" not in os.listdir(tmp_path)


@pytest.mark.parametrize("value", [b"", 2**2040, -(2**2041)], ids=["empty-bytes", "int", "neg-int"])
def test_pt_export_refuses_what_weights_only_cannot_load(small, tmp_path, value):
    small.save({"model": {"w": torch.ones(2)}, "extra": {"v": value, "ok": 2**2000}}, 3)
    with pytest.raises(deltackpt.UnsupportedValueError, match="'extra/v'.*weights_only"):
        small.export(tmp_path / "all.pt", 3, select=None)
    assert not (tmp_path / "all.pt").exists()
    small.export(tmp_path / "ok.pt", 3, select="extra/ok")  # the largest LONG1 loads
    assert torch.load(tmp_path / "ok.pt", weights_only=True) == 2**2000


def test_export_refusals_name_the_problem(small, tmp_path):
    small.save({"model": {"c": torch.zeros(2, dtype=torch.complex128)}}, 1)
    with pytest.raises(deltackpt.InvalidInputError, match="'model/c'.*complex128"):
        small.export(tmp_path / "c.safetensors", 1)
    assert os.listdir(tmp_path) == ["store"]
    with pytest.raises(deltackpt.InvalidInputError, match="out.bin"):
        small.export(tmp_path / "out.bin", 1)
    with pytest.raises(deltackpt.StepNotFoundError, match="step 9"):
        small.export(tmp_path / "x.safetensors", 9)
    with pytest.raises(deltackpt.PathNotFoundError, match="nope"):
        small.export(tmp_path / "x.safetensors", 1, "nope")


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("1.5KB") == 1500
    assert parse_size(123) == 123
    for bad in ("5XB", "", "-1MB", 0, "MB"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_iter_entries_and_byte_ranges_match_load(small):
    state = _state()
    small.save(state, 1)
    m2 = collections.OrderedDict((k, v.detach().clone()) for k, v in state["model"].items())
    m2["big.weight"][::100] += 1.0  # delta frames against step 1
    small.save(_state(m2), 2)
    full = small.load(2, map_location="cpu")
    got = dict(small.iter_entries(2))
    assert set(got) == {f"model/{k}" for k in m2} | {"arr"}
    for k, t in m2.items():
        _assert_tensor(got[f"model/{k}"], t.detach(), k)
    first = dict(small.iter_entries(1, select="model"))
    assert isinstance(first["model/param"], torch.nn.Parameter)
    assert not first["model/param"].requires_grad
    # a consumer that stops early leaves the store usable
    it = small.iter_entries(2)
    next(it)
    it.close()
    reader = StepReader(small, [2], "model")
    e = next(x for x in reader.entries[2] if x.path == "model/big.weight")
    want = tensor_bytes(full["model"]["big.weight"]).numpy()
    for a, b in [(0, 20000), (1000, 9000), (4095, 4097), (19996, 20000), (8192, 12288)]:
        out = np.empty(b - a, dtype=np.uint8)
        reader.read_into(2, e, out, a)
        assert out.tobytes() == want[a:b].tobytes(), (a, b)
    with pytest.raises(ValueError, match="outside"):
        reader.read_into(2, e, np.empty(8, dtype=np.uint8), 19996)


def test_cli_export(small, store_path, tmp_path):
    small.save(_state(), 4)
    small.close()
    runner = CliRunner()
    out = tmp_path / "w.safetensors"
    r = runner.invoke(main, ["export", store_path, "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "wrote" in r.stderr and str(out) in r.stdout
    assert "big.weight" in load_file(out)
    r = runner.invoke(main, ["export", store_path, "4", "-o", str(tmp_path / "hf"),
                             "--max-shard-size", "8KB", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["files"][-1].endswith("model.safetensors.index.json")
    cases = [
        (["export", store_path, "7", "-o", str(out)], 3, "step 7 not found"),
        (["export", store_path, "-o", str(tmp_path / "w.bin")], 2, ".safetensors or .pt"),
        (["export", store_path, "-o", str(out), "--all", "--select", "model"], 2, "exclude"),
        (["export", store_path, "-o", str(tmp_path / "d"), "--max-shard-size", "lots"], 2,
         "invalid size"),
        (["export", store_path, "-o", str(out), "--select", "nope"], 2, "no path 'nope'"),
        (["export", str(tmp_path / "missing"), "-o", str(out)], 9, "no deltackpt store"),
    ]
    for args, code, msg in cases:
        r = runner.invoke(main, args)
        assert r.exit_code == code, (args, r.output)
        assert msg in r.output, (args, r.output)


def test_concurrent_exports_to_one_target_each_succeed_and_leave_one_whole_step(store_path,
                                                                                  tmp_path):
    import threading

    states = {st: {"model": {f"w{i}": det_floats((256, 512), 10 * st + i) for i in range(6)}}
              for st in (1, 2)}
    out = tmp_path / "x.safetensors"
    with deltackpt.open(store_path) as s:
        for st, state in states.items():
            s.save(state, st)
        errors: list[BaseException] = []

        def export(step: int) -> None:
            try:
                s.export(out, step)
            except BaseException as exc:  # noqa: BLE001 - collected for the assert
                errors.append(exc)

        for _ in range(8):
            threads = [threading.Thread(target=export, args=(st,)) for st in states]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors
            got = load_file(out)
            assert any(all(torch.equal(got[k], v) for k, v in states[st]["model"].items())
                       for st in states)
    assert not list(tmp_path.glob("*.partial"))
