"""Store files replaced by something that is not a regular file (a FIFO, as a store
tarball can carry): every reader entry point must answer with a deltackpt error at once,
never block in ``open(2)`` waiting for a FIFO writer that never comes.

Each case runs under a SIGALRM deadline: the handler raises, which interrupts a blocked
``open`` (PEP 475 retries only when the handler returns), so a regression fails in
seconds instead of hanging the suite.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import assert_state_equal, deadline, det_floats

import deltackpt
from deltackpt import CorruptionError, InvalidStoreError
from deltackpt.reindex import reindex

DEADLINE_S = 10


def _state(step: int) -> dict:
    return {"w": det_floats((4096,), seed=step), "step": step}


@pytest.fixture
def store_dir(tmp_path):
    path = str(tmp_path / "s")
    with deltackpt.open(path, block_size=4096) as s:
        for step in (1, 2):
            s.save(_state(step), step=step)
    return path


def _fifo(path: str) -> None:
    os.remove(path)
    os.mkfifo(path)


def _object_files(root: str, sub: str) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, sub))
                  for f in fs)


def test_config_fifo_is_refused_by_open_and_reindex(store_dir):
    _fifo(os.path.join(store_dir, "deltackpt.json"))
    with deadline(DEADLINE_S):
        with pytest.raises(InvalidStoreError, match="deltackpt.json is not a regular file"):
            deltackpt.open(store_dir, create=False)
        with pytest.raises(InvalidStoreError, match="deltackpt.json is not a regular file"):
            reindex(store_dir)


def test_index_fifo_is_corruption_naming_reindex_and_reindex_recovers(store_dir):
    index = os.path.join(store_dir, "index.sqlite")
    for extra in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(index + extra)
    _fifo(index)
    with deadline(DEADLINE_S):
        with pytest.raises(CorruptionError, match="not a regular file.*deltackpt reindex"):
            deltackpt.open(store_dir, create=False)
        os.remove(index)  # what the message tells the user to do next, minus the FIFO
        reindex(store_dir)
    with deltackpt.open(store_dir, create=False) as s:
        assert s.steps() == [1, 2]
        for step in (1, 2):
            assert_state_equal(s.load(step), _state(step))


_LOAD_AND_VERIFY = """
import sys, deltackpt
from deltackpt import DeltackptError
for path in sys.argv[1:]:
    with deltackpt.open(path, create=False) as s:
        try:
            s.load(1)
        except DeltackptError:
            pass  # a damaged pack must raise; a manifest the load does not read may not
        assert not s.verify().ok, path
print("answered")
"""


def test_pack_or_manifest_fifo_does_not_hang_load_or_verify(store_dir, tmp_path):
    copies = []
    for sub in ("packs", "manifests"):
        copy = str(tmp_path / f"fifo-in-{sub}")
        shutil.copytree(store_dir, copy)
        _fifo(_object_files(copy, sub)[0])
        copies.append(copy)
    try:  # a worker thread blocked in open(2) cannot be interrupted: use a child process
        r = subprocess.run([sys.executable, "-c", _LOAD_AND_VERIFY, *copies],
                           capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("a FIFO in the store blocked load/verify for 20 s")
    assert r.returncode == 0 and "answered" in r.stdout, r.stderr[-2000:]


def test_fixtures_are_sound(store_dir):
    # without damage the same calls succeed: the failures above come from the FIFOs
    with deadline(DEADLINE_S), deltackpt.open(store_dir, create=False) as s:
        assert s.verify().ok
        assert_state_equal(s.load(2), _state(2))
    torch.testing.assert_close(_state(1)["w"], det_floats((4096,), seed=1), rtol=0, atol=0)
