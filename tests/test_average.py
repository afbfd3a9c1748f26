"""Checkpoint averaging (mean and EMA) against plain-torch references, bit for bit."""

from __future__ import annotations

import collections
import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import assert_state_equal, det_floats, det_tensor, tensor_bytes
from safetensors.torch import load_file

import deltackpt
from deltackpt.average import accumulation_dtype, round_to
from deltackpt.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:ComplexHalf support")

FLOATS = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float8_e4m3fn,
          torch.complex64]


def _state(k: int) -> dict:
    """Step k of a fake run: every float entry drifts, ints and bools change too."""
    m = collections.OrderedDict()
    m["big"] = det_floats((3000,), 1) + 0.01 * k * det_floats((3000,), 2)  # 3 blocks
    for i, dt in enumerate(FLOATS):
        base = det_floats((40,), 10 + i) * (1 + 0.1 * k)
        m[f"w.{dt}"] = base.to(dt) if not dt.is_complex else torch.complex(base, -base).to(dt)
    m["scalar"] = torch.tensor(1.0 + k / 3, dtype=torch.bfloat16)
    m["empty"] = torch.empty(0, 3, dtype=torch.float16)
    m["count"] = torch.tensor(100 + k)
    m["mask"] = det_tensor(torch.bool, (17,), k)
    m["param"] = torch.nn.Parameter(det_floats((9,), 30) * k, requires_grad=False)
    m["np"] = (np.arange(6, dtype=np.float32) * (k + 0.3)).astype(np.float32)
    return {"model": m, "step": k, "lr": 0.1 / (k + 1), "blob": bytes([k]) * 3}


@pytest.fixture
def run(store_path):
    s = deltackpt.open(store_path, block_size=4096)
    for k in (1, 2, 3, 4):
        s.save(_state(k), 100 * k)
    yield s
    s.close()


def _ref(values: list, ema: float | None) -> torch.Tensor:
    """The documented arithmetic, written with whole tensors in plain torch."""
    dt = values[0].dtype
    acc_dt = accumulation_dtype(dt)
    acc = values[0].to(acc_dt)
    for x in values[1:]:
        acc = acc + x.to(acc_dt) if ema is None else acc * ema + x.to(acc_dt) * (1.0 - ema)
    if ema is None:
        acc = acc / len(values)
    return _round_nearest_even(acc, dt)


_BITS = {1: torch.uint8, 2: torch.int16}


