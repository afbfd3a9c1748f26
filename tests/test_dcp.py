"""deltackpt.dcp: torch.distributed.checkpoint storage plugins.

Single-process cases run DCP with ``no_dist=True``; the multi-rank cases spawn gloo
process groups on the CPU with an FSDP2 (``fully_shard``) model, save on 4 ranks
and on 2, and load every saved step bit-exact on 4, 2 and 1 ranks.
"""

from __future__ import annotations

import io
import os
import socket
import threading
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from click.testing import CliRunner
from helpers import assert_state_equal, block_rows, det_floats, det_tensor, entry_block_ids
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException

import deltackpt
from deltackpt import summaries
from deltackpt.cli import main as cli_main
from deltackpt.dcp import META_KEY, StorageReader, StorageWriter, chunk_key, load_full
from deltackpt.errors import CorruptionError, InvalidStoreError, StepExistsError
from deltackpt.store import PathNotFoundError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _cause(exc: CheckpointException) -> BaseException:
    """The rank's own exception inside DCP's CheckpointException."""
    failure = next(iter(exc.failures.values()))  # WRAPPED_EXCEPTION: (exc, traceback)
    return failure if isinstance(failure, BaseException) else failure[0]


def _state(seed: int) -> dict:
    return {
        "model": {
            "w": det_floats((300, 257), seed),               # 17 blocks of 4 KiB at block 4096
            "b": det_tensor(torch.bfloat16, (257,), seed),
            "ids": det_tensor(torch.int64, (5, 3), seed),
            "mask": det_tensor(torch.bool, (7,), seed),
            "empty": torch.empty(0, 4),
            "scalar": torch.tensor(3.5, dtype=torch.float64),
        },
        "extra": {"lr": 0.25, "name": "run-1", "betas": (0.9, 0.999)},
    }


def _save(path, state, step, **kw):
    w = StorageWriter(path, step=step, threads=1, block_size=4096, **kw)
    with w:
        dcp.save(state, storage_writer=w, no_dist=True)
    return w.last_result


# -- single process -------------------------------------------------------------------
def test_roundtrip_bit_exact_and_incremental(store_path):
    state = _state(1)
    r1 = _save(store_path, state, 10, metrics={"loss": 1.5}, tags=["dcp"])
    assert r1.new_chunks == r1.total_chunks
    state["model"]["w"][1:3] += 1.0        # bytes 1028..3084: one 4 KiB block
    r2 = _save(store_path, state, 20)
    assert r2.new_chunks == 1 and r2.total_chunks == r1.total_chunks

    target = _state(99)
    dcp.load(target, storage_reader=StorageReader(store_path, step=20), no_dist=True)
    assert_state_equal(target, state)       # bytes, dtype, shape; non-tensors via DCP
    with deltackpt.open(store_path) as s:
        assert s.steps() == [10, 20]
        assert s.info(10).metrics == {"loss": 1.5} and s.info(10).tags == ["dcp"]
        assert s.info(20).parent == 10
        ids10, ids20 = entry_block_ids(s, 10), entry_block_ids(s, 20)
        changed = [i for i, (a, b) in enumerate(zip(ids10["model.w"], ids20["model.w"]))
                   if a != b]
        assert len(changed) == 1
        new = [r for r in block_rows(s) if r["first_step"] == 20]
        assert len(new) == 1 and new[0]["base"] == ids10["model.w"][changed[0]]  # a delta
        assert not s.verify().problems
        # a DCP commit counts as a save for the staggered-keyframe clock
        assert summaries.delta_generation(s._index) == 2


def test_ranks_encode_with_the_coordinators_keyframe_clock(store_path, monkeypatch):
    """The coordinator hands its generation to every rank (staggered keyframe slots), the
    commit records it in the manifest and moves the clock on."""
    from deltackpt.delta import DeltaConfig
    from deltackpt.packs import decode_manifest

    state = _state(1)
    _save(store_path, state, 10)
    state["model"]["w"] += 1.0
    _save(store_path, state, 20)
    real_plan = StorageWriter.prepare_global_plan

    def plan_then_move_the_clock(self, plans):
        # as if a rank read another index (its own cache of an object store): ranks must
        # still use what the coordinator planned with
        out = real_plan(self, plans)
        with self._writer_store(create=False)._index.write() as conn:
            conn.execute("UPDATE meta SET value = '50' WHERE key = ?",
                         (summaries.GENERATION_KEY,))
        return out

    monkeypatch.setattr(StorageWriter, "prepare_global_plan", plan_then_move_the_clock)
    seen = []
    real = DeltaConfig.keyframe_slot
    monkeypatch.setattr(DeltaConfig, "keyframe_slot",
                        lambda self, g, path, k: (seen.append(g), real(self, g, path, k))[1])
    state["model"]["w"] += 1.0
    _save(store_path, state, 30)
    assert seen and set(seen) == {2}
    with deltackpt.open(store_path) as s:
        manifest = s._index.query("SELECT manifest FROM steps WHERE step=30")[0][0]
        assert decode_manifest(s.backend.read(manifest))["generation"] == 2
        assert summaries.step_generations(s._index) == {10: 0, 20: 1, 30: 2}
        assert summaries.delta_generation(s._index) == 50  # never moved back


