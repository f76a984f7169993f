"""Where a transformers Llama's training step goes on one GPU under ``backend="ring"``: one step
profiled after three, per attention implementation, the kernels' table sorted by GPU time.

The 1.02B Llama of ``bench_llama_step.py`` (16 layers, 32/8 heads of d 128), 16,384 tokens in
packed documents of 1k-4k tokens (``position_ids`` restarting), ``labels=`` loss, the backward; the
model with ``attn_implementation="sdpa"`` and with ``"flex_attention"``, compiled with the ring
(striped layout, inductor inside).

    PYTHONPATH=. python benchmarks/profile_llama_step.py [--impls sdpa flex_attention]
"""

from __future__ import annotations

import argparse
import types

import torch
from bench_train_llama import build, packed_positions
from torch.profiler import ProfilerActivity, profile

import ringcompile  # noqa: F401  (registers backend="ring" in a checkout that is not installed)

S = 16384


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--impls", nargs="+", default=["sdpa", "flex_attention"])
    args = ap.parse_args()
    model = build(types.SimpleNamespace(tiny=False, shape="1b"), torch.device("cuda"), S,
                  layers=16, head_dim=128)  # fmt: skip
    pos = packed_positions(S, 1024, 4096).cuda()
    ids = torch.randint(0, 32000, (1, S), device="cuda")
    for impl in args.impls:
        torch._dynamo.reset()
        model.set_attn_implementation(impl)
        compiled = torch.compile(model, backend="ring", options={"layout": "striped"})

        def step():
            loss = compiled(input_ids=ids, labels=ids, position_ids=pos, use_cache=False).loss
            loss.backward()
            model.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as p:
            step()
            torch.cuda.synchronize()
        busy = sum(e.device_time for e in p.events() if e.device_type.name == "CUDA") / 1e3
        print(f"===== {impl}: GPU busy {busy:.1f} ms a step")
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=22,
                                     max_name_column_width=70))  # fmt: skip


if __name__ == "__main__":
    main()