def _round_nearest_even(acc: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """float64 -> ``dt`` rounded once to nearest, ties to even, checked exactly with
    Fractions: torch's own cast of float64 to 16- and 8-bit floats rounds twice (through
    float32), so it cannot serve as the reference."""
    if dt.is_complex or dt.itemsize >= 4:
        return acc.to(dt)  # one rounding in torch already
    nbits = 8 * dt.itemsize
    sign = 1 << (nbits - 1)
    out = []
    for v, b in zip(acc.reshape(-1).tolist(), _uint_bits(acc.to(dt))):
        if not math.isfinite(v):
            out.append(b)
            continue
        # double rounding is off by at most one ulp: the answer is b or a bit neighbour of
        # the same sign (bits are sign-magnitude, so neighbours are adjacent values)
        cands = [c for c in (b - 1, b, b + 1) if 0 <= c < (1 << nbits)
                 and c & sign == b & sign and math.isfinite(_as_float(c, dt))]
        exact = Fraction(v)
        out.append(min(cands, key=lambda c: (abs(Fraction(_as_float(c, dt)) - exact), c & 1)))
    return _from_uint_bits(out, dt).reshape(acc.shape)


def _uint_bits(t: torch.Tensor) -> list[int]:
    mask = (1 << (8 * t.element_size())) - 1
    return [x & mask for x in t.reshape(-1).view(_BITS[t.element_size()]).tolist()]


def _from_uint_bits(bits: list[int], dt: torch.dtype) -> torch.Tensor:
    nbits = 8 * dt.itemsize
    signed = [b - (1 << nbits) if dt.itemsize == 2 and b >= 1 << (nbits - 1) else b
              for b in bits]
    return torch.tensor(signed, dtype=_BITS[dt.itemsize]).view(dt)


def _as_float(bits: int, dt: torch.dtype) -> float:
    return _from_uint_bits([bits], dt).double().item()


def _check(result: dict, steps: list[int], ema: float | None) -> None:
    states = [_state(s // 100) for s in steps]
    m = result["model"]
    assert list(m) == list(states[-1]["model"])
    for key, last in states[-1]["model"].items():
        got = m[key]
        if isinstance(last, np.ndarray):
            want = _ref([torch.from_numpy(s["model"][key]) for s in states], ema).numpy()
            assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), key
            continue
        if last.dtype.is_floating_point or last.dtype.is_complex:
            want = _ref([s["model"][key].detach() for s in states], ema)
        else:
            want = last  # integer / bool entries: the last step's
        assert type(got) is type(last), key
        assert got.dtype == want.dtype and got.shape == want.shape, key
        assert torch.equal(tensor_bytes(got), tensor_bytes(want)), key
    # everything else comes from the last step
    assert result["step"] == states[-1]["step"] and result["lr"] == states[-1]["lr"]
    assert result["blob"] == states[-1]["blob"]


def test_mean_matches_torch_reference_bit_for_bit(run):
    steps = [100, 300, 400]
    got = run.average(steps, select=None)
    _check(got, steps, None)
    # it is a real average: differs from every input where inputs differ
    assert not torch.equal(got["model"]["big"], _state(4)["model"]["big"])


def test_ema_matches_torch_reference_and_depends_on_order(run):
    got = run.average([100, 200, 300, 400], select=None, ema=0.9)
    _check(got, [100, 200, 300, 400], 0.9)
    rev = run.average([400, 300, 200, 100], select=None, ema=0.9)
    _check(rev, [400, 300, 200, 100], 0.9)
    assert not torch.equal(rev["model"]["big"], got["model"]["big"])


def test_select_and_save_as(run):
    state = run.average([200, 400], ema=0.5, save_as=500)
    assert set(state) == {"model"}
    _check({**state, "step": 4, "lr": 0.1 / 5, "blob": bytes([4]) * 3}, [200, 400], 0.5)
    assert_state_equal(run.load(500, map_location="cpu"), state)
    assert run.info(500).note == "EMA (decay 0.5) of steps 200, 400"
    one = run.average([300], select="model/big")
    assert torch.equal(one["model"]["big"], _state(3)["model"]["big"])


def test_averaging_refuses_what_it_cannot_do(run):
    run.save({"model": {"big": torch.zeros(5)}}, 900)
    run.save({"model": {"other": torch.zeros(5)}}, 901)
    cases = [
        (dict(steps=[100, 900]), deltackpt.InvalidInputError, "'model/big'.*step 900"),
        (dict(steps=[901, 100]), deltackpt.InvalidInputError, "step 901 has no entry 'model/big'"),
        (dict(steps=[100, 100]), deltackpt.InvalidInputError, "twice"),
        (dict(steps=[]), deltackpt.InvalidInputError, "at least one"),
        (dict(steps=[100, 200], ema=1.5), deltackpt.InvalidInputError, "decay"),
        (dict(steps=[100, 250]), deltackpt.StepNotFoundError, "step 250"),
        (dict(steps=[100, 200], save_as=300), deltackpt.StepExistsError, "step 300"),
        (dict(steps=[100, 200], select="nope"), deltackpt.PathNotFoundError, "nope"),
    ]
    for kw, exc, match in cases:
        with pytest.raises(exc, match=match):
            run.average(**kw)
    assert run.steps() == [100, 200, 300, 400, 900, 901]


def test_cli_average(run, store_path, tmp_path):
    run.close()
    runner = CliRunner()
    out = tmp_path / "avg.safetensors"
    r = runner.invoke(main, ["average", store_path, "--steps", "100,200,400", "-o", str(out),
                             "--save-step", "1000"])
    assert r.exit_code == 0, r.output
    assert "saved the mean of steps 100,200,400 as step 1000" in r.stderr
    tensors = load_file(out)
    want = _ref([_state(k)["model"]["big"] for k in (1, 2, 4)], None)
    assert torch.equal(tensor_bytes(tensors["big"]), tensor_bytes(want))
    r = runner.invoke(main, ["average", store_path, "--steps", "100, 200", "--ema", "0.99",
                             "--select", "model/big", "-o", str(tmp_path / "ema.pt"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["files"] == [str(tmp_path / "ema.pt")]
    ema_w = torch.load(tmp_path / "ema.pt", weights_only=True)
    assert torch.equal(tensor_bytes(ema_w), tensor_bytes(
        _ref([_state(k)["model"]["big"] for k in (1, 2)], 0.99)))
    cases = [
        (["average", store_path, "--steps", "100,x", "-o", str(out)], 2, "comma-separated"),
        (["average", store_path, "--steps", "100,200"], 2, "-o OUT"),
        (["average", store_path, "--steps", "100,250", "-o", str(out)], 3, "step 250"),
        (["average", store_path, "--steps", "100,200", "--ema", "2", "-o", str(out)], 2,
         "[0, 1]"),
        (["average", store_path, "--steps", "100,200", "-o", str(tmp_path / "a.txt")], 2,
         ".safetensors or .pt"),
        (["average", store_path, "--steps", "100,200", "--save-step", "1000"], 4,
         "already exists"),
        (["average", store_path, "--steps", "100,99999999999999999999", "-o", str(out)], 2,
         "does not fit in 64 bits"),
    ]
    for args, code, msg in cases:
        r = runner.invoke(main, args)
        assert r.exit_code == code, (args, r.output)
        assert msg in r.output, (args, r.output)


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_averages_round_once_to_nearest_even_not_through_float32(store_path, dt):
    # 1 + 2^-8 + 2^-30 lies just above bf16's halfway point between 1 and 1 + 2^-7: float32
    # rounds it onto the halfway point, and a second rounding goes to the even side, 1.0
    decay = 1 - 2**-8 - 2**-30
    with deltackpt.open(store_path) as s:
        s.save({"w": torch.tensor([1.0], dtype=torch.bfloat16)}, 1)
        s.save({"w": torch.tensor([2.0], dtype=torch.bfloat16)}, 2)
        assert s.average([1, 2], ema=decay, select=None)["w"].tolist() == [1.0078125]
        g = torch.Generator().manual_seed(5)
        ws = [(torch.randn(3000, generator=g, dtype=torch.float64) * 4).to(dt) for _ in range(3)]
        for i, w in enumerate(ws):
            s.save({"w": w}, 10 + i)
        for ema in (0.999, None):
            got = s.average([10, 11, 12], ema=ema, select=None)["w"]
            want = _ref(ws, ema)
            assert torch.equal(tensor_bytes(got), tensor_bytes(want)), (dt, ema)
    # the rounding itself on the hard cases, which random averages hit once in ~65,000
    # elements: halfway points of ``dt`` and values a hair above or below them
    lo = (torch.randn(2000, generator=g, dtype=torch.float64) * 4).to(dt)
    hi = _from_uint_bits([b + 1 for b in _uint_bits(lo)], dt).double()  # next magnitude
    lo = lo.double()
    mid = (lo + hi) / 2
    hair = (hi - lo) * 2.0**-25
    values = torch.cat([mid, mid + hair, mid - hair, torch.tensor([0.0, -0.0, 1e-300])])
    values = values[torch.isfinite(values)]
    got = round_to(values, dt)
    assert torch.equal(tensor_bytes(got), tensor_bytes(_round_nearest_even(values, dt))), dt


def test_averages_accumulate_in_float64(store_path):
    """A float32 accumulator overflowed on values near float32's maximum, and left a third
    of fp32 means one ulp away from the correctly rounded mean."""
    big = torch.tensor([3e38, -3e38, 1.5])
    a = det_floats((2000,), 1)
    b = det_floats((2000,), 2)
    with deltackpt.open(store_path, block_size=4096) as s:
        s.save({"model": {"big": big, "bf": big.bfloat16(), "a": a}}, 1)
        s.save({"model": {"big": big, "bf": big.bfloat16(), "a": b}}, 2)
        mean = s.average([1, 2])["model"]
    assert torch.equal(mean["big"], big) and torch.equal(mean["bf"], big.bfloat16())
    want = ((a.double() + b.double()) / 2).float()  # the correctly rounded mean
    assert torch.equal(tensor_bytes(mean["a"]), tensor_bytes(want))


@pytest.mark.parametrize("decay,want_step", [(0.0, 2), (1.0, 1)])
def test_ema_with_decay_0_or_1_is_one_step_even_with_infinities(store_path, decay, want_step):
    states = {1: torch.tensor([float("inf"), 1.0]), 2: torch.tensor([5.0, float("-inf")])}
    with deltackpt.open(store_path, block_size=4096) as s:
        for k, w in states.items():
            s.save({"model": {"w": w}}, k)
        got = s.average([1, 2], ema=decay)["model"]["w"]
    assert torch.equal(got, states[want_step])


def test_cli_average_single_tensor_key_and_nothing_saved_when_the_output_fails(
        run, store_path, tmp_path):
    run.close()
    runner = CliRunner()
    out = tmp_path / "one.safetensors"
    r = runner.invoke(main, ["average", store_path, "--steps", "100,200", "--select",
                             "model/big", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert list(load_file(out)) == ["big"]  # as export names it, not ""
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    r = runner.invoke(main, ["average", store_path, "--steps", "100,200", "-o", str(blocker),
                             "--max-shard-size", "1MB", "--save-step", "1001"])
    assert r.exit_code == 2 and "not a directory" in r.stderr, r.output
    r = runner.invoke(main, ["average", store_path, "--steps", "100,200", "-o",
                             str(tmp_path / "x.pt"), "--save-step", "1001"])
    assert r.exit_code == 5 and "weights_only" in r.stderr  # the numpy entry
    assert not (tmp_path / "x.pt").exists() and not list(tmp_path.glob("x.pt*.partial"))
    with deltackpt.open(store_path) as s:
        assert 1001 not in s  # a failed command leaves no step behind


def test_average_of_a_damaged_store_fails_after_one_plan(tmp_path, monkeypatch):
    """Real damage (no pack came or went) is reported at once, not after re-planning and
    decoding every step three times."""
    from helpers import flip_byte

    import deltackpt.average as average_mod

    path = tmp_path / "s"
    with deltackpt.open(path, delta="none") as s:
        for step in (1, 2):
            s.save({"model": {"w": det_floats((5000,), step)}}, step)
        name, offset, length = s._index.query(
            "SELECT p.name, b.offset, b.length FROM blocks b JOIN packs p ON p.id=b.pack_id "
            "WHERE b.first_step=2 LIMIT 1")[0]
    flip_byte(path / name, offset + length - 1, 0x01)
    plans = []
    real = average_mod._average_once
    monkeypatch.setattr(average_mod, "_average_once",
                        lambda *a, **k: (plans.append(1), real(*a, **k))[1])
    with deltackpt.open(path) as s, pytest.raises(deltackpt.CorruptionError, match="step 2"):
        s.average([1, 2])
    assert len(plans) == 1
