"""Multi-GPU exactness over NCCL: ``tests/nccl_checks.py`` under torchrun on every GPU there is."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs at least 2 CUDA GPUs"),
]


def test_ring_and_compiled_model_over_nccl():
    world = torch.cuda.device_count()
    script = os.path.join(os.path.dirname(__file__), "nccl_checks.py")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", script],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    print(run.stdout[-20000:])
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-5000:]
