"""Import of .safetensors files, sharded directories and .pt files as steps."""

from __future__ import annotations

import collections
import json
import os
import struct

import pytest
import torch
from click.testing import CliRunner
from helpers import assert_state_equal, det_floats, det_tensor, files_under
from safetensors.torch import save_file

import deltackpt
from deltackpt.cli import main


class NotAWeight:  # torch.load(weights_only=True) must refuse this
    def __init__(self) -> None:
        self.x = 1


def _flat() -> dict[str, torch.Tensor]:
    return {
        "model/enc.weight": det_floats((64, 33), 1),
        "model/enc.bias": det_floats((33,), 2, torch.bfloat16),
        "model/steps": torch.tensor(7),
        "optimizer/state/0/exp_avg": det_floats((64, 33), 3),
        "optimizer/state/0/step": torch.tensor(12.0),
        "rng/torch": det_tensor(torch.uint8, (5056,), 4),
        "empty": torch.empty(0, 2),
    }


def _nested(flat: dict[str, torch.Tensor]) -> dict:
    return {
        "model": {"enc.weight": flat["model/enc.weight"], "enc.bias": flat["model/enc.bias"],
                  "steps": flat["model/steps"]},
        "optimizer": {"state": {"0": {"exp_avg": flat["optimizer/state/0/exp_avg"],
                                      "step": flat["optimizer/state/0/step"]}}},
        "rng": {"torch": flat["rng/torch"]},
        "empty": flat["empty"],
    }


def _no_packs(store_path) -> bool:
    return not files_under(store_path, "packs")


def test_safetensors_import_nests_keys_in_file_order(store, tmp_path):
    flat = _flat()
    save_file(flat, tmp_path / "f.safetensors")  # safetensors orders data by dtype and name
    r = store.import_file(tmp_path / "f.safetensors", 10)
    assert r.logical_bytes == sum(t.numel() * t.element_size() for t in flat.values())
    loaded = store.load(10)
    for path, t in flat.items():
        node = loaded
        for part in path.split("/"):
            node = node[part]
        assert_state_equal(node, t)
    assert store.info(10).note.startswith("imported from ")
    flat_step = store.import_file(tmp_path / "f.safetensors", 11, nest_keys=False)
    assert flat_step.written_bytes == 0
    assert set(store.load(11)) == set(flat)


def test_export_then_import_round_trips_the_structure(store, tmp_path):
    flat = _flat()
    nested = _nested(flat)
    store.save(nested, 1)
    store.export(tmp_path / "all.safetensors", 1, select=None)
    r = store.import_file(tmp_path / "all.safetensors", 2)
    assert r.written_bytes == 0 and r.new_chunks == 0
    assert_state_equal(store.load(2), nested)  # same key order: data written in entry order


def test_importing_the_same_file_twice_writes_nothing_new(store, tmp_path):
    save_file(_flat(), tmp_path / "f.safetensors")
    first = store.import_file(tmp_path / "f.safetensors", 1)
    assert first.written_bytes > 0
    again = store.import_file(tmp_path / "f.safetensors", 2, tags=["again"])
    assert again.written_bytes == 0 and again.new_chunks == 0
    assert store.info(2).tags == ["again"]


def test_pt_import_keeps_structure_and_types(store, tmp_path):
    od = collections.OrderedDict(w=torch.nn.Parameter(det_floats((10,), 5)), b=torch.ones(3))
    od._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    state = {"model": od, "epoch": 3, "lr": 1e-4, "name": "run", "t": (1, 2.5, None),
             "size": torch.Size([2, 3]), "half": det_floats((4,), 6, torch.float16)}
    torch.save(state, tmp_path / "s.pt")
    store.import_file(tmp_path / "s.pt", 5)
    assert_state_equal(store.load(5), state)
    torch.save(det_floats((3,), 1), tmp_path / "bare.pt", _use_new_zipfile_serialization=False)
    store.import_file(tmp_path / "bare.pt", 6, prefix="model/w")
    assert_state_equal(store.load(6), {"model": {"w": det_floats((3,), 1)}})


def test_pt_that_needs_pickle_is_refused_and_nothing_is_stored(store, store_path, tmp_path):
    torch.save({"w": torch.ones(2), "obj": NotAWeight()}, tmp_path / "evil.pt")
    with pytest.raises(deltackpt.UnsupportedValueError, match=r"evil\.pt.*weights_only"):
        store.import_file(tmp_path / "evil.pt", 1)
    assert store.steps() == [] and _no_packs(store_path)
    # a weights_only-loadable value deltackpt cannot store is refused too, naming its path
    torch.save({"z": 1j}, tmp_path / "complex.pt")
    with pytest.raises(deltackpt.UnsupportedValueError, match="'z'"):
        store.import_file(tmp_path / "complex.pt", 1)
    assert store.steps() == [] and _no_packs(store_path)


