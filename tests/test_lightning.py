"""deltackpt.lightning.DeltaCheckpointIO with a real Trainer and ModelCheckpoint (CPU, tiny model).

The reference for every check is Lightning's own IO in the same process: the same training
with TorchCheckpointIO must keep the same checkpoint files, and each of our checkpoints must
load as exactly the dict Lightning's own file holds (tests/helpers.assert_state_equal).
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch", reason="PyTorch Lightning is not installed "
                         "(pip install lightning, or the project's lightning extra)")

from helpers import assert_state_equal  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.plugins.io import AsyncCheckpointIO  # noqa: E402

import deltackpt  # noqa: E402
from deltackpt import BackgroundSaveError, UnsupportedValueError  # noqa: E402
from deltackpt.lightning import (  # noqa: E402
    CheckpointNotFoundError,
    DeltaCheckpointIO,
    load_checkpoint,
    read_placeholder,
)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# The tiny training, also run by the SIGKILL child (TRAINING is exec'd there).
TRAINING = textwrap.dedent('''
    import os, signal, struct
    import torch
    import torch.nn.functional as F
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    class EpochSampler(torch.utils.data.Sampler):
        """Shuffles with a generator seeded by the epoch (Lightning calls set_epoch), so a
        resumed run sees the same order as an uninterrupted one."""
        def __init__(self, n):
            self.n, self.epoch = n, 0
        def set_epoch(self, epoch):
            self.epoch = epoch
        def __iter__(self):
            g = torch.Generator().manual_seed(1000 + self.epoch)
            return iter(torch.randperm(self.n, generator=g).tolist())
        def __len__(self):
            return self.n

    class Tiny(pl.LightningModule):
        def __init__(self, lr=0.05, hidden=16):
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Tanh(),
                                           torch.nn.Linear(hidden, 1))
            self.losses = {}  # global step -> loss bits

        def training_step(self, batch, i):
            x, y = batch
            loss = F.mse_loss(self.net(x), y)
            self.losses[self.global_step] = struct.pack("<f", loss.item()).hex()
            return loss

        def validation_step(self, batch, i):
            x, y = batch
            self.log("val_loss", F.mse_loss(self.net(x), y))
            # a monitored score that is not monotone, so top-k drops older files too
            self.log("score", float((self.current_epoch * 7) % 5))

        def configure_optimizers(self):
            opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 3)}

    def loaders():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(48, 4, generator=g)
        y = x.sum(1, keepdim=True).sin() + 0.1 * torch.randn(48, 1, generator=g)
        ds = torch.utils.data.TensorDataset(x, y)
        return (torch.utils.data.DataLoader(ds, batch_size=12, sampler=EpochSampler(48)),
                torch.utils.data.DataLoader(ds, batch_size=24))

    class KillAt(Callback):
        def __init__(self, epoch):
            self.epoch = epoch
        def on_train_epoch_start(self, trainer, module):
            if trainer.current_epoch == self.epoch:
                os.kill(os.getpid(), signal.SIGKILL)

    def train(ckdir, plugins, epochs=6, ckpt_path=None, extra=(), save_last=True):
        torch.manual_seed(0)
        model = Tiny()
        cb = ModelCheckpoint(dirpath=ckdir, save_top_k=2, monitor="score", mode="min",
                             save_last=save_last, every_n_epochs=1)
        trainer = pl.Trainer(max_epochs=epochs, callbacks=[cb, *extra], plugins=plugins,
                             logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=True,
                             num_sanity_val_steps=0, default_root_dir=ckdir)
        train_dl, val_dl = loaders()
        trainer.fit(model, train_dl, val_dl, ckpt_path=ckpt_path)
        return model, cb
''')
exec(TRAINING)  # noqa: S102 - our own source, shared with the child process


def files(ckdir):
    return sorted(f for f in os.listdir(ckdir) if f.endswith(".ckpt"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The training with Lightning's own IO: kept files, their dicts, the losses."""
    ckdir = str(tmp_path_factory.mktemp("ref") / "ck")
    model, cb = train(ckdir, plugins=None)  # noqa: F821 - defined by TRAINING
    dicts = {f: torch.load(os.path.join(ckdir, f), weights_only=True) for f in files(ckdir)}
    return {"dir": ckdir, "files": sorted(dicts), "dicts": dicts, "losses": model.losses,
            "weights": {k: v.clone() for k, v in model.state_dict().items()},
            "best": cb.best_model_path}


