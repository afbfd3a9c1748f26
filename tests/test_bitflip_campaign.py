"""Random damage campaign: single bit flips in packs, manifests, the SQLite file and its WAL,
truncated and torn packs, one at a time.

Every trial damages a pristine copy of one store, then opens it, runs ``verify``, loads
every step, lists the log, and classifies what happened:

- ``detected``: ``verify`` reported the damage and/or a load (or the open) raised a
  ``DeltackptError``;
- ``harmless``: the flip hit bytes nothing reads (SQLite free space, unused header bytes):
  every step still restores exactly and verify is clean;
- ``rolled-back``: (WAL only) SQLite's frame checksums dropped the damaged frame and every
  later one, so the newest commits vanish from the index: the remaining steps restore
  exactly, the lost ones raise ``StepNotFoundError`` and ``reindex`` brings them back;
- ``wrong-bytes`` and ``crash``/``hang`` (a non-deltackpt exception, or 60 s without an
  answer): must never happen.

After every SQLite/WAL trial that was not harmless, ``deltackpt reindex`` rebuilds the
index from the data files and every step must restore exactly again.

Default run: a few dozen trials per target. ``-m stress`` runs >= 1,000 per target and
prints the table that docs/reliability.md reports::

    .venv/bin/python -m pytest -m stress tests/test_bitflip_campaign.py -s
"""

from __future__ import annotations

import collections
import contextlib
import glob
import os
import random
import shutil

import pytest
import torch
from helpers import Hang, assert_state_equal, deadline, det_floats, det_tensor

import deltackpt
from deltackpt import CorruptionError, DeltackptError, StepNotFoundError
from deltackpt.reindex import reindex

torch.set_num_threads(1)
BS = 4096
STEPS = (1, 2, 3, 4)
OUTCOMES = ("detected", "harmless", "rolled-back", "wrong-bytes", "crash", "hang")


