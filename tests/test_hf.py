"""Hugging Face Trainer integration (deltackpt.hf): ingest, retention, materialize, resume.

A tiny BertForMaskedLM (a few thousand parameters) keeps every Trainer run under a
second or two on CPU; the real MiniLM runs only in examples/hf_trainer_minilm.py.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

pytest.importorskip("transformers", reason="the HF integration needs transformers")
pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")

import safetensors.torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from helpers import assert_state_equal  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForMaskedLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_pt_utils import safe_globals  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import deltackpt  # noqa: E402
from deltackpt.cli import main as cli_main  # noqa: E402
from deltackpt.errors import (  # noqa: E402
    BackgroundSaveError,
    CheckpointDirError,
    UnsupportedValueError,
)
from deltackpt.hf import (  # noqa: E402
    DeltaCheckpointCallback,
    ingest_checkpoint,
    materialize,
    read_checkpoint_dir,
    resume_checkpoint,
)

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

SEQ, VOCAB = 16, 64


class MaskedDataset(torch.utils.data.Dataset):
    """Deterministic masked-LM samples (the mask of item i depends only on i)."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(5, VOCAB, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        x = self.ids[i].clone()
        labels = x.clone()
        masked = torch.rand(SEQ, generator=torch.Generator().manual_seed(1000 + i)) < 0.25
        x[masked] = 4
        labels[~masked] = -100
        return {"input_ids": x, "labels": labels}


def tiny_model() -> BertForMaskedLM:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=SEQ)
    return BertForMaskedLM(cfg)


def make_trainer(out: str, callbacks=(), max_steps: int = 8, save_steps: int = 2,
                 compute_metrics=None, **kw) -> Trainer:
    args = TrainingArguments(
        out, max_steps=max_steps, save_steps=save_steps, per_device_train_batch_size=4,
        learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, seed=0, **kw)
    eval_ds = MaskedDataset(8, seed=2) if kw.get("eval_strategy") else None
    return Trainer(model=tiny_model(), args=args, train_dataset=MaskedDataset(24, seed=1),
                   eval_dataset=eval_ds, callbacks=list(callbacks),
                   compute_metrics=compute_metrics)


def losses(trainer: Trainer) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}


def checkpoint_dirs(out: str) -> list[int]:
    if not os.path.isdir(out):
        return []
    return sorted(int(d.split("-")[1]) for d in os.listdir(out) if d.startswith("checkpoint-"))


def assert_dirs_identical(a: str, b: str, opaque: tuple[str, ...] = ()) -> None:
    """Same file names, same bytes; and, read the way the Trainer reads them, equal
    (``opaque`` files are compared as bytes only: they hold pickled objects)."""
    names_a = sorted(os.listdir(a))
    assert names_a == sorted(os.listdir(b))
    for name in names_a:
        pa, pb = os.path.join(a, name), os.path.join(b, name)
        with open(pa, "rb") as fa, open(pb, "rb") as fb:
            assert fa.read() == fb.read(), name
        if name in opaque:
            continue
        if name.endswith(".safetensors"):
            assert_state_equal(safetensors.torch.load_file(pb), safetensors.torch.load_file(pa))
        elif name.endswith((".pt", ".pth")):
            with safe_globals():
                got = torch.load(pb, weights_only=True)
                want = torch.load(pa, weights_only=True)
            assert_state_equal(got, want)
        elif name.endswith(".json"):
            with open(pa) as fa, open(pb) as fb:
                assert json.load(fa) == json.load(fb)


