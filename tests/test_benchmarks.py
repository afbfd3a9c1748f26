"""The benchmark scripts still run against the current code (smallest settings, a tiny
synthetic trace in the layout of benchmarks/minilm_trace.py), and write only where told.

They measure nothing here: this keeps them from rotting between benchmark sessions (a
session found bench_store's index section broken by schema 2 only when it ran it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {"bert.embeddings.word_embeddings.weight": (320, 1024),  # 1.25 MiB fp32: 2 blocks
          "bert.encoder.layer.0.attention.self.query.weight": (128, 128),
          "bert.encoder.layer.0.attention.self.query.bias": (128,)}


@pytest.fixture(scope="module")
def traces(tmp_path_factory) -> str:
    """fp32_wd0 and bf16 traces, steps 0-30 every 10, AdamW-like moments (none at step 0,
    as in the real traces)."""
    root = tmp_path_factory.mktemp("traces")
    for scenario, dtype in (("fp32_wd0", torch.float32), ("bf16", torch.bfloat16)):
        g = torch.Generator().manual_seed(0)
        out = root / scenario
        out.mkdir()
        w = {k: torch.randn(s, generator=g) * 0.02 for k, s in SHAPES.items()}
        m = {k: torch.zeros(s) for k, s in SHAPES.items()}
        v = {k: torch.zeros(s) for k, s in SHAPES.items()}
        for step in range(31):
            if step:
                for k, s in SHAPES.items():
                    grad = torch.randn(s, generator=g) * 1e-3
                    m[k] = 0.9 * m[k] + 0.1 * grad
                    v[k] = 0.999 * v[k] + 0.001 * grad * grad
                    w[k] = w[k] - 5e-5 * m[k] / (v[k].sqrt() + 1e-8)
            if step % 10:
                continue
            t = {f"model/{k}": x.to(dtype).contiguous() for k, x in w.items()}
            if step:
                for i, k in enumerate(SHAPES):
                    t[f"optimizer/state/{i}/exp_avg"] = m[k].to(dtype).contiguous()
                    t[f"optimizer/state/{i}/exp_avg_sq"] = v[k].to(dtype).contiguous()
                    t[f"optimizer/state/{i}/step"] = torch.tensor(float(step))
            t["rng/torch"] = torch.get_rng_state()
            meta = {"step": step, "loss": None if step == 0 else 10.0 - step * 0.01,
                    "aliases": {}, "scheduler": {"base_lrs": [5e-05], "last_epoch": step},
                    "param_groups": [{"lr": 5e-05, "betas": [0.9, 0.999], "eps": 1e-08,
                                      "weight_decay": 0.0, "params": list(range(len(SHAPES)))}]}
            save_file(t, str(out / f"step_{step:06d}.safetensors"),
                      metadata={"deltackpt_trace": json.dumps(meta)})
    return str(root)


def _repo_files() -> set[str]:
    out = set()
    for top in ("benchmarks", "docs", "deltackpt"):
        for d, dirs, files in os.walk(os.path.join(ROOT, top)):
            dirs[:] = [x for x in dirs if x not in ("__pycache__", ".cache")]
            out.update(os.path.join(d, f) for f in files)
    return out


CASES = {
    "bench_delta": ["--trace", "{t}/fp32_wd0", "--repeat", "1", "--threads", "1",
                    "--configs", "none,auto", "--workdir", "{w}", "--json", "{w}/out.json"],
    "bench_delta-bf16-load-all": ["--trace", "{t}/bf16", "--repeat", "1", "--threads", "1",
                                  "--load-all", "--workdir", "{w}", "--json", "{w}/out.json"],
    "bench_hash": ["--mib", "1", "--repeat", "1"],
    "bench_analysis": ["--steps", "12", "--entries", "20", "--repeat", "1", "--index",
                       "{w}/analysis"],
    "bench_store": ["--only", "index", "--index-steps", "2", "--index-block-sizes", "16777216",
                    "--repeat", "1", "--workdir", "{w}", "--json", "{w}/out.json"],
    "codec_experiments": ["--traces", "{t}", "--out", "{w}/codec.md", "--json", "{w}/out.json",
                          "--jobs", "1", "--timing-bytes", "1048576"],
    "bench_dcp": ["--traces", "{t}", "--scenario", "fp32_wd0", "--steps", "10:20:10",
                  "--world", "2", "--workdir", "{w}/dcp"],
    "bench_s3": ["--mib", "3", "--repeat", "1"],
    "bench_codec_floor": ["--trace", "{t}/bf16", "--base", "20", "--step", "30", "--repeat",
                          "1", "--rounds", "1", "--threads", "1"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_benchmark_script_runs(traces, tmp_path, case):
    script = case.split("-")[0]
    if script == "bench_s3":
        pytest.importorskip("moto", reason="bench_s3 needs the s3 test extra (moto)")
    if script == "codec_experiments":
        pytest.importorskip("zipnn", reason="codec_experiments compares with zipnn")
    args = [a.format(t=traces, w=tmp_path) for a in CASES[case]]
    before = _repo_files()
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", TMPDIR=str(tmp_path),
               OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", f"{script}.py"),
                        *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    assert _repo_files() == before, "the benchmark wrote into the repository"
    if "{w}/out.json" in CASES[case]:
        with open(tmp_path / "out.json") as f:
            assert json.load(f)
