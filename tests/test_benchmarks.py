"""The benchmarks that run on CPU still run: they mirror the ring op's internals (its kernel calls
without communication), so a change there can break them without any other test noticing."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("mask", ["causal", "documents"])
def test_bench_ring_runs_on_a_gloo_world(tmp_path, mask):
    cmd = [sys.executable, "benchmarks/bench_ring.py", "--world-size", "2", "--tokens-per-rank",
           "64", "--heads", "2", "--kv-heads", "1", "--head-dim", "16", "--iters", "1",
           "--repeats", "1", "--warmup", "0", "--kernels", "auto", "--layouts", "zigzag",
           "--no-peers", "--mask", mask, "--out", str(tmp_path)]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (saved,) = tmp_path.glob("bench_ring_w2*.json")
    rows = json.loads(saved.read_text())["rows"]
    names = ["ours zigzag", "ours zigzag, no communication"]
    if mask == "documents":  # (and, on GPUs, flex on one and context_parallel's flex)
        names.append("ours zigzag, the documents as a mask_mod")
    for name in names:
        assert rows[name]["ms"] > 0, rows[name]


def test_bench_strategies_runs_on_cpu(tmp_path):
    cmd = [sys.executable, "benchmarks/bench_strategies.py", "--tokens-per-rank", "32",
           "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--worlds", "2", "4",
           "--out", str(tmp_path)]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "bench_strategies.json").read_text())["rows"]
    assert [(r["world"], r["mask"]) for r in rows] == [
        (w, m) for w in (2, 4) for m in ("causal", "documents", "window")
    ]
    # 4 heads, 2 KV heads over 2 ranks: each sends half of its q, out, dout and dq and one KV
    # head of k, v, dk and dv to the other, 32 tokens of 16 fp32 values each
    assert rows[0]["ulysses_a2a_ms"] == (4 * 2 + 4 * 1) * 32 * 16 * 4 / (200.0 * 1e6)
    # two levels, 2 x 2, at W = 4 only (the default U = 2 must be smaller than W)
    assert ["two_level_u2_ms" in r for r in rows] == [False] * 3 + [True] * 3


def test_bench_balance_counts_each_layout(tmp_path):
    cmd = [sys.executable, "benchmarks/bench_balance.py", "--seqs", "512", "--worlds", "2",
           "--docs", "32-128", "--draws", "2", "--out", str(tmp_path)]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads((tmp_path / "bench_balance.json").read_text())["rows"]
    # striped spreads every document: one token a row at most between ranks
    assert 1.0 <= row["striped"]["rank_worst"] < 1.01, row
    assert row["contiguous"]["step_mean"] >= row["contiguous"]["rank_mean"] >= 1.0, row