def _state(step: int) -> dict:
    w = det_floats((6 * 1024,), 1)
    w[::97] += step * 1e-3  # every block changes a little: xor delta chains
    return {
        "model": {"w": w, "b": det_tensor(torch.float32, (300,), 10 + step),
                  "frozen": torch.arange(2048, dtype=torch.float32) / 64},
        "opt": {"state": {0: {"step": torch.tensor(float(step)),
                              "exp_avg": det_floats((1500,), 20 + step, scale=1e-3)}},
                "param_groups": [{"lr": 1e-3 * step, "betas": (0.9, 0.999)}]},
        "step": step, "name": f"run-{step % 2}",
        "blob": bytes(range(256)) * 3,
    }


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A 4-step store (delta chains, several packs); the index both checkpointed and as a
    crash image whose last two commits live only in the WAL."""
    root = tmp_path_factory.mktemp("bitflip")
    path = os.path.join(root, "store")
    with deltackpt.open(path, block_size=BS) as s:
        s._pack_size = 24 * 1024  # several packs per save
        for step in STEPS[:2]:
            s.save(_state(step), step, metrics={"loss": 1.0 / step})
    s = deltackpt.open(path)
    s._pack_size = 24 * 1024
    for step in STEPS[2:]:
        s.save(_state(step), step, metrics={"loss": 1.0 / step})
    index = os.path.join(path, "index.sqlite")
    with open(index, "rb") as f:
        wal_db = f.read()
    with open(index + "-wal", "rb") as f:
        wal = f.read()
    s.close()
    assert not os.path.exists(index + "-wal")
    with open(index, "rb") as f:
        db = f.read()
    return {"path": path, "db": db, "wal_db": wal_db, "wal": wal,
            "expected": {step: _state(step) for step in STEPS}}


def _equal(a, b) -> bool:
    try:
        assert_state_equal(a, b)
    except AssertionError:
        return False
    return True


def _probe(path: str, expected: dict, store=None) -> tuple[str, dict]:
    """Open (unless ``store`` is given), verify, load every step; classify the outcome."""
    facts = {"raised": set(), "missing": set(), "verify": None}
    own = store is None
    try:
        with deadline(60):
            try:
                if own:
                    store = deltackpt.open(path)
            except DeltackptError as exc:
                facts["open"] = exc
                return "detected", facts
            try:
                try:
                    r = store.verify()
                except DeltackptError as exc:  # an unreadable index: nothing to check against
                    facts["verify_error"] = exc
                    facts.setdefault("errors", []).append(exc)
                    r = None
                facts["verify"] = r
                wrong = False
                for step, st in expected.items():
                    try:
                        out = store.load(step)
                    except StepNotFoundError:
                        facts["missing"].add(step)
                        continue
                    except DeltackptError as exc:
                        facts["raised"].add(step)
                        facts.setdefault("errors", []).append(exc)
                        continue
                    wrong = wrong or not _equal(out, st)
                try:
                    store.log()
                except DeltackptError:
                    facts["raised"].add("log")
                if wrong:
                    return "wrong-bytes", facts
            finally:
                if own:
                    store.close()
    except Hang:
        return "hang", facts
    except Exception as exc:  # noqa: BLE001 - anything but a deltackpt error is a crash
        facts["crash"] = repr(exc)
        return "crash", facts
    if r is None or not r.ok or facts["raised"]:
        return "detected", facts
    if facts["missing"]:
        return "rolled-back", facts
    return "harmless", facts


def _restore(path: str, files: dict[str, bytes]) -> None:
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(path, "index.sqlite" + suffix))
    for p in glob.glob(os.path.join(path, "index.sqlite.*")):
        os.remove(p)
    for name, data in files.items():
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)


def _flip_bit(file: str, offset: int, bit: int) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ (1 << bit)]))


def _data_files(path: str, sub: str) -> list[tuple[str, int]]:
    out = []
    for dirpath, _dirs, files in os.walk(os.path.join(path, sub)):
        for f in files:
            full = os.path.join(dirpath, f)
            out.append((full, os.path.getsize(full)))
    return sorted(out)


def _inside_zstd_payload(pack: bytes, offset: int) -> bool:
    """Whether ``offset`` of a pack lies in a zstd stream, past its frame descriptor."""
    from deltackpt import codec as C
    from deltackpt.packs import FOOTER_SIZE, PACK_INDEX_MAGIC, PACK_MAGIC

    pos = len(PACK_MAGIC)
    end = len(pack)
    if pack[-FOOTER_SIZE:-FOOTER_SIZE + 8] == PACK_INDEX_MAGIC:  # frames stop at the index
        end = int.from_bytes(pack[-FOOTER_SIZE + 8:-FOOTER_SIZE + 16], "little")
    while pos < end:
        info = C.parse_header(pack[pos:pos + 200])
        start = pos + info.payload_offset
        for mode, n in info.streams:
            if start + 5 <= offset < start + n:
                return mode == C.STREAM_ZSTD
            start += n
        pos += info.frame_len
    return False


def _pick(files: list[tuple[str, int]], rng: random.Random) -> tuple[str, int]:
    """A uniformly random byte among all the bytes of ``files``."""
    total = sum(n for _, n in files)
    k = rng.randrange(total)
    for name, n in files:
        if k < n:
            return name, k
        k -= n
    raise AssertionError


def _run_data_campaign(template, tmp_path, target: str, trials: int, seed: int) -> collections.Counter:
    """Damage packs or manifests in place (then repair them) under one open store."""
    path = os.path.join(tmp_path, "store")
    shutil.copytree(template["path"], path)
    expected = template["expected"]
    files = _data_files(path, "packs" if target in ("packs", "truncate", "tear") else "manifests")
    originals = {}
    for name, _ in files:
        with open(name, "rb") as f:
            originals[name] = f.read()
    rng = random.Random(seed)
    counts: collections.Counter = collections.Counter()
    failures = []
    with deltackpt.open(path) as store:
        outcome, facts = _probe(path, expected, store)
        assert outcome == "harmless" and facts["verify"].ok, (outcome, facts)
        for trial in range(trials):
            name, offset = _pick(files, rng)
            if target in ("packs", "manifests"):
                what = f"bit {offset}:{trial % 8}"
                _flip_bit(name, offset, trial % 8)
            elif target == "truncate":
                what = f"truncate at {offset}"
                os.truncate(name, offset)
            else:  # a torn write: a sector-aligned run of the file reads back as zeros
                start = offset - offset % 512
                n = min(rng.choice((512, 1024, 4096)), len(originals[name]) - start)
                what = f"tear {start}+{n}"
                with open(name, "r+b") as f:
                    f.seek(start)
                    old = f.read(n)
                    if old == bytes(n):  # already zeros: tearing it changes nothing
                        counts["skipped"] += 1
                        continue
                    f.seek(start)
                    f.write(bytes(n))
            outcome, facts = _probe(path, expected, store)
            counts[outcome] += 1
            r = facts["verify"]
            bad = outcome in ("wrong-bytes", "crash", "hang", "harmless", "rolled-back")
            if outcome == "harmless" and target == "packs" and _inside_zstd_payload(
                    originals[name], offset):
                # the decoder ignored the bit: every step restored exactly (counted, reported)
                bad = False
            if target != "manifests" and r is not None and not bad:
                # verify names exactly the steps whose load fails (damaged blocks), plus a
                # pack-level problem for damage no block read shows (magic, size)
                bad = set(r.damaged_steps) != {s for s in facts["raised"] if s != "log"}
            if target == "manifests" and r is not None and not bad:
                bad = bool(facts["raised"]) or len(r.damaged_steps) != 1
            if bad:
                failures.append((os.path.relpath(name, path), what, outcome, facts))
            with open(name, "r+b") as f:  # repair in place: same inode, open fds see it
                f.write(originals[name])
    assert not failures, failures[:5]
    return counts


def _run_index_campaign(template, tmp_path, target: str, trials: int, seed: int,
                        reindex_every: int = 1) -> collections.Counter:
    path = os.path.join(tmp_path, "store")
    shutil.copytree(template["path"], path)
    expected = template["expected"]
    if target == "sqlite":
        files = {"index.sqlite": template["db"]}
        victim = "index.sqlite"
    else:
        files = {"index.sqlite": template["wal_db"], "index.sqlite-wal": template["wal"]}
        victim = "index.sqlite-wal"
    _restore(path, files)
    assert _probe(path, expected)[0] == "harmless"
    rng = random.Random(seed)
    size = len(files[victim])
    counts: collections.Counter = collections.Counter()
    failures = []
    for trial in range(trials):
        _restore(path, files)
        offset, bit = rng.randrange(size), rng.randrange(8)
        _flip_bit(os.path.join(path, victim), offset, bit)
        outcome, facts = _probe(path, expected)
        counts[outcome] += 1
        if outcome in ("wrong-bytes", "crash", "hang"):
            failures.append((victim, offset, bit, outcome, facts))
            continue
        for exc in facts.get("errors", []) + ([facts["open"]] if "open" in facts else []):
            # an error blamed on the index names it and says how to rebuild it
            msg = str(exc)
            if "index" in msg and "reindex" not in msg and "block" not in msg:
                failures.append((victim, offset, bit, "unhelpful error", msg))
        if outcome != "harmless" and trial % reindex_every == 0:
            res = reindex(path)
            counts["reindexed"] += 1
            again, facts2 = _probe(path, expected)
            if again != "harmless" or sorted(res.steps_recovered) != list(STEPS):
                failures.append((victim, offset, bit, "reindex did not recover", again, facts2))
            else:
                counts["recovered by reindex"] += 1
    assert not failures, failures[:5]
    return counts


def _report(target: str, trials: int, counts: collections.Counter) -> None:
    print(f"\n{target}: {trials} trials: " + ", ".join(
        f"{k}={counts[k]}" for k in (*OUTCOMES, "skipped", "reindexed", "recovered by reindex")
        if counts[k]))


def _check(target: str, counts: collections.Counter) -> None:
    assert counts["wrong-bytes"] == counts["crash"] == counts["hang"] == 0, counts
    if target in ("manifests", "truncate", "tear"):
        assert counts["harmless"] == 0, counts
    if target in ("packs", "manifests", "truncate", "tear"):
        assert counts["rolled-back"] == 0, counts
    if target == "sqlite":
        assert counts["rolled-back"] == 0, counts


DEFAULT = {"packs": 120, "manifests": 16, "truncate": 16, "tear": 16, "sqlite": 48, "wal": 16}
STRESS = {"packs": 1000, "manifests": 1000, "truncate": 1000, "tear": 1000, "sqlite": 1000,
          "wal": 1000}


def _campaign(template, tmp_path, target, trials, seed, reindex_every=1):
    if target in ("sqlite", "wal"):
        counts = _run_index_campaign(template, tmp_path, target, trials, seed, reindex_every)
    else:
        counts = _run_data_campaign(template, tmp_path, target, trials, seed)
    _report(target, trials, counts)
    _check(target, counts)
    return counts


@pytest.mark.parametrize("target", list(DEFAULT))
def test_random_damage_is_detected_never_wrong(template, tmp_path, target):
    counts = _campaign(template, tmp_path, target, DEFAULT[target], seed=1)
    if target in ("manifests", "truncate", "tear"):
        assert counts["detected"] + counts["skipped"] == DEFAULT[target]


@pytest.mark.stress
@pytest.mark.parametrize("target", list(STRESS))
def test_random_damage_campaign_stress(template, tmp_path, target):
    _campaign(template, tmp_path, target, STRESS[target], seed=2, reindex_every=1)


def test_sqlite_corruption_is_a_deltackpt_error_naming_the_index(template, tmp_path):
    path = os.path.join(tmp_path, "store")
    shutil.copytree(template["path"], path)
    index = os.path.join(path, "index.sqlite")
    with open(index, "r+b") as f:  # the header: "SQLite format 3\0" and the page size
        f.write(b"\xff" * 24)
    with pytest.raises(CorruptionError) as ei:
        deltackpt.open(path)
    assert index in str(ei.value) and f"deltackpt reindex {path}" in str(ei.value)
    res = reindex(path)
    assert res.steps_recovered == list(STEPS) and res.old_index
    with deltackpt.open(path) as s:
        for step in STEPS:
            assert_state_equal(s.load(step), template["expected"][step])
        assert s.verify().ok


def test_a_renamed_key_in_the_index_tree_is_refused_by_load_and_verify(template, tmp_path):
    """SQLite keeps no checksums: a flipped bit in a row is another valid value. The
    manifest (CRC32) vouches for the rows, so a load never returns the renamed key."""
    import sqlite3

    path = os.path.join(tmp_path, "store")
    shutil.copytree(template["path"], path)
    con = sqlite3.connect(os.path.join(path, "index.sqlite"))
    con.execute("UPDATE steps SET tree = replace(tree, '\"frozen\"', '\"frozeN\"') WHERE step=2")
    con.execute("UPDATE entries SET shape='[2049]' WHERE step=3 AND path='model/frozen'")
    con.commit()
    con.close()
    with deltackpt.open(path) as s:
        for step in (2, 3):
            with pytest.raises(CorruptionError, match=f"step {step}: the index disagrees.*reindex"):
                s.load(step)
        r = s.verify()
        assert r.damaged_steps == [2, 3]
        assert all("reindex" in p for p in r.problems)
        for step in (1, 4):
            assert_state_equal(s.load(step), template["expected"][step])
    reindex(path)
    with deltackpt.open(path) as s:
        for step in STEPS:
            assert_state_equal(s.load(step), template["expected"][step])


@pytest.mark.parametrize("pack_index", ["damaged", "intact"])
def test_reindex_rebuilds_a_lost_index_and_recovers_every_intact_step(template, tmp_path,
                                                                      pack_index):
    """A damaged frame header: walking the frames (no usable pack index) loses the steps
    that need it; through an intact pack index reindex places the block anyway, and the
    damage shows where all payload damage shows, in load and verify, never as wrong bytes."""
    path = os.path.join(tmp_path, "store")
    shutil.copytree(template["path"], path)
    os.remove(os.path.join(path, "index.sqlite"))
    with pytest.raises(DeltackptError, match="reindex"):
        deltackpt.open(path)
    # and one pack is damaged: the steps that need it are reported lost, the rest recovered
    with deltackpt.open(template["path"]) as s:
        from helpers import block_rows, entry_block_ids
        only4 = set(entry_block_ids(s, 4)["model/w"]) - {
            b for st in (1, 2, 3) for ids in entry_block_ids(s, st).values() for b in ids}
        row = next(r for r in block_rows(s) if r["id"] in only4)
    with open(os.path.join(path, *row["pack"].split("/")), "r+b") as f:
        f.seek(row["offset"])
        f.write(b"XXXX")  # the frame magic: a scan cannot read this frame
        if pack_index == "damaged":
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([last[0] ^ 0xFF]))  # the footer's CRC
    res = reindex(path)
    with deltackpt.open(path) as s:
        if pack_index == "damaged":
            assert 4 in res.steps_lost and res.steps_recovered == [1, 2, 3]
            assert s.steps() == [1, 2, 3]
        else:
            assert res.steps_recovered == [1, 2, 3, 4] and not res.steps_lost
            with pytest.raises(CorruptionError, match="bad frame magic"):
                s.load(4)
            assert s.verify(4).damaged_steps == [4]
        for step in (1, 2, 3):
            assert_state_equal(s.load(step), template["expected"][step])
        r = s.verify()  # damaged: the pack held only step 4's blocks, it is no longer used
        assert r.damaged_steps == ([] if pack_index == "damaged" else [4]), r.problems
