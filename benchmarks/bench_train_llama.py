"""Train a ~1B-parameter Llama (random weights) with ``backend="ring"``: tokens/s per GPU, peak
memory, and the longest sequence that fits, per ring size.

Model: transformers ``LlamaForCausalLM``, hidden 2048, 20 layers, 32 heads / 8 KV heads (d 128),
MLP 5632, vocab 32000 (1.03B parameters); ``--shape 8b``: Llama-3-8B's hidden 4096, 32/8 heads,
MLP 14336 and vocab 128256 with its 32 layers cut to ``--layers`` (default 8, to fit one GPU with
its optimizer). bf16 weights and AdamW, batch 1, no activation
checkpointing. Compiled with ``backend="ring"``, zigzag layout, ``gather_outputs=False``; the step
is the model's own ``labels=`` loss, which the ring keeps sharded (each rank's rows of the logits,
one all-reduce), so no rank ever holds full-sequence logits. Every length runs ``--warmup`` steps (the
first compiles) and times ``--steps``; lengths run in increasing order until one does not fit.

    torchrun --nproc-per-node W benchmarks/bench_train_llama.py --seqs 8192 16384 32768
    python benchmarks/bench_train_llama.py --fake-world 8 --seqs 65536 131072   # memory only

``--fake-world W`` runs one rank of a ring of W alone on one GPU with torch's ``fake`` process
group (collectives move nothing, so the numbers computed and the times are meaningless, but every
buffer has its real size): peak memory and whether a length fits at ring sizes the machine does not
have. ``--tiny`` shrinks the model to check the script on a CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist

import ringcompile  # noqa: F401  (registers backend="ring" in a checkout that is not installed)
from ringcompile.group import nccl_options


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[8192, 16384, 32768])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--layout", default="zigzag")
    p.add_argument("--compiler", default="aot_eager", choices=["inductor", "aot_eager"])
    p.add_argument("--fake-world", type=int, default=0)
    p.add_argument("--tiny", action="store_true")
    p.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="1b",
        help="1b: the model above; 8b: Llama-3-8B's layer and vocabulary",
    )
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help="layers kept (default: 20 for 1b, 8 of 32 for 8b so that it fits)",
    )
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    return p.parse_args()


# Config fields of each --shape and its default depth; "8b" is Llama-3-8B with its layers cut.
SHAPES = {
    "1b": (
        dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=32000,
        ),
        20,
    ),
    "8b": (
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            rope_theta=500000.0,
        ),
        8,
    ),
}


def build(args, device, max_len, layers=None, **shape):
    """The Llama of ``--shape`` (``layers`` deep, ``shape`` overriding config fields), or a tiny
    one."""
    import transformers

    fields, depth = SHAPES[getattr(args, "shape", "1b")]
    layers = layers or getattr(args, "layers", None) or depth
    size = (
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=256,
        )
        if args.tiny
        else dict(fields, num_hidden_layers=layers, **shape)
    )
    cfg = transformers.LlamaConfig(
        max_position_embeddings=max_len, attn_implementation="sdpa", **size
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


def packed_positions(S: int, shortest: int, longest: int) -> torch.Tensor:
    """(1, S) position ids of documents packed end to end, each of a length drawn uniformly from
    [shortest, longest] (the last one cut), restarting at 0 at each document's start."""
    g = torch.Generator().manual_seed(S)
    lengths = []
    while sum(lengths) < S:
        lengths.append(int(torch.randint(shortest, longest + 1, (), generator=g)))
    lengths[-1] -= sum(lengths) - S
    return torch.cat([torch.arange(n) for n in lengths])[None]


def timed_steps(model, fn, opt, S, args, device, rank, **inputs) -> dict:
    """``--warmup`` then ``--steps`` training steps of ``fn`` (the model, compiled or not) on S
    random tokens (and ``inputs``, e.g. ``position_ids``) with the model's own ``labels=`` loss:
    the median step's seconds, the peak memory and every step's loss."""
    ids = torch.randint(0, model.config.vocab_size, (1, S),
                        generator=torch.Generator().manual_seed(S)).to(device)  # fmt: skip
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        loss = fn(input_ids=ids, labels=ids, use_cache=False, **inputs).loss  # alike on all ranks
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss))
        if rank == 0:
            print(
                f"  S={S} step {step + 1}/{args.warmup + args.steps}: loss {losses[-1]:.4f} "
                f"({time.perf_counter() - t0:.2f}s)",
                file=sys.stderr,
                flush=True,
            )
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return dict(step_s=sorted(times)[len(times) // 2], peak_gib=peak, losses=losses)


def run_length(model, opt, compiled, S, args, device, rank, world) -> dict:
    row = timed_steps(model, compiled, opt, S, args, device, rank)
    return dict(seq=S, world=world, tokens_per_s_per_gpu=S / row["step_s"] / world, **row)


def main() -> None:
    args = _parse()
    fake = args.fake_world > 0
    cuda = torch.cuda.is_available()
    if fake:
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=args.fake_world)
        device = (
            torch.device("cuda", 0) if cuda else torch.device("cpu")
        )  # set_device wants an index
    else:
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            pg_options=nccl_options() if cuda else None,
            timeout=datetime.timedelta(seconds=120),
        )
        device = (
            torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
        )
    if cuda:
        torch.cuda.set_device(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build(args, device, max(args.seqs))
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    compiled = torch.compile(
        model,
        backend="ring",
        dynamic=False,
        options={"layout": args.layout, "compiler": args.compiler, "gather_outputs": False},
    )
    rows = []
    for S in sorted(args.seqs):
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        try:
            row = run_length(model, opt, compiled, S, args, device, rank, world)
        except torch.cuda.OutOfMemoryError:
            # with a real ring the other ranks may now wait in a collective: stop here
            row = dict(seq=S, world=world, oom=True)
        opt.zero_grad(set_to_none=True)
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
        if row.get("oom"):
            break
    if rank == 0:
        what = f"fake ring of {world} (one rank, memory only)" if fake else f"{world} ranks"
        print(
            f"Llama {n_params / 1e9:.2f}B ({args.shape} shape, "
            f"{model.config.num_hidden_layers} layers, vocab {model.config.vocab_size}), {what}, {args.layout}, compiler {args.compiler}"
        )
        print("| S | per rank | step s | tokens/s per GPU | peak GiB |")
        print("|---:|---:|---:|---:|---:|")
        for r in rows:
            if r.get("oom"):
                print(f"| {r['seq']} | {-(-r['seq'] // world)} | out of memory | | |")
            else:
                tps = "-" if fake else f"{r['tokens_per_s_per_gpu']:.0f}"
                step = "-" if fake else f"{r['step_s']:.3f}"
                print(
                    f"| {r['seq']} | {-(-r['seq'] // world)} | {step} | {tps} | "
                    f"{r['peak_gib']:.2f} |"
                )
        tag = (f"fake{world}" if fake else f"w{world}") + f"_{args.shape}"
        with open(os.path.join(args.out, f"bench_train_llama_{tag}.json"), "w") as f:
            json.dump(rows, f, indent=1)
    if any(r.get("oom") for r in rows) and not fake and world > 1:
        os._exit(0)  # a rank that ran out of memory may have left NCCL work in flight
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
