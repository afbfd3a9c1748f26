"""Step-time overhead of checkpointing on the real MiniLM fine-tuning example.

    python benchmarks/bench_overhead.py [--steps 200] [--save-every 50] [--pairs 2]

Runs examples/finetune_minilm.py in fresh processes, pairing a run that checkpoints
every ``--save-every`` steps (async, the example's defaults) with one that never saves
at all (``--no-checkpoint``), the order alternating from pair to pair; both evaluate every ``--save-every`` steps so they do the
same training work. The overhead is the ratio of
the mean training-loop step times (medians over the pairs), measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(os.path.dirname(HERE), "examples", "finetune_minilm.py")


def run(steps: int, save_every: int | None, eval_every: int, extra: list[str],
        workdir: str | None = None) -> dict:
    work = tempfile.mkdtemp(prefix="overhead-", dir=workdir)
    try:
        cmd = [sys.executable, EXAMPLE, "--store", os.path.join(work, "store"), "--steps",
               str(steps), "--eval-every", str(eval_every), *extra]
        cmd += ["--no-checkpoint"] if save_every is None else ["--save-every", str(save_every)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    finally:
        shutil.rmtree(work, ignore_errors=True)
    m = re.search(r"trained (\d+) steps in ([\d.]+) s", out)
    blocked = re.search(r"training blocked per save: median (\d+) ms, max (\d+) ms", out)
    return {"loop_s": float(m.group(2)), "steps": int(m.group(1)),
            "blocked_median_ms": int(blocked.group(1)) if blocked else None,
            "blocked_max_ms": int(blocked.group(2)) if blocked else None,
            "saves": len(re.findall(r"\[save \d+\]", out))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the example")
    ap.add_argument("--json", default=None)
    ap.add_argument("--workdir", default=None,
                    help="scratch dir for the stores (default: the system's temp dir)")
    args = ap.parse_args()
    extra = ["--threads", str(args.threads)] if args.threads else []
    rows = []
    for i in range(args.pairs):
        # alternate which run goes first (ABBA): a machine that drifts over the minutes of a
        # pair would otherwise always favour the same side
        if i % 2 == 0:
            with_ckpt = run(args.steps, args.save_every, args.save_every, extra, args.workdir)
            without = run(args.steps, None, args.save_every, extra, args.workdir)
        else:
            without = run(args.steps, None, args.save_every, extra, args.workdir)
            with_ckpt = run(args.steps, args.save_every, args.save_every, extra, args.workdir)
        ratio = with_ckpt["loop_s"] / without["loop_s"]
        rows.append({"with": with_ckpt, "without": without, "ratio": ratio})
        print(f"pair {i}: with checkpoints {with_ckpt['loop_s']:.1f} s "
              f"({with_ckpt['saves']} saves, blocked median {with_ckpt['blocked_median_ms']} ms), "
              f"without {without['loop_s']:.1f} s: overhead {100 * (ratio - 1):+.1f}%",
              flush=True)
    med = statistics.median(r["ratio"] for r in rows)
    print(f"step-time overhead (median of {len(rows)} pairs): {100 * (med - 1):+.1f}% "
          f"at a save every {args.save_every} steps")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "median_ratio": med}, f, indent=2)


if __name__ == "__main__":
    main()