def assert_same_training_state(a: str, b: str) -> None:
    """Weights, optimizer, scheduler and RNG files byte-identical (trainer_state.json
    records run settings such as save_steps, so it may differ between runs)."""
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            assert fa.read() == fb.read(), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: callback removes directories, saves at 4 and 8."""
    root = tmp_path_factory.mktemp("ref")
    out, store = str(root / "out"), str(root / "store")
    cb = DeltaCheckpointCallback(store)
    trainer = make_trainer(out, [cb], save_steps=4)
    trainer.train()
    cb.close()
    return {"out": out, "store": store, "losses": losses(trainer), "records": cb.records,
            "root": root}


def test_callback_ingests_and_removes_directories(reference):
    assert checkpoint_dirs(reference["out"]) == []  # every directory went into the store
    recs = reference["records"]
    assert [r.step for r in recs] == [4, 8] and all(r.removed for r in recs)
    assert all(r.dir_bytes > r.written_bytes > 0 for r in recs)
    with deltackpt.open(reference["store"]) as s:
        assert s.steps() == [4, 8]
        info = s.info(8)
        assert info.note == "checkpoint-8" and "hf-trainer" in info.tags
        assert info.metrics["loss"] == reference["losses"][8]


def test_materialized_directories_equal_the_trainers(tmp_path, reference):
    """Keep the directories (remove_checkpoints=False) and compare each stored step with them;
    save_total_limit: the store keeps exactly what the Trainer's rotation kept."""
    out, store = str(tmp_path / "out"), str(tmp_path / "store")
    cb = DeltaCheckpointCallback(store, remove_checkpoints=False)
    trainer = make_trainer(out, [cb], save_steps=2, save_total_limit=2)
    trainer.train()
    cb.close()
    kept = checkpoint_dirs(out)
    assert kept == [6, 8]
    # the callback neither perturbs training (RNG, data order) nor the Trainer's files
    assert losses(trainer) == reference["losses"]
    with deltackpt.open(store) as s:
        assert s.steps() == kept
        for step in kept:
            target = str(tmp_path / "mat" / f"checkpoint-{step}")
            materialize(s, step, target)
            assert_dirs_identical(os.path.join(out, f"checkpoint-{step}"), target)
    # the run with removal (saving every 4 steps) stored the same training state at step 8
    materialize(reference["store"], 8, str(tmp_path / "ref8"))
    assert_same_training_state(os.path.join(out, "checkpoint-8"), str(tmp_path / "ref8"))


def test_resume_from_materialized_checkpoint_matches_uninterrupted_run(tmp_path, reference):
    out = str(tmp_path / "out")
    path = resume_checkpoint(reference["store"], out, step=4)
    assert path == os.path.join(out, "checkpoint-4") and os.path.isdir(path)
    store2 = str(tmp_path / "store2")
    cb = DeltaCheckpointCallback(store2)
    trainer = make_trainer(out, [cb], save_steps=4)
    trainer.train(resume_from_checkpoint=path)
    cb.close()
    got = losses(trainer)
    want = reference["losses"]
    assert {s: got[s] for s in range(5, 9)} == {s: want[s] for s in range(5, 9)}
    # and the final training state is the same, byte for byte
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    materialize(store2, 8, a)
    materialize(reference["store"], 8, b)
    assert_same_training_state(a, b)


class ScriptedScore:
    """compute_metrics returning a fixed sequence, so the best step is known."""

    def __init__(self, scores: list[float]) -> None:
        self.scores = list(scores)

    def __call__(self, _pred) -> dict:
        return {"score": self.scores.pop(0)}


def test_load_best_model_at_end_with_save_total_limit_1(tmp_path):
    out, store = str(tmp_path / "out"), str(tmp_path / "store")
    cb = DeltaCheckpointCallback(store)
    trainer = make_trainer(
        out, [cb], save_steps=2, eval_strategy="steps", eval_steps=2, save_total_limit=1,
        load_best_model_at_end=True, metric_for_best_model="score", greater_is_better=True,
        compute_metrics=ScriptedScore([1.0, 5.0, 2.0, 3.0]))
    trainer.train()
    cb.close()
    assert trainer.state.best_global_step == 4
    assert checkpoint_dirs(out) == []  # the best directory was materialized, used, removed
    with deltackpt.open(store) as s:
        assert s.steps() == [4]  # the Trainer's end-of-training rule for save_total_limit=1
        materialize(s, 4, str(tmp_path / "best"))
    best = safetensors.torch.load_file(str(tmp_path / "best" / "model.safetensors"))
    live = trainer.model.state_dict()
    assert_state_equal({k: live[k].detach() for k in best}, best)
    final = dict(cb.records[-1].__dict__)
    assert final["step"] == 8 and final["deleted"] == [6]


def test_weights_only_refusal_ingests_nothing(tmp_path, reference):
    src = str(tmp_path / "checkpoint-4")
    materialize(reference["store"], 4, src)
    ran: list[str] = []
    evil = os.path.join(src, "extra.pt")
    torch.save({"obj": _Tripwire(ran)}, evil)
    assert ran == []
    with deltackpt.open(str(tmp_path / "s")) as s:
        with pytest.raises(UnsupportedValueError, match="extra.pt"):
            ingest_checkpoint(s, src)
        assert s.steps() == [] and ran == []
        # opt-in: its bytes are kept as they are, never unpickled
        ingest_checkpoint(s, src, unsafe_files="store")
        assert ran == []
        materialize(s, 4, str(tmp_path / "back"))
    assert_dirs_identical(src, str(tmp_path / "back"), opaque=("extra.pt",))
    state = read_checkpoint_dir(src, unsafe_files="store")
    assert state["files"]["extra.pt"]["kind"] == "bytes"
    assert state["files"]["training_args.bin"]["kind"] == "bytes"
    assert state["files"]["optimizer.pt"]["kind"] == "torch"
    assert state["files"]["model.safetensors"]["kind"] == "safetensors"