def _header_file(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("case, match", [
    ("short", "shorter than 8 bytes"),
    ("huge_header", "header length"),
    ("not_json", "not JSON"),
    ("dtype", "unsupported dtype"),
    ("overlap", "overlapping or gapped"),
    ("size", "need 8"),
    ("trailing", "cover 8 bytes"),
    ("duplicate", "twice"),
])
def test_malformed_safetensors_is_refused(store, store_path, tmp_path, case, match):
    p = tmp_path / "bad.safetensors"
    t = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    if case == "short":
        p.write_bytes(b"\x01\x02")
    elif case == "huge_header":
        p.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    elif case == "not_json":
        p.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    elif case == "dtype":
        _header_file(p, {"a": {**t, "dtype": "F128"}}, bytes(8))
    elif case == "overlap":
        _header_file(p, {"a": t, "b": t}, bytes(8))
    elif case == "size":
        _header_file(p, {"a": {**t, "data_offsets": [0, 4]}}, bytes(4))
    elif case == "trailing":
        _header_file(p, {"a": t}, bytes(12))
    elif case == "duplicate":
        raw = b'{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, "a": ' \
              b'{"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}'
        p.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(deltackpt.InvalidInputError, match=match) as info:
        store.import_file(p, 1)
    assert "bad.safetensors" in str(info.value)
    assert store.steps() == [] and _no_packs(store_path)


def test_key_conflicts_and_broken_shard_sets_are_refused(store, tmp_path):
    save_file({"a": torch.ones(1), "a/b": torch.ones(1)}, tmp_path / "c.safetensors")
    with pytest.raises(deltackpt.InvalidInputError, match="'a/b'"):
        store.import_file(tmp_path / "c.safetensors", 1)
    store.save({"model": {"x": det_floats((3000,), 1), "y": det_floats((3000,), 2)}}, 1)
    d = tmp_path / "hf"
    store.export(d, 1, max_shard_size=12000)
    os.remove(d / "model-00002-of-00002.safetensors")
    with pytest.raises(deltackpt.InvalidInputError, match="shard model-00002-of-00002.* missing"):
        store.import_file(d, 2)
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"x": "model-00001-of-00002.safetensors", "z": "../evil.safetensors"}}))
    with pytest.raises(deltackpt.InvalidInputError, match="not a file name"):
        store.import_file(d, 2)
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"z": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(deltackpt.InvalidInputError, match="disagrees with the index"):
        store.import_file(d, 2)
    assert store.steps() == [1]


def test_a_directory_with_both_layouts_imports_what_from_pretrained_loads(store, tmp_path):
    # a sharded export interrupted over an earlier single-file one leaves both; transformers
    # reads model.safetensors first, and so must import
    for step in (1, 2):
        store.save({"model": {"x": det_floats((3000,), step), "y": det_floats((3000,), 9)}},
                   step)
    d = tmp_path / "hf"
    store.export(d, 1, max_shard_size=10**9)  # one shard: model.safetensors
    store.export(tmp_path / "sharded", 2, max_shard_size=12000)
    for name in os.listdir(tmp_path / "sharded"):
        os.replace(tmp_path / "sharded" / name, d / name)
    assert "model.safetensors.index.json" in os.listdir(d)
    store.import_file(d, 3, prefix="model")
    assert torch.equal(store.load(3)["model"]["x"], det_floats((3000,), 1))


@pytest.mark.parametrize("content", [b"\x80\x02}q\x00garbage" * 3, b"PK\x03\x04" + b"\x00" * 40,
                                     b"e" * 100])
def test_a_garbage_pt_file_is_a_clear_error(store, tmp_path, content):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    with pytest.raises(deltackpt.DeltackptError, match="bad.pt: (not a readable torch file|"
                       "refused by torch.load)") as err:
        store.import_file(bad, 5)
    assert "file an issue" not in str(err.value)
    assert 5 not in store


def test_existing_step_is_refused_before_reading(store, tmp_path):
    store.save({"a": 1}, 3)
    with pytest.raises(deltackpt.StepExistsError, match="step 3"):
        store.import_file(tmp_path / "does-not-matter.safetensors", 3)


def test_cli_import(store_path, tmp_path):
    save_file(_flat(), tmp_path / "f.safetensors")
    runner = CliRunner()
    r = runner.invoke(main, ["import", store_path, str(tmp_path / "f.safetensors"),
                             "--step", "1"])  # creates the store
    assert r.exit_code == 0, r.output
    assert "imported" in r.output and "as step 1" in r.output
    r = runner.invoke(main, ["import", store_path, str(tmp_path / "f.safetensors"),
                             "--step", "2", "--prefix", "run", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["written_bytes"] == 0
    torch.save({"o": NotAWeight()}, tmp_path / "evil.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"junkjunkjunk")
    cases = [
        (["import", store_path, str(tmp_path / "evil.pt"), "--step", "3"], 5, "weights_only"),
        (["import", store_path, str(tmp_path / "junk.safetensors"), "--step", "3"], 2,
         "not a safetensors file"),
        (["import", store_path, str(tmp_path / "f.safetensors"), "--step", "1"], 4,
         "already exists"),
        (["import", store_path, str(tmp_path / "f.safetensors")], 2, "--step"),
        (["import", store_path, str(tmp_path / "nope.pt"), "--step", "3"], 2, "does not exist"),
        (["import", store_path, str(tmp_path / "f.safetensors"), "--step", "-1"], 2, ">= 0"),
    ]
    for args, code, msg in cases:
        r = runner.invoke(main, args)
        assert r.exit_code == code, (args, r.output)
        assert msg in r.output, (args, r.output)
    with deltackpt.open(store_path) as s:
        assert s.steps() == [1, 2]
    # a refused file leaves no new store behind
    fresh = tmp_path / "fresh"
    r = runner.invoke(main, ["import", str(fresh), str(tmp_path / "junk.safetensors"),
                             "--step", "1"])
    assert r.exit_code == 2 and "not a safetensors file" in r.output
    assert not fresh.exists()