def run_in_ref_dir(reference, plugin):
    """Train again in the reference's checkpoint directory (the dicts hold its path)."""
    shutil.rmtree(reference["dir"])
    return train(reference["dir"], plugins=[plugin])  # noqa: F821


@pytest.mark.parametrize("mode", ["sync", "async", "lightning-async"])
def test_topk_files_and_dicts_match_lightning_io(reference, tmp_path, mode):
    store = str(tmp_path / "store")
    io = DeltaCheckpointIO(store, async_save=mode == "async")
    plugin = AsyncCheckpointIO(io) if mode == "lightning-async" else io
    model, cb = run_in_ref_dir(reference, plugin)
    ckdir = reference["dir"]
    assert files(ckdir) == reference["files"]  # same kept set, same names (no -v1)
    assert cb.best_model_path == reference["best"]
    assert model.losses == reference["losses"]
    # one step per kept file, nothing else left in the store
    assert sorted(os.path.basename(p) for p in io._mapping()) == reference["files"]
    assert len(io.store.steps()) == len(reference["files"])
    for name in reference["files"]:
        path = os.path.join(ckdir, name)
        meta = read_placeholder(path)
        assert meta is not None and meta["store"] == store
        want = reference["dicts"][name]
        if mode == "lightning-async":
            # AsyncCheckpointIO's tensor clone rebuilds the state_dict OrderedDict without
            # its _metadata (torch's version info): that is what it hands to any IO
            want = dict(want, state_dict=collections.OrderedDict(want["state_dict"]))
        assert_state_equal(io.load_checkpoint(path), want)
    # last.ckpt and the newest top-k file hold the same global step, as two steps that
    # differ only in ModelCheckpoint's own state
    last = read_placeholder(os.path.join(ckdir, "last.ckpt"))
    twin = [n for n in reference["files"] if n != "last.ckpt" and
            read_placeholder(os.path.join(ckdir, n))["global_step"] == last["global_step"]]
    assert twin and read_placeholder(os.path.join(ckdir, twin[0]))["step"] != last["step"]
    io.teardown()


def test_remove_checkpoint_deletes_the_step_and_reclaims(reference, tmp_path):
    io = DeltaCheckpointIO(str(tmp_path / "store"))
    run_in_ref_dir(reference, io)
    ckdir = reference["dir"]
    before = io.store.stored_bytes()
    victim = os.path.join(ckdir, [f for f in files(ckdir) if f != "last.ckpt"][0])
    step = read_placeholder(victim)["step"]
    io.remove_checkpoint(victim)
    assert not os.path.exists(victim)
    assert step not in io.store
    assert io.store.stored_bytes() < before
    with pytest.raises(CheckpointNotFoundError):  # also a FileNotFoundError, for Lightning
        io.load_checkpoint(victim)
    io.remove_checkpoint(victim)  # removing twice is a no-op, like Lightning's IO
    io.teardown()


def test_overwrite_replaces_the_step_and_a_shared_step_survives(tmp_path):
    io = DeltaCheckpointIO(str(tmp_path / "store"))
    a, b = str(tmp_path / "ck" / "a.ckpt"), str(tmp_path / "ck" / "b.ckpt")
    w = torch.arange(300_000, dtype=torch.float32)
    io.save_checkpoint({"global_step": 1, "w": w}, a)
    io.save_checkpoint({"global_step": 1, "w": w}, b)
    first = io.store.stored_bytes()
    assert io.store.info(2).written_bytes == 0  # same tensors: nothing new
    io.save_checkpoint({"global_step": 2, "w": w + 1}, a)  # overwrite a
    assert io.steps_for(a) == [3] and io.steps_for(b) == [2] and 1 not in io.store
    assert_state_equal(io.load_checkpoint(b), {"global_step": 1, "w": w})
    assert_state_equal(io.load_checkpoint(a), {"global_step": 2, "w": w + 1})
    io.remove_checkpoint(a)
    assert io.store.steps() == [2] and io.store.stored_bytes() <= first
    io.teardown()


