"""The command line (deltackpt/cli/), through click's CliRunner and one real process."""

from __future__ import annotations

import collections
import glob
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import assert_state_equal, block_rows, det_floats, det_tensor, flip_byte

import deltackpt
from deltackpt.cli import main

torch.set_num_threads(1)


def _state(step: int) -> dict:
    model = collections.OrderedDict([
        ("enc.weight", det_floats((40, 60), 1 + (step > 1))),
        ("enc.bias", det_floats((60,), 2, torch.bfloat16)),
        ("head", torch.nn.Parameter(det_floats((3, 4), 3, torch.float16), requires_grad=False)),
    ])
    model._metadata = collections.OrderedDict([("", {"version": 1})])
    return {
        "model": model,
        "opt": {"state": {0: {"step": torch.tensor(float(step)),
                              "exp_avg": det_tensor(torch.float64, (7,), step)}},
                "param_groups": [{"lr": 0.01, "betas": (0.9, 0.99), "params": [0]}]},
        "buffers": [det_tensor(torch.int64, (5,), 4), det_tensor(torch.uint8, (9,), 5),
                    det_tensor(torch.bool, (3,), 6), det_tensor(torch.float8_e5m2, (4,), 7)],
        "epoch": step, "name": "cli", "lr": 0.5,
    }


STEPS = (1, 2, 3)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    path = os.path.join(tmp_path_factory.mktemp("cli"), "store")
    with deltackpt.open(path, block_size=4096) as s:
        for step in STEPS:
            s.save(_state(step), step, metrics={"loss": 1.0 / step, "acc": step * 10},
                   tags=[f"s{step}"], note="from the cli test")
    return path


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def assert_one_line_error(result, code, *fragments):
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deltackpt: error: "), result.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    assert result.stdout == ""


def test_log(store_dir):
    r = run("log", store_dir)
    assert r.exit_code == 0
    lines = r.stdout.strip().splitlines()
    assert lines[0].split()[:4] == ["step", "saved", "logical", "written"]
    assert [ln.split()[0] for ln in lines[2:]] == ["1", "2", "3"]
    assert "loss=0.5" in lines[3] and "s2" in lines[3]
    r = run("log", store_dir, "--json")
    data = json.loads(r.stdout)
    with deltackpt.open(store_dir) as s:
        log = s.log()
    assert [d["step"] for d in data] == [1, 2, 3]
    for d, info in zip(data, log):
        assert d == json.loads(json.dumps(info.__dict__))


def test_show(store_dir):
    r = run("show", store_dir, "--json")
    assert r.exit_code == 0
    data = json.loads(r.stdout)
    assert data["step"]["step"] == 3 and data["step"]["metrics"] == {"loss": 1 / 3, "acc": 30}
    with deltackpt.open(store_dir) as s:
        entries = s.entries(3)
    assert [(e["path"], e["kind"], e["dtype"], tuple(e["shape"]), e["nbytes"], e["blocks"])
            for e in data["entries"]] == [(e.path, e.kind, e.dtype, e.shape, e.nbytes, e.blocks)
                                          for e in entries]
    r = run("show", store_dir, 2)
    assert r.exit_code == 0 and r.stdout.startswith("step 2 ")
    for e in entries:
        assert e.path in r.stdout
    assert "float8_e5m2" in r.stdout and "model/enc.weight" in r.stdout