def _tripwire_fired(log: list) -> None:
    log.append("unpickled")


class _Tripwire:
    def __init__(self, log: list) -> None:
        self.log = log

    def __reduce__(self):
        return (_tripwire_fired, (self.log,))


class _WriteUnsafeFile(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", "extra.pt")
        torch.save({"obj": _Tripwire([])}, path)


def test_background_failure_surfaces_and_keeps_the_directory(tmp_path):
    out, store = str(tmp_path / "out"), str(tmp_path / "store")
    cb = DeltaCheckpointCallback(store)
    trainer = make_trainer(out, [_WriteUnsafeFile(), cb], save_steps=2, max_steps=6)
    with pytest.raises(BackgroundSaveError, match=r"checkpoint-2 \(step 2\).*extra.pt.*left in place"):
        trainer.train()
    cb.close()
    assert 2 in checkpoint_dirs(out)
    with deltackpt.open(store) as s:
        assert s.steps() == []


def test_materialize_errors_and_cli(tmp_path, reference):
    runner = CliRunner()
    target = str(tmp_path / "c8")
    r = runner.invoke(cli_main, ["materialize", reference["store"], "8", "-o", target])
    assert r.exit_code == 0, r.output
    assert_dirs_identical(target, str(_materialized(reference, tmp_path, 8)))
    r = runner.invoke(cli_main, ["materialize", reference["store"], "8", "-o", target])
    assert r.exit_code == 2 and "already exists" in r.output
    r = runner.invoke(cli_main, ["materialize", reference["store"], "8", "-o", target,
                                 "--force", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["step"] == 8
    r = runner.invoke(cli_main, ["materialize", reference["store"], "5", "-o",
                                 str(tmp_path / "x")])
    assert r.exit_code == 3 and "step 5 not found" in r.output
    with deltackpt.open(str(tmp_path / "plain")) as s:
        s.save({"w": torch.zeros(3)}, step=1)
        with pytest.raises(CheckpointDirError, match="not ingested from a checkpoint"):
            materialize(s, 1, str(tmp_path / "y"))
    assert not os.path.exists(tmp_path / "y")


@pytest.mark.parametrize("where", ["packs", ".", "..", "cache"])
def test_materialize_never_replaces_the_stores_own_files(tmp_path, where):
    """Found in review: ``materialize -o STORE/packs --force`` deleted every pack."""
    d = tmp_path / "checkpoint-2"
    d.mkdir()
    (d / "trainer_state.json").write_text("{}")
    store_dir = tmp_path / "inner" / "store"
    url = f"fsspec+memory://mat-{where}-{os.path.basename(tmp_path)}/s"
    remote = where == "cache"
    with deltackpt.open(url if remote else str(store_dir),
                        **({"cache_dir": str(store_dir)} if remote else {})) as s:
        ingest_checkpoint(s, str(d))
        before = sorted(p.relative_to(store_dir).as_posix() for p in store_dir.rglob("*")
                        if p.is_file())
        if remote:  # the API, with the store whose cache is there
            with pytest.raises(CheckpointDirError, match="overlaps the store"):
                materialize(s, 2, str(store_dir), overwrite=True)
    if not remote:
        out = str(store_dir / "packs") if where == "packs" else str(
            (store_dir / where).resolve())
        r = CliRunner().invoke(cli_main, ["materialize", str(store_dir), "2", "-o", out,
                                          "--force"])
        assert r.exit_code == 2 and "overlaps the store" in r.output, r.output
    after = sorted(p.relative_to(store_dir).as_posix() for p in store_dir.rglob("*")
                   if p.is_file())
    def data(names):  # SQLite's side files come and go with connections
        return [f for f in names if not f.startswith("index.sqlite")
                and not f.endswith(("-wal", "-shm"))]

    assert data(after) == data(before) and (remote or "packs" in "".join(before))
    r = CliRunner().invoke(cli_main, ["materialize", url if remote else str(store_dir), "2",
                                      "-o", str(tmp_path / "elsewhere")])
    assert r.exit_code == 0, r.output


def _materialized(reference, tmp_path, step: int):
    path = tmp_path / f"api{step}"
    materialize(reference["store"], step, str(path))
    return path


def test_read_checkpoint_dir_rejects_links(tmp_path):
    d = tmp_path / "checkpoint-1"
    d.mkdir()
    (d / "a.json").write_text("{}")
    os.symlink(d / "a.json", d / "b.json")
    with pytest.raises(CheckpointDirError, match="b.json"):
        read_checkpoint_dir(str(d))
    os.unlink(d / "b.json")
    state = read_checkpoint_dir(str(d))
    assert state["files"] == {"a.json": {"kind": "bytes", "data": b"{}"}}
    shutil.rmtree(d)


def test_unusual_files_round_trip_byte_identical(tmp_path):
    """bf16 safetensors with metadata, shared storages, legacy torch files, empty and nested
    files: all come back byte-identical, typed where the layout allows."""
    d = tmp_path / "checkpoint-3"
    (d / "sub").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 5, generator=g)
    safetensors.torch.save_file({"w": w.to(torch.bfloat16), "i": torch.arange(7),
                                 "flag": torch.tensor([True, False])},
                                str(d / "model.safetensors"), metadata={"format": "pt"})
    base = torch.randn(10, generator=g)
    torch.save({"a": base, "view": base[2:5], "h": w.half(), "n": 3}, str(d / "shared.pt"))
    torch.save({"x": w}, str(d / "legacy.bin"), _use_new_zipfile_serialization=False)
    (d / "empty.txt").write_bytes(b"")
    (d / "sub" / "notes.txt").write_text("nested\n")
    state = read_checkpoint_dir(str(d))
    files = state["files"]
    assert files["model.safetensors"]["tensors"]["w"].dtype == torch.bfloat16
    shared = files["shared.pt"]
    assert shared["kind"] == "torch" and list(shared["tensors"]) == ["a", "h"]  # one storage each
    assert files["legacy.bin"]["kind"] == "bytes"  # checked with weights_only, kept whole
    with deltackpt.open(str(tmp_path / "s")) as s:
        ingest_checkpoint(s, str(d))
        materialize(s, 3, str(tmp_path / "back"))
    for rel in ("model.safetensors", "shared.pt", "legacy.bin", "empty.txt", "sub/notes.txt"):
        assert (tmp_path / "back" / rel).read_bytes() == (d / rel).read_bytes(), rel
    back = torch.load(str(tmp_path / "back" / "shared.pt"), weights_only=True)
    assert back["view"].untyped_storage().data_ptr() == back["a"].untyped_storage().data_ptr()


def test_resume_checkpoint_prefers_a_newer_complete_directory(tmp_path, reference):
    out = tmp_path / "out"
    assert resume_checkpoint(str(tmp_path / "none"), str(out)) is None
    # a save whose ingest never ran (crash): the Trainer's directory is newer than the store
    materialize(reference["store"], 8, str(out / "checkpoint-12"))
    (out / "checkpoint-16").mkdir()  # incomplete: no trainer_state.json
    assert resume_checkpoint(reference["store"], str(out)) == str(out / "checkpoint-12")
    shutil.rmtree(out / "checkpoint-12")
    assert resume_checkpoint(reference["store"], str(out)) == str(out / "checkpoint-8")
    assert (out / "checkpoint-8" / "trainer_state.json").is_file()


def test_best_step_survives_a_resume(tmp_path):
    """The best directory is gone after a resume; the callback points the Trainer back at it
    and materializes it for load_best_model_at_end."""
    out, store = str(tmp_path / "out"), str(tmp_path / "store")
    best_args = dict(eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                     metric_for_best_model="score", greater_is_better=True)
    cb = DeltaCheckpointCallback(store)
    make_trainer(out, [cb], compute_metrics=ScriptedScore([1.0, 5.0, 2.0, 3.0]),
                 **best_args).train()
    cb.close()
    shutil.rmtree(out)
    path = resume_checkpoint(store, out, step=6)
    cb = DeltaCheckpointCallback(store)
    trainer = make_trainer(out, [cb], compute_metrics=ScriptedScore([3.0]), **best_args)
    trainer.train(resume_from_checkpoint=path)
    cb.close()
    assert trainer.state.best_global_step == 4
    materialize(store, 4, str(tmp_path / "best"))
    best = safetensors.torch.load_file(str(tmp_path / "best" / "model.safetensors"))
    live = trainer.model.state_dict()
    assert_state_equal({k: live[k].detach() for k in best}, best)
    assert checkpoint_dirs(out) == [6]  # the resume source stays; the best copy was removed


class _Scripted:
    """compute_metrics returning scripted scores, one per evaluation."""

    def __init__(self, scores):
        self.scores = list(scores)

    def __call__(self, _pred):
        return {"score": self.scores.pop(0)}


def _final_weights_equal(a: Trainer, b: Trainer) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(),
                                                 b.model.state_dict().values()))


