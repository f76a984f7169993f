"""Generation after a long prompt over the ring: prefill time and per-token latency (issue 18).

    torchrun --nproc-per-node W benchmarks/bench_generate.py [--prompts 32768 131072] [--new 32]
        [--modes default reduce-overhead] [--baselines eager static] [--out DIR]
    python benchmarks/bench_generate.py --world 2 --tiny     # CPU ranks over gloo: a smoke run
    python benchmarks/bench_generate.py --replot DIR         # the plot from DIR/bench_generate.json

A ~1B transformers Llama (16 layers, hidden 2048, 32/8 heads of 128, MLP 5632, vocab 32000; bf16,
random weights), batch 1, greedy, the logits of the last token only (``logits_to_keep=1``):

- ours: every rank runs the model compiled by ``backend="ring"`` (inductor inside, static
  shapes) with a ``ShardedKVCache`` allocated up front, in a loop of its own
  (``examples/generate.py``'s: the prompt, then one token at a time with its position) or through
  transformers' ``generate()`` (``--ours``; timed as "static" below); each ``--modes`` entry is the
  compile mode: "default", or "reduce-overhead", where the decode step runs as a CUDA graph;
- one GPU (rank 0 alone while the others wait): "eager", the same loop on the plain model with
  transformers' ``DynamicCache``; "static", ``generate()`` with transformers' static cache, whose
  decode step it compiles itself with ``mode="reduce-overhead"`` (per token: (``generate()`` of
  1 + N tokens - of 1) / N).

Prefill: the prompt's forward, synchronised. Per token: N decode steps back to back, synchronised
at the end, / N. Medians of ``--repeats`` runs after one warm-up run (compiles, CUDA graph
records).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from _launch import launch  # noqa: E402
from saving import replot, save_run  # noqa: E402  (benchmarks/saving.py: a script's folder is on its path)

# (importing ringcompile registers backend="ring" without pip install)
from ringcompile.hf_cache import ShardedKVCache  # noqa: E402


def _config(tiny: bool):
    if tiny:
        shape = dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=128,
        )
    else:
        shape = dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=32000,
        )
    return shape


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_kw(model) -> str:
    # transformers renamed past_key_values to cache
    import inspect

    params = inspect.signature(getattr(model, "_orig_mod", model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _timed_generate(model, ids, new: int, device, **kw) -> tuple[float, torch.Tensor]:
    """``generate()``'s seconds and tokens."""
    _sync(device)
    started = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kw)
    _sync(device)
    return time.perf_counter() - started, out


def _loop(model, ids, new: int, device, cache, together: bool):
    """Greedy tokens from a loop: (prefill seconds, seconds per new token, tokens, the prefill's
    logits of the last token)."""
    S = ids.shape[1]
    kw = {_cache_kw(model): cache, "use_cache": True, "logits_to_keep": 1}
    if together:
        dist.barrier()
    _sync(device)
    started = time.perf_counter()
    out = model(input_ids=ids, position_ids=torch.arange(S, device=device)[None], **kw)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    prefill = time.perf_counter() - started
    first_logits = out.logits[0, -1].float().cpu()
    tokens = [token]
    if together:
        dist.barrier()
    _sync(device)
    started = time.perf_counter()
    positions = torch.arange(S, S + new, device=device)[None]  # (made once: no copy per step)
    for i in range(new):
        out = model(input_ids=tokens[-1], position_ids=positions[:, i : i + 1], **kw)
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    _sync(device)
    per_token = (time.perf_counter() - started) / new
    return prefill, per_token, torch.cat(tokens, 1)[0].tolist(), first_logits


def _generate(model, ids, new: int, device, before=lambda: None, **kw):
    """Greedy tokens from ``generate()``: (prefill seconds (``generate()`` of 1 token), seconds per
    new token (``generate()`` of 1 + ``new`` tokens less that, / ``new``), tokens, the prefill's
    logits of the last token). ``before`` runs before each ``generate()`` (emptying a cache)."""
    before()
    prefill = _timed_generate(model, ids, 1, device, **kw)[0]
    before()
    t, out = _timed_generate(
        model, ids, 1 + new, device, output_logits=True, return_dict_in_generate=True, **kw
    )
    return (
        prefill,
        (t - prefill) / new,
        out.sequences[0, ids.shape[1] :].tolist(),
        out.logits[0][0].float().cpu(),
    )


