"""Crash safety: a child process saving in a loop dies at every named crash point
(DELTACKPT_CRASH_AT) and at random moments (SIGKILL); the store must come back whole.

After every crash: the store opens, every step whose save returned (the child
prints it after save() returns) loads bit-exact, no partial step is visible,
verify() is ok, gc() removes the leftovers and a second gc() frees nothing.

The children run concurrently (each pays a torch import) from one module fixture.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import torch
from helpers import assert_state_equal, crash_state

import deltackpt
from deltackpt.backend import PARTIAL_SUFFIX
from deltackpt.faults import CRASH_EXIT_CODE, CRASH_POINTS

torch.set_num_threads(1)
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

CHILD = r'''
import os, sys
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
from helpers import crash_state
import deltackpt

path, scenario = sys.argv[2], sys.argv[3]


def out(msg):
    print(msg, flush=True)


if scenario == "plain":
    s = deltackpt.open(path, block_size=4096, delta="xor")
    for step in range(4):
        s.save(crash_state(step), step)
        out(f"saved {step}")
    s.delete(3)
    out("deleted 3")
    s.gc()
    out("gc")
    for step in (3, 4):
        s.save(crash_state(step), step)
        out(f"saved {step}")
elif scenario == "repack":
    s = deltackpt.open(path, block_size=4096, delta="none")
    for step in (0, 1):
        s.save(crash_state(step, "repack"), step)
        out(f"saved {step}")
    s.delete(0)
    out("deleted 0")
    s.gc()
    out("gc")
    s.save(crash_state(2, "repack"), 2)
    out("saved 2")
elif scenario == "thin":
    s = deltackpt.open(path, block_size=4096, delta="xor")
    for step in (0, 1):
        s.save(crash_state(step), step)
        out(f"saved {step}")
    s.thin(1, ["w"])
    out("thinned 1")
    s.save(crash_state(2), 2)
    out("saved 2")
elif scenario == "loop":
    s = deltackpt.open(path, block_size=65536)
    step = 0
    while True:
        s.save(crash_state(step, "loop"), step)
        out(f"saved {step}")
        step += 1
s.close()
out("done")
'''

# crash point -> (scenario, N-th hit, steps visible afterwards)
# save points fire on the 3rd save (step 2): earlier steps and delta bases exist
EXPECTED = {
    "save:after-flatten": ("plain", 3, [0, 1]),
    "save:after-hash": ("plain", 3, [0, 1]),
    "save:mid-write": ("plain", 3, [0, 1]),
    "save:after-packs": ("plain", 3, [0, 1]),
    "save:after-manifest": ("plain", 3, [0, 1]),
    "save:before-commit": ("plain", 3, [0, 1]),
    "save:after-commit": ("plain", 3, [0, 1, 2]),
    "delete:before-commit": ("plain", 1, [0, 1, 2, 3]),
    "delete:after-commit": ("plain", 1, [0, 1, 2]),
    "thin:after-manifest": ("thin", 1, [0, 1]),
    "thin:before-commit": ("thin", 1, [0, 1]),
    "thin:after-commit": ("thin", 1, [0, 1]),
    "gc:after-scan": ("plain", 1, [0, 1, 2]),
    "gc:after-index-commit": ("plain", 1, [0, 1, 2]),
    "gc:mid-repack-write": ("repack", 1, [1]),
    "gc:mid-delete": ("plain", 1, [0, 1, 2]),
    "gc:after-delete": ("plain", 1, [0, 1, 2]),
    "gc:after-repack-write": ("repack", 1, [1]),
    "gc:after-repack-commit": ("repack", 1, [1]),
}
#: points whose crash leaves objects only gc removes (proves the crash came mid-way)
LEAVES_GARBAGE = {"save:mid-write", "save:after-packs", "save:after-manifest",
                  "save:before-commit", "delete:after-commit",
                  "gc:after-repack-write", "gc:mid-repack-write"}
RANDOM_KILLS = [11, 22, 33]


@dataclass
class Run:
    path: str
    scenario: str
    returncode: int
    lines: list[str]
    stderr: str

    @property
    def saved(self) -> list[int]:
        return [int(x.split()[1]) for x in self.lines if x.startswith("saved ")]


def _spawn(path, scenario, env_extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
    env.pop("DELTACKPT_CRASH_AT", None)
    env.update(env_extra)
    return subprocess.Popen([sys.executable, "-c", CHILD, TESTS_DIR, path, scenario],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _crash_at(point, base):
    scenario, nth, _ = EXPECTED[point]
    path = os.path.join(base, point.replace(":", "_"))
    p = _spawn(path, scenario, {"DELTACKPT_CRASH_AT": f"{point}:{nth}"})
    out, err = p.communicate(timeout=240)
    return Run(path, scenario, p.returncode, out.splitlines(), err)


def _uninterrupted(base):
    path = os.path.join(base, "control")
    p = _spawn(path, "plain", {})
    out, err = p.communicate(timeout=240)
    return Run(path, "plain", p.returncode, out.splitlines(), err)


def _random_kill(seed, base):
    rng = random.Random(seed)
    path = os.path.join(base, f"kill_{seed}")
    p = _spawn(path, "loop", {})
    lines = []
    want = rng.randint(1, 3)
    deadline = time.monotonic() + 240
    while len(lines) < want and time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        lines.append(line.strip())
    time.sleep(rng.uniform(0.0, 0.08))  # lands inside the next save(s)
    p.send_signal(signal.SIGKILL)
    out, err = p.communicate(timeout=60)
    lines += out.splitlines()
    return Run(path, "loop", p.returncode, lines, err)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("crash"))
    with ThreadPoolExecutor(max_workers=4) as pool:
        futs = {("kill", s): pool.submit(_random_kill, s, base) for s in RANDOM_KILLS}
        futs.update({("point", p): pool.submit(_crash_at, p, base) for p in CRASH_POINTS})
        futs[("control", None)] = pool.submit(_uninterrupted, base)
        return {k: f.result() for k, f in futs.items()}


def _expected_state(step: int, kind: str, thinned: frozenset[int]) -> dict:
    state = crash_state(step, "plain" if kind == "thin" else kind)
    return {"w": state["w"]} if step in thinned else state


def _check_recovered(run: Run, visible: list[int] | None, kind: str, garbage: bool,
                     inflight: int | None, thinned: frozenset[int] = frozenset()):
    def crash_state(step, kind):  # noqa: F811 - the thin scenario's steps may be thinned
        return _expected_state(step, kind, thinned)

    with deltackpt.open(run.path) as s:
        steps = s.steps()
        if visible is not None:
            assert steps == visible
        if kind == "loop":
            assert set(run.saved) <= set(steps)
        for step in steps:  # no partial step: all that is visible is whole
            assert_state_equal(s.load(step), crash_state(step, kind))
        r = s.verify()
        assert r.ok, r.problems

        def referenced():
            return ({n for (n,) in s._index.query("SELECT name FROM packs")}
                    | {n for (n,) in s._index.query("SELECT manifest FROM steps")})

        listed = set(s.backend.list("packs/") + s.backend.list("manifests/"))
        if garbage:
            assert listed - referenced(), "the crash point left no garbage: did it fire?"
        # before any gc, the store takes new saves, including the step that was in flight
        nxt = [max(steps + run.saved, default=0) + 10]
        if inflight is not None and inflight not in steps:
            nxt.insert(0, inflight)
        for step in nxt:
            s.save(crash_state(step, kind), step)
            assert_state_equal(s.load(step), crash_state(step, kind))
        s.gc()
        names = s.backend.list("packs/") + s.backend.list("manifests/")
        assert not [n for n in names if n.endswith(PARTIAL_SUFFIX)]
        assert set(names) == referenced()
        again = s.gc()
        assert (again.bytes_freed, again.blocks_deleted, again.packs_deleted,
                again.objects_deleted) == (0, 0, 0, 0)
        for step in s.steps():
            assert_state_equal(s.load(step), crash_state(step, kind))
        assert s.verify().ok
        return steps


@pytest.mark.parametrize("point", [
    p for p in CRASH_POINTS])
def test_crash_point(runs, point):
    assert set(EXPECTED) == set(CRASH_POINTS)
    run = runs[("point", point)]
    assert run.returncode == CRASH_EXIT_CODE, (run.returncode, run.stderr[-2000:])
    scenario, nth, visible = EXPECTED[point]
    assert "done" not in run.lines
    inflight = 2 if point.startswith("save:") else None
    thinned = frozenset({1}) if point == "thin:after-commit" else frozenset()
    _check_recovered(run, visible, scenario, point in LEAVES_GARBAGE, inflight, thinned)


@pytest.mark.parametrize("seed", RANDOM_KILLS)
def test_random_sigkill(runs, seed):
    run = runs[("kill", seed)]
    assert run.returncode == -signal.SIGKILL, (run.returncode, run.stderr[-2000:])
    assert run.saved, "the child was killed before its first save returned"
    steps = _check_recovered(run, None, "loop", False, max(run.saved) + 1)
    assert set(run.saved) <= set(steps) <= set(run.saved) | {max(run.saved) + 1}


def test_a_run_without_crash_points_completes(runs):
    """Control for the fixture: with no crash point the child runs to the end."""
    run = runs[("control", None)]
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.lines[-1] == "done" and run.saved == [0, 1, 2, 3, 3, 4]
    with deltackpt.open(run.path) as s:
        assert s.steps() == [0, 1, 2, 3, 4]
        for step in s.steps():
            assert_state_equal(s.load(step), crash_state(step))
        assert any(r[0] is not None for r in s._index.query("SELECT base FROM blocks"))
        assert s.gc().bytes_freed == 0


def test_resave_after_a_kill_during_the_manifest_write(tmp_path):
    path = os.path.join(tmp_path, "s")
    with deltackpt.open(path) as s:
        s.save(crash_state(0), 0)
    # what a SIGKILL inside backend.put(manifest) leaves behind
    partial = os.path.join(path, "manifests", f"{1:020d}.manifest{PARTIAL_SUFFIX}")
    with open(partial, "wb") as f:
        f.write(b"DKM1 torn")
    with deltackpt.open(path) as s:
        s.save(crash_state(1), 1)
        assert_state_equal(s.load(1), crash_state(1))
