"""A real training state: a small transformer, AdamW, an LR schedule and every RNG.

Restoring must resume training exactly: one more step in the original and in the
restored copy gives the same loss and parameters, bit for bit.
"""

from __future__ import annotations

import copy
import os
import random

import numpy as np
import pytest
import torch
from helpers import assert_state_equal, float_bits, tensor_bytes

import deltackpt

torch.set_num_threads(1)


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=50, d=32, layers=2):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        layer = torch.nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=64, dropout=0.1,
                                                 batch_first=True)
        self.enc = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, vocab, bias=False)
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        return self.head(self.norm(self.enc(self.emb(x))))


def make(seed=0):
    torch.manual_seed(seed)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=100)
    return model, opt, sched


def train_step(model, opt, sched, np_rng):
    """One step that draws from every RNG the training state carries."""
    model.train()
    x = torch.randint(0, 50, (4, 12))  # torch global RNG
    noise = float(np.random.random())  # numpy legacy global RNG
    shift = random.randrange(3)  # python RNG
    extra = float(np_rng.standard_normal())  # numpy Generator
    y = torch.roll(x, shift, dims=1)
    logits = model(x)  # dropout: torch RNG again
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), y.reshape(-1))
    loss = loss * (1 + 0.01 * noise) + 0.0 * extra
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    model.steps_seen += 1
    return loss.detach(), extra


def full_state(model, opt, sched, np_rng):
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "numpy": np.random.get_state(), "generator": np_rng.bit_generator.state},
        "step": int(model.steps_seen),
    }


def restore_rngs(rng, np_rng):
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    np_rng.bit_generator.state = rng["generator"]


def params_bytes(model):
    return {k: tensor_bytes(v).clone() for k, v in model.state_dict().items()}


@pytest.fixture
def trained():
    random.seed(1)
    np.random.seed(2)
    np_rng = np.random.default_rng(3)
    model, opt, sched = make()
    for _ in range(3):
        train_step(model, opt, sched, np_rng)
    return model, opt, sched, np_rng


def test_optimizer_state_has_the_awkward_parts(trained):
    model, opt, sched, np_rng = trained
    st = full_state(model, opt, sched, np_rng)
    assert all(type(k) is int for k in st["optimizer"]["state"])
    assert type(st["optimizer"]["param_groups"][0]["betas"]) is tuple
    assert hasattr(st["model"], "_metadata")
    assert type(st["rng"]["python"]) is tuple
    assert st["rng"]["generator"]["state"]["state"] > 2**64  # a 128-bit python int


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_resume_is_bit_exact(trained, tmp_path, where):
    model, opt, sched, np_rng = trained
    path = "memory://" if where == "memory" else os.path.join(tmp_path, "ckpt")
    store = deltackpt.open(path, block_size=4096)
    try:
        saved = full_state(model, opt, sched, np_rng)
        store.save(saved, step=3, metrics={"loss": 1.0})
        snapshot = copy.deepcopy(saved)  # what was saved, immune to further training
        assert_state_equal(store.load(3), snapshot)

        # the original keeps training
        loss_a, extra_a = train_step(model, opt, sched, np_rng)
        params_a = params_bytes(model)
        opt_a = copy.deepcopy(opt.state_dict())

        # a fresh process-like copy: new objects (different init), state from the store
        if where == "disk":
            store.close()
            store = deltackpt.open(path)
        loaded = store.load(3)
        model_b, opt_b, sched_b = make(seed=123)
        assert not torch.equal(model_b.emb.weight, snapshot["model"]["emb.weight"])
        model_b.load_state_dict(loaded["model"])
        opt_b.load_state_dict(loaded["optimizer"])
        sched_b.load_state_dict(loaded["scheduler"])
        np_rng_b = np.random.default_rng(999)
        restore_rngs(loaded["rng"], np_rng_b)
        assert int(model_b.steps_seen) == loaded["step"] == 3
        assert_state_equal(full_state(model_b, opt_b, sched_b, np_rng_b), snapshot)

        loss_b, extra_b = train_step(model_b, opt_b, sched_b, np_rng_b)
        assert float_bits(loss_a.item()) == float_bits(loss_b.item())
        assert float_bits(extra_a) == float_bits(extra_b)
        assert params_bytes(model_b).keys() == params_a.keys()
        for k, v in params_bytes(model_b).items():
            assert torch.equal(v, params_a[k]), k
        assert_state_equal(opt_b.state_dict(), opt_a)
        assert sched_b.get_last_lr() == sched.get_last_lr()
    finally:
        store.close()


def test_restore_actually_matters(trained):
    """Control: without restoring the RNGs the next step differs (the test above can fail)."""
    model, opt, sched, np_rng = trained
    saved = copy.deepcopy(full_state(model, opt, sched, np_rng))
    loss_a, _ = train_step(model, opt, sched, np_rng)
    model_b, opt_b, sched_b = make(seed=5)
    model_b.load_state_dict(saved["model"])
    opt_b.load_state_dict(saved["optimizer"])
    sched_b.load_state_dict(saved["scheduler"])
    loss_b, _ = train_step(model_b, opt_b, sched_b, np.random.default_rng(0))  # RNGs not restored
    assert float_bits(loss_a.item()) != float_bits(loss_b.item())


def test_checkpoint_series_dedups_and_every_step_restores(trained):
    model, opt, sched, np_rng = trained
    saved = {}
    with deltackpt.open("memory://", block_size=4096) as store:
        for step in range(4, 8):
            train_step(model, opt, sched, np_rng)
            saved[step] = copy.deepcopy(full_state(model, opt, sched, np_rng))
            r = store.save(saved[step], step)
            if step > 4:
                assert r.written_bytes < r.logical_bytes  # deltas and dedup pay
        for step, st in saved.items():
            assert_state_equal(store.load(step), st)
        only_model = store.load(6, select="model")
        assert list(only_model) == ["model"]
        assert_state_equal(only_model["model"], saved[6]["model"])
        assert store.verify().ok