@torch.no_grad()
def _last_logits_in_chunks(model, ids, chunk: int = 2048) -> torch.Tensor:
    """The prompt's last logits, the prompt fed ``chunk`` tokens at a time into a DynamicCache:
    in float32 with GQA, SDPA takes its math path, whose whole-prompt score matrix (heads x S x
    S) would not fit."""
    cache = transformers.DynamicCache(config=model.config)
    for start in range(0, ids.shape[1], chunk):
        piece = ids[:, start : start + chunk]
        positions = torch.arange(start, start + piece.shape[1], device=ids.device)[None]
        out = model(
            input_ids=piece,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{_cache_kw(model): cache},
        )
    return out.logits[0, -1].float().cpu()


def _median_runs(run, repeats: int) -> dict:
    run()  # warm-up
    results = [run() for _ in range(repeats)]
    return {
        "prefill_s": statistics.median(r[0] for r in results),
        "per_token_ms": statistics.median(r[1] for r in results) * 1e3,
        "tokens": results[-1][2],
        "logits": results[-1][3],
    }


def worker(device: torch.device, args) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    config = transformers.LlamaConfig(
        max_position_embeddings=max(args.prompts) + args.new + 1,
        attn_implementation="sdpa",
        **_config(args.tiny),
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device, dtype).eval()
    model.generation_config.pad_token_id = 0
    # the prefill's last logits in float32 on one GPU: what each bf16 row's are compared with
    reference = copy.deepcopy(model).float() if args.fp32_reference and rank == 0 else None
    rows, fp32_logits = [], {}

    def report(row):
        rows.append(row)
        if rank == 0:
            print({k: v for k, v in row.items() if k not in ("tokens", "logits")}, flush=True)

    for prompt in args.prompts:
        ids = torch.randint(
            1, config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(prompt)
        ).to(device)
        torch._dynamo.reset()
        if reference is not None:
            fp32_logits[prompt] = _last_logits_in_chunks(reference, ids)
        if rank == 0:
            for baseline in args.baselines:
                if baseline == "eager":

                    def run():
                        return _loop(
                            model,
                            ids,
                            args.new,
                            device,
                            transformers.DynamicCache(config=config),
                            together=False,
                        )
                else:

                    def run():
                        return _generate(
                            model, ids, args.new, device, cache_implementation="static"
                        )

                with torch.no_grad():
                    report(
                        {
                            **_median_runs(run, args.repeats),
                            "prompt": prompt,
                            "what": f"one GPU, {baseline}",
                        }
                    )
                torch._dynamo.reset()
        dist.barrier()
        for mode in args.modes:
            for way in args.ours:
                torch._dynamo.reset()
                options = {"layout": "striped", "compiler": "inductor"}
                if mode != "default":
                    options["mode"] = mode
                # one cache, emptied for each run: its slots keep their addresses (the CUDA
                # graph's)
                cache = ShardedKVCache(
                    config,
                    max_length=prompt + args.new + 1,
                    batch_size=1,
                    dtype=dtype,
                    device=device,
                )
                if way == "loop":
                    compiled = torch.compile(model, backend="ring", dynamic=False, options=options)

                    def ours():
                        cache.reset()
                        return _loop(compiled, ids, args.new, device, cache, together=True)
                else:
                    model.forward = torch.compile(
                        model.forward, backend="ring", dynamic=False, options=options
                    )

                    def ours():
                        return _generate(
                            model,
                            ids,
                            args.new,
                            device,
                            before=lambda: (cache.reset(), dist.barrier()),
                            **{_cache_kw(model): cache},
                        )

                what = f"ours, W={world}, mode={mode}" + (
                    ", generate()" if way == "generate" else ""
                )
                try:
                    with torch.no_grad():
                        report({**_median_runs(ours, args.repeats), "prompt": prompt, "what": what})
                except Exception as e:  # (every rank fails alike: the next mode still runs)
                    if rank == 0:
                        print(f"{what}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
                if way == "generate":
                    del model.forward  # the plain forward again
        dist.barrier()
    if rank != 0:
        return
    # Greedy tokens part where the top two logits nearly tie: each row's tokens are compared with
    # the first row's up to the first difference, and its prefill logits by their largest
    # difference, beside the first row's gap between its top two (a difference beyond that gap
    # may change the token; one below it may not)
    # With --fp32-reference, each row's prefill logits are also compared with one GPU's in float32:
    # a bf16 row as far from it as one GPU's bf16 eager row is as exact as bf16 allows
    print(
        "\n| prompt | what | prefill s | per new token ms | tokens as the first row's | "
        "prefill logits: max abs diff to the first row's (its top-2 gap) | to fp32's |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        ref = next(x for x in rows if x["prompt"] == r["prompt"])
        n = min(len(r["tokens"]), len(ref["tokens"]))
        same = next((i for i in range(n) if r["tokens"][i] != ref["tokens"][i]), n)
        top2 = ref["logits"].topk(2).values
        diff = float((r["logits"] - ref["logits"]).abs().max())
        r["prefill_logits_max_abs_diff"] = diff
        to_fp32 = "-"
        if r["prompt"] in fp32_logits:
            r["prefill_logits_max_abs_diff_to_fp32"] = float(
                (r["logits"] - fp32_logits[r["prompt"]]).abs().max()
            )
            to_fp32 = f"{r['prefill_logits_max_abs_diff_to_fp32']:.3g}"
        print(
            f"| {r['prompt']} | {r['what']} | {r['prefill_s']:.3f} | {r['per_token_ms']:.2f} | "
            f"{same} of {n} | {diff:.3g} ({float(top2[0] - top2[1]):.3g}) | {to_fp32} |"
        )
    for r in rows:
        del r["logits"]
    if args.out:
        save_run(
            args.out,
            "bench_generate",
            rows,
            lambda: plot(rows, os.path.join(args.out, "bench_generate.png")),
        )


def plot(rows: list[dict], path: str) -> None:
    """Per-token latency and prefill time of each row, one pair of bars per prompt length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prompts = sorted({r["prompt"] for r in rows})
    whats = list(dict.fromkeys(r["what"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / len(whats)
    for ax, key, label in ((axes[0], "per_token_ms", "ms per new token"),
                           (axes[1], "prefill_s", "prefill, s")):  # fmt: skip
        for i, what in enumerate(whats):
            ys = [next((r[key] for r in rows if r["prompt"] == p and r["what"] == what), 0)
                  for p in prompts]  # fmt: skip
            xs = [j + i * width for j in range(len(prompts))]
            ax.bar(xs, ys, width, label=what)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(prompts))],
                      [f"prompt {p:,}" for p in prompts])  # fmt: skip
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title("decode, ~1B Llama, bf16, batch 1")
    axes[1].set_title("prefill")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=len(whats), fontsize=8)
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--world", type=int, default=2, help="CPU ranks to spawn (ignored under torchrun)"
    )
    p.add_argument("--prompts", type=int, nargs="+", default=[32768])
    p.add_argument("--new", type=int, default=32, help="timed new tokens")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--modes",
        nargs="+",
        default=["default", "reduce-overhead"],
        choices=["default", "reduce-overhead"],
    )
    p.add_argument(
        "--ours",
        nargs="+",
        default=["loop", "generate"],
        choices=["loop", "generate"],
        help="how ours decodes: its own loop, or transformers' generate()",
    )
    p.add_argument(
        "--baselines", nargs="*", default=["eager", "static"], choices=["eager", "static"]
    )
    p.add_argument(
        "--fp32-reference",
        action="store_true",
        help="compare every row's prefill logits with one GPU's in float32 (slow "
        "beyond 32k: float32 attention)",
    )
    p.add_argument("--tiny", action="store_true", help="a 2-layer model (smoke runs)")
    p.add_argument("--out", default=None)
    p.add_argument("--replot", metavar="DIR", help="draw DIR/bench_generate.json and stop")
    args = p.parse_args()
    if args.replot:
        replot(args.replot, "bench_generate", plot)
        return
    launch(worker, args, args.world)


if __name__ == "__main__":
    main()