def test_a_save_still_queued_in_async_checkpoint_io_when_its_file_is_removed(tmp_path):
    """Lightning's AsyncCheckpointIO saves in its one thread and removes in the caller's.
    Top-k can remove a file whose save still waits in that queue while the thread is busy
    with something else (between two saves): the save must then be dropped when it comes,
    not leave a checkpoint Lightning thinks is gone."""
    import concurrent.futures
    import threading

    io = DeltaCheckpointIO(str(tmp_path / "store"))
    ck = tmp_path / "ck"
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # AsyncCheckpointIO's
    try:
        pool.submit(io.save_checkpoint, {"global_step": 1, "x": torch.ones(3)},
                    str(ck / "epoch=0.ckpt")).result()
        gate = threading.Event()
        pool.submit(gate.wait)                         # the thread is busy, not in a save
        queued = pool.submit(io.save_checkpoint, {"global_step": 2, "x": torch.zeros(3)},
                             str(ck / "epoch=1.ckpt"))
        io.remove_checkpoint(str(ck / "epoch=1.ckpt"))  # top-k drops it before it is saved
        gate.set()
        queued.result()
        io.wait()
        assert sorted(os.listdir(ck)) == ["epoch=0.ckpt"]
        assert sorted(os.path.basename(p) for p in io._mapping()) == ["epoch=0.ckpt"]
        assert io.store.steps() == [1]
        # a later save under another name is not affected
        pool.submit(io.save_checkpoint, {"global_step": 3, "x": torch.ones(3)},
                    str(ck / "epoch=2.ckpt")).result()
        assert sorted(os.listdir(ck)) == ["epoch=0.ckpt", "epoch=2.ckpt"]
    finally:
        pool.shutdown(wait=True)
        io.teardown()


def test_leftover_steps_of_a_path_go_at_its_next_save(tmp_path):
    """A crash between commit and deleting the replaced step leaves two steps for a path."""
    store_dir, path = str(tmp_path / "store"), str(tmp_path / "ck" / "last.ckpt")
    io = DeltaCheckpointIO(store_dir)
    io.save_checkpoint({"global_step": 1, "x": torch.ones(3)}, path)
    note = json.dumps({"lightning_path": path, "global_step": 2, "epoch": 0})
    io.store.save({"global_step": 2, "x": torch.zeros(3)}, 2, note=note)  # the crashed save
    io.teardown()
    io = DeltaCheckpointIO(store_dir)
    assert io.steps_for(path) == [1, 2]
    assert io.load_checkpoint(path)["global_step"] == 1  # what the placeholder says
    io.save_checkpoint({"global_step": 3, "x": torch.ones(3)}, path)
    assert io.store.steps() == [3]
    io.teardown()


def test_sigkill_then_resume_from_last_matches_uninterrupted_run(reference, tmp_path):
    ckdir, store = str(tmp_path / "ck"), str(tmp_path / "store")
    child = TRAINING + textwrap.dedent(f'''
        torch.set_num_threads(1)
        from deltackpt.lightning import DeltaCheckpointIO
        train({ckdir!r}, plugins=[DeltaCheckpointIO({store!r}, async_save=True)],
              extra=[KillAt(4)])
        raise SystemExit("not killed")
    ''')
    proc = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    last = read_placeholder(os.path.join(ckdir, "last.ckpt"))
    assert last["global_step"] >= 8  # at least the epoch-1 checkpoint was committed
    io = DeltaCheckpointIO(store)
    model, _ = train(ckdir, plugins=[io], ckpt_path="last")  # noqa: F821
    resumed = model.losses
    assert resumed and min(resumed) == last["global_step"]
    assert resumed == {s: v for s, v in reference["losses"].items() if s in resumed}
    assert max(resumed) == max(reference["losses"])
    assert_state_equal(dict(model.state_dict()), reference["weights"])