def test_the_commit_checks_frame_headers_through_the_pack_indexes(store_path, monkeypatch):
    """The coordinator checks every new frame's header against what its rank reported,
    reading each pack's index (one read per pack), not each frame (one ranged GET each on
    object storage); a pack without an index is still checked frame by frame."""
    from deltackpt.backend import LocalBackend
    from deltackpt.store import Store

    reads = []
    real_read, real_commit = LocalBackend.read, Store.commit_external
    counting = [False]

    def read(self, name, offset=0, length=None):
        if counting[0]:
            reads.append((name, offset))
        return real_read(self, name, offset, length)

    def commit(self, *a, **k):
        counting[0] = True
        try:
            return real_commit(self, *a, **k)
        finally:
            counting[0] = False

    monkeypatch.setattr(LocalBackend, "read", read)
    monkeypatch.setattr(Store, "commit_external", commit)
    r = _save(store_path, _state(1), 10)
    packs = {name for name, _ in reads if name.startswith("packs/")}
    assert r.new_chunks > 10 and len(packs) >= 1
    assert len([1 for name, _ in reads if name.startswith("packs/")]) <= 2 * len(packs)
    # without pack indexes (an older writer): frame by frame, and the commit still succeeds
    from deltackpt import store as store_mod

    reads.clear()
    monkeypatch.setattr(store_mod, "read_pack_index", lambda *a, **k: None)
    state = _state(2)
    r = _save(store_path, state, 20)
    assert len([1 for name, _ in reads if name.startswith("packs/")]) >= r.new_chunks
    target = _state(99)
    dcp.load(target, storage_reader=StorageReader(store_path, step=20), no_dist=True)
    assert_state_equal(target, state)


def test_load_full_and_plain_store_load(store_path):
    state = _state(2)
    _save(store_path, state, 1)
    full = load_full(store_path)
    flat = dcp_flat(state)
    assert list(full) == list(flat)
    for k, v in flat.items():
        if isinstance(v, torch.Tensor):
            assert_state_equal(full[k], v)
        else:  # the torch.save bytes DCP made; never unpickled by deltackpt
            assert isinstance(full[k], bytes)
            assert torch.load(io.BytesIO(full[k]), weights_only=True) == v
    with deltackpt.open(store_path) as s:
        plain = s.load(1)
    assert set(plain) == {META_KEY, *flat}   # whole-tensor chunks keep their names
    assert_state_equal(plain["model.w"], state["model"]["w"])


def dcp_flat(state: dict) -> dict:
    """DCP's flattened view: 'a.b' keys, tuples kept as values."""
    out = {}
    for top, sub in state.items():
        for k, v in sub.items():
            out[f"{top}.{k}"] = v
    return out


