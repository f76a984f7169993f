"""The benchmarks that run on CPU still run: they mirror the ring op's internals (its kernel calls
without communication), so a change there can break them without any other test noticing."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_ring_runs_on_a_gloo_world(tmp_path):
    cmd = [sys.executable, "benchmarks/bench_ring.py", "--world-size", "2", "--tokens-per-rank",
           "64", "--heads", "2", "--kv-heads", "1", "--head-dim", "16", "--iters", "1",
           "--repeats", "1", "--warmup", "0", "--kernels", "auto", "--layouts", "zigzag",
           "--no-peers", "--out", str(tmp_path)]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (saved,) = tmp_path.glob("bench_ring_w2*.json")
    rows = json.loads(saved.read_text())["rows"]
    for name in ("ours zigzag", "ours zigzag, no communication"):
        assert rows[name]["ms"] > 0, rows[name]