@pytest.mark.parametrize("limit", [1, None])
def test_the_best_checkpoint_is_the_best_saved_one(tmp_path, limit):
    """Found in review: evaluating more often than saving, the best evaluation (step 6) has
    no checkpoint; the Trainer keeps and loads the best *saved* step (4). The callback went
    by best_global_step: it deleted step 4 and the Trainer kept the last weights."""
    kw = dict(eval_strategy="steps", eval_steps=2, save_total_limit=limit,
              load_best_model_at_end=True, metric_for_best_model="score",
              greater_is_better=True)
    ref = make_trainer(str(tmp_path / "ref"), save_steps=4,
                       compute_metrics=_Scripted([1, 5, 6, 2]), **kw)
    ref.train()
    cb = DeltaCheckpointCallback(str(tmp_path / "store"))
    t = make_trainer(str(tmp_path / "out"), [cb], save_steps=4,
                     compute_metrics=_Scripted([1, 5, 6, 2]), **kw)
    t.train()
    cb.close()
    assert os.path.basename(t.state.best_model_checkpoint) == "checkpoint-4"
    with deltackpt.open(str(tmp_path / "store")) as s:
        assert s.steps() == ([4] if limit == 1 else [4, 8])
    assert _final_weights_equal(ref, t)
    assert checkpoint_dirs(str(tmp_path / "out")) == []