def test_restore_cli_and_reindex(store_path, tmp_path):
    state = _state(3)
    _save(store_path, state, 5)
    out = tmp_path / "out.safetensors"
    r = CliRunner().invoke(cli_main, ["restore", store_path, "5", "-o", str(out)],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    got = load_file(str(out))
    assert_state_equal(got["model.w"], state["model"]["w"])
    assert META_KEY not in got and not any("#chunk" in k for k in got)
    with deltackpt.open(store_path) as s:
        with pytest.raises(PathNotFoundError, match="has no path 'optimizer'"):
            s.export(str(tmp_path / "x.safetensors"), 5, select="optimizer")
        exported = s.export(str(tmp_path / "m.pt"), select="model")   # latest, .pt
        s.export(str(tmp_path / "w.pt"), 5, select="model.w")           # one tensor: bare
        with pytest.raises(PathNotFoundError, match="names values as DCP does"):
            s.export(str(tmp_path / "x.pt"), 5, select="model/w")
    assert_state_equal(torch.load(tmp_path / "w.pt", weights_only=True), state["model"]["w"])
    assert exported.step == 5
    pt = torch.load(tmp_path / "m.pt", weights_only=True)
    assert list(pt) == ["w", "b", "ids", "mask", "empty", "scalar"]
    assert_state_equal(pt, state["model"])
    before = load_full(store_path, 5)
    os.remove(os.path.join(store_path, "index.sqlite"))
    for suffix in ("-wal", "-shm"):
        if os.path.exists(os.path.join(store_path, "index.sqlite" + suffix)):
            os.remove(os.path.join(store_path, "index.sqlite" + suffix))
    from deltackpt.reindex import reindex

    reindex(store_path)  # the manifest a DCP commit writes rebuilds the index
    assert_state_equal(load_full(store_path, 5), before)


def test_a_plain_state_with_a_dcp_key_exports_and_restores_as_before(store_path, tmp_path):
    """Only DCP's metadata under ``__dcp__`` makes a DCP step; a user's own value there
    (or a non-dict) leaves export and restore as for any step."""
    state = {"model": {"w": det_floats((3, 5), 1)}, "__dcp__": {"note": "mine", "layout": 3}}
    with deltackpt.open(store_path) as s:
        s.save(state, step=1)
        s.save({"model": {"w": det_floats((3, 5), 2)}, "__dcp__": det_floats((4,), 3)}, step=2)
        for step in (1, 2):
            r = s.export(str(tmp_path / f"{step}.safetensors"), step)
            assert r.step == step and r.tensors == 1
            assert list(load_file(str(tmp_path / f"{step}.safetensors"))) == ["w"]
    out = tmp_path / "r.pt"
    r = CliRunner().invoke(cli_main, ["restore", store_path, "1", "-o", str(out), "-q"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert_state_equal(torch.load(out, weights_only=True), state)


def test_existing_step_and_non_dcp_step_refused(store_path):
    _save(store_path, _state(4), 1)
    with pytest.raises(CheckpointException) as ei:
        _save(store_path, _state(5), 1)
    assert isinstance(_cause(ei.value), StepExistsError)
    with deltackpt.open(store_path) as s:
        s.save({"w": torch.ones(3)}, step=2)
    with pytest.raises(InvalidStoreError, match="not saved through deltackpt.dcp"):
        load_full(store_path, 2)


class _LyingWriter(StorageWriter):
    """Reports a frame at the wrong offset: the coordinator must refuse the step."""

    def write_data(self, plan, planner):
        results = super().write_data(plan, planner).value()
        for wr in results:
            for bid, loc in list(wr.storage_data["blocks"].items()):
                wr.storage_data["blocks"][bid] = (loc[0], loc[1] + 1, *loc[2:])
        fut = torch.futures.Future()
        fut.set_result(results)
        return fut


class _FailingWriter(StorageWriter):
    """Writes its packs, then fails like a rank dying before it reports."""

    def write_data(self, plan, planner):
        super().write_data(plan, planner)
        raise RuntimeError("rank died")


def test_bad_reports_and_failed_ranks_commit_nothing(store_path):
    _save(store_path, _state(6), 1)
    for cls, want in ((_LyingWriter, CorruptionError), (_FailingWriter, RuntimeError)):
        w = cls(store_path, step=2, threads=1)
        with w, pytest.raises(CheckpointException) as ei:
            dcp.save(_state(7), storage_writer=w, no_dist=True)
        assert isinstance(_cause(ei.value), want), _cause(ei.value)
    with deltackpt.open(store_path) as s:
        assert s.steps() == [1]
        assert s.gc().objects_deleted >= 2    # the packs both failed saves left
        assert not s.verify().problems
    _save(store_path, _state(7), 2)           # the step number is still free
    assert_state_equal(load_full(store_path, 2)["model.b"], _state(7)["model"]["b"])


class _StaleWriter(StorageWriter):
    """Writes and reports every block of its chunks as new, stored ones included: what a
    rank whose index cache lags behind the coordinator's does."""

    def write_data(self, plan, planner):
        store = self._writer_store(create=False)
        store._known_blocks = lambda ids: set()
        try:
            return super().write_data(plan, planner)
        finally:
            del store._known_blocks


def test_blocks_a_stale_rank_reports_as_new_are_kept_once(store_path):
    state = _state(11)
    r1 = _save(store_path, state, 1)
    state["model"]["w"][1:3] += 1.0
    w = _StaleWriter(store_path, step=2, threads=1, block_size=4096)
    with w:
        dcp.save(state, storage_writer=w, no_dist=True)
    assert w.last_result.new_chunks == 1 and w.last_result.total_chunks == r1.total_chunks
    target = _state(99)
    dcp.load(target, storage_reader=StorageReader(store_path, step=2), no_dist=True)
    assert_state_equal(target, state)
    with deltackpt.open(store_path) as s:
        assert not s.verify().problems
        assert sum(r["first_step"] == 2 for r in block_rows(s)) == 1
        assert s.gc().bytes_freed > 0  # the duplicate frames' pack, rewritten or dropped
        assert_state_equal(s.load(2)["model.w"], state["model"]["w"])


def test_metadata_is_json_not_pickle(store_path):
    _save(store_path, _state(8), 3)
    with deltackpt.open(store_path) as s:
        tree_json = s._index.query("SELECT tree FROM steps WHERE step=3")[0][0]
    assert "planner_data" in tree_json and "model.w" in tree_json
    meta = StorageReader(store_path, step=3).read_metadata()
    md = meta.state_dict_metadata["model.w"]
    assert md.size == torch.Size([300, 257]) and md.properties.dtype == torch.float32
    assert meta.planner_data["model.w"] == ("model", "w")
    assert meta.storage_data[next(iter(meta.storage_data))] == "model.w"


def _step20_writes_after_step30_resets(store_path, *also: threading.Event) -> StorageWriter:
    """A writer whose save of step 20 writes only once a save of step 30 has reset (and each
    of ``also`` is set): two overlapping saves, interleaved the same way every time."""
    second_reset = threading.Event()

    class Overlapping(StorageWriter):
        def reset(self, checkpoint_id=None):
            super().reset(checkpoint_id)
            if checkpoint_id is not None and int(str(checkpoint_id)) == 30:
                second_reset.set()

        def write_data(self, plan, planner):
            if plan.storage_data["step"] == 20:
                assert second_reset.wait(30) and all(e.wait(30) for e in also)
            return super().write_data(plan, planner)

    return Overlapping(store_path, threads=1, block_size=4096)


def test_overlapping_async_saves_through_one_writer_keep_their_own_steps(store_path):
    """Found in review: DCP runs each async_save on a thread of its own, and the writer kept
    one step for all of them: a second save's reset() relabelled the first one (a step
    holding another step's tensors). The first save's write now waits until the second
    has reset, which used to break it every time."""
    states = {s: {"w": torch.full((300, 257), float(s))} for s in (10, 20, 30)}
    w = _step20_writes_after_step30_resets(store_path)
    try:
        dcp.save(states[10], storage_writer=w, checkpoint_id=10, no_dist=True)
        f20 = dcp.async_save(states[20], storage_writer=w, checkpoint_id=20, no_dist=True)
        f30 = dcp.async_save(states[30], storage_writer=w, checkpoint_id=30, no_dist=True)
        f20.result(timeout=60)
        f30.result(timeout=60)
    finally:
        w.close()
    with deltackpt.open(store_path) as s:
        assert s.steps() == [10, 20, 30]
        for step in (20, 30):
            assert torch.equal(load_full(s, step)["w"], states[step]["w"])


def test_a_writer_per_save_never_closed_and_metrics_for_one_step(store_path):
    """The README's dcp.save(..., storage_writer=StorageWriter(path, step=N)) per save: rank
    0's writer lock is given back at each commit (the next writer, or any other writer,
    may take it), and metrics/tags/note describe the one step they came with."""
    w = StorageWriter(store_path, step=1, threads=1, metrics={"loss": 1.5}, tags=["a"],
                      note="first")
    dcp.save(_state(1), storage_writer=w, no_dist=True)
    dcp.save(_state(2), storage_writer=StorageWriter(store_path, step=2, threads=1),
             no_dist=True)
    with deltackpt.open(store_path) as other:  # the lock is free between saves
        other.save({"plain": torch.ones(3)}, 3)
    dcp.save(_state(4), storage_writer=w, checkpoint_id=4, no_dist=True)  # reused, unclosed
    w.close()
    with deltackpt.open(store_path) as s:
        assert s.steps() == [1, 2, 3, 4]
        i1, i4 = s.info(1), s.info(4)
        assert (i1.metrics, i1.tags, i1.note) == ({"loss": 1.5}, ["a"], "first")
        assert (i4.metrics, i4.tags, i4.note) == ({}, [], None)


def test_a_pickled_writer_opens_its_own_store_and_gives_the_lock_back(store_path):
    """DCP's process-based async_save pickles the writer into a daemon on every save."""
    import pickle

    w = StorageWriter(store_path, threads=1)
    dcp.save(_state(1), storage_writer=w, checkpoint_id=1, no_dist=True)
    copy = pickle.loads(pickle.dumps(w))
    dcp.save(_state(2), storage_writer=copy, checkpoint_id=2, no_dist=True)
    dcp.save(_state(3), storage_writer=w, checkpoint_id=3, no_dist=True)
    w.close()
    copy.close()
    with deltackpt.open(store_path) as s:
        assert s.steps() == [1, 2, 3]


def test_a_reused_reader_without_a_step_loads_the_latest_each_time(store_path):
    _save(store_path, _state(1), 1)
    reader = StorageReader(store_path)
    target = {"model": {"w": torch.zeros(300, 257)}}
    dcp.load(target, storage_reader=reader, no_dist=True)
    assert torch.equal(target["model"]["w"], _state(1)["model"]["w"])
    reader.close()  # lets the next save take the store
    _save(store_path, _state(2), 2)
    dcp.load(target, storage_reader=reader, no_dist=True)
    assert torch.equal(target["model"]["w"], _state(2)["model"]["w"]) and reader.step == 2
    reader.close()


def test_float4_round_trips_like_file_system_writer(store_path):
    packed = det_tensor(torch.uint8, (64,), 1).view(torch.float4_e2m1fn_x2)
    _save(store_path, {"q": packed}, 1)
    target = {"q": torch.empty_like(packed)}
    dcp.load(target, storage_reader=StorageReader(store_path, step=1), no_dist=True)
    assert torch.equal(target["q"].view(torch.uint8), packed.view(torch.uint8))


def test_chunk_key():
    assert chunk_key("a.w", [0, 0], [4, 2], [4, 2]) == "a.w"
    assert chunk_key("a.w", [2, 0], [2, 2], [4, 2]) == "a.w#chunk(2,0)"
    assert chunk_key("a.w", [0, 0], [2, 2], [4, 2]) == "a.w#chunk(0,0)"


# -- multi-process (gloo, FSDP2) ------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, port: int) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _model(world: int, seed: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Embedding(64, 32), torch.nn.Linear(32, 257),
                            torch.nn.GELU(), torch.nn.Linear(257, 31))
    m[0].weight.requires_grad_(False)     # frozen: its shards must never be rewritten
    if world > 1:
        mesh = init_device_mesh("cpu", (world,))
        for layer in (m[0], m[1], m[3]):
            fully_shard(layer, mesh=mesh)
        fully_shard(m, mesh=mesh)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    return m, opt


def _train(m, opt, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, 64, (16,), generator=g)
    m(x).square().mean().backward()
    opt.step()
    opt.zero_grad()


def _full(state, prefix: str = "") -> dict:
    """Every tensor of a (possibly sharded) state dict as a full CPU tensor, by path."""
    from torch.distributed.tensor import DTensor

    out = {}
    for k, v in state.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_full(v, path + "/"))
        elif isinstance(v, DTensor):
            out[path] = v.full_tensor().detach().clone()
        elif isinstance(v, torch.Tensor):
            out[path] = v.detach().clone()
    return out


def _others(state) -> dict:
    return {"groups": state["optim"]["param_groups"], "meta": state["meta"]}


def _check_loaded(store: str, step: int, world: int, expected_file: str, others,
                  opts: dict | None = None) -> None:
    """Load ``step`` into a fresh model sharded over ``world`` ranks; compare bit-exact."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    m, opt = _model(world, seed=1234)
    msd, osd = get_state_dict(m, opt)
    state = {"model": msd, "optim": osd, "meta": {"step": -1}}
    with StorageReader(store, step=step, threads=1, **(opts or {})) as reader:
        dcp.load(state, storage_reader=reader, no_dist=world == 1)
    set_state_dict(m, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    msd, osd = get_state_dict(m, opt)
    got = _full({"model": msd, "optim": osd})
    if dist.get_rank() == 0 or world == 1:
        want = load_file(expected_file)
        assert sorted(got) == sorted(want)
        for k in want:
            assert_state_equal(got[k], want[k], k)
        assert state["meta"] == {"step": step}
        assert_state_equal(state["optim"]["param_groups"], others["groups"])


def _save_run(rank: int, world: int, store: str, out: str, steps: list[int],
              opts: dict | None = None) -> dict:
    """Train, saving every other step (one of them with dcp.async_save); ``opts`` go to
    deltackpt.open (an object-storage store's options)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    m, opt = _model(world, seed=0)
    writer = StorageWriter(store, threads=1, block_size=4096, **(opts or {}))
    others = {}
    for step in range(1, max(steps) + 1):
        _train(m, opt, step)
        if step not in steps:
            continue
        msd, osd = get_state_dict(m, opt)
        state = {"model": msd, "optim": osd, "meta": {"step": step}}
        if step == steps[1]:
            dcp.async_save(state, storage_writer=writer, checkpoint_id=step).result()
        else:
            dcp.save(state, storage_writer=writer, checkpoint_id=step)
        full = _full({"model": msd, "optim": osd})
        if opts and rank > 0 and step > steps[0]:
            # object storage: this rank caught up with the parent's manifest and its own
            # packs only, not every rank's (test_dcp_catchup.py has the details)
            assert writer._store.last_refresh == "scoped"
        if rank == 0:
            save_file(full, os.path.join(out, f"{world}-{step}.safetensors"))
            others[step] = _others(state)
            assert writer.last_result.step == step
    writer.close()
    if rank == 0:
        _check_store(store, world, steps, opts)
    dist.barrier()
    return others


def _check_store(store: str, world: int, steps: list[int], opts: dict | None = None) -> None:
    with deltackpt.open(store, **(opts or {})) as s:
        assert s.steps() == steps
        first, last = steps[0], steps[-1]
        ids_first, ids_last = entry_block_ids(s, first), entry_block_ids(s, last)
        rows = {r["id"]: r for r in block_rows(s)}
        frozen = [p for p in ids_last if p.startswith("model.0.weight")]
        assert len(frozen) == world                       # one chunk per rank
        for p in frozen:                                  # unchanged shards: not rewritten
            assert ids_last[p] == ids_first[p]
        for p in [p for p in ids_last if p.startswith("model.1.weight")]:
            new = [rows[b] for b in ids_last[p] if rows[b]["first_step"] == last]
            assert new and any(r["base"] is not None for r in new), p  # deltas, every rank
        moments = [rows[b] for p in ids_last if ".exp_avg_sq#chunk(" in p for b in ids_last[p]
                   if rows[b]["first_step"] == last and rows[b]["base"] is not None]
        assert moments and all(r["codec"].startswith("sub>") for r in moments)  # auto: SUB
        new_packs = {r["pack"] for r in rows.values() if r["first_step"] == last}
        assert len(new_packs) == world                    # each rank wrote its own pack
        info = s.info(last)
        assert 0 < info.new_chunks < info.total_chunks
        assert not s.verify().problems


def _world4(rank: int, world: int, port: int, root: str) -> None:
    _init(rank, world, port)
    store = os.path.join(root, "s4")
    others = _save_run(rank, world, store, root, [2, 4, 6])
    for step in (4, 6):
        _check_loaded(store, step, world, os.path.join(root, f"4-{step}.safetensors"),
                      others.get(step))
    if rank == 0:   # one process, no process group: 4 -> 1
        _check_loaded(store, 6, 1, os.path.join(root, "4-6.safetensors"), others[6])
        _save_others(root, "4", others)
    dist.barrier()
    dist.destroy_process_group()


def _world2(rank: int, world: int, port: int, root: str) -> None:
    _init(rank, world, port)
    store = os.path.join(root, "s2")
    others = _save_run(rank, world, store, root, [2, 4, 6])
    _check_loaded(store, 6, world, os.path.join(root, "2-6.safetensors"), others.get(6))
    if rank == 0:                                                   # 2 -> 1
        _check_loaded(store, 6, 1, os.path.join(root, "2-6.safetensors"), others[6])
    dist.barrier()
    dist.destroy_process_group()


def _world2_s3(rank: int, world: int, port: int, root: str, url: str,
               storage_options: dict) -> None:
    """The two-rank run against an S3 server: every rank uploads its own packs, rank 0
    commits; then each rank reads its shards back with a cache of its own."""
    _init(rank, world, port)
    opts = {"storage_options": storage_options, "cache_dir": os.path.join(root, f"c{rank}")}
    others = _save_run(rank, world, url, root, [2, 4, 6], opts)
    fresh = dict(opts, cache_dir=os.path.join(root, f"fresh{rank}"))  # catch up from S3
    _check_loaded(url, 6, world, os.path.join(root, "2-6.safetensors"), others.get(6), fresh)
    dist.barrier()
    dist.destroy_process_group()


def _world2_load4(rank: int, world: int, port: int, root: str) -> None:
    _init(rank, world, port)
    others4 = _load_others(root, "4")
    _check_loaded(os.path.join(root, "s4"), 6, world, os.path.join(root, "4-6.safetensors"),
                  others4[6])                                       # 4 -> 2
    dist.barrier()
    dist.destroy_process_group()


def _save_others(root: str, tag: str, others: dict) -> None:
    # plain values only (param_groups hold floats, bools, None, str lists): deltackpt
    # stores them without pickle
    with deltackpt.open(os.path.join(root, f"others-{tag}")) as s:
        s.save({str(k): v for k, v in others.items()}, step=0)


def _load_others(root: str, tag: str) -> dict:
    with deltackpt.open(os.path.join(root, f"others-{tag}")) as s:
        return {int(k): v for k, v in s.load(0).items()}


def _spawn(fn, world: int, root: str) -> None:
    mp.spawn(fn, args=(world, _free_port(), root), nprocs=world, join=True)


def _check_reassembled(root: str, store: str, step: int, world: int) -> None:
    """The main process, no torch.distributed at all: the chunks reassemble."""
    full = load_full(os.path.join(root, store), step)
    want = load_file(os.path.join(root, f"{world}-{step}.safetensors"))
    assert_state_equal(full["model.1.weight"], want["model/1.weight"])
    assert_state_equal(full["optim.state.3.weight.exp_avg_sq"],
                       want["optim/state/3.weight/exp_avg_sq"])
    with deltackpt.open(os.path.join(root, store)) as s:
        paths = [e.path for e in s.entries(step)]
        # shipping the weights: export reassembles the shards, keys relative to "model"
        out = os.path.join(root, f"export-{store}-{step}.safetensors")
        result = s.export(out, step)
    assert sum(p.startswith("model.1.weight#chunk(") for p in paths) == world
    model = {k[len("model/"):]: v for k, v in want.items() if k.startswith("model/")}
    got = load_file(out)
    assert sorted(got) == sorted(model) and result.step == step
    for k, v in model.items():
        assert_state_equal(got[k], v)
    # restore: full tensors under DCP's names, --select by name prefix
    out = os.path.join(root, f"restore-{store}-{step}.safetensors")
    r = CliRunner().invoke(cli_main, ["restore", os.path.join(root, store), str(step), "-o", out,
                                      "--select", "optim", "-q"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    got = load_file(out)
    assert got and all(k.startswith("optim.state.") for k in got)
    assert_state_equal(got["optim.state.3.weight.exp_avg_sq"],
                       want["optim/state/3.weight/exp_avg_sq"])


def test_fsdp2_two_ranks_save_and_load_on_2_and_1(tmp_path):
    root = str(tmp_path)
    _spawn(_world2, 2, root)
    _check_reassembled(root, "s2", 6, 2)


def test_fsdp2_two_ranks_over_s3(tmp_path):
    pytest.importorskip("s3fs")
    from s3server import S3Server

    with S3Server() as s3:
        url = f"s3://{s3.prefix()}"
        mp.spawn(_world2_s3, args=(2, _free_port(), str(tmp_path), url, s3.storage_options()),
                 nprocs=2, join=True)
        opts = {"storage_options": s3.storage_options(), "cache_dir": str(tmp_path / "main")}
        with deltackpt.open(url, **opts) as s:
            assert s.steps() == [2, 4, 6]
            assert not s.verify().problems
        full = load_full(url, 6, **opts)  # no process group: the two ranks' chunks reassemble
    want = load_file(os.path.join(tmp_path, "2-6.safetensors"))
    assert_state_equal(full["model.1.weight"], want["model/1.weight"])
    assert_state_equal(full["optim.state.3.weight.exp_avg_sq"],
                       want["optim/state/3.weight/exp_avg_sq"])


@pytest.mark.stress  # ~20 s on an idle 2-core machine: six more processes importing torch
def test_fsdp2_four_ranks_save_and_load_on_4_2_1(tmp_path):
    root = str(tmp_path)
    _spawn(_world4, 4, root)
    _spawn(_world2_load4, 2, root)
    _check_reassembled(root, "s4", 6, 4)


def test_rank_local_metadata_mode_and_missing_step_refused(store_path):
    from deltackpt.errors import DeltackptError, StepNotFoundError

    with pytest.raises(DeltackptError, match="use_collectives"):
        dcp.save(_state(9), storage_writer=StorageWriter(store_path, step=1),
                 no_dist=True, use_collectives=False)
    _save(store_path, _state(9), 1)
    with pytest.raises(StepNotFoundError):
        load_full(store_path, 2)


def test_the_writer_lock_stays_while_another_save_through_the_writer_is_in_flight(store_path):
    """Found in review: the first of two overlapping saves gave the lock back at its commit
    while the other save's packs were written but not committed; another writer's gc then
    deleted them."""
    from deltackpt.errors import StoreLockedError

    proceed = threading.Event()
    w = _step20_writes_after_step30_resets(store_path, proceed)
    dcp.save({"w": torch.zeros(300, 257)}, storage_writer=w, checkpoint_id=10, no_dist=True)
    f20 = dcp.async_save({"w": torch.ones(300, 257)}, storage_writer=w, checkpoint_id=20,
                         no_dist=True)
    f30 = dcp.async_save({"w": torch.full((300, 257), 3.0)}, storage_writer=w,
                         checkpoint_id=30, no_dist=True)
    f30.result(timeout=60)  # committed while step 20 is still being written
    with pytest.raises(StoreLockedError), deltackpt.open(store_path) as other:
        other.gc()
    proceed.set()
    f20.result(timeout=60)
    with deltackpt.open(store_path) as other:  # both committed: the lock is free again
        assert other.steps() == [10, 20, 30] and other.verify().ok


def test_a_refused_save_does_not_keep_the_lock_and_a_writer_follows_its_step(store_path):
    _save(store_path, _state(1), 1)
    with pytest.raises(CheckpointException) as err:  # a writer per save, never closed
        dcp.save(_state(1), storage_writer=StorageWriter(store_path, step=1, threads=1),
                 no_dist=True)
    assert isinstance(_cause(err.value), StepExistsError)
    w = StorageWriter(store_path, step=2, threads=1)
    dcp.save(_state(2), storage_writer=w, no_dist=True)  # no checkpoint_id: no reset()
    w.step = 3                                           # the step for the next save
    dcp.save(_state(3), storage_writer=w, no_dist=True)
    w.close()
    reader = StorageReader(store_path)
    reader.step = 2
    target = {"model": {"w": torch.zeros(300, 257)}}
    dcp.load(target, storage_reader=reader, no_dist=True)
    assert torch.equal(target["model"]["w"], _state(2)["model"]["w"])
    reader.close()
    with deltackpt.open(store_path) as s:
        assert s.steps() == [1, 2, 3]


@pytest.mark.parametrize("phase", ["write_data", "finish"])
def test_a_running_save_keeps_its_step_when_the_caller_moves_writer_step_on(store_path,
                                                                           phase):
    """Review: without a checkpoint_id, a save switched to a fresh per-save state when the
    caller set writer.step for its next save mid-save: committed under the new number,
    without its parent, and the lock never came back."""
    go, reached = threading.Event(), threading.Event()

    class Paused(StorageWriter):
        pause = False

        def write_data(self, plan, planner):
            if self.pause and phase == "write_data":
                reached.set()
                assert go.wait(30)
            return super().write_data(plan, planner)

        def finish(self, metadata, results):
            if self.pause and phase == "finish":
                reached.set()
                assert go.wait(30)
            return super().finish(metadata, results)

    w = Paused(store_path, step=100, threads=1)
    dcp.save({"w": torch.zeros(64)}, storage_writer=w, no_dist=True)
    w.pause, w.step = True, 200
    f = dcp.async_save({"w": torch.ones(64)}, storage_writer=w, no_dist=True)
    assert reached.wait(30)
    w.step = 300  # the training loop moves on
    go.set()
    f.result(timeout=60)
    assert not w._in_flight and not w._store._lock.held
    w.close()
    with deltackpt.open(store_path) as s:
        assert s.steps() == [100, 200] and s.info(200).parent == 100


def test_a_save_refused_after_planning_does_not_keep_the_lock(store_path):
    w = StorageWriter(store_path, threads=1)
    with pytest.raises(CheckpointException):  # refused in prepare_global_plan, after the lock
        dcp.save({META_KEY: torch.ones(2)}, storage_writer=w, checkpoint_id=1, no_dist=True)
    dcp.save({"w": torch.ones(2)}, storage_writer=w, checkpoint_id=2, no_dist=True)
    with deltackpt.open(store_path) as other:  # the lock came back after the good save
        other.save({"x": torch.zeros(1)}, 3)
    w.close()
