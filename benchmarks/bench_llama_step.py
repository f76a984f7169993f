"""A transformers Llama's whole training step, side by side in one run: ``backend="ring"`` on W
GPUs against one GPU in eager and under plain ``torch.compile``.

Model: ``LlamaForCausalLM``, hidden 2048, 16 layers, 32 / 8 heads of dim 128, MLP 5632, vocab
32000 (1.02B parameters), random bf16 weights, AdamW, batch 1; the step is the model's own loss
(``labels=``), its backward and the optimizer step. Modes (``--modes``):

- ``ring``: ``torch.compile(model, backend="ring")`` on every rank (``--layout``, zigzag by
  default; inductor inside; the default block kernels: plain blocks on cuDNN, packed documents
  (with their windows or chunks) on FA2's varlen kernel, other masked blocks on Triton);
- ``ring-triton``: the same with ``options={"kernels": "triton"}`` (every block in Triton);
- ``ring-flex``: ``backend="ring"`` on the model with ``attn_implementation="flex_attention"``
  (the backend reads each flex call's mask: on packed documents, causality inside the documents
  transformers derives from the position ids; GPU only: on the CPU flex refuses a backward before
  the backend sees the call);
- ``eager``: the plain model on one GPU (rank 0; SDPA picks cuDNN / flash);
- ``flex``: the model with ``attn_implementation="flex_attention"`` on one GPU (rank 0; transformers
  compiles flex_attention's kernels itself, the rest runs eagerly);
- ``compile``: ``torch.compile(model)`` (inductor) on one GPU (rank 0).

Each mode starts from the same weights, runs ``--warmup`` steps (the first compiles), then the
median of ``--steps``; lengths and modes run in the order given (the first step's loss of every
mode is the same model's on the same tokens). Under torchrun the one-GPU modes run on rank 0 while
the others wait.

    torchrun --nproc-per-node 2 benchmarks/bench_llama_step.py --seqs 32768
    python benchmarks/bench_llama_step.py --seqs 16384          # W = 1: all modes on one GPU
    python benchmarks/bench_llama_step.py --tiny --seqs 64       # check the script on a CPU

``--arch gemma2`` trains a Gemma 2 of the same size instead (hidden 2048, 16 layers, 32 / 8 heads of
dim 128, MLP 5632, vocab 32000; windows of 4096 in every other layer, scores soft-capped at 50,
logits at 30): transformers runs it with eager attention only (SDPA has no soft cap), which
holds every layer's S x S scores; the ring takes that attention as SDPA with a soft cap.

``--documents`` trains on packed documents instead of one sequence: ``position_ids`` restart at
each document's start (lengths 1k-4k tokens, ``packed_positions``), from which transformers
builds its packed-sequence mask (each token sees its own document only).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

import torch
import torch.distributed as dist
from bench_train_llama import (  # the same model: 16 layers, heads of dim 128
    build,
    packed_positions,
    timed_steps,
)

import ringcompile  # noqa: F401  (registers backend="ring" in a checkout that is not installed)

MODES = ["ring", "ring-triton", "ring-flex", "eager", "flex", "compile"]
ONE_GPU = ("eager", "flex", "compile")


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[16384])
    p.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--documents", action="store_true", help="packed documents of 1k-4k tokens")
    p.add_argument("--layout", default="zigzag", choices=["zigzag", "striped", "contiguous"])
    p.add_argument("--arch", default="llama", choices=["llama", "gemma2"])
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    return p.parse_args()


def build_gemma2(args, device, max_len):
    """Gemma 2 of the Llama's size (eager attention, soft caps, windows), or a tiny one."""
    import transformers

    size = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=256, sliding_window=16)
            if args.tiny else
            dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=32000,
                 sliding_window=4096))  # fmt: skip
    cfg = transformers.Gemma2Config(max_position_embeddings=max_len, attn_implementation="eager",
                                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                    **size)  # fmt: skip
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return transformers.Gemma2ForCausalLM(cfg).to(device=device, dtype=dtype)


def compiled_model(model, mode, group, layout):
    model.set_attn_implementation("flex_attention" if mode.endswith("flex") else "sdpa")
    if mode in ("eager", "flex"):
        return model
    if mode == "compile":
        return torch.compile(model)
    options = {"layout": layout, "group": group}
    if mode == "ring-triton":
        options["kernels"] = "triton"
    return torch.compile(model, backend="ring", options=options)


def main() -> None:
    args = _parse()
    cuda = torch.cuda.is_available()
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=600))
        rank, world = dist.get_rank(), dist.get_world_size()
        device = (
            torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
        )
    else:
        rank, world, device = 0, 1, torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    group = dist.group.WORLD if world > 1 else None
    if args.arch == "gemma2":
        model = build_gemma2(args, device, max(args.seqs))
    else:
        model = build(args, device, max(args.seqs), layers=16, head_dim=128)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    for S in args.seqs:
        for mode in args.modes:
            one_gpu = mode in ONE_GPU
            row = dict(seq=S, mode=mode, gpus=1 if one_gpu else world)
            if not one_gpu or rank == 0:
                model.load_state_dict(weights)
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
                    inputs = {}
                    if args.documents:
                        shortest, longest = (1024, 4096) if not args.tiny else (8, 24)
                        inputs["position_ids"] = packed_positions(S, shortest, longest).to(device)
                    row |= timed_steps(model, compiled_model(model, mode, group, args.layout),
                                       opt, S, args, device, rank, **inputs)  # fmt: skip
                    del opt
                except torch.cuda.OutOfMemoryError:
                    row["oom"] = True
                torch._dynamo.reset()
            if world > 1:
                dist.barrier()
            rows.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
    if rank == 0:
        name = torch.cuda.get_device_name() if cuda else "cpu"
        print(
            f"\n{type(model).__name__} {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B, labels= loss, "
            f"AdamW; {'packed documents, ' if args.documents else ''}{args.layout} ring; {name}, "
            f"torch {torch.__version__}"
        )
        print("| S | mode | GPUs | step s | tokens/s per GPU | peak GiB |")
        print("|---:|---|---:|---:|---:|---:|")
        for r in rows:
            if "step_s" in r:
                tps = r["seq"] / r["step_s"] / r["gpus"]
                print(
                    f"| {r['seq']} | {r['mode']} | {r['gpus']} | {r['step_s']:.3f} | {tps:.0f} | "
                    f"{r['peak_gib']:.1f} |"
                )
            else:
                print(f"| {r['seq']} | {r['mode']} | {r['gpus']} | out of memory | | |")
        tag = ("_gemma2" if args.arch == "gemma2" else "") + (
            "_documents" if args.documents else ""
        )
        with open(os.path.join(args.out, f"bench_llama_step_w{world}{tag}.json"), "w") as f:
            json.dump(rows, f, indent=1)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