def test_a_rolled_back_run_keeps_its_newest_save_under_save_total_limit(tmp_path):
    """Run 1 saves 2, 4, 6, 8; run 2 resumes from 2 with save_total_limit=2 and dies after
    saving 4. The Trainer rotates by time, keeping the new 4; the callback protected the
    highest step number (the old 8) and deleted the 4 it had just stored."""
    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 5:
                raise KeyboardInterrupt("simulated crash at step 5")

    out, store = str(tmp_path / "out"), str(tmp_path / "store")
    cb = DeltaCheckpointCallback(store)
    make_trainer(out, [cb]).train()
    cb.close()
    src = resume_checkpoint(store, out, step=2)
    cb = DeltaCheckpointCallback(store)
    t = make_trainer(out, [Stop(), cb], save_total_limit=2)
    with pytest.raises(KeyboardInterrupt):
        t.train(resume_from_checkpoint=src)
    cb.close()
    with deltackpt.open(store) as s:
        assert 4 in s.steps() and len(s.steps()) == 2
        assert s.info(4).created_at == max(i.created_at for i in s.log())


def test_resume_trusts_the_store_over_a_half_removed_directory(reference, tmp_path):
    """A run killed while the callback removed checkpoint-8 leaves a directory with only
    trainer_state.json: resuming from it silently skipped optimizer, scheduler and RNG."""
    out = tmp_path / "out"
    half = out / "checkpoint-8"
    half.mkdir(parents=True)
    whole = _materialized(reference, tmp_path, 8)
    shutil.copy(whole / "trainer_state.json", half / "trainer_state.json")
    got = resume_checkpoint(reference["store"], str(out))
    assert got == str(half)
    assert_dirs_identical(str(half), str(whole))


def test_no_best_checkpoint_directory_is_left_behind(tmp_path):
    """Per-epoch saves with load_best_model_at_end, the last epoch the new best: the
    previous best, materialized before the final save, was never removed."""
    cb = DeltaCheckpointCallback(str(tmp_path / "store"))
    t = make_trainer(str(tmp_path / "out"), [cb], max_steps=-1, num_train_epochs=3,
                     save_strategy="epoch", eval_strategy="epoch", load_best_model_at_end=True,
                     metric_for_best_model="score", greater_is_better=True,
                     compute_metrics=_Scripted([1, 5, 9]))
    t.train()
    cb.close()
    assert os.path.basename(t.state.best_model_checkpoint) == "checkpoint-18"
    assert checkpoint_dirs(str(tmp_path / "out")) == []


def test_resume_leaves_a_complete_directory_alone(reference, tmp_path):
    """Under torchrun every rank calls resume_checkpoint: a complete directory must not be
    rewritten under the ranks reading it."""
    out = tmp_path / "out"
    first = resume_checkpoint(reference["store"], str(out))
    inodes = {p: os.stat(os.path.join(first, p)).st_ino for p in os.listdir(first)}
    again = resume_checkpoint(reference["store"], str(out))
    assert again == first
    assert {p: os.stat(os.path.join(first, p)).st_ino for p in os.listdir(first)} == inodes
    extra = os.path.join(first, "rng_state_1.pth")  # another rank's file, say
    with open(extra, "wb") as f:
        f.write(b"x")
    assert resume_checkpoint(reference["store"], str(out)) == first and os.path.exists(extra)