def test_unsupported_hyper_parameter_names_the_key(tmp_path):
    class WithModule(Tiny):  # noqa: F821
        def __init__(self, loss_fn: torch.nn.Module):
            super().__init__()
            self.save_hyperparameters()

    store, ckdir = str(tmp_path / "store"), str(tmp_path / "ck")
    io = DeltaCheckpointIO(store)
    trainer = pl.Trainer(max_epochs=1, plugins=[io], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[ModelCheckpoint(dirpath=ckdir)])
    with pytest.warns(UserWarning, match="loss_fn"), \
            pytest.raises(UnsupportedValueError) as err:
        trainer.fit(WithModule(torch.nn.MSELoss()), *loaders())  # noqa: F821
    msg = str(err.value)
    assert "'hyper_parameters'" in msg and "'loss_fn'" in msg
    assert "save_hyperparameters(ignore=['loss_fn'])" in msg
    assert io.store.steps() == [] and not os.path.exists(ckdir)
    io.teardown()
    # the async path refuses it in the caller's thread, before anything is queued
    io = DeltaCheckpointIO(store, async_save=True)
    with pytest.raises(UnsupportedValueError, match="ignore=\\['opt_cls'\\]"):
        io.save_checkpoint({"hyper_parameters": {"opt_cls": torch.optim.Adam}},
                           os.path.join(ckdir, "x.ckpt"))
    io.teardown()
    assert not os.path.exists(os.path.join(ckdir, "x.ckpt"))


def test_background_failure_surfaces_at_the_next_call(tmp_path):
    io = DeltaCheckpointIO(str(tmp_path / "store"), async_save=True)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    io.save_checkpoint({"x": torch.ones(2)}, str(blocker / "a.ckpt"))  # placeholder fails
    with pytest.raises(BackgroundSaveError, match="FileExistsError|NotADirectoryError"):
        io.wait()
    io.teardown()


@pytest.mark.parametrize("how", ["recreated", "latest-deleted"])
def test_a_placeholder_never_loads_another_save_that_reused_its_step(tmp_path, how):
    """Found in review: a placeholder recorded (store, step) only, and both the store
    recreated at its path and its latest step deleted by hand reuse step numbers."""
    store = str(tmp_path / "store")
    old = str(tmp_path / "ck" / "epoch=1-step=100.ckpt")
    io = DeltaCheckpointIO(store)
    io.save_checkpoint({"global_step": 100, "w": torch.zeros(4)}, old)
    io.teardown()
    if how == "recreated":
        shutil.rmtree(store)
    else:
        with deltackpt.open(store) as s:
            s.delete(1)
    io = DeltaCheckpointIO(store)
    io.save_checkpoint({"global_step": 7, "w": torch.ones(4)}, str(tmp_path / "ck" / "n.ckpt"))
    assert io.store.steps() == [1]  # the old placeholder's step number, another save
    for load in (io.load_checkpoint, load_checkpoint):
        with pytest.raises(CheckpointNotFoundError, match="now holds another save"):
            load(old)
    assert_state_equal(load_checkpoint(str(tmp_path / "ck" / "n.ckpt")),
                       {"global_step": 7, "w": torch.ones(4)})
    io.teardown()


def test_first_uses_from_two_threads_open_the_store_once(tmp_path, monkeypatch):
    """Lightning's AsyncCheckpointIO saves on its thread while ModelCheckpoint removes a
    file on the main one: both could open the store, and the second open failed on the
    first one's writer lock (a CI flake of the lightning-async test)."""
    import threading
    import time

    import deltackpt.lightning as dl

    real = dl.open_store
    opened = []

    def slow_open(*args, **kwargs):
        opened.append(threading.current_thread().name)
        time.sleep(0.2)  # the race window, made wide
        return real(*args, **kwargs)

    monkeypatch.setattr(dl, "open_store", slow_open)
    io = DeltaCheckpointIO(str(tmp_path / "store"))
    errors = []

    def use(how):
        try:
            if how == "save":  # what the save job does first, outside the plugin's lock
                assert io.store is not None
            else:  # what remove_checkpoint does first
                io.steps_for(str(tmp_path / "x.ckpt"))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=use, args=(how,)) for how in ("save", "remove")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(opened) == 1
    io.teardown()