def test_restore_safetensors_is_bit_exact(store_dir, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    out = os.path.join(tmp_path, "s2.safetensors")
    r = run("restore", store_dir, 2, "-o", out)
    assert r.exit_code == 0, r.output
    got = load_file(out)
    expected = _state(2)
    tensors = {"model/enc.weight": expected["model"]["enc.weight"],
               "model/enc.bias": expected["model"]["enc.bias"],
               "model/head": expected["model"]["head"].detach(),
               "opt/state/0/step": expected["opt"]["state"][0]["step"],
               "opt/state/0/exp_avg": expected["opt"]["state"][0]["exp_avg"],
               **{f"buffers/{i}": t for i, t in enumerate(expected["buffers"])}}
    assert sorted(got) == sorted(tensors)
    for k, t in tensors.items():
        assert_state_equal(got[k], t, k)
    with safe_open(out, "pt") as f:
        assert f.metadata() == {"deltackpt_step": "2"}
    assert not glob.glob(out + "*.partial")
    # --select, default step
    out2 = os.path.join(tmp_path, "sel.safetensors")
    r = run("restore", store_dir, "-o", out2, "--select", "opt", "--select", "model/head")
    assert r.exit_code == 0
    got = load_file(out2)
    assert sorted(got) == ["model/head", "opt/state/0/exp_avg", "opt/state/0/step"]
    assert_state_equal(got["model/head"], _state(3)["model"]["head"].detach())
    assert_state_equal(got["opt/state/0/exp_avg"], _state(3)["opt"]["state"][0]["exp_avg"])


def test_restore_select_of_a_list_item_keeps_its_stored_name(store_dir, tmp_path):
    from safetensors.torch import load_file

    out = os.path.join(tmp_path, "sel.safetensors")
    r = run("restore", store_dir, "-o", out, "--select", "buffers/1")
    assert r.exit_code == 0
    got = load_file(out)
    assert sorted(got) == ["buffers/1"]
    assert_state_equal(got["buffers/1"], _state(3)["buffers"][1])


def test_restore_pt_is_bit_exact(store_dir, tmp_path):
    out = os.path.join(tmp_path, "s1.pt")
    r = run("restore", store_dir, 1, "-o", out)
    assert r.exit_code == 0, r.output
    loaded = torch.load(out, weights_only=True)
    assert_state_equal(loaded, _state(1))


def test_restore_refuses_unknown_extension(store_dir, tmp_path):
    r = CliRunner().invoke(main, ["restore", store_dir, "1", "-o",
                                  os.path.join(tmp_path, "x.bin")])
    assert r.exit_code != 0
    assert not os.path.exists(os.path.join(tmp_path, "x.bin"))


def test_restore_to_pt_refuses_what_only_a_full_unpickler_could_load(tmp_path):
    path = os.path.join(tmp_path, "s")
    with deltackpt.open(path) as s:
        s.save({"model": {"w": torch.ones(2)}, "rng": {"numpy": np.arange(3)}}, 1)
    out = os.path.join(tmp_path, "x.pt")
    r = CliRunner().invoke(main, ["restore", path, "1", "-o", out])
    assert_one_line_error(r, 5, "'rng/numpy'", "weights_only")
    assert not os.path.exists(out)
    assert run("restore", path, 1, "-o", out, "--select", "model").exit_code == 0
    assert_state_equal(torch.load(out, weights_only=True), {"model": {"w": torch.ones(2)}})


@pytest.mark.parametrize("cmd", [["restore", "1"], ["export", "1"], ["average", "--steps", "1,2"]])
def test_an_output_in_a_missing_directory_is_a_one_line_error(store_dir, tmp_path, cmd):
    for ext in (".pt", ".safetensors"):
        out = os.path.join(tmp_path, "nodir", "x" + ext)
        r = CliRunner().invoke(main, [cmd[0], store_dir, *cmd[1:], "-o", out])
        assert_one_line_error(r, 2, "nodir", "does not exist")


@pytest.mark.parametrize("args", [["show", "{s}", str(2**64)], ["delete", "{s}", str(2**63)],
                                  ["diff", "{s}", "1", str(2**63)],
                                  ["verify", "{s}", "--step", str(2**70)]])
def test_steps_wider_than_64_bits_are_usage_errors(store_dir, args):
    r = CliRunner().invoke(main, [a.format(s=store_dir) for a in args])
    assert r.exit_code == 2 and "is not in the range" in r.output and r.exception is not None
    assert "Traceback" not in r.output


def test_restore_to_safetensors_refuses_a_dtype_it_cannot_hold(tmp_path):
    path = os.path.join(tmp_path, "s")
    with deltackpt.open(path) as s:
        s.save({"model": {"c": torch.zeros(2, dtype=torch.complex128)}}, 1)
    out = os.path.join(tmp_path, "x.safetensors")
    r = CliRunner().invoke(main, ["restore", path, "1", "-o", out])
    assert_one_line_error(r, 2, "'model/c'", "complex128", ".pt")
    assert not os.path.exists(out) and not glob.glob(out + "*.partial")


def test_verify_ok_and_damaged(store_dir):
    r = run("verify", store_dir)
    assert r.exit_code == 0 and r.stdout.strip().endswith(": ok")
    data = json.loads(run("verify", store_dir, "--json").stdout)
    assert data["ok"] is True and data["steps_checked"] == 3 and data["problems"] == []
    with deltackpt.open(store_dir) as s:
        row = next(b for b in block_rows(s) if b["first_step"] == 3)
    flip_byte(os.path.join(store_dir, *row["pack"].split("/")), row["offset"] + row["length"] - 1)
    r = run("verify", store_dir)
    assert r.exit_code == 1
    assert "step 3, entry" in r.stdout and "problem(s)" in r.stdout
    r = run("verify", store_dir, "--json")
    assert r.exit_code == 1
    data = json.loads(r.stdout)
    assert data["ok"] is False and data["damaged_steps"] == [3] and data["problems"]
    assert run("verify", store_dir, "--step", 2).exit_code == 0
    assert run("verify", store_dir, "--step", 3).exit_code == 1
    out = os.path.join(os.path.dirname(store_dir), "damaged.pt")
    r = CliRunner().invoke(main, ["restore", store_dir, "3", "-o", out])
    assert_one_line_error(r, 6, "step 3, entry")
    assert not os.path.exists(out)
    assert run("restore", store_dir, 2, "-o", out).exit_code == 0
    assert_state_equal(torch.load(out, weights_only=True), _state(2))


def test_a_locked_store_is_an_error_for_writing_commands(store_dir):
    holder = deltackpt.open(store_dir)
    try:
        holder.save({"x": 1}, 99)  # takes the writer lock
        for cmd in (["delete", store_dir, "1"], ["gc", store_dir]):
            assert_one_line_error(CliRunner().invoke(main, cmd), 7, "lock")
        assert run("log", store_dir).exit_code == 0  # reading needs no lock
    finally:
        holder.close()
    assert run("delete", store_dir, 99).exit_code == 0


def test_stats(store_dir):
    r = run("stats", store_dir, "--json")
    assert r.exit_code == 0
    data = json.loads(r.stdout)
    with deltackpt.open(store_dir) as s:
        log = s.log()
        stored = s.stored_bytes()
    assert [x["step"] for x in data["steps"]] == [1, 2, 3]
    assert data["total"]["steps"] == 3 and data["total"]["stored_bytes"] == stored
    assert data["total"]["logical_bytes"] == sum(i.logical_bytes for i in log)
    for x, i in zip(data["steps"], log):
        assert x["written_bytes"] == i.written_bytes and x["new_chunks"] == i.new_chunks
    assert data["steps"][2]["dedup_ratio"] > 0.5  # step 3 shares most blocks with step 2
    r = run("stats", store_dir)
    assert r.exit_code == 0 and "3 steps" in r.stdout


def test_delete_and_gc(store_dir):
    r = run("delete", store_dir, 2, 3)
    assert r.exit_code == 0 and "deleted step 2" in r.stderr and "deleted step 3" in r.stderr
    assert [d["step"] for d in json.loads(run("log", store_dir, "--json").stdout)] == [1]
    r = run("gc", store_dir, "--json")
    assert r.exit_code == 0, r.output
    first = json.loads(r.stdout)
    assert first["bytes_freed"] > 0 and first["blocks_deleted"] > 0
    second = json.loads(run("gc", store_dir, "--json").stdout)
    assert second["bytes_freed"] == 0 and second["blocks_deleted"] == 0
    r = run("gc", store_dir)
    assert r.exit_code == 0 and r.stdout.startswith("freed 0 B")
    with deltackpt.open(store_dir) as s:
        assert s.steps() == [1]
        assert_state_equal(s.load(1), _state(1))
        assert s.verify().ok


@pytest.mark.parametrize("args,code,fragment", [
    (("show", "{store}", 9), 3, "step 9"),
    (("restore", "{store}", 9, "-o", "{tmp}/x.pt"), 3, "step 9"),
    (("delete", "{store}", 9), 3, "step 9"),
    (("verify", "{store}", "--step", 9), 3, "step 9"),
    (("restore", "{store}", 1, "-o", "{tmp}/x.pt", "--select", "nope"), 2, "nope"),
    (("log", "{missing}"), 9, "no deltackpt store"),
    (("show", "{missing}"), 9, "no deltackpt store"),
    (("verify", "{missing}"), 9, "no deltackpt store"),
    (("gc", "{missing}"), 9, "no deltackpt store"),
    (("stats", "{missing}"), 9, "no deltackpt store"),
])
def test_errors_are_one_line_with_an_exit_code(store_dir, tmp_path, args, code, fragment):
    subst = {"store": store_dir, "tmp": str(tmp_path), "missing": os.path.join(tmp_path, "nope")}
    argv = [a.format(**subst) if isinstance(a, str) else a for a in args]
    before = sorted(os.listdir(tmp_path))
    r = CliRunner().invoke(main, [str(a) for a in argv])
    assert_one_line_error(r, code, fragment)
    assert sorted(os.listdir(tmp_path)) == before  # no stray store or output file created


def test_show_on_an_empty_store(tmp_path):
    path = os.path.join(tmp_path, "empty")
    deltackpt.open(path).close()
    assert_one_line_error(CliRunner().invoke(main, ["show", path]), 2, "no steps")
    assert json.loads(run("log", path, "--json").stdout) == []


def test_json_output_is_strict_json_even_with_nan_metrics(tmp_path):
    path = os.path.join(tmp_path, "s")
    with deltackpt.open(path) as s:
        s.save({"w": torch.ones(2)}, 1)
        # stored straight into the index: save() itself cannot take nan metrics yet
        s._index.query("UPDATE steps SET metrics=? WHERE step=1",
                       (json.dumps({"loss": math.nan, "gn": math.inf}),))

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))

    r = run("log", path, "--json")
    assert r.exit_code == 0
    strict(r.stdout)
    strict(run("show", path, "--json").stdout)


