"""Kill loop: a child saves, deletes and collects garbage in a loop; the parent SIGKILLs it
at a random moment, checks the store, and starts the next child on the same store.

The child writes one line to a pipe before each operation and one after it returns
(``begin save 7`` ... ``saved 7``), so the parent knows which steps were acknowledged.
After every kill: the store opens, every acknowledged save is present and restores
bit-exact, every acknowledged delete is gone, any other visible step is one that was
in flight and restores bit-exact too (nothing partial), verify is clean, gc leaves
exactly the referenced objects and a second gc frees nothing.

Children are forked from one zygote process that imported torch and deltackpt once,
so a kill costs milliseconds, not an interpreter start. Default: a short run; the
``stress`` run does at least 200 kills.
"""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from helpers import assert_state_equal, crash_state

import deltackpt
from deltackpt.backend import PARTIAL_SUFFIX

torch.set_num_threads(1)
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

ZYGOTE = r'''
import os, random, sys
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
from helpers import crash_state
import deltackpt


def say(msg):
    os.write(1, (msg + "\n").encode())  # one write < PIPE_BUF: a line is whole or absent


def life(path, seed):
    rng = random.Random(seed)
    s = deltackpt.open(path, block_size=4096, delta="xor", threads=1)
    steps = s.steps()
    nxt = max(steps) + 1 if steps else 0
    for _ in range(40):
        r = rng.random()
        if r < 0.55 or len(steps) < 3:
            say(f"begin-save {nxt}")
            s.save(crash_state(nxt), nxt)
            say(f"saved {nxt}")
            steps.append(nxt)
            nxt += 1
        elif r < 0.85:
            victim = steps.pop(rng.randrange(len(steps) - 1))
            say(f"begin-delete {victim}")
            s.delete(victim)
            say(f"deleted {victim}")
        else:
            s.gc()
            say("gc")
    s.close()


for line in sys.stdin:
    cmd, path, seed = line.split()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            life(path, int(seed))
        except BaseException as exc:
            say(f"error {exc!r}")
            code = 1
        os._exit(code)
    say(f"pid {pid}")
    _, status = os.waitpid(pid, 0)
    say(f"exit {status}")
'''


class Zygote:
    def __init__(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("DELTACKPT_CRASH_AT", None)
        self.p = subprocess.Popen([sys.executable, "-c", ZYGOTE, TESTS_DIR], env=env,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.put(line.strip())
        self.lines.put("eof")

    def next_line(self, timeout: float = 120.0) -> str:
        line = self.lines.get(timeout=timeout)
        assert line != "eof", "the zygote died"
        return line

    def life(self, path: str, seed: int, kill_after: float) -> tuple[list[str], bool]:
        """Run one child; SIGKILL it ``kill_after`` s after it started. Returns its lines and
        whether the kill landed (the child may finish first)."""
        assert self.p.stdin is not None
        self.p.stdin.write(f"run {path} {seed}\n")
        self.p.stdin.flush()
        first = self.next_line()
        assert first.startswith("pid "), first
        pid = int(first.split()[1])
        time.sleep(kill_after)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        lines = []
        while True:
            line = self.next_line()
            if line.startswith("exit "):
                status = int(line.split()[1])
                break
            assert not line.startswith("error"), line
            lines.append(line)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert killed or status == 0, status
        return lines, killed

    def close(self) -> None:
        assert self.p.stdin is not None
        self.p.stdin.close()
        self.p.wait(timeout=60)


def check_store(path: str, status: dict[int, str]) -> None:
    with deltackpt.open(path) as s:
        steps = s.steps()
        for step, st in status.items():
            if st == "present":
                assert step in steps, f"acknowledged step {step} lost: {steps}"
            elif st == "absent":
                assert step not in steps, f"deleted step {step} is back: {steps}"
        for step in steps:
            assert step in status, f"step {step} was never saved"
            assert_state_equal(s.load(step), crash_state(step))
        r = s.verify()
        assert r.ok, r.problems
        s.gc()
        referenced = ({n for (n,) in s._index.query("SELECT name FROM packs")}
                      | {n for (n,) in s._index.query("SELECT manifest FROM steps")})
        names = set(s.backend.list("packs/") + s.backend.list("manifests/"))
        assert not [n for n in names if n.endswith(PARTIAL_SUFFIX)]
        assert names == referenced, sorted(names ^ referenced)
        again = s.gc()
        assert (again.bytes_freed, again.blocks_deleted, again.packs_deleted,
                again.objects_deleted) == (0, 0, 0, 0)
        # what the parent's gc and the kill leave is the truth from now on
        for step in list(status):
            status[step] = "present" if step in steps else "absent"


def kill_loop(tmp_path, kills_wanted: int, seed: int) -> tuple[int, int]:
    rng = random.Random(seed)
    path = str(tmp_path / "store")
    status: dict[int, str] = {}
    z = Zygote()
    kills = lives = 0
    try:
        while kills < kills_wanted:
            lines, killed = z.life(path, rng.randrange(1 << 30), rng.uniform(0.0, 0.6))
            lives += 1
            kills += killed
            for line in lines:
                verb, _, arg = line.partition(" ")
                if verb == "begin-save":
                    status[int(arg)] = "either"
                elif verb == "saved":
                    status[int(arg)] = "present"
                elif verb == "begin-delete":
                    status[int(arg)] = "either"
                elif verb == "deleted":
                    status[int(arg)] = "absent"
            if os.path.exists(path):
                check_store(path, status)
            else:
                assert not any(v == "present" for v in status.values())
    finally:
        z.close()
    return kills, lives


def test_kill_loop_short(tmp_path):
    kills, lives = kill_loop(tmp_path, 8, seed=1)
    assert kills == 8


@pytest.mark.stress
def test_kill_loop_200_kills(tmp_path):
    t0 = time.monotonic()
    kills, lives = kill_loop(tmp_path, 200, seed=2)
    print(f"kill loop: {kills} kills in {lives} lives, {time.monotonic() - t0:.0f} s")
    assert kills >= 200
