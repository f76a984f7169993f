"""Greedy generation with a KV cache sharded over the ring: ring prefill, tree-attention decode.

    python examples/generate.py                      # spawns 4 CPU ranks over gloo
    python examples/generate.py --world 2 --prompt 1000 --new 32
    torchrun --nproc-per-node 8 examples/generate.py --prompt 131072 --dtype bfloat16   # GPUs
    torchrun --nproc-per-node 2 examples/generate.py --prompt 32768 --dtype bfloat16 \
        --compiler inductor --mode reduce-overhead        # decode steps as CUDA graphs
    python examples/generate.py --generate           # transformers' generate() instead of a loop

A small transformers Llama with random weights (no download). Every rank builds the same model
and feeds the same prompt. The prefill runs sharded over the ring, and each rank keeps its striped
share of every layer's K/V in a ``ShardedKVCache``; each decode step appends the new token's K/V
on one rank (round-robin, so the shards stay balanced) and attends over all shards with tree
attention. At the end the tokens are checked against the same generation on one process with
transformers' own cache.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time

import torch
import torch.distributed as dist
import transformers
from _launch import launch
from transformers.generation.streamers import BaseStreamer

import ringcompile  # noqa: F401  (registers backend="ring" without pip install)
from ringcompile.hf_cache import ShardedKVCache


def progress(step: int, total: int, started: float) -> None:
    done = int(30 * step / total)
    sys.stderr.write(
        f"\r[{'#' * done}{'.' * (30 - done)}] token {step}/{total} ({time.time() - started:.1f}s)"
    )
    if step == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def make_model(args, device):
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.dim,
        intermediate_size=2 * args.dim,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.prompt + args.new,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(device, getattr(torch, args.dtype)).eval()


@torch.no_grad()
def generate(model, prompt, new_tokens: int, cache, show: bool) -> torch.Tensor:
    """Greedy tokens; the model is told every token's global position (see ShardedKVCache)."""
    S, device = prompt.shape[1], prompt.device
    # transformers renamed past_key_values to cache
    params = inspect.signature(getattr(model, "_orig_mod", model).forward).parameters
    kw = {"cache" if "cache" in params else "past_key_values": cache, "use_cache": True}
    out = model(input_ids=prompt, position_ids=torch.arange(S, device=device)[None], **kw)
    tokens, started = [], time.time()
    for i in range(new_tokens):
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
        if show:
            progress(i + 1, new_tokens, started)
        if i + 1 < new_tokens:
            pos = torch.tensor([[S + i]], device=device)
            out = model(input_ids=tokens[-1], position_ids=pos, **kw)
    return torch.cat(tokens, 1)


class _Progress(BaseStreamer):
    """generate()'s tokens as a progress bar: its first ``put`` is the prompt."""

    def __init__(self, total: int):
        self.total, self.step, self.started = total, -1, time.time()

    def put(self, value) -> None:
        self.step += 1
        if self.step:
            progress(self.step, self.total, self.started)

    def end(self) -> None:
        pass


@torch.no_grad()
def hf_generate(model, prompt, new_tokens: int, cache, options, show: bool) -> torch.Tensor:
    """Greedy tokens from transformers' generate() with the forward compiled by the backend and
    the given cache (a compileable cache once it holds the prompt: one decode graph)."""
    params = inspect.signature(model.forward).parameters
    kw = {"cache" if "cache" in params else "past_key_values": cache}
    model.forward = torch.compile(model.forward, backend="ring", dynamic=False, options=options)
    try:
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            streamer=_Progress(new_tokens) if show else None,
            **kw,
        )
    finally:
        del model.forward  # the plain forward again
    return out[:, prompt.shape[1] :]


def worker(device: torch.device, args) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    on_gpu = device.type == "cuda"
    model = make_model(args, device)
    prompt = torch.randint(
        0, args.vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1)
    ).to(device)
    if rank == 0:
        print(
            f"{world} ranks ({'NCCL' if on_gpu else 'gloo'}), prompt of {args.prompt} tokens "
            f"({args.prompt // world} per rank), {args.new} new tokens"
        )
    options = {"layout": "striped", "compiler": args.compiler}
    if args.mode != "default":
        options["mode"] = args.mode
    # allocated up front: static addresses, which decode steps as CUDA graphs write into
    cache = ShardedKVCache(
        model.config,
        max_length=args.prompt + args.new,
        batch_size=args.batch,
        dtype=getattr(torch, args.dtype),
        device=device,
    )
    if args.generate:
        ring = hf_generate(model, prompt, args.new, cache, options, show=rank == 0)
    else:
        compiled = torch.compile(model, backend="ring", dynamic=False, options=options)
        ring = generate(compiled, prompt, args.new, cache, show=rank == 0)
    held = sum(
        int((layer.shard.positions[0] < args.prompt + args.new).sum()) for layer in cache.layers
    ) // len(cache.layers)
    print(f"rank {rank}: its cache shard holds {held} of {args.prompt + args.new - 1} tokens")
    if rank == 0:
        alone = generate(
            model, prompt, args.new, transformers.DynamicCache(config=model.config), show=False
        )
        print(f"ring:        {ring[0].tolist()}")
        print(f"one process: {alone[0].tolist()}")
        same = torch.equal(ring, alone)
        print("tokens equal: OK" if same else "tokens differ: MISMATCH")
        if not same:
            sys.exit(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--world", type=int, default=4, help="CPU ranks to spawn (ignored under torchrun)"
    )
    p.add_argument("--prompt", type=int, default=256, help="prompt length in tokens")
    p.add_argument("--new", type=int, default=16, help="tokens to generate")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument(
        "--dtype",
        default="float64",
        choices=["float64", "float32", "bfloat16"],
        help="float64 makes greedy ties between ring and one process vanishingly rare",
    )
    p.add_argument("--compiler", default="aot_eager", choices=["inductor", "aot_eager", "eager"])
    p.add_argument(
        "--generate",
        action="store_true",
        help="decode with transformers' generate() instead of a loop of our own",
    )
    p.add_argument(
        "--mode",
        default="default",
        choices=["default", "reduce-overhead"],
        help="inductor's mode (--compiler inductor): reduce-overhead makes each decode "
        "step a CUDA graph on GPUs",
    )
    args = p.parse_args()
    launch(worker, args, args.world)


if __name__ == "__main__":
    main()