def test_real_process(store_dir, tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "deltackpt")
    assert os.path.exists(exe), "the console script is installed with the package"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([exe, "log", "--json", store_dir], capture_output=True, text=True,
                       timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    assert [d["step"] for d in json.loads(p.stdout)] == [1, 2, 3]
    out = os.path.join(tmp_path, "x.safetensors")
    p = subprocess.run([sys.executable, "-m", "deltackpt", "restore", store_dir, "7", "-o", out],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 3 and p.stdout == ""
    assert p.stderr.startswith("deltackpt: error: ") and p.stderr.count("\n") == 1
    assert "step 7" in p.stderr and not os.path.exists(out)


_NO_TORCH = """
import sys
from deltackpt.cli import main
try:
    main(sys.argv[1:], prog_name="deltackpt")
except SystemExit as exc:
    code = exc.code
else:
    code = 0
print("torch imported:", "torch" in sys.modules)
sys.exit(code)
"""


@pytest.mark.parametrize("argv", [["log"], ["stats", "--json"], ["verify"], ["show"],
                                  ["diff", "--no-data", "1", "3"], ["gc"]])
def test_index_only_commands_never_import_torch(store_dir, argv):
    """torch takes 1-1.5 s to import: commands that read the index or re-hash blocks run
    without it (deltackpt/_torch.py)."""
    cmd, *rest = argv
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, cmd, store_dir, *rest],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("torch imported: False"), proc.stdout[-500:]


def test_gc_repack_threshold(tmp_path):
    """--repack-threshold 1 rewrites every pack holding anything dead: more space back
    than the default 0.5, same steps; packs all live (bar their own magic and pack index)
    are never rewritten; out-of-range values are usage errors."""
    import shutil

    path = tmp_path / "s"
    states = {s: {"shared": det_floats((60000,), 0), "own": det_floats((20000,), s)}
              for s in (1, 2, 3)}
    with deltackpt.open(path, delta="none") as store:
        for step, state in states.items():
            store.save(state, step)  # a pack per save; step 1's holds "shared" for all
    run("delete", path, 1)  # its pack: 80 kB dead, 240 kB live (0.75 > the default 0.5)
    other = tmp_path / "copy"
    shutil.copytree(path, other)
    default = json.loads(run("gc", path, "--json").stdout)
    full = json.loads(run("gc", other, "--repack-threshold", "1", "--json").stdout)
    assert default["packs_rewritten"] == 0 and full["packs_rewritten"] == 1
    assert full["bytes_freed"] > default["bytes_freed"] + 60_000
    for p in (path, other):
        with deltackpt.open(p) as s:
            assert s.steps() == [2, 3]
            assert_state_equal(s.load(2), states[2])
    r = run("gc", path, "--repack-threshold", "1.5")
    assert r.exit_code == 2 and "1.5" in r.output
    for _ in range(2):
        again = json.loads(run("gc", other, "--repack-threshold", "1", "--json").stdout)
        assert again["packs_rewritten"] == 0 and again["bytes_freed"] == 0, again