def test_async_saves_with_save_last_link_into_a_new_directory(tmp_path):
    """Lightning links last.ckpt to the file right after save_checkpoint returns; with
    async saves the directory did not exist yet and fit() died at the first save."""
    ckdir = str(tmp_path / "new" / "ck")
    io = DeltaCheckpointIO(str(tmp_path / "store"), async_save=True)
    train(ckdir, plugins=[io], epochs=2, save_last="link")  # noqa: F821
    assert os.path.islink(os.path.join(ckdir, "last.ckpt"))
    last = load_checkpoint(os.path.join(ckdir, "last.ckpt"))
    assert last["epoch"] == 1 and last["global_step"] == 8


def test_load_outside_a_trainer_and_foreign_files(reference, tmp_path):
    io = DeltaCheckpointIO(str(tmp_path / "store"))
    path = str(tmp_path / "ck" / "w.ckpt")
    state = {"state_dict": {"w": torch.randn(5)}, "epoch": 0}
    io.save_checkpoint(state, path)
    assert_state_equal(load_checkpoint(path), state)
    io.teardown()  # releases the writer lock; the placeholder still works
    assert_state_equal(load_checkpoint(path), state)
    # a checkpoint of Lightning's own IO still loads (weights_only=True, no pickle)
    foreign = str(tmp_path / "torch.ckpt")
    torch.save(reference["dicts"]["last.ckpt"], foreign)
    assert_state_equal(DeltaCheckpointIO(str(tmp_path / "s2")).load_checkpoint(foreign),
                       reference["dicts"]["last.ckpt"])
    with pytest.raises(FileNotFoundError):
        load_checkpoint(str(tmp_path / "missing.ckpt"))


def test_a_placeholder_from_before_save_ids_loads_through_last_ckpt(tmp_path):
    """Review: the stale-placeholder check required an old placeholder's own file name to be
    the step's, which a last.ckpt link or copy never is."""
    store = str(tmp_path / "store")
    path = str(tmp_path / "ck" / "epoch=0-step=10.ckpt")
    io = DeltaCheckpointIO(store)
    io.save_checkpoint({"global_step": 10, "w": torch.ones(3)}, path)
    io.teardown()
    with open(path) as f:
        data = json.load(f)
    del data["save_id"]  # as written before save ids
    with open(path, "w") as f:
        json.dump(data, f)
    last = str(tmp_path / "ck" / "last.ckpt")
    os.symlink(path, last)
    assert load_checkpoint(last)["global_step"] == 10
    shutil.copy(path, str(tmp_path / "ck" / "copy.ckpt"))
    assert load_checkpoint(str(tmp_path / "ck" / "copy.ckpt"))["global_step"] == 10


def test_an_async_save_reserves_its_name_at_once_and_frees_it_if_the_save_fails(
        tmp_path, monkeypatch):
    """ModelCheckpoint versions a name that exists ("-v1") right after a save returns: a
    background save must make its file exist before it returns, or the next save of the
    same name overwrites it (and deletes its step)."""
    import threading

    io = DeltaCheckpointIO(str(tmp_path / "store"), async_save=True)
    ck = tmp_path / "ck"
    gate = threading.Event()
    real = DeltaCheckpointIO._save_step

    def slow(self, *args):
        gate.wait(30)
        return real(self, *args)

    monkeypatch.setattr(DeltaCheckpointIO, "_save_step", slow)
    a = str(ck / "epoch=0.ckpt")
    io.save_checkpoint({"global_step": 1, "x": torch.ones(3)}, a)
    assert os.path.exists(a)  # the save is still queued
    with pytest.raises(CheckpointNotFoundError, match="never completed"):
        load_checkpoint(a)  # outside the plugin: nothing committed yet
    gate.set()
    io.wait()
    assert_state_equal(load_checkpoint(a), {"global_step": 1, "x": torch.ones(3)})
    # a failing save gives its reserved name back
    monkeypatch.setattr(DeltaCheckpointIO, "_save_step",
                        lambda self, *args: (_ for _ in ()).throw(OSError("disk gone")))
    b = str(ck / "epoch=1.ckpt")
    io.save_checkpoint({"global_step": 2, "x": torch.zeros(3)}, b)
    with pytest.raises(BackgroundSaveError, match="disk gone"):
        io.wait()
    assert sorted(os.listdir(ck)) == ["epoch=0.ckpt"]
    io.teardown()


def test_async_versioned_names_keep_every_save_like_lightning_io(tmp_path, monkeypatch):
    import threading

    class Logged(Tiny):  # noqa: F821 - defined by TRAINING
        def training_step(self, batch, i):
            loss = super().training_step(batch, i)
            self.log("train_loss", loss)
            return loss

    gate = threading.Event()

    class OpenGate(pl.Callback):  # the queued saves may go on once training is over
        def on_train_end(self, trainer, module):
            gate.set()

    def fit(ckdir, plugins):
        trainer = pl.Trainer(max_steps=4, plugins=plugins, logger=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, default_root_dir=str(tmp_path),
                             callbacks=[ModelCheckpoint(dirpath=ckdir, filename="{epoch}",
                                                        monitor="train_loss", save_top_k=-1,
                                                        every_n_train_steps=1), OpenGate()])
        torch.manual_seed(0)
        train_dl, val_dl = loaders()  # noqa: F821 - defined by TRAINING
        trainer.fit(Logged(), train_dl, val_dl)

    fit(str(tmp_path / "ref"), None)  # Lightning's own IO: every save under its own name
    want = files(tmp_path / "ref")
    assert len(want) == 4
    gate.clear()
    real = DeltaCheckpointIO._save_step

    def slow(self, *args):  # every save outlasts the training steps between saves
        gate.wait(30)
        return real(self, *args)

    monkeypatch.setattr(DeltaCheckpointIO, "_save_step", slow)
    io = DeltaCheckpointIO(str(tmp_path / "store"), async_save=True, max_pending=8)
    fit(str(tmp_path / "ck"), [io])
    assert gate.is_set()
    io.wait()
    assert files(tmp_path / "ck") == want
    assert sorted(load_checkpoint(tmp_path / "ck" / n)["global_step"] for n in want) == \
        [1, 2, 3, 4]
    io.teardown()


def test_a_save_queued_after_teardown_completes_at_interpreter_exit(tmp_path):
    """trainer.save_checkpoint() after fit() (which tore the plugin down) queues a background
    save that nothing waits for: it must still be stored before the interpreter exits."""
    store, ck = str(tmp_path / "store"), str(tmp_path / "final.ckpt")
    code = textwrap.dedent(f'''
        import torch
        from deltackpt.lightning import DeltaCheckpointIO
        io = DeltaCheckpointIO({store!r}, async_save=True)
        io.save_checkpoint({{"global_step": 1, "w": torch.ones(4)}}, {ck + ".first"!r})
        io.teardown()
        io.save_checkpoint({{"global_step": 2, "w": torch.arange(1000.0)}}, {ck!r})
    ''')
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0 and "did not complete" not in r.stderr, r.stderr
    assert_state_equal(load_checkpoint(ck), {"global_step": 2, "w": torch.arange(1000.0)})


def test_a_plugin_never_torn_down_does_not_lock_the_store_for_the_next_one(tmp_path):
    """Lightning's AsyncCheckpointIO never calls the teardown of the plugin it wraps, so the
    plugin's store stays open after fit: a second Trainer's plugin on the same store must
    still be able to write (the first gives the writer lock back when idle)."""
    store, ck = str(tmp_path / "store"), tmp_path / "ck"
    first = AsyncCheckpointIO(DeltaCheckpointIO(store))
    first.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, str(ck / "a.ckpt"))
    first.teardown()  # Lightning's: the wrapped plugin is left as it is
    second = DeltaCheckpointIO(store, store_options={"lock_timeout": 0})
    second.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, str(ck / "b.ckpt"))
    assert second.store.steps() == [1, 2]
    assert_state_equal(second.load_checkpoint(str(ck / "a.ckpt")),
                       {"global_step": 1, "w": torch.ones(3)})
    second.teardown()
